"""dynamic_router: the seed's mixture of experts whose routing depends on the data; FP32 [B,256] -> [B,256]."""

from __future__ import annotations

import torch
from torch import nn

from torchship.models._seeded import build_seeded
from torchship.spec import Dim, ModelSpec, TensorSpec, Tolerance

D_MODEL = 256
NUM_EXPERTS = 4


class DynamicRouter(nn.Module):
    """The seed's model, unchanged: each row goes to the expert with the highest gate score.

    `if mask.any()` is Python control flow on tensor data: tracing would freeze one branch, so TorchScript
    scripts it, and torch.export exports `MaskedRouter` instead.
    """

    def __init__(self, d_model: int = D_MODEL, num_experts: int = NUM_EXPERTS) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, num_experts)
        self.experts = nn.ModuleList([nn.Linear(d_model, d_model) for _ in range(num_experts)])
        self.threshold = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(self.gate(x), dim=-1)
        max_score, expert_idx = scores.max(dim=-1)  # noqa: RUF059  (the seed's code, kept as written)

        outputs = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            mask = expert_idx == i
            if mask.any():
                outputs[mask] = expert(x[mask])

        return outputs


class MaskedRouter(nn.Module):
    """The export form of DynamicRouter, sharing its weights.

    The seed's `if mask.any()` only skips experts that got no rows; for such an expert `x[mask]` has zero rows,
    the expert maps them to zero rows and the masked assignment writes nothing. So the branch is dropped, not
    emulated: every expert sees exactly the rows it sees in the seed's code, through the same kernels, and the
    result is bit-identical (tests/unit/test_models.py checks it, empty experts included). Dense mask arithmetic
    (every expert on every row, then select) would run the matmuls on a different number of rows, which may
    round differently.
    """

    def __init__(self, source: DynamicRouter) -> None:
        super().__init__()
        self.gate = source.gate
        self.experts = source.experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(self.gate(x), dim=-1)
        _, expert_idx = scores.max(dim=-1)
        outputs = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            mask = expert_idx == i
            outputs[mask] = expert(x[mask])
        return outputs


def build() -> DynamicRouter:
    return build_seeded(DynamicRouter, seed=2)


def to_masked(model: nn.Module) -> nn.Module:
    if not isinstance(model, DynamicRouter):
        raise TypeError(f"expected DynamicRouter, got {type(model).__name__}")
    return MaskedRouter(model).eval()


SPEC = ModelSpec(
    name="dynamic_router",
    version="1.0",
    description="Mixture of 4 linear experts with data-dependent routing; FP32 [B,256] -> [B,256].",
    factory=build,
    inputs=(TensorSpec("x", "FP32", (Dim("batch", min=1, max=64), D_MODEL)),),
    outputs=(TensorSpec("y", "FP32", (Dim("batch", min=1, max=64), D_MODEL)),),
    export_method="script",
    export_rewrite=to_masked,
    tolerance={
        "torchscript": Tolerance(atol=1e-5, rtol=1e-4),
        "pt2": Tolerance(atol=1e-5, rtol=1e-4),
        "aoti": Tolerance(atol=1e-4, rtol=1e-3),
    },
)
