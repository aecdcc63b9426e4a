"""Helpers shared by the test tiers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torchship.archive.build import load_model_config
from torchship.reliability.ops import CliServer, start_cli_server

#: The e2e suites' model config: batches big and slow enough (200 ms) that concurrent requests share one.
E2E_MODEL_CONFIG = {**load_model_config(), "batchSize": 16, "maxBatchDelay": 200}

REPO = Path(__file__).resolve().parent.parent
TORCHSHIP = Path(sys.executable).parent / "torchship"


def run_cli(
    *args: str, check: bool = True, timeout_s: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed `torchship` console script as a user would, from the repository root."""
    proc = subprocess.run(
        [str(TORCHSHIP), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchship {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def torchserve_context(
    model_dir: Path,
    headers: list[dict[str, str]] | None = None,
    gpu_id: int | None = None,
    model_config: dict[str, Any] | None = None,
) -> Any:
    """TorchServe's own `ts.context.Context` for one batch, as a worker builds it: what the handler adapter reads
    (model_dir, gpu_id, the archive's model config, each request's headers) and where it records each reply's
    status and headers."""
    from ts.context import Context, RequestProcessor

    ctx = Context(model_dir.name, str(model_dir), {}, 8, gpu_id, "0.12.0", model_yaml_config=model_config or {})
    ctx.request_processor = [RequestProcessor(dict(h)) for h in (headers or [{}])]
    return ctx


@contextmanager
def serve_command(
    engine: str,
    model_store: Path,
    *,
    workdir: Path,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    port: int | None = None,
    ready_timeout_s: float = 400,
    exe: Path = TORCHSHIP,
    cwd: Path = REPO,
) -> Iterator[CliServer]:
    """`torchship serve <engine>` as a user runs it (the console script exe, from cwd), started the one way the QA
    tooling starts it (reliability.ops.start_cli_server); yields it once its ready line is printed.

    On exit: SIGTERM, which must stop it with exit code 0, then no process mentioning workdir may be left.
    """
    server = start_cli_server(
        engine, model_store, workdir, args=args, env=env, port=port, ready_timeout_s=ready_timeout_s,
        command=[str(exe)], cwd=cwd,
    )  # fmt: skip
    try:
        yield server
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=120) == 0, server.log_tail()
    finally:
        server.kill()
    leftover = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True, check=False)
    assert leftover.stdout.strip() == "", f"processes left running: {leftover.stdout}"


def assert_router_answers(url: str, token: str | None) -> None:
    """The server still answers a valid dynamic_router request with the eager outputs (after a bad one, say)."""
    import torch

    from torchship.models import ZOO
    from torchship.verify.client import Client

    spec = ZOO["dynamic_router"]
    x = spec.make_inputs(3, seed_offset=5)["x"]
    y = Client(url, token=token).infer("dynamic_router", {"x": x}).outputs["y"]
    with torch.no_grad():
        assert torch.allclose(y, spec.factory()(x), atol=1e-5, rtol=1e-4)


def drifted_copy(mar: Path, out: Path, *, delta: float = 0.05) -> Path:
    """A self-consistent copy of a `.pt2` archive whose weights were changed after export: the sha256 in its manifest
    matches the new file (so it loads), but its outputs no longer equal the eager references it carries."""
    import hashlib
    import json

    import torch

    from torchship.archive.mar import MarArchive, rewrite_archive

    members = dict(MarArchive(mar).entries)
    manifest = json.loads(members["manifest.json"])
    entry = manifest["formats"]["pt2"]
    work = out.with_suffix(".work.pt2")
    work.write_bytes(members[entry["file"]])
    program = torch.export.load(work)
    with torch.no_grad():
        first = next(t for t in program.state_dict.values() if t.is_floating_point())
        first.add_(delta)
    torch.export.save(program, work)
    members[entry["file"]] = work.read_bytes()
    work.unlink()
    entry["sha256"] = hashlib.sha256(members[entry["file"]]).hexdigest()
    entry["size_bytes"] = len(members[entry["file"]])
    members["manifest.json"] = json.dumps(manifest, indent=2).encode()
    # The archive-wide checksums follow the edit: only the weights drifted.
    return rewrite_archive(
        mar,
        out,
        lambda entries: entries.update({entry["file"]: members[entry["file"]], "manifest.json": members["manifest.json"]}),
    )


def run_readiness_probe(command: list[str], management_url: str) -> subprocess.CompletedProcess[str]:
    """A manifest's readiness probe command, run here against a local server's (free) management port."""
    argv = [sys.executable if c == "python" else c for c in command]
    argv[argv.index("--management-url") + 1] = management_url
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
