"""`make pipeline`: export -> archive -> serve on TorchServe -> verify -> stop, ending with one parity table."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deploy.archive import archive_models, load_model_config
from deploy.torchserve import endpoints_in, start_torchserve, wait_ready
from deploy.verify import VerifyRow, verify, write_report
from export.exporter import ModelExport, Progress, ensure_writable, export_isolated
from models import ZOO

Say = Callable[[str], None]


@dataclass
class PipelineResult:
    exports: list[ModelExport]
    rows: list[VerifyRow]
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures and bool(self.rows) and all(r.passed for r in self.rows)


def markdown_table(rows: list[VerifyRow]) -> str:
    lines = [
        "| engine | endpoint | format | batch | encoding | max abs err | max rel err | pass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.engine} | `{r.endpoint}` | {r.format} | {r.batch_size} | {r.encoding} | {r.max_abs:.3g} | {r.max_rel:.3g} | "
            f"{'yes' if r.passed else 'NO: ' + r.reason} |"
        )
    return "\n".join(lines) + "\n"


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
    with tempfile.TemporaryDirectory(prefix="torchship-torchserve-") as workdir:
        say("[3/4] serve: TorchServe on 127.0.0.1 (free ports, token auth on), waiting for every worker READY")
        started = time.monotonic()
        server = start_torchserve(model_store, Path(workdir))
        try:
            wait_ready(server, endpoints_in(model_store))
            say(f"      ready in {time.monotonic() - started:.1f} s at {server.inference_url}")
            say("[4/4] verify: every reference batch of every endpoint, JSON and binary, against eager")
            rows = verify("torchserve", server.inference_url, token=server.inference_key(), model_store=model_store)
        finally:
            server.stop()
    reports.mkdir(parents=True, exist_ok=True)
    write_report(rows, reports / "verify-torchserve.json", engine="torchserve", url=server.inference_url)
    (reports / "pipeline.md").write_text(
        "# torchship pipeline: served outputs vs eager\n\n" + markdown_table(rows), encoding="utf-8"
    )
    failures += [f"verify {r.endpoint} batch {r.batch_size} {r.encoding}" for r in rows if not r.passed]
    return PipelineResult(exports, rows, failures)
