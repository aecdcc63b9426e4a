"""`make pipeline`: export -> archive -> serve on TorchServe and on Ray Serve -> verify both -> one parity table."""

from __future__ import annotations

import contextlib
import json
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchship.archive.build import archive_models, load_model_config
from torchship.engines import engine_class
from torchship.export.exporter import ModelExport, Progress, ensure_writable, export_isolated
from torchship.models import ZOO
from torchship.verify.compare import CrossRow, VerifyRow, cross_engine, verify, write_verify_report

Say = Callable[[str], None]


@dataclass
class PipelineResult:
    exports: list[ModelExport]
    rows: list[VerifyRow]
    cross: list[CrossRow]
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures and bool(self.rows) and all(r.passed for r in self.rows)


def _fmt(x: float) -> str:
    return "-" if x == float("inf") else f"{x:.3g}"


def markdown_table(cross: list[CrossRow]) -> str:
    lines = [
        "Largest absolute difference per check (all outputs of the check).",
        "",
        "| endpoint | format | batch | encoding | TorchServe vs eager | Ray vs eager | TorchServe vs Ray | pass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cross:
        lines.append(
            f"| `{c.endpoint}` | {c.format} | {c.batch_size} | {c.encoding} | {_fmt(c.torchserve.max_abs)} | "
            f"{_fmt(c.ray.max_abs)} | {_fmt(c.engines_max_abs)} | {'yes' if c.passed else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def serve_and_verify(model_store: Path, say: Say) -> tuple[list[VerifyRow], list[VerifyRow]]:
    """Serve the model store on TorchServe and verify it while Ray Serve loads the same store in the background, then
    stop TorchServe and verify Ray Serve. Ray's start (the longer one: a local Ray, a replica per endpoint) overlaps
    TorchServe's whole turn; the answers are checked for equality, not timed, so sharing the cores costs nothing."""
    rows: dict[str, list[VerifyRow]] = {}
    with contextlib.ExitStack() as stack:
        ray_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="torchship-ray-")))
        ts_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="torchship-torchserve-")))
        ray_options: dict[str, Any] = {"token": secrets.token_hex(16)}  # the Ray app's token (TorchServe makes its own)
        ray = engine_class("ray")(model_store, ray_dir, **ray_options)
        stack.callback(ray.stop)  # before the temp dirs go (last in, first out)
        ray.launch()
        say("serve: Ray Serve on 127.0.0.1 (local Ray, no dashboard), the same archives and handler: loading meanwhile")
        say("serve: TorchServe on 127.0.0.1 (free ports, token auth on), waiting for every worker READY")
        with engine_class("torchserve")(model_store, ts_dir) as torchserve:
            assert torchserve.started_at is not None
            say(f"      ready in {time.monotonic() - torchserve.started_at:.1f} s at {torchserve.url}; verifying")
            rows["torchserve"] = verify("torchserve", torchserve.url, token=torchserve.token, model_store=model_store)
        ray.wait_ready()
        assert ray.started_at is not None
        say(f"      Ray Serve ready {time.monotonic() - ray.started_at:.1f} s after launch at {ray.url}; verifying")
        rows["ray"] = verify("ray", ray.url, token=ray.token, model_store=model_store)
    return rows["torchserve"], rows["ray"]


def write_reports(reports: Path, ts_rows: list[VerifyRow], ray_rows: list[VerifyRow], cross: list[CrossRow]) -> None:
    reports.mkdir(parents=True, exist_ok=True)
    write_verify_report(ts_rows, reports / "verify-torchserve.json", engine="torchserve", url="local")
    write_verify_report(ray_rows, reports / "verify-ray.json", engine="ray", url="local")
    doc = {
        "passed": all(c.passed for c in cross) and len(cross) == len(ts_rows) == len(ray_rows),
        "rows": [
            {
                "endpoint": c.endpoint, "format": c.format, "batch_size": c.batch_size, "encoding": c.encoding,
                "torchserve_max_abs": c.torchserve.max_abs, "ray_max_abs": c.ray.max_abs,
                "engines_max_abs": c.engines_max_abs, "passed": c.passed,
            }
            for c in cross
        ],
    }  # fmt: skip
    (reports / "pipeline.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    title = "# torchship pipeline: served outputs vs eager, on both engines\n\n"
    (reports / "pipeline.md").write_text(title + markdown_table(cross), encoding="utf-8")


def run_pipeline(*, artifacts: Path, model_store: Path, reports: Path, progress: Progress, say: Say) -> PipelineResult:
    failures: list[str] = []
    ensure_writable(artifacts)
    say(f"[1/4] export: {len(ZOO)} models, every format (AOTInductor included)")
    exports: list[ModelExport] = []
    for name in ZOO:
        result = export_isolated(name, out_dir=artifacts, aoti=True, progress=progress)
        exports.append(result)
        failures += [f"export {name}:{f.fmt}" for f in result.failures]
    say("[2/4] archive: torch-model-archiver, one .mar per usable format")
    for stale in model_store.glob("*.mar"):
        stale.unlink()
    endpoints = archive_models([], artifacts=artifacts, out_dir=model_store, model_config=load_model_config())
    say(f"      {len(endpoints)} archives in {model_store}/")
    say("[3/4] serve and verify on both engines: every reference batch, JSON and binary, against eager")
    ts_rows, ray_rows = serve_and_verify(model_store, say)
    cross = cross_engine(ts_rows, ray_rows)
    say("[4/4] report")
    write_reports(reports, ts_rows, ray_rows, cross)
    rows = ts_rows + ray_rows
    failures += [f"verify {r.engine} {r.endpoint} batch {r.batch_size} {r.encoding}" for r in rows if not r.passed]
    if len(cross) != len(ts_rows) or len(ts_rows) != len(ray_rows):
        failures.append("the two engines did not answer the same set of checks")
    return PipelineResult(exports, rows, cross, failures)
