"""What the GPSA parameters encode, read from the weights (no images needed).

Gate: sigmoid(lambda_h), the weight of the positional term of head h.

Positional kernel: with ``pos_proj.weight[h] = [w_x, w_y, w_d]`` and bias b,
the positional score of key offset delta = (dx, dy) (in patches, key minus
query; see `convit_ssl.models.geometry`) is

    s(delta) = w_x dx + w_y dy + w_d (dx^2 + dy^2) + b
             = w_d |delta - c|^2 + const,   c = (-w_x / (2 w_d), -w_y / (2 w_d))

so for w_d < 0 the softmax over keys is a Gaussian bump
exp(-alpha |delta - c|^2) around the attention centre c, with locality
strength alpha = -w_d. Its span is reported as 1 / sqrt(alpha) patches: the
distance from c at which the weight has fallen by a factor e (the per-axis
standard deviation of the bump is span / sqrt(2)). On an infinite grid the
bias cancels in the softmax; near the border the bump is cut off.

For w_d >= 0 the head is not local (its score is flat or grows with the
distance): the centre is undefined (NaN) and the span infinite (inf); the
locality strength -w_d is still reported (<= 0).

Every function returns one row per GPSA block, in block order (the GPSA
blocks are the first ``model.num_gpsa_layers`` blocks).
"""

from __future__ import annotations

import torch

from convit_ssl.analysis.collect import check_model
from convit_ssl.models.attention import GPSA
from convit_ssl.models.convit import ConViT


def _gpsa_modules(model: ConViT) -> list[GPSA]:
    return [block.attn for block in check_model(model).blocks if isinstance(block.attn, GPSA)]


def _stack(rows: list[torch.Tensor], empty_shape: tuple) -> torch.Tensor:
    if not rows:
        return torch.empty(empty_shape)
    return torch.stack(rows).detach().float().cpu()


@torch.no_grad()
def gates(model: ConViT) -> torch.Tensor:
    """(num_gpsa_layers, heads) sigmoid(lambda) of each GPSA layer: the weight of
    the positional attention (1 - gate goes to the content attention)."""
    return _stack([m.gate() for m in _gpsa_modules(model)], (0, model.num_heads))


@torch.no_grad()
def locality_strengths(model: ConViT) -> torch.Tensor:
    """(num_gpsa_layers, heads) alpha = -w_d of each head's positional kernel
    (> 0 for a local head; <= 0 means not local)."""
    return _stack([-m.pos_proj.weight[:, 2] for m in _gpsa_modules(model)], (0, model.num_heads))


@torch.no_grad()
def positional_centres(model: ConViT) -> torch.Tensor:
    """(num_gpsa_layers, heads, 2) attention centre (dx, dy) of each head, in
    patches relative to the query (x to the right, y downwards);
    NaN for heads with w_d >= 0 (not local, no centre)."""
    rows = []
    for m in _gpsa_modules(model):
        w = m.pos_proj.weight.float()
        w_d = w[:, 2:3]
        centre = -w[:, :2] / (2.0 * w_d)
        rows.append(torch.where(w_d < 0, centre, torch.full_like(centre, float("nan"))))
    return _stack(rows, (0, model.num_heads, 2))


@torch.no_grad()
def positional_spans(model: ConViT) -> torch.Tensor:
    """(num_gpsa_layers, heads) span 1 / sqrt(alpha) in patches of each head's
    positional bump; inf for heads with alpha <= 0 (not local)."""
    alpha = locality_strengths(model)
    span = alpha.clamp_min(torch.finfo(alpha.dtype).tiny).rsqrt()
    return torch.where(alpha > 0, span, torch.full_like(alpha, float("inf")))
