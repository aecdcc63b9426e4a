"""KServe: the storage folder torchship's ServingRuntime serves, written by `torchship deploy kserve-store` from a
model_store/ of .mar files, and the facts about KServe that the overlays and `deploy check` rely on.

Layout (KServe mounts the InferenceService's storageUri at /mnt/models):

    config/config.properties    the pod's TorchServe config, with a model_snapshot naming every archive
    model-store/<endpoint>.mar  the archives, copied unchanged
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchship.archive.mar import MarArchive
from torchship.deploy.pod_config import pod_properties, properties_text
from torchship.errors import DeployError
from torchship.handlers.names import MODEL_CONFIG_FILE

#: Where KServe puts the InferenceService's storageUri in the predictor pod.
MOUNT_PATH = "/mnt/models"
STORE_DIR = "model-store"
CONFIG_PATH = "config/config.properties"
#: torchship's ServingRuntime and the name of the container KServe merges an InferenceService's `model` into.
RUNTIME_NAME = "torchship-torchserve"
CONTAINER_NAME = "kserve-container"
#: The model format torchship's runtime declares and its InferenceServices name: torchship .mar archives, which
#: need torchship's handler, torch 2.13 and TorchServe 0.12 (the image), not any `pytorch` model.
MODEL_FORMAT = {"name": "torchship-mar", "version": "1"}
#: KServe protocolVersions the runtime's pods answer, with what answers them. Only OIP v2 REST: TorchServe routes
#: `POST /v2/models/<endpoint>/infer` to the torchship handler exactly like `/predictions/<endpoint>` (same body, same
#: answer). Not `v1` (KServe v1's {"instances": [...]} body is not a tensor request: the handler answers 400) and
#: not `grpc-v2` (TorchServe's gRPC listens on the pod's loopback only, and the handler speaks REST bodies).
SUPPORTED_PROTOCOLS = {"v2": "OIP v2 REST (POST /v2/models/<endpoint>/infer and /predictions/<endpoint>)"}
#: The runtime container's command: TorchServe in the foreground (it is the container's main process; no KServe
#: wrapper), reading the layout above. --ncs: no config snapshots, the mount is read-only.
RUNTIME_ARGS = [
    "torchserve", "--start", "--foreground", "--ncs",
    f"--model-store={MOUNT_PATH}/{STORE_DIR}", f"--ts-config={MOUNT_PATH}/{CONFIG_PATH}",
]  # fmt: skip
#: TorchServe's registration defaults, used where an archive's model-config.yaml sets nothing (RegisterModelRequest).
TORCHSERVE_DEFAULT_BATCH_SIZE = 1
TORCHSERVE_DEFAULT_MAX_BATCH_DELAY_MS = 100

HEADER = """\
Written by `torchship deploy kserve-store` from configs/config.properties and {store}: the TorchServe config
of torchship's KServe ServingRuntime ({runtime}), read from {mount}/{config}.
max_request_size is TorchServe's own cut; the handler's limit is TORCHSHIP_MAX_REQUEST_BYTES in the runtime's env.
sha256 of each archive in {mount}/{store_dir}:
{digests}"""


def store_properties(gpu: bool = False) -> dict[str, str]:
    """The pod's TorchServe settings for the KServe mount (no model_snapshot yet)."""
    return pod_properties(f"{MOUNT_PATH}/{STORE_DIR}", gpu=gpu)


