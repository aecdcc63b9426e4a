"""A real Ray Serve (`torchship serve ray`) on a free loopback port, its own Ray temp dir, stopped at the end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from tests.e2e import oip
from tests.e2e.test_torchserve import BAD_INPUTS, MAX_REQUEST_BYTES, _concurrently
from tests.helpers import assert_router_answers, run_cli, serve_command
from torchship import __version__
from torchship.archive.build import archive_models, load_model_config
from torchship.engines.base import free_port
from torchship.handlers.codec import decode_response, encode_request
from torchship.handlers.names import TOKEN_ENV
from torchship.handlers.wire import parse_server_timing
from torchship.models import ZOO

TOKEN = "ray-e2e-token"


@dataclass
class RayServer:
    url: str
    workdir: Path
    #: host:port of the OIP v2 gRPC service (Ray's gRPC proxy).
    grpc_address: str = ""


@pytest.fixture(scope="module")
def ray_server(e2e_store: Path, e2e_keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayServer]:
    workdir = Path(tmp_path_factory.mktemp("ray"))
    port, grpc_port = free_port(), free_port()
    args = ["--max-request-bytes", str(MAX_REQUEST_BYTES), "--verify-key", str(e2e_keys[1]), "--grpc-port", str(grpc_port)]
    with serve_command("ray", e2e_store, workdir=workdir, args=args, port=port, env={TOKEN_ENV: TOKEN}) as server:
        text = server.printed()
        assert f"Ray Serve ready at http://127.0.0.1:{port}" in text, text[-3000:]
        assert f"OIP gRPC (inference.GRPCInferenceService) on port {grpc_port}" in text, text[-3000:]
        yield RayServer(f"http://127.0.0.1:{port}", workdir, f"127.0.0.1:{grpc_port}")


def _post(server: RayServer, endpoint: str, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(f"{server.url}/predictions/{endpoint}", data=body, headers=headers, timeout=60)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_verify_all_starts_both_engines_and_compares_them(artifacts_dir: Path, tmp_path: Path) -> None:
    """`torchship verify --engine all`: both engines on the same archives, one cross-engine table and report. First
    in the module, before the module's Ray server exists: an idle Ray of 8 endpoints keeps about a sixth of this
    machine's two cores busy (measured), which this test's own two engines would otherwise share."""
    store = tmp_path / "store"
    archive_models(["seq_decoder"], artifacts=artifacts_dir, out_dir=store, model_config=load_model_config())
    proc = run_cli("verify", "--engine", "all", "--model-store", str(store), "--report", str(tmp_path / "reports"), timeout_s=900)
    assert "checks passed on both engines" in proc.stdout
    doc = json.loads((tmp_path / "reports" / "pipeline.json").read_text())
    assert doc["passed"] is True
    assert len(doc["rows"]) == 2 * 4 * 2  # seq_decoder and seq_decoder_pt2, 4 batches, JSON and binary
    assert all(r["engines_max_abs"] == 0 for r in doc["rows"])  # integer tokens: the engines agree exactly
    for engine in ("torchserve", "ray"):
        assert json.loads((tmp_path / "reports" / f"verify-{engine}.json").read_text())["passed"] is True


def test_verify_passes_on_every_endpoint(ray_server: RayServer, e2e_store: Path, tmp_path: Path) -> None:
    report = tmp_path / "verify-ray.json"
    run_cli(
        "verify",
        "--engine",
        "ray",
        "--url",
        ray_server.url,
        "--token",
        TOKEN,
        "--model-store",
        str(e2e_store),
        "--report",
        str(report),
    )
    doc = json.loads(report.read_text())
    assert doc["passed"] is True
    assert len(doc["rows"]) == len(list(e2e_store.glob("*.mar"))) * 4 * 2


@pytest.mark.parametrize(("label", "endpoint", "body", "headers", "status"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_the_same_status_as_on_torchserve(  # noqa: PLR0917  (pytest parameters)
    ray_server: RayServer, label: str, endpoint: str, body: bytes | None, headers: dict[str, str], status: int
) -> None:
    if body is None:
        if label == "batch over limit":
            body, headers = encode_request({"x": torch.zeros(33, 2, 64)})
        else:
            body, headers = encode_request({"x": torch.randn(1, 256)})
    r = _post(ray_server, endpoint, body, {**_auth(), "Content-Type": "application/json", **headers})
    assert r.status_code == status, (label, r.status_code, r.text[:300])
    assert r.json()["error"]  # Ray answers every error, 413 included, with a JSON body
    assert_router_answers(ray_server.url, TOKEN)


@pytest.mark.parametrize("token", [None, "not-the-key"], ids=["missing", "wrong"])
def test_requests_without_the_token_are_refused_like_torchserve(ray_server: RayServer, token: str | None) -> None:
    body, headers = encode_request({"x": torch.randn(1, 256)})
    if token:
        headers = {**headers, "Authorization": f"Bearer {token}"}
    r = _post(ray_server, "dynamic_router", body, headers)
    assert r.status_code == 400
    assert "Token Authorization failed" in r.json()["error"]
    infer = requests.post(f"{ray_server.url}/v2/models/dynamic_router/infer", data=body, headers=headers, timeout=30)
    assert infer.status_code == 400
    assert_router_answers(ray_server.url, TOKEN)


def test_concurrent_requests_are_batched_and_one_malformed_fails_alone(ray_server: RayServer) -> None:
    spec = ZOO["dynamic_router"]
    eager = spec.factory()
    for attempt in range(3):
        inputs = [spec.make_inputs(2, seed_offset=300 + attempt * 16 + i)["x"] for i in range(16)]
        bodies = [encode_request({"x": x}) for x in inputs]
        bodies[5] = (b'{"inputs": [{"name": "x", "shape": [2, 256], "datatype": "FP32", "data": [1.0]}]}', bodies[5][1])

        def send(i: int, bodies: list[tuple[bytes, dict[str, str]]] = bodies) -> requests.Response:
            return _post(ray_server, "dynamic_router", bodies[i][0], {**_auth(), **bodies[i][1]})

        responses = _concurrently(send, 16)
        assert responses[5].status_code == 400
        assert "data has 1 values but shape needs 512" in responses[5].json()["error"]
        for i, (x, r) in enumerate(zip(inputs, responses, strict=True)):
            if i != 5:
                assert r.status_code == 200, r.text
                with torch.no_grad():
                    assert torch.allclose(decode_response(r.content)["outputs"]["y"], eager(x), atol=1e-5, rtol=1e-4)
                phases = parse_server_timing(r.headers["Server-Timing"])
                # The ingress's total spans the handler's batch call (the rest is Ray's routing and batch wait).
                assert {"decode", "model", "encode", "handler", "ingress"} <= set(phases), phases
                assert phases["ingress"] >= phases["handler"] > 0, phases
        if (
            int(responses[5].headers["X-Torchship-Batch-Requests"]) > 1
            and max(int(r.headers["X-Torchship-Batch-Requests"]) for r in responses) > 2
        ):
            return
    pytest.fail("@serve.batch never put the concurrent requests together in 3 attempts")


def test_oip_routes_health_metadata_and_methods(ray_server: RayServer) -> None:
    assert requests.get(f"{ray_server.url}/v2/health/live", timeout=10).json() == {"live": True}
    ready = requests.get(f"{ray_server.url}/v2/health/ready", timeout=10)
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    assert requests.get(f"{ray_server.url}/ping", timeout=10).status_code == 200
    meta = requests.get(f"{ray_server.url}/v2/models/simple_cnn_pt2", timeout=10).json()
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]
    assert requests.get(f"{ray_server.url}/v2/models/nope/ready", timeout=10).status_code == 404
    # TorchServe hands a GET on /predictions and on /v2/models/<m>/infer to the handler (no body: 400); so does the app.
    assert requests.get(f"{ray_server.url}/predictions/simple_cnn", timeout=10).status_code == 400
    assert requests.get(f"{ray_server.url}/v2/models/simple_cnn/infer", timeout=10).status_code == 400
    assert requests.get(f"{ray_server.url}/../etc/passwd", timeout=10).status_code == 404


# -- OIP v2 gRPC: deploy/ray_grpc.py through Ray's gRPC proxy (docs/rest.md, gRPC) -----------------------------------


def _grpc_auth() -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKEN}")]


def test_grpc_stock_client_tritonclient(ray_server: RayServer) -> None:
    """tritonclient.grpc, not our client: live, ready, server and model metadata, model ready, and inference with raw
    contents equal to eager."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=ray_server.grpc_address)
    assert client.is_server_live()
    assert client.is_server_ready()
    server = client.get_server_metadata()
    assert (server.name, server.version, list(server.extensions)) == ("torchship", __version__, ["binary_tensor_data"])
    assert client.is_model_ready("dynamic_router_pt2")
    assert client.is_model_ready("simple_cnn", "1.0")
    meta = client.get_model_metadata("simple_cnn_pt2")
    assert (meta.name, list(meta.versions), meta.platform) == ("simple_cnn_pt2", ["1.0"], "pytorch_pt2")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 3, -1, -1])]
    spec = ZOO["dynamic_router"]
    x = spec.make_inputs(4, seed_offset=78)["x"]
    infer_input = grpcclient.InferInput("x", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x.numpy())
    result = client.infer("dynamic_router_pt2", [infer_input], headers=dict(_grpc_auth()), request_id="g-1")
    assert result.get_response().id == "g-1"
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(result.as_numpy("y").copy()), spec.factory()(x), atol=1e-5, rtol=1e-4)


