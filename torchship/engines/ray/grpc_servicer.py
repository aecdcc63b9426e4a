"""OIP v2 gRPC for the Ray app (`inference.GRPCInferenceService`): ServerLive, ServerReady, ServerMetadata, ModelReady,
ModelMetadata and ModelInfer, answered by the ingress through Ray Serve's gRPC proxy.

A ModelInfer message becomes the OIP REST body (binary extension) the handler core decodes, so it meets the same
validation, the same endpoint deployment and the same `@serve.batch` as a REST request; the core's reply becomes a
ModelInferResponse with `raw_output_contents`. Errors carry the gRPC code of their REST status (`STATUS_CODES`).

Imported by the ingress at its first gRPC call and by Ray's proxy through `SERVICER_FUNCTION`; the messages are
tritonclient's generated `service_pb2` (tritonclient[grpc]).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import grpc  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError, Message  # type: ignore[import-untyped]
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from tritonclient.grpc import service_pb2 as pb

from torchship.handlers.errors import TOKEN_FAILED
from torchship.handlers.names import AUTHORIZATION_HEADER, BINARY_HEADER, DRAINING_MESSAGE, TIMING_HEADER
from torchship.handlers.tracing import TRACEPARENT
from torchship.handlers.wire import Reply, server_timing, split_body, token_matches

SERVICE = "inference.GRPCInferenceService"
#: The RPCs the ingress answers, each by its method of the same name; the service's others answer UNIMPLEMENTED.
METHODS = ("ServerLive", "ServerReady", "ServerMetadata", "ModelReady", "ModelMetadata", "ModelInfer")
#: What a Serve config's `grpc_options.grpc_servicer_functions` names (configs/ray-serve.yaml, engines/ray.py).
SERVICER_FUNCTION = "torchship.engines.ray.grpc_servicer.add_inference_servicer"

#: The gRPC code of each REST status, so one mistake gets the same answer on both protocols. 413 is
#: RESOURCE_EXHAUSTED, the code gRPC itself gives a message over a server's size limit. 405 and 415 have no gRPC
#: cause (one method per RPC, no content type) but would be the client's mistake.
STATUS_CODES: Mapping[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.INVALID_ARGUMENT,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}
#: The typed `contents` field each OIP datatype travels in (FP16 and BF16 have none: raw_input_contents only).
CONTENTS_FIELDS: Mapping[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
#: OIP datatypes the codec decodes that have no typed contents field: their values travel in raw_input_contents.
RAW_ONLY_DATATYPES = frozenset({"FP16", "BF16"})
#: Reply headers that travel back as trailing metadata (gRPC metadata keys are lower case).
TRAILING_HEADERS = ("x-torchship-batch-requests", "x-torchship-batch-rows", "x-torchship-node", TIMING_HEADER.lower())


def grpc_code(status: int, message: str) -> grpc.StatusCode:
    """The gRPC code for a REST status; a refused token is UNAUTHENTICATED (REST answers TorchServe's 400 there)."""
    if message == TOKEN_FAILED:
        return grpc.StatusCode.UNAUTHENTICATED
    return STATUS_CODES.get(status, grpc.StatusCode.INTERNAL)


class GrpcRefusal(Exception):
    """A request answered with a non-OK gRPC status and this message as its details."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> GrpcRefusal:
    return GrpcRefusal(grpc.StatusCode.INVALID_ARGUMENT, message)


def add_inference_servicer(servicer: Any, server: grpc.Server) -> None:
    """Register the served RPCs of GRPCInferenceService on `server` (Ray's proxy passes a placeholder servicer and
    routes each RPC to the ingress method of its name).

    No request deserializer: the ingress gets the message's bytes and parses them itself, so a malformed message
    is the client's INVALID_ARGUMENT, not the INTERNAL that gRPC answers when its own deserializer fails.
    """
    handlers = {name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name)) for name in METHODS}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


M = TypeVar("M", bound=Message)


def model_ready(address: str, name: str, *, timeout_s: float = 5.0) -> bool:
    """Client side: ModelReady over gRPC at `address` (host:port); raises grpc.RpcError when nothing answers."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            f"/{SERVICE}/ModelReady",
            request_serializer=pb.ModelReadyRequest.SerializeToString,
            response_deserializer=pb.ModelReadyResponse.FromString,
        )
        return bool(call(pb.ModelReadyRequest(name=name), timeout=timeout_s).ready)


