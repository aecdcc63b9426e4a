"""reference.pt: seeded inputs at every reference batch size and the eager model's outputs for them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from torchship.errors import SpecError
from torchship.spec import ModelSpec, as_output_tuple


@dataclass(frozen=True)
class Case:
    """One set of inputs and the eager outputs for them."""

    batch_size: int
    holdout: bool
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]

    def args(self, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        return tuple(self.inputs[t.name] for t in spec.inputs)

    def expected(self, spec: ModelSpec) -> tuple[torch.Tensor, ...]:
        return tuple(self.outputs[t.name] for t in spec.outputs)

    def expected_from(self, names: list[str]) -> tuple[torch.Tensor, ...]:
        return tuple(self.outputs[n] for n in names)

    def input_shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.inputs.items()}


def run_eager(spec: ModelSpec, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the eager model and check its outputs against the spec's declared outputs."""
    with torch.no_grad():
        raw = model(*(inputs[t.name] for t in spec.inputs))
    outs = as_output_tuple(raw, spec)
    batch = next(iter(inputs.values())).shape[0]
    for t, value in zip(spec.outputs, outs, strict=True):
        if value.dtype != t.dtype:
            raise SpecError(f"model {spec.name!r}: output {t.name!r} is {value.dtype}, the spec says {t.datatype}")
        declared = t.oip_shape()
        if len(declared) != value.dim() or value.shape[0] != batch:
            raise SpecError(
                f"model {spec.name!r}: output {t.name!r} has shape {list(value.shape)}, the spec says {declared} "
                f"with batch {batch}"
            )
        wrong = [i for i, d in enumerate(declared) if d != -1 and value.shape[i] != d]
        if wrong:
            raise SpecError(f"model {spec.name!r}: output {t.name!r} has shape {list(value.shape)}, the spec says {declared}")
    return {t.name: v.detach().clone() for t, v in zip(spec.outputs, outs, strict=True)}


def make_cases(spec: ModelSpec, model: nn.Module) -> list[Case]:
    """Reference cases (stored in reference.pt) followed by held-out cases (checked at export, not stored)."""
    cases: list[Case] = []
    for holdout, sizes in ((False, spec.reference_batch_sizes), (True, spec.holdout_batch_sizes)):
        for b in sizes:
            inputs = spec.make_inputs(b, holdout=holdout)
            cases.append(Case(b, holdout, inputs, run_eager(spec, model, inputs)))
    return cases


def save_reference(spec: ModelSpec, cases: list[Case], path: Path) -> None:
    stored = [{"batch_size": c.batch_size, "inputs": c.inputs, "outputs": c.outputs} for c in cases if not c.holdout]
    torch.save({"model": spec.name, "version": spec.version, "cases": stored}, str(path))


def load_reference(path: Path) -> list[Case]:
    """Load reference.pt with weights_only=True: it holds tensors, ints and strings, never pickled code."""
    data = torch.load(str(path), weights_only=True)
    return [Case(int(c["batch_size"]), False, dict(c["inputs"]), dict(c["outputs"])) for c in data["cases"]]
