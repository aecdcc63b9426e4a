"""Hostile OIP v2 gRPC against a running Ray app: malformed protobuf, wrong datatypes, lying raw sizes, unknown
models, bad tokens, a message over the size limit. Each case must get its gRPC status code, and afterwards the
server must still answer a valid ModelInfer with the eager outputs.

`run_grpc_corpus(address, token)` is the entry point (`make reliability`, tests/e2e/test_ray.py). Messages are
sent through a generic channel with identity serializers, so the bytes reach the server exactly as written.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc  # type: ignore[import-untyped]
import numpy as np
import torch
from tritonclient.grpc import service_pb2 as pb

#: The endpoint hostile requests aim at, and whose valid answer shows the server is still healthy.
HEALTH_ENDPOINT = "dynamic_router"
SERVICE = "inference.GRPCInferenceService"
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@dataclass(frozen=True)
class GrpcCase:
    id: str
    group: str
    rpc: str
    expected: grpc.StatusCode
    #: (message bytes, metadata); given the token, the request size limit and a valid request's builder.
    build: Callable[[CaseInputs], tuple[bytes, list[tuple[str, str]]]]


@dataclass(frozen=True)
class CaseInputs:
    token: str | None
    limit_bytes: int | None

    def auth(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []


@dataclass(frozen=True)
class GrpcCaseResult:
    case: str
    group: str
    rpc: str
    expected: str
    code: str
    healthy_after: bool
    detail: str

    @property
    def passed(self) -> bool:
        return self.code == self.expected and self.healthy_after


def infer_request(batch: int = 2, *, seed: int = 0, raw: bool = True, model: str = HEALTH_ENDPOINT) -> Any:
    """A valid ModelInferRequest for the health endpoint (x: FP32 [batch, 256]), raw or typed contents."""
    x = health_inputs(batch, seed)
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    if raw:
        request.raw_input_contents.append(x.numpy().astype("<f4").tobytes())
    else:
        tensor.contents.fp32_contents.extend(x.flatten().tolist())
    return request


def health_inputs(batch: int, seed: int) -> torch.Tensor:
    from torchship.models import ZOO

    return ZOO[HEALTH_ENDPOINT].make_inputs(batch, seed_offset=20_000 + seed)["x"]


def _edited(edit: Callable[[Any], None], *, raw: bool = True) -> Callable[[CaseInputs], tuple[bytes, list[tuple[str, str]]]]:
    def build(ci: CaseInputs) -> tuple[bytes, list[tuple[str, str]]]:
        request = infer_request(raw=raw)
        edit(request)
        return request.SerializeToString(), ci.auth()

    return build


def _bytes(data: bytes, *, auth: bool = True) -> Callable[[CaseInputs], tuple[bytes, list[tuple[str, str]]]]:
    return lambda ci: (data, ci.auth() if auth else [])


def _set(field: str, value: Any) -> Callable[[Any], None]:
    def edit(request: Any) -> None:
        setattr(request.inputs[0], field, value)

    return edit


def _shape(shape: list[int]) -> Callable[[Any], None]:
    def edit(request: Any) -> None:
        del request.inputs[0].shape[:]
        request.inputs[0].shape.extend(shape)

    return edit


def _raw(transform: Callable[[bytes], bytes]) -> Callable[[Any], None]:
    def edit(request: Any) -> None:
        request.raw_input_contents[0] = transform(request.raw_input_contents[0])

    return edit


def _typed_in(field: str) -> Callable[[CaseInputs], tuple[bytes, list[tuple[str, str]]]]:
    def build(ci: CaseInputs) -> tuple[bytes, list[tuple[str, str]]]:
        request = infer_request(raw=False)
        values = list(request.inputs[0].contents.fp32_contents)
        request.inputs[0].contents.ClearField("fp32_contents")
        getattr(request.inputs[0].contents, field).extend(int(v * 100) for v in values)
        return request.SerializeToString(), ci.auth()

    return build


def _with_token(header: str | None) -> Callable[[CaseInputs], tuple[bytes, list[tuple[str, str]]]]:
    return lambda ci: (infer_request().SerializeToString(), [("authorization", header)] if header is not None else [])


def _over_limit(ci: CaseInputs) -> tuple[bytes, list[tuple[str, str]]]:
    rows = (ci.limit_bytes or 0) // (256 * 4) + 1
    request = pb.ModelInferRequest(model_name=HEALTH_ENDPOINT)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 256])
    request.raw_input_contents.append(bytes(rows * 256 * 4))
    return request.SerializeToString(), ci.auth()


def _nan_raw(data: bytes) -> bytes:
    return struct.pack("<f", math.nan) + data[4:]


def _unknown_field(ci: CaseInputs) -> tuple[bytes, list[tuple[str, str]]]:
    # Field 99, varint 1: valid protobuf that ModelInferRequest does not define.
    return infer_request().SerializeToString() + bytes([0x98, 0x06, 0x01]), ci.auth()


def _truncated(ci: CaseInputs) -> tuple[bytes, list[tuple[str, str]]]:
    return infer_request().SerializeToString()[:-7], ci.auth()


def _add_output(name: str) -> Callable[[Any], None]:
    return lambda request: request.outputs.add(name=name)


def _add_parameter(request: Any) -> None:
    request.parameters["priority"].int64_param = 1


def _second_raw(request: Any) -> None:
    request.raw_input_contents.append(b"\0" * 8)


def _typed_and_raw(request: Any) -> None:
    request.inputs[0].contents.fp32_contents.extend([0.0])


def _nan_typed(request: Any) -> None:
    request.inputs[0].contents.fp32_contents[0] = math.inf


def _model(name: str, version: str = "") -> Callable[[Any], None]:
    def edit(request: Any) -> None:
        request.model_name, request.model_version = name, version

    return edit


def _plain(message: Any) -> Callable[[CaseInputs], tuple[bytes, list[tuple[str, str]]]]:
    return lambda ci: (message.SerializeToString(), [])


#: Every case: what it sends and the gRPC code it must get.
CASES: tuple[GrpcCase, ...] = (
    # -- not a ModelInferRequest at all
    GrpcCase("garbage bytes", "malformed protobuf", "ModelInfer", INVALID, _bytes(b"\xff\xff\xff\xff\xff\xff")),
    GrpcCase("truncated message", "malformed protobuf", "ModelInfer", INVALID, _truncated),
    GrpcCase("unknown field number", "malformed protobuf", "ModelInfer", INVALID, _unknown_field),
    GrpcCase("invalid UTF-8 in model_name", "malformed protobuf", "ModelInfer", INVALID, _bytes(b"\x0a\x02\xc3\x28")),
    GrpcCase("empty message", "malformed protobuf", "ModelInfer", NOT_FOUND, _bytes(b"")),
    GrpcCase("garbage to ModelMetadata", "malformed protobuf", "ModelMetadata", INVALID, _bytes(b"\x0a\xff", auth=False)),
    GrpcCase("garbage to ModelReady", "malformed protobuf", "ModelReady", INVALID, _bytes(b"\x12", auth=False)),
    # -- datatypes and contents
    GrpcCase("wrong datatype INT64", "datatype", "ModelInfer", INVALID, _edited(_set("datatype", "INT64"))),
    GrpcCase("unknown datatype FP8", "datatype", "ModelInfer", INVALID, _edited(_set("datatype", "FP8"))),
    GrpcCase("FP32 values in int_contents", "datatype", "ModelInfer", INVALID, _typed_in("int_contents")),
    GrpcCase("FP32 values in int64_contents", "datatype", "ModelInfer", INVALID, _typed_in("int64_contents")),
    GrpcCase("typed contents and raw", "datatype", "ModelInfer", INVALID, _edited(_typed_and_raw)),
    GrpcCase("Inf in fp32_contents", "datatype", "ModelInfer", INVALID, _edited(_nan_typed, raw=False)),
    GrpcCase("NaN in raw contents", "datatype", "ModelInfer", INVALID, _edited(_raw(_nan_raw))),
    # -- raw sizes that lie about the shape
    GrpcCase("raw shorter than shape", "raw sizes", "ModelInfer", INVALID, _edited(_raw(lambda b: b[: len(b) // 2]))),
    GrpcCase("raw longer than shape", "raw sizes", "ModelInfer", INVALID, _edited(_raw(lambda b: b + b"\0" * 4))),
    GrpcCase("raw not a multiple of FP32", "raw sizes", "ModelInfer", INVALID, _edited(_raw(lambda b: b[:-1]))),
    GrpcCase("shape claims more rows", "raw sizes", "ModelInfer", INVALID, _edited(_shape([3, 256]))),
    GrpcCase("two raw entries for one input", "raw sizes", "ModelInfer", INVALID, _edited(_second_raw)),
    GrpcCase("empty raw contents", "raw sizes", "ModelInfer", INVALID, _edited(_raw(lambda b: b""))),
    # -- shapes, outputs, parameters
    GrpcCase("zero batch", "shape", "ModelInfer", INVALID, _edited(_shape([0, 256]))),
    GrpcCase("negative dim", "shape", "ModelInfer", INVALID, _edited(_shape([-2, 256]))),
    GrpcCase("wrong rank", "shape", "ModelInfer", INVALID, _edited(_shape([512]))),
    GrpcCase("huge dim product", "shape", "ModelInfer", INVALID, _edited(_shape([2**40, 2**40]))),
    GrpcCase("unknown input name", "shape", "ModelInfer", INVALID, _edited(_set("name", "nope"))),
    GrpcCase("unknown requested output", "parameters", "ModelInfer", INVALID, _edited(_add_output("nope"))),
    GrpcCase("unknown parameter", "parameters", "ModelInfer", INVALID, _edited(_add_parameter)),
    # -- models and versions
    GrpcCase("unknown model", "routing", "ModelInfer", NOT_FOUND, _edited(_model("no_such_model"))),
    GrpcCase("unknown version", "routing", "ModelInfer", NOT_FOUND, _edited(_model(HEALTH_ENDPOINT, "9.9"))),
    GrpcCase("metadata of unknown model", "routing", "ModelMetadata", NOT_FOUND, _plain(pb.ModelMetadataRequest(name="x"))),
    GrpcCase("ready of unknown model", "routing", "ModelReady", NOT_FOUND, _plain(pb.ModelReadyRequest(name="x"))),
    GrpcCase("unserved RPC", "routing", "RepositoryIndex", grpc.StatusCode.UNIMPLEMENTED, _plain(pb.RepositoryIndexRequest())),
    # -- size
    GrpcCase("message over the size limit", "size", "ModelInfer", grpc.StatusCode.RESOURCE_EXHAUSTED, _over_limit),
)
#: Cases that need a token configured on the server (skipped against a server without one).
TOKEN_CASES: tuple[GrpcCase, ...] = (
    GrpcCase("no token", "token", "ModelInfer", grpc.StatusCode.UNAUTHENTICATED, _with_token(None)),
    GrpcCase("wrong token", "token", "ModelInfer", grpc.StatusCode.UNAUTHENTICATED, _with_token("Bearer not-the-token")),
    GrpcCase("token without Bearer", "token", "ModelInfer", grpc.StatusCode.UNAUTHENTICATED, _with_token("not-the-token")),
    GrpcCase("empty authorization", "token", "ModelInfer", grpc.StatusCode.UNAUTHENTICATED, _with_token("")),
)


def call(channel: grpc.Channel, rpc: str, data: bytes, metadata: Sequence[tuple[str, str]], timeout_s: float) -> Any:
    """Send `data` as the request of `rpc` (no serializer: the bytes go out as given); returns (code, details, bytes)."""
    method = channel.unary_unary(f"/{SERVICE}/{rpc}", request_serializer=None, response_deserializer=None)
    try:
        answer = method(data, metadata=list(metadata), timeout=timeout_s)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", b""
    return OK, "", answer


def healthy(channel: grpc.Channel, token: str | None, seed: int, timeout_s: float) -> str:
    """'' when ServerLive says live and a valid ModelInfer returns the eager outputs, else why not."""
    from torchship.models import ZOO

    code, details, answer = call(channel, "ServerLive", b"", [], timeout_s)
    if code != OK or not pb.ServerLiveResponse.FromString(answer).live:
        return f"ServerLive: {code.name} {details}"
    request = infer_request(3, seed=seed)
    auth = [("authorization", f"Bearer {token}")] if token else []
    code, details, answer = call(channel, "ModelInfer", request.SerializeToString(), auth, timeout_s)
    if code != OK:
        return f"ModelInfer: {code.name} {details[:200]}"
    response = pb.ModelInferResponse.FromString(answer)
    y = torch.from_numpy(np.frombuffer(response.raw_output_contents[0], dtype="<f4").copy()).reshape(3, 256)
    with torch.no_grad():
        expected = ZOO[HEALTH_ENDPOINT].factory()(health_inputs(3, seed))
    if not torch.allclose(y, expected, atol=1e-5, rtol=1e-4):
        return f"wrong answer: max abs diff {float((y - expected).abs().max()):.3g}"
    return ""


def run_grpc_corpus(
    address: str,
    token: str | None,
    *,
    limit_bytes: int | None = None,
    timeout_s: float = 30.0,
    health_every_case: bool = True,
) -> list[GrpcCaseResult]:
    """Every case against the OIP gRPC service at `address` (host:port), each followed by a health check (or, with
    health_every_case=False, each group: a group's cases share the check after its last one). Token cases run when
    `token` is set; the size case when `limit_bytes` (the server's body limit) is given."""
    inputs = CaseInputs(token, limit_bytes)
    cases = [c for c in CASES if limit_bytes is not None or c.group != "size"] + list(TOKEN_CASES if token else ())
    results: list[GrpcCaseResult] = []
    pending: list[tuple[GrpcCase, grpc.StatusCode, str]] = []
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as channel:
        for i, case in enumerate(cases):
            data, metadata = case.build(inputs)
            code, details, _ = call(channel, case.rpc, data, metadata, timeout_s)
            pending.append((case, code, details))
            if not health_every_case and i + 1 < len(cases) and cases[i + 1].group == case.group:
                continue
            after = healthy(channel, token, seed=i, timeout_s=timeout_s)
            for done, got, message in pending:
                detail = message[:300] + (f"; after: {after}" if after else "")
                results.append(GrpcCaseResult(done.id, done.group, done.rpc, done.expected.name, got.name, not after, detail))
            pending = []
    return results