def parse(message_type: type[M], raw: bytes) -> M:
    """`raw` as a `message_type`; INVALID_ARGUMENT when it is not one (bad wire format, or fields it does not have:
    unknown fields are refused as REST refuses unknown JSON keys)."""
    if not isinstance(raw, bytes):  # a proxy that deserialized for us would hand over a message object
        raise GrpcRefusal(grpc.StatusCode.INTERNAL, f"expected the message's bytes, got {type(raw).__name__}")
    name = message_type.DESCRIPTOR.full_name
    try:
        message: M = message_type.FromString(raw)
    except DecodeError:
        raise _invalid(f"the request is not a valid {name} message (protobuf wire format)") from None
    size = message.ByteSize()
    message.DiscardUnknownFields()
    if message.ByteSize() != size:
        raise _invalid(f"the request has fields {name} does not define; send an {name}")
    return message


def _parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """An InferParameter map as plain values (the codec then refuses names it does not understand)."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, choice) if choice else None
    return out


def _typed_data(tensor: Any) -> list[Any]:
    """An input's values from the `contents` field its datatype travels in."""
    present = sorted(f.name for f, _ in tensor.contents.ListFields())
    field = CONTENTS_FIELDS.get(tensor.datatype)
    if field is None:
        if tensor.datatype in RAW_ONLY_DATATYPES:
            raise _invalid(f"input {tensor.name!r}: {tensor.datatype} has no typed contents in OIP; send raw_input_contents")
        return []  # the codec refuses the datatype, naming the one the endpoint takes
    if any(f != field for f in present):
        raise _invalid(f"input {tensor.name!r}: {tensor.datatype} values go in contents.{field}, got contents.{present}")
    return list(getattr(tensor.contents, field))


def infer_body(request: Any) -> tuple[bytes, dict[str, str]]:
    """The OIP REST body (binary extension, outputs asked as raw bytes) and headers for a ModelInferRequest."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise _invalid(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; give one per input")
    entries: list[dict[str, Any]] = []
    for i, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype}
        params = _parameters(tensor.parameters)
        if raw:
            if tensor.contents.ListFields():
                raise _invalid(f"input {tensor.name!r}: give contents or raw_input_contents, not both")
            params["binary_data_size"] = len(raw[i])
        else:
            entry["data"] = _typed_data(tensor)
        if params:
            entry["parameters"] = params
        entries.append(entry)
    doc: dict[str, Any] = {"inputs": entries, "parameters": {**_parameters(request.parameters), "binary_data_output": True}}
    if request.id:
        doc["id"] = request.id
    if request.outputs:
        doc["outputs"] = [
            {"name": o.name, "parameters": {**_parameters(o.parameters), "binary_data": True}} for o in request.outputs
        ]
    try:
        header = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except ValueError:
        raise _invalid("an input contains NaN or Inf; only finite values are served") from None
    except TypeError:
        raise _invalid("bytes_contents is not served; these endpoints take numeric tensors") from None
    return header + b"".join(raw), {"content-type": "application/octet-stream", BINARY_HEADER: str(len(header))}


def infer_response(reply: Reply) -> Any:
    """The core's 200 reply (JSON header + raw outputs) as a ModelInferResponse with raw_output_contents."""
    doc, tail = split_body(reply.body, reply.headers.get("Inference-Header-Content-Length"))
    response = pb.ModelInferResponse(model_name=doc["model_name"], model_version=doc["model_version"], id=doc.get("id", ""))
    offset = 0
    for out in doc["outputs"]:
        size = int(out["parameters"]["binary_data_size"])
        response.outputs.add(name=out["name"], datatype=out["datatype"], shape=out["shape"])
        response.raw_output_contents.append(tail[offset : offset + size])
        offset += size
    if offset != len(tail):
        raise RuntimeError(f"the handler's reply has {len(tail)} output bytes, its header lists {offset}")
    return response


