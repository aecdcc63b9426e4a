"""What parity in production costs, measured in this process on the endpoint core both engines run: the reference
check at load (start-up time, and what it does for the first request), and the metrics on every request (the
same batch-1 request with TORCHSHIP_METRICS_DIR set and unset, interleaved)."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchship.archive.build import archive_default_endpoint
from torchship.archive.mar import MarArchive
from torchship.handlers.codec import encode_request
from torchship.handlers.core import LOADERS, EndpointCore
from torchship.handlers.names import METRICS_DIR_ENV
from torchship.handlers.wire import Request

#: Requests timed after a load: the first, and the tenth as the warm reference.
WARM_REQUEST = 10


def _core(model_dir: Path, environ: dict[str, str]) -> tuple[EndpointCore, float]:
    t0 = time.perf_counter()
    core = EndpointCore(model_dir, device=torch.device("cpu"), environ=environ, model_config={"torchThreads": 0})
    return core, (time.perf_counter() - t0) * 1000.0


def _request(archive: MarArchive) -> Request:
    case = archive.references()[0]
    one = {name: tensor[:1] for name, tensor in case["inputs"].items()}
    body, headers = encode_request(one, binary=True)
    return Request.of(body, headers)


def _ms(call: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1000.0


def _timed_request(core: EndpointCore, request: Request) -> float:
    t0 = time.perf_counter()
    core.infer_batch([request])
    return (time.perf_counter() - t0) * 1000.0


def startup(archive: MarArchive, model_dir: Path) -> dict[str, Any]:
    """Load time with the check, the check alone, and requests 1 and WARM_REQUEST after it; the same two requests
    straight after loading the artifact without any check, for what the check does as a warm-up."""
    core, load_ms = _core(model_dir, {})
    request = _request(archive)
    served = [_timed_request(core, request) for _ in range(WARM_REQUEST)]
    entry = archive.manifest["formats"][archive.format]
    model = LOADERS[archive.format](str(model_dir / entry["file"]), torch.device("cpu"), entry.get("options"))
    case = archive.references()[0]
    args = [case["inputs"][s["name"]][:1] for s in archive.manifest["inputs"]]
    with torch.inference_mode():
        raw = [_ms(lambda: model(*args)) for _ in range(WARM_REQUEST)]
    return {
        "endpoint": archive.endpoint,
        "format": archive.format,
        "load_ms": load_ms,
        "check_ms": core.parity.duration_ms,
        "cases": core.parity.cases,
        "worst_abs": core.parity.comparison.max_abs,
        "first_ms": served[0],
        "warm_ms": served[-1],
        "unchecked_first_ms": raw[0],
        "unchecked_warm_ms": raw[-1],
    }


def metrics_cost(archive: MarArchive, model_dir: Path, metrics_dir: Path, requests: int) -> dict[str, Any]:
    """Per-request wall time of the same batch-1 request with metrics on and off, alternating so that both see the
    same machine; the difference of the medians is what metrics add to a request."""
    on, _ = _core(model_dir, {METRICS_DIR_ENV: str(metrics_dir)})
    off, _ = _core(model_dir, {})
    request = _request(archive)
    for core in (on, off):  # warm both
        for _ in range(20):
            core.infer_batch([request])
    times: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(requests):
        order = (("on", on), ("off", off)) if i % 2 else (("off", off), ("on", on))
        for label, core in order:
            times[label].append(_timed_request(core, request))
    p50 = {label: statistics.median(values) for label, values in times.items()}
    return {
        "endpoint": archive.endpoint,
        "requests": requests,
        "on_p50_ms": p50["on"],
        "off_p50_ms": p50["off"],
        "cost_ms": p50["on"] - p50["off"],
        "on_mean_ms": statistics.fmean(times["on"]),
        "off_mean_ms": statistics.fmean(times["off"]),
    }


def observability(artifacts: Path, models: tuple[str, ...], model_config: dict[str, Any], *, requests: int,
                  say: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """The start-up rows for each model's default endpoint and the metrics' cost on the cheapest of them."""
    with tempfile.TemporaryDirectory(prefix="torchship-bench-observe-") as tmp:
        rows, archives = [], {}
        for model in models:
            endpoint = archive_default_endpoint(
                model, artifacts=artifacts, out_dir=Path(tmp) / "store", model_config=model_config
            )
            archive = MarArchive(endpoint.mar)
            model_dir = archive.unpack_cached(Path(tmp) / "unpacked")
            archives[model] = (archive, model_dir)
            say(f"observe: {archive.endpoint}: load with its reference check, then requests 1 and {WARM_REQUEST}")
            rows.append(startup(archive, model_dir))
        cheapest = min(rows, key=lambda r: r["warm_ms"])
        archive, model_dir = archives[next(m for m in models if archives[m][0].endpoint == cheapest["endpoint"])]
        say(f"observe: metrics on vs off, {requests} batch-1 requests each on {archive.endpoint}")
        cost = metrics_cost(archive, model_dir, Path(tmp) / "metrics", requests)
    return {"startup": rows, "metrics": cost}
