"""The parity-gated rollout: verify a candidate revision over HTTP before any traffic moves to it.

The gate (torchship.verify.gate) sends every reference input of every archive to the candidate and compares with the
eager outputs recorded at export; `torchship deploy rollout` runs it and, only when it passed, `promote` applies the
overlay with the candidate's image and waits for Kubernetes to finish the rolling update (`--dry-run` prints the
manifests instead of applying them).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from torchship.deploy.kube import find_tool, image_repository, render
from torchship.errors import DeployError

#: Deployments `rollout` waits for after applying an overlay.
ROLLED_DEPLOYMENTS = ("torchserve",)


def set_image(objs: list[dict[str, Any]], image: str) -> int:
    """Point every container whose image repository is `image`'s at `image`; return how many changed."""
    repo = image_repository(image)
    changed = 0
    for obj in objs:
        for containers in _container_lists(obj):
            for c in containers:
                if image_repository(str(c.get("image", ""))) == repo:
                    c["image"] = image
                    changed += 1
    return changed


def _container_lists(node: Any) -> list[list[dict[str, Any]]]:
    found: list[list[dict[str, Any]]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found.append(value)
            else:
                found.extend(_container_lists(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_container_lists(item))
    return found


def promote(overlay_dir: Path, image: str, *, dry_run: bool, progress: Callable[[str], None], timeout: str = "15m") -> str:
    """Apply the overlay with `image` and wait for the rollout; with dry_run return the manifests instead."""
    objs = render(overlay_dir)
    if set_image(objs, image) == 0:
        raise DeployError(f"no container in {overlay_dir} uses the repository {image_repository(image)!r}")
    manifests = yaml.safe_dump_all(objs, sort_keys=False)
    if dry_run:
        return manifests
    kubectl = find_tool("kubectl")
    progress(f"kubectl apply ({len(objs)} objects from {overlay_dir.name})")
    subprocess.run([kubectl, "apply", "-f", "-"], input=manifests, text=True, check=True, timeout=300)
    namespace = next((o["metadata"].get("namespace") for o in objs if o["kind"] == "Deployment"), None)
    for name in ROLLED_DEPLOYMENTS:
        progress(f"waiting for deployment/{name} to roll out")
        ns = ["-n", namespace] if namespace else []
        subprocess.run([kubectl, "rollout", "status", f"deployment/{name}", *ns, f"--timeout={timeout}"], check=True)
    return ""
