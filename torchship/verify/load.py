"""The one checked load loop: concurrent clients send pre-encoded requests to a running endpoint, every answer is
classified and checked against the eager outputs it must equal, every request is recorded as a Shot.

Every caller that puts load on a server uses it: `torchship reliability` (load, faults, drain, soak, slow clients,
version rollouts), `torchship bench` (throughput, the per-request breakdown) and the tests. What they report stays
theirs; how a request is sent, timed, classified and checked is decided here once.

Clients are coroutines on one event loop (aiohttp) in a thread of their own, so a run can go on in the background
while its caller signals, kills or rolls the server (start_load), or block until it ends (run_load). A run is always
bounded: by a request count, a duration, a stop event, or its callers' on_shot deciding that a client is done.
Traffic goes only to the URL given (127.0.0.1 in every launcher here).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import torch

from torchship.errors import TorchshipError
from torchship.handlers.codec import decode_response
from torchship.handlers.errors import ClientError
from torchship.handlers.names import BINARY_HEADER
from torchship.parity import Comparison, compare_all
from torchship.spec import Tolerance

#: How one request ended. ok: a 200 equal to eager; wrong: a 200 that is not (or cannot be decoded); shed: a JSON 503
#: (the engine refusing at once: a full queue, a drain); error: any other answer; refused: the connection refused or
#: closed before an answer; hung: no answer within the request timeout.
OUTCOMES = ("ok", "wrong", "shed", "error", "refused", "hung")


@dataclass(frozen=True)
class HttpReply:
    """One HTTP answer: status, body and headers (names lower-cased)."""

    status: int
    body: bytes
    headers: Mapping[str, str]


#: What a check says of a 200: "" when it is right, else why not; or (that, a tag the caller keeps on the shot, such as
#: the model version whose outputs the reply equals).
CheckResult = str | tuple[str, str]
Check = Callable[[HttpReply], CheckResult]


def served_outputs(reply: HttpReply, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """The named outputs of a 200 (JSON or binary); raises ClientError/KeyError/ValueError when it cannot be read."""
    outputs = decode_response(reply.body, reply.headers.get(BINARY_HEADER))["outputs"]
    return tuple(outputs[n] for n in names)


def compare_reply(reply: HttpReply, names: Sequence[str], expected: Sequence[torch.Tensor], tol: Tolerance) -> Comparison | str:
    """The oracle: the reply's outputs against the eager ones within tolerance (a Comparison), or why the reply is not
    a readable 200 (a string)."""
    if reply.status != 200:
        return f"HTTP {reply.status}: {reply.body[:200]!r}"
    try:
        served = served_outputs(reply, names)
    except (ClientError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        return f"undecodable 200: {type(exc).__name__}: {exc}"
    return compare_all(served, tuple(expected), tol)


def expect_outputs(names: Sequence[str], expected: Sequence[torch.Tensor], tol: Tolerance) -> Callable[[HttpReply], str]:
    """A check that passes when the reply's outputs equal `expected` within `tol` ("" when they do, else why not)."""
    names, expected = tuple(names), tuple(expected)

    def check(reply: HttpReply) -> str:
        c = compare_reply(reply, names, expected, tol)
        if isinstance(c, str):
            return c
        return "" if c.passed else f"wrong answer: {c.reason}"

    return check


@dataclass(frozen=True)
class LoadRequest:
    """One pre-encoded request and the check its answer must pass."""

    endpoint: str
    body: bytes
    headers: Mapping[str, str]
    check: Check
    batch: int = 1
    binary: bool = False
    #: The path posted to; default /predictions/<endpoint>.
    path: str = ""

    @property
    def url_path(self) -> str:
        return self.path or f"/predictions/{self.endpoint}"


@dataclass(frozen=True)
class Shot:
    """One request of a run: which, from which client, when (time.monotonic()), and how it ended."""

    index: int
    client: int
    #: The request's position in the pool.
    request: int
    endpoint: str
    batch: int
    binary: bool
    #: sent, and answered (the answer read, before it was checked), or given up on
    start_s: float
    end_s: float
    status: int
    outcome: str
    detail: str = ""
    #: What the check tagged the answer with (see Check), else "".
    tag: str = ""
    #: The reply headers the run was asked to keep (keep_headers), lower-case names.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: The whole answer, when the run was asked to keep replies (keep_replies).
    reply: HttpReply | None = None

    @property
    def latency_ms(self) -> float:
        return (self.end_s - self.start_s) * 1000


#: Which pool entry a client sends next: (client number, the client's request count, the run's request index) -> index.
Pick = Callable[[int, int, int], int]


def cycle(pool_size: int, *, stride: int = 1, step: int = 1) -> Pick:
    """Client n's i-th request is pool[(n * stride + i * step) % pool_size]."""
    return lambda n, i, _g: (n * stride + i * step) % pool_size


def seeded_random(pool_size: int, seed: int = 0) -> Pick:
    """The run's g-th request is a seeded random pick: the same run sends the same requests, whatever the timing."""
    return lambda _n, _i, g: random.Random(seed * 1_000_003 + g).randrange(pool_size)


