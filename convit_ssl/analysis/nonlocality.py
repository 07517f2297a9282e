"""Nonlocality: the mean attention distance of each head (d'Ascoli et al., 2021).

For a head with attention matrix A over the patches of an (H, W) grid,

    nonlocality = mean over images and query patches i of  sum_j A_ij ||delta_ij||

where ||delta_ij|| is the Euclidean distance between patches i and j in
patches (`convit_ssl.models.geometry.pairwise_distances`). Every query patch
counts, border patches included. The matrices are those of
`collect_attention`, i.e. measured on the real hidden states of each block.

MHSA layers also hold the class token (index 0), which has no position: its
query row and key column are dropped and each remaining row is renormalised
to sum 1 over the patches, so the number is the mean distance of the
attention that goes to patches (comparable with GPSA layers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from convit_ssl.analysis.collect import LayerAttention
from convit_ssl.models.geometry import pairwise_distances

TERMS = ("combined", "positional", "content")


def patch_attention(attn: torch.Tensor) -> torch.Tensor:
    """(..., 1 + N, 1 + N) attention with class token first -> (..., N, N) over
    patches only, each row renormalised to sum 1."""
    patches = attn[..., 1:, 1:]
    return patches / patches.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(patches.dtype).tiny)


def mean_attention_distance(attn: torch.Tensor, grid: tuple[int, int], class_token: bool = False) -> torch.Tensor:
    """(heads,) nonlocality of `attn`, (heads, T, T) or (B, heads, T, T) with
    T = H * W (or 1 + H * W with the class token first when `class_token`),
    averaged over query patches (and images)."""
    n = grid[0] * grid[1]
    tokens = n + 1 if class_token else n
    if attn.ndim not in (3, 4) or attn.shape[-1] != tokens or attn.shape[-2] != tokens:
        raise ValueError(
            f"expected attention of shape (heads, {tokens}, {tokens}) or (B, heads, {tokens}, {tokens}) "
            f"for a {grid[0]}x{grid[1]} grid{' plus class token' if class_token else ''}, got {tuple(attn.shape)}"
        )
    if class_token:
        attn = patch_attention(attn)
    dist = pairwise_distances(grid).to(device=attn.device, dtype=attn.dtype)
    per_query = (attn * dist).sum(dim=-1)  # (..., heads, N)
    per_head = per_query.mean(dim=-1)
    return per_head.mean(dim=0) if per_head.ndim == 2 else per_head


def nonlocality(layers: Sequence[LayerAttention], term: str = "combined") -> torch.Tensor:
    """(len(layers), heads) nonlocality of each recorded layer and head, float32 on CPU.

    Args:
        layers: output of `collect_attention`.
        term: ``"combined"`` (the attention the block uses; GPSA and MHSA),
            ``"positional"`` or ``"content"`` (GPSA terms alone; rows of MHSA
            layers, which have no such term, are NaN).
    """
    if term not in TERMS:
        raise ValueError(f"unknown attention term {term!r}; expected one of {', '.join(TERMS)}")
    if not layers:
        raise ValueError("no layers given: pass the output of collect_attention")
    rows = []
    for layer in layers:
        heads = layer.combined.shape[1]
        if term == "combined":
            row = mean_attention_distance(layer.combined, layer.grid, class_token=layer.has_class_token)
        else:
            attn = getattr(layer, term)
            row = torch.full((heads,), float("nan")) if attn is None else mean_attention_distance(attn, layer.grid)
        rows.append(row.float().cpu())
    return torch.stack(rows)
