"""The handler TorchServe (and the Ray app) run for every torchship endpoint: decode -> validate -> predict -> encode.

torch + stdlib only: it travels inside every .mar. It reads the archive's manifest.json and endpoint.json,
checks the artifact's sha256 before loading it, and answers a batch of requests with one response each, failing
only the requests that are bad (TorchServe fails a whole batch if a handler raises).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from handlers.codec import (
    BINARY_HEADER,
    EMPTY_BODY,
    TOKEN_FAILED,
    TOKEN_STATUS,
    BadRequest,
    ClientError,
    InferRequest,
    Signature,
    check_body_size,
    check_content_type,
    decode_request,
    encode_error,
    encode_response,
    inference_token,
    token_matches,
)

log = logging.getLogger(__name__)

ENDPOINT_FILE = "endpoint.json"
#: sha256 of every other entry of the archive, written by `torchship archive`: a changed byte anywhere refuses the load.
CHECKSUMS_FILE = "torchship-checksums.json"
#: The body limit the handler enforces with a JSON 413 (the launchers set it; TorchServe's frontend limit sits above it).
MAX_REQUEST_BYTES_ENV = "TORCHSHIP_MAX_REQUEST_BYTES"
MANIFEST_FILE = "manifest.json"
TOPK_FILE = "process_outputs.torchscript.pt"
BATCH_REQUESTS_HEADER = "X-Torchship-Batch-Requests"
BATCH_ROWS_HEADER = "X-Torchship-Batch-Rows"


class Context(Protocol):
    """The part of TorchServe's `ts.context.Context` the handler uses (the Ray app provides the same)."""

    @property
    def system_properties(self) -> Mapping[str, Any]: ...
    def get_all_request_header(self, idx: int) -> Mapping[str, str]: ...
    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None: ...
    def set_response_header(self, idx: int, key: str, value: str) -> None: ...
    def set_response_content_type(self, idx: int, value: str) -> None: ...


def load_torchscript(path: str, device: torch.device) -> Callable[..., Any]:
    module: Callable[..., Any] = torch.jit.load(path, map_location=device).eval()
    return module


def load_pt2(path: str, device: torch.device) -> Callable[..., Any]:
    module = torch.export.load(path).module()
    return module.to(device) if device.type != "cpu" else module


def load_aoti(path: str, device: torch.device) -> Callable[..., Any]:
    import torch._inductor  # heavy; only AOTInductor endpoints need it

    runner: Callable[..., Any] = torch._inductor.aoti_load_package(path)
    return runner


#: How each artifact format is loaded, by the `format` in endpoint.json. The export parity gate loads through
#: this same table, so what was checked at export is loaded exactly as the engines load it.
LOADERS: Mapping[str, Callable[[str, torch.device], Callable[..., Any]]] = {
    "torchscript": load_torchscript,
    "pt2": load_pt2,
    "aoti": load_aoti,
}


