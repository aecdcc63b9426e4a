"""artifacts/<model>/: every format of one model, each reloaded from disk and gated on parity with eager."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchship.errors import ExportFormatError, OutputDirError, SpecError, TorchshipError
from torchship.export.pt2 import AotiIsa, build_aoti, build_pt2, save_pt2
from torchship.export.reference import Case, make_cases, save_reference
from torchship.export.torchscript import build_torchscript
from torchship.handlers.core import LOADERS, OPTIMIZE_FOR_INFERENCE, sha256_file
from torchship.handlers.names import REFERENCE_FILE
from torchship.manifest import (
    FORMAT_FILES,
    POSTPROCESS_DIR,
    TIMINGS_FILE,
    FormatEntry,
    GraphStats,
    Manifest,
    ParityRecord,
    ReferenceMeta,
    ToleranceMeta,
    read_manifest,
    write_manifest,
)
from torchship.parity import compare_all
from torchship.registry import resolve
from torchship.spec import ModelSpec, as_output_tuple
from torchship.timing import enough_samples

#: optimize_for_inference becomes a TorchScript endpoint's load step only when it runs at least this much faster than
#: the frozen file alone: a clear margin keeps the choice (and so the manifest) the same from one export to the next
#: on a noisy machine, and a marginal gain is not worth a second code path.
OPTIMIZE_MIN_SPEEDUP = 1.5
#: ...and saves at least this much per call: below it a model is too small for the pass to matter next to a request's
#: overhead, and sub-millisecond timings are too noisy to decide anything reproducibly.
OPTIMIZE_MIN_SAVING_MS = 1.0
#: Another format becomes the default endpoint's only when it runs at least this much faster than the one chosen so
#: far (formats are taken in the spec's order: TorchScript, .pt2, AOTInductor). Within the margin the earlier, more
#: portable format keeps it: TorchScript also runs in the C++ loader and is not tied to this CPU's vector ISA, and a
#: margin keeps a noisy machine from renaming endpoints between two exports of the same model.
DEFAULT_MIN_SPEEDUP = 1.2
#: Export's speed measurements (the load step, the default format): untimed rounds first, then timed ones until
#: SPEED_MAX_ROUNDS, or SPEED_MIN_ROUNDS once SPEED_BUDGET_S of timed calls is spent (a round is one call of each
#: thing compared: the frozen and the optimized file, or every format). simple_cnn at 16x3x224x224 (0.2-0.7 s a
#: call here) stops after 3-4 rounds; its export took 29 s with 3 + 9 rounds everywhere, 18.6 s of it timing. The
#: choice rules' margins (1.2x, 1.5x) are far wider than the spread of a median of 3-4 such calls.
SPEED_WARMUP, SPEED_MIN_ROUNDS, SPEED_MAX_ROUNDS, SPEED_BUDGET_S = 2, 3, 9, 2.0

#: progress(model, format or stage, message)
Progress = Callable[[str, str, str], None]


def _quiet(_model: str, _stage: str, _message: str) -> None:
    return None


@dataclass
class _Job:
    spec: ModelSpec
    model: nn.Module
    example: tuple[torch.Tensor, ...]
    staging: Path
    aoti_isa: AotiIsa
    program: torch.export.ExportedProgram | None = None


@dataclass(frozen=True)
class _Built:
    method: str
    passes: list[str]
    graph: GraphStats | None = None
    options: dict[str, str] = field(default_factory=dict)


def _build_torchscript(job: _Job) -> _Built:
    result = build_torchscript(job.spec, job.model, job.example)
    result.module.save(str(job.staging / FORMAT_FILES["torchscript"]))
    return _Built(job.spec.export_method, result.passes, result.graph)


def _build_pt2(job: _Job) -> _Built:
    job.program = build_pt2(job.spec, job.model, job.example)
    save_pt2(job.program, job.staging / FORMAT_FILES["pt2"])
    method = "torch.export" + (" of export_rewrite" if job.spec.export_rewrite is not None else "")
    return _Built(method, ["torch.export.export(dynamic_shapes)"])


def _build_aoti(job: _Job) -> _Built:
    if job.program is None:
        raise ExportFormatError(job.spec.name, "aoti", "needs the pt2 export, which failed; fix that first")
    build_aoti(job.spec, job.program, job.staging / FORMAT_FILES["aoti"], isa=job.aoti_isa)
    return _Built("aoti_compile_and_package", ["torch.export", "inductor"], options={"isa": job.aoti_isa})


BUILDERS: dict[str, Callable[[_Job], _Built]] = {
    "torchscript": _build_torchscript,
    "pt2": _build_pt2,
    "aoti": _build_aoti,
}


@dataclass
class ModelExport:
    """What one model's export produced: its manifest and folder, and the formats that failed."""

    spec: ModelSpec
    model_dir: Path
    manifest: Manifest
    failures: list[ExportFormatError]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def p50_ms(self) -> dict[str, float]:
        """The per-format medians export measured to choose the default (empty for an older export)."""
        path = self.model_dir / TIMINGS_FILE
        return dict(json.loads(path.read_text(encoding="utf-8"))["p50_ms"]) if path.is_file() else {}


