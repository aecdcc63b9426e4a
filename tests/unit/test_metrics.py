"""The metrics snapshots and the exporter that sums them: counters over every process, gauges from live ones only."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import requests

from torchship.engines.base import free_port
from torchship.handlers.metrics import (
    BATCH_REQUESTS,
    PARITY_OK,
    PARITY_WORST_ABS,
    REQUESTS,
    STAGE_SECONDS,
    STALE_AFTER_S,
    Metrics,
)
from torchship.handlers.names import METRICS_DIR_ENV
from torchship.metrics import MetricsServer, collect, parse_samples, series_key


def _process(folder: Path, name: str) -> Metrics:
    return Metrics(folder / f"{name}.json")


def test_metrics_are_off_without_the_folder(tmp_path: Path) -> None:
    assert Metrics.from_environ({}, "m") is None
    on = Metrics.from_environ({METRICS_DIR_ENV: str(tmp_path / "d")}, "m")
    assert on is not None and on.path == tmp_path / "d" / f"m.{os.getpid()}.json"


def test_counters_and_histograms_sum_over_processes_gauges_take_the_worst_live_replica(tmp_path: Path) -> None:
    a, b = _process(tmp_path, "m.1"), _process(tmp_path, "m.2")
    a.count(REQUESTS, 3, endpoint="m", code="200")
    b.count(REQUESTS, 2, endpoint="m", code="200")
    b.count(REQUESTS, 1, endpoint="m", code="400")
    a.observe(STAGE_SECONDS, [0.0004, 0.003], endpoint="m", stage="model")
    b.observe(STAGE_SECONDS, [20.0], endpoint="m", stage="model")
    a.observe(BATCH_REQUESTS, [3], endpoint="m")
    a.set(PARITY_OK, 1, endpoint="m")
    b.set(PARITY_OK, 0, endpoint="m")
    a.set(PARITY_WORST_ABS, 1e-7, endpoint="m")
    b.set(PARITY_WORST_ABS, 0.5, endpoint="m")
    a.flush()
    b.flush()
    text = collect(tmp_path)
    samples = parse_samples(text)
    assert samples[series_key(REQUESTS, {"endpoint": "m", "code": "200"})] == 5
    assert samples[series_key(REQUESTS, {"endpoint": "m", "code": "400"})] == 1
    bucket = "torchship_stage_seconds_bucket"
    assert samples[series_key(bucket, {"endpoint": "m", "stage": "model", "le": "0.0005"})] == 1
    assert samples[series_key(bucket, {"endpoint": "m", "stage": "model", "le": "0.005"})] == 2  # cumulative
    assert samples[series_key(bucket, {"endpoint": "m", "stage": "model", "le": "10"})] == 2
    assert samples[series_key(bucket, {"endpoint": "m", "stage": "model", "le": "+Inf"})] == 3
    assert samples[series_key("torchship_stage_seconds_count", {"endpoint": "m", "stage": "model"})] == 3
    assert abs(samples[series_key("torchship_stage_seconds_sum", {"endpoint": "m", "stage": "model"})] - 20.0034) < 1e-9
    assert samples[series_key("torchship_batch_requests_bucket", {"endpoint": "m", "le": "2"})] == 0
    assert samples[series_key("torchship_batch_requests_bucket", {"endpoint": "m", "le": "4"})] == 1
    assert samples[series_key(PARITY_OK, {"endpoint": "m"})] == 0  # one replica's check failed
    assert samples[series_key(PARITY_WORST_ABS, {"endpoint": "m"})] == 0.5
    assert "# TYPE torchship_requests_total counter" in text and "# TYPE torchship_stage_seconds histogram" in text


def test_a_gone_process_keeps_its_counts_but_not_its_gauges(tmp_path: Path) -> None:
    gone = _process(tmp_path, "m.1")
    gone.count(REQUESTS, 7, endpoint="m", code="200")
    gone.set(PARITY_OK, 0, endpoint="m")
    gone.flush()
    doc = json.loads(gone.path.read_text())
    doc["written"] = time.time() - STALE_AFTER_S - 1  # its last write is older than a live process's heartbeat
    gone.path.write_text(json.dumps(doc))
    live = _process(tmp_path, "m.2")
    live.set(PARITY_OK, 1, endpoint="m")
    live.flush()
    samples = parse_samples(collect(tmp_path))
    assert samples[series_key(REQUESTS, {"endpoint": "m", "code": "200"})] == 7
    assert samples[series_key(PARITY_OK, {"endpoint": "m"})] == 1


def test_a_half_written_or_foreign_file_is_skipped_and_label_values_are_escaped(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"counters": [["torchship_requests_total", {')
    m = _process(tmp_path, "m.1")
    m.count(REQUESTS, endpoint='we"ird\\name', code="200")
    m.flush()
    text = collect(tmp_path)
    assert 'torchship_requests_total{code="200",endpoint="we\\"ird\\\\name"} 1' in text


def test_the_writer_thread_writes_what_the_request_path_recorded(tmp_path: Path) -> None:
    m = _process(tmp_path, "m.1")
    m.start()
    m.count(REQUESTS, endpoint="m", code="200")
    deadline = time.monotonic() + 5
    while (
        time.monotonic() < deadline
        and parse_samples(collect(tmp_path)).get(series_key(REQUESTS, {"endpoint": "m", "code": "200"})) != 1
    ):
        time.sleep(0.1)
    assert parse_samples(collect(tmp_path))[series_key(REQUESTS, {"endpoint": "m", "code": "200"})] == 1


def test_the_server_answers_metrics_and_nothing_else(tmp_path: Path) -> None:
    m = _process(tmp_path, "m.1")
    m.count(REQUESTS, endpoint="m", code="200")
    m.flush()
    server = MetricsServer(tmp_path, port=free_port()).start()
    try:
        answer = requests.get(server.url, timeout=5)
        assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert 'torchship_requests_total{code="200",endpoint="m"} 1' in answer.text
        assert requests.get(server.url.replace("/metrics", "/other"), timeout=5).status_code == 404
    finally:
        server.close()
