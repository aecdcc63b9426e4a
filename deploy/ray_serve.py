"""A local Ray Serve for the model store: Ray started on this machine only (no dashboard, bounded CPUs, HTTP on
127.0.0.1), the torchship app deployed, every endpoint checked, and Ray shut down on request."""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from torchship.errors import TorchshipError

APP_NAME = "torchship"


class RayServeError(TorchshipError):
    """Ray Serve could not be started or did not become ready."""


@dataclass
class RayServe:
    url: str
    endpoints: list[str]


def start_ray_serve(
    model_store: Path,
    workdir: Path,
    *,
    port: int,
    num_cpus: int = 2,
    token: str | None = None,
    max_request_bytes: int | None = None,
    ready_timeout_s: float = 300.0,
) -> RayServe:
    """Start a local Ray in this process, deploy the app and wait until every endpoint answers its ready probe."""
    import ray
    from ray import serve

    from deploy.ray_app import app

    endpoints = sorted(p.stem for p in model_store.glob("*.mar"))
    if not endpoints:
        raise RayServeError(f"no .mar files in {model_store}: run `torchship archive` first")
    # Ray's own token auth (for its cluster APIs: GCS, jobs, dashboard) stays on, with a fresh per-run token
    # in the environment rather than the $HOME/.ray/auth_token it would otherwise create.
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=str(workdir / "ray"),
        # Ray's internal services (GCS, raylet, object manager) bind this address: loopback, for a local run.
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args: dict[str, object] = {"model_store": str(model_store.resolve()), "cache_dir": str(workdir / "cache"), "token": token}
    if max_request_bytes is not None:
        args["max_request_bytes"] = max_request_bytes
    try:
        serve.run(app(args), name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as exc:  # Ray names the failed deployments; the reason is in their status
        raise RayServeError(f"Ray Serve: the torchship app failed to deploy: {_deploy_failure(serve.status()) or exc}") from None
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    pending = set(endpoints)
    while pending:
        if failure := _deploy_failure(serve.status()):
            raise RayServeError(f"Ray Serve: the torchship app failed to deploy: {failure}")
        if time.monotonic() > deadline:
            raise RayServeError(f"Ray Serve: {sorted(pending)} not ready after {ready_timeout_s:.0f} s")
        for name in sorted(pending):
            try:
                if requests.get(f"{url}/v2/models/{name}/ready", timeout=5).status_code == 200:
                    pending.discard(name)
            except requests.RequestException:
                break
        time.sleep(0.5)
    return RayServe(url, endpoints)


def replica_pids(endpoint: str, app_name: str = APP_NAME) -> list[int]:
    """Process ids of this machine's Ray Serve replicas of `endpoint` (Ray titles them ray::ServeReplica:<app>:<name>)."""
    title = f"ray::ServeReplica:{app_name}:{endpoint}"
    pids: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.split(b"\0", 1)[0].decode(errors="replace").strip() == title:
            pids.append(int(proc.name))
    return sorted(pids)


def _deploy_failure(status: Any) -> str | None:
    """Each failed deployment's reason when the app is DEPLOY_FAILED (an archive refused at load, say), else None."""
    app = status.applications.get(APP_NAME)
    if app is None or app.status != "DEPLOY_FAILED":
        return None
    failed = [
        f"{name}: {_last_error_line(d.message)}"
        for name, d in sorted(app.deployments.items())
        if d.status in ("DEPLOY_FAILED", "UNHEALTHY") and d.message
    ]
    return "; ".join(failed) or str(app.message)


def _last_error_line(message: str) -> str:
    """A replica's failure message ends a Python traceback; its last `SomeError: ...` line is the reason."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error:" in ln or "Exception:" in ln or "Mismatch:" in ln]
    return errors[-1] if errors else (lines[-1] if lines else message)


def stop_ray_serve() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