def metadata_response(doc: Mapping[str, Any]) -> Any:
    """The core's OIP metadata document as a ModelMetadataResponse."""

    def tensors(entries: Sequence[Mapping[str, Any]]) -> list[Any]:
        return [
            pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in entries
        ]

    return pb.ModelMetadataResponse(
        name=doc["name"],
        versions=doc["versions"],
        platform=doc["platform"],
        inputs=tensors(doc["inputs"]),
        outputs=tensors(doc["outputs"]),
    )


class GrpcContext(Protocol):
    """What the frontend uses of Ray's `RayServegRPCContext` (the call's metadata, status and trailers)."""

    def invocation_metadata(self) -> list[tuple[str, str]]: ...
    def set_code(self, code: grpc.StatusCode) -> None: ...
    def set_details(self, details: str) -> None: ...
    def set_trailing_metadata(self, trailing_metadata: list[tuple[str, str]]) -> None: ...


class IngressState(Protocol):
    """What the frontend reads of the ingress (app.py's `Ingress`)."""

    endpoints: dict[str, DeploymentHandle[Any]]
    server_metadata: dict[str, Any]
    versions: dict[str, str]
    token: str | None
    max_request_bytes: int
    #: Endpoints served by an archive's own TorchServe handler: REST only (it takes a request body, not tensors).
    foreign: frozenset[str]
    #: The drain's stage ("" serving, "not_ready", "refusing") and the inference calls accepted and not yet answered.
    draining: str
    accepted: int

    async def _ready(self, name: str) -> bool: ...
    def count_shed(self, name: str) -> None: ...
    async def call_endpoint(self, name: str, body: bytes, headers: dict[str, str]) -> Reply: ...


