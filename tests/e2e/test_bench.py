"""`torchship bench --quick`: the benchmark's machinery end to end on both engines (the numbers are not checked)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.helpers import run_cli
from torchship.bench.design import NO_HAPROXY_BINARY
from torchship.engines.ray.launcher import NO_HAPROXY


def test_quick_bench_writes_a_complete_report_with_every_answer_verified(artifacts_dir: Path, tmp_path: Path) -> None:
    """From an artifacts folder holding simple_cnn only (the session's export): the bench uses it and exports what
    else it measures and serves (dynamic_router), nothing more."""
    out, artifacts = tmp_path / "reports", tmp_path / "artifacts"
    shutil.copytree(artifacts_dir / "simple_cnn", artifacts / "simple_cnn")
    proc = run_cli("bench", "--quick", "--artifacts", str(artifacts), "--out", str(out), timeout_s=900)
    said = proc.stdout + proc.stderr
    assert "exporting dynamic_router" in said and "exporting simple_cnn" not in said, said[-2000:]
    assert sorted(p.name for p in artifacts.iterdir()) == ["dynamic_router", "simple_cnn"]
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
        # The breakdown: both endpoints x 2 sizes x JSON/binary, every answer checked, every phase measured.
        assert len(e["breakdown"]) == 8, name
        for r in e["breakdown"]:
            assert r["errors"] == 0 and r["wrong"] == 0, (name, r)
            assert {"client_ms", "engine_ms", "handler_ms", "decode_ms", "model_ms", "encode_ms"} <= set(r), (name, r)
            assert r["client_ms"] >= r["handler_ms"] >= r["model_ms"] > 0, (name, r)
        # The batching sweep: every swept model config at every swept client count, every answer checked.
        assert {(r["endpoint"], r["clients"]) for r in e["sweep"]} == {
            (ep, c) for ep in ("simple_cnn", "simple_cnn_nobatch", "simple_cnn_q1") for c in (1, 4)
        }
        assert all(r["verified"] + r["shed"] == r["requests"] > 0 and r["errors"] == r["wrong"] == 0 for r in e["sweep"]), e[
            "sweep"
        ]
        swept = {(r["batchSize"], r["maxBatchDelay"], r["jobQueueSize"]) for r in e["sweep"]}
        assert swept == {(8, 1, 100), (1, 0, 100), (1, 0, 1)}, swept
        # A queue of one: with 4 clients the excess is refused at once with a JSON 503 (counted as shed, the
        # body parsed), the rest answered and checked; nothing else sheds.
        shed = {(r["endpoint"], r["clients"]): r["shed"] for r in e["sweep"]}
        assert shed.pop(("simple_cnn_q1", 4)) > 0, (name, e["sweep"])
        assert not any(shed.values()), (name, shed)
        # The stock peer on the same engine and torchship, both in OIP v2 JSON, every answer checked.
        for who in ("peer", "json"):
            for r in e[who].values():
                assert r["requests"] > 0 and r["verified"] == r["requests"] and r["errors"] == r["wrong"] == 0, (name, who, r)
        assert any(t["target"].startswith(f"{name}: throughput >= 5x the stock peer") for t in doc["targets"])
        # Another model's default endpoint, checked against what it serves in-process.
        (router,) = e["models"]
        assert router["endpoint"] == "dynamic_router" and router["inprocess_p50_ms"] > 0, router
        for r in (router["sequential"], router["load"]):
            assert r["requests"] > 0 and r["verified"] == r["requests"] and r["errors"] == r["wrong"] == 0, (name, r)
        # py-spy sampled the engine's Python processes while requests were answered.
        prof = e["profile"]
        assert "error" not in prof and prof["requests"] > 0 and prof["wrong"] == 0, prof
        roles = {p["process"] for p in prof["processes"] if p["samples"] > 0}
        assert ("torchserve: worker" if name == "torchserve" else "ray: endpoint replica") in roles, roles
    # The stock handler's archive, a .mar torchship did not build, on both engines (quick: in the main starts; on Ray
    # through TorchServe's own worker code), every answer checked.
    assert set(doc["served"]["foreign"]) == {"torchserve", "ray"}
    for name, runs in doc["served"]["foreign"].items():
        for r in runs.values():
            assert r["requests"] > 0 and r["verified"] == r["requests"] and r["errors"] == r["wrong"] == 0, (name, r)
    # Ray's deployment settings, swept on the same archive.
    sweep = engines["ray"]["ray_sweep"]
    assert {(r["endpoint"], r["max_ongoing_requests"]) for r in sweep} == {("simple_cnn", 16), ("simple_cnn_mo4", 4)}
    assert all(r["verified"] == r["requests"] > 0 and r["errors"] == r["wrong"] == 0 for r in sweep), sweep
    assert all("queue_ms" in r for r in engines["torchserve"]["breakdown"])  # TorchServe's own counters
    assert all("ingress_ms" in r for r in engines["ray"]["breakdown"])  # the Ray app's ingress timing
    # Ray Serve's design space: quick runs one variant in a Ray start of its own, torchship's defaults without an
    # HAProxy binary: the child says so and Serve's own proxy serves the port (what a user without HAProxy gets).
    (row,) = doc["served"]["design"]
    assert (row["variant"], row["env"]) == (NO_HAPROXY_BINARY.label, NO_HAPROXY_BINARY.env)
    assert "failed" not in row and row["rss_mib"] > 0 and row["processes_mib"], row
    (note,) = row["notes"]
    assert note.startswith(NO_HAPROXY) and "Serve's own proxy serves the port" in note, note
    assert "haproxy" not in row["processes_mib"], row["processes_mib"]
    for s in [row["sequential"], *row["load"]]:
        assert s["requests"] > 0 and s["verified"] == s["requests"] and s["errors"] == s["wrong"] == 0, row

    assert {t["target"].split(":")[0] for t in doc["targets"]} >= {"torchserve", "ray"}
    for plot in doc["plots"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(doc["plots"]) == 4
    md = (out / "bench.md").read_text()
    assert "A .mar torchship did not build" in md
    assert "## Targets" in md and "## Served" in md and "QUICK" in md and "Ray Serve's design space" in md and NO_HAPROXY in md
    assert "report:" in proc.stdout
