"""The zoo's models: the traps the seed's code fell into, and the rewrites that avoid them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchship.export.exporter import ModelExport
from torchship.handlers.core import load_torchscript
from torchship.models.dynamic_router import NUM_EXPERTS, DynamicRouter, to_masked
from torchship.models.dynamic_router import build as build_router
from torchship.models.process_outputs import process_outputs
from torchship.models.seq_decoder import Encoder
from torchship.models.seq_decoder import build as build_decoder

CPU = torch.device("cpu")
ROUTER = build_router()
MASKED = to_masked(ROUTER)


def _routes(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(ROUTER.gate(x), dim=-1).argmax(dim=-1)


def _rows_for_experts(experts: set[int], batch: int, seed: int) -> torch.Tensor:
    """A batch whose rows all route to the given experts (so the others get no rows)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(4096, 256, generator=gen)
    keep = pool[torch.isin(_routes(pool), torch.tensor(sorted(experts)))]
    assert keep.shape[0] >= batch
    return keep[:batch]


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(min_value=1, max_value=64), seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_router_rewrite_is_bit_identical_on_random_batches(batch: int, seed: int) -> None:
    x = torch.randn(batch, 256, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(MASKED(x), ROUTER(x))


@settings(max_examples=30, deadline=None)
@given(
    experts=st.sets(st.integers(min_value=0, max_value=NUM_EXPERTS - 1), min_size=1, max_size=NUM_EXPERTS - 1),
    batch=st.integers(min_value=1, max_value=32),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_router_rewrite_is_bit_identical_when_experts_get_no_rows(experts: set[int], batch: int, seed: int) -> None:
    x = _rows_for_experts(experts, batch, seed)
    used = set(_routes(x).tolist())
    assert used <= experts and len(used) < NUM_EXPERTS  # some experts really are empty
    with torch.no_grad():
        assert torch.equal(MASKED(x), ROUTER(x))


def test_router_seed_code_is_kept_as_the_eager_reference() -> None:
    assert isinstance(ROUTER, DynamicRouter)
    assert MASKED.gate is ROUTER.gate  # weights are shared, not copied


def test_seed_bug_train_mode_trace_bakes_in_dropout() -> None:
    """The seed traced its encoder in train mode: the same input then gives different outputs run to run."""
    torch.manual_seed(0)
    encoder = Encoder().train()
    x = torch.randn(2, 16, 64)
    traced = torch.jit.trace(encoder, (x,), check_trace=False)
    assert not torch.equal(traced(x), traced(x))


def test_hybrid_artifact_is_deterministic_and_matches_eager_greedy(zoo_export: dict[str, ModelExport]) -> None:
    ts = load_torchscript(str(zoo_export["seq_decoder"].model_dir / "model.torchscript.pt"), CPU)
    eager = build_decoder()
    x = torch.randn(3, 20, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        first, second, expected = ts(x), ts(x), eager(x)
    assert first.dtype == torch.int64
    assert torch.equal(first, second)
    assert torch.equal(first, expected)


def test_sampling_is_reproducible_with_a_seed(zoo_export: dict[str, ModelExport]) -> None:
    ts = load_torchscript(str(zoo_export["seq_decoder"].model_dir / "model.torchscript.pt"), CPU)
    eager = build_decoder()
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.manual_seed(1234)
        a = ts(x, False)
        torch.manual_seed(1234)
        b = ts(x, False)
        torch.manual_seed(1234)
        c = eager(x, False)
        torch.manual_seed(4321)
        d = ts(x, False)
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    assert not torch.equal(a, d)  # the seed matters: 32 tokens drawn from 320 at temperature 1


def test_set_temperature_survives_freezing(zoo_export: dict[str, ModelExport]) -> None:
    ts = load_torchscript(str(zoo_export["seq_decoder"].model_dir / "model.torchscript.pt"), CPU)
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        greedy = ts(x, True)
        ts.set_temperature(1e-4)  # near-zero temperature: sampling collapses onto the argmax
        torch.manual_seed(0)
        cold = ts(x, False)
    assert torch.equal(cold, greedy)
    with pytest.raises(Exception, match="temperature must be > 0"):
        ts.set_temperature(0.0)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_process_outputs_artifact_matches_eager_per_row(zoo_export: dict[str, ModelExport], k: int) -> None:
    ts = load_torchscript(str(zoo_export["process_outputs"].model_dir / "model.torchscript.pt"), CPU)
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(k))
    probs, classes = ts(logits, k)
    want_probs, want_classes = process_outputs(logits, k)
    assert probs.shape == (4, k) and classes.dtype == torch.int64
    assert torch.equal(classes, want_classes)
    assert torch.allclose(probs, want_probs, atol=1e-6)
    assert torch.equal(classes[:, 0], logits.argmax(dim=-1))  # every row, not only the first


def test_process_outputs_rejects_k_out_of_range(zoo_export: dict[str, ModelExport]) -> None:
    ts = load_torchscript(str(zoo_export["process_outputs"].model_dir / "model.torchscript.pt"), CPU)
    with pytest.raises(Exception, match="top_k must be between 1 and the number of classes"):
        ts(torch.randn(2, 10), 11)


def test_freezing_folded_batchnorm_into_the_convolutions(zoo_export: dict[str, ModelExport]) -> None:
    graph = zoo_export["simple_cnn"].manifest.formats["torchscript"].graph
    assert graph is not None
    assert graph.ops_before_freeze["aten::batch_norm"] == 3
    assert "aten::batch_norm" not in graph.ops_after_freeze
    assert graph.nodes_after_freeze < graph.nodes_before_freeze
    loaded = load_torchscript(str(zoo_export["simple_cnn"].model_dir / "model.torchscript.pt"), CPU)
    kinds = {n.kind() for n in loaded.graph.nodes()}
    assert "aten::batch_norm" not in kinds and "aten::_convolution" in kinds
