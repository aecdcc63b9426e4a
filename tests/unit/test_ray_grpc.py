"""The gRPC side of the Ray app without a server: ModelInfer messages become bodies the handler codec decodes to the
same tensors, replies become raw output contents, refusals carry the REST status's code, and the Serve config names
a servicer function that registers the served RPCs with raw bytes in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml
from tritonclient.grpc import service_pb2 as pb

from torchship.engines.ray.grpc_servicer import (
    CONTENTS_FIELDS,
    METHODS,
    RAW_ONLY_DATATYPES,
    SERVICE,
    GrpcRefusal,
    add_inference_servicer,
    grpc_code,
    infer_body,
    infer_response,
    parse,
)
from torchship.handlers.codec import DATATYPES, Signature, decode_request, encode_response
from torchship.handlers.errors import TOKEN_FAILED
from torchship.handlers.names import BINARY_HEADER
from torchship.handlers.wire import Reply

REPO = Path(__file__).resolve().parents[2]
SIGNATURE = Signature.from_manifest(
    {
        "name": "toy",
        "version": "1.0",
        "task": "tensor",
        "max_batch_size": 8,
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 3], "min_shape": [1, 3], "max_shape": [8, 3]},
            {"name": "ids", "datatype": "INT64", "shape": [-1], "min_shape": [1], "max_shape": [8]},
        ],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3], "min_shape": [1, 3], "max_shape": [8, 3]}],
    }
)
X = torch.tensor([[0.5, -1.25, 3.0], [1e-7, 2.0, -0.0]])
IDS = torch.tensor([7, -(2**40)])


def _request(*, raw: bool) -> Any:
    request = pb.ModelInferRequest(model_name="toy", id="r-1")
    x = request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    ids = request.inputs.add(name="ids", datatype="INT64", shape=[2])
    if raw:
        request.raw_input_contents.extend([X.numpy().tobytes(), IDS.numpy().tobytes()])
    else:
        x.contents.fp32_contents.extend(X.flatten().tolist())
        ids.contents.int64_contents.extend(IDS.tolist())
    return request


@pytest.mark.parametrize("raw", [True, False], ids=["raw_input_contents", "typed contents"])
def test_a_model_infer_message_decodes_to_the_same_tensors_as_rest(raw: bool) -> None:
    body, headers = infer_body(_request(raw=raw))
    decoded = decode_request(body, SIGNATURE, header_length=headers[BINARY_HEADER])
    assert torch.equal(decoded.inputs["x"], X) and torch.equal(decoded.inputs["ids"], IDS)
    assert decoded.id == "r-1"
    assert decoded.binary_outputs == frozenset({"*"})  # outputs always come back as raw bytes


def test_a_reply_becomes_raw_output_contents() -> None:
    y = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    body, headers = encode_response(
        {"y": y}, model_name="toy", model_version="1.0", request_id="r-1", binary_outputs=frozenset({"*"})
    )
    response = infer_response(Reply(200, body, headers))
    assert (response.model_name, response.model_version, response.id) == ("toy", "1.0", "r-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("y", "FP32", [2, 3])]
    assert response.raw_output_contents[0] == y.numpy().tobytes()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.raw_input_contents.append(b"\0"), "raw_input_contents has 3 entries for 2 inputs"),
        (lambda r: r.inputs[0].contents.fp32_contents.append(1.0), "give contents or raw_input_contents, not both"),
    ],
)
def test_contradictory_raw_contents_are_refused(edit: Any, message: str) -> None:
    request = _request(raw=True)
    edit(request)
    with pytest.raises(GrpcRefusal, match=message) as caught:
        infer_body(request)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_typed_values_in_another_datatypes_field_are_refused() -> None:
    request = _request(raw=False)
    request.inputs[1].contents.ClearField("int64_contents")
    request.inputs[1].contents.int_contents.extend([1, 2])
    with pytest.raises(GrpcRefusal, match=r"INT64 values go in contents\.int64_contents"):
        infer_body(request)


def test_a_datatype_the_codec_takes_without_typed_contents_must_come_raw() -> None:
    # The servicer names these without importing the codec (and torch); they are exactly the codec's datatypes that
    # OIP gives no contents field.
    assert set(DATATYPES) - set(CONTENTS_FIELDS) == RAW_ONLY_DATATYPES
    request = _request(raw=False)
    request.inputs[0].datatype = "FP16"
    with pytest.raises(GrpcRefusal, match="FP16 has no typed contents in OIP; send raw_input_contents"):
        infer_body(request)


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xff\xff", pb.ModelInferRequest(model_name="toy").SerializeToString() + b"\x98\x06\x01"],
    ids=["garbage", "unknown field"],
)
def test_bytes_that_are_not_the_message_are_invalid_argument(raw: bytes) -> None:
    with pytest.raises(GrpcRefusal) as caught:
        parse(pb.ModelInferRequest, raw)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_rest_statuses_map_to_grpc_codes() -> None:
    assert grpc_code(400, "input 'x': bad") == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_code(400, TOKEN_FAILED) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_code(404, "") == grpc.StatusCode.NOT_FOUND
    assert grpc_code(413, "") == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_code(503, "") == grpc.StatusCode.UNAVAILABLE
    assert grpc_code(500, "") == grpc.StatusCode.INTERNAL
    assert grpc_code(418, "") == grpc.StatusCode.INTERNAL


class _RecordingServer:
    def __init__(self) -> None:
        self.handlers: list[Any] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.handlers.extend(handlers)


def test_the_serve_config_names_a_servicer_that_registers_the_served_rpcs_with_raw_bytes_in() -> None:
    from ray.serve.config import gRPCOptions

    options = yaml.safe_load((REPO / "configs" / "ray-serve.yaml").read_text(encoding="utf-8"))["grpc_options"]
    (function,) = gRPCOptions(**options).grpc_servicer_func_callable
    assert function is add_inference_servicer
    server = _RecordingServer()
    function(type("Servicer", (), dict.fromkeys(METHODS, lambda *a: None))(), server)
    # Ray's proxy reads this table and keeps each handler's request deserializer: none, so the ingress parses.
    (handler,) = server.handlers
    assert sorted(handler._method_handlers) == sorted(f"/{SERVICE}/{m}" for m in METHODS)
    assert all(h.request_deserializer is None for h in handler._method_handlers.values())


class _Context:
    """What Ray's RayServegRPCContext gives the ingress: the call's metadata, and its status to set."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self.metadata = metadata
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailing_metadata: list[tuple[str, str]]) -> None:
        pass


