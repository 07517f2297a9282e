"""Small building blocks shared by the ConViT modules (pure PyTorch)."""

from __future__ import annotations

import torch
from torch import nn

from convit_ssl.models.geometry import patch_grid


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `p`."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Transformer feed-forward block: fc1 -> GELU -> dropout -> fc2 -> dropout (timm's names)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens.

    Input (B, in_chans, H * p, W * p); output (B, H * W, dim) in row-major order
    and the patch grid (H, W). Any image whose sides are multiples of the patch
    size is accepted.
    """

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        grid = patch_grid((x.shape[-2], x.shape[-1]), self.patch_size)
        return self.proj(x).flatten(2).transpose(1, 2), grid
