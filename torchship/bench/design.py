"""Ray Serve's design space, side by side in one run: today's two-hop app behind Serve's proxy, Ray 2.60's
throughput settings one by one, direct ingress, HAProxy, and a one-hop app, each in a Ray start of its own on the
same two endpoints, with the same checked requests. What docs/benchmarks.md's design table and the default come from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from torchship.bench.served import BATCHED, UNBATCHED, Payload, engine, measure_load
from torchship.engines.ray.launcher import RayServe
from torchship.reliability.run import listening_addresses, process_tree
from torchship.settings import RAY_SERVE_DEFAULTS

#: Today's settings before this table: every Ray Serve default, Serve's proxy in front.
STOCK = {name: "0" for name in RAY_SERVE_DEFAULTS}


@dataclass(frozen=True)
class Variant:
    label: str
    #: Ray Serve settings for the whole Ray start (environment variables every Ray process reads).
    env: dict[str, str]
    note: str
    #: The application builder; the one-hop app is the bench's own (bench/one_hop.py).
    app: str = "torchship.engines.ray.app:app"
    #: Send requests to the ingress replica's own port (direct ingress without HAProxy: the engine's port is still
    #: Serve's proxy, and the replica's port is picked by Ray from its range).
    replica_port: bool = False
    #: torchship's default (settings.RAY_SERVE_DEFAULTS on the torchship app).
    default: bool = False


THROUGHPUT = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
HAPROXY = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
ONE_HOP = "torchship.bench.one_hop:app"
#: The throughput bundle behind Serve's proxy, reached as a user without an HAProxy binary reaches it: torchship's
#: defaults, and the child falls back (launcher.apply_serve_settings) and says so (the row's notes).
NO_HAPROXY_BINARY = Variant(
    "throughput bundle, Serve's proxy (no HAProxy binary)",
    {**RAY_SERVE_DEFAULTS, "RAY_SERVE_HAPROXY_BINARY_PATH": "/nonexistent/haproxy"},
    "what `serve ray` falls back to without HAProxy: RAY_SERVE_THROUGHPUT_OPTIMIZED=1 behind Serve's proxy",
)
VARIANTS = (
    Variant("two-hop, Serve's proxy (before)", STOCK, "proxy -> ingress -> endpoint replica; Ray's defaults"),
    Variant("+ user code on the replica's loop", {**STOCK, "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"},
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0"),
    Variant("+ router on the caller's loop", {**STOCK, "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"},
            "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0"),
    Variant("+ request-log buffer", {**STOCK, "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"},
            "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1000"),
    Variant("+ gRPC between replicas", {**STOCK, "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}, "RAY_SERVE_USE_GRPC_BY_DEFAULT=1"),
    NO_HAPROXY_BINARY,
    Variant("direct ingress", {**STOCK, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
            "the ingress replica's own port (Ray picks it from 30000-31000)", replica_port=True),
    Variant("throughput bundle, direct ingress", {**STOCK, **THROUGHPUT},
            "RAY_SERVE_THROUGHPUT_OPTIMIZED=1, the ingress replica's own port", replica_port=True),
    Variant("HAProxy", {**STOCK, **HAPROXY}, "RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy on the engine's port"),
    Variant("HAProxy + throughput bundle (default)", dict(RAY_SERVE_DEFAULTS), "torchship's default", default=True),
    Variant("one-hop app, Serve's proxy", STOCK, "the ingress runs the endpoint's core (bench/one_hop.py)", app=ONE_HOP),
    Variant("one-hop app + throughput bundle, HAProxy", dict(RAY_SERVE_DEFAULTS), "the same, with torchship's default settings",
            app=ONE_HOP),
)  # fmt: skip
#: The main run serves the default; make test's row runs a variant's own settings, the fallback a user without HAProxy
#: gets (checked answers through Serve's proxy, and the note `serve ray` prints).
QUICK_VARIANTS = (NO_HAPROXY_BINARY,)


@dataclass(frozen=True)
class Workloads:
    """The requests every variant gets: batch-1 3x32x32 (overhead) and 3x224x224 (throughput), binary bodies."""

    small32: list[Payload]
    small224: list[Payload]
    tol: Any
    inprocess32_ms: float
    inprocess_batched_rows_per_s: float
    sequential_requests: int
    load_seconds: float
    clients: tuple[int, ...]


def replica_url(root_pid: int) -> str:
    """The HTTP port a direct-ingress replica of this Ray listens on (127.0.0.1, Ray's 30000-31000 range)."""
    for address in listening_addresses(process_tree(root_pid)):
        host, port = address.rsplit(":", 1)
        if host == "127.0.0.1" and 30000 <= int(port) <= 31000:
            return f"http://{address}"
    raise RuntimeError("no direct-ingress replica port found among this Ray's processes")


def process_rss_mib(root_pid: int) -> dict[str, float]:
    """Resident MiB per process of the tree, by process title (summed where titles repeat)."""
    out: dict[str, float] = {}
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            cmd = p.cmdline()
            title = cmd[0] if cmd and cmd[0].startswith("ray::") else p.name()
            title = title.split(".")[0] if title.startswith("ray::") else title
            out[title] = out.get(title, 0.0) + p.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def measure_variant(variant: Variant, store: Path, workdir: Path, w: Workloads, say: Callable[[str], None]) -> dict[str, Any]:
    say(f"ray design: {variant.label}: starting")
    with engine("ray", store, workdir, app=variant.app, serve_env=variant.env) as (running, footprint):
        url = replica_url(running.pid) if variant.replica_port else running.url
        seq = measure_load(f"{url}/predictions/{UNBATCHED}", running.token, w.small32, w.tol, clients=1, duration_s=600,
                           max_requests=w.sequential_requests).summary()  # fmt: skip
        row: dict[str, Any] = {"variant": variant.label, "note": variant.note, "env": variant.env, "app": variant.app,
                               "default": variant.default,
                               "overhead_p50_ms": seq["p50_ms"] - w.inprocess32_ms, "sequential": seq, "load": []}  # fmt: skip
        for clients in w.clients:
            r = measure_load(f"{url}/predictions/{BATCHED}", running.token, w.small224, w.tol, clients=clients,
                             duration_s=w.load_seconds).summary()  # fmt: skip
            r["clients"] = clients
            row["load"].append(r)
        row["rss_mib"] = footprint() / 2**20
        row["processes_mib"] = process_rss_mib(running.pid)
        row["notes"] = running.notes() if isinstance(running, RayServe) else []
    peak = max(r["rows_per_s"] for r in row["load"]) or 1.0
    for r in row["load"]:
        r["x_inprocess_batched"] = r["rows_per_s"] / w.inprocess_batched_rows_per_s
        r["x_own_peak"] = r["rows_per_s"] / peak
    loads = ", ".join(f"{r['clients']} clients {r['rows_per_s']:.0f} img/s ({r['x_own_peak']:.2f}x peak)" for r in row["load"])
    bad = sum(s["errors"] + s["wrong"] for s in [seq, *row["load"]])
    say(f"ray design: {variant.label}: batch-1 p50 {seq['p50_ms']:.2f} ms (+{row['overhead_p50_ms']:.2f}); {loads}; "
        f"{row['rss_mib']:.0f} MiB; errors+wrong {bad}")  # fmt: skip
    return row


def design_space(
    variants: tuple[Variant, ...], store: Path, tmp: Path, w: Workloads, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Every variant in a Ray start of its own, one after the other; a variant that cannot start is reported."""
    rows = []
    for i, variant in enumerate(variants):
        try:
            rows.append(measure_variant(variant, store, tmp / f"ray-design-{i}", w, say))
        except Exception as exc:  # one variant failing to start is a row of the table, not the end of the run
            say(f"ray design: {variant.label}: failed: {type(exc).__name__}: {exc}")
            rows.append({"variant": variant.label, "note": variant.note, "failed": f"{type(exc).__name__}: {exc}"[:300]})
    return rows
