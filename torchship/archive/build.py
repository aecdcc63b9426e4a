"""model_store/<endpoint>.mar: one self-contained archive per usable format of every exported model.

Built by the real torch-model-archiver, then rewritten with sorted entries, fixed timestamps and modes, so the
same inputs give a byte-identical .mar.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from torchship import handlers
from torchship.archive.mar import rewrite_archive
from torchship.errors import ArchiveError
from torchship.handlers.codec import Signature, model_metadata
from torchship.handlers.names import (
    ENDPOINT_FILE,
    HANDLER_ENTRY_FILE,
    HANDLER_PACKAGE,
    HANDLER_PACKAGE_FILES,
    MANIFEST_FILE,
    MAR_MANIFEST_FILE,
    MODEL_CONFIG_FILE,
    OIP_METADATA_FILE,
    REFERENCE_FILE,
    TOPK_FILE,
)
from torchship.manifest import FORMAT_FILES, POSTPROCESS_DIR, Manifest, read_manifest
from torchship.settings import MODEL_CONFIG, config_file

TOPK_MODEL = "process_outputs"
FIXED_CREATED_ON = "01/01/1980 00:00:00"


@dataclass(frozen=True)
class Endpoint:
    name: str
    model: str
    fmt: str
    mar: Path


#: The suffix of a format's endpoint when it is not the model's default one.
ENDPOINT_SUFFIX = {"torchscript": "ts", "pt2": "pt2", "aoti": "aoti"}


def endpoint_name(manifest: Manifest, fmt: str) -> str:
    """`<model>` serves the format export chose as the default (the fastest that passed parity, recorded in the
    manifest); each other usable format is `<model>_ts`, `<model>_pt2` or `<model>_aoti`."""
    return manifest.name if fmt == manifest.serving_default() else f"{manifest.name}_{ENDPOINT_SUFFIX[fmt]}"


def load_model_config(path: Path | None = None) -> dict[str, Any]:
    """An archive's model-config.yaml: path, else the settings' model-config.yaml (torchship.settings)."""
    path = path or config_file(MODEL_CONFIG)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ArchiveError(f"cannot read the model config {path}: {exc}") from None
    required = {"batchSize", "maxBatchDelay", "minWorkers", "maxWorkers", "responseTimeout", "deviceType"}
    if not isinstance(config, dict) or not required <= set(config):
        raise ArchiveError(f"{path} must be a mapping with {sorted(required)}")
    return config


def archiver() -> str:
    """The torch-model-archiver executable of this environment."""
    exe = Path(sys.executable).parent / "torch-model-archiver"
    found = str(exe) if exe.exists() else shutil.which("torch-model-archiver")
    if not found:
        raise ArchiveError("torch-model-archiver is not installed; run `make setup` (it comes with torchship's dependencies)")
    return found


def _normalise(src: Path, dest: Path) -> None:
    """Rewrite a .mar deterministically: sorted entries, fixed dates and modes, fixed createdOn."""

    def fixed_date(entries: dict[str, bytes]) -> None:
        mar_manifest = json.loads(entries[MAR_MANIFEST_FILE])
        mar_manifest["createdOn"] = FIXED_CREATED_ON
        entries[MAR_MANIFEST_FILE] = (json.dumps(mar_manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")

    rewrite_archive(src, dest, fixed_date)


def archive_endpoint(model_dir: Path, manifest: Manifest, fmt: str, *, out_dir: Path, model_config: dict[str, Any]) -> Endpoint:
    """Build model_store/<endpoint>.mar for one format of one exported model."""
    name = endpoint_name(manifest, fmt)
    handler_src = Path(handlers.__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix=f"torchship-archive-{name}-") as tmp_name:
        tmp = Path(tmp_name)
        extra = tmp / "extra"
        (extra / HANDLER_PACKAGE).mkdir(parents=True)
        for f in HANDLER_PACKAGE_FILES:
            shutil.copyfile(handler_src / f, extra / HANDLER_PACKAGE / f)
        shutil.copyfile(model_dir / MANIFEST_FILE, extra / MANIFEST_FILE)
        shutil.copyfile(model_dir / REFERENCE_FILE, extra / REFERENCE_FILE)
        (extra / ENDPOINT_FILE).write_text(json.dumps({"endpoint": name, "format": fmt}, indent=2) + "\n", encoding="utf-8")
        raw_manifest = json.loads((model_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        metadata = model_metadata(name, fmt, Signature.from_manifest(raw_manifest))
        (extra / OIP_METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        if manifest.task == "classifier":
            topk = model_dir / POSTPROCESS_DIR / TOPK_MODEL
            if not (topk / MANIFEST_FILE).is_file():
                raise ArchiveError(
                    f"{name}: {topk} is missing (a classifier exports its top-k post-processing with it); "
                    f"re-export it with `torchship export {manifest.name}`"
                )
            topk_manifest = read_manifest(topk)
            if not topk_manifest.formats.get("torchscript") or not topk_manifest.formats["torchscript"].usable:
                raise ArchiveError(f"{name}: its {TOPK_MODEL} export did not pass its parity gate; re-export {manifest.name}")
            shutil.copyfile(topk / FORMAT_FILES["torchscript"], extra / TOPK_FILE)
        shutil.copyfile(handler_src / "entry.py", tmp / HANDLER_ENTRY_FILE)
        config_path = tmp / MODEL_CONFIG_FILE
        config_path.write_text(yaml.safe_dump(model_config, sort_keys=True), encoding="utf-8")
        built = tmp / "out"
        built.mkdir()
        cmd = [
            archiver(),
            "--model-name", name,
            "--version", manifest.version,
            "--serialized-file", str(model_dir / FORMAT_FILES[fmt]),
            "--handler", str(tmp / HANDLER_ENTRY_FILE),
            "--extra-files", str(extra),
            "--config-file", str(config_path),
            "--export-path", str(built),
            "--archive-format", "default",
            "--force",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
        if proc.returncode != 0:
            raise ArchiveError(
                f"{name}: torch-model-archiver failed (exit {proc.returncode}):\n{proc.stderr.strip() or proc.stdout.strip()}"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        dest = out_dir / f"{name}.mar"
        _normalise(built / f"{name}.mar", dest)
    return Endpoint(name, manifest.name, fmt, dest)


def archive_default_endpoint(model: str, *, artifacts: Path, out_dir: Path, model_config: dict[str, Any]) -> Endpoint:
    """Build only `<model>.mar`, the model's default endpoint (the format its manifest chose)."""
    model_dir = artifacts / model
    manifest = read_manifest(model_dir)  # refuses files changed since export
    fmt = manifest.serving_default()
    if fmt is None:
        raise ArchiveError(f"{model}: no format passed its parity gate; re-export it")
    return archive_endpoint(model_dir, manifest, fmt, out_dir=out_dir, model_config=model_config)


def archive_models(
    names: list[str], *, artifacts: Path, out_dir: Path, model_config: dict[str, Any], sign_key: Path | None = None
) -> list[Endpoint]:
    """Archive every usable format of the named models (all exported models if none are named); with `sign_key` (an
    ed25519 private key, PEM) each archive is signed (signing.py)."""
    signer = None
    if sign_key is not None:
        from torchship.archive.signing import load_signing_key

        signer = load_signing_key(sign_key)  # a bad key fails before anything is built
    if not artifacts.is_dir():
        raise ArchiveError(f"{artifacts} does not exist: run `torchship export` first")
    available = sorted(p.name for p in artifacts.iterdir() if (p / MANIFEST_FILE).is_file())
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ArchiveError(f"no exported model(s) {unknown} in {artifacts}; exported: {available}")
    endpoints: list[Endpoint] = []
    for model in names or available:
        model_dir = artifacts / model
        manifest = read_manifest(model_dir)  # refuses files changed since export
        for fmt in manifest.usable_formats():
            endpoints.append(archive_endpoint(model_dir, manifest, fmt, out_dir=out_dir, model_config=model_config))
            if signer is not None:
                from torchship.archive.signing import sign_archive

                sign_archive(endpoints[-1].mar, signer)
    return endpoints
