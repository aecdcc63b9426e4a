"""TorchServe's adapter over the engine-neutral core: `initialize(context)` loads the archive TorchServe unpacked,
`handle(data, context)` turns TorchServe's batch into plain requests and the core's replies back into TorchServe's
per-request statuses and headers. torch + stdlib only: it travels inside every .mar.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .core import EndpointCore, pick_device
from .names import DRAIN_FILE_ENV, DRAIN_HEADER, DRAINING_MESSAGE
from .wire import Reply, Request

#: A worker that lost parity exits this long after answering its last batch (the frontend has its replies by then),
#: with this status, which TorchServe's log shows.
LEAVE_AFTER_S = 0.5
EXIT_PARITY_LOST = 3


class Context(Protocol):
    """The part of TorchServe's `ts.context.Context` this adapter uses."""

    @property
    def system_properties(self) -> Mapping[str, Any]: ...
    @property
    def model_yaml_config(self) -> Mapping[str, Any] | None: ...
    def get_all_request_header(self, idx: int) -> Mapping[str, str]: ...
    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None: ...
    def set_response_header(self, idx: int, key: str, value: str) -> None: ...
    def set_response_content_type(self, idx: int, value: str) -> None: ...


def _headers(context: Context, idx: int) -> Mapping[str, str]:
    try:
        return context.get_all_request_header(idx) or {}
    except (KeyError, IndexError, AttributeError):
        return {}


def _body(request: Mapping[str, Any]) -> Any:
    """TorchServe puts the body under "body" or "data"; a JSON body arrives already parsed."""
    for key in ("body", "data"):
        if request.get(key) is not None:
            return request[key]
    return None


class TorchshipHandler:
    """The handler TorchServe instantiates for every torchship endpoint."""

    def __init__(self) -> None:
        self.initialized = False
        self.core: EndpointCore | None = None
        drain_file = os.environ.get(DRAIN_FILE_ENV)
        self.drain_file = Path(drain_file) if drain_file else None
        self.draining = False
        self.started = time.time()
        self.model_name = ""
        self.leaving = False
        self.busy = threading.Lock()

    def initialize(self, context: Context) -> None:
        props = context.system_properties
        self.model_name = str(getattr(context, "model_name", "") or Path(props["model_dir"]).name)
        self.core = EndpointCore(
            Path(props["model_dir"]),
            device=pick_device(props.get("gpu_id")),
            environ=os.environ,
            # The archive's model-config.yaml as TorchServe parsed it (a context without one means defaults).
            model_config=getattr(context, "model_yaml_config", None),
        )
        self.initialized = True

    def handle(self, data: Sequence[Mapping[str, Any]], context: Context) -> list[bytes]:
        with self.busy:
            return self._handle(data, context)

    def _handle(self, data: Sequence[Mapping[str, Any]], context: Context) -> list[bytes]:
        if self.core is None:
            raise RuntimeError("handle() before initialize()")
        requests = [Request.of(_body(item), _headers(context, idx)) for idx, item in enumerate(data)]
        served = self._served_before_drain(requests)
        replies = self.core.infer_batch(requests[:served]) if served else []
        # Draining: the drain marker and whatever was queued behind it get the 503 at once.
        replies += [Reply.error(DRAINING_MESSAGE, 503) for _ in data[served:]]
        self.core.count_shed(len(data) - served)
        if self.core.parity_lost is not None:
            self._leave()
        for idx, reply in enumerate(replies):
            if reply.status != 200:
                context.set_response_status(code=reply.status, phrase=_phrase(reply.body), idx=idx)
            context.set_response_content_type(idx, reply.content_type)
            for key, value in reply.headers.items():
                if key != "content-type":
                    context.set_response_header(idx, key, value)
        return [reply.body for reply in replies]

    def _leave(self) -> None:
        """This worker's answers left their references: it exits once TorchServe has sent this batch's 503s, and
        TorchServe starts a fresh worker, which runs the references before it loads (a fault that stays refuses it)."""
        if not self.leaving:
            self.leaving = True
            threading.Timer(LEAVE_AFTER_S, self._exit_between_batches).start()

    def _exit_between_batches(self) -> None:
        with self.busy:  # never in the middle of a batch: its requests would get TorchServe's "worker died"
            try:
                if self.core is not None and self.core.metrics is not None:
                    self.core.metrics.flush()  # its last 503s counted: the background writer may not have run yet
            finally:
                os._exit(EXIT_PARITY_LOST)

    def _served_before_drain(self, requests: Sequence[Request]) -> int:
        """How many of the batch's requests to serve: all of them, unless a drain marker is among them or was seen."""
        if self.drain_file is None:
            return len(requests)
        seen = self.drain_file.with_name(f"{self.drain_file.name}.{self.model_name}")
        if self.draining or _touched_since(seen, self.started):
            # This worker saw the marker, or another worker of this endpoint did after this one started.
            self.draining = True
            return 0
        for idx, request in enumerate(requests):
            marker = request.headers.get(DRAIN_HEADER.lower())  # Request.of lower-cases header names
            if marker and marker == _read_marker(self.drain_file):
                self.draining = True
                seen.touch()
                return idx
        return len(requests)


def _read_marker(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _touched_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


def _phrase(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])[:200]
    except (ValueError, KeyError, TypeError):
        return "error"
