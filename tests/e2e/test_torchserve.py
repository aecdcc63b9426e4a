"""A real TorchServe on free loopback ports, its own temp dir and key file, stopped as a process group at the end."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from tests.e2e import oip
from tests.helpers import assert_router_answers, run_cli, serve_command
from torchship.archive.build import archive_models, load_model_config
from torchship.engines.torchserve import oip_agent
from torchship.engines.torchserve.launcher import TorchServe
from torchship.handlers.codec import decode_response, encode_request
from torchship.handlers.wire import parse_server_timing
from torchship.models import ZOO
from torchship.verify.client import Client

#: Batches fill for up to 200 ms, so concurrent requests in a test land in one batch.
#: A small body limit so that a 413 is cheap to provoke; the largest reference batch (~1 MB of JSON) still fits.
MAX_REQUEST_BYTES = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def server(e2e_store: Path, e2e_keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    workdir = tmp_path_factory.mktemp("torchserve")
    with TorchServe(e2e_store, workdir, max_request_bytes=MAX_REQUEST_BYTES, verify_key=e2e_keys[1]) as ts:
        yield ts
    assert ts.process is not None and ts.process.poll() is not None


def _auth(server: TorchServe) -> dict[str, str]:
    return server.auth_headers()


def _post(server: TorchServe, endpoint: str, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(f"{server.url}/predictions/{endpoint}", data=body, headers=headers, timeout=60)


def test_verify_passes_on_every_endpoint(server: TorchServe, e2e_store: Path, tmp_path: Path) -> None:
    report = tmp_path / "verify.json"
    proc = run_cli(
        "verify", "--engine", "torchserve", "--url", server.url, "--token-file", str(server.key_file),
        "--model-store", str(e2e_store), "--report", str(report),
    )  # fmt: skip
    doc = json.loads(report.read_text())
    assert doc["passed"] is True
    endpoints = {r["endpoint"] for r in doc["rows"]}
    assert endpoints == set(server.endpoints)
    assert len(doc["rows"]) == len(endpoints) * 4 * 2  # 4 reference batch sizes, JSON and binary
    assert "checks passed" in proc.stdout


def _concurrently(fn: Any, n: int) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(server: TorchServe) -> None:
    spec = ZOO["dynamic_router"]
    eager = spec.factory()
    inputs = [spec.make_inputs(1 + i % 3, seed_offset=100 + i)["x"] for i in range(12)]
    bodies = [encode_request({"x": x}) for x in inputs]
    auth = _auth(server)
    responses = _concurrently(lambda i: _post(server, "dynamic_router", bodies[i][0], {**auth, **bodies[i][1]}), 12)
    batched = 0
    for x, r in zip(inputs, responses, strict=True):
        assert r.status_code == 200, r.text
        y = decode_response(r.content)["outputs"]["y"]
        with torch.no_grad():
            assert torch.allclose(y, eager(x), atol=1e-5, rtol=1e-4)
        batched += int(r.headers["X-Torchship-Batch-Requests"]) > 1
        assert {"decode", "model", "encode", "handler"} <= set(parse_server_timing(r.headers["Server-Timing"]))
    assert batched >= 2, "TorchServe never put two of the concurrent requests in one batch"


def test_one_malformed_request_fails_alone_among_15_valid(server: TorchServe) -> None:
    spec = ZOO["dynamic_router"]
    eager = spec.factory()
    auth = _auth(server)
    for attempt in range(3):  # batching depends on timing: retry until the bad request shares a batch
        inputs = [spec.make_inputs(2, seed_offset=200 + attempt * 16 + i)["x"] for i in range(16)]
        bodies = [encode_request({"x": x}) for x in inputs]
        bodies[7] = (b'{"inputs": [{"name": "x", "shape": [2, 256], "datatype": "FP32", "data": [1.0, 2.0]}]}', bodies[7][1])

        def send(i: int, bodies: list[tuple[bytes, dict[str, str]]] = bodies) -> requests.Response:
            return _post(server, "dynamic_router", bodies[i][0], {**auth, **bodies[i][1]})

        responses = _concurrently(send, 16)
        assert responses[7].status_code == 400
        assert "data has 2 values but shape needs 512" in responses[7].json()["error"]
        for i, (x, r) in enumerate(zip(inputs, responses, strict=True)):
            if i == 7:
                continue
            assert r.status_code == 200, r.text
            with torch.no_grad():
                assert torch.allclose(decode_response(r.content)["outputs"]["y"], eager(x), atol=1e-5, rtol=1e-4)
        if int(responses[7].headers["X-Torchship-Batch-Requests"]) > 1:
            return
    pytest.fail("the malformed request never shared a batch with valid ones in 3 attempts")


def _valid_router_body() -> tuple[bytes, dict[str, str]]:
    return encode_request({"x": torch.randn(1, 256)})


BAD_INPUTS = [
    ("malformed json", "dynamic_router", b'{"inputs": [', {}, 400),
    (
        "wrong datatype",
        "dynamic_router",
        b'{"inputs":[{"name":"x","shape":[1,256],"datatype":"INT32","data":[' + b",".join([b"1"] * 256) + b"]}]}",
        {},
        400,
    ),
    (
        "wrong shape",
        "dynamic_router",
        b'{"inputs":[{"name":"x","shape":[1,128],"datatype":"FP32","data":[' + b",".join([b"1.0"] * 128) + b"]}]}",
        {},
        400,
    ),
    (
        "wrong rank",
        "simple_cnn",
        b'{"inputs":[{"name":"x","shape":[3,32,32],"datatype":"FP32","data":[' + b",".join([b"0.5"] * 3072) + b"]}]}",
        {},
        400,
    ),
    ("data length", "dynamic_router", b'{"inputs":[{"name":"x","shape":[2,256],"datatype":"FP32","data":[1.0]}]}', {}, 400),
    ("batch over limit", "seq_decoder", None, {}, 400),
    ("oversized body", "dynamic_router", b"0" * (MAX_REQUEST_BYTES + 1024), {}, 413),
    ("unknown endpoint", "no_such_model", None, {}, 404),
]


@pytest.mark.parametrize(("label", "endpoint", "body", "headers", "status"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_4xx_json_error_and_the_server_stays_healthy(  # noqa: PLR0917  (pytest parameters)
    server: TorchServe, label: str, endpoint: str, body: bytes | None, headers: dict[str, str], status: int
) -> None:
    if body is None:
        if label == "batch over limit":
            body, headers = encode_request({"x": torch.zeros(33, 2, 64)})  # seq_decoder takes at most 32
        else:
            body, headers = _valid_router_body()
    r = _post(server, endpoint, body, {**_auth(server), "Content-Type": "application/json", **headers})
    assert r.status_code == status, (label, r.status_code, r.text[:300])
    doc = r.json()  # 413 included: the handler enforces the limit itself, below TorchServe's frontend cut
    assert isinstance(doc, dict) and (doc.get("error") or doc.get("message")), doc
    assert_router_answers(server.url, server.token)


@pytest.mark.parametrize("token", [None, "not-the-key"], ids=["missing", "wrong"])
def test_requests_without_the_inference_token_are_refused(server: TorchServe, token: str | None) -> None:
    body, headers = _valid_router_body()
    if token:
        headers = {**headers, "Authorization": f"Bearer {token}"}
    r = _post(server, "dynamic_router", body, headers)
    assert 400 <= r.status_code < 500
    assert "Token Authorization failed" in r.json()["message"]
    assert r.status_code != 200
    assert_router_answers(server.url, server.token)


def test_management_api_is_not_on_the_inference_port(server: TorchServe) -> None:
    r = requests.get(f"{server.url}/models", headers=_auth(server), timeout=10)
    assert r.status_code in (404, 405)
    assert server.management_url.startswith("http://127.0.0.1:")


def test_serve_command_prints_url_and_token_and_stops_on_sigterm(artifacts_dir: Path, tmp_path: Path) -> None:
    """`torchship serve torchserve` as a user runs it: ready line, a working URL and token, clean SIGTERM."""
    store = tmp_path / "store"
    archive_models(["dynamic_router"], artifacts=artifacts_dir, out_dir=store, model_config=load_model_config())
    workdir = tmp_path / "work"
    with serve_command("torchserve", store, workdir=workdir, args=["--metrics-port", "0"]) as server:
        text = server.printed()
        assert "TorchServe ready at http://127.0.0.1:" in text, text
        url = text.split("ready at ")[1].split()[0]
        assert str(workdir / "key_file.json") in text.replace("\n", "")
        token = json.loads((workdir / "key_file.json").read_text())["inference"]["key"]
        y = Client(url, token=token).infer("dynamic_router", {"x": torch.randn(2, 256)}).outputs["y"]
        assert y.shape == (2, 256)
        # --metrics-port: the printed URL serves torchship's metrics, which counted that one request.
        deadline = time.monotonic() + 10
        while "/metrics" not in server.printed() and time.monotonic() < deadline:
            time.sleep(0.1)
        metrics_url = server.printed().split("metrics (Prometheus text, the same names on both engines): ")[1].split()[0]
        counted = 'torchship_requests_total{code="200",endpoint="dynamic_router"} 1'
        while counted not in requests.get(metrics_url, timeout=5).text and time.monotonic() < deadline:
            time.sleep(0.2)
        assert counted in requests.get(metrics_url, timeout=5).text


# -- OIP v2 REST (docs/rest.md, "OIP v2 REST"): the same table and stock clients run on the Ray app in test_ray.py -------


def test_oip_routes_answer_as_the_contract_says(server: TorchServe, e2e_store: Path) -> None:
    assert oip.route_mismatches(server.url, _auth(server), oip.BOTH + oip.TORCHSERVE_ONLY) == []
    meta = requests.get(f"{server.url}/v2/models/{oip.ENDPOINT}", headers=_auth(server), timeout=10)
    assert meta.status_code == 200 and meta.json() == oip.expected_metadata(e2e_store)
    # Answered by torchship's OIP agent in TorchServe's frontend (engines/oip_agent.py): it says so when it loads.
    assert oip_agent.LOADED_MESSAGE in server.log_text()


def test_server_readiness_ends_when_a_drain_begins(server: TorchServe) -> None:
    """TorchServe's /v2/health/ready is the OIP agent's: 503 once the drain file exists, like the Ray app's during a
    drain. Only the frontend reads these paths (the handler, which would start refusing, sees none of them)."""

    def get(path: str) -> requests.Response:
        return requests.get(server.url + path, headers=_auth(server), timeout=10)

    assert get("/v2/health/ready").json() == {"ready": True}
    server.drain_file.write_text("not a marker any request carries", encoding="utf-8")
    try:
        draining = get("/v2/health/ready")
        assert (draining.status_code, draining.json()) == (503, {"ready": False})
        assert get(f"/v2/models/{oip.ENDPOINT}/ready").status_code == 200  # the model itself still answers
    finally:
        server.drain_file.unlink()
    assert get("/v2/health/ready").status_code == 200


def test_stock_oip_clients_tritonclient_and_kserve(server: TorchServe, e2e_store: Path) -> None:
    """tritonclient[http] and the kserve SDK: health, model readiness, metadata, JSON and binary inference."""
    x = oip.inputs(3, seed=41)
    triton = oip.run_tritonclient(server.url, _auth(server), x)
    assert (triton["live"], triton["ready"]) == (True, True)
    assert (triton["server"]["name"], triton["server"]["version"]) == ("Torchserve", "0.12.0"), triton["server"]
    assert triton["model_ready"] is True
    assert triton["metadata"] == oip.expected_metadata(e2e_store)
    for kind in ("json", "binary"):
        oip.assert_eager(triton[kind], x, e2e_store, f"tritonclient {kind}")
    ks = oip.run_kserve_client(server.url, _auth(server), x)
    assert (ks["live"], ks["ready"], ks["model_ready"]) == (True, True, True), ks
    for kind in ("json", "binary"):
        assert ks[kind]["y"]["shape"] == [3, 256], ks[kind]
        oip.assert_eager(ks[kind]["y"]["data"], x, e2e_store, f"kserve {kind}")
