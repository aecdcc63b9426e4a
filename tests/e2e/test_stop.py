"""A command that starts servers stops them when it is itself stopped: `torchship reliability` and `torchship bench`
get SIGTERM (what a time limit or a supervisor sends) while their first server runs, and no process they started
may be left (TorchServe's frontend and workers, the Ray child, Ray's GCS, raylet and replicas)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import REPO, TORCHSHIP

#: Command lines that mean a server is up: TorchServe's Python workers, Ray's replica actors. reliability is stopped
#: once its Ray Serve runs (the engine left behind before), bench while its first TorchServe runs.
WAIT_FOR = {"reliability": "ServeReplica:", "bench": "model_service_worker"}
SERVER_MARKERS = tuple(WAIT_FOR.values())
START_TIMEOUT_S = 420
STOP_TIMEOUT_S = 150


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {_cmdline(proc)[:200]}")
        except psutil.NoSuchProcess:
            continue
    return left


@pytest.mark.parametrize("command", ["reliability", "bench"])
def test_sigterm_mid_run_leaves_no_server_behind(command: str, artifacts_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(TORCHSHIP), command, "--quick", "--artifacts", str(artifacts_dir), "--out", str(tmp_path / "reports")],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            for child in _descendants(proc.pid):
                seen.setdefault(child.pid, child)
            if any(WAIT_FOR[command] in _cmdline(p) for p in seen.values()):
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"{command} ended before a server ran:\n{log.read_text()[-3000:]}"
        servers = [p for p in seen.values() if WAIT_FOR[command] in _cmdline(p)]
        assert servers, f"no server within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
        print(f"{command}: SIGTERM with {len(seen)} processes started, servers: {[_cmdline(p)[:120] for p in servers]}")
        for child in _descendants(proc.pid):  # everything running at the moment of the signal
            seen.setdefault(child.pid, child)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_TIMEOUT_S)
        assert proc.returncode != 0, "a stopped run must not report success"
        deadline = time.monotonic() + 30  # what the command stopped may take a moment to exit
        while _alive(list(seen.values())) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _alive(list(seen.values())) == [], log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for leftover in seen.values():  # never leave a server to the next test, whatever happened above
            try:
                leftover.kill()
            except psutil.NoSuchProcess:
                continue
