"""TorchServe's Python worker, run inside a Ray replica for an archive torchship did not build.

TorchServe's own code does the work where it is the contract: `ts.model_loader` loads the handler the MANIFEST names
(a file of the archive, `module:function`, or a default handler), `ts.service.Service` wraps it (its Context, the
error-to-status rules, the one-answer-per-request check), and each batch travels in the frames TorchServe's frontend
sends its workers, so `ts.protocol.otf_message_handler` decodes each request's data per content type and encodes
each answer exactly as in TorchServe. What is ours: building those frames from an HTTP request the way TorchServe's
frontend does, and reading the worker's answer frame back into HTTP replies (docs/migrate.md lists the differences).
No Ray import here: tests run it in-process.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import os
import struct
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: TorchServe's whole-batch error answers carry this exception type (its frontend's InternalServerException).
BATCH_ERROR_TYPE = "InternalServerException"
#: The header TorchServe's frontend answers each request's id in.
REQUEST_ID_HEADER = "x-request-id"
_FRAME_END = -1


@dataclass(frozen=True)
class TsRequest:
    """One inference request as TorchServe's frontend hands it to a worker."""

    request_id: str
    headers: list[tuple[str, str]]
    #: (name, content type, value): query parameters, then the form fields or the whole body as "body".
    parameters: list[tuple[str, str, bytes]]


@dataclass
class TsReply:
    """One request's answer as TorchServe's frontend writes it to the client."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def mime_type(content_type: str | None) -> str:
    """The content type without its parameters, as TorchServe's frontend passes it on (Netty's getMimeType)."""
    return (content_type or "").split(";", 1)[0].strip()


def _form_fields(body: bytes, content_type: str) -> list[tuple[str, str, bytes]]:
    """multipart/form-data fields: files keep their content type, plain fields have none (raw bytes to the handler)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body
    )
    fields: list[tuple[str, str, bytes]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        payload = part.get_payload(decode=True)
        declared = part.get("content-type")
        file_type = mime_type(str(declared)) if declared and part.get_filename() is not None else ""
        fields.append((str(name), file_type, payload if isinstance(payload, bytes) else b""))
    return fields


def request_parameters(body: bytes, content_type: str | None, query: str) -> list[tuple[str, str, bytes]]:
    """What TorchServe's frontend makes of a request's data: each query parameter, then each field of a form
    (multipart or urlencoded), or else the whole body as the parameter "body" with the request's content type."""
    params = [(k, "", v.encode("utf-8")) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)]
    mime = mime_type(content_type)
    if mime == "multipart/form-data" and content_type:
        return params + _form_fields(body, content_type)
    if mime == "application/x-www-form-urlencoded":
        form = urllib.parse.parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        return params + [(k, "", v.encode("utf-8")) for k, v in form]
    return [*params, ("body", mime, body)]


def _put(out: bytearray, data: bytes) -> None:
    out += struct.pack("!i", len(data))
    out += data


def encode_batch(requests: list[TsRequest]) -> bytes:
    """The predict message TorchServe's frontend sends a worker (after its one-byte command), as its decoder reads it."""
    out = bytearray()
    for request in requests:
        _put(out, request.request_id.encode("utf-8"))
        for name, value in request.headers:
            _put(out, name.encode("utf-8"))
            _put(out, value.encode("utf-8"))
        out += struct.pack("!i", _FRAME_END)
        for param, content_type, data in request.parameters:
            _put(out, param.encode("utf-8"))
            _put(out, content_type.encode("utf-8"))
            _put(out, data)
        out += struct.pack("!i", _FRAME_END)
    out += struct.pack("!i", _FRAME_END)
    return bytes(out)


