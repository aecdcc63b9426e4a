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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torchship.engines.base import free_port
from torchship.errors import TorchshipError
from torchship.handlers.names import TOKEN_ENV
from torchship.reliability.corpus import Oracle, Target, auth_headers
from torchship.reliability.traffic import FAILED, json_requests
from torchship.verify import load
from torchship.verify.load import LoadRequest, Shot

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
    #: the engine's work folder (`--workdir`: its own log, TorchServe's key file)
    workdir: Path
    log_path: Path
    model_store: Path
    #: the shared inference token it was started with (Ray; TorchServe makes its own, in key_file.json)
    shared_token: str | None = None
    #: the process groups under the CLI (the engine runs in a session of its own), recorded once it is ready: a kill
    #: still reaches them when the CLI itself has already exited
    groups: set[int] = field(default_factory=set)

    def record_groups(self) -> None:
        import psutil

        with contextlib.suppress(psutil.Error, OSError):
            self.groups |= {os.getpgid(p.pid) for p in psutil.Process(self.process.pid).children(recursive=True)}

    def token(self) -> str | None:
        if self.engine == "ray":
            return self.shared_token
        keys = json.loads((self.workdir / "key_file.json").read_text(encoding="utf-8"))
        return str(keys["inference"]["key"])

    def target(self) -> Target:
        return Target(self.engine, self.url, self.token())

    def printed(self) -> str:
        """Everything the command printed so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.printed().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the CLI and every process under it: the engine runs in a process group of its own, which a kill
        of the CLI's group alone would leave running."""

        self.record_groups()
        for pgid in self.groups | {self.process.pid}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)


#: The last line `torchship serve` prints once the engine is ready (after its URL, token and gRPC lines).
READY_LINE = "Ctrl-C or SIGTERM"


def start_cli_server(
    engine: str,
    model_store: Path,
    workdir: Path,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    ready_timeout_s: float = 300.0,
    command: Sequence[str] | None = None,
    cwd: Path | None = None,
) -> CliServer:
    """Start `torchship serve <engine>` (command: the torchship executable; default this interpreter's) on a free
    port (or `port`), the engine's files in `workdir`, its output in `<workdir>.cli.log`, and wait for its ready
    line. The one way the repository's QA tooling and tests start the CLI's server; the caller kills it
    (CliServer.kill) in a finally. A Ray server gets CLI_TOKEN as its shared token unless env sets another;
    TorchServe makes its own."""
    workdir.parent.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = workdir.with_name(f"{workdir.name}.cli.log")
    cmd = [*(command or [sys.executable, "-m", "torchship.cli"]), "serve", engine, "--model-store", str(model_store)]
    cmd += ["--port", str(port), "--workdir", str(workdir), *args]
    full_env = {**os.environ, **(env or {})}
    if engine == "ray":
        full_env[TOKEN_ENV] = (env or {}).get(TOKEN_ENV) or CLI_TOKEN
    else:
        full_env.pop(TOKEN_ENV, None)
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True)
    server = CliServer(
        engine, process, f"http://127.0.0.1:{port}", workdir, log_path, model_store, full_env.get(TOKEN_ENV) or None
    )
    deadline = time.monotonic() + ready_timeout_s
    while READY_LINE not in server.printed():
        if process.poll() is not None or time.monotonic() > deadline:
            tail = server.log_tail()
            server.kill()
            raise RuntimeError(f"torchship serve {engine} did not become ready:\n{tail}")
        time.sleep(0.5)
    server.record_groups()
    return server


# -- drain --------------------------------------------------------------------------------------------------------


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


#: After the signal a request may be answered, or refused cleanly: a JSON 503 (shed) or the connection refused or
#: closed before any answer (refused). Before it, every request must be answered correctly.
REFUSED_CLEANLY = ("shed", "refused")


def judge_drain(shots: Sequence[Shot], signal_at: float) -> tuple[dict[str, int], list[str]]:
    """Count shots around the signal and list every one that breaks the drain rule."""
    before = [s for s in shots if s.start_s < signal_at]
    after = [s for s in shots if s.start_s >= signal_at]
    broken = [s for s in before if s.outcome != "ok"] + [s for s in after if s.outcome not in {"ok", *REFUSED_CLEANLY}]
    violations = [f"sent {s.start_s - signal_at:+.3f} s: {s.outcome} {s.status} {s.detail}" for s in broken]
    counts = {
        "sent_before_signal": len(before),
        "answered_before_signal_ok": sum(s.outcome == "ok" for s in before),
        "sent_after_signal": len(after),
        "after_ok": sum(s.outcome == "ok" for s in after),
        "after_refused_503": sum(s.outcome == "shed" for s in after),
        "after_refused_connection": sum(s.outcome == "refused" for s in after),
    }
    return counts, violations


