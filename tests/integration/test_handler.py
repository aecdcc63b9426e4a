"""The TorchServe handler in-process, on unpacked archives, driven with TorchServe's own `Context` (no server)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from ts.context import Context

from tests.conftest import unpack
from tests.helpers import torchserve_context
from torchship.archive.build import Endpoint
from torchship.handlers.codec import decode_response, encode_request
from torchship.handlers.errors import TOKEN_FAILED, ArtifactError
from torchship.handlers.names import (
    DRAIN_FILE_ENV,
    DRAIN_HEADER,
    DRAINING_MESSAGE,
    LOAD_REFUSED_MARKER,
    METRICS_DIR_ENV,
    TEST_DRIFT_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
)
from torchship.handlers.service import TorchshipHandler
from torchship.handlers.wire import parse_server_timing
from torchship.metrics import collect, parse_samples
from torchship.parity import compare_all
from torchship.spec import Tolerance


def _handler(archives: dict[str, Endpoint], name: str, tmp_path: Path) -> tuple[TorchshipHandler, Path]:
    model_dir = unpack(archives[name].mar, tmp_path / name)
    handler = TorchshipHandler()
    handler.initialize(torchserve_context(model_dir))
    return handler, model_dir


def _request(inputs: dict[str, torch.Tensor], *, binary: bool = False, **params: Any) -> tuple[dict[str, Any], dict[str, str]]:
    body, headers = encode_request(inputs, binary=binary, parameters=params or None)
    return {"body": bytearray(body)}, headers


def _run(
    handler: TorchshipHandler, model_dir: Path, requests: list[tuple[dict[str, Any], dict[str, str]]]
) -> tuple[list[bytes], Context]:
    ctx = torchserve_context(model_dir, headers=[h for _, h in requests])
    out = handler.handle([r for r, _ in requests], ctx)
    assert len(out) == len(requests)
    return out, ctx


def _decode(body: bytes, ctx: Context, idx: int) -> dict[str, Any]:
    return decode_response(body, ctx.get_response_headers(idx).get("Inference-Header-Content-Length"))


def _status(ctx: Context, idx: int) -> int:
    code: int = ctx.get_response_status(idx)[0]
    return code


def _reference(model_dir: Path) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = torch.load(model_dir / "reference.pt", weights_only=True)["cases"]
    return cases


def _tolerance(model_dir: Path) -> tuple[list[str], Tolerance]:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    fmt = json.loads((model_dir / "endpoint.json").read_text())["format"]
    tol = manifest["tolerance"][fmt]
    return [o["name"] for o in manifest["outputs"]], Tolerance(tol["atol"], tol["rtol"])


ALL_ENDPOINTS = [
    "simple_cnn",
    "simple_cnn_pt2",
    "simple_cnn_aoti",
    "dynamic_router",
    "dynamic_router_pt2",
    "seq_decoder",
    "seq_decoder_pt2",
    "process_outputs",
]


@pytest.mark.parametrize("name", ALL_ENDPOINTS)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_format_reproduces_reference_in_one_batch(
    archives: dict[str, Endpoint], tmp_path: Path, name: str, binary: bool
) -> None:
    """All reference cases arrive as one engine batch; each request gets its own rows, equal to eager."""
    handler, model_dir = _handler(archives, name, tmp_path)
    cases = _reference(model_dir)
    out, ctx = _run(handler, model_dir, [_request(c["inputs"], binary=binary) for c in cases])
    names, tol = _tolerance(model_dir)
    for idx, (body, case) in enumerate(zip(out, cases, strict=True)):
        assert _status(ctx, idx) == 200, body
        got = _decode(body, ctx, idx)["outputs"]
        check = compare_all(tuple(got[n] for n in names), tuple(case["outputs"][n] for n in names), tol)
        assert check.passed, (name, case["batch_size"], check.reason)


def test_compatible_requests_run_as_one_model_call(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    handler, model_dir = _handler(archives, "dynamic_router", tmp_path)
    calls: list[int] = []
    assert handler.core is not None
    model = handler.core.model

    def counting(*args: torch.Tensor) -> Any:
        calls.append(args[0].shape[0])
        return model(*args)

    handler.core.model = counting
    xs = [torch.randn(b, 256) for b in (1, 3, 2, 5)]
    out, ctx = _run(handler, model_dir, [_request({"x": x}) for x in xs])
    assert calls == [11]
    eager = __import__("torchship.models.dynamic_router", fromlist=["build"]).build()
    for idx, x in enumerate(xs):
        y = _decode(out[idx], ctx, idx)["outputs"]["y"]
        with torch.no_grad():
            # Rows come back to the request that sent them. Not bit-equal: the experts' matmuls ran on 11 rows
            # instead of the request's own, which rounds differently (well inside the tolerance).
            assert torch.allclose(y, eager(x), atol=1e-5, rtol=1e-4)
        assert ctx.get_response_headers(idx)["X-Torchship-Batch-Rows"] == "11"
        assert ctx.get_response_headers(idx)["X-Torchship-Batch-Requests"] == "4"
        # Where the time went: every phase measured, the batch's call covering its parts.
        phases = parse_server_timing(ctx.get_response_headers(idx)["Server-Timing"])
        assert set(phases) == {"decode", "model", "encode", "handler"}, phases
        assert all(ms >= 0 for ms in phases.values()) and phases["handler"] >= phases["model"] > 0, phases


def test_different_image_sizes_run_as_separate_groups(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    handler, model_dir = _handler(archives, "simple_cnn_pt2", tmp_path)
    shapes = [(2, 3, 32, 32), (1, 3, 48, 40), (3, 3, 32, 32)]
    out, ctx = _run(handler, model_dir, [_request({"x": torch.randn(s)}) for s in shapes])
    rows = [ctx.get_response_headers(i)["X-Torchship-Batch-Rows"] for i in range(3)]
    assert rows == ["5", "1", "5"]
    assert [_decode(out[i], ctx, i)["outputs"]["logits"].shape[0] for i in range(3)] == [2, 1, 3]


def test_batches_over_the_model_limit_are_split(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    handler, model_dir = _handler(archives, "dynamic_router_pt2", tmp_path)  # .pt2 batch dim is bounded at 64
    xs = [torch.randn(40, 256), torch.randn(40, 256), torch.randn(10, 256)]
    _out, ctx = _run(handler, model_dir, [_request({"x": x}) for x in xs])
    assert all(_status(ctx, i) == 200 for i in range(3))
    assert [ctx.get_response_headers(i)["X-Torchship-Batch-Rows"] for i in range(3)] == ["40", "50", "50"]


BAD_BODIES: list[tuple[str, Any, str]] = [
    ("malformed json", b'{"inputs": [', "not valid JSON"),
    ("empty body", b"", "body is empty"),
    ("not an object", b"[1, 2]", "must be a JSON object"),
    ("missing inputs", b'{"id": "a"}', "missing field 'inputs'"),
    ("extra field", b'{"inputs": [], "bogus": 1}', "unknown fields ['bogus']"),
    (
        "unknown input",
        {"inputs": [{"name": "z", "shape": [1, 256], "datatype": "FP32", "data": [0.0] * 256}]},
        "unknown input 'z'",
    ),
    (
        "wrong datatype",
        {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "INT64", "data": [0] * 256}]},
        "datatype must be FP32",
    ),
    ("wrong rank", {"inputs": [{"name": "x", "shape": [256], "datatype": "FP32", "data": [0.0] * 256}]}, "expected rank 2"),
    (
        "wrong fixed dim",
        {"inputs": [{"name": "x", "shape": [1, 255], "datatype": "FP32", "data": [0.0] * 255}]},
        "dim 1 must be 256",
    ),
    (
        "data length",
        {"inputs": [{"name": "x", "shape": [2, 256], "datatype": "FP32", "data": [0.0] * 256}]},
        "data has 256 values but shape needs 512",
    ),
    (
        "batch over limit",
        {"inputs": [{"name": "x", "shape": [65, 256], "datatype": "FP32", "data": [0.0] * 65 * 256}]},
        "dim 0 is 65, allowed 1..64",
    ),
    ("zero dim", {"inputs": [{"name": "x", "shape": [0, 256], "datatype": "FP32", "data": []}]}, "every dim must be >= 1"),
    (
        "strings",
        {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": ["a"] * 256}]},
        "flat array of FP32 numbers",
    ),
    (
        "nested data",
        {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [[0.0] * 256]}]},
        "data has 1 values",
    ),
    ("NaN token", b'{"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [NaN]}]}', "NaN"),
    ("huge float", {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [1e39] * 256}]}, "NaN or Inf"),
    ("unknown parameter", {"inputs": [], "parameters": {"temperature": 2}}, "unknown parameters ['temperature']"),
    ("top_k on non-classifier", {"inputs": [], "parameters": {"top_k": 2}}, "applies to classifiers"),
]


@pytest.mark.parametrize(("label", "body", "message"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_request_fails_alone_with_400_and_its_neighbours_succeed(
    archives: dict[str, Endpoint], tmp_path: Path, label: str, body: Any, message: str
) -> None:
    handler, model_dir = _handler(archives, "dynamic_router", tmp_path)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    good = [_request({"x": torch.randn(2, 256)}) for _ in range(3)]
    requests = [good[0], ({"body": bytearray(raw)}, {}), good[1], good[2]]
    out, ctx = _run(handler, model_dir, requests)
    assert _status(ctx, 1) == 400
    assert message in json.loads(out[1])["error"], label
    assert ctx.get_response_content_type(1) == "application/json"
    for idx in (0, 2, 3):
        assert _status(ctx, idx) == 200
        assert _decode(out[idx], ctx, idx)["outputs"]["y"].shape == (2, 256)


def test_binary_header_that_lies_is_a_400(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    handler, model_dir = _handler(archives, "dynamic_router", tmp_path)
    request, headers = _request({"x": torch.randn(1, 256)}, binary=True)
    for lie in ("999999", "-1", "abc"):
        out, ctx = _run(handler, model_dir, [(request, {**headers, "Inference-Header-Content-Length": lie})])
        assert _status(ctx, 0) == 400, lie
    truncated = {"body": request["body"][:-10]}
    out, ctx = _run(handler, model_dir, [(truncated, headers)])
    assert _status(ctx, 0) == 400 and "runs past the end" in json.loads(out[0])["error"]


def test_header_names_are_matched_case_insensitively(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    handler, model_dir = _handler(archives, "dynamic_router", tmp_path)
    request, headers = _request({"x": torch.randn(1, 256)}, binary=True)
    lower = {k.lower(): v for k, v in headers.items()}
    _out, ctx = _run(handler, model_dir, [(request, lower)])
    assert _status(ctx, 0) == 200


def test_top_k_uses_the_scripted_process_outputs(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    handler, model_dir = _handler(archives, "simple_cnn", tmp_path)
    x = torch.randn(3, 3, 32, 32)
    out, ctx = _run(handler, model_dir, [_request({"x": x}, top_k=3), _request({"x": x}), _request({"x": x}, top_k=11)])
    first = _decode(out[0], ctx, 0)["outputs"]
    assert set(first) == {"logits", "probabilities", "classes"}
    assert first["classes"].shape == (3, 3) and first["classes"].dtype == torch.int64
    assert torch.equal(first["classes"], first["logits"].topk(3, dim=-1).indices)
    assert torch.allclose(first["probabilities"], torch.softmax(first["logits"], -1).topk(3, dim=-1).values)
    assert set(_decode(out[1], ctx, 1)["outputs"]) == {"logits"}
    assert _status(ctx, 2) == 400 and "top_k must be an integer in 1..10" in json.loads(out[2])["error"]


def test_process_outputs_endpoint_takes_top_k_per_request(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    handler, model_dir = _handler(archives, "process_outputs", tmp_path)
    logits = torch.randn(2, 10)
    out, ctx = _run(handler, model_dir, [_request({"logits": logits}, top_k=2), _request({"logits": logits})])
    assert _decode(out[0], ctx, 0)["outputs"]["classes"].shape == (2, 2)
    assert _decode(out[1], ctx, 1)["outputs"]["classes"].shape == (2, 5)


def test_binary_output_on_request(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    handler, model_dir = _handler(archives, "seq_decoder", tmp_path)
    x = torch.randn(2, 16, 64)
    out, ctx = _run(handler, model_dir, [_request({"x": x}, binary_data_output=True)])
    assert ctx.get_response_content_type(0) == "application/octet-stream"
    tokens = _decode(out[0], ctx, 0)["outputs"]["tokens"]
    eager = __import__("torchship.models.seq_decoder", fromlist=["build"]).build()
    with torch.no_grad():
        assert torch.equal(tokens, eager(x))


def test_a_changed_artifact_refuses_to_load(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    model_dir = unpack(archives["simple_cnn_pt2"].mar, tmp_path / "tampered")
    with (model_dir / "model.pt2").open("r+b") as f:
        f.seek(64)
        f.write(b"\xff\xfe")
    with pytest.raises(ArtifactError, match=r"model\.pt2 missing or changed since the archive was built \(sha256 mismatch\)"):
        TorchshipHandler().initialize(torchserve_context(model_dir))


def test_device_comes_from_the_context(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    model_dir = unpack(archives["dynamic_router"].mar, tmp_path / "dev")
    handler = TorchshipHandler()
    handler.initialize(torchserve_context(model_dir, gpu_id=0))
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert handler.core is not None and str(handler.core.device) == expected


def test_shared_token_from_the_environment_is_checked_per_request(
    archives: dict[str, Endpoint], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Kubernetes: TorchServe's own keys differ per pod, so the handler checks the Secret's token (a file).
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    monkeypatch.setenv(TOKEN_FILE_ENV, str(token_file))
    handler, model_dir = _handler(archives, "dynamic_router", tmp_path)
    request, headers = _request({"x": torch.randn(1, 256)})
    cases = [
        (request, headers),
        (request, {**headers, "Authorization": "Bearer wrong"}),
        (request, {**headers, "Authorization": "s3cret"}),
        (request, {**headers, "Authorization": "Bearer s3cret"}),
    ]
    out, ctx = _run(handler, model_dir, cases)
    for idx in (0, 1, 2):
        assert _status(ctx, idx) == 400
        assert json.loads(out[idx])["error"] == TOKEN_FAILED
    assert _status(ctx, 3) == 200
    assert _decode(out[3], ctx, 3)["outputs"]["y"].shape == (1, 256)


def test_no_token_configured_means_no_token_check(
    archives: dict[str, Endpoint], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    handler, model_dir = _handler(archives, "dynamic_router", tmp_path)
    _, ctx = _run(handler, model_dir, [_request({"x": torch.randn(1, 256)})])
    assert _status(ctx, 0) == 200


def test_the_drain_marker_flushes_what_was_queued_ahead_and_refuses_what_follows(
    archives: dict[str, Endpoint], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drain_file = tmp_path / "draining"
    monkeypatch.setenv(DRAIN_FILE_ENV, str(drain_file))
    handler, model_dir = _handler(archives, "dynamic_router", tmp_path)
    sibling = TorchshipHandler()  # a second worker of the same endpoint
    sibling.initialize(torchserve_context(model_dir))
    request, headers = _request({"x": torch.randn(1, 256)})
    drain_file.write_text("m4rker")
    # A stale file, or a header without the file's marker, changes nothing.
    out, ctx = _run(handler, model_dir, [(request, headers), (request, {**headers, DRAIN_HEADER: "guess"})])
    assert [_status(ctx, i) for i in (0, 1)] == [200, 200]
    # Queued ahead of the marker: answered; the marker and what is behind it: the JSON 503.
    marker = ({"body": bytearray(b"{}")}, {DRAIN_HEADER.lower(): "m4rker"})
    out, ctx = _run(handler, model_dir, [(request, headers), marker, (request, headers)])
    assert [_status(ctx, i) for i in range(3)] == [200, 503, 503]
    assert json.loads(out[1])["error"] == json.loads(out[2])["error"] == DRAINING_MESSAGE
    # Later batches, on this worker and on the endpoint's other worker, are refused too.
    for worker in (handler, sibling):
        out, ctx = _run(worker, model_dir, [(request, headers)])
        assert _status(ctx, 0) == 503
    # A worker started after the drain (a restarted container with the old files in its emptyDir) serves.
    restarted, _ = _handler(archives, "dynamic_router", tmp_path / "restarted")
    restarted.model_name = handler.model_name
    out, ctx = _run(restarted, model_dir, [(request, headers)])
    assert _status(ctx, 0) == 200


def test_torch_threads_come_from_the_model_config(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    """torchThreads in model-config.yaml sets the worker's intra-op threads; 0 or absent means every usable core."""
    model_dir = unpack(archives["dynamic_router"].mar, tmp_path / "dynamic_router")
    before = torch.get_num_threads()
    try:
        handler = TorchshipHandler()
        handler.initialize(torchserve_context(model_dir, model_config={"torchThreads": 1}))
        assert handler.core is not None and handler.core.threads == 1 == torch.get_num_threads()
        handler.initialize(torchserve_context(model_dir, model_config={"torchThreads": 0}))
        assert handler.core.threads == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        with pytest.raises(ValueError, match="torchThreads must be a whole number"):
            handler.initialize(torchserve_context(model_dir, model_config={"torchThreads": "many"}))
    finally:
        torch.set_num_threads(before)


