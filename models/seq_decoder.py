"""seq_decoder: the seed's hybrid model, a TransformerEncoder (traced) feeding a ConditionalDecoder (scripted).

FP32 features [B,S,64] -> INT64 tokens [B,S]. Greedy decoding is deterministic; sampling draws from torch's
global CPU generator, so `torch.manual_seed(s)` before a call makes it reproducible (see the README).
"""

from __future__ import annotations

import torch
from torch import nn

from torchship.models._seeded import build_seeded
from torchship.spec import Dim, ModelSpec, TensorSpec, Tolerance

D_MODEL = 64
N_HEADS = 8
N_LAYERS = 6
FEEDFORWARD = 256
VOCAB = 320


class Encoder(nn.Module):
    """No control flow: traced. Traced from the eval-mode model under no_grad, so no dropout is baked in."""

    def __init__(self, d_model: int = D_MODEL) -> None:
        super().__init__()
        self.layers = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model, N_HEADS, dim_feedforward=FEEDFORWARD, batch_first=True),
            num_layers=N_LAYERS,
            enable_nested_tensor=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConditionalDecoder(nn.Module):
    """Control flow on an argument (greedy or sampling): scripted."""

    def __init__(self, d_model: int = D_MODEL, vocab_size: int = VOCAB) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, vocab_size)
        self.temperature: float = 1.0

    @torch.jit.export
    def set_temperature(self, t: float) -> None:
        if t <= 0.0:
            raise ValueError("temperature must be > 0")
        self.temperature = t

    def forward(self, x: torch.Tensor, greedy: bool = True) -> torch.Tensor:
        logits = self.proj(x) / self.temperature
        if greedy:
            return logits.argmax(dim=-1)
        else:
            probs = torch.softmax(logits, dim=-1)
            return torch.multinomial(probs.view(-1, probs.size(-1)), 1).view(probs.size(0), probs.size(1))


class FullModel(nn.Module):
    """The seed's FullModel, kept eager: export traces `encoder` and scripts the rest (export_method 'hybrid').

    The seed traced the encoder inside __init__, while the module was still in train mode, which baked dropout
    into the graph (outputs changed run to run). Here tracing happens at export time, on the eval-mode model.
    """

    def __init__(self, d_model: int = D_MODEL, vocab_size: int = VOCAB) -> None:
        super().__init__()
        self.encoder = Encoder(d_model)
        self.decoder = ConditionalDecoder(d_model, vocab_size)

    def forward(self, x: torch.Tensor, greedy: bool = True) -> torch.Tensor:
        encoded = self.encoder(x)
        return self.decoder(encoded, greedy)

    @torch.jit.export
    def set_temperature(self, t: float) -> None:
        """On the top module too: the seed only had it on the decoder, out of a caller's reach."""
        self.decoder.set_temperature(t)


def build() -> FullModel:
    return build_seeded(FullModel, seed=3)


BATCH = Dim("batch", min=1, max=32)
SEQ = Dim("seq", min=1, max=128, reference=16, holdout=24)

SPEC = ModelSpec(
    name="seq_decoder",
    version="1.0",
    description="Traced 6-layer TransformerEncoder + scripted greedy/sampling decoder; FP32 [B,S,64] -> INT64 [B,S].",
    factory=build,
    inputs=(TensorSpec("x", "FP32", (BATCH, SEQ, D_MODEL)),),
    outputs=(TensorSpec("tokens", "INT64", (BATCH, SEQ)),),
    export_method="hybrid",
    trace_submodules=("encoder",),
    preserved_methods=("set_temperature",),
    # Tokens are integers: every format must reproduce them exactly (the tolerance is for float outputs).
    tolerance={
        "torchscript": Tolerance(atol=0.0, rtol=0.0),
        "pt2": Tolerance(atol=0.0, rtol=0.0),
        "aoti": Tolerance(atol=0.0, rtol=0.0),
    },
)
