"""The peers from outside the two engines `make bench` compares torchship with: LitServe and PyTriton, each serving
the same frozen TorchScript file as its docs lead a user (litserve_peer.py, pytriton_peer.py beside this module),
from a virtual environment of their own (`peers_python`). Both answer OIP v2 JSON, checked against eager like ours.

stdlib, requests and torchship only: the peers' own packages are imported by the two scripts, in their venv.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from torchship.bench.peers import PEER, peer_answers
from torchship.engines.base import Engine, free_port
from torchship.errors import EngineError

PEERS_VENV = ".venv-peers"
#: torch alone first, pinned exactly, as `make setup` does: pip takes this machine's CPU wheel, where a range or a bare
#: `torch` (or any package's own torch requirement) would pull the CUDA build (several GB).
TORCH_PIN = "torch==2.13.0"
#: The peers' packages, pinned; torch is named again so that nothing they bring can move it.
PEER_PINS = (TORCH_PIN, "litserve==0.2.19", "nvidia-pytriton==0.7.0", "numpy<2")
#: What the venv must import for reuse: each peer's package, and the torch pinned above.
PROBE = (
    "import importlib.metadata as m, litserve, numpy, pytriton.triton, torch; "
    f"assert torch.__version__.split('+')[0] == {TORCH_PIN.split('==')[1]!r}, torch.__version__; "
    "print('torch', torch.__version__, 'litserve', m.version('litserve'), 'nvidia-pytriton', m.version('nvidia-pytriton'), "
    "'numpy', numpy.__version__)"
)
INSTALL_TIMEOUT_S = 1800
HERE = Path(__file__).parent
LITSERVE_SCRIPT = HERE / "litserve_peer.py"
PYTRITON_SCRIPT = HERE / "pytriton_peer.py"
#: The path both peers answer on (PyTriton: Triton's own OIP v2 route; LitServe: set to the same).
INFER_PATH = f"/v2/models/{PEER}/infer"


def _python_in(venv: Path) -> Path:
    return venv / "bin" / "python"


def _probe(python: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, check=False, timeout=300)


def _run_step(what: str, cmd: list[str], say: Callable[[str], None]) -> None:
    say(f"peers venv: {what}")
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=INSTALL_TIMEOUT_S)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-20:])
        raise EngineError(f"building the peers' venv failed at `{what}` (exit {proc.returncode}):\n{tail}")
    say(f"peers venv: {what}: done in {time.monotonic() - started:.0f} s")


def peers_python(root: Path, *, say: Callable[[str], None] = print) -> Path:
    """The interpreter of `root/.venv-peers`, built on first use (torch, then LitServe, PyTriton and numpy<2, pinned)
    and reused while it imports them all. EngineError names the step that failed."""
    venv = Path(root).resolve() / PEERS_VENV
    python = _python_in(venv)
    if python.exists() and (found := _probe(python)).returncode == 0:
        say(f"peers venv: {venv} ({found.stdout.strip()})")
        return python
    if not python.exists():
        _run_step(f"create {venv}", [sys.executable, "-m", "venv", str(venv)], say)
        # Keeps the venv out of git wherever root is (Python 3.13's venv writes the same file itself).
        (venv / ".gitignore").write_text("*\n", encoding="utf-8")
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run_step(f"install {TORCH_PIN} (the CPU wheel)", [*pip, TORCH_PIN], say)
    # uv, as `make setup` uses it after torch (several times faster on 2 cores); it keeps the torch just installed.
    uv = Path(sys.prefix) / "bin" / "uv"
    rest = [str(uv), "pip", "install", "-q", "--compile-bytecode", "--python", str(python)] if uv.exists() else pip
    _run_step(f"install {' '.join(PEER_PINS[1:])}", [*rest, *PEER_PINS], say)
    found = _probe(python)
    if found.returncode != 0:
        raise EngineError(f"the peers' venv {venv} was built but does not import its packages:\n{found.stderr.strip()[-2000:]}")
    say(f"peers venv: ready ({found.stdout.strip()})")
    return python


def group_pids(pgid: int) -> list[int]:
    """The processes of process group `pgid` (from /proc: stdlib only)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid:  # after the command: state, ppid, pgrp
            found.append(int(stat.parent.name))
    return sorted(found)


