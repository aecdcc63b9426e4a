"""`torchship serve` and `torchship verify`: a model store on an engine, and its answers checked against eager."""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from torchship.cli.common import cross_table, interrupt, verify_table
from torchship.engines.base import DRAIN_WINDOW_S
from torchship.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def cmd_serve(args: argparse.Namespace, out: Console, err: Console) -> int:
    import os
    import signal
    import tempfile

    from torchship.engines import engine_class
    from torchship.engines.ray.launcher import RayServe
    from torchship.engines.torchserve.launcher import TorchServe
    from torchship.handlers.names import TOKEN_ENV
    from torchship.metrics import MetricsServer

    signal.signal(signal.SIGTERM, interrupt)
    model_store = Path(args.model_store)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix=f"torchship-{args.engine}-"))
    token = os.environ.get(TOKEN_ENV) or None
    extra: dict[str, Any] = {"token": token, "grpc_port": args.grpc_port} if args.engine == "ray" else {}
    if args.grpc_port is not None and args.engine != "ray":
        err.print("[red]error:[/] --grpc-port serves OIP gRPC on the Ray app only (see docs/rest.md, gRPC)")
        return EXIT_USAGE
    engine = engine_class(args.engine)(
        model_store,
        workdir,
        port=args.port,
        max_request_bytes=args.max_request_bytes,
        ready_timeout_s=args.ready_timeout_s,
        verify_key=Path(args.verify_key) if args.verify_key else None,
        drain_window_s=args.drain_window_s,
        metrics_dir=workdir / "metrics" if args.metrics_port is not None else None,
        **extra,
    )
    label = {"torchserve": "TorchServe", "ray": "Ray Serve"}[args.engine]

    def reload(_signum: int, _frame: object) -> None:
        """SIGHUP: a gated rollout of the store as it now is (Ray); TorchServe rolls versions through its own API."""
        if engine.name == "ray" and engine.running():
            err.print("SIGHUP: rolling the model store out (candidate, parity gate, then the switch); see the engine log")
            os.kill(engine.pid, signal.SIGHUP)
        else:
            err.print("SIGHUP: TorchServe rolls a new version out through its management API (docs/reliability.md)")

    signal.signal(signal.SIGHUP, reload)
    try:
        err.print(f"starting {label} with {len(engine.endpoints)} endpoints; log: {escape(str(engine.log_path))}")
        engine.start()
        out.print(f"{label} ready at {engine.url}  (endpoints: {', '.join(engine.endpoints)})")
        for line in engine.refused.values():  # the rest of the store serves without these
            err.print(f"[yellow]refused:[/] {escape(line)}")
        if isinstance(engine, TorchServe) and engine.token_auth:
            out.print(f"inference token: {escape(str(engine.key_file))} (key 'inference'; send 'Authorization: Bearer <key>')")
        else:
            out.print(f"inference token: {'$' + TOKEN_ENV if token else f'none (set {TOKEN_ENV} to require one)'}")
        if engine.metrics_dir is not None:
            exporter = MetricsServer(engine.metrics_dir, port=args.metrics_port).start()
            out.print(f"metrics (Prometheus text, the same names on both engines): {exporter.url}")
        notes = engine.notes() if isinstance(engine, RayServe) else []
        for note in notes:
            err.print(f"[yellow]note:[/] {escape(note)}")
        if isinstance(engine, RayServe) and engine.grpc_port:
            out.print(f"OIP gRPC (inference.GRPCInferenceService) on port {engine.grpc_port}")
            # Ray 2.60's gRPC servers take no host: its gRPC proxy (no HAProxy) binds [::]:<port>, and behind HAProxy
            # (which binds 127.0.0.1:<port>) the ingress replica's own gRPC server binds [::] on a port from its range.
            where = (
                "Ray's gRPC proxy listens on every interface, not only 127.0.0.1"
                if notes
                else "the ingress replica's own gRPC server, which HAProxy forwards to, listens on every interface "
                "(a port from Ray's 40000-41000 range)"
            )
            err.print(
                f"[yellow]note:[/] {where}"
                + ("" if token else f"; with no {TOKEN_ENV}, anyone who reaches the port can run inference")
            )
        out.print("Ctrl-C or SIGTERM drains it (finishes what it accepted) and stops it; a second one stops it at once.")
        while engine.running():
            time.sleep(0.5)
        code = engine.process.returncode if engine.process else None
        err.print(f"[red]{label} exited with code {code}[/]\n{escape(engine.log_tail())}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        if engine.running():
            err.print(f"draining {label}: answering for {engine.drain_window_s:g} s more, then finishing what it accepted")
            engine.drain()
        err.print(f"stopped {label}")
        return EXIT_OK
    finally:
        engine.stop()


def cmd_metrics(args: argparse.Namespace, out: Console, err: Console) -> int:
    from torchship.metrics import MetricsServer

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    exporter = MetricsServer(folder, port=args.port, host=args.host).start()
    out.print(f"serving the metrics in {escape(str(folder))} at {exporter.url}; Ctrl-C or SIGTERM stops it")
    signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        exporter.close()


def cmd_migrate(args: argparse.Namespace, out: Console, err: Console) -> int:
    from torchship.migrate import migrate, write_report

    model_store = Path(args.model_store)
    if not model_store.is_dir():
        err.print(f"[red]error:[/] no model store {escape(str(model_store))}")
        return EXIT_USAGE
    requests = Path(args.requests) if args.requests else None
    if requests is None:
        err.print("no --requests: sending torchship archives' own reference inputs (foreign archives need requests)")
    ray_store = Path(args.ray_model_store) if args.ray_model_store else None
    result = migrate(
        model_store, requests, ray_model_store=ray_store, atol=args.atol, progress=lambda line: err.print(escape(line))
    )
    for model in result.unsent:
        err.print(f"[yellow]not compared:[/] {model}: no requests for it (pass --requests with a {model}/ folder)")
    json_path, md_path = write_report(result, Path(args.report), model_store=model_store, atol=args.atol)
    for row in result.rows:
        if row.differences:
            out.print(f"[red]differs:[/] {row.model}/{row.request} ({row.mode}): {escape('; '.join(row.differences))}")
    same = len(result.rows) - result.differences
    out.print(f"{same}/{len(result.rows)} answers the same on TorchServe and Ray Serve")
    out.print(f"report: {escape(str(md_path))}, {escape(str(json_path))}")
    return EXIT_OK if result.passed else EXIT_FAILED


def cmd_verify(args: argparse.Namespace, out: Console, err: Console) -> int:
    from torchship.verify.client import token_from_key_file
    from torchship.verify.compare import verify, write_verify_report

    if args.engine == "all":
        return _verify_all(args, out, err)
    if not args.url:
        err.print("[red]error:[/] --url is required for a single engine (or use --engine all to start both)")
        return EXIT_USAGE
    token = args.token or (token_from_key_file(Path(args.token_file)) if args.token_file else None)
    rows = verify(args.engine, args.url, token=token, model_store=Path(args.model_store), endpoints=args.endpoint or None)
    out.print(verify_table(rows))
    report = Path(args.report or f"reports/verify-{args.engine}.json")
    write_verify_report(rows, report, engine=args.engine, url=args.url)
    failed = [r for r in rows if not r.passed]
    out.print(f"{len(rows) - len(failed)}/{len(rows)} checks passed; report: {escape(str(report))}")
    return EXIT_FAILED if failed else EXIT_OK


def _verify_all(args: argparse.Namespace, out: Console, err: Console) -> int:
    from torchship.pipeline import serve_and_verify, write_reports
    from torchship.verify.compare import cross_engine

    ts_rows, ray_rows = serve_and_verify(Path(args.model_store), lambda line: err.print(escape(line)))
    cross = cross_engine(ts_rows, ray_rows)
    out.print(cross_table(cross))
    write_reports(Path(args.report or "reports"), ts_rows, ray_rows, cross)
    ok = bool(cross) and all(c.passed for c in cross) and len(cross) == len(ts_rows) == len(ray_rows)
    out.print(f"{sum(c.passed for c in cross)}/{len(cross)} checks passed on both engines")
    return EXIT_OK if ok else EXIT_FAILED


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the model store on an engine until Ctrl-C / SIGTERM")
    p.add_argument("engine", choices=("torchserve", "ray"), help="the engine to serve on")
    p.add_argument("--model-store", default="model_store", help="folder of .mar files to serve (default: model_store)")
    p.add_argument("--port", type=int, default=None, help="inference port on 127.0.0.1 (default: a free one)")
    p.add_argument("--workdir", default=None, help="config, logs and key_file.json go here (default: a new temp dir)")
    p.add_argument(
        "--ready-timeout-s", type=float, default=300.0, help="give up when not every endpoint is ready after this (default 300)"
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=None,
        help="body size limit (default: max_request_size in configs/config.properties)",
    )
    p.add_argument(
        "--verify-key",
        default=None,
        metavar="PEM",
        help="serve only archives signed by this ed25519 public key (default: $TORCHSHIP_VERIFY_KEY_FILE, else no check)",
    )
    p.add_argument(
        "--drain-window-s",
        type=float,
        default=DRAIN_WINDOW_S,
        help=f"on SIGTERM / Ctrl-C, keep answering this long before refusing new requests (default {DRAIN_WINDOW_S:g})",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="ray: also serve OIP v2 gRPC through Ray's gRPC proxy on this port (0: a free one; default: no gRPC)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve torchship's Prometheus metrics at http://127.0.0.1:PORT/metrics (0: a free port; default: no metrics)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "metrics", help="serve the metrics the workers and replicas write into a folder (the Kubernetes exporter sidecar)"
    )
    p.add_argument("--dir", required=True, help="the folder TORCHSHIP_METRICS_DIR names for the engine's processes")
    p.add_argument("--port", type=int, default=9400, help="port for /metrics (default 9400)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 in a pod)")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser(
        "migrate", help="serve a model store on TorchServe and on Ray Serve, send both the same requests, compare answers"
    )
    p.add_argument("--model-store", required=True, help="folder of .mar files, any TorchServe archives")
    p.add_argument(
        "--requests",
        default=None,
        help="folder with one sub-folder per model, one file per request body (<file>.headers.json: its headers); "
        "default: torchship archives' own reference inputs",
    )
    p.add_argument(
        "--ray-model-store",
        default=None,
        help="serve this store on Ray Serve instead (the same models rebuilt, e.g. with handlers changed for the move); "
        "default: the --model-store",
    )
    p.add_argument("--report", default="reports/migrate", help="where migrate.json and migrate.md go (default: reports/migrate)")
    p.add_argument("--atol", type=float, default=1e-5, help="how far JSON numbers may differ (default 1e-5)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("verify", help="send every reference input over HTTP and compare with eager")
    p.add_argument("--engine", required=True, choices=("torchserve", "ray", "all"), help="'all' starts both engines itself")
    p.add_argument("--url", default=None, help="inference base URL, e.g. http://127.0.0.1:8080 (not with --engine all)")
    p.add_argument("--token-file", default=None, help="TorchServe's key_file.json (its 'inference' key is used)")
    p.add_argument("--token", default=None, help="the bearer token itself")
    p.add_argument("--model-store", default="model_store", help="the archives being served (references come from them)")
    p.add_argument("--endpoint", action="append", default=[], help="only these endpoints (repeatable)")
    p.add_argument("--report", default=None, help="JSON report path (default: reports/verify-<engine>.json; a folder for 'all')")
    p.set_defaults(func=cmd_verify)
