"""`torchship deploy kserve-store`: the KServe storage folder laid out from a folder of .mar files, on small stand-in
archives (only MAR-INF/MANIFEST.json and model-config.yaml, what the command reads; no export needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import run_cli
from torchship.archive.mar import write_archive
from torchship.deploy import kserve
from torchship.deploy.kube import K8S_DIR, render
from torchship.deploy.pod_config import frontend_limit_bytes
from torchship.settings import CONFIG_PROPERTIES, config_file, default_body_limit_bytes, read_properties

CONFIG = {"batchSize": 8, "maxBatchDelay": 5, "minWorkers": 1, "maxWorkers": 2, "responseTimeout": 90, "deviceType": "cpu"}


def _mar(store: Path, name: str, *, version: str = "1.0", config: dict[str, Any] | None = None, model_name: str = "") -> Path:
    entries = {
        "MAR-INF/MANIFEST.json": json.dumps({"model": {"modelName": model_name or name, "modelVersion": version}}).encode(),
        "torchship_entry.py": b"# stand-in\n",
    }
    if config is not None:
        entries["model-config.yaml"] = yaml.safe_dump(config).encode()
    write_archive(entries, store / f"{name}.mar")
    return store / f"{name}.mar"


@pytest.fixture
def model_store(tmp_path: Path) -> Path:
    store = tmp_path / "model_store"
    _mar(store, "simple_cnn", config=CONFIG)
    _mar(store, "simple_cnn_pt2", version="2.1", config=CONFIG)
    _mar(store, "stock", config=None)  # an archive without model-config.yaml: TorchServe's own defaults
    return store


def _runtime_args() -> list[str]:
    runtime = next(o for o in render(K8S_DIR / "overlays" / "kserve") if o["kind"] == "ServingRuntime")
    args: list[str] = runtime["spec"]["containers"][0]["args"]
    return args


def test_the_store_has_the_layout_the_runtime_reads(model_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "kserve"
    proc = run_cli("deploy", "kserve-store", "--model-store", str(model_store), "--out", str(out))
    assert "KServe storage folder ready" in proc.stdout
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["config/config.properties", "model-store/simple_cnn.mar", "model-store/simple_cnn_pt2.mar",
                     "model-store/stock.mar"]  # fmt: skip
    for mar in model_store.glob("*.mar"):
        assert (out / "model-store" / mar.name).read_bytes() == mar.read_bytes()
    # The runtime container's flags name the very files written, under KServe's mount point.
    args = _runtime_args()
    assert f"--model-store={kserve.MOUNT_PATH}/model-store" in args
    assert f"--ts-config={kserve.MOUNT_PATH}/config/config.properties" in args


def test_the_config_starts_torchserve_like_the_pods(model_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "kserve"
    run_cli("deploy", "kserve-store", "--model-store", str(model_store), "--out", str(out))
    props = read_properties(out / "config" / "config.properties")
    local = read_properties(config_file(CONFIG_PROPERTIES))
    limit = default_body_limit_bytes()
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["management_address"] == "http://127.0.0.1:8081"  # probes only, never exposed
    assert props["disable_token_authorization"] == "true"  # the handler checks the Secret's token instead
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["allowed_urls"] == "file:///mnt/models/model-store/.*\\\\.mar"
    # TorchServe's own cut sits above the handler's limit (TORCHSHIP_MAX_REQUEST_BYTES), as the local launcher does.
    assert props["max_request_size"] == str(frontend_limit_bytes(limit)) and frontend_limit_bytes(limit) > limit
    assert "number_of_gpu" not in props
    changed = {"inference_address", "management_address", "metrics_address", "disable_token_authorization", "model_store",
               "allowed_urls", "max_request_size"}  # fmt: skip
    assert {k: v for k, v in props.items() if k in local and k not in changed} == {
        k: v for k, v in local.items() if k not in changed
    }
    text = (out / "config" / "config.properties").read_text()
    assert "simple_cnn.mar " in text and "sha256" in text  # each archive's digest, as comments


def test_the_model_snapshot_registers_every_archive_with_its_own_settings(model_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "kserve"
    run_cli("deploy", "kserve-store", "--model-store", str(model_store), "--out", str(out))
    snapshot = json.loads(read_properties(out / "config" / "config.properties")["model_snapshot"])
    assert snapshot["modelCount"] == 3 and set(snapshot["models"]) == {"simple_cnn", "simple_cnn_pt2", "stock"}
    assert snapshot["models"]["simple_cnn"] == {
        "1.0": {"defaultVersion": True, "marName": "simple_cnn.mar", "minWorkers": 1, "maxWorkers": 2, "batchSize": 8,
                "maxBatchDelay": 5, "responseTimeout": 90, "startupTimeout": 300}
    }  # fmt: skip
    assert list(snapshot["models"]["simple_cnn_pt2"]) == ["2.1"]
    # No model-config.yaml: what TorchServe itself would use (batch 1, 100 ms, default workers and timeouts).
    stock = snapshot["models"]["stock"]["1.0"]
    assert (stock["batchSize"], stock["maxBatchDelay"], stock["minWorkers"], stock["responseTimeout"]) == (1, 100, 1, 120)


def test_endpoints_and_gpu(model_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "kserve-gpu"
    run_cli("deploy", "kserve-store", "--model-store", str(model_store), "--out", str(out), "--endpoint", "simple_cnn", "--gpu")
    assert [p.name for p in (out / "model-store").iterdir()] == ["simple_cnn.mar"]
    props = read_properties(out / "config" / "config.properties")
    assert props["number_of_gpu"] == "1"
    assert set(json.loads(props["model_snapshot"])["models"]) == {"simple_cnn"}


def test_refusals(model_store: Path, tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "old.txt").write_text("x")
    proc = run_cli("deploy", "kserve-store", "--model-store", str(model_store), "--out", str(busy), check=False)
    assert proc.returncode == 1 and "is not an empty folder" in proc.stderr
    assert sorted(p.name for p in busy.iterdir()) == ["old.txt"]

    proc = run_cli("deploy", "kserve-store", "--model-store", str(tmp_path / "none"), "--out", str(tmp_path / "a"), check=False)
    assert proc.returncode == 1 and "no .mar files" in proc.stderr

    proc = run_cli(
        "deploy", "kserve-store", "--model-store", str(model_store), "--out", str(tmp_path / "b"), "--endpoint", "nope",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1 and "no archives for endpoints ['nope']" in proc.stderr

    renamed = tmp_path / "renamed"
    _mar(renamed, "other_name", model_name="simple_cnn", config=CONFIG)
    proc = run_cli("deploy", "kserve-store", "--model-store", str(renamed), "--out", str(tmp_path / "c"), check=False)
    assert proc.returncode == 1 and "the archive's model name is 'simple_cnn'; rename the file simple_cnn.mar" in proc.stderr
    assert not (tmp_path / "c").exists()
