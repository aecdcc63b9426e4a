"""simple_cnn: the seed's ConvBlock CNN (three conv+bn+relu blocks, pooling, linear), a 10-class image classifier."""

from __future__ import annotations

import torch
from torch import nn

from torchship.models._seeded import build_seeded
from torchship.spec import Dim, ModelSpec, TensorSpec, Tolerance

NUM_CLASSES = 10


class ConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class SimpleCNN(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBlock(3, 32),
            nn.MaxPool2d(2),
            ConvBlock(32, 64),
            nn.MaxPool2d(2),
            ConvBlock(64, 64),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.flatten(1)
        return self.classifier(x)


def build() -> SimpleCNN:
    return build_seeded(SimpleCNN, seed=1)


BATCH = Dim("batch", min=1, max=64)
# Two 2x2 max-pools need at least 4x4; 8 leaves room. 512 covers the seed's 224x224 with margin.
HEIGHT = Dim("height", min=8, max=512, reference=32, holdout=48, serving=224)
WIDTH = Dim("width", min=8, max=512, reference=32, holdout=40, serving=224)

SPEC = ModelSpec(
    name="simple_cnn",
    version="1.0",
    description="ConvBlock(conv+bn+relu) x3 with pooling and a linear head; FP32 images [B,3,H,W] -> 10 logits.",
    factory=build,
    inputs=(TensorSpec("x", "FP32", (BATCH, 3, HEIGHT, WIDTH)),),
    outputs=(TensorSpec("logits", "FP32", (BATCH, NUM_CLASSES)),),
    export_method="trace",
    task="classifier",
    tolerance={
        # Freezing folds batch-norm into the convolutions, which reorders float arithmetic.
        "torchscript": Tolerance(atol=1e-4, rtol=1e-4),
        "pt2": Tolerance(atol=1e-5, rtol=1e-4),
        "aoti": Tolerance(atol=1e-4, rtol=1e-3),
    },
)