class GrpcFrontend:
    """The ingress's gRPC side: each RPC parses its message, asks the same endpoint deployments REST asks, and
    answers a message (empty, with the status and details set, when refused)."""

    def __init__(self, ingress: IngressState) -> None:
        self.ingress = ingress
        #: Each served RPC: its method here, and its response type (sent empty when the call is refused).
        self.rpcs: dict[str, tuple[Callable[[bytes, GrpcContext], Awaitable[Message]], type[Message]]] = {
            "ServerLive": (self.server_live, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyResponse),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyResponse),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataResponse),
            "ModelInfer": (self.model_infer, pb.ModelInferResponse),
        }
        if set(self.rpcs) != set(METHODS):
            raise RuntimeError(f"the frontend serves {sorted(self.rpcs)}, the servicer registers {sorted(METHODS)}")

    async def call(self, rpc: str, raw: bytes, context: GrpcContext) -> Message:
        """Answer one RPC; a refusal sets the call's status and details. Anything else raised is Ray's to map
        (a full ingress RESOURCE_EXHAUSTED, no replica UNAVAILABLE, a fault INTERNAL)."""
        method, response_type = self.rpcs[rpc]
        try:
            return await method(raw, context)
        except GrpcRefusal as exc:
            context.set_code(exc.code)
            context.set_details(str(exc))
            return response_type()

    async def server_live(self, raw: bytes, context: GrpcContext) -> Message:
        parse(pb.ServerLiveRequest, raw)
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, raw: bytes, context: GrpcContext) -> Message:
        parse(pb.ServerReadyRequest, raw)
        ready = not self.ingress.draining and all([await self.ingress._ready(name) for name in sorted(self.ingress.endpoints)])
        return pb.ServerReadyResponse(ready=ready)

    async def server_metadata(self, raw: bytes, context: GrpcContext) -> Message:
        parse(pb.ServerMetadataRequest, raw)
        return pb.ServerMetadataResponse(**self.ingress.server_metadata)

    def _known(self, name: str, version: str) -> None:
        if name not in self.ingress.endpoints:
            raise GrpcRefusal(grpc.StatusCode.NOT_FOUND, f"Model not found: {name}")
        if version and version != self.ingress.versions.get(name):
            raise GrpcRefusal(grpc.StatusCode.NOT_FOUND, f"Model version: {version} does not exist for model: {name}")

    async def model_ready(self, raw: bytes, context: GrpcContext) -> Message:
        request = parse(pb.ModelReadyRequest, raw)
        self._known(request.name, request.version)
        # Not ready is an answer (ready: false), not an error: the REST route's 503 is for HTTP probes.
        return pb.ModelReadyResponse(ready=await self.ingress._ready(request.name))

    async def model_metadata(self, raw: bytes, context: GrpcContext) -> Message:
        request = parse(pb.ModelMetadataRequest, raw)
        self._known(request.name, request.version)
        return metadata_response(await self.ingress.endpoints[request.name].metadata.remote())

    async def model_infer(self, raw: bytes, context: GrpcContext) -> Message:
        """Counted with REST's inference calls, so a drain waits for both and refuses both alike."""
        if self.ingress.draining == "refusing":
            raise GrpcRefusal(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        self.ingress.accepted += 1
        try:
            return await self._accepted(raw, context)
        finally:
            self.ingress.accepted -= 1

    async def _accepted(self, raw: bytes, context: GrpcContext) -> Message:
        started = time.perf_counter()
        # The REST route's order: the token, then the size, then the request itself.
        metadata = dict(context.invocation_metadata())
        authorization = metadata.get(AUTHORIZATION_HEADER)
        if self.ingress.token and not token_matches(authorization, self.ingress.token):
            raise GrpcRefusal(grpc.StatusCode.UNAUTHENTICATED, TOKEN_FAILED)
        if len(raw) > self.ingress.max_request_bytes:
            raise GrpcRefusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"message is {len(raw)} bytes; the limit is {self.ingress.max_request_bytes}"
            )
        request = parse(pb.ModelInferRequest, raw)
        self._known(request.model_name, request.model_version)
        if request.model_name in self.ingress.foreign:
            raise GrpcRefusal(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{request.model_name} is served by its archive's own TorchServe handler, over REST only "
                f"(POST /predictions/{request.model_name})",
            )
        body, headers = infer_body(request)
        if authorization is not None:  # the core checks the token again where the replica has one configured
            headers[AUTHORIZATION_HEADER] = authorization
        if TRACEPARENT in metadata:  # W3C trace context travels as gRPC metadata, as on REST as a header
            headers[TRACEPARENT] = metadata[TRACEPARENT]
        try:
            reply: Reply = await self.ingress.call_endpoint(request.model_name, body, headers)
        except BackPressureError:
            self.ingress.count_shed(request.model_name)
            raise GrpcRefusal(
                grpc.StatusCode.UNAVAILABLE, f"endpoint {request.model_name!r} is at its queue limit; retry later"
            ) from None
        timing = server_timing({"ingress": (time.perf_counter() - started) * 1000.0})
        trailers = {k.lower(): v for k, v in reply.headers.items() if k.lower() in TRAILING_HEADERS}
        handler_timing = trailers.get(TIMING_HEADER.lower())
        trailers[TIMING_HEADER.lower()] = f"{handler_timing}, {timing}" if handler_timing else timing
        context.set_trailing_metadata(sorted(trailers.items()))
        if reply.status != 200:
            message = str(json.loads(reply.body).get("error", "")) if reply.body else ""
            raise GrpcRefusal(grpc_code(reply.status, message), message)
        return infer_response(reply)