class OutsidePeer(Engine):
    """One outside peer's server on one frozen TorchScript file, from the peers' interpreter: started, waited for (a
    real request answered) and stopped with its whole process group like any engine. `url` is the full infer URL."""

    #: Both peers' documented stop is Ctrl-C (LitServe shuts its workers down on it, PyTriton stops Triton and removes
    #: its workspace); what is left of the group after that is killed.
    stop_signal: ClassVar[signal.Signals] = signal.SIGINT

    def __init__(self, model_file: Path, workdir: Path, *, python: Path, ready_timeout_s: float = 300.0) -> None:
        self.model_file = Path(model_file).resolve()
        super().__init__(self.model_file.parent, workdir, ready_timeout_s=ready_timeout_s)
        self.python = Path(python)
        self.endpoints = [PEER]
        self.verify_key = None  # a bare TorchScript file: no archive to verify
        self._ready_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{INFER_PATH}"

    @property
    def token(self) -> str | None:
        return None

    @property
    def ready_s(self) -> float | None:
        """Seconds from launch to the first answered request, once start() returned."""
        return self._ready_s

    def _env(self) -> dict[str, str]:
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return {"TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}

    def _ready(self, endpoint: str) -> bool:
        return peer_answers(self.url)

    def wait_ready(self, poll_s: float = 0.5) -> None:
        super().wait_ready(poll_s)
        assert self.started_at is not None
        self._ready_s = time.monotonic() - self.started_at

    def pids(self, endpoint: str) -> list[int]:
        """Every process of the peer's group. LitServe: its API servers and inference workers; PyTriton: the Python
        process that runs the model, tritonserver and its Python-backend stub."""
        return group_pids(self.pid) if self.running() else []

    def _drain(self) -> None:
        """Neither peer has a drain of its own: drain() is stop()."""


class LitServePeer(OutsidePeer):
    """litserve_peer.py: LitServe with its batching (`max_batch_size`, `batch_timeout_s`) and, as switches, its
    documented throughput settings (`workers_per_device`, `fast_queue`, `num_api_servers`); LitServe's defaults when
    left out."""

    name: ClassVar[str] = "litserve"

    def __init__(
        self,
        model_file: Path,
        workdir: Path,
        *,
        python: Path,
        max_batch_size: int,
        batch_timeout_s: float,
        workers_per_device: int = 1,
        fast_queue: bool = False,
        num_api_servers: int | None = None,
        log_batches: bool = False,
        ready_timeout_s: float = 300.0,
    ) -> None:
        super().__init__(model_file, workdir, python=python, ready_timeout_s=ready_timeout_s)
        self.options = [
            "--max-batch-size", str(max_batch_size), "--batch-timeout", str(batch_timeout_s),
            "--workers-per-device", str(workers_per_device),
            *(["--fast-queue"] if fast_queue else []),
            *(["--num-api-servers", str(num_api_servers)] if num_api_servers is not None else []),
            *(["--log-batches"] if log_batches else []),
        ]  # fmt: skip

    def _command(self) -> tuple[list[str], dict[str, str]]:
        cmd = [str(self.python), str(LITSERVE_SCRIPT), "--model", str(self.model_file), "--port", str(self.port)]
        return [*cmd, *self.options], self._env()


class PyTritonPeer(OutsidePeer):
    """pytriton_peer.py: Triton (HTTP, gRPC and metrics on 127.0.0.1, free ports) with its dynamic batcher
    (`max_batch_size`, `max_queue_delay_us`); Triton's own OIP v2 HTTP route answers."""

    name: ClassVar[str] = "pytriton"

    def __init__(
        self,
        model_file: Path,
        workdir: Path,
        *,
        python: Path,
        max_batch_size: int,
        max_queue_delay_us: int,
        log_batches: bool = False,
        ready_timeout_s: float = 300.0,
    ) -> None:
        super().__init__(model_file, workdir, python=python, ready_timeout_s=ready_timeout_s)
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.options = [
            "--max-batch-size", str(max_batch_size), "--max-queue-delay-us", str(max_queue_delay_us),
            *(["--log-batches"] if log_batches else []),
        ]  # fmt: skip

    def _command(self) -> tuple[list[str], dict[str, str]]:
        cmd = [
            str(self.python), str(PYTRITON_SCRIPT), "--model", str(self.model_file), "--http-port", str(self.port),
            "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
            "--workspace", str(self.workdir / "workspace"), *self.options,
        ]  # fmt: skip
        return cmd, {**self._env(), "LD_LIBRARY_PATH": self._library_path()}

    def _library_path(self) -> str:
        """The peers interpreter's own libpython first: Triton's Python-backend stub otherwise loads the system's
        libpython3.11, whose stdlib differs from the interpreter's (seen: `'_thread.RLock' object has no attribute
        '_recursion_count'`, and the model fails to load)."""
        probe = "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"
        proc = subprocess.run([str(self.python), "-c", probe], capture_output=True, text=True, check=False, timeout=60)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise EngineError(f"{self.python} did not tell its LIBDIR: {proc.stderr.strip()}")
        return os.pathsep.join(p for p in (proc.stdout.strip(), os.environ.get("LD_LIBRARY_PATH", "")) if p)


#: A traceback's last line (`ValueError: ...`): the first in a log is the cause, later ones the server giving up on it.
RAISED = re.compile(r"^[\w.]+(Error|Exception): .+")
#: Without one, the last line that reports a failure.
FAILED = re.compile(r"error|fail|not found|no such file", re.IGNORECASE)


def why_not(exc: BaseException) -> str:
    """One sentence for the report when an outside peer could not run: what failed and, from the log lines the error
    carries, why."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    what, log = (lines[0], lines[1:]) if lines else (type(exc).__name__, [])
    cause = next((line for line in log if RAISED.match(line)), None) or next((x for x in reversed(log) if FAILED.search(x)), "")
    return f"{what.rstrip(':.')}{f' ({cause[:300]})' if cause else ''}."


__all__ = ["INFER_PATH", "PEERS_VENV", "LitServePeer", "OutsidePeer", "PyTritonPeer", "peers_python", "why_not"]
