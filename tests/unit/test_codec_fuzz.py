"""Property-based tests of the wire codec, in-process: whatever arrives, decoding either yields tensors that fit the
signature or raises a ClientError (a 4xx), never anything else; and what is encoded decodes to the same tensors."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchship.handlers.codec import (
    Signature,
    TensorSignature,
    check_content_type,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from torchship.handlers.errors import ClientError
from torchship.handlers.names import BINARY_HEADER

SIG = Signature(
    name="toy",
    version="1.0",
    task="tensor",
    inputs=(TensorSignature("x", "FP32", (-1, 4), (1, 4), (8, 4)), TensorSignature("ids", "INT64", (-1, 2), (1, 2), (8, 2))),
    outputs=(TensorSignature("y", "FP32", (-1, 4), (1, 4), (8, 4)),),
    max_batch_size=8,
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_value = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=5), max_leaves=30
)


def _decode_or_client_error(body: Any, header_length: str | None = None) -> None:
    try:
        req = decode_request(body, SIG, header_length=header_length)
    except ClientError as exc:
        assert 400 <= exc.status < 500
        assert str(exc)
        return
    # Accepted: it must fit the signature exactly.
    assert list(req.inputs) == ["x", "ids"]
    batch = req.inputs["x"].shape[0]
    assert 1 <= batch <= SIG.max_batch_size
    assert req.inputs["x"].shape == (batch, 4) and req.inputs["x"].dtype == torch.float32
    assert req.inputs["ids"].shape == (batch, 2) and req.inputs["ids"].dtype == torch.int64
    assert bool(torch.isfinite(req.inputs["x"]).all())


@FUZZ
@given(st.binary(max_size=600))
def test_arbitrary_bytes_decode_or_get_a_4xx(raw: bytes) -> None:
    _decode_or_client_error(raw)


@FUZZ
@given(st.binary(max_size=400), st.one_of(st.none(), st.integers(-5, 500).map(str), st.text(max_size=5)))
def test_arbitrary_binary_bodies_and_header_lengths_decode_or_get_a_4xx(raw: bytes, header_length: str | None) -> None:
    _decode_or_client_error(raw, header_length)


@FUZZ
@given(json_value)
def test_arbitrary_json_documents_decode_or_get_a_4xx(doc: Any) -> None:
    _decode_or_client_error(json.dumps(doc).encode())


input_entry = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "ids", "y", ""]),
        "shape": st.lists(st.integers(-3, 10), max_size=4),
        "datatype": st.sampled_from(["FP32", "INT64", "INT32", "BOOL", "FP64", "nope"]),
    },
    optional={
        "data": st.lists(json_leaf, max_size=40),
        "parameters": st.dictionaries(st.text(max_size=16), json_leaf, max_size=2),
    },
)


@FUZZ
@given(st.lists(input_entry, max_size=3), st.one_of(st.none(), st.dictionaries(st.sampled_from(["top_k", "x"]), json_leaf)))
def test_near_valid_requests_decode_or_get_a_4xx(inputs: list[dict[str, Any]], params: dict[str, Any] | None) -> None:
    doc: dict[str, Any] = {"inputs": inputs}
    if params is not None:
        doc["parameters"] = params
    _decode_or_client_error(json.dumps(doc).encode())


@st.composite
def valid_inputs(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    batch = draw(st.integers(1, SIG.max_batch_size))
    floats = draw(st.lists(st.floats(-(2.0**100), 2.0**100, width=32), min_size=batch * 4, max_size=batch * 4))
    ints = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=batch * 2, max_size=batch * 2))
    return {
        "x": torch.tensor(floats, dtype=torch.float32).reshape(batch, 4),
        "ids": torch.tensor(ints, dtype=torch.int64).reshape(batch, 2),
    }


@FUZZ
@given(valid_inputs(), st.booleans())
def test_encode_then_decode_gives_the_same_tensors_bit_for_bit(inputs: dict[str, torch.Tensor], binary: bool) -> None:
    body, headers = encode_request(inputs, binary=binary)
    req = decode_request(body, SIG, header_length=headers.get("Inference-Header-Content-Length"))
    for name, tensor in inputs.items():
        assert req.inputs[name].dtype == tensor.dtype
        assert torch.equal(req.inputs[name], tensor)


@FUZZ
@given(valid_inputs(), st.integers(0, 10_000), st.booleans())
def test_a_truncated_or_extended_binary_body_is_a_4xx(inputs: dict[str, torch.Tensor], cut: int, extend: bool) -> None:
    body, headers = encode_request(inputs, binary=True)
    n = int(headers["Inference-Header-Content-Length"])
    tail_len = len(body) - n
    changed = body + b"\0" * (cut % 9 + 1) if extend else body[: len(body) - (cut % tail_len + 1)]
    with pytest.raises(ClientError):
        decode_request(changed, SIG, header_length=headers[BINARY_HEADER.title()])


@FUZZ
@given(valid_inputs(), st.booleans())
def test_responses_round_trip(inputs: dict[str, torch.Tensor], binary: bool) -> None:
    body, headers = encode_response(
        inputs, model_name="toy", model_version="1", request_id="r", binary_outputs=frozenset({"*"} if binary else ())
    )
    doc = decode_response(body, headers.get("Inference-Header-Content-Length"))
    assert doc["id"] == "r"
    for name, tensor in inputs.items():
        assert torch.equal(doc["outputs"][name], tensor)


@given(st.text(max_size=40))
def test_content_types_other_than_json_and_octet_stream_are_a_415(value: str) -> None:
    media = value.split(";", 1)[0].strip().lower()
    served = not value.strip() or media in ("application/json", "application/octet-stream")
    try:
        check_content_type(value)
    except ClientError as exc:
        assert exc.status == 415
        assert not served
    else:
        assert served


def test_nan_and_inf_are_refused_as_json_tokens_overflow_and_binary() -> None:
    for token in ("NaN", "Infinity", "-Infinity", "1e400"):
        text = '{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[TOKEN,0,0,0]},' \
               '{"name":"ids","shape":[1,2],"datatype":"INT64","data":[1,2]}]}'.replace("TOKEN", token)  # fmt: skip
        with pytest.raises(ClientError, match=r"NaN|Inf|not valid JSON"):
            decode_request(text.encode(), SIG)
    x = torch.tensor([[math.nan, 0, 0, 0]])
    body, headers = encode_request({"x": x, "ids": torch.zeros(1, 2, dtype=torch.int64)}, binary=True)
    with pytest.raises(ClientError, match="NaN or Inf"):
        decode_request(body, SIG, header_length=headers["Inference-Header-Content-Length"])