def _is_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


def classify(reply: HttpReply, check: Check) -> tuple[str, str, str]:
    """(outcome, detail, tag) of an answer."""
    if reply.status == 200:
        result = check(reply)
        problem, tag = result if isinstance(result, tuple) else (result, "")
        return ("wrong" if problem else "ok"), problem, tag
    text = reply.body[:160].decode("utf-8", "replace")
    if reply.status == 503 and _is_json_object(reply.body):
        return "shed", text, ""
    return "error", f"HTTP {reply.status}: {text}", ""


class LoadRun:
    """A load run in a thread of its own (start_load); join() waits for it and returns its shots in send order."""

    def __init__(
        self,
        url: str,
        pool: Sequence[LoadRequest],
        *,
        clients: int,
        auth: Mapping[str, str] | None = None,
        requests_total: int | None = None,
        duration_s: float | None = None,
        stop: threading.Event | None = None,
        pick: Pick | None = None,
        timeout_s: float = 60.0,
        keep_headers: Sequence[str] = (),
        keep_replies: bool = False,
        on_shot: Callable[[Shot], bool | None] | None = None,
    ) -> None:
        if not pool:
            raise TorchshipError("a load run needs at least one request")
        if requests_total is None and duration_s is None and stop is None and on_shot is None:
            raise TorchshipError("a load run needs a bound: requests_total, duration_s, stop or on_shot")
        self.url = url.rstrip("/")
        self.pool = list(pool)
        self.clients = clients
        self.auth = dict(auth or {})
        self.requests_total = requests_total
        self.duration_s = duration_s
        self.stop_event = stop or threading.Event()
        self.pick = pick or cycle(len(self.pool))
        self.timeout_s = timeout_s
        self.keep = tuple(h.lower() for h in keep_headers)
        self.keep_replies = keep_replies
        self.on_shot = on_shot
        self.shots: list[Shot] = []
        #: time.monotonic() when the clients started and when the last one ended.
        self.started_s = 0.0
        self.ended_s = 0.0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    @property
    def seconds(self) -> float:
        return max(0.0, self.ended_s - self.started_s)

    def start(self) -> LoadRun:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Clients send nothing more; what is in flight is still answered (or times out)."""
        self.stop_event.set()

    def join(self, timeout_s: float | None = None) -> list[Shot]:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TorchshipError(f"the load run did not end within {timeout_s} s")
        if self._error is not None:
            raise self._error
        return sorted(self.shots, key=lambda s: s.index)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # handed to join()'s caller
            self._error = exc

    async def _main(self) -> None:
        counter = itertools.count()
        deadline = None if self.duration_s is None else time.monotonic() + self.duration_s
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        connector = aiohttp.TCPConnector(limit=self.clients, force_close=False)
        self.started_s = time.monotonic()
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(self._client(session, n, counter, deadline) for n in range(self.clients)))
        self.ended_s = time.monotonic()

    async def _client(self, session: aiohttp.ClientSession, n: int, counter: Any, deadline: float | None) -> None:
        sent = 0
        while not self.stop_event.is_set() and (deadline is None or time.monotonic() < deadline):
            g = next(counter)
            if self.requests_total is not None and g >= self.requests_total:
                return
            k = self.pick(n, sent, g)
            req = self.pool[k]
            sent += 1
            start = time.monotonic()
            reply: HttpReply | None = None
            try:
                async with session.post(f"{self.url}{req.url_path}", data=req.body, headers={**req.headers, **self.auth}) as r:
                    reply = HttpReply(r.status, await r.read(), {k.lower(): v for k, v in r.headers.items()})
            except TimeoutError as exc:
                outcome, detail = "hung", f"no answer within {self.timeout_s:g} s ({type(exc).__name__})"
            except aiohttp.ClientConnectionError as exc:
                outcome, detail = "refused", f"{type(exc).__name__}: {exc}"[:200]
            except aiohttp.ClientError as exc:
                outcome, detail = "error", f"{type(exc).__name__}: {exc}"[:200]
            # The latency ends with the answer (or with giving up): checking it is the client's time, not the server's.
            answered = time.monotonic()
            tag, kept, status = "", {}, 0
            if reply is not None:
                outcome, detail, tag = classify(reply, req.check)
                status = reply.status
                kept = {h: reply.headers[h] for h in self.keep if h in reply.headers}
            kept_reply = reply if self.keep_replies else None
            shot = Shot(
                g, n, k, req.endpoint, req.batch, req.binary, start, answered, status, outcome, detail, tag, kept, kept_reply
            )
            self.shots.append(shot)
            if self.on_shot is not None and self.on_shot(shot):
                return


def start_load(url: str, pool: Sequence[LoadRequest], **options: Any) -> LoadRun:
    """A load run started in the background (LoadRun's options); join() it."""
    return LoadRun(url, pool, **options).start()


def run_load(url: str, pool: Sequence[LoadRequest], **options: Any) -> list[Shot]:
    """A load run to its end (LoadRun's options): every request's Shot, in send order."""
    return LoadRun(url, pool, **options).start().join()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile of values, nearest rank (0.0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]
