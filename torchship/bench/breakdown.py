"""Where one request's milliseconds go, per engine: sequential batch-1 requests over a kept-alive connection, each
timed by the client, by the engine's front end and by the handler itself, next to the same forward pass in-process.

Sources, per engine:
- client: wall time around each request (send, server, receive), this process.
- TorchServe's front end: its Prometheus counters `ts_inference_latency_microseconds` (receipt to reply) and
  `ts_queue_latency_microseconds` (waiting for a worker, the batch window included), read before and after the run:
  means over the run's requests.
- Ray Serve's ingress: the `ingress` phase the Ray app adds to Server-Timing (receipt at the ingress replica to the
  endpoint replica's answer; the HTTP proxy's hop is the client total minus it).
- the handler: Server-Timing's decode, model (the forward pass plus stacking and moving the batch) and encode, and
  `handler`, its whole batch call.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
import torch

from torchship.engines.base import Engine
from torchship.engines.torchserve.launcher import TorchServe
from torchship.handlers.codec import encode_request
from torchship.handlers.names import TIMING_HEADER
from torchship.handlers.wire import parse_server_timing
from torchship.spec import Tolerance
from torchship.timing import time_call
from torchship.verify import load
from torchship.verify.load import LoadRequest

#: The front-end counters TorchServe keeps per model (microseconds summed over requests, and the request count).
TS_COUNTERS = ("ts_inference_latency_microseconds", "ts_queue_latency_microseconds", "ts_inference_requests_total")


@dataclass(frozen=True)
class Case:
    hw: int
    binary: bool

    @property
    def label(self) -> str:
        return f"3x{self.hw}x{self.hw} {'binary' if self.binary else 'JSON'}"


CASES = (Case(32, False), Case(32, True), Case(224, False), Case(224, True))


def ts_counters(engine: TorchServe, endpoint: str) -> dict[str, float]:
    """TorchServe's per-model front-end counters, from its metrics API."""
    text = requests.get(f"{engine.metrics_url}/metrics", timeout=10).text
    found = dict.fromkeys(TS_COUNTERS, 0.0)
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in found and f'model_name="{endpoint}"' in rest:
            found[name] += float(line.rsplit(" ", 1)[1])
    return found


def inprocess_ms(model: Callable[..., torch.Tensor], hw: int, requests_n: int) -> float:
    x = torch.randn(1, 3, hw, hw)
    with torch.inference_mode():
        return time_call(lambda: model(x), min_time_s=0.3, min_iters=requests_n, warmup=3).p50_ms


def measure(
    engine: Engine,
    endpoint: str,
    model: Callable[..., torch.Tensor],
    case: Case,
    tol: Tolerance,
    *,
    requests_n: int,
    baseline_ms: float,
) -> dict[str, Any]:
    """`requests_n` sequential requests of one 3xHWxHW image; every answer compared with the model's own output."""
    x = torch.randn(1, 3, case.hw, case.hw, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        expected = model(x)
    body, headers = encode_request({"x": x}, binary=case.binary, parameters={"binary_data_output": True} if case.binary else None)
    request = LoadRequest(endpoint, body, headers, load.expect_outputs(("logits",), (expected,), tol))
    auth = engine.auth_headers()
    before: dict[str, float] | None = None
    warm = 3  # the first requests warm the kept-alive connection and the worker; the counters start after them

    def counters_after_warm_up(shot: load.Shot) -> bool:
        nonlocal before
        if shot.index == warm - 1 and isinstance(engine, TorchServe):
            before = ts_counters(engine, endpoint)
        return False

    shots = load.run_load(
        engine.url, [request], clients=1, auth=auth, requests_total=warm + requests_n, keep_headers=(TIMING_HEADER,),
        on_shot=counters_after_warm_up,
    )[warm:]  # fmt: skip
    after = ts_counters(engine, endpoint) if isinstance(engine, TorchServe) else None
    client_ms = [s.latency_ms for s in shots]
    errors = sum(s.outcome not in ("ok", "wrong") for s in shots)
    wrong = sum(s.outcome == "wrong" for s in shots)
    phases: dict[str, list[float]] = {}
    for s in shots:
        if s.status == 200:
            for name, ms in parse_server_timing(s.headers.get(TIMING_HEADER.lower())).items():
                phases.setdefault(name, []).append(ms)
    row: dict[str, Any] = {
        "case": case.label, "hw": case.hw, "binary": case.binary, "endpoint": endpoint, "requests": requests_n,
        "errors": errors, "wrong": wrong, "body_bytes": len(body), "inprocess_model_ms": baseline_ms,
        "client_ms": statistics.median(client_ms),
    }  # fmt: skip
    for name, values in phases.items():
        row[f"{name}_ms"] = statistics.median(values)
    if before is not None and after is not None:
        n = after["ts_inference_requests_total"] - before["ts_inference_requests_total"]
        if n > 0:
            row["frontend_ms"] = (
                (after["ts_inference_latency_microseconds"] - before["ts_inference_latency_microseconds"]) / n / 1000
            )
            row["queue_ms"] = (after["ts_queue_latency_microseconds"] - before["ts_queue_latency_microseconds"]) / n / 1000
    server_ms = row.get("frontend_ms", row.get("ingress_ms"))
    if server_ms is not None:
        # What the server's own clock does not see: HTTP on both sides of the socket, and on Ray the proxy's hop.
        row["outside_server_ms"] = row["client_ms"] - server_ms
        row["engine_ms"] = server_ms - row.get("handler_ms", 0.0)
    row["overhead_ms"] = row["client_ms"] - baseline_ms
    return row


__all__ = ["CASES", "Case", "inprocess_ms", "measure", "ts_counters"]
