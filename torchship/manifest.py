"""manifest.json: the signature, files, hashes and measured parity of one model's artifacts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from torchship.errors import ManifestError
from torchship.handlers.codec import DATATYPES
from torchship.handlers.core import sha256_file
from torchship.handlers.names import MANIFEST_FILE
from torchship.spec import FORMATS, ModelSpec, TensorSpec

#: A classifier's own export of its top-k post-processing lives in this sub-folder of its artifacts folder.
POSTPROCESS_DIR = "postprocess"
#: What export measured to choose the default format: {batch_size, input_shapes, p50_ms: {format: ms}}. Beside the
#: manifest, not in it (timings differ run to run; the manifest does not), and not archived.
TIMINGS_FILE = "timings.json"
#: The file each format is written to inside artifacts/<model>/.
FORMAT_FILES = {"torchscript": "model.torchscript.pt", "pt2": "model.pt2", "aoti": "model.aoti.pt2"}
assert set(FORMAT_FILES) == set(FORMATS)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorMeta(_Strict):
    """OIP v2 tensor metadata (`name`, `datatype`, `shape` with -1 for dynamic dims) plus the bounds of each dim."""

    name: str
    datatype: str
    shape: list[int]
    min_shape: list[int]
    max_shape: list[int]

    @model_validator(mode="after")
    def _consistent(self) -> TensorMeta:
        if self.datatype not in DATATYPES:
            raise ValueError(f"unknown datatype {self.datatype!r}")
        if not len(self.shape) == len(self.min_shape) == len(self.max_shape):
            raise ValueError("shape, min_shape and max_shape must have the same rank")
        for s, lo, hi in zip(self.shape, self.min_shape, self.max_shape, strict=True):
            if s != -1 and not s == lo == hi:
                raise ValueError(f"fixed dim {s} must equal its bounds, got [{lo}, {hi}]")
            if lo > hi or lo < 0:
                raise ValueError(f"bad bounds [{lo}, {hi}]")
        return self

    @classmethod
    def from_spec(cls, t: TensorSpec) -> TensorMeta:
        lo, hi = t.bounds()
        return cls(name=t.name, datatype=t.datatype, shape=t.oip_shape(), min_shape=lo, max_shape=hi)


class ToleranceMeta(_Strict):
    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)


class ParityRecord(_Strict):
    """One reference (or held-out) case run through a reloaded artifact."""

    batch_size: int
    input_shapes: dict[str, list[int]]
    holdout: bool
    max_abs: float
    max_rel: float
    passed: bool
    reason: str = ""


class GraphStats(_Strict):
    """Evidence of what freezing did: node counts of the inlined graph before and after."""

    nodes_before_freeze: int
    nodes_after_freeze: int
    ops_before_freeze: dict[str, int]
    ops_after_freeze: dict[str, int]


class FormatEntry(_Strict):
    file: str
    status: Literal["ok", "failed"]
    method: str
    sha256: str | None = None
    size_bytes: int | None = None
    passes: list[str] = Field(default_factory=list)
    graph: GraphStats | None = None
    parity: list[ParityRecord] = Field(default_factory=list)
    error: str | None = None
    #: Options that change what the artifact runs on (e.g. the AOTInductor vector ISA).
    options: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ok_means_evidence(self) -> FormatEntry:
        if self.status == "ok":
            if not self.sha256 or not self.parity or not all(p.passed for p in self.parity):
                raise ValueError(f"{self.file}: status ok needs a sha256 and passing parity records")
        elif not self.error:
            raise ValueError(f"{self.file}: status failed needs an error")
        return self

    @property
    def usable(self) -> bool:
        return self.status == "ok"


class ReferenceMeta(_Strict):
    file: str
    sha256: str
    batch_sizes: list[int]
    holdout_batch_sizes: list[int]


class Manifest(_Strict):
    schema_version: Literal[1] = 1
    name: str
    version: str
    description: str
    task: Literal["classifier", "tensor", "postprocess"]
    torch_version: str
    device: str
    max_batch_size: int = Field(ge=1)
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    export_method: Literal["trace", "script", "hybrid"]
    formats: dict[str, FormatEntry]
    tolerance: dict[str, ToleranceMeta]
    reference: ReferenceMeta
    #: The format the model's default endpoint (`<model>`) serves, and the rule that chose it (the measured times are
    #: in TIMINGS_FILE beside the manifest, which stays byte-reproducible); the others get `<model>_<suffix>`.
    #: None in a manifest written before the choice existed: the first usable format (TorchScript) is the default.
    default_format: str | None = None
    default_reason: str = ""

    @model_validator(mode="after")
    def _known_formats(self) -> Manifest:
        for fmt, entry in self.formats.items():
            if fmt not in FORMAT_FILES:
                raise ValueError(f"unknown format {fmt!r}")
            if entry.file != FORMAT_FILES[fmt]:
                raise ValueError(f"format {fmt!r} must be stored as {FORMAT_FILES[fmt]!r}, not {entry.file!r}")
            if fmt not in self.tolerance:
                raise ValueError(f"format {fmt!r} has no tolerance")
        if self.default_format is not None and not (
            self.default_format in self.formats and self.formats[self.default_format].usable
        ):
            raise ValueError(f"default_format {self.default_format!r} is not a usable format of this manifest")
        return self

    def usable_formats(self) -> list[str]:
        return [f for f, e in self.formats.items() if e.usable]

    def serving_default(self) -> str | None:
        """The format `<model>` serves: the recorded choice, else the first usable format in the spec's order."""
        usable = self.usable_formats()
        return self.default_format or (usable[0] if usable else None)

    @classmethod
    def signature_from(cls, spec: ModelSpec) -> tuple[list[TensorMeta], list[TensorMeta]]:
        return [TensorMeta.from_spec(t) for t in spec.inputs], [TensorMeta.from_spec(t) for t in spec.outputs]


def write_manifest(manifest: Manifest, model_dir: Path) -> Path:
    """Validate and write manifest.json atomically (a reader never sees half a file)."""
    checked = Manifest.model_validate(manifest.model_dump())
    path = model_dir / MANIFEST_FILE
    text = json.dumps(checked.model_dump(mode="json"), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    Path(tmp).replace(path)
    return path


def read_manifest(model_dir: Path, *, verify_files: bool = True) -> Manifest:
    """Read and validate manifest.json; with verify_files, every usable file must exist with its recorded sha256."""
    path = model_dir / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path} does not exist: run `torchship export` for this model first") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); re-run `torchship export`") from None
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"{path} does not match the manifest schema:\n{exc}") from None
    if verify_files:
        files = {e.file: e.sha256 for e in manifest.formats.values() if e.usable}
        files[manifest.reference.file] = manifest.reference.sha256
        for name, digest in files.items():
            f = model_dir / name
            if not f.is_file():
                raise ManifestError(f"{f} is listed in {path} but missing; re-run `torchship export`")
            if sha256_file(f) != digest:
                raise ManifestError(f"{f} does not match the sha256 in {path}: it was changed after export")
    return manifest
