"""`torchship export`, `models`, `archive`, `pipeline` and `init`: the zoo or a user's models to verified archives."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from torchship.cli.common import cross_table, print_progress, size_text, summary_table
from torchship.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, TorchshipError

if TYPE_CHECKING:
    from torchship.export.exporter import ModelExport
    from torchship.spec import TensorSpec


def cmd_export(args: argparse.Namespace, out: Console, err: Console) -> int:
    # Stage imports live in the commands: they import torch, which `torchship --help` does not need.
    from torchship.export.exporter import ensure_writable, export_isolated
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
    from torchship.archive.build import archive_models, load_model_config

    config = load_model_config(Path(args.model_config)) if args.model_config else load_model_config()
    err.print(
        f"archiving {', '.join(args.models) or 'every exported model'} from {escape(args.artifacts)} with torch-model-archiver"
    )
    sign = Path(args.sign) if args.sign else None
    endpoints = archive_models(args.models, artifacts=Path(args.artifacts), out_dir=Path(args.out), model_config=config,
                               sign_key=sign)  # fmt: skip
    if sign is not None:
        from torchship.archive.signing import key_id, load_signing_key

        out.print(
            f"signed {len(endpoints)} archives with key id {key_id(load_signing_key(sign).public_key())} ({escape(str(sign))})"
        )
    table = Table(title=f"archives in {escape(args.out)}")
    for col in ("endpoint", "model", "format", "archive", "size"):
        table.add_column(col)
    for e in endpoints:
        table.add_row(e.name, e.model, e.fmt, escape(str(e.mar)), size_text(e.mar.stat().st_size))
    out.print(table)
    return EXIT_OK


def cmd_sign(args: argparse.Namespace, out: Console, err: Console) -> int:
    """Sign archives already built, in place: torchship's or any TorchServe .mar."""
    import zipfile

    from torchship.archive.signing import key_id, load_signing_key, sign_archive

    mars = [Path(m) for m in args.archives]
    if missing := [str(m) for m in mars if not m.is_file()]:
        err.print(f"[red]error:[/] no such archive: {escape(', '.join(missing))}")
        return EXIT_USAGE
    key = load_signing_key(Path(args.key))
    for mar in mars:
        try:
            sign_archive(mar, key)
        except zipfile.BadZipFile:
            err.print(f"[red]error:[/] {escape(str(mar))} is not a .mar (not a zip archive)")
            return EXIT_USAGE
    out.print(f"signed {len(mars)} archives with key id {key_id(key.public_key())}; serve them with --verify-key")
    return EXIT_OK


def cmd_pipeline(args: argparse.Namespace, out: Console, err: Console) -> int:
    from torchship.pipeline import run_pipeline

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


def cmd_init(args: argparse.Namespace, out: Console, err: Console) -> int:
    from torchship.settings import CONFIG_DIR_ENV, init_configs

    target = Path(args.dir)
    for path in init_configs(target, force=args.force):
        out.print(f"wrote {escape(str(path))}")
    out.print(
        f"edit them, then pass [bold]--config-dir {escape(str(target))}[/] to any command (or set {CONFIG_DIR_ENV}); "
        "without it commands use the settings that ship with torchship"
    )
    return EXIT_OK


def register(sub: Any) -> None:
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
    p.add_argument("--model-config", default=None, help="model-config YAML (default: the settings' one; torchship init)")
    p.add_argument("--sign", default=None, metavar="KEY", help="sign every archive with this ed25519 private key (PEM)")
    p.set_defaults(func=cmd_archive)

    p = sub.add_parser("sign", help="sign .mar files in place (torchship's or any TorchServe archive) with an ed25519 key")
    p.add_argument("archives", nargs="+", metavar="ARCHIVE", help=".mar files to sign")
    p.add_argument("--key", required=True, help="the ed25519 private key (PEM)")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("pipeline", help="export -> archive -> serve on TorchServe and Ray Serve -> verify both -> stop")
    p.add_argument("--artifacts", default="artifacts", help="export folder (default: artifacts)")
    p.add_argument("--model-store", default="model_store", help="where the .mar files go (default: model_store)")
    p.add_argument("--reports", default="reports", help="where the parity reports go (default: reports)")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("models", help="list the model zoo")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("init", help="write editable copies of torchship's settings files (config.properties, model configs)")
    p.add_argument("dir", nargs="?", default="torchship-config", help="the folder to write (default: torchship-config)")
    p.add_argument("--force", action="store_true", help="overwrite files that are already there")
    p.set_defaults(func=cmd_init)
