"""The metrics exporter: every worker's and replica's snapshot in a TORCHSHIP_METRICS_DIR (handlers/metrics.py) summed
into one Prometheus text page, served at http://HOST:PORT/metrics; the same names and labels on both engines.

Counters and histograms are summed over every snapshot, those of processes that are gone included (a counter never
goes back when a worker restarts). Gauges come only from live processes (a snapshot written within STALE_AFTER_S),
combined so the worst replica shows: parity ok is the minimum, the worst difference the maximum, the time of the
last check the oldest.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from torchship.handlers.metrics import (
    METRICS,
    PARITY_CHECKED,
    PARITY_OK,
    PARITY_WORST_ABS,
    STALE_AFTER_S,
    bucket_bounds,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: How the gauges of several live replicas of one endpoint combine into one sample.
GAUGE_COMBINE: Mapping[str, Callable[[float, float], float]] = {PARITY_OK: min, PARITY_WORST_ABS: max, PARITY_CHECKED: min}

Key = tuple[str, tuple[tuple[str, str], ...]]


def _key(name: str, labels: Mapping[str, Any]) -> Key:
    return name, tuple(sorted((str(k), str(v)) for k, v in labels.items()))


def read_snapshots(folder: Path) -> Iterator[dict[str, Any]]:
    """Every readable snapshot in folder (a file being replaced or half-written elsewhere is skipped this time)."""
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            yield doc


def collect(folder: Path, *, now: float | None = None) -> str:
    """The Prometheus text exposition of every snapshot in folder."""
    now = time.time() if now is None else now
    counters: dict[Key, float] = {}
    histograms: dict[Key, list[float]] = {}
    gauges: dict[Key, float] = {}
    for doc in read_snapshots(folder):
        for name, labels, value in doc.get("counters", []):
            key = _key(name, labels)
            counters[key] = counters.get(key, 0.0) + float(value)
        for name, labels, cells in doc.get("histograms", []):
            key = _key(name, labels)
            total = histograms.setdefault(key, [0.0] * len(cells))
            for i, cell in enumerate(cells):
                total[i] += float(cell)
        if now - float(doc.get("written", 0.0)) > STALE_AFTER_S:
            continue
        for name, labels, value in doc.get("gauges", []):
            key = _key(name, labels)
            combine = GAUGE_COMBINE.get(name, max)
            gauges[key] = combine(gauges[key], float(value)) if key in gauges else float(value)
    lines: list[str] = []
    for name, (kind, help_text) in METRICS.items():
        if kind == "counter":
            samples = [(k, v) for k, v in counters.items() if k[0] == name]
        elif kind == "gauge":
            samples = [(k, v) for k, v in gauges.items() if k[0] == name]
        else:
            samples = []
        cells = sorted((k, c) for k, c in histograms.items() if k[0] == name)
        if not samples and not cells:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{format_labels(labels)} {format_number(value)}" for (_, labels), value in sorted(samples)]
        for (_, labels), counts in cells:
            lines += _histogram_lines(name, labels, counts)
    return "\n".join(lines) + "\n" if lines else ""


def _histogram_lines(name: str, labels: tuple[tuple[str, str], ...], cells: list[float]) -> list[str]:
    bounds = bucket_bounds(name)
    out, running = [], 0.0
    for bound, count in zip(bounds, cells, strict=False):
        running += count
        out.append(f"{name}_bucket{format_labels((*labels, ('le', format_number(float(bound)))))} {format_number(running)}")
    total_sum, total_count = cells[-2], cells[-1]
    out.append(f"{name}_bucket{format_labels((*labels, ('le', '+Inf')))} {format_number(total_count)}")
    out.append(f"{name}_sum{format_labels(labels)} {format_number(total_sum)}")
    out.append(f"{name}_count{format_labels(labels)} {format_number(total_count)}")
    return out


def format_labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def series_key(name: str, labels: Mapping[str, str]) -> str:
    """`name{a="1",b="2"}` as the exporter writes that series (labels sorted, a bucket's `le` last): a key into
    parse_samples()."""
    ordered = sorted((k, v) for k, v in labels.items() if k != "le")
    if "le" in labels:
        ordered.append(("le", labels["le"]))
    return name + format_labels(tuple(ordered))


def parse_samples(text: str) -> dict[str, float]:
    """{`name{labels}`: value} of a Prometheus text page (tests and the bench read the exporter with it)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            samples[series] = float(value)
    return samples


class MetricsServer:
    """`GET /metrics` over the snapshots in a folder, on a thread of this process; `close()` stops it."""

    def __init__(self, folder: Path, *, port: int, host: str = "127.0.0.1") -> None:
        self.folder = folder
        self.host = host
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                body = collect(exporter.folder).encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # a scrape every few seconds is not news
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="torchship-metrics-exporter", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.server.server_port}/metrics"

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
