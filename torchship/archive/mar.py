"""The one reader (and writer) of torchship `.mar` files outside the handler: entries, manifest, endpoint, format,
model config, checksum listing, reference cases, and a safe unpack.

stdlib + yaml, torch only when references are read: the Ray replica imports this module, so it stays light.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from torchship.handlers.errors import UnsafeArchive
from torchship.handlers.names import (
    CHECKSUMS_FILE,
    ENDPOINT_FILE,
    MANIFEST_FILE,
    MAR_MANIFEST_FILE,
    MODEL_CONFIG_FILE,
    REFERENCE_FILE,
    SIGNATURE_FILE,
)

#: Every entry of a written archive gets this timestamp (the zip format's earliest).
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
#: Marks an unpacked folder as complete (a crash mid-unpack leaves a staging folder, never a half cache entry).
COMPLETE_MARK = ".complete"


class MarArchive:
    """One .mar on disk, read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"MarArchive({str(self.path)!r})"

    @cached_property
    def entries(self) -> dict[str, bytes]:
        """Every file entry, by name."""
        with zipfile.ZipFile(self.path) as z:
            return {info.filename: z.read(info) for info in z.infolist() if not info.is_dir()}

    def read(self, name: str) -> bytes:
        with zipfile.ZipFile(self.path) as z:
            return z.read(name)

    def _json(self, name: str) -> Any:
        return json.loads(self.read(name))

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """The export's manifest.json (signature, formats, tolerance, parity)."""
        doc: dict[str, Any] = self._json(MANIFEST_FILE)
        return doc

    @cached_property
    def endpoint_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = self._json(ENDPOINT_FILE)
        return doc

    @property
    def endpoint(self) -> str:
        return str(self.endpoint_doc["endpoint"])

    @property
    def format(self) -> str:
        return str(self.endpoint_doc["format"])

    @property
    def model(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        if not self.is_torchship:  # TorchServe's own field, what its frontend serves the archive as
            return str(self.mar_manifest.get("model", {}).get("modelVersion", "1.0"))
        return str(self.manifest["version"])

    @cached_property
    def names(self) -> frozenset[str]:
        """Every entry's name (nothing read)."""
        with zipfile.ZipFile(self.path) as z:
            return frozenset(info.filename for info in z.infolist() if not info.is_dir())

    @property
    def is_torchship(self) -> bool:
        """Built by `torchship archive` (it carries the endpoint document); otherwise a foreign archive, served by its
        own handler as TorchServe would (torchship/archive/foreign.py)."""
        return ENDPOINT_FILE in self.names

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.manifest["outputs"]]

    @property
    def tolerance(self) -> tuple[float, float]:
        """(atol, rtol) of the served format."""
        tol = self.manifest["tolerance"][self.format]
        return float(tol["atol"]), float(tol["rtol"])

    @cached_property
    def model_config(self) -> dict[str, Any]:
        """TorchServe's model config (batch size and delay, workers; the Ray app reads the same): the file the
        MANIFEST names (`--config-file`), else model-config.yaml, else none ({}: TorchServe's defaults)."""
        name = self.mar_manifest.get("model", {}).get("configFile") or MODEL_CONFIG_FILE
        if name not in self.names:
            return {}
        doc: dict[str, Any] = yaml.safe_load(self.read(name)) or {}
        return doc

    @cached_property
    def mar_manifest(self) -> dict[str, Any]:
        doc: dict[str, Any] = self._json(MAR_MANIFEST_FILE)
        return doc

    @cached_property
    def checksums(self) -> dict[str, str]:
        doc: dict[str, str] = self._json(CHECKSUMS_FILE)
        return doc

    def references(self) -> list[dict[str, Any]]:
        """The reference cases (inputs, eager outputs, batch size) the archive carries; never unpickled."""
        import torch

        doc = torch.load(io.BytesIO(self.read(REFERENCE_FILE)), weights_only=True)
        return list(doc["cases"])

    def unpack_cached(self, cache_dir: Path) -> Path:
        """Unpack into cache_dir/<sha256 of the .mar>/ once; refuse entries that would land outside that folder."""
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        dest = cache_dir / digest
        if (dest / COMPLETE_MARK).is_file():
            return dest
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{digest[:12]}-"))
        try:
            with zipfile.ZipFile(self.path) as z:
                for info in z.infolist():
                    name = PurePosixPath(info.filename)
                    if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
                        raise UnsafeArchive(f"{self.path.name}: entry {info.filename!r} would be written outside the cache")
                    target = staging.joinpath(*name.parts)
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, target.open("wb") as out:
                        shutil.copyfileobj(src, out)
            (staging / COMPLETE_MARK).write_text(self.path.name, encoding="utf-8")
            try:
                staging.rename(dest)
            except OSError:  # another replica unpacked the same archive first
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return dest


def store_archives(model_store: Path) -> list[MarArchive]:
    """Every .mar of a model store, sorted by endpoint name; FileNotFoundError when there are none."""
    mars = sorted(Path(model_store).glob("*.mar"))
    if not mars:
        raise FileNotFoundError(f"no .mar files in {model_store}: run `torchship archive` first")
    return [MarArchive(m) for m in mars]


def checksum_listing(entries: dict[str, bytes]) -> bytes:
    """The bytes of the listing of every entry's sha256, as write_archive stores it: the listing itself and a
    signature entry (which signs the listing) are not listed."""
    listed = {name: data for name, data in entries.items() if name not in (CHECKSUMS_FILE, SIGNATURE_FILE)}
    checksums = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(listed.items())}
    return (json.dumps(checksums, indent=2) + "\n").encode("utf-8")


def write_archive(entries: dict[str, bytes], dest: Path) -> None:
    """Write a .mar from its entries, byte-reproducibly, with the listing of every entry's sha256 that the handler
    checks before it loads anything (any listing among `entries` is replaced)."""
    entries = {**entries, CHECKSUMS_FILE: checksum_listing(entries)}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with zipfile.ZipFile(tmp, "w") as zout:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zout.writestr(info, entries[name], compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
    tmp.replace(dest)


def rewrite_archive(src: Path, dest: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """A copy of the archive at src whose entries `edit` changed (in place), written as write_archive writes it: the
    checksum listing follows the edit, and a signature, which any edit invalidates, is left out."""
    entries = dict(MarArchive(src).entries)
    edit(entries)
    entries.pop(SIGNATURE_FILE, None)
    write_archive(entries, dest)
    return dest
