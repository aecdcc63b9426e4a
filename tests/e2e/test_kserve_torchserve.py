"""torchship's KServe runtime on a real TorchServe: the storage folder `torchship deploy kserve-store` lays out from
the session's archives, served by the ServingRuntime container's own command, env and config; readiness by the pod's
own probe; answers equal to the eager references on both paths KServe's v2 protocol and the REST contract use."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from tests.helpers import run_cli, run_readiness_probe
from torchship.archive.build import Endpoint
from torchship.archive.mar import MarArchive
from torchship.deploy import kserve
from torchship.deploy.kube import K8S_DIR, render
from torchship.deploy.pod_config import IMAGE_OIP_AGENT_JAR
from torchship.engines.base import free_port
from torchship.engines.torchserve import oip_agent
from torchship.engines.torchserve.java import find_java, java_home
from torchship.engines.torchserve.launcher import write_properties
from torchship.engines.torchserve.probe import check as probe_check
from torchship.errors import NotReady
from torchship.handlers.codec import decode_response, encode_request
from torchship.handlers.errors import TOKEN_FAILED
from torchship.handlers.names import MAX_REQUEST_BYTES_ENV, OIP_METADATA_FILE, bearer
from torchship.parity import compare_all
from torchship.settings import read_properties
from torchship.spec import Tolerance

TOKEN = "kserve-shared-token"
ENDPOINTS = ("simple_cnn", "simple_cnn_pt2")
READY_TIMEOUT_S = 300.0
#: The pod's own folders (the runtime's workingDir, its temp dir, the Secret's mount): each becomes a folder of this test.
POD_WORK_DIR = "/var/run/torchserve"
POD_TMP_DIR = "/tmp"
POD_TOKEN_DIR = "/etc/torchship/token"


def _runtime_container() -> dict[str, Any]:
    runtime = next(o for o in render(K8S_DIR / "overlays" / "kserve") if o["kind"] == "ServingRuntime")
    container: dict[str, Any] = next(c for c in runtime["spec"]["containers"] if c["name"] == kserve.CONTAINER_NAME)
    return container


@dataclass
class RuntimePod:
    url: str
    management_url: str
    mount: Path
    log: Path
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def mount(archives: dict[str, Endpoint], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What KServe mounts at /mnt/models: the folder `torchship deploy kserve-store` writes, from real archives."""
    source = tmp_path_factory.mktemp("kserve_source")
    for name in ENDPOINTS:
        shutil.copyfile(archives[name].mar, source / f"{name}.mar")
    out = tmp_path_factory.mktemp("kserve_mount") / "mnt-models"
    run_cli("deploy", "kserve-store", "--model-store", str(source), "--out", str(out))
    return out


