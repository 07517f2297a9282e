"""Relative geometry of a patch grid, as GPSA consumes it.

For a grid of H rows and W columns, patches are numbered row-major
(n = y * W + x). `relative_offsets` returns r with shape (N, N, 3), N = H * W,
where r[i, j] = [dx, dy, dx^2 + dy^2] and (dx, dy) = (x_j - x_i, y_j - y_i),
the offset of key j from query i in patches. This is the order and sign used
by the official ConViT code and timm (whose version handles square grids only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

Size = int | Sequence[int]


def to_pair(size: Size, what: str = "size") -> tuple[int, int]:
    """(height, width) of an int or a (height, width) pair; ValueError otherwise."""
    if isinstance(size, int):
        pair = (size, size)
    else:
        if len(size) != 2:
            raise ValueError(f"{what} must be an int or a (height, width) pair, got {size!r}")
        pair = (int(size[0]), int(size[1]))
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{what} must be positive, got {pair}")
    return pair


def patch_grid(img_size: Size, patch_size: int) -> tuple[int, int]:
    """Patch grid (H, W) of an image of `img_size` (int or (height, width)) cut into
    square patches of side `patch_size`; ValueError when a side is not a multiple of it."""
    height, width = to_pair(img_size, "image size")
    if not isinstance(patch_size, int) or patch_size <= 0:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the patch size {patch_size}; "
            f"use a multiple of {patch_size} on both sides"
        )
    return height // patch_size, width // patch_size


def square_grid(num_tokens: int, what: str = "the position embedding") -> tuple[int, int]:
    """(side, side) of a square grid of `num_tokens` patches; ValueError when there is none."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{what} has {num_tokens} positions, not a square grid")
    return side, side


def grid_coordinates(grid: tuple[int, int]) -> torch.Tensor:
    """(N, 2) float32 tensor of the (x, y) coordinates of each patch, row-major."""
    height, width = grid
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32),
        torch.arange(width, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


def _relative_offsets(grid: tuple[int, int]) -> torch.Tensor:
    coords = grid_coordinates(grid)
    delta = coords[None, :, :] - coords[:, None, :]  # (N, N, 2): key minus query
    return torch.cat([delta, delta.pow(2).sum(-1, keepdim=True)], dim=-1)


def relative_offsets(grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Cached (N, N, 3) relative encoding of `grid` on `device` in `dtype`.

    Under torch.compile the encoding is traced instead (the compiler folds it
    into a constant of the graph; dynamo does not trace through lru_cache).
    """
    if torch.compiler.is_compiling():
        return _relative_offsets((int(grid[0]), int(grid[1]))).to(device=device, dtype=dtype)
    return _cached_offsets((int(grid[0]), int(grid[1])), torch.device(device), dtype)


@lru_cache(maxsize=64)
def _cached_offsets(grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Built outside inference mode so that the cached tensor can also serve
    # training forwards (an inference tensor cannot be saved for backward).
    with torch.inference_mode(False), torch.no_grad():
        return _relative_offsets(grid).to(device=device, dtype=dtype)


def pairwise_distances(grid: tuple[int, int]) -> torch.Tensor:
    """(N, N) Euclidean distance between patches, in patches (float32)."""
    return _relative_offsets(grid)[..., 2].sqrt()
