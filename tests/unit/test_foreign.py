"""The pieces that let a foreign archive run on Ray Serve and be compared: TorchServe's frontend framing, the worker's
answer read back, the load-failure reading of TorchServe's log, the requirements check, migrate's comparison."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from torchship.archive.foreign import missing_requirements, oip_metadata
from torchship.engines.ray.torchserve_worker import (
    TsRequest,
    _Frames,
    _Headers,
    batch_error,
    decode_answer,
    encode_batch,
    request_parameters,
)
from torchship.engines.torchserve.launcher import LOAD_FAILED, load_failure_cause
from torchship.migrate import Answer, compare_answers, json_differences


def test_the_frontend_frames_decode_with_torchserves_own_decoder_per_content_type() -> None:
    from ts.protocol.otf_message_handler import _retrieve_inference_msg

    requests = [
        TsRequest("a", [("x-scale", "2")], request_parameters(b'{"values": [1, 2]}', "application/json; charset=utf-8", "")),
        TsRequest("b", [], request_parameters(b"hello", "text/plain", "k=v&k=w")),
        TsRequest("c", [], request_parameters(b"\x00\x01", None, "")),
    ]
    batch = _retrieve_inference_msg(_Frames(encode_batch(requests)))
    assert [r["requestId"] for r in batch] == [b"a", b"b", b"c"]
    assert batch[0]["headers"] == [{"name": b"x-scale", "value": b"2"}]
    assert batch[0]["parameters"] == [{"name": "body", "contentType": "application/json", "value": {"values": [1, 2]}}]
    assert [(p["name"], p["value"]) for p in batch[1]["parameters"]] == [("k", b"v"), ("k", b"w"), ("body", "hello")]
    assert batch[2]["parameters"][0]["value"] == b"\x00\x01"


def test_forms_become_fields_as_torchserves_frontend_makes_them() -> None:
    body = (
        b'--XX\r\nContent-Disposition: form-data; name="data"; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n'
        b'7 8\r\n--XX\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--XX--\r\n'
    )
    assert request_parameters(body, "multipart/form-data; boundary=XX", "") == [
        ("data", "text/plain", b"7 8"),
        ("note", "", b"hi"),
    ]
    assert request_parameters(b"data=9&x=", "application/x-www-form-urlencoded", "") == [("data", "", b"9"), ("x", "", b"")]


def test_the_workers_answer_becomes_replies_and_a_failed_batch_torchserves_json_error() -> None:
    from ts.context import Context, RequestProcessor
    from ts.protocol.otf_message_handler import create_predict_response

    ctx = Context("m", "/tmp", {}, 2, None, "0.12.0")
    ctx.request_processor = [RequestProcessor({}), RequestProcessor({})]
    ctx.set_response_status(201, "Made", 1)
    ctx.set_response_content_type(1, "text/plain")
    ids = {0: "r0", 1: "r1"}
    ok = decode_answer(bytes(create_predict_response([{"a": 1.5}, "text"], ids, "Prediction success", 200, ctx)), 2)
    assert (ok[0].status, ok[0].body, ok[0].headers) == (200, b'{\n  "a": 1.5\n}', {"x-request-id": "r0"})
    assert (ok[1].status, ok[1].body, ok[1].headers["content-type"]) == (201, b"text", "text/plain")
    failed = decode_answer(bytes(create_predict_response(None, ids, "Prediction failed", 503)), 2)
    assert [r.status for r in failed] == [503, 503] and failed[0].body == batch_error(503, "Prediction failed")
    assert json.loads(failed[0].body) == {"code": 503, "type": "InternalServerException", "message": "Prediction failed"}
    with pytest.raises(RuntimeError, match="answered 2 of 3"):
        decode_answer(bytes(create_predict_response(None, ids, "x", 503)), 3)


def test_header_lookups_match_any_case() -> None:
    headers = _Headers({"x-scale": "2", "Body": {"content-type": "text/plain"}})
    assert headers.get("X-Scale") == "2" and "X-SCALE" in headers and headers["x-scale"] == "2"
    assert headers.get("missing") is None and headers.get("Body") == {"content-type": "text/plain"}


def test_torchserves_load_failures_are_read_from_its_log() -> None:
    log = "\n".join(
        [
            "2026-12-05T15:18:47,494 [INFO ] W-9003-my_model_1.0-stdout MODEL_LOG - Traceback (most recent call last):",
            "2026-12-05T15:18:47,494 [INFO ] W-9003-my_model_1.0-stdout MODEL_LOG - ValueError: the label file is corrupt",
            "2026-12-05T15:18:47,495 [INFO ] W-9003-my_model_1.0-stdout MODEL_LOG - RuntimeError: 500 - Unknown exception",
            "2026-12-05T15:18:47,495 [WARN ] W-9003-my_model_1.0 org.pytorch.serve.wlm.BatchAggregator - Load model failed: "
            "my_model, error: Worker died.",
            "2026-12-05T15:18:47,600 [INFO ] W-9004-other_2.0 org.pytorch.serve.wlm.WorkerThread - Retry worker: 9004 in 1 s",
            "2026-12-05T15:18:47,601 [INFO ] W-9004-other_2.0-stdout MODEL_LOG - RuntimeError: TORCHSHIP-LOAD-REFUSED abc: "
            "a changed byte",
        ]
    )
    assert set(LOAD_FAILED.findall(log)) == {"my_model", "other"}
    assert load_failure_cause(log, "my_model") == "the handler failed to load: ValueError: the label file is corrupt"
    assert load_failure_cause(log, "other") == "a changed byte"  # the handler named its folder; the engine names the endpoint
    assert load_failure_cause(log, "my") is None  # a name that is only a prefix of another is not that model


def test_requirements_are_checked_against_this_environment() -> None:
    text = "# pinned\nnumpy>=1\n--index-url https://example.invalid\ntorchship-no-such-package==1.0\ntorch==0.0.1\n"
    missing = missing_requirements(text)
    assert missing[0] == "torchship-no-such-package==1.0"
    assert missing[1].startswith("torch==0.0.1 (installed: ")
    assert len(missing) == 2


def test_migrate_compares_json_within_atol_and_everything_else_exactly() -> None:
    assert json_differences({"a": [1.0, 2.0]}, {"a": [1.0 + 1e-7, 2.0]}, 1e-5) == []
    assert json_differences({"a": [1.0]}, {"a": [1.1]}, 1e-5) == ["$.a[0]: 1.0 != 1.1"]
    assert json_differences({"a": 1}, {"b": 1}, 1e-5) == ["$: keys ['a'] != ['b']"]
    same = Answer(200, {"content-type": "text/plain", "x-request-id": "1", "Pragma": "no-cache"}, b"x")
    other = Answer(200, {"Content-Type": "text/plain", "x-request-id": "2"}, b"x")
    assert compare_answers(same, other, 1e-5) == []  # server-added headers are not the handler's
    assert compare_answers(same, Answer(200, {"content-type": "text/html"}, b"x"), 1e-5) == [
        "header content-type: 'text/plain' on TorchServe, 'text/html' on Ray Serve"
    ]
    assert compare_answers(same, Answer(201, {}, b"x"), 1e-5) == ["status 200 on TorchServe, 201 on Ray Serve"]
    assert compare_answers(same, Answer(200, {"content-type": "text/plain"}, b"y"), 1e-5) == [
        "body: 1 bytes != 1 bytes, not byte for byte equal"
    ]


def test_foreign_metadata_is_one_bytes_input_and_output_of_unknown_length() -> None:
    doc = oip_metadata("m", "2.0")
    assert doc["versions"] == ["2.0"] and doc["inputs"][0]["shape"] == [-1] and doc["outputs"][0]["datatype"] == "BYTES"


def test_a_torchserve_drain_probes_only_the_archives_whose_handler_answers_its_marker(tmp_path: Path) -> None:
    from torchship.engines.torchserve.drain import markable

    for name, entries in (("own", ["endpoint.json", "MAR-INF/MANIFEST.json"]), ("theirs", ["MAR-INF/MANIFEST.json"])):
        with zipfile.ZipFile(tmp_path / f"{name}.mar", "w") as z:
            for entry in entries:
                z.writestr(entry, "{}")
    (tmp_path / "broken.mar").write_bytes(b"not a zip")
    assert markable(tmp_path, ["broken", "own", "theirs", "gone"]) == ["own"]
