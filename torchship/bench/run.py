"""The benchmark run: in-process formats, then TorchServe, then Ray Serve, one after the other on this machine;
reports/bench.json, reports/bench.md and reports/bench/*.png."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchship.archive.build import archive_default_endpoint, load_model_config
from torchship.archive.mar import MarArchive
from torchship.bench.breakdown import CASES, inprocess_ms, measure
from torchship.bench.dashboard import dashboard
from torchship.bench.design import QUICK_VARIANTS, Variant, Workloads, design_space
from torchship.bench.design import VARIANTS as DESIGN_VARIANTS
from torchship.bench.inprocess import LABELS, VARIANTS, Workload, bench_workload
from torchship.bench.observe import observability
from torchship.bench.peers import PEER, RAY_APP, StockRayServe, stock_ray_store, stock_torchserve_archive, wait_answering
from torchship.bench.profile import profile
from torchship.bench.served import (
    BATCHED,
    UNBATCHED,
    bench_store,
    engine,
    first_correct_answer_s,
    make_payloads,
    measure_load,
    spec_payloads,
    tolerance_of,
)
from torchship.cpp.tensor_io import build_cpp, time_cpp
from torchship.engines.base import Engine
from torchship.engines.ray.app import ONGOING_BATCHES
from torchship.errors import TorchshipError
from torchship.export.exporter import export_isolated
from torchship.handlers.core import LOADERS, OPTIMIZE_FOR_INFERENCE
from torchship.handlers.names import MANIFEST_FILE
from torchship.manifest import FORMAT_FILES, read_manifest
from torchship.registry import resolve
from torchship.spec import Tolerance
from torchship.timing import time_call

SCHEMA_VERSION = 1
ENGINES = ("torchserve", "ray")


@dataclass(frozen=True)
class Settings:
    quick: bool
    workloads: tuple[Workload, ...]
    variants: tuple[str, ...]
    min_time_s: float
    min_iters: int
    warmup: int
    sequential_requests: int
    clients: tuple[int, ...]
    load_seconds: float
    large_requests: int
    breakdown_requests: int
    #: Extra endpoints on the same archive whose model config differs in these keys; swept with `sweep_clients`.
    sweep: dict[str, dict[str, int]]
    sweep_clients: tuple[int, ...]
    #: Concurrent clients for the throughput comparison with the stock peers.
    peer_clients: int
    #: Timed runs per case for the C++ loader's rows (0: no C++ rows; `make test` times it in tests/integration).
    cpp_repeat: int
    #: More models served next to simple_cnn (their default endpoints): batch-1 latency and throughput rows.
    served_models: tuple[str, ...]
    #: Ray-only extra endpoints on simple_cnn's archive with other Serve deployment settings, swept like `sweep`.
    ray_sweep: dict[str, dict[str, int]]
    #: Seconds of py-spy sampling per engine under sequential batch-1 traffic (0: no profile).
    profile_seconds: float
    #: Run the ray_sweep in an engine start of its own (its extra replicas stay out of the memory comparison);
    #: otherwise its endpoints join the bench store, for both engines, and the sweep runs in the main Ray start.
    ray_sweep_apart: bool
    #: Serve each stock peer, and the stock handler's archive (a foreign .mar), in an engine start of its own (out of
    #: torchship's memory figure); otherwise they join the engine's main start (TorchServe: the archive beside
    #: torchship's, peer and foreign archive at once; Ray: the peer's app beside torchship's app, the archive in its
    #: store as FOREIGN).
    peers_apart: bool
    #: Batch-1 requests each with metrics on and off for their cost per request (bench/observe.py).
    observe_requests: int = 2000
    #: Draw the Grafana dashboard's panels from a run of each engine's scrapes (bench/dashboard.py; about 70 s).
    dashboard: bool = True
    #: Ray Serve's design space (bench/design.py): each variant in a Ray start of its own, its batch-1 requests and
    #: its loads at `design_clients`.
    design: tuple[Variant, ...] = DESIGN_VARIANTS
    design_requests: int = 200
    design_clients: tuple[int, ...] = (16, 64, 128)
    #: LitServe and PyTriton (bench/peers/outside.py) from a virtual environment of their own, built on first use.
    outside_peers: bool = True


FULL = Settings(
    quick=False,
    workloads=(
        Workload("simple_cnn@32", "simple_cnn", (1, 8, 16, 64), hw=32),
        Workload("simple_cnn@224", "simple_cnn", (1, 8, 16), hw=224),
        Workload("dynamic_router", "dynamic_router", (1, 8, 16, 64)),
    ),
    variants=VARIANTS, min_time_s=0.4, min_iters=10, warmup=3,
    sequential_requests=100, clients=(1, 4, 16, 64, 128), load_seconds=5.0, large_requests=5, breakdown_requests=50,
    sweep={
        "simple_cnn_b8_d5": {"batchSize": 8, "maxBatchDelay": 5},
        "simple_cnn_b8_d20": {"batchSize": 8, "maxBatchDelay": 20},
        "simple_cnn_b8_d1_t1": {"batchSize": 8, "maxBatchDelay": 1, "torchThreads": 1},
        "simple_cnn_q4": {"batchSize": 8, "maxBatchDelay": 1, "jobQueueSize": 4},
    },
    sweep_clients=(1, 16), peer_clients=16, cpp_repeat=10, served_models=("dynamic_router", "seq_decoder"),
    ray_sweep={"simple_cnn_r2": {"num_replicas": 2}, "simple_cnn_mo64": {"max_ongoing_requests": 64}}, profile_seconds=6.0,
    ray_sweep_apart=True, peers_apart=True,
)  # fmt: skip
QUICK = Settings(
    quick=True,
    workloads=(Workload("simple_cnn@32", "simple_cnn", (1, 8), hw=32),),
    variants=("eager", "frozen", "pt2"), min_time_s=0.0, min_iters=3, warmup=1,
    sequential_requests=5, clients=(1, 4), load_seconds=0.5, large_requests=1, breakdown_requests=5,
    sweep={"simple_cnn_q1": {"batchSize": 1, "maxBatchDelay": 0, "jobQueueSize": 1}}, sweep_clients=(1, 4), peer_clients=4,
    cpp_repeat=0, served_models=("dynamic_router",), ray_sweep={"simple_cnn_mo4": {"max_ongoing_requests": 4}},
    profile_seconds=1.0, ray_sweep_apart=False,  # one Ray start fewer (about 20 s of make test)
    peers_apart=False,  # two engine starts fewer (about 20 s): quick's memory figures include the peers
    observe_requests=50,
    dashboard=False,
    design=QUICK_VARIANTS, design_requests=5, design_clients=(4,),
    outside_peers=False,  # a 1.3 GB venv and two more servers: `make bench` only
)  # fmt: skip
#: The stock handler's archive in Ray's main store when the peers join the main starts (PEER is the stock Ray app's).
FOREIGN = f"{PEER}_mar"
#: The served workload: simple_cnn at the seed's 224x224, one image per request.
SERVED_HW = 224
#: The in-process variant that is exactly what an endpoint of each archive format runs.
INPROCESS_VARIANT = {"torchscript": "frozen", "pt2": "pt2", "aoti": "aoti"}
#: The model-config keys the sweep varies (torchThreads 0 = every core the worker may use).
SWEPT_KEYS = ("batchSize", "maxBatchDelay", "torchThreads", "jobQueueSize")
LARGE_SHAPE = (16, 3, 224, 224)


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }


def ensure_exported(artifacts: Path, models: set[str], *, aoti: bool, say: Callable[[str], None]) -> None:
    """Export what this run measures and is missing; AOTInductor (~30 s of C++ per model) only when it is measured."""
    for model in sorted(models):
        if not (artifacts / model / MANIFEST_FILE).is_file():
            say(f"exporting {model}{' (AOTInductor included)' if aoti else ''} into {artifacts}")
            export_isolated(model, out_dir=artifacts, aoti=aoti)


@dataclass(frozen=True)
class ServedRun:
    """What every engine is measured with, built once: the same payloads, answers and in-process baselines."""

    settings: Settings
    tol: Any
    model: Callable[..., torch.Tensor]
    small: list[Any]
    large: dict[str, list[Any]]
    model_config: dict[str, Any]
    baseline1_ms: float
    #: OIP v2 JSON bodies (all the stock peers read): one 3x32x32 and one 3x224x224 image per request.
    json32: list[Any]
    json224: list[Any]
    #: The same forward pass in-process at batch 1, per image size: what the breakdown's overhead is measured from.
    model_ms: dict[int, float]


def cpp_rows(artifacts: Path, repeat: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """simple_cnn at 224x224, batch 1 and 16, from the C++ loader next to the same file in this process."""
    try:
        binary = build_cpp()
    except TorchshipError as exc:
        say(f"C++ loader not built; its rows are left out: {exc}")
        return []
    model_dir = artifacts / "simple_cnn"
    usable = read_manifest(model_dir).usable_formats()
    rows: list[dict[str, Any]] = []
    cpu = torch.device("cpu")
    for fmt in [f for f in ("torchscript", "aoti") if f in usable]:
        path = model_dir / FORMAT_FILES[fmt]
        runner = LOADERS[fmt](str(path), cpu, None)  # the file as it is: what the C++ program runs
        for batch in (1, 16):
            x = torch.randn(batch, 3, SERVED_HW, SERVED_HW, generator=torch.Generator().manual_seed(batch))
            cpp_ms = time_cpp(binary, path, fmt, [(x,)], repeat=repeat)[0]
            with torch.inference_mode():
                py_ms = time_call(lambda: runner(x), min_time_s=0.0, min_iters=repeat, warmup=1).p50_ms  # noqa: B023
            rows.append({"format": fmt, "batch": batch, "cpp_p50_ms": cpp_ms, "python_p50_ms": py_ms})
            say(f"C++ {fmt} batch {batch}: p50 {cpp_ms:.2f} ms (Python, same file: {py_ms:.2f} ms)")
    return rows


def served(settings: Settings, artifacts: Path, say: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="torchship-bench-") as tmp:
        model_config = load_model_config()
        ray_only: dict[str, dict[str, int]] = {variant: {} for variant in settings.ray_sweep}
        store = bench_store(artifacts, Path(tmp) / "store", model_config, {**settings.sweep, **ray_only})
        # Ray's deployment-settings variants (the same archive under other names) go to a store of their own.
        sweep_store = Path(tmp) / "store-ray-sweep"
        sweep_store.mkdir()
        shutil.copyfile(store / f"{BATCHED}.mar", sweep_store / f"{BATCHED}.mar")
        for variant in ray_only if settings.ray_sweep_apart else ():
            shutil.move(store / f"{variant}.mar", sweep_store / f"{variant}.mar")
        extra = add_default_endpoints(settings.served_models, artifacts, store, model_config)
        # What the endpoint serves, loaded as its handler loads it (the manifest's load options included).
        served_mar = MarArchive(store / f"{BATCHED}.mar")
        served_entry = served_mar.manifest["formats"][served_mar.format]
        model = LOADERS[served_mar.format](str(artifacts / "simple_cnn" / served_entry["file"]), torch.device("cpu"),
                                           served_entry.get("options"))  # fmt: skip
        one = (1, 3, SERVED_HW, SERVED_HW)
        # The in-process baseline on the same artifact: batch 1 latency and batch-8 throughput (8 = batchSize).
        x1, x8 = torch.randn(*one), torch.randn(8, 3, SERVED_HW, SERVED_HW)
        with torch.inference_mode():
            base1 = time_call(lambda: model(x1), min_time_s=0.5, min_iters=settings.sequential_requests, warmup=3)
            base8 = time_call(lambda: model(x8), min_time_s=0.5, min_iters=max(5, settings.sequential_requests // 10), warmup=2)
        run = ServedRun(
            settings=settings,
            tol=tolerance_of(store),
            model=model,
            # Binary bodies for latency and throughput (JSON costs ~100 ms per 224x224 image to parse; measured apart).
            small=make_payloads(model, [one] * 8, binary=True),
            large={enc: make_payloads(model, [LARGE_SHAPE], binary=enc == "binary") for enc in ("json", "binary")},
            model_config=model_config,
            baseline1_ms=base1.p50_ms,
            json32=make_payloads(model, [(1, 3, 32, 32)] * 8, binary=False),
            json224=make_payloads(model, [one] * 8, binary=False),
            model_ms={case.hw: inprocess_ms(model, case.hw, settings.breakdown_requests) for case in CASES},
        )
        doc: dict[str, Any] = {
            "workload": f"simple_cnn@{SERVED_HW}, {served_label(served_mar.format, served_entry)}, 1 image per request",
            "format": served_mar.format,
            "load_options": served_entry.get("options", {}),
            "inprocess": {"batch1_p50_ms": base1.p50_ms, "batch1_p99_ms": base1.p95_ms,
                          "batch8_rows_per_s": 8 / (base8.p50_ms / 1000)},
            "engines": {},
        }  # fmt: skip
        model_file = artifacts / "simple_cnn" / "model.torchscript.pt"
        endpoints = len(list(store.glob("*.mar")))
        # Both engines serve the very same store, so that their memory compares; each stock peer and Ray's deployment
        # sweep run in engine starts of their own afterwards (unless the settings join them to the main start).
        sweep_options = {"app_args": {"deployments": settings.ray_sweep}}
        stores = {name: store for name in ENGINES}
        peer_options: dict[str, dict[str, Any]] = {name: {} for name in ENGINES}
        if not settings.peers_apart:
            for name in ENGINES:
                stores[name] = shutil.copytree(store, Path(tmp) / f"store-{name}-with-peers")
            stock_torchserve_archive(model_file, stores["torchserve"], model_config)
            stock_torchserve_archive(model_file, stores["ray"], model_config).rename(stores["ray"] / f"{FOREIGN}.mar")
            ray_peer = {"name": "stock", "app": RAY_APP, "route_prefix": f"/predictions/{PEER}",
                        "args": {"model_store": str(stock_ray_store(model_file, Path(tmp) / "ray-peer-model"))}}  # fmt: skip
            peer_options["ray"] = {"extra_apps": [ray_peer]}
        # The stock handler's archive on both engines, alone in a start of its own when peers run apart (TorchServe's
        # run of it is then also its stock-peer row: the same archive alone in the same kind of start).
        doc["foreign"] = foreign_runs(run, model_file, Path(tmp), say) if settings.peers_apart else {}
        for name in ENGINES:
            say(f"{name}: starting on the bench store ({endpoints} endpoints; {BATCHED}: batching on, {UNBATCHED}: batchSize 1)"
                + ("" if settings.peers_apart else ", with the stock peer"))  # fmt: skip
            sweep_here = name == "ray" and not settings.ray_sweep_apart  # the Ray sweep's endpoints join this start
            options = {**(sweep_options if sweep_here else {}), **peer_options[name]}
            with engine(name, stores[name], Path(tmp) / name, **options) as (running, footprint):
                e = doc["engines"][name] = measure_engine(run, running, footprint, say)
                e["endpoints"] = endpoints
                e["rss_per_endpoint_mib"] = e["rss_mib"] / endpoints
                e["json"] = json_runs(run, running, BATCHED, say, f"{name}: torchship")
                e["models"] = [model_rows(run, running, m, say) for m in extra]
                if settings.profile_seconds:
                    say(f"{name}: py-spy on every Python process, {settings.profile_seconds:.0f} s of sequential requests")
                    e["profile"] = profile(running, f"{running.url}/predictions/{UNBATCHED}", run.small, run.tol,
                                           seconds=settings.profile_seconds)  # fmt: skip
                if sweep_here:
                    e["ray_sweep"] = ray_sweep(run, running, lambda text: say(f"ray: sweep {text}"))
                if not settings.peers_apart:
                    if name == "ray":  # Ray's readiness covers torchship's app only (TorchServe's, every archive)
                        wait_answering(f"{running.url}/predictions/{PEER}")
                        wait_answering(f"{running.url}/predictions/{FOREIGN}")
                    e["peer"] = json_runs(run, running, PEER, say, f"{name}: stock peer (same start)")
                    # On TorchServe the stock peer is that archive: its row is the foreign archive's too.
                    doc["foreign"][name] = dict(e["peer"]) if name == "torchserve" else (
                        json_runs(run, running, FOREIGN, say, f"{name}: foreign archive (same start)"))  # fmt: skip
            if settings.peers_apart and name == "torchserve":
                e["peer"] = {k: v for k, v in doc["foreign"][name].items() if k != "rss_mib"}
            elif settings.peers_apart:
                e["peer"] = peer_runs(run, name, model_file, Path(tmp), say)
        if settings.outside_peers:
            doc["outside"] = outside_runs(run, model_file, Path(tmp), say)
        if settings.design:
            design_store = Path(tmp) / "store-design"
            design_store.mkdir()
            for endpoint in (BATCHED, UNBATCHED):
                shutil.copyfile(store / f"{endpoint}.mar", design_store / f"{endpoint}.mar")
            workloads = Workloads(
                small32=make_payloads(model, [(1, 3, 32, 32)] * 8, binary=True), small224=run.small, tol=run.tol,
                inprocess32_ms=run.model_ms[32], inprocess_batched_rows_per_s=doc["inprocess"]["batch8_rows_per_s"],
                sequential_requests=settings.design_requests, load_seconds=settings.load_seconds,
                clients=settings.design_clients,
            )  # fmt: skip
            doc["design"] = design_space(settings.design, design_store, Path(tmp), workloads, say)
        if settings.ray_sweep and settings.ray_sweep_apart:
            say(f"ray: starting again for the deployment-settings sweep ({', '.join(settings.ray_sweep)})")
            with engine("ray", sweep_store, Path(tmp) / "ray-sweep", **sweep_options) as (running, _):
                doc["engines"]["ray"]["ray_sweep"] = ray_sweep(run, running, lambda text: say(f"ray: sweep {text}"))
        return doc


def outside_runs(run: ServedRun, model_file: Path, tmp: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """LitServe and PyTriton on the same frozen file, with the endpoint's batch size and wait, each as its docs lead a
    user: PyTriton gets the binary bodies torchship gets (Triton's own binary extension), LitServe JSON (what its
    decode_request reads). Sequential batch 1 at 3x32x32, then `peer_clients` clients at 3x224x224, every answer
    checked; each one's throughput against the in-process speed of the file it loads, batched."""
    from torchship.bench.peers.outside import LitServePeer, PyTritonPeer, peers_python, why_not

    batch = int(run.model_config.get("batchSize", 8))
    wait_ms = float(run.model_config.get("maxBatchDelay", 5))
    file_model = torch.jit.load(str(model_file)).eval()
    x8 = torch.randn(batch, 3, SERVED_HW, SERVED_HW)
    with torch.inference_mode():
        timed = time_call(lambda: file_model(x8), min_time_s=0.5, min_iters=5, warmup=2)
    inprocess = {"batch_rows_per_s": batch / (timed.p50_ms / 1000), "batch": batch,
                 "batch1_32_ms": inprocess_ms(file_model, 32, run.settings.breakdown_requests)}  # fmt: skip
    doc: dict[str, Any] = {"inprocess": inprocess, "peers": []}
    try:
        python = peers_python(Path(sys.prefix).parent, say=say)
    except TorchshipError as exc:
        doc["failed"] = why_not(exc)
        say(f"outside peers: not run: {doc['failed']}")
        return doc
    binary32 = make_payloads(file_model, [(1, 3, 32, 32)] * 8, binary=True)
    cores = os.cpu_count() or 1
    configs: list[tuple[str, Callable[[Path], Engine], list[Any], list[Any], str]] = [
        ("LitServe, defaults", lambda w: LitServePeer(model_file, w, python=python, max_batch_size=batch,
                                                      batch_timeout_s=wait_ms / 1000),
         run.json32, run.json224, "JSON"),
        (f"LitServe, workers_per_device={cores} + fast_queue", lambda w: LitServePeer(
            model_file, w, python=python, max_batch_size=batch, batch_timeout_s=wait_ms / 1000,
            workers_per_device=cores, fast_queue=True), run.json32, run.json224, "JSON"),
        ("PyTriton (Triton 2.51), @batch + dynamic batcher", lambda w: PyTritonPeer(
            model_file, w, python=python, max_batch_size=batch, max_queue_delay_us=int(wait_ms * 1000)),
         binary32, run.small, "binary"),
    ]  # fmt: skip
    for i, (label, make, seq_payloads, load_payloads, body) in enumerate(configs):
        try:
            with make(tmp / f"outside-{i}") as peer:
                seq = measure_load(peer.url, None, seq_payloads, run.tol, clients=1, duration_s=600,
                                   max_requests=run.settings.breakdown_requests).summary()  # fmt: skip
                load = measure_load(peer.url, None, load_payloads, run.tol, clients=run.settings.peer_clients,
                                    duration_s=run.settings.load_seconds).summary()  # fmt: skip
        except TorchshipError as exc:
            doc["peers"].append({"peer": label, "failed": why_not(exc)})
            say(f"outside peer {label}: not run: {why_not(exc)}")
            continue
        row = {"peer": label, "body": body, "sequential": seq, "overhead_p50_ms": seq["p50_ms"] - inprocess["batch1_32_ms"],
               "clients": run.settings.peer_clients, "load": load,
               "x_inprocess_batched": load["rows_per_s"] / inprocess["batch_rows_per_s"]}  # fmt: skip
        doc["peers"].append(row)
        say(f"outside peer {label}: batch-1 3x32x32 {body} p50 {seq['p50_ms']:.2f} ms (+{row['overhead_p50_ms']:.2f}); "
            f"{row['clients']} clients {load['rows_per_s']:.1f} img/s = {row['x_inprocess_batched']:.2f}x in-process "
            f"batched; errors {seq['errors'] + load['errors']}, wrong {seq['wrong'] + load['wrong']}")  # fmt: skip
    return doc