def ensure_writable(out_dir: Path) -> None:
    """Fail early, with a clear message, if the output folder cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise OutputDirError(
            f"cannot write to the output folder {out_dir} ({exc.strerror or exc}); "
            "choose another with --out, or fix its permissions. Nothing was exported."
        ) from None


def check_parity(spec: ModelSpec, fmt: str, runner: Callable[..., object], cases: list[Case]) -> list[ParityRecord]:
    tol = spec.tolerance[fmt]
    records = []
    for case in cases:
        with torch.no_grad():
            actual = as_output_tuple(runner(*case.args(spec)), spec)
        c = compare_all(actual, case.expected(spec), tol)
        records.append(
            ParityRecord(
                batch_size=case.batch_size,
                input_shapes=case.input_shapes(),
                holdout=case.holdout,
                max_abs=c.max_abs,
                max_rel=c.max_rel,
                passed=c.passed,
                reason=c.reason,
            )
        )
    return records


def parity_table(records: list[ParityRecord]) -> str:
    lines = [f"{'batch':>5}  {'input shapes':<28} {'held out':<8} {'max abs':>10} {'max rel':>10}  result"]
    for r in records:
        shapes = ", ".join(f"{k}{v}" for k, v in r.input_shapes.items())
        verdict = "ok" if r.passed else f"FAIL: {r.reason}"
        lines.append(
            f"{r.batch_size:>5}  {shapes:<28} {'yes' if r.holdout else 'no':<8} {r.max_abs:>10.3g} {r.max_rel:>10.3g}  {verdict}"
        )
    return "\n".join(lines)


def _export_format(job: _Job, fmt: str, cases: list[Case], progress: Progress) -> tuple[FormatEntry, ExportFormatError | None]:
    spec = job.spec
    file = FORMAT_FILES[fmt]
    path = job.staging / file
    start = time.perf_counter()
    progress(spec.name, fmt, "building")
    try:
        built = BUILDERS[fmt](job)
        progress(spec.name, fmt, "reloading from disk and checking parity")
        runner = LOADERS[fmt](str(path), torch.device("cpu"), None)
        records = check_parity(spec, fmt, runner, cases)
    except ExportFormatError as exc:
        path.unlink(missing_ok=True)
        return FormatEntry(file=file, status="failed", method=spec.export_method, error=str(exc)), exc
    except Exception as exc:  # a saved artifact that cannot be reloaded or run is a failed format, not a crash
        path.unlink(missing_ok=True)
        err = ExportFormatError(spec.name, fmt, f"the saved artifact could not be reloaded and run: {type(exc).__name__}: {exc}")
        return FormatEntry(file=file, status="failed", method=spec.export_method, error=str(err)), err
    if not all(r.passed for r in records):
        path.unlink()
        tol = spec.tolerance[fmt]
        err = ExportFormatError(
            spec.name,
            fmt,
            f"outputs differ from eager beyond atol={tol.atol:g} rtol={tol.rtol:g}; the file was not kept.\n"
            f"{parity_table(records)}\n"
            "If the difference is float rounding from fused kernels, widen this format's tolerance in the spec; "
            "otherwise the export changed what the model computes.",
        )
        entry = FormatEntry(
            file=file, status="failed", method=built.method, passes=built.passes, graph=built.graph,
            parity=records, error=str(err), options=built.options,
        )  # fmt: skip
        return entry, err
    options = dict(built.options)
    if fmt == "torchscript":
        optimized, records = choose_torchscript_load(spec, path, runner, cases, records, progress=progress)
        options.update(optimized)
    progress(spec.name, fmt, f"ok in {time.perf_counter() - start:.1f} s")
    entry = FormatEntry(
        file=file, status="ok", method=built.method, sha256=sha256_file(path), size_bytes=path.stat().st_size,
        passes=built.passes, graph=built.graph, parity=records, options=options,
    )  # fmt: skip
    return entry, None


def _p50_ms(runners: dict[str, Callable[..., object]], args: tuple[torch.Tensor, ...]) -> tuple[dict[str, float], int]:
    """Each runner's median ms per call on args, the calls interleaved round by round (so whatever else runs on the
    machine meanwhile slows every runner alike instead of deciding a choice), and the timed rounds."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    rounds: list[float] = []  # seconds per timed round
    with torch.inference_mode():
        for _ in range(SPEED_WARMUP):
            for runner in runners.values():
                runner(*args)
        while runners and not _enough(rounds):
            for name, runner in runners.items():
                start = time.perf_counter()
                runner(*args)
                samples[name].append(time.perf_counter() - start)
            rounds.append(sum(times[-1] for times in samples.values()))
    return {name: statistics.median(times) * 1000 for name, times in samples.items()}, len(rounds)


