"""The benchmark run: in-process formats, then TorchServe, then Ray Serve, one after the other on this machine;
reports/bench.json, reports/bench.md and reports/bench/*.png."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from archive.build import load_model_config
from bench.inprocess import LABELS, VARIANTS, Workload, bench_workload, time_call
from bench.served import (
    BATCHED,
    UNBATCHED,
    bench_store,
    engine,
    first_correct_answer_s,
    make_payloads,
    measure_load,
    tolerance_of,
)
from export.exporter import export_isolated
from handlers.core import LOADERS
from handlers.names import MANIFEST_FILE

SCHEMA_VERSION = 1
ENGINES = ("torchserve", "ray")


@dataclass(frozen=True)
class Settings:
    quick: bool
    workloads: tuple[Workload, ...]
    variants: tuple[str, ...]
    min_time_s: float
    min_iters: int
    warmup: int
    sequential_requests: int
    clients: tuple[int, ...]
    load_seconds: float
    large_requests: int


FULL = Settings(
    quick=False,
    workloads=(
        Workload("simple_cnn@32", "simple_cnn", (1, 8, 16, 64), hw=32),
        Workload("simple_cnn@224", "simple_cnn", (1, 8, 16), hw=224),
        Workload("dynamic_router", "dynamic_router", (1, 8, 16, 64)),
    ),
    variants=VARIANTS, min_time_s=0.4, min_iters=10, warmup=3,
    sequential_requests=100, clients=(1, 4, 16, 64), load_seconds=5.0, large_requests=5,
)  # fmt: skip
QUICK = Settings(
    quick=True,
    workloads=(Workload("simple_cnn@32", "simple_cnn", (1, 8), hw=32),),
    variants=("eager", "frozen", "pt2"), min_time_s=0.0, min_iters=3, warmup=1,
    sequential_requests=5, clients=(1, 4), load_seconds=0.5, large_requests=1,
)  # fmt: skip
#: The served workload: simple_cnn at the seed's 224x224, one image per request.
SERVED_HW = 224
LARGE_SHAPE = (16, 3, 224, 224)


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }


def ensure_exported(artifacts: Path, models: set[str], say: Callable[[str], None]) -> None:
    for model in sorted(models):
        if not (artifacts / model / MANIFEST_FILE).is_file():
            say(f"exporting {model} (AOTInductor included) into {artifacts}")
            export_isolated(model, out_dir=artifacts, aoti=True)


def served(settings: Settings, artifacts: Path, say: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="torchship-bench-") as tmp:
        store = bench_store(artifacts, Path(tmp) / "store", load_model_config())
        tol = tolerance_of(store)
        frozen = LOADERS["torchscript"](str(artifacts / "simple_cnn" / "model.torchscript.pt"), torch.device("cpu"))
        one = (1, 3, SERVED_HW, SERVED_HW)
        # Binary bodies for latency and throughput (JSON costs ~100 ms per 224x224 image to parse; measured apart).
        small = make_payloads(frozen, [one] * 8, binary=True)
        large = {enc: make_payloads(frozen, [LARGE_SHAPE], binary=enc == "binary") for enc in ("json", "binary")}
        # The in-process baseline on the same artifact: batch 1 latency and batch-8 throughput (8 = batchSize).
        x1, x8 = torch.randn(*one), torch.randn(8, 3, SERVED_HW, SERVED_HW)
        with torch.inference_mode():
            base1 = time_call(lambda: frozen(x1), min_time_s=0.5, min_iters=settings.sequential_requests, warmup=3)
            base8 = time_call(lambda: frozen(x8), min_time_s=0.5, min_iters=max(5, settings.sequential_requests // 10), warmup=2)
        doc: dict[str, Any] = {
            "workload": f"simple_cnn@{SERVED_HW}, frozen TorchScript, 1 image per request",
            "inprocess": {"batch1_p50_ms": base1.p50_ms, "batch1_p99_ms": base1.p95_ms,
                          "batch8_rows_per_s": 8 / (base8.p50_ms / 1000)},
            "engines": {},
        }  # fmt: skip
        for name in ENGINES:
            say(f"{name}: starting on the bench store ({BATCHED}: batching on, {UNBATCHED}: batchSize 1)")
            with engine(name, store, Path(tmp) / name) as (url, token, footprint, started):
                cold = first_correct_answer_s(url, token, small[0], tol, started)
                e: dict[str, Any] = {"cold_start_s": cold, "rss_mib": footprint() / 2**20}
                say(f"{name}: first correct answer {cold:.1f} s after launch, {e['rss_mib']:.0f} MiB resident")
                seq = measure_load(f"{url}/predictions/{BATCHED}", token, small, tol, clients=1, duration_s=600,
                               max_requests=settings.sequential_requests).summary()  # fmt: skip
                seq["overhead_p50_ms"] = seq["p50_ms"] - base1.p50_ms
                e["sequential"] = seq
                say(f"{name}: sequential batch 1 p50 {seq['p50_ms']:.2f} ms (+{seq['overhead_p50_ms']:.2f} ms over in-process)")
                e["throughput"] = []
                for endpoint in (BATCHED, UNBATCHED):
                    for clients in settings.clients:
                        r = measure_load(f"{url}/predictions/{endpoint}", token, small, tol, clients=clients,
                                     duration_s=settings.load_seconds).summary()  # fmt: skip
                        r.update(batching=endpoint == BATCHED, clients=clients)
                        e["throughput"].append(r)
                        mode = "on" if endpoint == BATCHED else "off"
                        say(f"{name}: {clients} clients, batching {mode}: {r['rows_per_s']:.1f} img/s, "
                            f"p99 {r['p99_ms']:.1f} ms, errors {r['errors']}, wrong {r['wrong']}")  # fmt: skip
                e["large_body"] = {}
                for enc, payloads in large.items():
                    r = measure_load(f"{url}/predictions/{BATCHED}", token, payloads, tol, clients=1, duration_s=600,
                                 max_requests=settings.large_requests).summary()  # fmt: skip
                    r["body_bytes"] = len(payloads[0].body)
                    e["large_body"][enc] = r
                    say(f"{name}: 16x3x224x224 as {enc} ({r['body_bytes'] / 2**20:.1f} MiB): p50 {r['p50_ms']:.0f} ms")
                doc["engines"][name] = e
        return doc


def _target(text: str, value: float, unit: str, met: bool) -> dict[str, Any]:
    return {"target": text, "value": value, "unit": unit, "met": met}


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, as ratios measured in this run; reported, never asserted."""
    out: list[dict[str, Any]] = []
    srv = doc["served"]
    base = srv["inprocess"]["batch8_rows_per_s"]
    for name, e in srv["engines"].items():
        for t in e["throughput"]:
            if t["batching"] and t["clients"] == 16:
                ratio = t["rows_per_s"] / base
                out.append(_target(f"{name}: 16 clients with batching >= 0.8x in-process batched", ratio, "x", ratio >= 0.8))
        limit = 1.5 if name == "torchserve" else 5.0
        overhead = e["sequential"]["overhead_p50_ms"]
        out.append(_target(f"{name}: per-request overhead p50 <= {limit} ms", overhead, "ms", overhead <= limit))
        ratio = e["large_body"]["json"]["p50_ms"] / e["large_body"]["binary"]["p50_ms"]
        out.append(_target(f"{name}: binary >= 3x faster than JSON (16x3x224x224)", ratio, "x", ratio >= 3))
    rows = doc["inprocess"]
    for label in sorted({r["workload"] for r in rows}):
        by_variant = {r["variant"]: r for r in rows if r["workload"] == label and r["batch"] == 16}
        if "aoti" in by_variant:
            speed = by_variant["aoti"]["speedup_vs_eager"]
            out.append(_target(f"{label}: AOTInductor >= 3x eager at batch 16", speed, "x", speed >= 3))
            if "compile" in by_variant:
                rel = by_variant["aoti"]["p50_ms"] / by_variant["compile"]["p50_ms"]
                out.append(_target(f"{label}: AOTInductor time within 10% of torch.compile", rel, "x", rel <= 1.1))
    return out


def run(settings: Settings, artifacts: Path, out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    started = time.monotonic()
    ensure_exported(artifacts, {w.model for w in settings.workloads} | {"simple_cnn"}, say)
    torch.set_num_threads(os.cpu_count() or 1)
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "quick": settings.quick, "machine": machine(), "inprocess": []}
    for w in settings.workloads:
        doc["inprocess"] += bench_workload(w, artifacts, variants=settings.variants, min_time_s=settings.min_time_s,
                                           min_iters=settings.min_iters, warmup=settings.warmup, progress=say)  # fmt: skip
    doc["served"] = served(settings, artifacts, say)
    doc["targets"] = targets(doc)
    doc["seconds"] = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    from bench.report import markdown, plots

    doc["plots"] = [str(p.relative_to(out)) for p in plots(doc, out / "bench")]
    (out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (out / "bench.md").write_text(markdown(doc), encoding="utf-8")
    return doc


__all__ = ["FULL", "LABELS", "QUICK", "run"]