@dataclass(frozen=True)
class ExtraModel:
    """A model served next to simple_cnn: its default endpoint, what that serves in-process, and checked payloads."""

    name: str
    format: str
    tol: Any
    binary: list[Any]
    #: The same batch-1 call in this process (p50, ms).
    inprocess_ms: float


def add_default_endpoints(
    models: tuple[str, ...], artifacts: Path, store: Path, model_config: dict[str, Any]
) -> list[ExtraModel]:
    """Archive each model's default endpoint (only) into the bench store."""
    out = []
    for model in models:
        endpoint = archive_default_endpoint(model, artifacts=artifacts, out_dir=store, model_config=model_config)
        mar = MarArchive(endpoint.mar)
        entry = mar.manifest["formats"][mar.format]
        runner = LOADERS[mar.format](str(artifacts / endpoint.model / entry["file"]), torch.device("cpu"), entry.get("options"))
        spec = resolve(endpoint.model)
        inputs = spec.make_inputs(1, serving=True, seed_offset=2000)
        args = tuple(inputs[t.name] for t in spec.inputs)
        with torch.inference_mode():
            ms = time_call(lambda: runner(*args), min_time_s=0.3, min_iters=20, warmup=3).p50_ms  # noqa: B023
        payloads = spec_payloads(spec, runner, 8, binary=True)
        out.append(ExtraModel(endpoint.name, mar.format, Tolerance(*mar.tolerance), payloads, ms))
    return out