def _enough(seconds: list[float]) -> bool:
    return enough_samples(
        len(seconds), sum(seconds), min_iters=SPEED_MIN_ROUNDS, max_iters=SPEED_MAX_ROUNDS, budget_s=SPEED_BUDGET_S
    )


def _speed_inputs(spec: ModelSpec, cases: list[Case]) -> tuple[int, tuple[torch.Tensor, ...]]:
    """The largest reference batch at the spec's serving sizes (a 224x224 image for simple_cnn): what speed is
    measured at, for the load step and for the default format."""
    batch = max(c.batch_size for c in cases if not c.holdout)
    inputs = spec.make_inputs(batch, serving=True, seed_offset=29)
    return batch, tuple(inputs[t.name] for t in spec.inputs)


def choose_torchscript_load(
    spec: ModelSpec,
    path: Path,
    frozen: Callable[..., object],
    cases: list[Case],
    plain: list[ParityRecord],
    *,
    progress: Progress,
) -> tuple[dict[str, str], list[ParityRecord]]:
    """Whether the endpoint loads the frozen file (`frozen`, already loaded, with parity records `plain`) with
    `optimize_for_inference`: only if that passes the same parity gate and runs at least OPTIMIZE_MIN_SPEEDUP faster
    (and OPTIMIZE_MIN_SAVING_MS quicker) at the largest reference batch and the spec's serving sizes (a 224x224 image
    for simple_cnn), measured here, now. Returns the manifest options and the parity records of what will be served."""
    cpu = torch.device("cpu")
    try:
        optimized = LOADERS["torchscript"](str(path), cpu, {"optimize": OPTIMIZE_FOR_INFERENCE})
        records = check_parity(spec, "torchscript", optimized, cases)
    except Exception as exc:  # a model the pass cannot take keeps its frozen file as it is
        progress(spec.name, "torchscript", f"{OPTIMIZE_FOR_INFERENCE} not used: {type(exc).__name__}: {exc}")
        return {}, plain
    if not all(r.passed for r in records):
        progress(spec.name, "torchscript", f"{OPTIMIZE_FOR_INFERENCE} not used: outputs differ from eager beyond tolerance")
        return {}, plain
    batch, args = _speed_inputs(spec, cases)
    where = f"batch {batch}, " + ", ".join(f"{t.name}{list(v.shape)}" for t, v in zip(spec.inputs, args, strict=True))
    p50_ms, _ = _p50_ms({"frozen": frozen, "optimized": optimized}, args)
    plain_ms, optimized_ms = p50_ms["frozen"], p50_ms["optimized"]
    speedup = plain_ms / optimized_ms
    used = speedup >= OPTIMIZE_MIN_SPEEDUP and plain_ms - optimized_ms >= OPTIMIZE_MIN_SAVING_MS
    verdict = "used" if used else f"not used (needs {OPTIMIZE_MIN_SPEEDUP}x and {OPTIMIZE_MIN_SAVING_MS:g} ms saved)"
    progress(spec.name, "torchscript", f"{OPTIMIZE_FOR_INFERENCE}: {speedup:.2f}x the frozen file at {where} "
             f"({plain_ms:.2f} -> {optimized_ms:.2f} ms), {verdict}")  # fmt: skip
    if not used:
        return {}, plain
    measured = f">= {OPTIMIZE_MIN_SPEEDUP}x the frozen file at {where}; parity passed"
    return {"optimize": OPTIMIZE_FOR_INFERENCE, "optimize_measured": measured}, records


