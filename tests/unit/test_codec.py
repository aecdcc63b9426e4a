"""The wire codec: round trips (property-based), and the one exception -> status table."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchship.handlers.codec import (
    Signature,
    TensorSignature,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from torchship.handlers.errors import BadRequest, ClientError, HandlerError, NotFound, PayloadTooLarge
from torchship.handlers.wire import parse_server_timing, server_timing

DTYPES = {
    "FP32": torch.float32,
    "FP64": torch.float64,
    "INT64": torch.int64,
    "INT32": torch.int32,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
}


def _signature(datatype: str, rank: int) -> Signature:
    shape = (-1,) + (-1,) * (rank - 1)
    sig = TensorSignature("t", datatype, shape, (1,) * rank, (64,) * rank)
    return Signature("m", "1", "tensor", (sig,), (sig,), max_batch_size=64)


def _tensor(datatype: str, shape: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if datatype == "BOOL":
        return torch.randint(0, 2, shape, generator=g).bool()
    if DTYPES[datatype].is_floating_point:
        return torch.randn(shape, generator=g, dtype=DTYPES[datatype])
    return torch.randint(0, 100, shape, generator=g).to(DTYPES[datatype])


@settings(max_examples=80, deadline=None)
@given(
    datatype=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=4),
    binary=st.booleans(),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_request_round_trip_is_exact(datatype: str, shape: list[int], binary: bool, seed: int) -> None:
    t = _tensor(datatype, shape, seed)
    body, headers = encode_request({"t": t}, binary=binary, request_id="r1")
    req = decode_request(body, _signature(datatype, len(shape)), header_length=headers.get("Inference-Header-Content-Length"))
    assert req.id == "r1"
    got = req.inputs["t"]
    assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)


@settings(max_examples=60, deadline=None)
@given(
    datatype=st.sampled_from(sorted(DTYPES)),
    shape=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=3),
    binary=st.booleans(),
)
def test_response_round_trip_is_exact(datatype: str, shape: list[int], binary: bool) -> None:
    t = _tensor(datatype, shape, math.prod(shape))
    body, headers = encode_response(
        {"out": t}, model_name="m", model_version="2", request_id=None, binary_outputs=frozenset({"*"}) if binary else frozenset()
    )
    doc = decode_response(body, headers.get("Inference-Header-Content-Length"))
    assert doc["model_name"] == "m" and "id" not in doc
    assert torch.equal(doc["outputs"]["out"], t)


def test_dynamic_bounds_and_batch_limit_are_enforced() -> None:
    sig = Signature("m", "1", "tensor", (TensorSignature("x", "FP32", (-1, 3, -1), (1, 3, 4), (8, 3, 16)),), (), 8)
    ok, _ = encode_request({"x": torch.zeros(2, 3, 4)})
    assert decode_request(ok, sig).batch_size == 2
    for shape, message in [((2, 3, 3), "dim 2 is 3, allowed 4..16"), ((2, 3, 17), "allowed 4..16"), ((9, 3, 4), "allowed 1..8")]:
        body, _ = encode_request({"x": torch.zeros(shape)})
        with pytest.raises(BadRequest, match=message):
            decode_request(body, sig)


def test_integer_data_must_be_integral_and_in_range() -> None:
    sig = _signature("UINT8", 1)
    with pytest.raises(BadRequest, match="UINT8 data must be integers"):
        decode_request(b'{"inputs":[{"name":"t","shape":[2],"datatype":"UINT8","data":[1.5,2]}]}', sig)
    with pytest.raises(BadRequest, match="out of range for UINT8"):
        decode_request(b'{"inputs":[{"name":"t","shape":[2],"datatype":"UINT8","data":[1,300]}]}', sig)


def test_deeply_nested_json_is_a_400_not_a_crash() -> None:
    body = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(BadRequest, match="nested too deeply"):
        decode_request(body, _signature("FP32", 1))


def test_each_error_carries_its_status() -> None:
    assert BadRequest("x").status == 400
    assert PayloadTooLarge("x").status == 413
    assert NotFound("x").status == 404
    assert ClientError("x").status == 400
    assert not isinstance(RuntimeError("x"), HandlerError) and HandlerError("x").status == 500


def test_server_timing_round_trips_and_skips_what_it_cannot_read() -> None:
    value = server_timing({"decode": 0.0521, "model": 12.5})
    assert value == "decode;dur=0.052, model;dur=12.500"
    assert parse_server_timing(value) == {"decode": 0.052, "model": 12.5}
    assert parse_server_timing(f"{value}, cache;desc=hit, ingress;dur=x") == {"decode": 0.052, "model": 12.5}
    assert parse_server_timing(None) == {}
