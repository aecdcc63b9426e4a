"""Parity in production on both engines: every worker or replica checks its archive's references before it serves (a
drifted one never becomes ready) and, with the probe on, while it serves; both engines' metrics count each checked
request once under the same names; each request is one trace under its caller's traceparent."""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.otlp_receiver import OtlpReceiver
from torchship.archive.build import Endpoint
from torchship.archive.mar import MarArchive
from torchship.engines.base import free_port
from torchship.engines.ray.launcher import RayServe
from torchship.engines.torchserve.launcher import TorchServe
from torchship.handlers.codec import decode_response, encode_request
from torchship.handlers.names import (
    LOAD_REFUSED_MARKER,
    PARITY_LOST_HEADER,
    PARITY_LOST_MARKER,
    PARITY_PROBE_ENV,
    TEST_DRIFT_CLAIM_ENV,
    TEST_DRIFT_ENV,
)
from torchship.metrics import MetricsServer, collect, parse_samples
from torchship.parity import compare_all
from torchship.spec import Tolerance
from torchship.verify.client import Client
from torchship.verify.compare import verify_endpoint

SERVED = "dynamic_router"
DRIFTED = "process_outputs"


def _store(tmp_path: Path, archives: dict[str, Endpoint], *names: str) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    for name in names:
        shutil.copy(archives[name].mar, store)
    return store


def _scrape(url: str) -> dict[str, float]:
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_samples(answer.text)