def measure_formats(spec: ModelSpec, staging: Path, entries: dict[str, FormatEntry], cases: list[Case]) -> dict[str, Any]:
    """Time every usable format, each loaded exactly as its endpoint will load it (load options included): the median
    ms per call at the largest reference batch and the serving sizes, the formats' calls interleaved (_p50_ms)."""
    batch, args = _speed_inputs(spec, cases)
    usable = {f: e for f, e in entries.items() if e.usable}
    runners = {f: LOADERS[f](str(staging / e.file), torch.device("cpu"), e.options) for f, e in usable.items()}
    p50_ms, rounds = _p50_ms(runners, args)
    return {
        "batch_size": batch,
        "input_shapes": {t.name: list(a.shape) for t, a in zip(spec.inputs, args, strict=True)},
        "rounds": rounds,
        "p50_ms": p50_ms,
    }


def choose_default(p50_ms: dict[str, float], pinned: str | None = None) -> tuple[str | None, str]:
    """The default endpoint's format and the rule that chose it, from the measured medians of the usable formats
    (in the spec's order): each format takes over only when DEFAULT_MIN_SPEEDUP faster than the choice so far.
    `pinned`, when usable, is chosen instead. The reason carries no numbers, so the manifest stays reproducible."""
    if not p50_ms:
        return None, "no format passed its parity gate"
    if pinned is not None and pinned in p50_ms:
        return pinned, "pinned with --default-format"
    fallback = f"--default-format {pinned} is not usable here (failed or not built); " if pinned is not None else ""
    chosen = next(iter(p50_ms))
    for fmt, ms in p50_ms.items():
        if ms * DEFAULT_MIN_SPEEDUP <= p50_ms[chosen]:
            chosen = fmt
    return chosen, (
        f"{fallback}the fastest usable format, measured at export ({TIMINGS_FILE}); another format replaces an earlier "
        f"one only when >= {DEFAULT_MIN_SPEEDUP}x faster"
    )


def _replace_dir(staging: Path, final: Path) -> None:
    """Swap the finished staging folder into place, so a model folder is never half old, half new."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    staging.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _export_postprocess(spec: ModelSpec, staging: Path, progress: Progress) -> list[ExportFormatError]:
    """A classifier's top-k post-processing (parameters.top_k), exported and gated inside the classifier's own folder,
    so that archiving the classifier needs no other model's export."""
    from torchship.models.process_outputs import SPEC as TOPK_SPEC

    progress(spec.name, "postprocess", f"exporting {TOPK_SPEC.name} with it, for parameters.top_k")
    result = export_model(TOPK_SPEC, out_dir=staging / POSTPROCESS_DIR, progress=progress)
    return [ExportFormatError(spec.name, f"postprocess {f.fmt}", f.detail) for f in result.failures]


