"""process_outputs: the seed's scripted top-k post-processing, its own TorchScript artifact.

The seed's version reported the top classes of the first row only and ignored `labels`; served batches need
every row, so this one returns per-row top-k probabilities and class indices.
"""

from __future__ import annotations

import torch
from torch import nn

from torchship.spec import Dim, ModelSpec, TensorSpec, Tolerance

DEFAULT_TOP_K = 5


def process_outputs(logits: torch.Tensor, top_k: int = DEFAULT_TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    if top_k < 1 or top_k > logits.size(-1):
        raise ValueError("top_k must be between 1 and the number of classes")
    probs = torch.softmax(logits, dim=-1)
    values, indices = probs.topk(top_k, dim=-1)
    return values, indices


class ProcessOutputs(nn.Module):
    """A module wrapper so the function can be frozen and saved like every other artifact."""

    def forward(self, logits: torch.Tensor, top_k: int = DEFAULT_TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
        return process_outputs(logits, top_k)


def build() -> ProcessOutputs:
    return ProcessOutputs().eval()


BATCH = Dim("batch", min=1, max=64)
CLASSES = Dim("classes", min=DEFAULT_TOP_K, max=100_000, reference=10, holdout=37)
K = DEFAULT_TOP_K

SPEC = ModelSpec(
    name="process_outputs",
    version="1.0",
    description="Softmax + per-row top-k of classifier logits: FP32 [B,C] -> (FP32 [B,k], INT64 [B,k]), k=top_k.",
    factory=build,
    inputs=(TensorSpec("logits", "FP32", (BATCH, CLASSES)),),
    outputs=(TensorSpec("probabilities", "FP32", (BATCH, K)), TensorSpec("classes", "INT64", (BATCH, K))),
    export_method="script",
    task="postprocess",
    formats=("torchscript",),
    tolerance={"torchscript": Tolerance(atol=1e-6, rtol=1e-5)},
)