@dataclass
class Stoppable:
    """What a drain run needs of a server: its target, a way to start the graceful stop, and its exit."""

    target: Target
    #: starts the graceful stop and returns at once (SIGTERM to the CLI, or Engine.drain() in a thread)
    begin_stop: Callable[[], None]
    #: waits up to the given seconds for the server to exit: its exit code, or None when it has not exited
    wait_exit: Callable[[float], int | None]
    #: kills whatever is left, whatever happened
    kill: Callable[[], None]


def cli_stoppable(server: CliServer, sig: signal.Signals = signal.SIGTERM) -> Stoppable:
    """`torchship serve` as a user stops it: a signal to the CLI process (SIGKILL to its group drops everything)."""

    def begin() -> None:
        if sig == signal.SIGKILL:
            os.killpg(server.process.pid, sig)
        else:
            server.process.send_signal(sig)

    def wait(timeout_s: float) -> int | None:
        try:
            return server.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    return Stoppable(server.target(), begin, wait, server.kill)


def engine_stoppable(engine: Any, target: Target) -> Stoppable:
    """An `Engine` drained the way `torchship serve` drains it on SIGTERM (Engine.drain(), in a thread)."""
    thread = threading.Thread(target=engine.drain, name="drain", daemon=True)

    def wait(timeout_s: float) -> int | None:
        thread.join(timeout_s)
        return None if thread.is_alive() or engine.process is None else int(engine.process.returncode)

    return Stoppable(target, thread.start, wait, engine.stop)


def run_drain(
    server: Stoppable,
    pool: Sequence[LoadRequest],
    *,
    clients: int = 16,
    signal_after_s: float = 3.0,
    bound_s: float = DRAIN_BOUND_S,
) -> DrainResult:
    """Clients send checked JSON requests; the graceful stop begins after `signal_after_s`; each client stops at its
    first clean refusal after it (or once the server has exited). The server is killed afterwards whatever happened."""
    target = server.target
    signalled = threading.Event()
    exited = threading.Event()
    give_up = threading.Event()

    def client_done(shot: Shot) -> bool:
        return signalled.is_set() and (shot.outcome in REFUSED_CLEANLY or exited.is_set())

    requests_json = json_requests(pool)
    run = load.start_load(
        target.url, requests_json, clients=clients, auth=auth_headers(target), stop=give_up, on_shot=client_done,
        pick=load.cycle(len(requests_json), stride=7919), timeout_s=REQUEST_TIMEOUT_S,
    )  # fmt: skip
    exit_code: int | None = None
    exit_s: float | None = None
    stuck = False
    try:
        time.sleep(signal_after_s)
        signal_at = time.monotonic()
        signalled.set()
        server.begin_stop()
        exit_code = server.wait_exit(bound_s * 2)
        if exit_code is not None:
            exit_s = time.monotonic() - signal_at
            exited.set()
        try:
            run.join(REQUEST_TIMEOUT_S + 5)
        except TorchshipError:
            stuck = True
    finally:
        give_up.set()
        server.kill()
    counts, violations = judge_drain(list(run.shots), signal_at)
    if stuck:
        violations.append("a client was still waiting for an answer after the server was killed")
    return DrainResult(target.engine, clients, signal_after_s, exit_code, exit_s, bound_s, **counts, violations=violations)


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
    pool: Sequence[LoadRequest],
    *,
    requests_total: int | None = None,
    duration_s: float | None = None,
    concurrency: int = 16,
    sample_s: float = 0.5,
) -> SoakResult:
    """Checked requests at steady concurrency, `requests_total` of them or for `duration_s`, while the server tree's
    RSS is sampled; the first SOAK_WARMUP_FRACTION of the requests (or of the time) is warm-up."""
    from torchship.reliability.traffic import run_load

    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()
    warm_at: list[float] = []
    done = threading.Event()

    def sampler() -> None:
        while True:  # one sample at the start, one every sample_s, and one after the last answer
            samples.append((round(time.monotonic() - t0, 2), round(tree_rss_bytes(server_pid) / 2**20, 1)))
            if done.is_set():
                return
            done.wait(sample_s)

    def progress(count: int) -> None:
        elapsed = time.monotonic() - t0
        if duration_s:
            warm = elapsed >= duration_s * SOAK_WARMUP_FRACTION
        else:
            warm = count >= (requests_total or 0) * SOAK_WARMUP_FRACTION
        if warm and not warm_at:
            warm_at.append(elapsed)

    thread = threading.Thread(target=sampler, name="soak-rss", daemon=True)
    thread.start()
    try:
        shots = run_load(
            target, pool, requests_total=requests_total, duration_s=duration_s, concurrency=concurrency, on_done=progress
        )
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
        failed=sum(s.outcome in FAILED for s in shots),
        wrong_answers=sum(s.outcome == "wrong" for s in shots),
        duration_s=round(time.monotonic() - t0, 1),
        samples=samples,
        warm_at_s=round(warm_at_s, 2),
        warm_rss_mib=warm,
        end_rss_mib=end,
        growth=round(growth, 4),
    )