def test_grpc_typed_contents_and_parameters_equal_eager(ray_server: RayServer) -> None:
    """Typed `contents` (fp32_contents) and a request parameter (top_k): the classifier's logits equal eager and its
    top-k equals the scripted post-processing on them; the reply's trailing metadata carries the handler's phases."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from torchship.models.process_outputs import process_outputs

    spec = ZOO["simple_cnn"]
    x = spec.make_inputs(2, seed_offset=79)["x"]
    request = service_pb2.ModelInferRequest(model_name="simple_cnn")
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape)).contents.fp32_contents.extend(x.flatten().tolist())
    request.parameters["top_k"].int64_param = 3
    with grpc.insecure_channel(ray_server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response, call = stub.ModelInfer.with_call(request, metadata=_grpc_auth(), timeout=60)
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    out = {
        o.name: torch.from_numpy(np.frombuffer(raw, dtype=dtypes[o.datatype]).reshape(list(o.shape)).copy())
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    with torch.no_grad():
        logits = spec.factory()(x)
    probabilities, classes = process_outputs(logits, 3)
    assert torch.allclose(out["logits"], logits, atol=1e-4, rtol=1e-3)
    assert torch.equal(out["classes"], classes)
    assert torch.allclose(out["probabilities"], probabilities, atol=1e-5, rtol=1e-4)
    trailing = dict(call.trailing_metadata())
    assert {"decode", "model", "encode", "handler", "ingress"} <= set(parse_server_timing(trailing["server-timing"]))


def test_grpc_and_rest_requests_share_the_endpoint_batches(ray_server: RayServer) -> None:
    """gRPC goes through the same endpoint deployment and @serve.batch as REST: sent together, a gRPC request is
    answered from a batch holding more requests than there were gRPC ones."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    from torchship.reliability.grpc_corpus import health_inputs, infer_request

    spec = ZOO["dynamic_router"]
    n_grpc, n_rest = 4, 12
    bodies = [encode_request({"x": spec.make_inputs(2, seed_offset=400 + i)["x"]}) for i in range(n_rest)]

    def send_rest(i: int) -> requests.Response:
        return _post(ray_server, "dynamic_router", bodies[i][0], {**_auth(), **bodies[i][1]})

    with grpc.insecure_channel(ray_server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for attempt in range(3):
            seeds = [attempt * 100 + i for i in range(n_grpc)]
            futures = [stub.ModelInfer.future(infer_request(2, seed=s), metadata=_grpc_auth(), timeout=60) for s in seeds]
            assert all(r.status_code == 200 for r in _concurrently(send_rest, n_rest))
            batched = []
            for seed, future in zip(seeds, futures, strict=True):
                response = future.result()
                y = torch.from_numpy(np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(2, 256).copy())
                with torch.no_grad():
                    assert torch.allclose(y, spec.factory()(health_inputs(2, seed)), atol=1e-5, rtol=1e-4)
                batched.append(int(dict(future.trailing_metadata())["x-torchship-batch-requests"]))
            if max(batched) > n_grpc:
                return
    pytest.fail(f"no gRPC request shared a batch with REST requests in 3 attempts (batch sizes {batched})")


def test_grpc_hostile_requests_get_their_status_codes_and_crash_nothing(ray_server: RayServer) -> None:
    """reliability/grpc_corpus.py's cases (malformed protobuf, wrong datatypes, lying raw sizes, unknown models,
    missing or wrong tokens, a message over the limit): each gets its gRPC code, no replica restarts, and valid
    requests still get eager outputs on both protocols."""
    from torchship.engines.ray.launcher import replica_pids
    from torchship.reliability.grpc_corpus import run_grpc_corpus

    before = {name: replica_pids(name) for name in ("ingress", "dynamic_router")}
    # A health check per group, not per case: each valid request waits out this suite's 200 ms batch delay.
    results = run_grpc_corpus(ray_server.grpc_address, TOKEN, limit_bytes=MAX_REQUEST_BYTES, health_every_case=False)
    failed = [r for r in results if not r.passed]
    assert not failed, failed
    assert {r.group for r in results} >= {"malformed protobuf", "datatype", "raw sizes", "routing", "token", "size"}
    assert {name: replica_pids(name) for name in before} == before
    assert_router_answers(ray_server.url, TOKEN)


def test_grpc_kserve_sdk_client(ray_server: RayServer) -> None:
    """kserve's InferenceGRPCClient, run as a script (kserve and tritonclient.grpc cannot share a process): live,
    ready, model ready, and inference with raw and with typed contents equal to eager."""
    import subprocess
    import sys

    spec = ZOO["dynamic_router"]
    x = spec.make_inputs(3, seed_offset=81)["x"]
    doc = {
        "address": ray_server.grpc_address,
        "endpoint": "dynamic_router",
        "metadata": _grpc_auth(),
        "inputs": {"x": {"shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}},
    }
    script = Path(__file__).with_name("kserve_grpc_client.py")
    proc = subprocess.run(
        [sys.executable, str(script)], input=json.dumps(doc), capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert (out["live"], out["ready"], out["model_ready"]) == (True, True, True), out
    with torch.no_grad():
        eager = spec.factory()(x)
    for kind in ("raw", "typed"):
        y = out[kind]["y"]
        assert (y["shape"], y["datatype"]) == ([3, 256], "FP32"), out[kind]
        assert torch.allclose(torch.tensor(y["data"]).reshape(3, 256), eager, atol=1e-5, rtol=1e-4), kind


# -- OIP v2 REST (docs/rest.md, "OIP v2 REST"): the same table and stock clients run on TorchServe in test_torchserve.py


def test_oip_routes_answer_as_the_contract_says(ray_server: RayServer, e2e_store: Path) -> None:
    assert oip.route_mismatches(ray_server.url, _auth(), oip.BOTH + oip.RAY_ONLY) == []
    meta = requests.get(f"{ray_server.url}/v2/models/{oip.ENDPOINT}", headers=_auth(), timeout=10)
    assert meta.status_code == 200 and meta.json() == oip.expected_metadata(e2e_store)


def test_stock_oip_clients_tritonclient_and_kserve(ray_server: RayServer, e2e_store: Path) -> None:
    """tritonclient[http] and the kserve SDK: health, model readiness, metadata, JSON and binary inference."""
    x = oip.inputs(3, seed=41)
    triton = oip.run_tritonclient(ray_server.url, _auth(), x)
    assert (triton["live"], triton["ready"], triton["model_ready"]) == (True, True, True)
    assert triton["metadata"] == oip.expected_metadata(e2e_store)
    assert triton["server"] == oip.RAY_SERVER_METADATA
    for kind in ("json", "binary"):
        oip.assert_eager(triton[kind], x, e2e_store, f"tritonclient {kind}")
    ks = oip.run_kserve_client(ray_server.url, _auth(), x)
    assert (ks["live"], ks["ready"], ks["model_ready"]) == (True, True, True), ks
    for kind in ("json", "binary"):
        assert ks[kind]["y"]["shape"] == [3, 256], ks[kind]
        oip.assert_eager(ks[kind]["y"]["data"], x, e2e_store, f"kserve {kind}")


# -- the front door (docs/benchmarks.md, Ray Serve's design space): HAProxy on the port (without a binary, Serve's proxy:
# the quick bench's design row, tests/e2e/test_bench.py)


def test_the_port_is_haproxys_in_front_of_the_ingress_replica(ray_server: RayServer) -> None:
    import psutil

    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    for address in (ray_server.url.removeprefix("http://"), ray_server.grpc_address):  # REST and OIP gRPC
        port = int(address.rsplit(":", 1)[1])
        owners = {(c.laddr.ip, psutil.Process(c.pid).name()) for c in listening if c.laddr.port == port and c.pid}
        assert owners == {("127.0.0.1", "haproxy")}, (address, owners)
    # ... and requests get through it: the ingress replica's own ready route, every endpoint served.
    assert requests.get(f"{ray_server.url}/v2/health/ready", timeout=10).json() == {"ready": True}
