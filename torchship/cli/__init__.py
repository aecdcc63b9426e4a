"""The `torchship` command: a thin argparse layer over the stages, one module per command group; `main(argv) -> int`.
Nothing imports this package: it sits on top of every stage."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from torchship.cli import build, deploy, qa, serve
from torchship.cli.common import interrupt_once
from torchship.errors import TorchshipError


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
    parser.add_argument(
        "--config-dir",
        default=None,
        metavar="DIR",
        help="read the settings files from DIR (written by `torchship init DIR`) instead of the ones torchship ships",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (build, serve, deploy, qa):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from torchship.settings import CONFIG_DIR_ENV

    # Through the environment, absolute, so that the engines' own processes (the Ray child, TorchServe's workers),
    # which run in other folders, see the same one.
    config_dir = args.config_dir or os.environ.get(CONFIG_DIR_ENV)
    if config_dir:
        os.environ[CONFIG_DIR_ENV] = str(Path(config_dir).resolve())
    # SIGTERM (a time limit, a supervisor) stops any command the way Ctrl-C does: every `finally` runs, so whatever it
    # started (servers, their process groups) is stopped with it.
    signal.signal(signal.SIGTERM, interrupt_once)
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
