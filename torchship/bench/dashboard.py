"""The Grafana dashboard's panels, drawn from a real run's scrapes without a Grafana or a Prometheus: each engine
serves one endpoint with metrics on while checked load rises (1, 4, 16 clients), the exporter is scraped every
second, and each panel's query is worked out from consecutive scrapes as Prometheus would (rate over the scrape
interval, histogram_quantile over bucket increases)."""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import requests

from torchship.archive.mar import MarArchive
from torchship.engines import engine_class
from torchship.engines.base import free_port
from torchship.handlers.codec import encode_request
from torchship.handlers.metrics import SECONDS_BUCKETS
from torchship.metrics import MetricsServer, format_number, parse_samples, series_key
from torchship.spec import Tolerance
from torchship.verify.load import LoadRequest, expect_outputs, run_load

#: (clients, seconds) of checked load, one after the other.
PHASES = ((1, 8.0), (4, 8.0), (16, 8.0))
SCRAPE_S = 1.0

Scrape = tuple[float, dict[str, float]]


def _pool(archive: MarArchive) -> list[LoadRequest]:
    names, tol = archive.output_names, Tolerance(*archive.tolerance)
    pool = []
    for case in archive.references():
        one = {k: v[:1] for k, v in case["inputs"].items()}
        body, headers = encode_request(one, binary=True, parameters={"binary_data_output": True})
        expected = [case["outputs"][n][:1] for n in names]
        pool.append(LoadRequest(archive.endpoint, body, headers, expect_outputs(names, expected, tol), binary=True))
    return pool


def scrape_run(engine: str, mar: Path, workdir: Path, say: Callable[[str], None]) -> tuple[list[Scrape], dict[str, int]]:
    """Serve `mar` alone on `engine` with metrics on, scrape while the load phases run; the scrapes and the load's
    outcome counts (every answer checked against eager)."""
    store = workdir / "store"
    store.mkdir(parents=True)
    shutil.copyfile(mar, store / mar.name)
    pool = _pool(MarArchive(store / mar.name))
    scrapes: list[Scrape] = []
    outcomes: dict[str, int] = {}
    with engine_class(engine)(store, workdir / "run", metrics_dir=workdir / "metrics") as running:
        exporter = MetricsServer(workdir / "metrics", port=free_port()).start()
        done = threading.Event()

        def scrape() -> None:
            while not done.wait(SCRAPE_S):
                scrapes.append((time.monotonic(), parse_samples(requests.get(exporter.url, timeout=5).text)))

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        try:
            for clients, seconds in PHASES:
                say(f"dashboard: {engine}, {clients} clients for {seconds:g} s")
                for shot in run_load(running.url, pool, clients=clients, duration_s=seconds, auth=running.auth_headers()):
                    outcomes[shot.outcome] = outcomes.get(shot.outcome, 0) + 1
            time.sleep(2 * SCRAPE_S)  # the last snapshots reach a scrape
        finally:
            done.set()
            scraper.join()
            exporter.close()
    return scrapes, outcomes


def _value(samples: Mapping[str, float], name: str, **labels: str) -> float:
    return samples.get(series_key(name, labels), 0.0)


def _quantile(q: float, increases: list[float]) -> float:
    """histogram_quantile over bucket increases (not cumulative; SECONDS_BUCKETS then +Inf), linear inside a bucket."""
    total = sum(increases)
    if total <= 0:
        return float("nan")
    rank, below, lower = q * total, 0.0, 0.0
    for bound, count in zip((*SECONDS_BUCKETS, float("inf")), increases, strict=True):
        if below + count >= rank:
            return bound if bound == float("inf") else lower + (bound - lower) * (rank - below) / max(count, 1e-12)
        below, lower = below + count, bound
    return lower


def panels(scrapes: list[Scrape], endpoint: str) -> dict[str, list[tuple[float, float]]]:
    """Each panel's series (seconds since the first scrape, value), for one endpoint."""
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in ("rps", "p50_handler", "p99_handler", "p99_model",
                                                                 "batch", "parity_ok", "worst_abs")}  # fmt: skip
    start = scrapes[0][0] if scrapes else 0.0
    for (t0, before), (t1, after) in itertools.pairwise(scrapes):
        dt, at = t1 - t0, t1 - start
        answered = _value(after, "torchship_requests_total", code="200", endpoint=endpoint)
        out["rps"].append((at, (answered - _value(before, "torchship_requests_total", code="200", endpoint=endpoint)) / dt))
        for stage, q, key in (("handler", 0.5, "p50_handler"), ("handler", 0.99, "p99_handler"), ("model", 0.99, "p99_model")):
            increases = []
            for bound in (*SECONDS_BUCKETS, float("inf")):
                le = "+Inf" if bound == float("inf") else _le(bound)
                labels = {"endpoint": endpoint, "le": le, "stage": stage}
                increases.append(_value(after, "torchship_stage_seconds_bucket", **labels)
                                 - _value(before, "torchship_stage_seconds_bucket", **labels))  # fmt: skip
            cells = [increases[0]] + [b - a for a, b in itertools.pairwise(increases)]
            out[key].append((at, _quantile(q, cells) * 1000.0))
        batches = _value(after, "torchship_batch_requests_count", endpoint=endpoint) - _value(
            before, "torchship_batch_requests_count", endpoint=endpoint
        )
        served = _value(after, "torchship_batch_requests_sum", endpoint=endpoint) - _value(
            before, "torchship_batch_requests_sum", endpoint=endpoint
        )
        out["batch"].append((at, served / batches if batches else float("nan")))
        out["parity_ok"].append((at, _value(after, "torchship_parity_ok", endpoint=endpoint)))
        out["worst_abs"].append((at, _value(after, "torchship_parity_worst_abs_diff", endpoint=endpoint)))
    return out


def _le(bound: float) -> str:
    return format_number(bound)


TITLES = {
    "rps": "Requests per second (200)",
    "p50_handler": "p50 handler ms",
    "p99_handler": "p99 handler ms",
    "p99_model": "p99 model ms",
    "batch": "Requests per batch (mean)",
    "parity_ok": "Parity ok (min over replicas)",
    "worst_abs": "Parity: worst |served - eager|",
}


def dashboard(mar: Path, workdir: Path, out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Both engines' runs, the panels plotted side by side into out/dashboard.png; the load's outcomes per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    endpoint = mar.stem
    series, outcomes = {}, {}
    for engine in ("torchserve", "ray"):
        scrapes, outcomes[engine] = scrape_run(engine, mar, workdir / engine, say)
        series[engine] = panels(scrapes, endpoint)
    fig, axes = plt.subplots(2, 4, figsize=(18, 7))
    for ax, (key, title) in zip(axes.flat, TITLES.items(), strict=False):
        for engine, panel in series.items():
            ax.plot([t for t, _ in panel[key]], [v for _, v in panel[key]], label=engine)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("s")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    axes.flat[-1].axis("off")
    axes.flat[-1].text(0, 0.5, f"{endpoint}: checked load at {', '.join(str(c) for c, _ in PHASES)} clients,\n"
                       f"{PHASES[0][1]:g} s each; scraped every {SCRAPE_S:g} s", fontsize=10)  # fmt: skip
    fig.suptitle("torchship dashboard panels from a real run (deploy/k8s/overlays/monitoring)")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "dashboard.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return {"endpoint": endpoint, "outcomes": outcomes, "plot": str(path)}