def model_rows(run: ServedRun, running: Engine, extra: ExtraModel, say: Callable[[str], None]) -> dict[str, Any]:
    """One more model's default endpoint: sequential batch-1 latency against the same call in-process, and
    throughput at `peer_clients` clients; binary bodies, every answer checked."""
    settings, url = run.settings, f"{running.url}/predictions/{extra.name}"
    seq = measure_load(url, running.token, extra.binary, extra.tol, clients=1, duration_s=600,
                       max_requests=settings.sequential_requests).summary()  # fmt: skip
    load = measure_load(url, running.token, extra.binary, extra.tol, clients=settings.peer_clients,
                        duration_s=settings.load_seconds).summary()  # fmt: skip
    row = {"endpoint": extra.name, "format": extra.format, "inprocess_p50_ms": extra.inprocess_ms,
           "sequential": seq, "clients": settings.peer_clients, "load": load}  # fmt: skip
    row["overhead_p50_ms"] = seq["p50_ms"] - extra.inprocess_ms
    say(f"{running.name}: {extra.name} ({extra.format}) batch 1 p50 {seq['p50_ms']:.2f} ms (in-process "
        f"{extra.inprocess_ms:.2f} ms); {settings.peer_clients} clients {load['rows_per_s']:.1f} rows/s; "
        f"errors {seq['errors'] + load['errors']}, wrong {seq['wrong'] + load['wrong']}")  # fmt: skip
    return row