class _Ingress:
    """The ingress state the frontend reads, with no endpoint deployments: nothing here may reach one."""

    def __init__(self, draining: str) -> None:
        self.endpoints: dict[str, Any] = {"toy": None}
        self.versions = {"toy": "1.0"}
        self.token = "secret"
        self.max_request_bytes = 1024
        self.foreign: frozenset[str] = frozenset()
        self.draining = draining
        self.accepted = 0
        self.server_metadata: dict[str, Any] = {"name": "torchship", "version": "9.9", "extensions": ["binary_tensor_data"]}

    async def _ready(self, name: str) -> bool:
        return True


def test_server_metadata_is_the_ingress_document_and_a_malformed_request_is_the_clients_mistake() -> None:
    import asyncio

    from torchship.engines.ray.grpc_servicer import GrpcFrontend

    context = _Context([])
    answer = asyncio.run(GrpcFrontend(_Ingress("")).call("ServerMetadata", b"", context))
    assert context.code is None
    assert (answer.name, answer.version, list(answer.extensions)) == ("torchship", "9.9", ["binary_tensor_data"])
    context = _Context([])
    answer = asyncio.run(GrpcFrontend(_Ingress("")).call("ServerMetadata", b"\xff", context))
    assert (context.code, answer) == (grpc.StatusCode.INVALID_ARGUMENT, pb.ServerMetadataResponse())


@pytest.mark.parametrize(
    ("draining", "metadata", "raw", "code"),
    [
        ("refusing", [("authorization", "Bearer secret")], _request(raw=True).SerializeToString(), grpc.StatusCode.UNAVAILABLE),
        ("", [("authorization", "Bearer nope")], b"\xff", grpc.StatusCode.UNAUTHENTICATED),
        ("", [("authorization", "Bearer secret")], bytes(1025), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (
            "",
            [("authorization", "Bearer secret")],
            pb.ModelInferRequest(model_name="toy", model_version="2").SerializeToString(),
            grpc.StatusCode.NOT_FOUND,
        ),
    ],
    ids=["draining", "token before parsing", "size before parsing", "unknown version"],
)
def test_model_infer_refusals_before_any_endpoint_is_asked(draining: str, metadata: Any, raw: bytes, code: Any) -> None:
    import asyncio

    from torchship.engines.ray.grpc_servicer import GrpcFrontend

    ingress = _Ingress(draining)
    context = _Context(metadata)
    answer = asyncio.run(GrpcFrontend(ingress).call("ModelInfer", raw, context))
    assert (context.code, answer) == (code, pb.ModelInferResponse())
    assert ingress.accepted == 0


def test_server_ready_is_false_while_draining() -> None:
    import asyncio

    from torchship.engines.ray.grpc_servicer import GrpcFrontend

    for draining, ready in (("", True), ("not_ready", False)):
        answer = asyncio.run(GrpcFrontend(_Ingress(draining)).call("ServerReady", b"", _Context([])))
        assert answer.ready is ready


def test_model_infer_on_a_foreign_endpoint_is_unimplemented_before_any_endpoint_is_asked() -> None:
    """An archive's own TorchServe handler takes a request body, not tensors: REST only."""
    import asyncio

    from torchship.engines.ray.grpc_servicer import GrpcFrontend

    ingress = _Ingress("")
    ingress.foreign = frozenset({"toy"})
    context = _Context([("authorization", "Bearer secret")])
    answer = asyncio.run(GrpcFrontend(ingress).call("ModelInfer", _request(raw=True).SerializeToString(), context))
    assert (context.code, answer) == (grpc.StatusCode.UNIMPLEMENTED, pb.ModelInferResponse())
    assert "POST /predictions/toy" in str(context.details)