def _positive(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and value > 0 else None


def snapshot_entry(archive: MarArchive, props: dict[str, str]) -> tuple[str, str, dict[str, Any]]:
    """(model name, version, TorchServe snapshot entry) for one archive.

    TorchServe takes batch size, delay, workers and timeouts of a snapshot's models from the snapshot alone (not from
    the archive's model-config.yaml, which `--models all` would read), so they are copied from the archive here, with
    TorchServe's own defaults where the archive sets nothing. The queue limit (jobQueueSize) has no snapshot field:
    TorchServe reads it from the archive's model-config.yaml, as the e2e test of the runtime checks.
    """
    try:
        model = archive.mar_manifest["model"]
        name, version = str(model["modelName"]), str(model["modelVersion"])
    except zipfile.BadZipFile:
        raise DeployError(f"{archive.path} is not a .mar (zip) archive") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise DeployError(f"{archive.path}: no model name and version in MAR-INF/MANIFEST.json ({exc})") from None
    if name != archive.path.stem:
        raise DeployError(f"{archive.path}: the archive's model name is {name!r}; rename the file {name}.mar")
    try:
        config = archive.model_config or {}
    except KeyError:  # an archive without model-config.yaml: TorchServe's defaults throughout
        config = {}
    if not isinstance(config, dict):
        raise DeployError(f"{archive.path}: {MODEL_CONFIG_FILE} is not a mapping")
    workers = int(props["default_workers_per_model"])
    min_workers, max_workers = _positive(config, "minWorkers"), _positive(config, "maxWorkers")
    if min_workers is None or max_workers is None or max_workers < min_workers:
        min_workers = max_workers = workers
    entry = {
        "defaultVersion": True,
        "marName": archive.path.name,
        "minWorkers": min_workers,
        "maxWorkers": max_workers,
        "batchSize": _positive(config, "batchSize") or TORCHSERVE_DEFAULT_BATCH_SIZE,
        "maxBatchDelay": _positive(config, "maxBatchDelay") or TORCHSERVE_DEFAULT_MAX_BATCH_DELAY_MS,
        "responseTimeout": _positive(config, "responseTimeout") or int(props["default_response_timeout"]),
        "startupTimeout": _positive(config, "startupTimeout") or int(props["default_startup_timeout"]),
    }
    return name, version, entry


def model_snapshot(archives: list[MarArchive], props: dict[str, str]) -> dict[str, Any]:
    """TorchServe's model_snapshot registering every archive at start, one version each."""
    models: dict[str, dict[str, dict[str, Any]]] = {}
    for archive in archives:
        name, version, entry = snapshot_entry(archive, props)
        models[name] = {version: entry}
    return {"name": "startup.cfg", "modelCount": len(models), "models": models}


@dataclass(frozen=True)
class KServeStore:
    root: Path
    config: Path
    archives: list[Path]


def lay_out_store(model_store: Path, out: Path, *, gpu: bool = False, endpoints: list[str] | None = None) -> KServeStore:
    """Write the KServe storage folder for the archives of `model_store` (only `endpoints`, when given) into `out`,
    which must be new or empty: a storage location is read by running pods and is not rewritten in place."""
    mars = sorted(Path(model_store).glob("*.mar"))
    if endpoints:
        unknown = sorted(set(endpoints) - {m.stem for m in mars})
        if unknown:
            raise DeployError(f"no archives for endpoints {unknown} in {model_store}")
        mars = [m for m in mars if m.stem in endpoints]
    if not mars:
        raise DeployError(f"no .mar files in {model_store}: run `torchship archive` (or `make pipeline`) first")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DeployError(f"{out} exists and is not an empty folder: lay the store out into a new one")
    props = store_properties(gpu=gpu)
    snapshot = model_snapshot([MarArchive(m) for m in mars], props)
    store_dir, config = out / STORE_DIR, out / CONFIG_PATH
    store_dir.mkdir(parents=True)
    config.parent.mkdir(parents=True)
    copied = []
    for mar in mars:
        shutil.copyfile(mar, store_dir / mar.name)
        copied.append(store_dir / mar.name)
    digests = "\n".join(f"  {p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}" for p in copied)
    header = HEADER.format(
        store=model_store, runtime=RUNTIME_NAME, mount=MOUNT_PATH, config=CONFIG_PATH, store_dir=STORE_DIR, digests=digests
    )
    props["model_snapshot"] = json.dumps(snapshot, separators=(",", ":"), sort_keys=True)
    config.write_text(properties_text(props, header), encoding="utf-8")
    return KServeStore(out, config, copied)
