"""ModelSpec: what torchship needs to know to export, serve and verify one model."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from torchship.errors import SpecError
from torchship.handlers import parity as _parity
from torchship.handlers.codec import DATATYPES

ExportMethod = Literal["trace", "script", "hybrid"]
Task = Literal["classifier", "tensor", "postprocess"]

#: Every artifact format torchship knows, in the order they are exported.
FORMATS: tuple[str, ...] = ("torchscript", "pt2", "aoti")

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
BATCH_DIM = "batch"


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension: its bounds, the size used for references, and a size kept back for checks."""

    name: str
    min: int
    max: int
    #: Size used in reference cases and export examples (ignored for the batch dim); default: min.
    reference: int | None = None
    #: Size used in held-out checks; default: the reference size.
    holdout: int | None = None
    #: Size production requests typically have (export times load options at it); default: the reference size.
    serving: int | None = None

    def __post_init__(self) -> None:
        ref, hold, serve = self.reference_size, self.holdout_size, self.serving_size
        if not (1 <= self.min <= ref <= self.max and self.min <= hold <= self.max and self.min <= serve <= self.max):
            raise SpecError(
                f"dim {self.name!r}: need 1 <= min <= reference, holdout, serving <= max, "
                f"got min={self.min} reference={ref} holdout={hold} serving={serve} max={self.max}"
            )

    @property
    def reference_size(self) -> int:
        return self.min if self.reference is None else self.reference

    @property
    def holdout_size(self) -> int:
        return self.reference_size if self.holdout is None else self.holdout

    @property
    def serving_size(self) -> int:
        return self.reference_size if self.serving is None else self.serving


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output tensor; dim 0 of every input is the batch."""

    name: str
    datatype: str
    shape: tuple[int | Dim, ...]
    #: Inclusive range of generated reference values for integer inputs; floats are standard normal.
    value_range: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise SpecError(f"tensor {self.name!r}: unknown datatype {self.datatype!r}, use one of {sorted(DATATYPES)}")
        for d in self.shape:
            if isinstance(d, int) and d < 0:
                raise SpecError(f"tensor {self.name!r}: fixed dims must be >= 0, got {d}")

    @property
    def dtype(self) -> torch.dtype:
        return DATATYPES[self.datatype]

    def oip_shape(self) -> list[int]:
        """The shape in OIP v2 metadata form: -1 for every dynamic dim."""
        return [-1 if isinstance(d, Dim) else d for d in self.shape]

    def bounds(self) -> tuple[list[int], list[int]]:
        """(min_shape, max_shape); equal to the fixed size where a dim is fixed."""
        lo = [d.min if isinstance(d, Dim) else d for d in self.shape]
        hi = [d.max if isinstance(d, Dim) else d for d in self.shape]
        return lo, hi

    def concrete_shape(self, batch_size: int, *, holdout: bool = False, serving: bool = False) -> list[int]:
        sizes: list[int] = []
        for i, d in enumerate(self.shape):
            if i == 0 and isinstance(d, Dim) and d.name == BATCH_DIM:
                sizes.append(batch_size)
            elif isinstance(d, Dim):
                sizes.append(d.serving_size if serving else d.holdout_size if holdout else d.reference_size)
            else:
                sizes.append(d)
        return sizes


#: Defined beside the comparison, in the handler package that travels inside every archive.
Tolerance = _parity.Tolerance

DEFAULT_TOLERANCE: Mapping[str, Tolerance] = {
    "torchscript": Tolerance(atol=1e-5, rtol=1e-4),
    "pt2": Tolerance(atol=1e-5, rtol=1e-4),
    "aoti": Tolerance(atol=1e-4, rtol=1e-3),
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything torchship needs about one model: how to build it, its signature, how to export and check it.

    `factory` must build the eager model with fixed, seeded weights, in eval mode: the same call on any
    machine gives the same weights, so nothing is downloaded.
    """

    name: str
    version: str
    description: str
    factory: Callable[[], nn.Module]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    export_method: ExportMethod
    task: Task = "tensor"
    #: For `hybrid`: dotted names of submodules to trace; the rest of the model is scripted around them.
    trace_submodules: tuple[str, ...] = ()
    #: Methods besides forward that the frozen TorchScript must keep callable (e.g. `set_temperature`).
    preserved_methods: tuple[str, ...] = ()
    #: Builds the module that torch.export captures, for models whose eager code has data-dependent
    #: Python control flow; it must compute exactly what the eager model computes. None: export the eager model.
    export_rewrite: Callable[[nn.Module], nn.Module] | None = None
    #: Formats this model supports; `aoti` is built only when asked for (it compiles C++).
    formats: tuple[str, ...] = ("torchscript", "pt2", "aoti")
    reference_batch_sizes: tuple[int, ...] = (1, 2, 3, 16)
    #: Sizes checked at export but kept out of reference.pt (and out of the example used to export).
    holdout_batch_sizes: tuple[int, ...] = (5,)
    #: The batch size of the example input for trace / torch.export (>= 2 so the batch dim stays dynamic).
    example_batch_size: int = 4
    tolerance: Mapping[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCE))
    #: Seed of the reference inputs.
    seed: int = 0

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise SpecError(f"model spec {self.name!r} is invalid: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        out: list[str] = []
        if not _NAME.match(self.name):
            out.append("name must match [a-z][a-z0-9_]* (it becomes an endpoint and a folder name)")
        if not self.inputs or not self.outputs:
            out.append("a model needs at least one input and one output")
        names = [t.name for t in (*self.inputs, *self.outputs)]
        if len(set(names)) != len(names):
            out.append(f"tensor names must be unique, got {names}")
        for t in self.inputs:
            if not t.shape or not isinstance(t.shape[0], Dim) or t.shape[0].name != BATCH_DIM:
                out.append(f"input {t.name!r}: dim 0 must be Dim(name={BATCH_DIM!r}, ...)")
            if t.dtype.is_floating_point is False and t.value_range is None and t.datatype != "BOOL":
                out.append(f"input {t.name!r}: integer inputs need value_range for reference data")
        batches = {t.shape[0] for t in self.inputs if t.shape and isinstance(t.shape[0], Dim)}
        if len(batches) > 1:
            out.append("all inputs must share one batch Dim")
        unknown = set(self.formats) - set(FORMATS)
        if unknown:
            out.append(f"unknown formats {sorted(unknown)}, use {list(FORMATS)}")
        if "aoti" in self.formats and "pt2" not in self.formats:
            out.append("aoti is compiled from the pt2 export: list pt2 too")
        if self.export_method == "hybrid" and not self.trace_submodules:
            out.append("export_method 'hybrid' needs trace_submodules")
        if self.example_batch_size < 2:
            out.append("example_batch_size must be >= 2, or torch.export specialises the batch dim to 1")
        missing_tol = set(self.formats) - set(self.tolerance)
        if missing_tol:
            out.append(f"no tolerance for formats {sorted(missing_tol)}")
        if len(self.reference_batch_sizes) < 1:
            out.append("need at least one reference batch size")
        overlap = set(self.holdout_batch_sizes) & (set(self.reference_batch_sizes) | {self.example_batch_size})
        if overlap:
            out.append(f"holdout batch sizes {sorted(overlap)} are also used as reference or export example")
        if self.inputs and isinstance(self.inputs[0].shape[0], Dim):
            batch = self.inputs[0].shape[0]
            sizes = (*self.reference_batch_sizes, *self.holdout_batch_sizes, self.example_batch_size)
            bad = [b for b in sizes if not batch.min <= b <= batch.max]
            if bad:
                out.append(f"batch sizes {bad} are outside the batch bounds [{batch.min}, {batch.max}]")
        return out

    @property
    def batch_dim(self) -> Dim:
        first = self.inputs[0].shape[0]
        assert isinstance(first, Dim)
        return first

    @property
    def max_batch_size(self) -> int:
        return self.batch_dim.max

    def make_inputs(
        self, batch_size: int, *, holdout: bool = False, seed_offset: int = 0, serving: bool = False
    ) -> dict[str, torch.Tensor]:
        """Seeded inputs for one case (at the serving sizes with serving=True); the same arguments always give the
        same tensors."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_size * 7919 + seed_offset + int(holdout))
        out: dict[str, torch.Tensor] = {}
        for t in self.inputs:
            shape = t.concrete_shape(batch_size, holdout=holdout, serving=serving)
            if t.datatype == "BOOL":
                out[t.name] = torch.randint(0, 2, shape, generator=gen).bool()
            elif t.dtype.is_floating_point:
                out[t.name] = torch.randn(shape, generator=gen).to(t.dtype)
            else:
                assert t.value_range is not None
                lo, hi = t.value_range
                out[t.name] = torch.randint(lo, hi + 1, shape, generator=gen, dtype=t.dtype)
        return out

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Positional example for trace / torch.export."""
        ins = self.make_inputs(self.example_batch_size, seed_offset=17)
        return tuple(ins[t.name] for t in self.inputs)


def as_output_tuple(value: object, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
    """Normalise what a model returns (a tensor, a tuple or a list) to one tensor per declared output."""
    if isinstance(value, torch.Tensor):
        outs: tuple[object, ...] = (value,)
    elif isinstance(value, (tuple, list)):
        outs = tuple(value)
    else:
        raise SpecError(f"model {spec.name!r} returned {type(value).__name__}; expected a tensor or a tuple of tensors")
    if len(outs) != len(spec.outputs) or not all(isinstance(o, torch.Tensor) for o in outs):
        raise SpecError(f"model {spec.name!r} returned {len(outs)} values, its spec declares {len(spec.outputs)} outputs")
    return tuple(o for o in outs if isinstance(o, torch.Tensor))
