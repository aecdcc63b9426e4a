"""The `torchship` command: a thin argparse layer over the stages; `main(argv) -> int`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engines.base import DRAIN_WINDOW_S
from torchship.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, TorchshipError

if TYPE_CHECKING:
    from export.exporter import ModelExport
    from torchship.spec import TensorSpec
    from verify.compare import CrossRow, VerifyRow


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def summary_table(results: list[ModelExport]) -> Table:
    table = Table(title="export parity (every format reloaded from disk, compared with eager)")
    for col in ("model", "format", "status", "batch sizes (held out)", "max abs err", "max rel err", "tolerance", "file size",
                "p50 ms"):  # fmt: skip
        table.add_column(col, justify="right" if col.startswith(("max", "file", "p50")) else "left")
    for r in results:
        default, p50 = r.manifest.serving_default(), r.p50_ms
        for fmt, entry in r.manifest.formats.items():
            ref = [str(p.batch_size) for p in entry.parity if not p.holdout]
            held = [str(p.batch_size) for p in entry.parity if p.holdout]
            sizes = ",".join(ref) + (f" ({','.join(held)})" if held else "")
            tol = r.manifest.tolerance[fmt]
            table.add_row(
                r.spec.name,
                f"{fmt} [bold](default)[/]" if fmt == default else fmt,
                "[green]ok[/]" if entry.usable else "[red]FAILED[/]",
                sizes or "-",
                f"{max(p.max_abs for p in entry.parity):.3g}" if entry.parity else "-",
                f"{max(p.max_rel for p in entry.parity):.3g}" if entry.parity else "-",
                f"{tol.atol:g}/{tol.rtol:g}",
                _size(entry.size_bytes),
                f"{p50[fmt]:.2f}" if fmt in p50 else "-",
            )
    return table


def print_progress(model: str, stage: str, message: str) -> None:
    """Progress lines on stderr; module-level so that an export's child process can use it."""
    Console(stderr=True, width=None if sys.stderr.isatty() else 160).print(
        f"[dim]{time.strftime('%H:%M:%S')}[/] [bold]{escape(model)}[/] {stage}: {escape(message)}"
    )


def cmd_export(args: argparse.Namespace, out: Console, err: Console) -> int:
    # Stage imports live in the commands: they import torch, which `torchship --help` does not need.
    from export.exporter import ensure_writable, export_isolated
    from torchship.registry import select

    chosen = select(args.models, args.spec)
    out_dir = Path(args.out)
    ensure_writable(out_dir)
    if args.aoti and not any("aoti" in s.formats for _, s in chosen):
        err.print("[yellow]--aoti: none of the selected models supports the aoti format[/]")

    results: list[ModelExport] = []
    broken: list[str] = []
    for i, (ref, spec) in enumerate(chosen, 1):
        err.print(f"[bold cyan]({i}/{len(chosen)}) exporting {spec.name}[/] -> {escape(str(out_dir / spec.name))}")
        try:
            results.append(export_isolated(ref, out_dir=out_dir, aoti=args.aoti, aoti_isa=args.aoti_isa,
                                           default_format=args.default_format, progress=print_progress))  # fmt: skip
        except TorchshipError as exc:
            broken.append(spec.name)
            err.print(f"[red]error:[/] {escape(str(exc))}")
    for r in results:
        for failure in r.failures:
            err.print(f"[red]error:[/] {escape(str(failure))}")
    if results:
        out.print(summary_table(results))
    failed = broken + [f"{r.spec.name}:{f.fmt}" for r in results for f in r.failures]
    if failed:
        err.print(f"[red]{len(failed)} failed:[/] {', '.join(failed)}; the formats that passed were written.")
        return EXIT_FAILED
    out.print(f"all formats of {len(results)} model(s) are within tolerance; artifacts in {escape(str(out_dir))}/")
    return EXIT_OK


