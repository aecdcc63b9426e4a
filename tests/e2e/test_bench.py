"""`torchship bench --quick`: the benchmark's machinery end to end on both engines (the numbers are not checked)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import run_cli


def test_quick_bench_writes_a_complete_report_with_every_answer_verified(artifacts_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports"
    proc = run_cli("bench", "--quick", "--artifacts", str(artifacts_dir), "--out", str(out), timeout_s=900)
    doc = json.loads((out / "bench.json").read_text())
    assert doc["schema"] == 1 and doc["quick"] is True
    assert {"cores", "torch", "threads", "date"} <= set(doc["machine"])

    assert doc["inprocess"], "no in-process rows"
    for row in doc["inprocess"]:
        assert row["verified"], row  # every variant's output equalled eager at that batch
        assert row["p50_ms"] > 0 and row["iters"] >= 1

    engines = doc["served"]["engines"]
    assert set(engines) == {"torchserve", "ray"}
    for name, e in engines.items():
        assert e["cold_start_s"] > 0 and e["rss_mib"] > 0, name
        runs = [e["sequential"], *e["throughput"], *e["large_body"].values()]
        for r in runs:
            assert r["requests"] > 0, (name, r)
            # Every response was decoded and compared with eager; none failed, none differed.
            assert r["verified"] == r["requests"] and r["errors"] == 0 and r["wrong"] == 0, (name, r)
        assert {(t["batching"], t["clients"]) for t in e["throughput"]} == {(b, c) for b in (True, False) for c in (1, 4)}
        assert e["large_body"]["json"]["body_bytes"] > e["large_body"]["binary"]["body_bytes"]

    assert {t["target"].split(":")[0] for t in doc["targets"]} >= {"torchserve", "ray"}
    for plot in doc["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(doc["plots"]) == 3
    md = (out / "bench.md").read_text()
    assert "## Targets" in md and "## Served" in md and "QUICK" in md
    assert "report:" in proc.stdout
