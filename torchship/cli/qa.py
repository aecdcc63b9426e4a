"""`torchship bench` and `torchship reliability`: speed and robustness of both engines on the bundled zoo, every
answer checked. They are the torchship repository's QA tooling: the wheel leaves them out, and from an installed
torchship these commands say so (run them in a checkout: `make bench`, `make reliability`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from torchship.cli.common import print_progress
from torchship.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def _in_checkout(command: str, err: Console) -> bool:
    """True when the QA tooling is importable (a checkout's editable install); otherwise say where it lives."""
    import importlib.util

    if importlib.util.find_spec(f"torchship.{command}") is not None:
        return True
    err.print(
        f"[red]error:[/] `torchship {command}` is the torchship repository's QA tooling (it measures and attacks the bundled "
        f"zoo) and does not ship in the wheel; run `make {command}` in a clone of the repository"
    )
    return False


def cmd_bench(args: argparse.Namespace, out: Console, err: Console) -> int:
    if not _in_checkout("bench", err):
        return EXIT_USAGE
    from torchship.bench.run import FULL, QUICK, run

    doc = run(QUICK if args.quick else FULL, Path(args.artifacts), Path(args.out), lambda m: print_progress("bench", "run", m))
    engines = doc["served"]["engines"].values()
    # Every served run counts: the throughput runs, the sequential ones and the large bodies (a 9 MiB body failing on
    # Ray once went unnoticed when only throughput was counted).
    runs = [t for e in engines for t in [e["sequential"], *e["throughput"], *e["large_body"].values()]]
    runs += [t for row in doc["served"].get("design", []) for t in [row.get("sequential", {}), *row.get("load", [])]]
    bad = sum(t.get("errors", 0) + t.get("wrong", 0) for t in runs)
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
    if not _in_checkout("reliability", err):
        return EXIT_USAGE
    from torchship.export.exporter import export_isolated
    from torchship.handlers.names import MANIFEST_FILE
    from torchship.reliability import run as rel

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

    from dataclasses import asdict

    from torchship.reliability.ops import OPS_FULL, OPS_QUICK
    from torchship.reliability.progress import StepClock, earlier_steps

    ops_counts = OPS_QUICK if args.quick else OPS_FULL
    step_counts = {"counts": asdict(counts), "ops": asdict(ops_counts)}
    # Every line: the time, the time elapsed and, from an earlier run with these counts, an estimate of the time left.
    say = StepClock(lambda line: err.print(escape(line)), earlier_steps(Path(args.out) / "reliability.json", step_counts))
    report = rel.run_reliability(store, workdir, counts, say, ops_counts=ops_counts)
    report["steps"], report["step_counts"] = say.times(), step_counts
    json_path, md_path = rel.write_reliability_report(report, Path(args.out))
    out.print(rel.markdown(report))
    problems = rel.problems(report)
    for problem in problems:
        err.print(f"[red]failed:[/] {escape(problem)}")
    verdict = f"{len(problems)} problems" if problems else "all checks held"
    out.print(f"reliability report: {escape(str(json_path))}, {escape(str(md_path))}; {verdict}")
    return EXIT_FAILED if problems else EXIT_OK


def register(sub: Any) -> None:
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
