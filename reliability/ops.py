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


# -- soak -----------------------------------------------------------------------------------------------------------

#: Resident memory may grow at most this much from the end of warm-up to the end of a soak.
SOAK_GROWTH_LIMIT = 0.10
#: The share of a soak's requests that counts as warm-up (allocator pools, caches, JIT profiling fill up).
SOAK_WARMUP_FRACTION = 0.2


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (the whole server: frontend, workers, Ray's daemons)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


@dataclass
class SoakResult:
    engine: str
    requests: int
    concurrency: int
    ok: int
    failed: int
    wrong_answers: int
    duration_s: float
    #: (seconds since start, resident MiB of the server tree), sampled every sample_s
    samples: list[tuple[float, float]]
    warm_at_s: float
    warm_rss_mib: float
    end_rss_mib: float
    growth: float
    growth_limit: float = SOAK_GROWTH_LIMIT

    @property
    def passed(self) -> bool:
        return self.failed == 0 and self.wrong_answers == 0 and self.growth < self.growth_limit

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


def memory_growth(samples: Sequence[tuple[float, float]], warm_at_s: float) -> tuple[float, float, float]:
    """(warm MiB, end MiB, growth): the median of the first tenth of the samples after warm-up against the median of
    the last tenth (medians, so one sample taken mid-collection does not decide)."""
    after = [rss for t, rss in samples if t >= warm_at_s] or [rss for _, rss in samples]
    tenth = max(1, len(after) // 10)
    warm = sorted(after[:tenth])[tenth // 2]
    end = sorted(after[-tenth:])[tenth // 2]
    return warm, end, (end - warm) / warm if warm else 0.0


def run_soak(
    target: Target,
    server_pid: int,
    pool: Sequence[PoolEntry],
    oracle: Oracle,
    *,
    requests_total: int,
    concurrency: int = 16,
    sample_s: float = 0.5,
) -> SoakResult:
    """`requests_total` checked requests at steady concurrency while the server tree's RSS is sampled."""
    from reliability.traffic import run_load

    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()
    warm_at: list[float] = []
    done = threading.Event()

    def sampler() -> None:
        while not done.is_set():
            samples.append((round(time.monotonic() - t0, 2), round(tree_rss_bytes(server_pid) / 2**20, 1)))
            done.wait(sample_s)

    def progress(count: int) -> None:
        if not warm_at and count >= requests_total * SOAK_WARMUP_FRACTION:
            warm_at.append(time.monotonic() - t0)

    thread = threading.Thread(target=sampler, name="soak-rss", daemon=True)
    thread.start()
    try:
        shots = run_load(target, pool, oracle, requests_total=requests_total, concurrency=concurrency, on_done=progress)
    finally:
        done.set()
        thread.join()
    warm_at_s = warm_at[0] if warm_at else 0.0
    warm, end, growth = memory_growth(samples, warm_at_s)
    return SoakResult(
        engine=target.engine,
        requests=len(shots),
        concurrency=concurrency,
        ok=sum(s.outcome == "ok" for s in shots),
        failed=sum(s.outcome in {"error", "lost"} for s in shots),
        wrong_answers=sum(s.outcome == "wrong" for s in shots),
        duration_s=round(time.monotonic() - t0, 1),
        samples=samples,
        warm_at_s=round(warm_at_s, 2),
        warm_rss_mib=warm,
        end_rss_mib=end,
        growth=round(growth, 4),
    )


def plot_soak(results: Sequence[SoakResult], out: Path) -> Path:
    """Resident memory over time, one line per engine, warm-up marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        (line,) = ax.plot([t for t, _ in r.samples], [m for _, m in r.samples], label=f"{r.engine} ({r.requests} requests)")
        ax.axvline(r.warm_at_s, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("seconds (dotted: end of warm-up)")
    ax.set_ylabel("resident memory of the server tree, MiB")
    ax.set_title("Soak: checked requests at steady concurrency")
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# -- slow and flooding clients ---------------------------------------------------------------------------------------

#: Normal clients' p99 with the noise may be at most this many times their p99 without it.
SLOW_P99_LIMIT = 3.0


@dataclass
class SlowSender:
    """One client that sends its request body one byte every interval: how it ended."""

    sent_bytes: int = 0
    seconds: float = 0.0
    #: "cut" (the server answered or closed before the body was complete), "open" (still sending at the end)
    ended: str = "open"
    status: int = 0


def _slow_sender(target: Target, entry: PoolEntry, interval_s: float, stop: threading.Event, record: SlowSender) -> None:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(target.url)
    body = entry.json_body
    head = (
        f"POST /predictions/{entry.endpoint} HTTP/1.1\r\nHost: {parts.hostname}\r\nContent-Type: application/json\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in auth_headers(target).items())
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    start = time.monotonic()
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=5) as sock:
        sock.sendall(head.encode("ascii"))
        sock.settimeout(interval_s)
        for i in range(len(body)):
            if stop.is_set():
                break
            try:
                sock.sendall(body[i : i + 1])
                record.sent_bytes += 1
                answer = sock.recv(256)  # waits up to interval_s: the pacing, and a way to see an early answer
            except TimeoutError:
                continue
            except OSError:
                record.ended = "cut"
                break
            if answer.startswith(b"HTTP/1."):
                record.ended, record.status = "cut", int(answer.split()[1])
                break
            if not answer:  # closed by the server
                record.ended = "cut"
                break
    record.seconds = round(time.monotonic() - start, 2)


def _still_open(sock: Any) -> bool:
    """True while the server has not closed this connection."""
    sock.setblocking(False)
    try:
        return bool(sock.recv(1))
    except BlockingIOError:  # nothing to read, not closed
        return True
    except OSError:
        return False


@dataclass
class SlowClientsResult:
    engine: str
    idle_connections: int
    slow_senders: int
    byte_interval_s: float
    clean_p99_ms: float
    noisy_p99_ms: float
    p99_ratio: float
    clean_failed: int
    noisy_failed: int
    wrong_answers: int
    #: how each slow sender ended: cut by the server (with the seconds it took) or still open when the run ended
    senders_cut: int
    sender_cut_after_s: list[float]
    idle_still_open: int
    p99_limit: float = SLOW_P99_LIMIT

    @property
    def passed(self) -> bool:
        return self.noisy_failed == 0 and self.clean_failed == 0 and self.wrong_answers == 0 and self.p99_ratio <= self.p99_limit

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


def run_slow_clients(
    target: Target,
    pool: Sequence[PoolEntry],
    oracle: Oracle,
    *,
    requests_total: int,
    concurrency: int = 16,
    idle_connections: int = 200,
    slow_senders: int = 20,
    byte_interval_s: float = 0.1,
) -> SlowClientsResult:
    """Normal clients alone, then again while `idle_connections` sockets sit open and `slow_senders` clients trickle
    their bodies; the normal clients' p99 is compared across the two runs."""
    import socket
    from urllib.parse import urlsplit

    from reliability.traffic import run_load, summarize

    # Warm first (connections, allocator, first batches), so the clean run is not charged for a cold start.
    run_load(target, pool, oracle, requests_total=min(requests_total, 4 * concurrency), concurrency=concurrency, seed=2)
    clean_shots = run_load(target, pool, oracle, requests_total=requests_total, concurrency=concurrency)
    clean = summarize(target.engine, clean_shots, concurrency)
    parts = urlsplit(target.url)
    address = (parts.hostname or "127.0.0.1", parts.port or 80)
    idle = [socket.create_connection(address, timeout=5) for _ in range(idle_connections)]
    stop = threading.Event()
    records = [SlowSender() for _ in range(slow_senders)]
    # The slowest bodies: the largest JSON request in the pool.
    entry = max(pool, key=lambda e: len(e.json_body))
    senders = [
        threading.Thread(target=_slow_sender, args=(target, entry, byte_interval_s, stop, rec), name=f"slow-{n}", daemon=True)
        for n, rec in enumerate(records)
    ]
    try:
        for t in senders:
            t.start()
        time.sleep(1.0)  # every slow sender has started its body
        shots = run_load(target, pool, oracle, requests_total=requests_total, concurrency=concurrency, seed=1)
        noisy = summarize(target.engine, shots, concurrency)
    finally:
        stop.set()
        for t in senders:
            t.join(timeout=10)
        still_open = sum(_still_open(sock) for sock in idle)
        for sock in idle:
            sock.close()
    return SlowClientsResult(
        engine=target.engine,
        idle_connections=idle_connections,
        slow_senders=slow_senders,
        byte_interval_s=byte_interval_s,
        clean_p99_ms=clean.latency_p99_ms,
        noisy_p99_ms=noisy.latency_p99_ms,
        p99_ratio=round(noisy.latency_p99_ms / clean.latency_p99_ms, 2) if clean.latency_p99_ms else 0.0,
        clean_failed=clean.errors + clean.lost,
        noisy_failed=noisy.errors + noisy.lost,
        wrong_answers=clean.wrong_answers + noisy.wrong_answers,
        senders_cut=sum(r.ended == "cut" for r in records),
        sender_cut_after_s=sorted(r.seconds for r in records if r.ended == "cut"),
        idle_still_open=still_open,
    )
