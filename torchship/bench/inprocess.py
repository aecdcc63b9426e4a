"""Every format of a model in this process: latency percentiles and throughput, checked against eager as it runs."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchship.export.torchscript import to_script
from torchship.handlers.core import LOADERS, OPTIMIZE_FOR_INFERENCE
from torchship.handlers.names import MANIFEST_FILE
from torchship.parity import compare_all
from torchship.registry import resolve
from torchship.spec import ModelSpec, Tolerance, as_output_tuple
from torchship.timing import time_call

#: The variants, in the order the tables show them. `torch.compile` is the reference to beat.
VARIANTS = ("eager", "torchscript", "frozen", "frozen_ofi", "pt2", "aoti", "compile")
LABELS = {
    "eager": "eager",
    "torchscript": "TorchScript (not frozen)",
    "frozen": "frozen TorchScript",
    "frozen_ofi": "frozen + optimize_for_inference",
    "pt2": ".pt2 module",
    "aoti": "AOTInductor",
    "compile": "torch.compile",
}


@dataclass(frozen=True)
class Workload:
    """One model at one input size: `label` names it in the report (e.g. simple_cnn@224)."""

    label: str
    model: str
    batches: tuple[int, ...]
    hw: int | None = None  # simple_cnn's image side

    def inputs(self, spec: ModelSpec, batch: int) -> tuple[torch.Tensor, ...]:
        ins = spec.make_inputs(batch, seed_offset=101)
        if self.hw is not None:
            gen = torch.Generator().manual_seed(batch)
            ins = {"x": torch.randn(batch, 3, self.hw, self.hw, generator=gen)}
        return tuple(ins[t.name] for t in spec.inputs)


def load_variants(spec: ModelSpec, model_dir: Path, variants: tuple[str, ...]) -> dict[str, Callable[..., Any]]:
    manifest = json.loads((model_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    usable = {f: e["file"] for f, e in manifest["formats"].items() if e["status"] == "ok"}
    cpu = torch.device("cpu")
    eager = spec.factory().eval()
    out: dict[str, Callable[..., Any]] = {}
    for v in variants:
        if v == "eager":
            out[v] = eager
        elif v == "torchscript":
            out[v] = to_script(spec, eager, spec.example_inputs())
        elif v == "frozen" and "torchscript" in usable:
            out[v] = LOADERS["torchscript"](str(model_dir / usable["torchscript"]), cpu, None)
        elif v == "frozen_ofi" and "torchscript" in usable:
            out[v] = LOADERS["torchscript"](str(model_dir / usable["torchscript"]), cpu, {"optimize": OPTIMIZE_FOR_INFERENCE})
        elif v in ("pt2", "aoti") and v in usable:
            out[v] = LOADERS[v](str(model_dir / usable[v]), cpu, None)
        elif v == "compile":
            out[v] = torch.compile(eager)
    return out


def _tolerance(spec: ModelSpec, variant: str) -> Tolerance:
    """The manifest tolerance of the format a variant is closest to (Inductor's for torch.compile)."""
    fmt = {"pt2": "pt2", "aoti": "aoti", "compile": "aoti"}.get(variant, "torchscript")
    return spec.tolerance.get(fmt) or spec.tolerance["torchscript"]


def bench_workload(
    w: Workload, artifacts: Path, *, variants: tuple[str, ...], min_time_s: float, min_iters: int, warmup: int,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:  # fmt: skip
    spec = resolve(w.model)
    loaded = load_variants(spec, artifacts / w.model, variants)
    rows: list[dict[str, Any]] = []
    for batch in w.batches:
        args = w.inputs(spec, batch)
        with torch.inference_mode():
            expected = as_output_tuple(loaded["eager"](*args), spec)
            eager_p50 = None
            for name in variants:
                if name not in loaded:
                    continue
                fn = loaded[name]
                actual = as_output_tuple(fn(*args), spec)  # also the first (compiling) call for torch.compile
                check = compare_all(actual, expected, _tolerance(spec, name))
                t = time_call(functools.partial(fn, *args), min_time_s=min_time_s, min_iters=min_iters, warmup=warmup)
                eager_p50 = t.p50_ms if name == "eager" else eager_p50
                rows.append({
                    "workload": w.label, "model": w.model, "variant": name, "batch": batch,
                    "p50_ms": t.p50_ms, "p95_ms": t.p95_ms, "iters": t.iters,
                    "rows_per_s": batch / (t.p50_ms / 1000), "speedup_vs_eager": (eager_p50 or t.p50_ms) / t.p50_ms,
                    "verified": check.passed, "max_abs": check.max_abs,
                })  # fmt: skip
                speedup = rows[-1]["speedup_vs_eager"]
                progress(f"{w.label} batch {batch} {name}: p50 {t.p50_ms:.2f} ms ({speedup:.2f}x eager)")
    return rows