def plot_soak(results: Sequence[dict[str, Any]], out: Path) -> Path:
    """Resident memory over time, one line per engine (SoakResult.as_dict() each), warm-up marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        times, mib = [t for t, _ in r["samples"]], [m for _, m in r["samples"]]
        (line,) = ax.plot(times, mib, label=f"{r['engine']} ({r['requests']} requests, {r['growth']:+.1%} after warm-up)")
        ax.axvline(r["warm_at_s"], color=line.get_color(), linestyle=":", linewidth=1)
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


def _slow_sender(target: Target, entry: LoadRequest, interval_s: float, stop: threading.Event, record: SlowSender) -> None:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(target.url)
    body = entry.body
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
    pool: Sequence[LoadRequest],
    *,
    requests_total: int,
    concurrency: int = 16,
    idle_connections: int = 200,
    slow_senders: int = 20,
    byte_interval_s: float = 0.1,
    linger_s: float = 0.0,
) -> SlowClientsResult:
    """Normal clients alone, then again while `idle_connections` sockets sit open and `slow_senders` clients trickle
    their bodies; the normal clients' p99 is compared across the two runs."""
    import socket
    from urllib.parse import urlsplit

    from torchship.reliability.traffic import run_load, summarize

    # Warm first (connections, allocator, first batches), so the clean run is not charged for a cold start.
    run_load(target, pool, requests_total=min(requests_total, 4 * concurrency), concurrency=concurrency, seed=2)
    clean_shots = run_load(target, pool, requests_total=requests_total, concurrency=concurrency)
    clean = summarize(target.engine, clean_shots, concurrency)
    parts = urlsplit(target.url)
    address = (parts.hostname or "127.0.0.1", parts.port or 80)
    idle = [socket.create_connection(address, timeout=5) for _ in range(idle_connections)]
    stop = threading.Event()
    records = [SlowSender() for _ in range(slow_senders)]
    # The slowest bodies: the largest JSON request in the pool.
    entry = max(json_requests(pool), key=lambda e: len(e.body))
    senders = [
        threading.Thread(target=_slow_sender, args=(target, entry, byte_interval_s, stop, rec), name=f"slow-{n}", daemon=True)
        for n, rec in enumerate(records)
    ]
    try:
        for t in senders:
            t.start()
        time.sleep(1.0)  # every slow sender has started its body
        shots = run_load(target, pool, requests_total=requests_total, concurrency=concurrency, seed=1)
        noisy = summarize(target.engine, shots, concurrency)
        # Time for the server's body timeout to cut the slow senders (they stop early once cut).
        deadline = time.monotonic() + linger_s
        while time.monotonic() < deadline and any(t.is_alive() for t in senders):
            time.sleep(0.2)
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


# -- all of it, on one engine ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpsCounts:
    #: the soak: this many requests, or this many seconds of steady load (one of the two)
    soak_requests: int | None
    slow_requests: int
    soak_seconds: float | None = None
    idle_connections: int = 200
    slow_senders: int = 20
    drain_clients: int = 16
    #: the Ray app's request-body timeout for this run (TORCHSHIP_BODY_TIMEOUT_S), short enough to watch it cut
    body_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if (self.soak_requests is None) == (self.soak_seconds is None):
            raise ValueError("a soak is bounded by soak_requests or by soak_seconds, one of the two")


#: The full soak is bounded by time, not count: 4 minutes of steady load per engine (30,000 requests took Ray Serve over
#: 12 minutes here, so the whole run went past 30).
OPS_FULL = OpsCounts(soak_requests=None, slow_requests=1_000, soak_seconds=240.0)
OPS_QUICK = OpsCounts(soak_requests=2_000, slow_requests=300)
#: Soak traffic: small batches, so the count is requests rather than rows.
SOAK_BATCHES = (1, 2)


