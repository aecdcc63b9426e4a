"""Parity in production on both engines: every worker or replica checks its archive's references before it serves (a
drifted one never becomes ready), and both engines' metrics count each checked request once, under the same names."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import requests

from torchship.archive.build import Endpoint
from torchship.archive.mar import MarArchive
from torchship.engines.base import free_port
from torchship.engines.ray.launcher import RayServe
from torchship.engines.torchserve.launcher import TorchServe
from torchship.handlers.names import LOAD_REFUSED_MARKER, TEST_DRIFT_ENV
from torchship.metrics import MetricsServer, parse_samples
from torchship.verify.client import Client
from torchship.verify.compare import verify_endpoint

SERVED = "dynamic_router"
DRIFTED = "process_outputs"


def _scrape(url: str) -> dict[str, float]:
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_samples(answer.text)


@pytest.mark.parametrize("engine_class", [TorchServe, RayServe], ids=["torchserve", "ray"])
def test_a_drifted_replica_never_serves_and_metrics_count_each_checked_request_once(
    engine_class: type[TorchServe] | type[RayServe],
    archives: dict[str, Endpoint],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    for name in (SERVED, DRIFTED):
        shutil.copy(archives[name].mar, store)
    monkeypatch.setenv(TEST_DRIFT_ENV, f"{DRIFTED}=0.001")
    metrics_dir = tmp_path / "metrics"
    with engine_class(store, tmp_path / "run", metrics_dir=metrics_dir) as engine:
        # The drifted endpoint refused to load with the marker, its worst difference and its device; the other serves.
        assert engine.endpoints == [SERVED] and list(engine.refused) == [DRIFTED]
        line = engine.refused[DRIFTED]
        assert line.startswith(f"{LOAD_REFUSED_MARKER} {DRIFTED}: its answers on cpu differ from the archive's references")
        assert "worst |diff| 0.001" in line
        refused = requests.post(f"{engine.url}/v2/models/{DRIFTED}/infer", json={}, headers=engine.auth_headers(), timeout=30)
        assert refused.status_code == 404

        rows = verify_endpoint(Client(engine.url, token=engine.token), engine.name, MarArchive(store / f"{SERVED}.mar"))
        assert rows and all(r.passed for r in rows), [r.reason for r in rows if not r.passed]
        exporter = MetricsServer(metrics_dir, port=free_port()).start()
        try:
            counted = f'torchship_requests_total{{code="200",endpoint="{SERVED}"}}'
            deadline = time.monotonic() + 15
            samples = _scrape(exporter.url)
            while samples.get(counted) != len(rows) and time.monotonic() < deadline:
                time.sleep(0.25)
                samples = _scrape(exporter.url)
            time.sleep(1.5)  # longer than a worker's write interval: nothing more arrives later
            samples = _scrape(exporter.url)
        finally:
            exporter.close()
    assert samples.get(counted) == len(rows), {k: v for k, v in samples.items() if "requests_total" in k}
    assert not [k for k in samples if k.startswith("torchship_requests_total") and k != counted]
    assert samples[f'torchship_stage_seconds_count{{endpoint="{SERVED}",stage="model"}}'] == len(rows)
    assert samples[f'torchship_parity_ok{{endpoint="{SERVED}"}}'] == 1
    assert samples[f'torchship_parity_worst_abs_diff{{endpoint="{SERVED}"}}'] <= 1e-5
    assert samples[f'torchship_parity_ok{{endpoint="{DRIFTED}"}}'] == 0
    assert samples[f'torchship_load_refusals_total{{endpoint="{DRIFTED}",reason="parity"}}'] >= 1