@pytest.mark.parametrize("engine_class", [TorchServe, RayServe], ids=["torchserve", "ray"])
def test_a_drifted_replica_never_serves_metrics_count_each_request_once_and_each_is_one_trace(
    engine_class: type[TorchServe] | type[RayServe],
    archives: dict[str, Endpoint],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = _store(tmp_path, archives, SERVED, DRIFTED)
    monkeypatch.setenv(TEST_DRIFT_ENV, f"{DRIFTED}=0.001")
    metrics_dir = tmp_path / "metrics"
    archive = MarArchive(store / f"{SERVED}.mar")
    case, names, tolerance = archive.references()[0], archive.output_names, Tolerance(*archive.tolerance)
    body, headers = encode_request(case["inputs"])
    callers = [(secrets.token_hex(16), secrets.token_hex(8)) for _ in range(3)]
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        with engine_class(store, tmp_path / "run", metrics_dir=metrics_dir) as engine:
            # The drifted endpoint refused to load with the marker, its worst difference and its device; the other
            # serves.
            assert engine.endpoints == [SERVED] and list(engine.refused) == [DRIFTED]
            line = engine.refused[DRIFTED]
            assert line.startswith(f"{LOAD_REFUSED_MARKER} {DRIFTED}: its answers on cpu differ from the archive's references")
            assert "worst |diff| 0.001" in line
            auth = engine.auth_headers()
            refused = requests.post(f"{engine.url}/v2/models/{DRIFTED}/infer", json={}, headers=auth, timeout=30)
            assert refused.status_code == 404

            client = Client(engine.url, token=engine.token)
            for trace_id, span_id in callers:  # checked requests that carry their caller's trace context
                answer = client.post_raw(SERVED, body, {**headers, "traceparent": f"00-{trace_id}-{span_id}-01"})
                got = decode_response(answer.content, answer.headers.get("Inference-Header-Content-Length"))["outputs"]
                expected = tuple(case["outputs"][n] for n in names)
                assert answer.status_code == 200 and compare_all(tuple(got[n] for n in names), expected, tolerance).passed
            rows = verify_endpoint(client, engine.name, archive)
            assert rows and all(r.passed for r in rows), [r.reason for r in rows if not r.passed]
            sent = len(callers) + len(rows)
            samples = _scrape_until(metrics_dir, f'torchship_requests_total{{code="200",endpoint="{SERVED}"}}', sent)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not all(len(receiver.trace(t)) >= 4 for t, _ in callers):
                time.sleep(0.2)
    # Metrics: exactly the requests sent, under the same names on both engines; parity ok where it loaded.
    counted = f'torchship_requests_total{{code="200",endpoint="{SERVED}"}}'
    assert samples.get(counted) == sent, {k: v for k, v in samples.items() if "requests_total" in k}
    assert not [k for k in samples if k.startswith("torchship_requests_total") and k != counted]
    assert samples[f'torchship_stage_seconds_count{{endpoint="{SERVED}",stage="model"}}'] == sent
    assert samples[f'torchship_parity_ok{{endpoint="{SERVED}"}}'] == 1
    assert samples[f'torchship_parity_worst_abs_diff{{endpoint="{SERVED}"}}'] <= 1e-5
    assert samples[f'torchship_parity_ok{{endpoint="{DRIFTED}"}}'] == 0
    assert samples[f'torchship_load_refusals_total{{endpoint="{DRIFTED}",reason="parity"}}'] >= 1
    # Traces: each traced request is one trace under its caller's span, with its stages.
    for trace_id, caller_span in callers:
        spans = {s.span_id: s for s in receiver.trace(trace_id)}
        handler = [s for s in spans.values() if s.name == f"torchship {SERVED}"]
        assert len(handler) == 1, sorted(s.name for s in spans.values())
        stages = sorted(s.name for s in spans.values() if s.parent_span_id == handler[0].span_id)
        assert stages == ["decode", "encode", "model"]
        assert handler[0].attributes["http.response.status_code"] == 200
        assert handler[0].attributes["torchship.endpoint"] == SERVED and handler[0].service == "torchship"
        # The caller's span is the root's parent: directly on TorchServe, through the ingress's span on Ray.
        parent = spans.get(handler[0].parent_span_id)
        if engine_class is RayServe:
            assert parent is not None and parent.name == f"torchship.ingress {SERVED}" and parent.kind == 2  # SERVER
            assert parent.parent_span_id == caller_span
        else:
            assert parent is None and handler[0].parent_span_id == caller_span


def _scrape_until(metrics_dir: Path, series: str, expected: float) -> dict[str, float]:
    """The exporter's samples once `series` reads `expected` (or after 15 s), read again a little later so that
    nothing counted late goes unseen."""
    exporter = MetricsServer(metrics_dir, port=free_port()).start()
    try:
        deadline = time.monotonic() + 15
        samples = _scrape(exporter.url)
        while samples.get(series) != expected and time.monotonic() < deadline:
            time.sleep(0.25)
            samples = _scrape(exporter.url)
        time.sleep(1.5)  # longer than a worker's write interval: nothing more arrives later
        return _scrape(exporter.url)
    finally:
        exporter.close()


def _checked_stream(engine: TorchServe | RayServe, seconds: float, clients: int) -> tuple[int, list[str]]:
    """Send the served endpoint's reference cases from several clients for `seconds`, each answer compared with
    eager; a 503 that says its replica lost parity is sent again after its Retry-After (what a client is told to do).
    Returns (answers checked, every request that was lost or answered wrong)."""
    archive = MarArchive(engine.model_store / f"{SERVED}.mar")
    cases, tolerance = archive.references(), Tolerance(*archive.tolerance)
    failures: list[str] = []
    checked = 0
    lock = threading.Lock()

    def send(worker: int) -> None:
        nonlocal checked
        client = Client(engine.url, token=engine.token)  # a session per thread
        deadline = time.monotonic() + seconds
        i = worker
        while time.monotonic() < deadline:
            case = cases[i % len(cases)]
            i += 1
            body, headers = encode_request(case["inputs"])
            for _ in range(20):
                answer = client.post_raw(SERVED, body, headers)
                if answer.status_code == 503 and PARITY_LOST_HEADER in answer.headers:
                    time.sleep(float(answer.headers.get("Retry-After", "1")))
                    continue
                if answer.status_code != 200:
                    with lock:
                        failures.append(f"{answer.status_code}: {answer.text[:200]}")
                    break
                outputs = decode_response(answer.content, None)["outputs"]
                got = tuple(outputs[n] for n in archive.output_names)
                verdict = compare_all(got, tuple(case["outputs"][n] for n in archive.output_names), tolerance)
                with lock:
                    checked += 1
                    if not verdict.passed:
                        failures.append(f"wrong answer: {verdict.reason}")
                break
            else:
                with lock:
                    failures.append("still refused after 20 tries")

    threads = [threading.Thread(target=send, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return checked, failures


@pytest.mark.parametrize("engine_class", [TorchServe, RayServe], ids=["torchserve", "ray"])
def test_a_replica_that_drifts_while_serving_stops_serving_and_nothing_is_lost(
    engine_class: type[TorchServe] | type[RayServe],
    archives: dict[str, Endpoint],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = _store(tmp_path, archives, SERVED)
    # One replica's answers move 3 s after it loaded; the probe runs before every batch, so no drifted answer leaves.
    monkeypatch.setenv(TEST_DRIFT_ENV, f"{SERVED}=0.001@3")
    monkeypatch.setenv(TEST_DRIFT_CLAIM_ENV, str(tmp_path / "claimed"))
    monkeypatch.setenv(PARITY_PROBE_ENV, "0.001")
    metrics_dir = tmp_path / "metrics"
    extra: dict[str, object] = {"app_args": {"deployments": {SERVED: {"num_replicas": 2}}}} if engine_class is RayServe else {}
    with engine_class(store, tmp_path / "run", metrics_dir=metrics_dir, **extra) as engine:  # type: ignore[arg-type]
        checked, failures = _checked_stream(engine, seconds=12, clients=2)
        log = engine.log_text()
    assert (tmp_path / "claimed").is_file()  # one replica took the drift
    assert not failures, failures[:5]
    assert checked > 20
    lost = [line for line in log.splitlines() if PARITY_LOST_MARKER in line]
    assert lost and f"{PARITY_LOST_MARKER} {SERVED}: its answers on cpu no longer match" in lost[0], log[-3000:]
    samples = parse_samples(collect(metrics_dir))
    assert samples[f'torchship_parity_checks_total{{endpoint="{SERVED}",result="failed"}}'] >= 1
    assert samples[f'torchship_shed_total{{endpoint="{SERVED}"}}'] >= 1
