"""Load and fault runs against a running engine: concurrent clients, mixed endpoints and batch sizes, every answer
checked against eager; optionally a worker or replica killed in the middle, with what failed and the time to recover.

The requests go out through the one checked load loop (torchship.verify.load); this module builds the pool (every
endpoint x batch x variant, JSON and binary, each with its eager outputs) and reports the run. Traffic goes to the
target URL only (127.0.0.1 in every launcher here) and each run is bounded by a request count.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torchship.handlers.codec import encode_request
from torchship.reliability.corpus import Oracle, Target, auth_headers
from torchship.verify import load
from torchship.verify.load import LoadRequest, Shot, percentile

#: Batch sizes a load run mixes (each within every zoo endpoint's max_batch_size).
LOAD_BATCHES = (1, 2, 4, 8)
VARIANTS_PER_BATCH = 3
#: How long after a SIGKILL an engine may still hand new requests to the dead process: TorchServe's batch for a
#: worker fills for maxBatchDelay before it is sent, and the frontend learns of the death when the socket closes.
DETECTION_GRACE_S = 1.0
#: Outcomes that count as a failed request in the reports (an answer other than a correct 200, or none at all).
FAILED = ("error", "shed", "refused", "hung")
#: No answer at all: the connection refused or closed, or nothing within the timeout.
LOST = ("refused", "hung")


def make_pool(oracle: Oracle, endpoints: Sequence[str], *, batches: Sequence[int] = LOAD_BATCHES) -> list[LoadRequest]:
    """Pre-encoded requests for every endpoint x batch x variant, JSON then binary, each checked against the eager
    outputs for its inputs (computed here, once)."""
    pool: list[LoadRequest] = []
    for endpoint in endpoints:
        names, tol = oracle.output_names(endpoint), oracle.tolerances[endpoint]
        for batch in batches:
            for variant in range(VARIANTS_PER_BATCH):
                inputs = oracle.inputs(endpoint, batch, seed=batch * 100 + variant)
                check = load.expect_outputs(names, oracle.eager(endpoint, inputs), tol)
                jb, jh = encode_request(inputs)
                bb, bh = encode_request(inputs, binary=True, parameters={"binary_data_output": True})
                pool.append(LoadRequest(endpoint, jb, jh, check, batch=batch))
                pool.append(LoadRequest(endpoint, bb, bh, check, batch=batch, binary=True))
    return pool


def json_requests(pool: Sequence[LoadRequest]) -> list[LoadRequest]:
    return [r for r in pool if not r.binary]


def run_load(
    target: Target,
    pool: Sequence[LoadRequest],
    *,
    requests_total: int | None,
    concurrency: int,
    duration_s: float | None = None,
    seed: int = 0,
    timeout_s: float = 60.0,
    on_done: Callable[[int], None] | None = None,
) -> list[Shot]:
    """`requests_total` requests (or as many as `duration_s` allows) from `concurrency` clients, each a seeded random
    pick of the pool (JSON or binary alike); every 200 is compared with eager. on_done(n) runs after the n-th answer."""
    if requests_total is None and duration_s is None:
        raise ValueError("a load run needs requests_total or duration_s")
    done = 0

    def counted(_shot: Shot) -> bool:
        nonlocal done
        done += 1
        if on_done is not None:
            on_done(done)
        return False

    return load.run_load(
        target.url, pool, clients=concurrency, auth=auth_headers(target), requests_total=requests_total, duration_s=duration_s,
        pick=load.seeded_random(len(pool), seed), timeout_s=timeout_s, on_shot=counted,
    )  # fmt: skip


@dataclass
class LoadSummary:
    engine: str
    requests: int
    concurrency: int
    ok: int
    errors: int
    wrong_answers: int
    lost: int
    duration_s: float
    requests_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    by_endpoint: dict[str, int]
    by_batch: dict[str, int]
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(engine: str, shots: Sequence[Shot], concurrency: int) -> LoadSummary:
    latencies = [s.latency_ms for s in shots]
    duration = max((s.end_s for s in shots), default=0.0) - min((s.start_s for s in shots), default=0.0)
    by_endpoint: dict[str, int] = {}
    by_batch: dict[str, int] = {}
    for s in shots:
        by_endpoint[s.endpoint] = by_endpoint.get(s.endpoint, 0) + 1
        by_batch[str(s.batch)] = by_batch.get(str(s.batch), 0) + 1
    return LoadSummary(
        engine=engine,
        requests=len(shots),
        concurrency=concurrency,
        ok=sum(s.outcome == "ok" for s in shots),
        errors=sum(s.outcome in ("error", "shed") for s in shots),
        wrong_answers=sum(s.outcome == "wrong" for s in shots),
        lost=sum(s.outcome in LOST for s in shots),
        duration_s=round(duration, 3),
        requests_per_s=round(len(shots) / duration, 1) if duration > 0 else 0.0,
        latency_p50_ms=round(percentile(latencies, 0.50), 2),
        latency_p99_ms=round(percentile(latencies, 0.99), 2),
        latency_max_ms=round(max(latencies, default=0.0), 2),
        by_endpoint=dict(sorted(by_endpoint.items())),
        by_batch=dict(sorted(by_batch.items(), key=lambda kv: int(kv[0]))),
        failures=[f"#{s.index} {s.endpoint} b={s.batch}: {s.outcome}: {s.detail}" for s in shots if s.outcome != "ok"][:20],
    )


# -- faults --------------------------------------------------------------------------------------------------------


@dataclass
class FaultResult:
    engine: str
    endpoint: str
    what: str
    killed_pid: int
    replacement_pid: int | None
    requests: int
    failed: int
    #: Requests that were being served (sent before the kill, answered after it): these may fail.
    in_flight_at_kill: int
    #: Failed requests sent after the kill, but before the engine could notice it (within DETECTION_GRACE_S): a
    #: batch that was still filling for the dead worker fails whole. Reported, and allowed.
    failed_sent_after_kill: int
    #: Failed requests that were neither in flight nor inside that window: must be 0.
    failed_not_in_flight: int
    wrong_answers: int
    lost: int
    recovery_s: float | None
    failures: list[str]

    @property
    def recovered(self) -> bool:
        return self.replacement_pid is not None and self.replacement_pid != self.killed_pid and self.recovery_s is not None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "recovered": self.recovered}


def run_fault(
    target: Target,
    pool: Sequence[LoadRequest],
    *,
    endpoint: str,
    what: str,
    find_pid: Callable[[], int | None],
    requests_total: int,
    concurrency: int,
    kill_after: int,
    replacement_timeout_s: float = 180.0,
    seed: int = 1,
) -> FaultResult:
    """A load run during which the process serving `endpoint` is SIGKILLed after `kill_after` answers."""
    old_pid = find_pid()
    if old_pid is None:
        raise RuntimeError(f"{target.engine}: no process found serving {endpoint}")
    kill_at: list[float] = []
    lock = threading.Lock()

    def on_done(done: int) -> None:
        with lock:
            if done < kill_after or kill_at:
                return
            kill_at.append(time.monotonic())
        os.kill(old_pid, signal.SIGKILL)

    shots = run_load(target, pool, requests_total=requests_total, concurrency=concurrency, seed=seed, on_done=on_done)
    if not kill_at:
        raise RuntimeError(f"{target.engine}: the run ended before {kill_after} answers; nothing was killed")
    t_kill = kill_at[0]
    new_pid = _wait_for_new_pid(find_pid, old_pid, replacement_timeout_s)
    failed = [s for s in shots if s.outcome in FAILED]
    in_flight = [s for s in shots if s.start_s <= t_kill <= s.end_s]
    in_flight_ids = {s.index for s in in_flight}
    late = [s for s in failed if s.index not in in_flight_ids]
    after = [s for s in shots if s.endpoint == endpoint and s.outcome == "ok" and s.start_s >= t_kill]
    return FaultResult(
        engine=target.engine,
        endpoint=endpoint,
        what=what,
        killed_pid=old_pid,
        replacement_pid=new_pid,
        requests=len(shots),
        failed=len(failed),
        in_flight_at_kill=len(in_flight),
        failed_sent_after_kill=len(late),
        failed_not_in_flight=sum(s.start_s > t_kill + DETECTION_GRACE_S for s in late),
        wrong_answers=sum(s.outcome == "wrong" for s in shots),
        lost=sum(s.outcome in LOST for s in shots),
        recovery_s=round(min(s.end_s for s in after) - t_kill, 3) if after else None,
        failures=[
            f"#{s.index} {s.endpoint}, sent {(s.start_s - t_kill) * 1000:+.0f} ms after the kill: {s.outcome}: {s.detail}"
            for s in failed
        ][:20],
    )


def _wait_for_new_pid(find_pid: Callable[[], int | None], old_pid: int, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid = find_pid()
        if pid is not None and pid != old_pid:
            return pid
        time.sleep(0.5)
    return None
