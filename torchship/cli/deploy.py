"""`torchship deploy`: the Kubernetes manifests (sync, check), the KServe store, and the parity-gated rollout."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from torchship.cli.common import verify_table
from torchship.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def _k8s_dir(args: argparse.Namespace) -> Path:
    from torchship.deploy.kube import K8S_DIR

    return Path(args.k8s_dir) if args.k8s_dir else K8S_DIR


def _docker_dir(args: argparse.Namespace) -> Path:
    from torchship.deploy.kube import DOCKER_DIR

    return Path(args.docker_dir) if args.docker_dir else DOCKER_DIR


def cmd_deploy_sync(args: argparse.Namespace, out: Console, err: Console) -> int:
    from torchship.deploy.kube import K8S_DIR, sync
    from torchship.settings import CONFIG_DIR_ENV

    target = _k8s_dir(args)
    # The shipped tree is the repository's own (in a checkout, deploy/k8s); a user's settings go into a copy of it.
    if not args.k8s_dir and (os.environ.get(CONFIG_DIR_ENV) or not os.access(K8S_DIR, os.W_OK)):
        err.print(
            "[red]error:[/] deploy sync writes the kustomize tree's generated files from your settings: pass --k8s-dir "
            f"with a copy of the shipped tree ({escape(str(K8S_DIR))})"
        )
        return EXIT_USAGE
    written = sync(target)
    out.print("\n".join(f"wrote {escape(str(p))}" for p in written) or "generated files already in step with configs/")
    return EXIT_OK


def cmd_deploy_check(args: argparse.Namespace, out: Console, err: Console) -> int:
    from torchship.deploy.kube import check

    steps = check(_k8s_dir(args), _docker_dir(args), lint=not args.no_lint, progress=lambda m: err.print(escape(m)))
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
    from torchship.deploy.kserve import lay_out_store

    store = lay_out_store(Path(args.model_store), Path(args.out), gpu=args.gpu, endpoints=args.endpoint or None)
    for path in (store.config, *store.archives):
        out.print(f"wrote {escape(str(path))}")
    out.print(f"KServe storage folder ready: copy {escape(str(store.root))} to the InferenceService's storageUri")
    return EXIT_OK


def _gate(args: argparse.Namespace, out: Console) -> bool:
    from torchship.verify.client import token_from_key_file
    from torchship.verify.compare import write_verify_report
    from torchship.verify.gate import gate

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
    from torchship.deploy.rollout import promote

    err.print(f"parity gate against the candidate at {escape(args.url)}")
    if not _gate(args, err):
        err.print("[red]rollout refused:[/] the candidate's outputs differ from eager; nothing was applied")
        return EXIT_FAILED
    overlay = _k8s_dir(args) / "overlays" / args.overlay
    manifests = promote(overlay, args.image, dry_run=args.dry_run, progress=lambda m: err.print(escape(m)))
    if args.dry_run:
        out.print(manifests, markup=False, highlight=False, soft_wrap=True)
        err.print(f"dry run: the {args.overlay} overlay with {escape(args.image)} printed, not applied")
    else:
        out.print(f"rolled out {escape(args.image)} with the {args.overlay} overlay")
    return EXIT_OK


def register(sub: Any) -> None:
    deploy = sub.add_parser("deploy", help="Kubernetes: generate, check and gate the rollout of deploy/k8s")
    dsub = deploy.add_subparsers(dest="deploy_command", required=True)
    p = dsub.add_parser("sync", help="write the kustomize tree's generated config files from the settings")
    p.add_argument("--k8s-dir", default=None, help="the kustomize tree (default: the one torchship ships)")
    p.set_defaults(func=cmd_deploy_sync)
    p = dsub.add_parser("check", help="render every overlay and validate it offline (schemas, CRDs, ports, lint, checkov)")
    p.add_argument("--k8s-dir", default=None, help="the kustomize tree (default: the one torchship ships)")
    p.add_argument("--docker-dir", default=None, help="the Dockerfiles to lint (default: the ones torchship ships)")
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
            p.add_argument("--k8s-dir", default=None, help="the kustomize tree (default: the one torchship ships)")
            p.add_argument("--dry-run", action="store_true", help="print the manifests instead of applying them")
        p.set_defaults(func=cmd_deploy_gate if name == "gate" else cmd_deploy_rollout)