def ray_sweep(run: ServedRun, running: Engine, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Ray Serve's deployment settings on the same archive and model config: replicas and max_ongoing_requests."""
    batch = int(run.model_config.get("batchSize", 8))
    configs = {BATCHED: {}, **run.settings.ray_sweep}
    settings = {ep: {"num_replicas": 1, "max_ongoing_requests": ONGOING_BATCHES * batch, **o} for ep, o in configs.items()}
    return sweep_rows(run, running.url, running.token, settings, say)


def sweep_rows(
    run: ServedRun, url: str, token: str | None, settings: dict[str, dict[str, Any]], say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Each endpoint under the same load at every swept client count; its settings recorded on its rows."""
    rows: list[dict[str, Any]] = []
    for endpoint, setting in settings.items():
        for clients in run.settings.sweep_clients:
            r = measure_load(f"{url}/predictions/{endpoint}", token, run.small, run.tol, clients=clients,
                             duration_s=run.settings.load_seconds).summary()  # fmt: skip
            r.update(endpoint=endpoint, clients=clients, **setting)
            rows.append(r)
            say(f"{endpoint} {setting}, {clients} clients: {r['rows_per_s']:.1f} img/s, p50 {r['p50_ms']:.1f} ms, "
                f"p99 {r['p99_ms']:.1f} ms, shed (503) {r['shed']}, errors {r['errors']}, wrong {r['wrong']}")  # fmt: skip
    return rows


def foreign_runs(run: ServedRun, model_file: Path, tmp: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """The stock handler's archive, a .mar torchship did not build, alone in an engine start on each engine: TorchServe
    runs it natively, Ray Serve through TorchServe's worker code (docs/migrate.md). The same archive, requests and
    checks on both; each engine's whole process tree's memory."""
    store = tmp / "store-foreign"
    store.mkdir()
    stock_torchserve_archive(model_file, store, run.model_config)
    rows: dict[str, Any] = {}
    for name in ENGINES:
        say(f"{name}: starting the stock handler's archive alone (a foreign archive on {name})")
        with engine(name, store, tmp / f"{name}-foreign") as (running, footprint):
            if name == "ray":  # readiness asks the endpoint's replica; the first request may still be slow
                wait_answering(f"{running.url}/predictions/{PEER}")
            rows[name] = json_runs(run, running, PEER, say, f"{name}: foreign archive")
            rows[name]["rss_mib"] = footprint() / 2**20
            say(f"{name}: foreign archive, {rows[name]['rss_mib']:.0f} MiB resident")
    return rows


def peer_runs(run: ServedRun, name: str, model_file: Path, tmp: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """The stock peer on engine `name`, alone in an engine start of its own, on the same frozen file."""
    if name == "torchserve":
        store = tmp / "store-torchserve-peer"
        store.mkdir()
        stock_torchserve_archive(model_file, store, run.model_config)
        say("torchserve: starting the stock handler's archive on its own")
        with engine(name, store, tmp / "torchserve-peer") as (running, _):
            return json_runs(run, running, PEER, say, "torchserve: stock handler")
    say("ray: starting the stock Ray Serve app on the same TorchScript file")
    with StockRayServe(stock_ray_store(model_file, tmp / "ray-peer-model"), tmp / "ray-peer") as ray_peer:
        return json_runs(run, ray_peer, PEER, say, "ray: stock app")


def json_runs(run: ServedRun, running: Engine, endpoint: str, say: Callable[[str], None], label: str) -> dict[str, Any]:
    """What the peer comparison needs from one endpoint, in OIP v2 JSON: sequential 3x32x32 and concurrent 3x224x224."""
    url = f"{running.url}/predictions/{endpoint}"
    seq = measure_load(url, running.token, run.json32, run.tol, clients=1, duration_s=600,
                       max_requests=run.settings.breakdown_requests).summary()  # fmt: skip
    seq["overhead_p50_ms"] = seq["p50_ms"] - run.model_ms[32]
    clients = run.settings.peer_clients
    load = measure_load(url, running.token, run.json224, run.tol, clients=clients, duration_s=run.settings.load_seconds).summary()
    load["clients"] = clients
    errors, wrong = seq["errors"] + load["errors"], seq["wrong"] + load["wrong"]
    say(f"{label}: JSON 3x32x32 sequential p50 {seq['p50_ms']:.2f} ms (+{seq['overhead_p50_ms']:.2f} ms); JSON "
        f"3x224x224, {clients} clients: {load['rows_per_s']:.1f} img/s; errors {errors}, wrong {wrong}")  # fmt: skip
    return {"sequential_json32": seq, "clients_json224": load}


def served_label(fmt: str, entry: dict[str, Any]) -> str:
    if fmt == "torchscript":
        optimized = entry.get("options", {}).get("optimize") == OPTIMIZE_FOR_INFERENCE
        return "frozen TorchScript" + (f" + {OPTIMIZE_FOR_INFERENCE}" if optimized else "")
    return LABELS.get(fmt, fmt)


def measure_engine(run: ServedRun, running: Engine, footprint: Callable[[], int], say: Callable[[str], None]) -> dict[str, Any]:
    name, url, token, settings, tol = running.name, running.url, running.token, run.settings, run.tol
    assert running.started_at is not None
    cold = first_correct_answer_s(url, token, run.small[0], tol, running.started_at)
    e: dict[str, Any] = {"cold_start_s": cold, "rss_mib": footprint() / 2**20}
    say(f"{name}: first correct answer {cold:.1f} s after launch, {e['rss_mib']:.0f} MiB resident")
    seq = measure_load(f"{url}/predictions/{BATCHED}", token, run.small, tol, clients=1, duration_s=600,
                       max_requests=settings.sequential_requests).summary()  # fmt: skip
    seq["overhead_p50_ms"] = seq["p50_ms"] - run.baseline1_ms
    e["sequential"] = seq
    say(f"{name}: sequential batch 1 p50 {seq['p50_ms']:.2f} ms (+{seq['overhead_p50_ms']:.2f} ms over in-process)")
    e["breakdown"] = []
    for endpoint in (UNBATCHED, BATCHED):
        for case in CASES:
            row = measure(running, endpoint, run.model, case, tol, requests_n=settings.breakdown_requests,
                          baseline_ms=run.model_ms[case.hw])  # fmt: skip
            e["breakdown"].append(row)
            say(f"{name}: {endpoint} {case.label}: client p50 {row['client_ms']:.2f} ms, handler "
                f"{row.get('handler_ms', 0):.2f} ms (model {row.get('model_ms', 0):.2f}), in-process "
                f"{row['inprocess_model_ms']:.2f} ms; wrong {row['wrong']}, errors {row['errors']}")  # fmt: skip
    e["throughput"] = []
    for endpoint in (BATCHED, UNBATCHED):
        for clients in settings.clients:
            r = measure_load(f"{url}/predictions/{endpoint}", token, run.small, tol, clients=clients,
                             duration_s=settings.load_seconds).summary()  # fmt: skip
            r.update(batching=endpoint == BATCHED, clients=clients)
            e["throughput"].append(r)
            say(f"{name}: {clients} clients, batching {'on' if endpoint == BATCHED else 'off'}: {r['rows_per_s']:.1f} "
                f"img/s, p99 {r['p99_ms']:.1f} ms, errors {r['errors']}, wrong {r['wrong']}")  # fmt: skip
    e["sweep"] = sweep(run, url, token, lambda text: say(f"{name}: sweep {text}"))
    e["large_body"] = {}
    for enc, payloads in run.large.items():
        r = measure_load(f"{url}/predictions/{BATCHED}", token, payloads, tol, clients=1, duration_s=600,
                         max_requests=settings.large_requests).summary()  # fmt: skip
        r["body_bytes"] = len(payloads[0].body)
        e["large_body"][enc] = r
        say(f"{name}: 16x3x224x224 as {enc} ({r['body_bytes'] / 2**20:.1f} MiB): p50 {r['p50_ms']:.0f} ms")
    return e


def sweep(run: ServedRun, url: str, token: str | None, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Batching's latency/throughput trade-off: the same archive under each model config, under the same load."""
    configs = {BATCHED: {}, UNBATCHED: {"batchSize": 1, "maxBatchDelay": 0}, **run.settings.sweep}
    settings = {ep: {k: {**run.model_config, **o}.get(k, 0) for k in SWEPT_KEYS} for ep, o in configs.items()}
    return sweep_rows(run, url, token, settings, say)


def _target(text: str, value: float, unit: str, met: bool) -> dict[str, Any]:
    return {"target": text, "value": value, "unit": unit, "met": met}


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, as ratios measured in this run; reported, never asserted."""
    out: list[dict[str, Any]] = []
    srv = doc["served"]
    base = srv["inprocess"]["batch8_rows_per_s"]
    for name, e in srv["engines"].items():
        for t in e["throughput"]:
            if t["batching"] and t["clients"] == 16:
                ratio = t["rows_per_s"] / base
                out.append(_target(f"{name}: 16 clients with batching >= 0.8x in-process batched", ratio, "x", ratio >= 0.8))
        limit = 1.5 if name == "torchserve" else 3.0
        overhead = small_overhead_ms(e)
        if overhead is not None:
            text = f"{name}: per-request overhead p50 <= {limit} ms (batch 1, 3x32x32, binary, batching off)"
            out.append(_target(text, overhead, "ms", overhead <= limit))
        out += peer_targets(name, e)
        batched = [t for t in e["throughput"] if t["batching"]]
        if len(batched) > 1:
            peak, span = max(t["rows_per_s"] for t in batched), f"{batched[0]['clients']}-{batched[-1]['clients']}"
            for t in [t for t in batched if t["clients"] >= 64] or batched[-1:]:
                ratio = t["rows_per_s"] / peak if peak else 0.0
                text = f"{name}: throughput at {t['clients']} clients >= 0.9x the peak over {span}"
                out.append(_target(text, ratio, "x", ratio >= 0.9))
        ratio = e["large_body"]["json"]["p50_ms"] / e["large_body"]["binary"]["p50_ms"]
        out.append(_target(f"{name}: binary >= 3x faster than JSON (16x3x224x224)", ratio, "x", ratio >= 3))
    engines = srv["engines"]
    if {"torchserve", "ray"} <= set(engines):
        ratio = engines["ray"]["rss_mib"] / engines["torchserve"]["rss_mib"]
        out.append(_target("ray: resident memory <= 1.2x TorchServe's for the same store", ratio, "x", ratio <= 1.2))
        ours, theirs = small_overhead_ms(engines["ray"]), small_overhead_ms(engines["torchserve"])
        if ours is not None and theirs is not None:
            text = "ray: per-request overhead <= TorchServe's in the same run (batch 1, 3x32x32, binary, batching off)"
            out.append(_target(text, ours / theirs, "x", ours <= theirs))
    out += outside_targets(srv)
    rows = doc["inprocess"]
    # What the default endpoint serves, in-process, against frozen TorchScript (simple_cnn, 224x224, batch 16).
    at16 = {r["variant"]: r["p50_ms"] for r in rows if r["workload"] == "simple_cnn@224" and r["batch"] == 16}
    variant = INPROCESS_VARIANT.get(srv.get("format", ""))
    if variant == "frozen" and srv.get("load_options", {}).get("optimize") == OPTIMIZE_FOR_INFERENCE:
        variant = "frozen_ofi"
    if variant in at16 and "frozen" in at16:
        speed = at16["frozen"] / at16[variant]
        text = f"simple_cnn@224: the default endpoint's format ({srv['format']}) >= 3x frozen TorchScript at batch 16"
        out.append(_target(text, speed, "x", speed >= 3))
    for label in sorted({r["workload"] for r in rows}):
        by_variant = {r["variant"]: r for r in rows if r["workload"] == label and r["batch"] == 16}
        if "aoti" in by_variant:
            speed = by_variant["aoti"]["speedup_vs_eager"]
            out.append(_target(f"{label}: AOTInductor >= 3x eager at batch 16", speed, "x", speed >= 3))
            if "compile" in by_variant:
                rel = by_variant["aoti"]["p50_ms"] / by_variant["compile"]["p50_ms"]
                out.append(_target(f"{label}: AOTInductor time within 10% of torch.compile", rel, "x", rel <= 1.1))
    return out


def outside_targets(srv: dict[str, Any]) -> list[dict[str, Any]]:
    """torchship on each engine against the best outside peer: 16-client throughput as a multiple of each one's own
    in-process batched speed, and the batch-1 overhead within 1.5x of the best peer's."""
    peers = [p for p in srv.get("outside", {}).get("peers", []) if "failed" not in p]
    if not peers:
        return []
    best_x = max(peers, key=lambda p: p["x_inprocess_batched"])
    best_overhead = min(peers, key=lambda p: p["overhead_p50_ms"])
    base = srv["inprocess"]["batch8_rows_per_s"]
    out = []
    for name, e in srv["engines"].items():
        clients = best_x["clients"]
        ours = next((t["rows_per_s"] / base for t in e["throughput"] if t["batching"] and t["clients"] == clients), None)
        if ours is not None:
            text = f"{name}: {clients} clients, x in-process batched, ahead of every outside peer (best: {best_x['peer']})"
            out.append(_target(text, ours / best_x["x_inprocess_batched"], "x", ours > best_x["x_inprocess_batched"]))
        overhead = small_overhead_ms(e)
        if overhead is not None and best_overhead["overhead_p50_ms"] > 0:
            ratio = overhead / best_overhead["overhead_p50_ms"]
            text = f"{name}: batch-1 overhead within 1.5x of the best outside peer's ({best_overhead['peer']})"
            out.append(_target(text, ratio, "x", ratio <= 1.5))
    return out


def small_overhead_ms(e: dict[str, Any]) -> float | None:
    """An engine's p50 overhead over in-process for a batch-1 3x32x32 binary request with batching off."""
    for row in e.get("breakdown", []):
        if row["endpoint"] == UNBATCHED and row["hw"] == 32 and row["binary"]:
            return float(row["overhead_ms"])
    return None


def observe_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    cost = doc["observe"]["metrics"]["cost_ms"]
    return [_target("metrics cost per batch-1 request (on vs off, in-process) < 0.1 ms", cost, "ms", cost < 0.1)]


def peer_targets(name: str, e: dict[str, Any]) -> list[dict[str, Any]]:
    """torchship against the stock peer on the same engine: our best batch-1 overhead (binary, batching off) against
    the peer's (JSON, all it reads), and our binary throughput against the peer's JSON throughput."""
    peer = e.get("peer")
    if not peer:
        return []
    out = []
    ours = next((r for r in e["breakdown"] if r["endpoint"] == UNBATCHED and r["hw"] == 32 and r["binary"]), None)
    theirs = peer["sequential_json32"]["overhead_p50_ms"]
    if ours is not None and theirs > 0:
        ratio = ours["overhead_ms"] / theirs
        out.append(_target(f"{name}: overhead <= 1/5 of the stock peer's (3x32x32, batch 1)", ratio, "x", ratio <= 0.2))
    clients = peer["clients_json224"]["clients"]
    ours_tp = next((t["rows_per_s"] for t in e["throughput"] if t["batching"] and t["clients"] == clients), None)
    if ours_tp is not None and peer["clients_json224"]["rows_per_s"] > 0:
        ratio = ours_tp / peer["clients_json224"]["rows_per_s"]
        out.append(_target(f"{name}: throughput >= 5x the stock peer's ({clients} clients, 3x224x224)", ratio, "x", ratio >= 5))
    return out


def run(settings: Settings, artifacts: Path, out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    started = time.monotonic()
    models = {w.model for w in settings.workloads} | {"simple_cnn", *settings.served_models}
    ensure_exported(artifacts, models, aoti="aoti" in settings.variants, say=say)
    torch.set_num_threads(os.cpu_count() or 1)
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "quick": settings.quick, "machine": machine(), "inprocess": []}
    for w in settings.workloads:
        doc["inprocess"] += bench_workload(w, artifacts, variants=settings.variants, min_time_s=settings.min_time_s,
                                           min_iters=settings.min_iters, warmup=settings.warmup, progress=say)  # fmt: skip
    doc["cpp"] = cpp_rows(artifacts, settings.cpp_repeat, say) if settings.cpp_repeat else []
    doc["served"] = served(settings, artifacts, say)
    doc["observe"] = observability(artifacts, ("simple_cnn", *settings.served_models), load_model_config(),
                                   requests=settings.observe_requests, say=say)  # fmt: skip
    if settings.dashboard:
        with tempfile.TemporaryDirectory(prefix="torchship-bench-dashboard-") as tmp:
            mar = archive_default_endpoint("simple_cnn", artifacts=artifacts, out_dir=Path(tmp) / "store",
                                           model_config=load_model_config()).mar  # fmt: skip
            doc["dashboard"] = dashboard(mar, Path(tmp) / "run", out / "bench", say)
    doc["targets"] = targets(doc) + observe_targets(doc)
    doc["seconds"] = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    from torchship.bench.report import markdown, plots

    doc["plots"] = [str(p.relative_to(out)) for p in plots(doc, out / "bench")]
    (out / "bench.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (out / "bench.md").write_text(markdown(doc), encoding="utf-8")
    return doc


__all__ = ["FULL", "LABELS", "QUICK", "run"]