def test_the_endpoint_loads_what_export_measured_and_checked(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    """simple_cnn's TorchScript endpoint runs optimize_for_inference (MKLDNN convolutions), as its manifest says;
    the router's runs the frozen file as it is. Both reproduce their reference outputs through the handler."""
    cnn, _ = _handler(archives, "simple_cnn", tmp_path)
    router, _ = _handler(archives, "dynamic_router", tmp_path)
    assert cnn.core is not None and router.core is not None
    assert "prim::mkldnn_convolution" in str(cnn.core.model.graph)  # type: ignore[attr-defined]
    assert "mkldnn" not in str(router.core.model.graph)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["simple_cnn_pt2", "process_outputs"])
def test_a_model_whose_answers_differ_from_its_references_never_loads(
    archives: dict[str, Endpoint], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # The drift hook stands in for a chip, driver or build of torch that computes something else on this replica.
    metrics_dir = tmp_path / "metrics"
    monkeypatch.setenv(METRICS_DIR_ENV, str(metrics_dir))
    monkeypatch.setenv(TEST_DRIFT_ENV, f"other=1,{name}=0.001")
    model_dir = unpack(archives[name].mar, tmp_path / name)
    with pytest.raises(ArtifactError) as refused:
        TorchshipHandler().initialize(torchserve_context(model_dir))
    message = str(refused.value)
    assert message.startswith(f"{LOAD_REFUSED_MARKER} {name}: its answers on cpu differ from the archive's references")
    assert "worst |diff| 0.001" in message
    samples = parse_samples(collect(metrics_dir))
    assert samples[f'torchship_load_refusals_total{{endpoint="{name}",reason="parity"}}'] == 1
    assert samples[f'torchship_parity_ok{{endpoint="{name}"}}'] == 0
    assert samples[f'torchship_parity_checks_total{{endpoint="{name}",result="failed"}}'] == 1


def test_a_loaded_endpoint_has_checked_its_references_on_its_device(archives: dict[str, Endpoint], tmp_path: Path) -> None:
    handler, _ = _handler(archives, "simple_cnn", tmp_path)
    assert handler.core is not None
    parity = handler.core.parity
    model_dir = unpack(archives["simple_cnn"].mar, tmp_path / "again")
    assert parity.comparison.passed and parity.cases == len(_reference(model_dir)) and parity.duration_ms > 0
    assert parity.comparison.max_abs <= 1e-5


def test_metrics_count_every_request_by_endpoint_and_status(
    archives: dict[str, Endpoint], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics_dir = tmp_path / "metrics"
    monkeypatch.setenv(METRICS_DIR_ENV, str(metrics_dir))
    handler, model_dir = _handler(archives, "dynamic_router", tmp_path)
    good = _request({"x": torch.randn(1, 256)})
    bad = ({"body": bytearray(b"{not json")}, {"content-type": "application/json"})
    _run(handler, model_dir, [good, good, bad])
    _run(handler, model_dir, [good])
    assert handler.core is not None and handler.core.metrics is not None
    handler.core.metrics.flush()
    samples = parse_samples(collect(metrics_dir))
    assert samples['torchship_requests_total{code="200",endpoint="dynamic_router"}'] == 3
    assert samples['torchship_requests_total{code="400",endpoint="dynamic_router"}'] == 1
    assert samples['torchship_stage_seconds_count{endpoint="dynamic_router",stage="model"}'] == 3
    assert samples['torchship_stage_seconds_count{endpoint="dynamic_router",stage="handler"}'] == 4
    assert samples['torchship_batch_requests_bucket{endpoint="dynamic_router",le="1"}'] == 1
    assert samples['torchship_batch_requests_bucket{endpoint="dynamic_router",le="4"}'] == 2
    assert samples['torchship_parity_ok{endpoint="dynamic_router"}'] == 1
    assert samples['torchship_parity_checks_total{endpoint="dynamic_router",result="ok"}'] == 1
