"""Operations under load: a graceful drain (SIGTERM to `torchship serve` while clients send checked traffic).

Each run starts the real CLI the way a user does, sends traffic to 127.0.0.1 only, and is bounded in time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests

from engines.base import free_port
from handlers.names import TOKEN_ENV
from reliability.corpus import HttpReply, Oracle, Target, auth_headers
from reliability.traffic import PoolEntry, _CheckedOracle

#: How long `torchship serve` may take from SIGTERM to exit; the README and the pods' terminationGracePeriodSeconds
#: are set from it.
DRAIN_BOUND_S = 30.0
#: A request that gets no answer within this is counted as hanging.
REQUEST_TIMEOUT_S = 30.0
#: A test token for the CLI server (both engines accept it: TorchServe through the handler's shared-token rule is not
#: used here; TorchServe's own key file is read instead).
CLI_TOKEN = "drain-test-token"


@dataclass
class CliServer:
    """`torchship serve <engine>` in a process group of its own, its output in a log file."""

    engine: str
    process: subprocess.Popen[bytes]
    url: str
    workdir: Path
    log_path: Path

    def token(self) -> str | None:
        if self.engine == "ray":
            return CLI_TOKEN
        keys = json.loads((self.workdir / "key_file.json").read_text(encoding="utf-8"))
        return str(keys["inference"]["key"])

    def target(self) -> Target:
        return Target(self.engine, self.url, self.token())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)


def start_cli_server(engine: str, model_store: Path, workdir: Path, *, ready_timeout_s: float = 300.0) -> CliServer:
    """Start `torchship serve` and wait for its 'ready at' line; the caller kills it (CliServer.kill) in a finally."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "cli.log"
    cmd = [sys.executable, "-m", "torchship.cli", "serve", engine, "--model-store", str(model_store), "--port", str(port)]
    cmd += ["--workdir", str(workdir / "engine")]
    env = {**os.environ, TOKEN_ENV: CLI_TOKEN} if engine == "ray" else dict(os.environ)
    env.pop(TOKEN_ENV, None) if engine != "ray" else None
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = CliServer(engine, process, f"http://127.0.0.1:{port}", workdir / "engine", log_path)
    deadline = time.monotonic() + ready_timeout_s
    while "ready at" not in server.log_tail(200):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = server.log_tail()
            server.kill()
            raise RuntimeError(f"torchship serve {engine} did not become ready:\n{tail}")
        time.sleep(0.5)
    return server


# -- drain --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrainShot:
    start_s: float
    end_s: float
    status: int
    #: ok (200, equal to eager), wrong (200, not equal), refused (503 with a JSON body, or the connection refused or
    #: closed before any answer), error (any other answer), hung (no answer within REQUEST_TIMEOUT_S)
    outcome: str
    detail: str = ""


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def send_checked(
    session: requests.Session, target: Target, entry: PoolEntry, checker: _CheckedOracle, auth: dict[str, str]
) -> tuple[int, str, str]:
    """One checked JSON request: (status, outcome, detail) as DrainShot classifies them."""
    url = f"{target.url.rstrip('/')}/predictions/{entry.endpoint}"
    try:
        r = session.post(url, data=entry.json_body, headers={**entry.json_headers, **auth}, timeout=REQUEST_TIMEOUT_S)
    except requests.Timeout as exc:
        return 0, "hung", f"{type(exc).__name__}"
    except requests.ConnectionError as exc:
        return 0, "refused", f"{type(exc).__name__}: {exc}"[:160]
    reply = HttpReply(r.status_code, r.content, {k.lower(): v for k, v in r.headers.items()})
    if reply.status == 200:
        problem = checker.check(entry, reply)
        return 200, ("wrong" if problem else "ok"), problem
    if reply.status == 503 and _is_json(reply.body):
        return 503, "refused", reply.body[:160].decode("utf-8", "replace")
    return reply.status, "error", reply.body[:160].decode("utf-8", "replace")