class ArtifactError(RuntimeError):
    """The archive is incomplete or was changed after export: the endpoint must not load."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksums(model_dir: Path) -> None:
    """Refuse an unpacked archive any of whose files differs from what `torchship archive` wrote."""
    listing = model_dir / CHECKSUMS_FILE
    label = _endpoint_label(model_dir)
    try:
        expected = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{label}: {CHECKSUMS_FILE} is missing or unreadable ({exc}); rebuild the archive") from None
    if not isinstance(expected, dict) or not expected:
        raise ArtifactError(f"{label}: {CHECKSUMS_FILE} lists no files; rebuild the archive")
    changed = sorted(
        name for name, digest in expected.items() if not (model_dir / name).is_file() or sha256_file(model_dir / name) != digest
    )
    if changed:
        raise ArtifactError(
            f"{label}: {', '.join(changed)} missing or changed since the archive was built "
            "(sha256 mismatch); rebuild the archive with `torchship archive`"
        )


def _endpoint_label(model_dir: Path) -> str:
    """The endpoint's name for messages (the folder an engine unpacked into is a temp or digest name)."""
    try:
        return str(json.loads((model_dir / ENDPOINT_FILE).read_text(encoding="utf-8"))["endpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return model_dir.name


def max_request_bytes(environ: Mapping[str, str]) -> int | None:
    raw = environ.get(MAX_REQUEST_BYTES_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) <= 0:
        raise ValueError(f"{MAX_REQUEST_BYTES_ENV} must be a positive integer, got {raw!r}")
    return int(raw)


def pick_device(gpu_id: Any) -> torch.device:
    """The GPU TorchServe assigned this worker, or the CPU when it assigned none (or none is usable)."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


@dataclass
class _Reply:
    body: bytes
    status: int = 200
    headers: dict[str, str] | None = None


def _lower_headers(context: Context, idx: int) -> dict[str, str]:
    try:
        headers = context.get_all_request_header(idx) or {}
    except (KeyError, IndexError, AttributeError):
        return {}
    return {str(k).lower(): str(v) for k, v in headers.items()}


def _body_of(request: Mapping[str, Any]) -> Any:
    for key in ("body", "data"):
        if key in request and request[key] is not None:
            return request[key]
    raise BadRequest(EMPTY_BODY)


class TorchshipHandler:
    """One endpoint: one model in one format, plus the top-k post-processing for classifiers."""

    def __init__(self) -> None:
        self.initialized = False
        self.model: Callable[..., Any] | None = None
        self.topk: Callable[..., Any] | None = None
        self.token: str | None = None
        self.max_request_bytes: int | None = None

    def initialize(self, context: Context) -> None:
        props = context.system_properties
        model_dir = Path(props["model_dir"])
        manifest = json.loads((model_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        verify_checksums(model_dir)
        endpoint = json.loads((model_dir / ENDPOINT_FILE).read_text(encoding="utf-8"))
        self.endpoint: str = endpoint["endpoint"]
        self.format: str = endpoint["format"]
        entry = manifest["formats"].get(self.format)
        if entry is None or entry.get("status") != "ok":
            raise ArtifactError(f"{self.endpoint}: format {self.format!r} did not pass its parity gate at export")
        artifact = model_dir / entry["file"]
        if not artifact.is_file() or sha256_file(artifact) != entry["sha256"]:
            raise ArtifactError(f"{self.endpoint}: {artifact.name} is missing or does not match its sha256; rebuild the archive")
        self.device = pick_device(props.get("gpu_id"))
        self.signature = Signature.from_manifest(manifest)
        self.model = LOADERS[self.format](str(artifact), self.device)
        topk_file = model_dir / TOPK_FILE
        if self.signature.task == "classifier" and topk_file.is_file():
            self.topk = load_torchscript(str(topk_file), torch.device("cpu"))
        # Set only where the engine cannot enforce a shared token itself (TorchServe in Kubernetes; see the README).
        self.token = inference_token(os.environ)
        self.max_request_bytes = max_request_bytes(os.environ)
        log.info("torchship endpoint %s: %s on %s (token check %s)", self.endpoint, self.format, self.device, bool(self.token))
        self.initialized = True

    # -- one batch from the engine -------------------------------------------------------------

    def handle(self, data: Sequence[Mapping[str, Any]], context: Context) -> list[bytes]:
        replies: list[_Reply | None] = [None] * len(data)
        decoded: dict[int, InferRequest] = {}
        for idx, request in enumerate(data):
            try:
                headers = _lower_headers(context, idx)
                if self.token and not token_matches(headers.get("authorization"), self.token):
                    replies[idx] = _Reply(encode_error(TOKEN_FAILED), TOKEN_STATUS)
                    continue
                check_content_type(headers.get("content-type"))
                body = _body_of(request)
                check_body_size(body, self.max_request_bytes)
                decoded[idx] = decode_request(body, self.signature, header_length=headers.get(BINARY_HEADER))
            except ClientError as exc:
                replies[idx] = _Reply(encode_error(str(exc)), exc.status)
        rows_run: dict[int, int] = {}
        for group in self._groups(decoded):
            self._predict_group(group, decoded, replies)
            rows_run.update(dict.fromkeys(group, sum(decoded[i].batch_size for i in group)))
        out: list[bytes] = []
        for idx, maybe in enumerate(replies):
            # Every request must have been answered; a gap is our bug, reported as a server fault.
            reply = maybe or _Reply(encode_error("internal error: request was not answered"), 500)
            if reply.status != 200:
                context.set_response_status(code=reply.status, phrase=_phrase(reply.body), idx=idx)
            context.set_response_content_type(idx, "application/json" if not reply.headers else "application/octet-stream")
            for key, value in (reply.headers or {}).items():
                context.set_response_header(idx, key, value)
            # Observability: how many requests the engine batched together, and how many rows the model ran.
            context.set_response_header(idx, BATCH_REQUESTS_HEADER, str(len(data)))
            if idx in rows_run:
                context.set_response_header(idx, BATCH_ROWS_HEADER, str(rows_run[idx]))
            out.append(reply.body)
        if len(out) != len(data):
            raise RuntimeError(f"handler produced {len(out)} responses for {len(data)} requests")
        return out

    def _groups(self, decoded: Mapping[int, InferRequest]) -> list[list[int]]:
        """Requests that can run as one batch: same non-batch shapes, total batch within the model's limit."""
        by_shape: dict[tuple[object, ...], list[int]] = {}
        for idx, req in decoded.items():
            by_shape.setdefault((req.shape_key(), self._model_kwargs(req)), []).append(idx)
        groups: list[list[int]] = []
        for members in by_shape.values():
            current: list[int] = []
            rows = 0
            for idx in members:
                b = decoded[idx].batch_size
                if current and rows + b > self.signature.max_batch_size:
                    groups.append(current)
                    current, rows = [], 0
                current.append(idx)
                rows += b
            groups.append(current)
        return groups

    def _predict_group(self, group: list[int], decoded: Mapping[int, InferRequest], replies: list[_Reply | None]) -> None:
        names = [s.name for s in self.signature.inputs]
        try:
            args: list[Any] = [torch.cat([decoded[i].inputs[n] for i in group]).to(self.device) for n in names]
            outputs = self.predict([*args, *self._model_kwargs(decoded[group[0]])])
        except Exception as exc:  # a model fault fails this group with 500, never its neighbours in other groups
            log.exception("prediction failed for %d request(s)", len(group))
            for i in group:
                replies[i] = _Reply(encode_error(f"prediction failed: {type(exc).__name__}"), 500)
            return
        sizes = [decoded[i].batch_size for i in group]
        pieces = [torch.split(t, sizes) for t in outputs.values()]
        per_request = [dict(zip(outputs, parts, strict=True)) for parts in zip(*pieces, strict=True)]
        if len(per_request) != len(group):
            raise RuntimeError(f"split {len(per_request)} results for {len(group)} requests")
        for i, result in zip(group, per_request, strict=True):
            replies[i] = self._encode(decoded[i], result)

    def _model_kwargs(self, request: InferRequest) -> tuple[int, ...]:
        """Extra positional arguments the model itself takes: top_k for the post-processing endpoint."""
        if self.signature.task == "postprocess":
            return (int(request.parameters.get("top_k", self.signature.outputs[0].shape[-1])),)
        return ()

    def predict(self, args: list[Any]) -> dict[str, torch.Tensor]:
        """Run the model once on a stacked batch; outputs named as the manifest declares."""
        assert self.model is not None
        with torch.inference_mode():
            raw = self.model(*args)
        values = (raw,) if isinstance(raw, torch.Tensor) else tuple(raw)
        names = [s.name for s in self.signature.outputs]
        if len(values) != len(names):
            raise RuntimeError(f"model returned {len(values)} outputs, manifest declares {len(names)}")
        return {n: v.to("cpu") for n, v in zip(names, values, strict=True)}

    def _encode(self, request: InferRequest, result: dict[str, torch.Tensor]) -> _Reply:
        try:
            result = self._postprocess(request, result)
            if request.requested_outputs:
                unknown = sorted(set(request.requested_outputs) - set(result))
                if unknown:
                    raise BadRequest(f"unknown outputs {unknown}; this endpoint returns {sorted(result)}")
                result = {n: result[n] for n in request.requested_outputs}
            body, headers = encode_response(
                result,
                model_name=self.endpoint,
                model_version=self.signature.version,
                request_id=request.id,
                binary_outputs=request.binary_outputs,
            )
        except ClientError as exc:
            return _Reply(encode_error(str(exc)), exc.status)
        return _Reply(body, 200, headers)

    def _postprocess(self, request: InferRequest, result: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        k = request.parameters.get("top_k")
        if k is None or self.topk is None:
            return result
        logits = result[self.signature.outputs[0].name]
        with torch.inference_mode():
            probabilities, classes = self.topk(logits, int(k))
        return {**result, "probabilities": probabilities, "classes": classes}


def _phrase(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])[:200]
    except (ValueError, KeyError, TypeError):
        return "error"