def _sig(tensors: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{t.name} {t.datatype}{t.oip_shape()}" for t in tensors)


def cmd_models(args: argparse.Namespace, out: Console, err: Console) -> int:
    from torchship.registry import zoo

    table = Table(title="model zoo")
    for col in ("name", "version", "method", "formats", "inputs", "outputs"):
        table.add_column(col)
    for spec in zoo().values():
        table.add_row(spec.name, spec.version, spec.export_method, ",".join(spec.formats), _sig(spec.inputs), _sig(spec.outputs))
    out.print(table)
    return EXIT_OK


def cmd_archive(args: argparse.Namespace, out: Console, err: Console) -> int:
    from archive.build import archive_models, load_model_config

    config = load_model_config(Path(args.model_config)) if args.model_config else load_model_config()
    err.print(
        f"archiving {', '.join(args.models) or 'every exported model'} from {escape(args.artifacts)} with torch-model-archiver"
    )
    sign = Path(args.sign) if args.sign else None
    endpoints = archive_models(args.models, artifacts=Path(args.artifacts), out_dir=Path(args.out), model_config=config,
                               sign_key=sign)  # fmt: skip
    if sign is not None:
        from archive.signing import key_id, load_signing_key

        out.print(
            f"signed {len(endpoints)} archives with key id {key_id(load_signing_key(sign).public_key())} ({escape(str(sign))})"
        )
    table = Table(title=f"archives in {escape(args.out)}")
    for col in ("endpoint", "model", "format", "archive", "size"):
        table.add_column(col)
    for e in endpoints:
        table.add_row(e.name, e.model, e.fmt, escape(str(e.mar)), _size(e.mar.stat().st_size))
    out.print(table)
    return EXIT_OK


def verify_table(rows: list[VerifyRow]) -> Table:
    table = Table(title="served outputs vs eager (every reference batch, JSON and binary)")
    for col in ("engine", "endpoint", "format", "batch", "encoding", "max abs err", "max rel err", "pass"):
        table.add_column(col, justify="right" if col.startswith(("max", "batch")) else "left")
    for r in rows:
        verdict = "[green]yes[/]" if r.passed else f"[red]NO[/] {escape(r.reason)}"
        table.add_row(
            r.engine, r.endpoint, r.format, str(r.batch_size), r.encoding, f"{r.max_abs:.3g}", f"{r.max_rel:.3g}", verdict
        )
    return table


def cross_table(cross: list[CrossRow]) -> Table:
    table = Table(title="served outputs vs eager on both engines (max abs error; every reference batch, JSON and binary)")
    for col in ("endpoint", "format", "batch", "encoding", "TorchServe vs eager", "Ray vs eager", "TorchServe vs Ray", "pass"):
        table.add_column(col, justify="left" if col in ("endpoint", "format", "encoding", "pass") else "right")
    for c in cross:
        verdict = "[green]yes[/]" if c.passed else f"[red]NO[/] {escape(c.torchserve.reason or c.ray.reason)}"
        table.add_row(
            c.endpoint, c.format, str(c.batch_size), c.encoding,
            f"{c.torchserve.max_abs:.3g}", f"{c.ray.max_abs:.3g}", f"{c.engines_max_abs:.3g}", verdict,
        )  # fmt: skip
    return table


def cmd_serve(args: argparse.Namespace, out: Console, err: Console) -> int:
    import os
    import signal
    import tempfile

    from engines import engine_class
    from engines.ray import RayServe
    from engines.torchserve import TorchServe
    from handlers.names import TOKEN_ENV

    signal.signal(signal.SIGTERM, _interrupt)
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
        if isinstance(engine, TorchServe) and engine.token_auth:
            out.print(f"inference token: {escape(str(engine.key_file))} (key 'inference'; send 'Authorization: Bearer <key>')")
        else:
            out.print(f"inference token: {'$' + TOKEN_ENV if token else f'none (set {TOKEN_ENV} to require one)'}")
        if isinstance(engine, RayServe) and engine.grpc_port:
            out.print(f"OIP gRPC (inference.GRPCInferenceService) on port {engine.grpc_port}")
            # Ray 2.60's gRPC proxy binds [::]:<port>; its gRPCOptions has no host.
            err.print(
                "[yellow]note:[/] Ray's gRPC proxy listens on every interface, not only 127.0.0.1"
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


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM handler: stop the server the way Ctrl-C does."""
    raise KeyboardInterrupt


def cmd_verify(args: argparse.Namespace, out: Console, err: Console) -> int:
    from verify.client import token_from_key_file
    from verify.compare import verify, write_verify_report

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
    from verify.compare import cross_engine
    from verify.pipeline import serve_and_verify, write_reports

    ts_rows, ray_rows = serve_and_verify(Path(args.model_store), lambda line: err.print(escape(line)))
    cross = cross_engine(ts_rows, ray_rows)
    out.print(cross_table(cross))
    write_reports(Path(args.report or "reports"), ts_rows, ray_rows, cross)
    ok = bool(cross) and all(c.passed for c in cross) and len(cross) == len(ts_rows) == len(ray_rows)
    out.print(f"{sum(c.passed for c in cross)}/{len(cross)} checks passed on both engines")
    return EXIT_OK if ok else EXIT_FAILED


def cmd_deploy_sync(args: argparse.Namespace, out: Console, err: Console) -> int:
    from deploy.kube import sync

    written = sync(Path(args.k8s_dir))
    out.print("\n".join(f"wrote {escape(str(p))}" for p in written) or "generated files already in step with configs/")
    return EXIT_OK


def cmd_deploy_check(args: argparse.Namespace, out: Console, err: Console) -> int:
    from deploy.kube import check

    steps = check(Path(args.k8s_dir), Path(args.docker_dir), lint=not args.no_lint, progress=lambda m: err.print(escape(m)))
    table = Table(title="deploy check")
    for col in ("check", "result", "detail"):
        table.add_column(col)
    for step in steps:
        table.add_row(step.name, "[green]ok[/]" if step.passed else "[red]FAILED[/]", escape(step.detail))
    out.print(table)
    failed = [s.name for s in steps if not s.passed]
    out.print(f"{len(steps) - len(failed)}/{len(steps)} checks passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return EXIT_FAILED if failed else EXIT_OK


def cmd_deploy_kserve_store(args: argparse.Namespace, out: Console, err: Console) -> int:
    from deploy.kserve import lay_out_store

    store = lay_out_store(Path(args.model_store), Path(args.out), gpu=args.gpu, endpoints=args.endpoint or None)
    for path in (store.config, *store.archives):
        out.print(f"wrote {escape(str(path))}")
    out.print(f"KServe storage folder ready: copy {escape(str(store.root))} to the InferenceService's storageUri")
    return EXIT_OK


def _gate(args: argparse.Namespace, out: Console) -> bool:
    from deploy.rollout import gate
    from verify.client import token_from_key_file
    from verify.compare import write_verify_report

    token = args.token or (token_from_key_file(Path(args.token_file)) if args.token_file else None)
    result = gate(args.url, token=token, model_store=Path(args.model_store), endpoints=args.endpoint or None)
    out.print(verify_table(result.rows))
    if args.report:
        write_verify_report(result.rows, Path(args.report), engine="candidate", url=args.url)
    for row in result.failed:
        out.print(f"[red]drift:[/] {row.endpoint} batch {row.batch_size} {row.encoding}: {escape(row.reason)}")
    verdict = "[green]gate passed[/]" if result.passed else "[red]gate refused the candidate[/]"
    out.print(f"{verdict}: {len(result.rows) - len(result.failed)}/{len(result.rows)} checks within tolerance")
    return result.passed


def cmd_deploy_gate(args: argparse.Namespace, out: Console, err: Console) -> int:
    return EXIT_OK if _gate(args, out) else EXIT_FAILED


def cmd_deploy_rollout(args: argparse.Namespace, out: Console, err: Console) -> int:
    from deploy.rollout import promote

    err.print(f"parity gate against the candidate at {escape(args.url)}")
    if not _gate(args, err):
        err.print("[red]rollout refused:[/] the candidate's outputs differ from eager; nothing was applied")
        return EXIT_FAILED
    overlay = Path(args.k8s_dir) / "overlays" / args.overlay
    manifests = promote(overlay, args.image, dry_run=args.dry_run, progress=lambda m: err.print(escape(m)))
    if args.dry_run:
        out.print(manifests, markup=False, highlight=False, soft_wrap=True)
        err.print(f"dry run: the {args.overlay} overlay with {escape(args.image)} printed, not applied")
    else:
        out.print(f"rolled out {escape(args.image)} with the {args.overlay} overlay")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace, out: Console, err: Console) -> int:
    from bench.run import FULL, QUICK, run

    doc = run(QUICK if args.quick else FULL, Path(args.artifacts), Path(args.out), lambda m: print_progress("bench", "run", m))
    engines = doc["served"]["engines"].values()
    bad = sum(t["errors"] + t["wrong"] for e in engines for t in e["throughput"])
    unverified = [r for r in doc["inprocess"] if not r["verified"]]
    for t in doc["targets"]:
        out.print(f"{'[green]met[/]' if t['met'] else '[yellow]missed[/]'}  {escape(t['target'])}: {t['value']:.2f} {t['unit']}")
    out.print(
        f"report: {escape(str(Path(args.out) / 'bench.md'))} (+ bench.json, {len(doc['plots'])} plots) in {doc['seconds']:.0f} s"
    )
    if bad or unverified:
        err.print(f"[red]{bad} served errors or wrong answers, {len(unverified)} in-process results not equal to eager[/]")
        return EXIT_FAILED
    return EXIT_OK


def cmd_reliability(args: argparse.Namespace, out: Console, err: Console) -> int:
    from export.exporter import export_isolated
    from handlers.names import MANIFEST_FILE
    from reliability import run as rel

    counts = rel.QUICK if args.quick else rel.FULL
    if args.requests:
        counts = rel.Counts(args.requests, counts.concurrency, counts.fuzz_requests, counts.fault_requests)
    artifacts = Path(args.artifacts)
    for name in rel.RELIABILITY_MODELS:
        if not (artifacts / name / MANIFEST_FILE).is_file():
            err.print(f"exporting {name} into {escape(str(artifacts))} (not exported yet)")
            export_isolated(name, out_dir=artifacts, progress=print_progress)
    workdir = rel.default_workdir()
    store = rel.build_store(artifacts, workdir / "store")

    def say(line: str) -> None:
        err.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {escape(line)}")

    from reliability.ops import OPS_FULL, OPS_QUICK

    report = rel.run_reliability(store, workdir, counts, say, ops_counts=OPS_QUICK if args.quick else OPS_FULL)
    json_path, md_path = rel.write_reliability_report(report, Path(args.out))
    out.print(rel.markdown(report))
    problems = rel.problems(report)
    for problem in problems:
        err.print(f"[red]failed:[/] {escape(problem)}")
    verdict = f"{len(problems)} problems" if problems else "all checks held"
    out.print(f"reliability report: {escape(str(json_path))}, {escape(str(md_path))}; {verdict}")
    return EXIT_FAILED if problems else EXIT_OK


def cmd_pipeline(args: argparse.Namespace, out: Console, err: Console) -> int:
    from verify.pipeline import run_pipeline

    result = run_pipeline(
        artifacts=Path(args.artifacts),
        model_store=Path(args.model_store),
        reports=Path(args.reports),
        progress=print_progress,
        say=lambda line: err.print(f"[bold cyan]{escape(line)}[/]"),
    )
    out.print(summary_table(result.exports))
    out.print(cross_table(result.cross))
    if not result.ok:
        err.print(f"[red]pipeline failed:[/] {escape(', '.join(result.failures) or 'no verify rows')}")
        return EXIT_FAILED
    out.print(
        f"pipeline passed: {len(result.cross)} checks, each equal to eager within tolerance on both TorchServe and Ray Serve "
        f"({len(result.rows)} served answers); reports in {escape(args.reports)}/"
    )
    return EXIT_OK


def version_line() -> str:
    """torchship's version and the versions of what it serves with, read from the installed packages' metadata (no
    import: --version answers at once)."""
    from importlib.metadata import PackageNotFoundError, version

    from torchship import __version__

    parts = []
    for package in ("torch", "torchserve", "ray"):
        try:
            parts.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package} not installed")
    return f"torchship {__version__} ({', '.join(parts)}; Python {sys.version.split()[0]})"


class _PrintVersion(argparse.Action):
    """--version on one line, unwrapped (argparse's own version action wraps it at the terminal's width)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchship", description="Eager PyTorch -> served REST endpoints, proven equal to eager."
    )
    parser.add_argument("--version", action=_PrintVersion, help="print the versions of torchship, torch, TorchServe, Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export models to frozen TorchScript, .pt2 and (with --aoti) AOTInductor, gated on parity")
    p.add_argument(
        "models", nargs="*", metavar="MODEL", help="zoo models to export (default: the whole zoo, unless --spec is given)"
    )
    p.add_argument(
        "--spec",
        action="append",
        default=[],
        metavar="MODULE:SPEC",
        help="a user model's ModelSpec, e.g. my_pkg.my_module:SPEC (repeatable)",
    )
    p.add_argument("--out", default="artifacts", help="output folder (default: artifacts)")
    p.add_argument("--aoti", action="store_true", help="also build the AOTInductor package (compiles C++; takes minutes)")
    p.add_argument(
        "--aoti-isa",
        choices=("native", "avx2"),
        default="native",
        help="AOTInductor vector ISA: 'native' (this CPU's best) or 'avx2' (portable to any x86-64 CPU with AVX2)",
    )
    p.add_argument(
        "--default-format",
        choices=("torchscript", "pt2", "aoti"),  # torchship.spec.FORMATS, without importing torch for --help
        default=None,
        help="the format the default endpoint <model> serves (default: the fastest that passed parity, measured here)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("archive", help="build model_store/<endpoint>.mar for every usable format with torch-model-archiver")
    p.add_argument("models", nargs="*", metavar="MODEL", help="exported models to archive (default: all in --artifacts)")
    p.add_argument("--artifacts", default="artifacts", help="export folder (default: artifacts)")
    p.add_argument("--out", default="model_store", help="where the .mar files go (default: model_store)")
    p.add_argument("--model-config", default=None, help="TorchServe model-config YAML (default: configs/model-config.yaml)")
    p.add_argument("--sign", default=None, metavar="KEY", help="sign every archive with this ed25519 private key (PEM)")
    p.set_defaults(func=cmd_archive)

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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("verify", help="send every reference input over HTTP and compare with eager")
    p.add_argument("--engine", required=True, choices=("torchserve", "ray", "all"), help="'all' starts both engines itself")
    p.add_argument("--url", default=None, help="inference base URL, e.g. http://127.0.0.1:8080 (not with --engine all)")
    p.add_argument("--token-file", default=None, help="TorchServe's key_file.json (its 'inference' key is used)")
    p.add_argument("--token", default=None, help="the bearer token itself")
    p.add_argument("--model-store", default="model_store", help="the archives being served (references come from them)")
    p.add_argument("--endpoint", action="append", default=[], help="only these endpoints (repeatable)")
    p.add_argument("--report", default=None, help="JSON report path (default: reports/verify-<engine>.json; a folder for 'all')")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("pipeline", help="export -> archive -> serve on TorchServe and Ray Serve -> verify both -> stop")
    p.add_argument("--artifacts", default="artifacts", help="export folder (default: artifacts)")
    p.add_argument("--model-store", default="model_store", help="where the .mar files go (default: model_store)")
    p.add_argument("--reports", default="reports", help="where the parity reports go (default: reports)")
    p.set_defaults(func=cmd_pipeline)

    deploy = sub.add_parser("deploy", help="Kubernetes: generate, check and gate the rollout of deploy/k8s")
    dsub = deploy.add_subparsers(dest="deploy_command", required=True)
    p = dsub.add_parser("sync", help="write deploy/k8s's generated config files from configs/")
    p.add_argument("--k8s-dir", default="deploy/k8s", help="the kustomize tree (default: deploy/k8s)")
    p.set_defaults(func=cmd_deploy_sync)
    p = dsub.add_parser("check", help="render every overlay and validate it offline (schemas, CRDs, ports, lint, checkov)")
    p.add_argument("--k8s-dir", default="deploy/k8s", help="the kustomize tree (default: deploy/k8s)")
    p.add_argument("--docker-dir", default="docker", help="the Dockerfiles to lint (default: docker)")
    p.add_argument("--no-lint", action="store_true", help="leave out yamllint, hadolint and checkov")
    p.set_defaults(func=cmd_deploy_check)
    p = dsub.add_parser(
        "kserve-store", help="lay out a KServe storage folder (config/config.properties, model-store/) from .mar files"
    )
    p.add_argument("--model-store", default="model_store", help="the .mar files to serve (default: model_store)")
    p.add_argument("--out", required=True, help="a new or empty folder to write; copy it to the InferenceService's storageUri")
    p.add_argument("--endpoint", action="append", default=[], help="only these endpoints (repeatable; default: every archive)")
    p.add_argument("--gpu", action="store_true", help="for the kserve-gpu overlay: number_of_gpu=1 (archives built for GPU)")
    p.set_defaults(func=cmd_deploy_kserve_store)
    for name, helptext in (
        ("gate", "verify a candidate revision over HTTP; exit 1 when any output differs from eager beyond tolerance"),
        ("rollout", "run the gate against the candidate, then apply the overlay with its image and wait for the rollout"),
    ):
        p = dsub.add_parser(name, help=helptext)
        p.add_argument("--url", required=True, help="the candidate's inference base URL")
        p.add_argument("--model-store", default="model_store", help="the archives the candidate serves (references)")
        p.add_argument("--token", default=None, help="the bearer token itself")
        p.add_argument("--token-file", default=None, help="a file holding the token, or TorchServe's key_file.json")
        p.add_argument("--endpoint", action="append", default=[], help="only these endpoints (repeatable)")
        p.add_argument("--report", default=None, help="write the gate's JSON report here")
        if name == "rollout":
            p.add_argument("--overlay", default="cpu", choices=("cpu", "gpu", "staging"), help="the overlay to apply")
            p.add_argument("--image", required=True, help="the candidate's image, repo:tag or repo@sha256:digest")
            p.add_argument("--k8s-dir", default="deploy/k8s", help="the kustomize tree (default: deploy/k8s)")
            p.add_argument("--dry-run", action="store_true", help="print the manifests instead of applying them")
        p.set_defaults(func=cmd_deploy_gate if name == "gate" else cmd_deploy_rollout)

    p = sub.add_parser("bench", help="benchmark every format in-process and both engines over HTTP (reports/bench.*)")
    p.add_argument("--artifacts", default="artifacts", help="export folder (missing models are exported first)")
    p.add_argument("--out", default="reports", help="where bench.json, bench.md and bench/*.png go")
    p.add_argument("--quick", action="store_true", help="tiny counts: checks the machinery, not the speed")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "reliability", help="hostile corpus, fuzz, load, faults, restarts, tampered archives and access on both engines"
    )
    p.add_argument("--artifacts", default="artifacts", help="export folder (missing models are exported first)")
    p.add_argument("--out", default="reports", help="where reliability.json and reliability.md go")
    p.add_argument("--quick", action="store_true", help="small counts (what make test runs), not the full 5,000-request load")
    p.add_argument(
        "--requests", type=int, default=None, help="requests per engine in the load run (default 5000; 300 with --quick)"
    )
    p.set_defaults(func=cmd_reliability)

    p = sub.add_parser("models", help="list the model zoo")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Off a terminal rich assumes 80 columns, which wraps the summary table into an unreadable column.
    out = Console(width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    try:
        code: int = args.func(args, out, err)
    except TorchshipError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
