"""What the command groups share: the tables they print, progress lines, SIGTERM as Ctrl-C."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from torchship.export.exporter import ModelExport
    from torchship.verify.compare import CrossRow, VerifyRow


def size_text(n: int | None) -> str:
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
                size_text(entry.size_bytes),
                f"{p50[fmt]:.2f}" if fmt in p50 else "-",
            )
    return table


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


def print_progress(model: str, stage: str, message: str) -> None:
    """Progress lines on stderr; module-level so that an export's child process can use it."""
    Console(stderr=True, width=None if sys.stderr.isatty() else 160).print(
        f"[dim]{time.strftime('%H:%M:%S')}[/] [bold]{escape(model)}[/] {stage}: {escape(message)}"
    )


def interrupt(signum: int, _frame: object) -> None:
    """SIGTERM handler of `torchship serve`: stop the server the way Ctrl-C does (a second one stops it at once)."""
    raise KeyboardInterrupt


def interrupt_once(signum: int, _frame: object) -> None:
    """SIGTERM handler of every other command: stop the way Ctrl-C does, and ignore further SIGTERMs, so that the
    cleanup it starts (stopping every server the command started) runs to its end."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt
