"""OIP v2 wire codec: request bodies (JSON or the binary-data extension) to validated tensors, and back.

torch + stdlib only: this module travels inside every .mar and runs on a stock TorchServe.
"""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from .wire import split_body

#: OIP v2 datatype names and the torch dtypes they map to.
DATATYPES: Mapping[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
DATATYPE_OF: Mapping[torch.dtype, str] = {v: k for k, v in DATATYPES.items()}
#: OIP's request fields, plus the `model_name` the KServe SDK's clients always send (a string; the path names the
#: endpoint, as on KServe's own server).
REQUEST_KEYS = frozenset({"id", "model_name", "inputs", "outputs", "parameters"})
INPUT_KEYS = frozenset({"name", "shape", "datatype", "data", "parameters"})
INPUT_PARAMETERS = frozenset({"binary_data_size"})
OUTPUT_KEYS = frozenset({"name", "parameters"})
OUTPUT_PARAMETERS = frozenset({"binary_data"})
#: Request-level parameters torchship understands; anything else is refused rather than silently ignored.
REQUEST_PARAMETERS = frozenset({"top_k", "binary_data_output"})


#: Content types a request may carry (parameters such as `; charset=utf-8` aside). None given means JSON, as curl
#: and most clients send it; anything else (form posts, multipart, text) is refused rather than guessed at.
ACCEPTED_CONTENT_TYPES = frozenset({"application/json", "application/octet-stream"})


@dataclass(frozen=True)
class TensorSignature:
    name: str
    datatype: str
    shape: tuple[int, ...]
    min_shape: tuple[int, ...]
    max_shape: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSignature:
        return cls(d["name"], d["datatype"], tuple(d["shape"]), tuple(d["min_shape"]), tuple(d["max_shape"]))


@dataclass(frozen=True)
class Signature:
    """What an endpoint accepts and returns, read from the archive's manifest.json."""

    name: str
    version: str
    task: str
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]
    max_batch_size: int

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Signature:
        return cls(
            name=manifest["name"],
            version=manifest["version"],
            task=manifest["task"],
            inputs=tuple(TensorSignature.from_dict(t) for t in manifest["inputs"]),
            outputs=tuple(TensorSignature.from_dict(t) for t in manifest["outputs"]),
            max_batch_size=int(manifest["max_batch_size"]),
        )


def model_metadata(endpoint: str, fmt: str, signature: Signature) -> dict[str, Any]:
    """OIP v2 model metadata (`GET /v2/models/<endpoint>`): what the handler answers on the Ray app and what
    `torchship archive` writes into the archive for TorchServe's inference port."""

    def tensors(ts: tuple[TensorSignature, ...]) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

    return {
        "name": endpoint,
        "versions": [signature.version],
        "platform": f"pytorch_{fmt}",
        "inputs": tensors(signature.inputs),
        "outputs": tensors(signature.outputs),
    }


@dataclass
class InferRequest:
    """A decoded, validated request: one tensor per signature input, in signature order."""

    inputs: dict[str, torch.Tensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    #: Output names the client asked to get as raw bytes.
    binary_outputs: frozenset[str] = frozenset()
    #: Output names the client asked for; empty means all.
    requested_outputs: tuple[str, ...] = ()

    @property
    def batch_size(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def shape_key(self) -> tuple[tuple[int, ...], ...]:
        """Requests with the same key can be stacked along the batch dim."""
        return tuple(tuple(t.shape[1:]) for t in self.inputs.values())


def check_content_type(value: str | None) -> None:
    """Refuse a body whose declared media type torchship does not decode (415)."""
    if value is None or not value.strip():
        return
    media = value.split(";", 1)[0].strip().lower()
    if media not in ACCEPTED_CONTENT_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {media!r} is not served; send application/json, or application/octet-stream with "
            "Inference-Header-Content-Length for the binary extension"
        )


def check_body_size(body: object, limit_bytes: int | None) -> None:
    """Refuse a body over the endpoint's limit with 413 (engines that parse the body first cannot be measured)."""
    if limit_bytes is not None and isinstance(body, (bytes, bytearray, str)) and len(body) > limit_bytes:
        raise PayloadTooLarge(f"body is {len(body)} bytes; the limit is {limit_bytes}")


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise BadRequest(message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_from_json(name: str, data: Any, datatype: str, numel: int) -> torch.Tensor:
    _expect(isinstance(data, list), f"input {name!r}: data must be a flat JSON array")
    _expect(len(data) == numel, f"input {name!r}: data has {len(data)} values but shape needs {numel}")
    dtype = DATATYPES[datatype]
    try:
        if dtype.is_floating_point:
            tensor = torch.tensor(data, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        else:
            tensor = torch.tensor(data)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise BadRequest(f"input {name!r}: data must be a flat array of {datatype} numbers") from None
    _expect(tensor.dim() == 1, f"input {name!r}: data must be a flat array (row-major), not nested")
    if dtype == torch.bool:
        _expect(tensor.dtype == torch.bool or numel == 0, f"input {name!r}: BOOL data must be true/false")
    elif not dtype.is_floating_point:
        _expect(tensor.dtype == torch.int64 or numel == 0, f"input {name!r}: {datatype} data must be integers")
        info = torch.iinfo(dtype)
        if numel:
            _expect(
                int(tensor.min()) >= info.min and int(tensor.max()) <= info.max,
                f"input {name!r}: values out of range for {datatype}",
            )
    return tensor.to(dtype)


def _tensor_from_bytes(name: str, raw: bytes, datatype: str, shape: list[int]) -> torch.Tensor:
    dtype = DATATYPES[datatype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    _expect(
        len(raw) == numel * itemsize,
        f"input {name!r}: binary_data_size is {len(raw)} bytes but shape {shape} needs {numel * itemsize}",
    )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


def _check_shape(sig: TensorSignature, shape: Any, max_batch_size: int) -> list[int]:
    name = sig.name
    _expect(isinstance(shape, list) and all(_is_int(d) for d in shape), f"input {name!r}: shape must be a list of integers")
    _expect(len(shape) == len(sig.shape), f"input {name!r}: expected rank {len(sig.shape)} {list(sig.shape)}, got shape {shape}")
    for i, (d, lo, hi) in enumerate(zip(shape, sig.min_shape, sig.max_shape, strict=True)):
        _expect(d >= 1, f"input {name!r}: dim {i} is {d}; every dim must be >= 1")
        if sig.shape[i] != -1:
            _expect(d == sig.shape[i], f"input {name!r}: dim {i} must be {sig.shape[i]}, got {d} (shape {shape})")
        else:
            _expect(lo <= d <= hi, f"input {name!r}: dim {i} is {d}, allowed {lo}..{hi}")
    _expect(shape[0] <= max_batch_size, f"input {name!r}: batch {shape[0]} is over this endpoint's limit of {max_batch_size}")
    return list(shape)


def _check_parameters(params: Any, sig: Signature) -> dict[str, Any]:
    if params is None:
        return {}
    _expect(isinstance(params, dict), "parameters must be a JSON object")
    unknown = sorted(set(params) - REQUEST_PARAMETERS)
    _expect(not unknown, f"unknown parameters {unknown}; this endpoint understands {sorted(REQUEST_PARAMETERS)}")
    if "top_k" in params:
        k = params["top_k"]
        _expect(sig.task in ("classifier", "postprocess"), f"parameters.top_k applies to classifiers; {sig.name!r} is not one")
        classes = sig.outputs[0].shape[-1] if sig.task == "classifier" else None
        limit = classes if classes and classes > 0 else None
        _expect(
            _is_int(k) and k >= 1 and (limit is None or k <= limit),
            f"parameters.top_k must be an integer in 1..{limit or 'C'}, got {k!r}",
        )
    if "binary_data_output" in params:
        _expect(isinstance(params["binary_data_output"], bool), "parameters.binary_data_output must be true or false")
    return dict(params)


def decode_request(
    body: bytes | bytearray | str | Mapping[str, Any], sig: Signature, *, header_length: str | None = None
) -> InferRequest:
    """Decode and validate one request against the endpoint's signature; raises ClientError naming the field."""
    doc, tail = split_body(body, header_length)
    _expect(isinstance(doc, dict), "request must be a JSON object with an 'inputs' array")
    extra = sorted(set(doc) - REQUEST_KEYS)
    _expect(not extra, f"unknown fields {extra}; a request has {sorted(REQUEST_KEYS)}")
    _expect("inputs" in doc, "missing field 'inputs'")
    request_id = doc.get("id")
    _expect(request_id is None or isinstance(request_id, str), "id must be a string")
    _expect(isinstance(doc.get("model_name", ""), str), "model_name must be a string")
    params = _check_parameters(doc.get("parameters"), sig)
    inputs = doc["inputs"]
    _expect(isinstance(inputs, list) and len(inputs) > 0, "inputs must be a non-empty array")
    by_name = {s.name: s for s in sig.inputs}
    seen: dict[str, torch.Tensor] = {}
    offset = 0
    for item in inputs:
        _expect(isinstance(item, dict), "every entry of inputs must be an object")
        extra = sorted(set(item) - INPUT_KEYS)
        _expect(not extra, f"unknown fields {extra} in an input; an input has {sorted(INPUT_KEYS)}")
        name = item.get("name")
        _expect(isinstance(name, str), "every input needs a string 'name'")
        _expect(name in by_name, f"unknown input {name!r}; this endpoint takes {sorted(by_name)}")
        _expect(name not in seen, f"input {name!r} is given twice")
        s = by_name[name]
        _expect(
            item.get("datatype") == s.datatype, f"input {name!r}: datatype must be {s.datatype}, got {item.get('datatype')!r}"
        )
        shape = _check_shape(s, item.get("shape"), sig.max_batch_size)
        in_params = item.get("parameters") or {}
        _expect(isinstance(in_params, dict), f"input {name!r}: parameters must be an object")
        unknown = sorted(set(in_params) - INPUT_PARAMETERS)
        _expect(not unknown, f"input {name!r}: unknown parameters {unknown}")
        if "binary_data_size" in in_params:
            size = in_params["binary_data_size"]
            _expect(_is_int(size) and size >= 0, f"input {name!r}: binary_data_size must be a non-negative integer")
            _expect("data" not in item, f"input {name!r}: give either data or binary_data_size, not both")
            _expect(offset + size <= len(tail), f"input {name!r}: binary_data_size {size} runs past the end of the body")
            tensor = _tensor_from_bytes(name, tail[offset : offset + size], s.datatype, shape)
            offset += size
        else:
            _expect("data" in item, f"input {name!r}: missing 'data' (or parameters.binary_data_size)")
            tensor = _tensor_from_json(name, item["data"], s.datatype, math.prod(shape)).reshape(shape)
        if tensor.is_floating_point():
            _expect(bool(torch.isfinite(tensor).all()), f"input {name!r}: contains NaN or Inf; only finite values are served")
        seen[name] = tensor
    _expect(offset == len(tail), f"the body has {len(tail) - offset} bytes after the last binary input")
    missing = [s.name for s in sig.inputs if s.name not in seen]
    _expect(not missing, f"missing inputs {missing}")
    batches = {t.shape[0] for t in seen.values()}
    _expect(len(batches) == 1, f"all inputs must have the same batch size, got {sorted(batches)}")
    binary_outputs, requested = _check_outputs(doc.get("outputs"), params)
    return InferRequest(
        inputs={s.name: seen[s.name] for s in sig.inputs},
        id=request_id,
        parameters=params,
        binary_outputs=binary_outputs,
        requested_outputs=requested,
    )


def _check_outputs(outputs: Any, params: Mapping[str, Any]) -> tuple[frozenset[str], tuple[str, ...]]:
    """Which outputs the client asked for and which of them as binary. '*' means every output."""
    binary_all = bool(params.get("binary_data_output", False))
    if outputs is None:
        return (frozenset({"*"}) if binary_all else frozenset()), ()
    _expect(isinstance(outputs, list), "outputs must be an array")
    names: list[str] = []
    binary: set[str] = set()
    for item in outputs:
        _expect(isinstance(item, dict) and isinstance(item.get("name"), str), "every requested output needs a string 'name'")
        extra = sorted(set(item) - OUTPUT_KEYS)
        _expect(not extra, f"unknown fields {extra} in a requested output")
        p = item.get("parameters") or {}
        _expect(
            isinstance(p, dict) and not set(p) - OUTPUT_PARAMETERS,
            f"output {item['name']!r}: only parameters.binary_data is understood",
        )
        if p.get("binary_data", binary_all):
            binary.add(item["name"])
        names.append(item["name"])
    return frozenset(binary), tuple(names)


def encode_response(
    outputs: Mapping[str, torch.Tensor],
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    binary_outputs: frozenset[str] = frozenset(),
) -> tuple[bytes, dict[str, str]]:
    """(body, extra headers). Binary outputs follow the JSON header as raw little-endian bytes."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, tensor in outputs.items():
        t = tensor.detach().to("cpu").contiguous()
        entry: dict[str, Any] = {"name": name, "shape": list(t.shape), "datatype": DATATYPE_OF[t.dtype]}
        if "*" in binary_outputs or name in binary_outputs:
            raw = _raw_bytes(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = t.flatten().tolist()
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = entries
    header = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    if not chunks:
        return header, {}
    return header + b"".join(chunks), {"Inference-Header-Content-Length": str(len(header))}


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""


def encode_request(
    inputs: Mapping[str, torch.Tensor],
    *,
    binary: bool = False,
    parameters: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Client side: tensors to a request body and its headers (JSON, or the binary-data extension)."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, tensor in inputs.items():
        entry: dict[str, Any] = {"name": name, "shape": list(tensor.shape), "datatype": DATATYPE_OF[tensor.dtype]}
        if binary:
            raw = _raw_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = tensor.detach().flatten().tolist()
        entries.append(entry)
    doc: dict[str, Any] = {"inputs": entries}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = dict(parameters)
    header = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def decode_response(body: bytes, header_length: str | None = None) -> dict[str, Any]:
    """Client side: a response body to {"outputs": {name: tensor}, ...}; used by clients and tests."""
    doc, tail = split_body(body, header_length)
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for out in doc.get("outputs", []):
        dtype = DATATYPES[out["datatype"]]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw = tail[offset : offset + size]
            offset += size
            tensors[out["name"]] = (
                torch.frombuffer(bytearray(raw), dtype=dtype).reshape(out["shape"])
                if size
                else torch.empty(out["shape"], dtype=dtype)
            )
        else:
            tensors[out["name"]] = torch.tensor(out["data"], dtype=dtype).reshape(out["shape"])
    return {**doc, "outputs": tensors}
