"""ModelSpec validation and reference-input generation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from torchship.errors import SpecError
from torchship.models import ZOO
from torchship.models.simple_cnn import SPEC as CNN
from torchship.spec import Dim, ModelSpec, TensorSpec


def test_dim_rejects_reference_outside_bounds() -> None:
    with pytest.raises(SpecError, match="dim 'h'"):
        Dim("h", min=8, max=64, reference=4)


def test_tensor_rejects_unknown_datatype() -> None:
    with pytest.raises(SpecError, match="unknown datatype 'FLOAT'"):
        TensorSpec("x", "FLOAT", (Dim("batch", 1, 4), 3))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Bad-Name"}, "name must match"),
        ({"inputs": (TensorSpec("x", "FP32", (3, 32, 32)),)}, "dim 0 must be Dim"),
        ({"holdout_batch_sizes": (16,)}, "holdout batch sizes"),
        ({"example_batch_size": 1}, "example_batch_size must be >= 2"),
        ({"formats": ("torchscript", "onnx")}, "unknown formats"),
        ({"formats": ("torchscript", "aoti")}, "aoti is compiled from the pt2"),
        ({"export_method": "hybrid"}, "needs trace_submodules"),
        ({"reference_batch_sizes": (1, 128)}, "outside the batch bounds"),
        ({"inputs": (TensorSpec("ids", "INT64", (Dim("batch", 1, 64), 8)),)}, "need value_range"),
    ],
)
def test_spec_problems_are_named(change: dict[str, object], message: str) -> None:
    fields = {f.name: getattr(CNN, f.name) for f in dataclasses.fields(ModelSpec)}
    fields.update(change)
    with pytest.raises(SpecError, match=message):
        ModelSpec(**fields)  # type: ignore[arg-type]


def test_signature_in_oip_form() -> None:
    x = CNN.inputs[0]
    assert x.oip_shape() == [-1, 3, -1, -1]
    assert x.bounds() == ([1, 3, 8, 8], [64, 3, 512, 512])
    assert CNN.max_batch_size == 64


def test_inputs_are_seeded_and_holdout_shapes_differ() -> None:
    a = CNN.make_inputs(3)["x"]
    b = CNN.make_inputs(3)["x"]
    assert torch.equal(a, b)
    assert list(a.shape) == [3, 3, 32, 32]
    held = CNN.make_inputs(5, holdout=True)["x"]
    assert list(held.shape) == [5, 3, 48, 40]


def test_zoo_covers_the_seed_models_and_reference_batches() -> None:
    assert set(ZOO) == {"simple_cnn", "dynamic_router", "seq_decoder", "process_outputs"}
    for spec in ZOO.values():
        sizes = spec.reference_batch_sizes
        assert 1 in sizes and 2 in sizes and 16 in sizes and any(b % 2 == 1 and b > 1 for b in sizes), spec.name
        assert set(spec.holdout_batch_sizes).isdisjoint({*sizes, spec.example_batch_size})


def test_factories_are_deterministic_and_leave_global_rng_alone() -> None:
    torch.manual_seed(99)
    before = torch.random.get_rng_state()
    first = ZOO["simple_cnn"].factory().state_dict()
    second = ZOO["simple_cnn"].factory().state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(first[k], second[k]) for k in first)