@dataclass
class DrainResult:
    engine: str
    clients: int
    signal_after_s: float
    exit_code: int | None
    exit_s: float | None
    bound_s: float
    sent_before_signal: int
    answered_before_signal_ok: int
    sent_after_signal: int
    after_ok: int
    #: refused cleanly: a JSON 503, or the connection refused / closed before any answer
    after_refused_503: int
    after_refused_connection: int
    #: every shot that breaks the rule: sent before the signal and not answered correctly, or sent after it and
    #: answered wrongly, with another error, or left hanging
    violations: list[str]

    @property
    def passed(self) -> bool:
        return not self.violations and self.exit_code == 0 and self.exit_s is not None and self.exit_s <= self.bound_s

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


def judge_drain(shots: Sequence[DrainShot], signal_at: float) -> tuple[dict[str, int], list[str]]:
    """Count shots around the signal and list every one that breaks the drain rule."""
    before = [s for s in shots if s.start_s < signal_at]
    after = [s for s in shots if s.start_s >= signal_at]
    broken = [s for s in before if s.outcome != "ok"] + [s for s in after if s.outcome not in {"ok", "refused"}]
    violations = [f"sent {s.start_s - signal_at:+.3f} s: {s.outcome} {s.status} {s.detail}" for s in broken]
    counts = {
        "sent_before_signal": len(before),
        "answered_before_signal_ok": sum(s.outcome == "ok" for s in before),
        "sent_after_signal": len(after),
        "after_ok": sum(s.outcome == "ok" for s in after),
        "after_refused_503": sum(s.outcome == "refused" and s.status == 503 for s in after),
        "after_refused_connection": sum(s.outcome == "refused" and s.status == 0 for s in after),
    }
    return counts, violations


def run_drain(
    server: CliServer,
    pool: Sequence[PoolEntry],
    oracle: Oracle,
    *,
    clients: int = 16,
    signal_after_s: float = 3.0,
    bound_s: float = DRAIN_BOUND_S,
) -> DrainResult:
    """Clients send checked requests; SIGTERM goes to the CLI after `signal_after_s`; each client stops at its first
    refusal after the signal (or when the server has exited). The server is killed afterwards whatever happened."""
    target = server.target()
    auth = auth_headers(target)
    checker = _CheckedOracle(oracle)
    shots: list[DrainShot] = []
    lock = threading.Lock()
    signalled = threading.Event()
    give_up = threading.Event()

    def client(n: int) -> None:
        session = requests.Session()
        i = 0
        while not give_up.is_set():
            entry = pool[(n * 7919 + i) % len(pool)]
            i += 1
            start = time.monotonic()
            status, outcome, detail = send_checked(session, target, entry, checker, auth)
            with lock:
                shots.append(DrainShot(start, time.monotonic(), status, outcome, detail))
            if signalled.is_set() and (outcome == "refused" or server.process.poll() is not None):
                return

    threads = [threading.Thread(target=client, args=(n,), name=f"drain-{n}", daemon=True) for n in range(clients)]
    try:
        for t in threads:
            t.start()
        time.sleep(signal_after_s)
        signal_at = time.monotonic()
        signalled.set()
        server.process.send_signal(signal.SIGTERM)
        exit_code: int | None
        try:
            exit_code = server.process.wait(timeout=bound_s * 2)
            exit_s: float | None = time.monotonic() - signal_at
        except subprocess.TimeoutExpired:
            exit_code, exit_s = None, None
        for t in threads:
            t.join(timeout=REQUEST_TIMEOUT_S + 5)
    finally:
        give_up.set()
        server.kill()
    with lock:
        taken = list(shots)
    counts, violations = judge_drain(taken, signal_at)
    if any(t.is_alive() for t in threads):
        violations.append("a client was still waiting for an answer after the server was killed")
    return DrainResult(server.engine, clients, signal_after_s, exit_code, exit_s, bound_s, **counts, violations=violations)
