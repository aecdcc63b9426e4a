"""torchship's serving metrics, kept by each worker or replica process and written as one small JSON snapshot file
into TORCHSHIP_METRICS_DIR, which `torchship metrics` (torchship/metrics.py) sums into Prometheus text.

stdlib only: it travels inside every .mar, so TorchServe's workers and Ray's replicas count with the same code and
the same names. The request path only adds to dicts; a daemon thread writes the snapshot (atomically, at most every
FLUSH_INTERVAL_S, at once for load-time events, and every HEARTBEAT_S while idle), so a scrape never waits on a
worker and a worker never waits on a scrape. Without TORCHSHIP_METRICS_DIR nothing is kept at all.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .names import METRICS_DIR_ENV

#: Seconds between a worker's snapshot writes while it is serving; a scrape sees a request at most this late.
FLUSH_INTERVAL_S = 0.5
#: Seconds between writes of an idle process: a snapshot older than STALE_AFTER_S is a process that is gone, whose
#: gauges (parity) the exporter drops while its counters still count.
HEARTBEAT_S = 10.0
STALE_AFTER_S = 3 * HEARTBEAT_S
#: Histogram bucket bounds, in seconds (per-stage latency) and in requests (batch sizes).
SECONDS_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)

# -- the metric names (the exporter writes their HELP lines from the same table) ---------------------------------
REQUESTS = "torchship_requests_total"
STAGE_SECONDS = "torchship_stage_seconds"
BATCH_REQUESTS = "torchship_batch_requests"
SHED = "torchship_shed_total"
LOAD_REFUSALS = "torchship_load_refusals_total"
PARITY_OK = "torchship_parity_ok"
PARITY_WORST_ABS = "torchship_parity_worst_abs_diff"
PARITY_CHECKED = "torchship_parity_checked_timestamp_seconds"
PARITY_CHECKS = "torchship_parity_checks_total"

#: name -> (Prometheus type, help); gauges are per process and combined by the exporter as the table in
#: torchship/metrics.py says (the worst replica wins).
METRICS: Mapping[str, tuple[str, str]] = {
    REQUESTS: ("counter", "Requests the endpoint answered, by HTTP status code."),
    STAGE_SECONDS: (
        "histogram",
        "Seconds a request spent in each stage: decode, model (its batch), encode, handler (its whole batch call).",
    ),
    BATCH_REQUESTS: ("histogram", "Requests per batch the engine handed the endpoint."),
    SHED: ("counter", "Requests turned away with 503 before the model (queue full, draining)."),
    LOAD_REFUSALS: ("counter", "Loads refused (TORCHSHIP-LOAD-REFUSED), by reason."),
    PARITY_OK: ("gauge", "1 when every replica's last reference check was within tolerance, else 0."),
    PARITY_WORST_ABS: ("gauge", "Largest |served - eager| any replica saw in its last reference check."),
    PARITY_CHECKED: ("gauge", "Unix time of the oldest replica's last reference check."),
    PARITY_CHECKS: ("counter", "Reference checks run, by result (ok or failed)."),
}

Labels = tuple[tuple[str, str], ...]


def _labels(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


def bucket_bounds(name: str) -> tuple[float, ...]:
    """A histogram's upper bounds (without +Inf): requests for batch sizes, seconds for everything else."""
    return BATCH_BUCKETS if name == BATCH_REQUESTS else SECONDS_BUCKETS


class Metrics:
    """One process's counters, histograms and gauges, and the thread that writes them to `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        #: One writer at a time (the background thread, or a flush from the request path): a snapshot is never
        #: renamed over a newer one, and two writers never share the temp file.
        self._write_lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}
        self._histograms: dict[tuple[str, Labels], list[float]] = {}  # bucket counts..., then sum, then count
        self._gauges: dict[tuple[str, Labels], float] = {}
        self._dirty = threading.Event()
        self._writer: threading.Thread | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], endpoint: str) -> Metrics | None:
        """This process's metrics for `endpoint`, or None when TORCHSHIP_METRICS_DIR is not set (metrics off)."""
        folder = environ.get(METRICS_DIR_ENV, "").strip()
        if not folder:
            return None
        Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(Path(folder) / f"{endpoint}.{os.getpid()}.json")

    # -- recording (the request path: dict updates under a lock, no I/O) ---------------------------------------------

    def count(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, _labels(**labels))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + value
        self._dirty.set()

    def observe(self, name: str, values: Iterable[float], **labels: str) -> None:
        bounds = bucket_bounds(name)
        key = (name, _labels(**labels))
        with self._lock:
            cells = self._histograms.setdefault(key, [0.0] * (len(bounds) + 2))
            for value in values:
                for i, bound in enumerate(bounds):
                    if value <= bound:
                        cells[i] += 1
                        break
                cells[-2] += value
                cells[-1] += 1
        self._dirty.set()

    def shed(self, endpoint: str, n: int = 1) -> None:
        """Requests answered 503 before the model (a full queue, a drain, a replica without parity): counted as
        answered with 503 and as shed."""
        self.count(REQUESTS, n, endpoint=endpoint, code="503")
        self.count(SHED, n, endpoint=endpoint)

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges[(name, _labels(**labels))] = value
        self._dirty.set()

    # -- writing ----------------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything recorded so far (histogram buckets not cumulative; the exporter accumulates them)."""
        with self._lock:
            return {
                "pid": os.getpid(),
                "written": time.time(),
                "counters": [[n, dict(lb), v] for (n, lb), v in self._counters.items()],
                "histograms": [[n, dict(lb), list(c)] for (n, lb), c in self._histograms.items()],
                "gauges": [[n, dict(lb), v] for (n, lb), v in self._gauges.items()],
            }

    def flush(self) -> None:
        """Write the snapshot now (temp file + rename: a reader sees the old or the new file, never half of one)."""
        with self._write_lock:
            self._dirty.clear()
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            try:
                tmp.write_text(json.dumps(self.snapshot()), encoding="utf-8")
                tmp.replace(self.path)
            except OSError:
                self._dirty.set()  # a full or vanished folder costs metrics, never a request; tried again next round

    def start(self) -> None:
        """Write now and then keep writing in the background while anything changed (idempotent)."""
        self.flush()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="torchship-metrics", daemon=True)
            self._writer.start()

    def _write_loop(self) -> None:
        while True:
            if self._dirty.wait(timeout=HEARTBEAT_S):
                time.sleep(FLUSH_INTERVAL_S)  # one write for every request of the next half second
            self.flush()
