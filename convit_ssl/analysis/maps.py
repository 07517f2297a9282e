"""Attention maps of one query patch, laid out on the patch grid.

The query is a patch (row, col) of the (H, W) grid, default the centre patch
(H // 2, W // 2) (for even sides, the patch just below/right of the centre).
The map of a head is the row of its attention matrix for that query,
reshaped to (H, W) (row-major, as the patch embedding numbers patches).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from convit_ssl.analysis.collect import LayerAttention


def centre_query(grid: tuple[int, int]) -> tuple[int, int]:
    """The default query patch (H // 2, W // 2) of an (H, W) grid, as (row, col)."""
    return grid[0] // 2, grid[1] // 2


def check_query(query: Sequence[int] | None, grid: tuple[int, int]) -> tuple[int, int]:
    """`query` as (row, col) checked against `grid`; the centre patch when None."""
    if query is None:
        return centre_query(grid)
    try:
        row, col = (int(v) for v in query)
    except (TypeError, ValueError) as e:
        raise ValueError(f"query must be a (row, col) pair of ints, got {query!r}") from e
    if not (0 <= row < grid[0] and 0 <= col < grid[1]):
        raise ValueError(
            f"query patch {(row, col)} outside the {grid[0]}x{grid[1]} grid "
            f"(rows 0..{grid[0] - 1}, cols 0..{grid[1] - 1})"
        )
    return row, col


def _query_row(attn: torch.Tensor, query: int, grid: tuple[int, int], class_token: bool) -> torch.Tensor:
    """(..., T, T) attention -> (..., H, W) weights of query patch `query` on the patches."""
    offset = 1 if class_token else 0
    return attn[..., query + offset, offset:].reshape(*attn.shape[:-2], *grid)


def attention_maps(
    layers: Sequence[LayerAttention], query: Sequence[int] | None = None
) -> list[dict[str, torch.Tensor]]:
    """For each recorded layer, the attention of the query patch as maps on the grid.

    Args:
        layers: output of `collect_attention` (all on the same grid).
        query: (row, col) patch; default the centre patch (H // 2, W // 2).

    Returns:
        Per layer a dict: GPSA layers ``positional`` (heads, H, W), ``content``
        (B, heads, H, W) and ``combined`` (B, heads, H, W); MHSA layers
        ``combined`` (B, heads, H, W), the weights the query patch gives to the
        patches (not renormalised), and ``class_token`` (B, heads), the weight
        it gives to the class token (the two sum to 1).
    """
    if not layers:
        raise ValueError("no layers given: pass the output of collect_attention")
    out = []
    for layer in layers:
        row, col = check_query(query, layer.grid)
        q = row * layer.grid[1] + col
        if layer.has_class_token:
            out.append(
                {
                    "combined": _query_row(layer.combined, q, layer.grid, class_token=True),
                    "class_token": layer.combined[..., q + 1, 0],
                }
            )
        else:
            out.append(
                {
                    name: _query_row(getattr(layer, name), q, layer.grid, class_token=False)
                    for name in ("positional", "content", "combined")
                }
            )
    return out
