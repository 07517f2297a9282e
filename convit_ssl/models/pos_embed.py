"""The one position-embedding resampler of convit_ssl.

Semantics follow timm's `resample_abs_pos_embed` for a model without prefix
tokens (ConViT's absolute position embedding has no class slot): the
embedding is laid out on its (H, W) patch grid, resized with bicubic
interpolation (antialiased when shrinking) in float32, and returned in its
original dtype. Grids are always passed explicitly, never inferred from a
float scale factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Resample a (1, H_old * W_old, C) position embedding to (1, H_new * W_new, C)."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected a position embedding of shape (1, N, C), got {tuple(pos_embed.shape)}")
    old_h, old_w = old_grid
    new_h, new_w = new_grid
    if pos_embed.shape[1] != old_h * old_w:
        raise ValueError(
            f"position embedding has {pos_embed.shape[1]} tokens, "
            f"but the stated grid {old_h}x{old_w} has {old_h * old_w}"
        )
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed.float().reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_h, new_w), mode=interpolation, antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