def run_operations(
    engine: str, model_store: Path, workdir: Path, *, oracle: Oracle, endpoints: Sequence[str], counts: OpsCounts, say: Any
) -> tuple[dict[str, Any], SoakResult]:
    """On one `torchship serve <engine>`, started as a user starts it: slow and flooding clients, a soak, then a drain
    (SIGTERM) that ends it."""
    from torchship.reliability.traffic import make_pool

    pool = make_pool(oracle, endpoints)
    env = {"TORCHSHIP_BODY_TIMEOUT_S": str(counts.body_timeout_s)}
    say(f"{engine}: starting `torchship serve {engine}` for the operations checks")
    server = start_cli_server(engine, model_store, workdir / "engine", env=env)
    try:
        target = server.target()
        say(f"{engine}: {counts.idle_connections} idle connections + {counts.slow_senders} slow senders vs normal clients")
        slow = run_slow_clients(
            target, pool, requests_total=counts.slow_requests, idle_connections=counts.idle_connections,
            slow_senders=counts.slow_senders, linger_s=counts.body_timeout_s + 2,
        )  # fmt: skip
        length = f"{counts.soak_seconds:g} s of" if counts.soak_seconds else f"{counts.soak_requests}"
        say(f"{engine}: soak, {length} checked requests, server memory sampled")
        soak = run_soak(
            target, server.process.pid, make_pool(oracle, endpoints, batches=SOAK_BATCHES),
            requests_total=counts.soak_requests, duration_s=counts.soak_seconds,
        )  # fmt: skip
        say(f"{engine}: SIGTERM under {counts.drain_clients} clients (drain)")
        drained = run_drain(cli_stoppable(server), pool, clients=counts.drain_clients)
    finally:
        server.kill()
    doc = {"slow_clients": slow.as_dict(), "soak": soak.as_dict(), "drain": drained.as_dict()}
    return doc, soak


def ops_problems(engine: str, doc: dict[str, Any]) -> list[str]:
    """What failed in one engine's operations checks, as sentences."""
    problems: list[str] = []
    slow, soak, drained = doc["slow_clients"], doc["soak"], doc["drain"]
    if not slow["passed"]:
        problems.append(
            f"{engine}: with slow/idle clients normal clients' p99 was {slow['p99_ratio']}x the clean run's "
            f"(limit {slow['p99_limit']}x), failed {slow['noisy_failed']}, wrong {slow['wrong_answers']}"
        )
    if not soak["passed"]:
        problems.append(
            f"{engine}: soak: memory grew {soak['growth']:.1%} after warm-up (limit {soak['growth_limit']:.0%}), "
            f"failed {soak['failed']}, wrong {soak['wrong_answers']}"
        )
    if not drained["passed"]:
        problems.append(
            f"{engine}: drain: exit {drained['exit_code']} after {drained['exit_s']} s (bound {drained['bound_s']} s), "
            f"{len(drained['violations'])} requests broke the rule: {drained['violations'][:3]}"
        )
    return problems


def ops_markdown(operations: dict[str, dict[str, Any]]) -> str:
    """The operations checks as three small tables (the report's markdown)."""
    lines = [
        "Slow and flooding clients (normal clients' p99, clean run vs with idle connections and byte-per-interval senders):",
        "",
        "| engine | idle conns | slow senders | clean p99 ms | noisy p99 ms | ratio | failed | wrong | senders cut (after s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, doc in operations.items():
        s = doc["slow_clients"]
        after = s["sender_cut_after_s"]
        cut = f"{s['senders_cut']} of {s['slow_senders']}" + (f" ({min(after)}-{max(after)})" if after else "")
        lines.append(
            f"| {name} | {s['idle_connections']} | {s['slow_senders']} | {s['clean_p99_ms']} | {s['noisy_p99_ms']} | "
            f"{s['p99_ratio']}x | {s['clean_failed'] + s['noisy_failed']} | {s['wrong_answers']} | {cut} |"
        )
    lines += ["", "Soak (server-tree resident memory, see soak.png):", "",
              "| engine | requests | ok | failed | wrong | seconds | MiB after warm-up | MiB at end | growth |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, doc in operations.items():
        k = doc["soak"]
        lines.append(
            f"| {name} | {k['requests']} | {k['ok']} | {k['failed']} | {k['wrong_answers']} | {k['duration_s']} | "
            f"{k['warm_rss_mib']} | {k['end_rss_mib']} | {k['growth']:+.1%} |"
        )
    lines += ["", "Drain (SIGTERM to `torchship serve` under load):", "",
              "| engine | clients | sent before | answered ok | sent after | after: ok | after: 503 | after: refused conn "
              "| exit | exit s | broke the rule |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, doc in operations.items():
        d = doc["drain"]
        exit_s = f"{d['exit_s']:.1f}" if d["exit_s"] is not None else "none"
        lines.append(
            f"| {name} | {d['clients']} | {d['sent_before_signal']} | {d['answered_before_signal_ok']} | "
            f"{d['sent_after_signal']} | {d['after_ok']} | {d['after_refused_503']} | {d['after_refused_connection']} | "
            f"{d['exit_code']} | {exit_s} | {len(d['violations'])} |"
        )
    return "\n".join(lines)
