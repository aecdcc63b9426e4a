"""The pod's TorchServe config on a real TorchServe: the ports, probe commands and token rule the manifests rely on,
and the parity gate accepting the real archive and refusing a drifted one (which its worker already refused to
load: parity before ready)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from tests.helpers import REPO, drifted_copy, run_cli, run_readiness_probe
from torchship.archive.build import Endpoint
from torchship.deploy.kube import K8S_DIR, render
from torchship.engines.torchserve.launcher import TorchServe
from torchship.handlers.codec import encode_request
from torchship.handlers.errors import TOKEN_FAILED
from torchship.handlers.names import TOKEN_FILE_ENV
from torchship.settings import read_properties

POD_CONFIG = K8S_DIR / "base" / "torchserve" / "config.properties"
TOKEN = "k8s-shared-token"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def pod_store(archives: dict[str, Endpoint], tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("pod_store")
    shutil.copyfile(archives["simple_cnn"].mar, store / "simple_cnn.mar")
    drifted_copy(archives["simple_cnn_pt2"].mar, store / "simple_cnn_pt2.mar")
    return store


@pytest.fixture(scope="module")
def pod_server(
    pod_store: Path, token_file: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[TorchServe]:
    # The Deployment sets TORCHSHIP_INFERENCE_TOKEN_FILE from the Secret; TorchServe passes it on to its workers.
    monkeypatch_module.setenv(TOKEN_FILE_ENV, str(token_file))
    with TorchServe(pod_store, tmp_path_factory.mktemp("pod"), config_template=POD_CONFIG) as ts:
        yield ts


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _container() -> dict:  # type: ignore[type-arg]
    deployment = next(o for o in render(K8S_DIR / "overlays" / "cpu") if o["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def test_pod_config_has_token_auth_off_and_management_on_loopback(pod_server: TorchServe) -> None:
    props = read_properties(POD_CONFIG)
    assert props["disable_token_authorization"] == "true"
    assert not pod_server.key_file.exists()  # TorchServe made no keys: the handler's shared token is the rule
    assert props["management_address"].startswith("http://127.0.0.1:")


def test_the_readiness_probe_command_passes_on_the_ready_server(pod_server: TorchServe) -> None:
    command = _container()["readinessProbe"]["exec"]["command"]
    proc = run_readiness_probe(command, pod_server.management_url)  # the manifest's probe, at this server's management port
    assert proc.returncode == 0, proc.stderr
    # The drifted archive refused to load (its worker's reference check failed), so the pod serves the other one.
    assert "1 models ready" in proc.stdout
    assert "simple_cnn_pt2: its answers on cpu differ from the archive's references" in pod_server.refused["simple_cnn_pt2"]


def test_the_probe_fails_when_nothing_listens(tmp_path: Path) -> None:
    from torchship.engines.base import free_port

    proc = subprocess.run(
        [sys.executable, "-m", "torchship.engines.torchserve.probe", "--management-url", f"http://127.0.0.1:{free_port()}"],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "not ready" in proc.stderr


def test_liveness_path_and_metrics_port_answer(pod_server: TorchServe) -> None:
    live = _container()["livenessProbe"]["httpGet"]
    assert requests.get(pod_server.url + live["path"], timeout=10).status_code == 200
    metrics = requests.get(pod_server.metrics_url + "/metrics", timeout=10)
    assert metrics.status_code == 200 and "ts_" in metrics.text


def test_the_shared_token_is_enforced_by_the_handler(pod_server: TorchServe) -> None:
    body, headers = encode_request({"x": torch.randn(1, 3, 32, 32)})
    url = f"{pod_server.url}/predictions/simple_cnn"
    for auth in ({}, {"Authorization": "Bearer nope"}):
        r = requests.post(url, data=body, headers={**headers, **auth}, timeout=60)
        assert r.status_code == 400 and r.json()["error"] == TOKEN_FAILED
    r = requests.post(url, data=body, headers={**headers, "Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert r.status_code == 200 and "outputs" in r.json()


def _gate(
    *extra: str, server: TorchServe, store: Path, token_file: Path, command: str = "gate"
) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "deploy", command, "--url", server.url, "--model-store", str(store), "--token-file", str(token_file),
        *extra, check=False,
    )  # fmt: skip


def test_gate_accepts_the_real_archive(pod_server: TorchServe, pod_store: Path, token_file: Path, tmp_path: Path) -> None:
    report = tmp_path / "gate.json"
    proc = _gate("--endpoint", "simple_cnn", "--report", str(report), server=pod_server, store=pod_store, token_file=token_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gate passed" in proc.stdout
    rows = json.loads(report.read_text())["rows"]
    assert rows and all(r["passed"] for r in rows)


def test_gate_refuses_the_drifted_archive(pod_server: TorchServe, pod_store: Path, token_file: Path) -> None:
    proc = _gate("--endpoint", "simple_cnn_pt2", server=pod_server, store=pod_store, token_file=token_file)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "gate refused the candidate" in proc.stdout and "drift:" in proc.stdout
    whole = _gate(server=pod_server, store=pod_store, token_file=token_file)  # one drifted endpoint refuses the revision
    assert whole.returncode == 1


def test_rollout_applies_only_after_the_gate(pod_server: TorchServe, pod_store: Path, token_file: Path) -> None:
    image = "torchship/torchserve:candidate-7"
    kw = {"command": "rollout", "server": pod_server, "store": pod_store, "token_file": token_file}
    refused = _gate("--endpoint", "simple_cnn_pt2", "--image", image, "--dry-run", **kw)  # type: ignore[arg-type]
    assert refused.returncode == 1
    assert "rollout refused" in refused.stderr and "kind: Deployment" not in refused.stdout
    accepted = _gate("--endpoint", "simple_cnn", "--image", image, "--dry-run", **kw)  # type: ignore[arg-type]
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "kind: Deployment" in accepted.stdout and f"image: {image}" in accepted.stdout
    foreign = _gate("--endpoint", "simple_cnn", "--image", "elsewhere/model:1", "--dry-run", **kw)  # type: ignore[arg-type]
    assert foreign.returncode == 1 and "no container" in foreign.stderr