def export_model(
    spec: ModelSpec,
    *,
    out_dir: Path,
    aoti: bool = False,
    aoti_isa: AotiIsa = "native",
    default_format: str | None = None,
    progress: Progress = _quiet,
) -> ModelExport:
    """Export every format of one model to out_dir/<name>/, each reloaded and compared with eager, then timed; the
    fastest (see choose_default, or `default_format` when given) becomes the default endpoint's format.

    A format outside its tolerance is recorded as failed in the manifest and its file is not kept; the others
    are still written. Raises TorchshipError only when nothing can be written for this model.
    """
    if default_format is not None and default_format not in spec.formats:
        raise SpecError(f"model {spec.name!r}: --default-format {default_format} is not one of its formats {list(spec.formats)}")
    progress(spec.name, "eager", "building the model and its reference outputs")
    try:
        model = spec.factory().eval()
    except Exception as exc:  # user code: any failure is reported with the model's name
        raise SpecError(
            f"model {spec.name!r}: its factory raised {type(exc).__name__}: {exc}. Fix the factory and retry."
        ) from None
    cases = make_cases(spec, model)
    example = spec.example_inputs()
    ensure_writable(out_dir)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{spec.name}.staging-"))
    staging.chmod(0o755)
    try:
        job = _Job(spec, model, example, staging, aoti_isa)
        formats = [f for f in spec.formats if f != "aoti" or aoti]
        entries: dict[str, FormatEntry] = {}
        failures: list[ExportFormatError] = []
        for fmt in formats:
            entry, err = _export_format(job, fmt, cases, progress)
            entries[fmt] = entry
            if err is not None:
                failures.append(err)
                progress(spec.name, fmt, "FAILED")
        progress(spec.name, "default", "timing every usable format as its endpoint loads it")
        timings = measure_formats(spec, staging, entries, cases)
        (staging / TIMINGS_FILE).write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")
        chosen, reason = choose_default(timings["p50_ms"], default_format)
        measured = ", ".join(f"{f} {ms:.2f} ms" for f, ms in timings["p50_ms"].items())
        progress(spec.name, "default", f"<{spec.name}> serves {chosen} ({measured}): {reason}")
        if spec.task == "classifier":
            failures += _export_postprocess(spec, staging, progress)
        reference = staging / REFERENCE_FILE
        save_reference(spec, cases, reference)
        inputs, outputs = Manifest.signature_from(spec)
        manifest = Manifest(
            name=spec.name,
            version=spec.version,
            description=spec.description,
            task=spec.task,
            torch_version=torch.__version__,
            device="cpu",
            max_batch_size=spec.max_batch_size,
            inputs=inputs,
            outputs=outputs,
            export_method=spec.export_method,
            formats=entries,
            tolerance={f: ToleranceMeta(atol=spec.tolerance[f].atol, rtol=spec.tolerance[f].rtol) for f in formats},
            reference=ReferenceMeta(
                file=REFERENCE_FILE,
                sha256=sha256_file(reference),
                batch_sizes=list(spec.reference_batch_sizes),
                holdout_batch_sizes=list(spec.holdout_batch_sizes),
            ),
            default_format=chosen,
            default_reason=reason,
        )
        write_manifest(manifest, staging)
        final = out_dir / spec.name
        _replace_dir(staging, final)
    except TorchshipError:
        raise
    except OSError as exc:
        raise OutputDirError(
            f"[{spec.name}] could not write its artifacts to {out_dir}: {exc}. Check free space and permissions."
        ) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return ModelExport(spec, final, manifest, failures)


def _export_child(
    ref: str, out_dir: Path, *, aoti: bool, aoti_isa: AotiIsa, default_format: str | None, progress: Progress
) -> tuple[str, list[tuple[str, str]]]:
    """Runs in a fresh process: ("ok", [(format, failure detail), ...]) or ("error", message)."""
    try:
        result = export_model(
            resolve(ref), out_dir=out_dir, aoti=aoti, aoti_isa=aoti_isa, default_format=default_format, progress=progress
        )
    except TorchshipError as exc:
        return "error", [("", str(exc))]
    return "ok", [(f.fmt, f.detail) for f in result.failures]


def export_isolated(
    ref: str,
    *,
    out_dir: Path,
    aoti: bool = False,
    aoti_isa: AotiIsa = "native",
    default_format: str | None = None,
    progress: Progress = _quiet,
) -> ModelExport:
    """export_model in a fresh process, for a zoo name or a `module:SPEC` reference.

    TorchScript names the classes it compiles with a process-wide counter that ends up in the saved file, so an
    export is byte-reproducible only when it starts from a fresh process; a crash in one model's export (a
    compiler fault, say) also cannot take the others down. `progress` must be a module-level function.
    """
    spec = resolve(ref)
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=1, maxtasksperchild=1) as pool:
        status, details = pool.apply(
            _export_child,
            (ref, out_dir),
            {"aoti": aoti, "aoti_isa": aoti_isa, "default_format": default_format, "progress": progress},
        )
    if status == "error":
        raise TorchshipError(details[0][1])
    model_dir = out_dir / spec.name
    manifest = read_manifest(model_dir)
    return ModelExport(spec, model_dir, manifest, [ExportFormatError(spec.name, fmt, detail) for fmt, detail in details])
