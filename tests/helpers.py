"""Helpers shared by the tests (import as `from helpers import ...`)."""

from __future__ import annotations

from typing import Dict

import torch


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Make weights look trained: every parameter gets N(0, 0.02^2) noise (the
    local init, the unit norms and the zero biases are all broken), and the
    gates get a larger spread so that heads mix content and position differently."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
            if name.endswith("gating_param"):
                p.add_(torch.randn(p.shape, generator=gen))


def block_outputs(model: torch.nn.Module, x: torch.Tensor) -> Dict[int, torch.Tensor]:
    """Raw output of every block of a ConViT on `x`, captured by forward hooks."""
    outs: Dict[int, torch.Tensor] = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o)) for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return outs
