"""Seeded construction: the zoo's weights come from code and a seed, never from a download."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def build_seeded(make: Callable[[], M], seed: int) -> M:
    """Build a module under a fixed seed without disturbing the caller's global RNG state; return it in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
        for m in module.modules():
            # Fresh BatchNorm layers are the identity (mean 0, var 1): give them real statistics so that
            # folding them into the convolutions is actually exercised.
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert m.running_mean is not None and m.running_var is not None
                with torch.no_grad():
                    m.running_mean.normal_(0.0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.1)
    return module.eval()