class _Frames:
    """A socket's recv() over bytes: what TorchServe's frame decoder reads from."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def recv(self, n: int) -> bytes:
        return self._buf.read(n)


def _take(buf: io.BytesIO) -> bytes:
    (length,) = struct.unpack("!i", buf.read(4))
    return buf.read(length) if length > 0 else b""


def batch_error(code: int, message: str) -> bytes:
    """TorchServe's frontend's JSON body for a batch the worker failed as a whole."""
    doc = {"code": code, "type": BATCH_ERROR_TYPE, "message": message}
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def decode_answer(message: bytes, count: int) -> list[TsReply]:
    """The worker's predict response as TorchServe's frontend answers each request of the batch."""
    buf = io.BytesIO(message)
    (code,) = struct.unpack("!i", buf.read(4))
    text = _take(buf).decode("utf-8")
    replies: list[TsReply] = []
    while True:
        (length,) = struct.unpack("!i", buf.read(4))
        if length == _FRAME_END:
            break
        request_id = buf.read(length).decode("utf-8")
        content_type = _take(buf).decode("utf-8")
        (status,) = struct.unpack("!i", buf.read(4))
        _take(buf)  # the reason phrase: ASGI servers (Ray's proxy) send the standard one (docs/migrate.md)
        (count_headers,) = struct.unpack("!i", buf.read(4))
        headers: dict[str, str] = {}
        for _ in range(count_headers):
            key = _take(buf).decode("utf-8")
            headers[key] = _take(buf).decode("utf-8")
        body = _take(buf)
        if code != 200:
            replies.append(TsReply(code, batch_error(code, text), {"content-type": "application/json"}))
            continue
        if content_type and not any(k.lower() == "content-type" for k in headers):
            headers["content-type"] = content_type
        headers[REQUEST_ID_HEADER] = request_id
        replies.append(TsReply(status, body, headers))
    if len(replies) != count:
        raise RuntimeError(f"the worker answered {len(replies)} of {count} requests")
    return replies


class _Headers(dict[str, Any]):
    """A request's headers as a handler reads them: ASGI servers lowercase header names, TorchServe keeps the client's
    spelling, so a lookup matches any case (a handler asking for "X-Scale" finds it on both engines)."""

    def get(self, key: str, default: Any = None) -> Any:
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        return dict.get(self, key.lower(), default) if isinstance(key, str) else default

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or (isinstance(key, str) and dict.__contains__(self, key.lower()))

    def __getitem__(self, key: str) -> Any:
        return self.get(key) if key in self else dict.__getitem__(self, key)


def _case_blind_requests() -> None:
    """Make ts.service build each request's RequestProcessor over _Headers (the one change to TorchServe's code path)."""
    import ts.service
    from ts.context import RequestProcessor

    class CaseBlindRequestProcessor(RequestProcessor):  # type: ignore[misc]
        def __init__(self, request_header: dict[str, Any]) -> None:
            super().__init__(_Headers(request_header))

    ts.service.RequestProcessor = CaseBlindRequestProcessor


class TorchServeWorker:
    """One foreign archive's handler, loaded and called as TorchServe's Python worker does."""

    def __init__(self, model_dir: Path, name: str, handler: str, *, gpu_id: int | None, batch_size: int) -> None:
        import ts
        from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
        from ts.model_loader import TsModelLoader

        # TorchServe starts the worker in the model directory with that directory on PYTHONPATH: the handler imports
        # its own modules and opens its files relative to it. A replica is a process of its own, so both are safe.
        os.chdir(model_dir)
        if str(model_dir) not in sys.path:
            sys.path.insert(0, str(model_dir))
        _case_blind_requests()
        metrics = MetricsCacheYamlImpl(config_file_path=str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
        metrics.initialize_cache()
        metrics.model_name = name
        self.service = TsModelLoader().load(name, str(model_dir), handler, gpu_id, batch_size, None, True, metrics)
        self.service.set_cl_socket(None)

    def predict(self, requests: list[TsRequest]) -> list[TsReply]:
        from ts.protocol.otf_message_handler import _retrieve_inference_msg

        batch = _retrieve_inference_msg(_Frames(encode_batch(requests)))
        answer = self.service.predict(batch)
        return decode_answer(bytes(answer), len(requests))
