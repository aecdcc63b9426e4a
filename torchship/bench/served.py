"""Both engines over HTTP on the same archive: per-request overhead, throughput under concurrency with dynamic
batching on and off, JSON versus binary bodies, cold start and memory. Every answer is checked against eager."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import torch
import yaml

from torchship.archive.build import archive_default_endpoint
from torchship.archive.mar import MarArchive, rewrite_archive
from torchship.engines import engine_class
from torchship.engines.base import Engine
from torchship.errors import TorchshipError
from torchship.handlers.codec import encode_request
from torchship.handlers.names import ENDPOINT_FILE, MAR_MANIFEST_FILE, MODEL_CONFIG_FILE, bearer
from torchship.spec import ModelSpec, Tolerance
from torchship.verify import load
from torchship.verify.load import LoadRequest, Shot

MODEL = "simple_cnn"
BATCHED, UNBATCHED = "simple_cnn", "simple_cnn_nobatch"


@dataclass(frozen=True)
class Payload:
    body: bytes
    headers: dict[str, str]
    expected: torch.Tensor
    #: The output compared with `expected` (every model the bench serves has one).
    output: str = "logits"

    def request(self, path: str, tol: Tolerance) -> LoadRequest:
        """This payload as the load loop sends it to `path`, checked against `expected`."""
        check = load.expect_outputs((self.output,), (self.expected,), tol)
        return LoadRequest("", self.body, self.headers, check, batch=int(self.expected.shape[0]), path=path)


def bench_store(
    artifacts: Path, out: Path, model_config: dict[str, Any], variants: dict[str, dict[str, Any]] | None = None
) -> Path:
    """simple_cnn's default endpoint with the configured dynamic batching, and with batchSize 1 (`variants` adds
    more: endpoint name -> model-config keys that differ). One store, so one engine start serves them all."""
    archive_default_endpoint(MODEL, artifacts=artifacts, out_dir=out, model_config=model_config)
    for name, overrides in {UNBATCHED: {"batchSize": 1, "maxBatchDelay": 0}, **(variants or {})}.items():

        def edit(members: dict[str, bytes], name: str = name, overrides: dict[str, Any] = overrides) -> None:
            members[MODEL_CONFIG_FILE] = yaml.safe_dump({**model_config, **overrides}).encode()
            endpoint = json.loads(members[ENDPOINT_FILE])
            members[ENDPOINT_FILE] = json.dumps({**endpoint, "endpoint": name}).encode()
            mar_manifest = json.loads(members[MAR_MANIFEST_FILE])
            mar_manifest["model"]["modelName"] = name
            members[MAR_MANIFEST_FILE] = json.dumps(mar_manifest).encode()

        rewrite_archive(out / f"{BATCHED}.mar", out / f"{name}.mar", edit)
    return out


def tolerance_of(store: Path) -> Tolerance:
    return Tolerance(*MarArchive(store / f"{BATCHED}.mar").tolerance)


def make_payloads(model: Callable[..., torch.Tensor], shapes: list[tuple[int, ...]], *, binary: bool) -> list[Payload]:
    out = []
    for i, shape in enumerate(shapes):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1000 + i))
        with torch.inference_mode():
            expected = model(x)
        body, headers = encode_request({"x": x}, binary=binary, parameters={"binary_data_output": True} if binary else None)
        out.append(Payload(body, headers, expected))
    return out


def spec_payloads(spec: ModelSpec, model: Callable[..., Any], count: int, *, binary: bool) -> list[Payload]:
    """`count` batch-1 requests for any one-output model at its serving sizes, each with the output `model` gives."""
    out = []
    for i in range(count):
        inputs = spec.make_inputs(1, serving=True, seed_offset=2000 + i)
        with torch.inference_mode():
            expected = model(*(inputs[t.name] for t in spec.inputs))
        expected = expected[0] if isinstance(expected, (tuple, list)) else expected
        params = {"binary_data_output": True} if binary else None
        body, headers = encode_request(inputs, binary=binary, parameters=params)
        out.append(Payload(body, headers, expected, output=spec.outputs[0].name))
    return out


@dataclass
class LoadResult:
    requests: int = 0
    verified: int = 0
    #: Refused at once with a JSON 503 (a full queue: the engine shedding load, not a failure).
    shed: int = 0
    errors: int = 0
    wrong: int = 0
    rows: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] | None = None

    @classmethod
    def of(cls, shots: Sequence[Shot], seconds: float) -> LoadResult:
        """A run's shots as the bench reports them: a refusal's latency is not a served request's, and a request
        that got no answer has none."""
        return cls(
            requests=len(shots),
            verified=sum(s.outcome in ("ok", "wrong") for s in shots),
            shed=sum(s.outcome == "shed" for s in shots),
            errors=sum(s.outcome in ("error", "refused", "hung") for s in shots),
            wrong=sum(s.outcome == "wrong" for s in shots),
            rows=sum(s.batch for s in shots if s.outcome == "ok"),
            seconds=seconds,
            latencies_ms=[s.latency_ms for s in shots if s.outcome in ("ok", "wrong", "error") and s.status],
        )

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms or [0.0])
        return {
            "requests": self.requests, "verified": self.verified, "shed": self.shed, "errors": self.errors, "wrong": self.wrong,
            "seconds": self.seconds, "rows_per_s": self.rows / self.seconds if self.seconds else 0.0,
            "p50_ms": statistics.median(lat), "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        }  # fmt: skip


def measure_load(
    url: str, token: str | None, payloads: list[Payload], tol: Tolerance, *, clients: int, duration_s: float,
    max_requests: int | None = None,
) -> LoadResult:  # fmt: skip
    """`clients` clients post the payloads round robin (each from its own offset) to `url` (an endpoint's full URL)
    for `duration_s` or `max_requests` requests, through the load loop; every answer checked."""
    parts = urlsplit(url)
    pool = [p.request(parts.path, tol) for p in payloads]
    run = load.LoadRun(
        f"{parts.scheme}://{parts.netloc}", pool, clients=clients, auth=bearer(token), duration_s=duration_s,
        requests_total=max_requests, timeout_s=300,
    ).start()  # fmt: skip
    shots = run.join()
    return LoadResult.of(shots, run.seconds)


def rss_bytes(root: psutil.Process, *, include_root: bool) -> int:
    procs = root.children(recursive=True) + ([root] if include_root else [])
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


@contextmanager
def engine(name: str, store: Path, workdir: Path, **options: Any) -> Iterator[tuple[Engine, Callable[[], int]]]:
    """Start one engine (`options` go to its constructor); yield it and footprint(), the resident bytes of its whole
    process tree."""
    with engine_class(name)(store, workdir, **options) as running:
        root = psutil.Process(running.pid)
        yield running, lambda: rss_bytes(root, include_root=True)


def first_correct_answer_s(
    url: str, token: str | None, payload: Payload, tol: Tolerance, started: float, *, timeout_s: float = 600.0
) -> float:
    """Seconds from `started` to the first answer equal to eager (polling; the engine may still be warming up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = measure_load(f"{url}/predictions/{BATCHED}", token, [payload], tol, clients=1, duration_s=60, max_requests=1)
        if r.verified and not r.wrong:
            return time.monotonic() - started
        time.sleep(0.2)
    raise TorchshipError(f"no answer equal to eager from {url} within {timeout_s:g} s")


__all__ = ["bench_store", "engine", "first_correct_answer_s", "make_payloads", "measure_load", "tolerance_of"]
