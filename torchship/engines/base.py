"""The one way torchship starts an engine: `Engine`, a context manager that owns a server's process group.

An engine is launched in its own process group with its own work folder and log, waited for until every endpoint
of the model store is ready (asked of the engine itself, never read from printed text), and stopped with its whole
process tree. Everything else (CLI, pipeline, verify, bench, reliability, tests) asks it for its URL, token,
auth headers and pids. An endpoint whose archive refuses to load is reported from LOAD_REFUSED_MARKER and left out;
the rest of the store serves.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from torchship.errors import ArchiveError, EngineError, NotReady
from torchship.handlers.names import LOAD_REFUSED_MARKER, METRICS_DIR_ENV, VERIFY_KEY_ENV, bearer
from torchship.settings import FLUSH_TIMEOUT_S, default_body_limit_bytes

LOG_TAIL_LINES = 40
#: A drain (SIGTERM to `torchship serve`) keeps answering this long first, reported not ready: a load balancer's time
#: to stop sending (a pod's preStop sleep does the same in Kubernetes). Then new requests get a JSON 503.
DRAIN_WINDOW_S = 2.0
#: After the window, how long a drain waits for accepted requests to finish before the engine is stopped anyway.
DRAIN_TIMEOUT_S = FLUSH_TIMEOUT_S


#: Where free_port() looks: above the ports Ray gives its workers (10002-19999 unless told otherwise) and below the
#: OS's ephemeral range.
FREE_PORTS = (20000, 32768)
_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def reserve_ports(*ports: int | None) -> None:
    """Ports another process of the same engine chose (the launcher's, handed to its child): free_port() in this
    process never returns them, though the OS may offer them again once they are closed."""
    with _HANDED_OUT_LOCK:
        _HANDED_OUT.update(p for p in ports if p)


def _ephemeral_low() -> int:
    """The lowest port the OS hands to a socket bound to port 0 (Linux: ip_local_port_range; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _os_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free port on 127.0.0.1, never one this process handed out before, taken from FREE_PORTS below the OS's
    ephemeral range: a server binds its port seconds after it was chosen, and a port from the ephemeral range could
    go meanwhile to any socket bound to port 0 (seen: Ray's start took the port chosen for its HAProxy's stats)."""
    low, high = FREE_PORTS[0], min(FREE_PORTS[1], _ephemeral_low())
    roomy = high - low >= 1000  # else no room below the ephemeral range on this machine: the OS chooses, as before
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(low, high) if roomy else _os_port()
        if not _bindable(port):
            continue
        with _HANDED_OUT_LOCK:
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    raise EngineError("no free port on 127.0.0.1 that this process has not handed out already")


def endpoints_in(model_store: Path) -> list[str]:
    return sorted(p.stem for p in model_store.glob("*.mar"))


def endpoint_refusals(text: str, endpoints: list[str]) -> dict[str, str]:
    """{endpoint: line} for each `<marker> <endpoint>: <cause>` line of `text` that names one of `endpoints`."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        if (refusal := refusal_in(line)) is None:
            continue
        endpoint = refusal[len(LOAD_REFUSED_MARKER) :].strip().split(":", 1)[0].strip()
        if endpoint in endpoints:
            found.setdefault(endpoint, refusal)
    return found


def refusal_in(text: str) -> str | None:
    """The first load refusal in an engine's log or status text: the marker's line, from the marker on."""
    for line in text.splitlines():
        at = line.find(LOAD_REFUSED_MARKER)
        if at >= 0:
            return line[at:].strip()
    return None


class Engine(ABC):
    """A server for one model store, started by `start()` (or `with`), stopped by `stop()`."""

    name: ClassVar[str]
    #: SIGTERM the whole process group (TorchServe: wrapper, java, workers all shut down on it) rather than only the
    #: main process (Ray's driver, which shuts Serve and Ray down itself).
    term_group: ClassVar[bool] = False
    #: The signal stop() sends first: a quick stop, no drain (drain() is the graceful path).
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(
        self,
        model_store: Path,
        workdir: Path,
        *,
        port: int | None = None,
        max_request_bytes: int | None = None,
        ready_timeout_s: float = 300.0,
        verify_key: Path | None = None,
        drain_window_s: float = DRAIN_WINDOW_S,
        metrics_dir: Path | None = None,
    ) -> None:
        self.model_store = Path(model_store).resolve()
        #: Where every worker or replica writes its metrics (TORCHSHIP_METRICS_DIR; torchship.metrics serves them).
        self.metrics_dir = Path(metrics_dir).resolve() if metrics_dir else None
        self.drain_window_s = drain_window_s
        #: An ed25519 public key (PEM): with it, start() refuses a store with any archive not signed by it. Without
        #: it, TORCHSHIP_VERIFY_KEY_FILE names one when set.
        self.verify_key = verify_key or (Path(os.environ[VERIFY_KEY_ENV]) if os.environ.get(VERIFY_KEY_ENV) else None)
        self.workdir = Path(workdir).resolve()
        self.port = port or free_port()
        self.max_request_bytes = max_request_bytes or default_body_limit_bytes()
        self.ready_timeout_s = ready_timeout_s
        self.endpoints = endpoints_in(self.model_store)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / f"{self.name}.log"
        self.started_at: float | None = None
        #: {endpoint: refusal line} for each endpoint of the store that refused to load; the others serve.
        self.refused: dict[str, str] = {}

    # -- what an engine must say about itself --------------------------------------------------

    @property
    def url(self) -> str:
        """The inference base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    @abstractmethod
    def token(self) -> str | None:
        """The bearer token inference requests carry (None when the engine requires none)."""

    @abstractmethod
    def _command(self) -> tuple[list[str], dict[str, str]]:
        """The command line and extra environment that run the engine in the foreground."""

    @abstractmethod
    def _ready(self, endpoint: str) -> bool:
        """True when `endpoint` answers; raise NotReady while the engine is still coming up."""

    @abstractmethod
    def pids(self, endpoint: str) -> list[int]:
        """The processes running `endpoint`'s model (TorchServe workers, Ray replicas)."""

    def _refusals(self) -> dict[str, str]:
        """{endpoint: its refusal line} for each endpoint the engine reported refused (the engine's log lines that
        start with LOAD_REFUSED_MARKER and name an endpoint of the store)."""
        return endpoint_refusals(self.log_text(), self.endpoints)

    def _forget(self, endpoints: list[str]) -> bool:
        """Stop the engine trying to load refused endpoints again; True when that started it again (most engines drop
        a refused endpoint themselves: False)."""
        return False

    # -- lifecycle ------------------------------------------------------------------------------

    def auth_headers(self) -> dict[str, str]:
        return bearer(self.token)

    def start(self) -> Self:
        """Launch in a new process group and wait until every endpoint is ready; stop and raise EngineError if not."""
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> Self:
        """Start the engine's process tree (a new process group) and return at once; wait_ready() waits for it to
        serve. start() is both; a caller of launch() alone stops the engine itself (stop(), or a `with` block)."""
        if not self.endpoints:
            raise EngineError(f"no .mar files in {self.model_store}: run `torchship archive` first")
        if self.verify_key is not None:
            self._verify_signatures()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd, env = self._command()
        if self.metrics_dir is not None:
            self.metrics_dir.mkdir(parents=True, exist_ok=True)
            env = {**env, METRICS_DIR_ENV: str(self.metrics_dir)}
        self.started_at = time.monotonic()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                cmd, cwd=self.workdir, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def _verify_signatures(self) -> None:
        """Refuse the whole store, before the engine starts, if any archive is not signed by the verify key."""
        from torchship.archive.signing import load_verify_key, verify_store

        assert self.verify_key is not None
        try:
            verify_store(self.model_store, load_verify_key(self.verify_key))
        except ArchiveError as exc:  # SignatureRefused, or a verify key that cannot be read
            raise EngineError(str(exc)) from None

    def _note_refusals(self, pending: set[str]) -> None:
        """Move each newly refused endpoint out of `pending`; raise EngineError once every endpoint is refused."""
        new = {e: line for e, line in self._refusals().items() if e not in self.refused}
        self.refused.update(new)
        pending.difference_update(self.refused)
        if self.refused and set(self.refused) >= set(self.endpoints):
            lines = "\n".join(self.refused[e] for e in sorted(self.refused))
            raise EngineError(f"{self.name}: every endpoint refused to load:\n{lines}")
        if new and self._forget(sorted(new)):  # started again: every endpoint still served must answer again
            pending.update(e for e in self.endpoints if e not in self.refused)

    def wait_ready(self, poll_s: float = 0.5) -> None:
        """Wait until every endpoint serves or is refused (EngineError when all are refused, the engine exits, or
        the time is up); the refused ones are left in `refused` and out of `endpoints`."""
        deadline = time.monotonic() + self.ready_timeout_s
        pending = set(self.endpoints)
        while pending:
            self._note_refusals(pending)
            if not pending:
                break
            if not self.running():
                self._note_refusals(pending)  # what it printed before it exited
                code = self.process.returncode if self.process else None
                raise EngineError(f"{self.name} exited with code {code} while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                waited = f"{self.ready_timeout_s:.0f} s"
                raise EngineError(f"{self.name}: {sorted(pending)} not ready after {waited}:\n{self.log_tail()}")
            for endpoint in sorted(pending):
                try:
                    if self._ready(endpoint):
                        pending.discard(endpoint)
                except NotReady:
                    break
            if pending:
                time.sleep(poll_s)
        self.endpoints = [e for e in self.endpoints if e not in self.refused]

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        """The root of the engine's process tree."""
        if self.process is None:
            raise EngineError(f"{self.name} was not started")
        return self.process.pid

    def drain(self) -> None:
        """The graceful stop (`torchship serve` on SIGTERM or Ctrl-C): keep answering for drain_window_s, then answer
        new requests with a JSON 503 while every accepted one finishes (at most DRAIN_TIMEOUT_S), then stop."""
        try:
            if self.running():
                self._drain()
        finally:
            self.stop()

    @abstractmethod
    def _drain(self) -> None:
        """The engine's part of drain(): return once nothing accepted is still in flight."""

    def stop(self, timeout_s: float = 30.0) -> None:
        """stop_signal for a quick clean stop, then whatever is left of the process group is killed."""
        if self.process is None:
            return
        pgid = self.process.pid
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if self.term_group:
                    os.killpg(pgid, self.stop_signal)
                else:
                    os.kill(self.process.pid, self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout_s)
        # Children the main process did not take down (TorchServe's java and workers, Ray's raylet and actors).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout_s)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- logs -----------------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"