@pytest.fixture(scope="module")
def pod(mount: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimePod]:
    """TorchServe started exactly as the runtime container starts it: the container's args and env, from its working
    directory, with the store's config.properties. Rewritten, and nothing else: the pod's addresses become free
    ports on 127.0.0.1 (0.0.0.0:8080 / 8082 and the fixed 8081, 7070, 7071 would collide with other servers on this
    machine), and the pod's paths become this test's own folders (/mnt/models -> the laid-out store, the work and
    temp dirs and the Secret's mount -> folders under this test's temp dir; two TorchServes must not share a tmp)."""
    container = _runtime_container()
    work = tmp_path_factory.mktemp("kserve_pod")
    local = {
        kserve.MOUNT_PATH: str(mount),
        POD_WORK_DIR: str(work / "run"),
        POD_TMP_DIR: str(work / "tmp"),
        POD_TOKEN_DIR: str(work / "secret"),
    }
    for folder in local.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    (work / "secret" / "token").write_text(TOKEN + "\n")

    def here(value: str) -> str:
        """A pod path (alone, or as a --flag=path) as this test's path; anything else unchanged."""
        flag, sep, path = value.partition("=") if value.startswith("--") else ("", "", value)
        for pod_path, local_path in local.items():
            if path == pod_path or path.startswith(pod_path + "/"):
                return flag + sep + local_path + path[len(pod_path) :]
        return value

    config = mount / kserve.CONFIG_PATH
    props = read_properties(config)
    url, management_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    props.update(
        {
            "inference_address": url,
            "management_address": management_url,
            "metrics_address": f"http://127.0.0.1:{free_port()}",
            "grpc_inference_port": str(free_port()),
            "grpc_management_port": str(free_port()),
            "model_store": here(props["model_store"]),
            # A regex in a Java properties file: the path escaped, its backslashes doubled (as the local launcher does).
            "allowed_urls": "file://" + re.escape(here(props["model_store"])).replace("\\", "\\\\") + "/.*\\\\.mar",
            "vmargs": props["vmargs"]
            .replace(f"-Djava.io.tmpdir={POD_TMP_DIR}", f"-Djava.io.tmpdir={local[POD_TMP_DIR]}")
            .replace(oip_agent.vmarg(IMAGE_OIP_AGENT_JAR), oip_agent.vmarg(oip_agent.agent_jar())),
        }
    )
    write_properties(config, props)

    java = find_java()
    assert java is not None, "TorchServe needs Java 17+: run `make setup`"
    env = {**os.environ, **{e["name"]: here(str(e["value"])) for e in container["env"]}}
    # The image puts its venv and Java on PATH; here they are this environment's.
    env.update(
        {
            "JAVA_HOME": str(java_home(java)),
            "PATH": os.pathsep.join([str(java.parent), str(Path(sys.executable).parent), env["PATH"]]),
        }
    )
    args = [here(a) for a in container["args"]]
    log = work / "torchserve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, cwd=here(container["workingDir"]), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert process.poll() is None, f"TorchServe exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            try:
                probe_check(management_url, expected=len(ENDPOINTS))
                break
            except NotReady:
                assert time.monotonic() < deadline, f"not ready after {READY_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}"
                time.sleep(1.0)
        yield RuntimePod(url, management_url, mount, log, process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # the wrapper's java and the workers too
        process.wait(timeout=30)


def test_the_runtime_command_is_the_one_the_store_is_laid_out_for() -> None:
    args = _runtime_container()["args"]
    assert args == kserve.RUNTIME_ARGS
    assert f"--model-store={kserve.MOUNT_PATH}/{kserve.STORE_DIR}" in args


def test_the_pods_readiness_probe_passes(pod: RuntimePod) -> None:
    command = _runtime_container()["readinessProbe"]["exec"]["command"]
    proc = run_readiness_probe(command, pod.management_url)  # the manifest's probe, at this server's management port
    assert proc.returncode == 0, proc.stderr
    assert f"{len(ENDPOINTS)} models ready" in proc.stdout


@pytest.mark.parametrize("route", ["/v2/models/{endpoint}/infer", "/predictions/{endpoint}"])
def test_an_inference_equals_the_eager_reference(pod: RuntimePod, route: str) -> None:
    archive = MarArchive(pod.mount / kserve.STORE_DIR / "simple_cnn.mar")
    case = archive.references()[0]
    body, headers = encode_request(case["inputs"])
    r = requests.post(
        pod.url + route.format(endpoint=archive.endpoint), data=body, headers={**headers, **bearer(TOKEN)}, timeout=120
    )
    assert r.status_code == 200, r.text[:500]
    outputs = decode_response(r.content, r.headers.get("Inference-Header-Content-Length"))["outputs"]
    expected = tuple(case["outputs"][n] for n in archive.output_names)
    comparison = compare_all(tuple(outputs[n] for n in archive.output_names), expected, Tolerance(*archive.tolerance))
    assert comparison.passed, comparison.reason


def test_the_shared_token_is_enforced_by_the_handler(pod: RuntimePod) -> None:
    archive = MarArchive(pod.mount / kserve.STORE_DIR / "simple_cnn.mar")
    body, headers = encode_request(archive.references()[0]["inputs"])
    for auth in ({}, bearer("nope")):
        r = requests.post(f"{pod.url}/v2/models/simple_cnn/infer", data=body, headers={**headers, **auth}, timeout=60)
        assert r.status_code == 400 and r.json()["error"] == TOKEN_FAILED


def test_an_over_limit_body_gets_the_handlers_json_413(pod: RuntimePod) -> None:
    limit = int(next(e["value"] for e in _runtime_container()["env"] if e["name"] == MAX_REQUEST_BYTES_ENV))
    assert int(read_properties(pod.mount / kserve.CONFIG_PATH)["max_request_size"]) > limit  # TorchServe's cut is higher
    r = requests.post(
        f"{pod.url}/predictions/simple_cnn",
        data=b"0" * (limit + 1),
        headers={"Content-Type": "application/json", **bearer(TOKEN)},
        timeout=120,
    )
    assert r.status_code == 413 and f"the limit is {limit}" in r.json()["error"]


def test_stock_tritonclient_reads_health_metadata_and_infers(pod: RuntimePod) -> None:
    """What a KServe v2 client does against the runtime's pod: health, model readiness and metadata (the archive's
    own document, answered by the OIP agent the pod's vmargs load), then a binary inference equal to eager."""
    import numpy as np
    import tritonclient.http as httpclient

    archive = MarArchive(pod.mount / kserve.STORE_DIR / "simple_cnn.mar")
    case = archive.references()[0]
    x = case["inputs"]["x"]
    client = httpclient.InferenceServerClient(url=pod.url.removeprefix("http://"))
    headers = bearer(TOKEN)
    try:
        assert client.is_server_live(headers=headers) and client.is_server_ready(headers=headers)
        assert all(client.is_model_ready(name, headers=headers) for name in ENDPOINTS)
        meta = client.get_model_metadata("simple_cnn", headers=headers)
        assert meta == json.loads(archive.entries[OIP_METADATA_FILE]), meta
        assert (meta["inputs"][0]["name"], meta["outputs"][0]["name"]) == ("x", archive.output_names[0])
        infer_input = httpclient.InferInput("x", list(x.shape), "FP32")
        infer_input.set_data_from_numpy(x.numpy().astype(np.float32), binary_data=True)
        output = httpclient.InferRequestedOutput(archive.output_names[0], binary_data=True)
        result = client.infer("simple_cnn", [infer_input], outputs=[output], headers=headers)
    finally:
        client.close()
    served = torch.from_numpy(np.array(result.as_numpy(archive.output_names[0])))
    comparison = compare_all((served,), (case["outputs"][archive.output_names[0]],), Tolerance(*archive.tolerance))
    assert comparison.passed, comparison.reason


def test_each_model_runs_with_its_archives_settings(pod: RuntimePod) -> None:
    """The snapshot carries workers, batching and timeouts (TorchServe reads those from a snapshot alone); the queue
    limit, which the snapshot has no field for, comes from the archive's model-config.yaml (the archive's 100, not the
    server default of 1000: the point past which the pod answers 503)."""
    for endpoint in ENDPOINTS:
        config = MarArchive(pod.mount / kserve.STORE_DIR / f"{endpoint}.mar").model_config
        r = requests.get(f"{pod.management_url}/models/{endpoint}", timeout=30)
        assert r.status_code == 200, r.text[:500]
        described = r.json()[0]
        for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout"):
            assert described[key] == config[key], (endpoint, key, described[key], config[key])
        queue = described["jobQueueStatus"]
        assert queue["remainingCapacity"] + queue["pendingRequests"] == config["jobQueueSize"], (endpoint, queue)
