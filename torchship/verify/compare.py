"""reports/verify-<engine>.json: every reference input of every endpoint sent over HTTP, compared with eager.

The references come from the archives themselves (each .mar carries manifest.json and reference.pt), so verify
needs only the model store and a URL: it checks what is deployed, not what was exported last.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchship.archive.mar import MarArchive, store_archives
from torchship.errors import EndpointError, TorchshipError
from torchship.parity import compare_all
from torchship.spec import Tolerance
from torchship.verify.client import Client

ENCODINGS = ("json", "binary")


@dataclass(frozen=True)
class VerifyRow:
    engine: str
    endpoint: str
    model: str
    format: str
    batch_size: int
    encoding: str
    max_abs: float
    max_rel: float
    passed: bool
    reason: str
    latency_ms: float
    #: The served outputs, kept in memory to compare engines with each other (not written to reports).
    outputs: tuple[torch.Tensor, ...] | None = field(default=None, compare=False, repr=False)


def archived_endpoints(model_store: Path, names: list[str] | None = None) -> list[MarArchive]:
    """The store's torchship archives, the ones with references (only `names`, when given; an unknown name is an
    error). Archives torchship did not build carry none: `torchship migrate` compares those between the engines."""
    try:
        found = [mar for mar in store_archives(model_store) if mar.is_torchship]
    except FileNotFoundError as exc:
        raise TorchshipError(str(exc)) from None
    if names:
        unknown = sorted(set(names) - {e.endpoint for e in found})
        if unknown:
            raise TorchshipError(f"no archives for endpoints {unknown} in {model_store}")
        found = [e for e in found if e.endpoint in names]
    return found


def verify_endpoint(client: Client, engine: str, ep: MarArchive) -> list[VerifyRow]:
    rows: list[VerifyRow] = []
    tolerance = Tolerance(*ep.tolerance)
    for case in ep.references():
        expected = tuple(case["outputs"][n] for n in ep.output_names)
        for encoding in ENCODINGS:
            start = time.perf_counter()
            try:
                result = client.infer(
                    ep.endpoint, case["inputs"], binary=encoding == "binary", binary_output=encoding == "binary"
                )
                latency_ms = (time.perf_counter() - start) * 1000
                missing = [n for n in ep.output_names if n not in result.outputs]
                if missing:
                    raise EndpointError(200, f"response lacks outputs {missing}")
                outputs = tuple(result.outputs[n] for n in ep.output_names)
                c = compare_all(outputs, expected, tolerance)
                max_abs, max_rel, passed, reason = c.max_abs, c.max_rel, c.passed, c.reason
            except (EndpointError, OSError, ValueError) as exc:
                latency_ms = (time.perf_counter() - start) * 1000
                max_abs, max_rel, passed, reason = float("inf"), float("inf"), False, f"{type(exc).__name__}: {exc}"
                outputs = None
            batch = int(case["batch_size"])
            row = VerifyRow(
                engine, ep.endpoint, ep.model, ep.format, batch, encoding, max_abs, max_rel, passed, reason, latency_ms, outputs
            )
            rows.append(row)
    return rows


def verify(engine: str, url: str, *, token: str | None, model_store: Path, endpoints: list[str] | None = None) -> list[VerifyRow]:
    """Send every reference case of every archived endpoint, in JSON and binary, and compare with eager."""
    client = Client(url, token=token)
    rows: list[VerifyRow] = []
    for ep in archived_endpoints(model_store, endpoints):
        rows.extend(verify_endpoint(client, engine, ep))
    return rows


def write_verify_report(rows: list[VerifyRow], path: Path, *, engine: str, url: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "engine": engine,
        "url": url,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "passed": all(r.passed for r in rows),
        "rows": [_row_json(r) for r in rows],
    }
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def _row_json(row: VerifyRow) -> dict[str, Any]:
    doc = {k: v for k, v in asdict(row).items() if k != "outputs"}
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in doc.items()}


@dataclass(frozen=True)
class CrossRow:
    """One (endpoint, batch, encoding) on both engines, and how far the two engines are from each other."""

    endpoint: str
    format: str
    batch_size: int
    encoding: str
    torchserve: VerifyRow
    ray: VerifyRow
    engines_max_abs: float

    @property
    def passed(self) -> bool:
        return self.torchserve.passed and self.ray.passed


def cross_engine(torchserve: list[VerifyRow], ray: list[VerifyRow]) -> list[CrossRow]:
    """Pair the two engines' rows and measure the largest difference between their outputs."""
    by_key = {(r.endpoint, r.batch_size, r.encoding): r for r in ray}
    rows: list[CrossRow] = []
    for t in torchserve:
        r = by_key.get((t.endpoint, t.batch_size, t.encoding))
        if r is None:
            continue
        diff = float("inf")
        if t.outputs is not None and r.outputs is not None:
            diff = max(
                (float((a.to(torch.float64) - b.to(torch.float64)).abs().max()) if a.numel() else 0.0)
                for a, b in zip(t.outputs, r.outputs, strict=True)
            )
        rows.append(CrossRow(t.endpoint, t.format, t.batch_size, t.encoding, t, r, diff))
    return rows
