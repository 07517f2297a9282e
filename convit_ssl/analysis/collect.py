"""Capture the attention every block of a ConViT really computes, in one forward.

A forward pre-hook on each block's attention module records the tokens the
attention sees, i.e. ``norm1`` of the real hidden state of that block (not the
raw patch embeddings, which the official analysis code fed to every layer),
together with the patch grid. The attention matrices are then computed from
those inputs with the modules' own methods (`GPSA.positional_attention`,
`GPSA.content_attention`, `GPSA.attention_maps`, `MHSA.attention_maps`), so
they are the matrices the forward used.

Memory: per recorded layer, B * heads * T^2 floats per matrix (T = N, or
1 + N for MHSA layers); pass `layers` to record only some blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from convit_ssl.models.attention import GPSA, MHSA
from convit_ssl.models.convit import ConViT

GPSA_KIND = "gpsa"
MHSA_KIND = "mhsa"


@dataclass
class LayerAttention:
    """The attention of one block for a batch of B images on an (H, W) patch grid, N = H * W.

    Attributes:
        index: block index in ``model.blocks``.
        kind: ``"gpsa"`` (patch tokens only) or ``"mhsa"`` (class token first).
        grid: the patch grid (H, W).
        inputs: (B, T, C) tokens the attention received (``norm1`` of the hidden
            state); T = N for GPSA, 1 + N for MHSA.
        combined: (B, heads, T, T) attention matrix used by the block (rows are
            queries, columns keys; for GPSA the gated mix, rows renormalised).
        positional: (heads, N, N) positional attention softmax(P_h) (GPSA only).
        content: (B, heads, N, N) content attention softmax(QK^T/sqrt(d)) (GPSA only).
        gate: (heads,) sigmoid(lambda_h), the weight of the positional term (GPSA only).
    """

    index: int
    kind: str
    grid: tuple[int, int]
    inputs: torch.Tensor
    combined: torch.Tensor
    positional: torch.Tensor | None = None
    content: torch.Tensor | None = None
    gate: torch.Tensor | None = None

    @property
    def has_class_token(self) -> bool:
        """True when token 0 of `combined` is the class token (MHSA layers)."""
        return self.kind == MHSA_KIND


def check_model(model: nn.Module) -> ConViT:
    """`model` itself if it is a convit_ssl ConViT, else a ValueError naming its type."""
    if not isinstance(model, ConViT):
        raise ValueError(f"expected a convit_ssl.models.ConViT, got {type(model).__name__}")
    return model


def attention_kinds(model: ConViT) -> list[str]:
    """Kind ("gpsa" or "mhsa") of each block of `model`, in block order."""
    kinds = []
    for i, block in enumerate(check_model(model).blocks):
        if isinstance(block.attn, GPSA):
            kinds.append(GPSA_KIND)
        elif isinstance(block.attn, MHSA):
            kinds.append(MHSA_KIND)
        else:
            raise ValueError(
                f"block {i}: unsupported attention module {type(block.attn).__name__} (expected GPSA or MHSA)"
            )
    return kinds


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block; restore every submodule's own
    train/eval flag afterwards (even if they differed from each other)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def _check_images(model: ConViT, images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (B, C, H, W), got {shape}")
    channels = model.patch_embed.proj.in_channels
    if images.shape[1] != channels:
        raise ValueError(
            f"expected images with {channels} channels, got {images.shape[1]} (shape {tuple(images.shape)})"
        )
    if images.shape[0] == 0:
        raise ValueError(f"expected at least one image, got shape {tuple(images.shape)}")
    param = model.patch_embed.proj.weight
    return images.to(device=param.device, dtype=param.dtype)


def _check_layers(layers: Sequence[int] | None, depth: int) -> list[int]:
    if layers is None:
        return list(range(depth))
    chosen = sorted({int(i) for i in layers})
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad or not chosen:
        raise ValueError(f"layer indices must be in 0..{depth - 1} (and at least one), got {list(layers)}")
    return chosen


def collect_attention(model: ConViT, images: torch.Tensor, layers: Sequence[int] | None = None) -> list[LayerAttention]:
    """Run `model` once on `images` (B, C, H_img, W_img) and return the attention of each block.

    The forward runs in eval mode under ``torch.no_grad`` and stops after the
    last requested block; the model's train/eval flags are restored after.
    Images are moved to the model's device and dtype. Any image size that the
    model accepts works (non-square, other than the construction size).

    Args:
        model: a convit_ssl ConViT.
        images: (B, C, H_img, W_img) batch.
        layers: block indices to record (default: all), in 0..depth-1.

    Returns:
        One `LayerAttention` per recorded block, in block order: for GPSA blocks
        positional (heads, N, N), content (B, heads, N, N), combined
        (B, heads, N, N) and gate (heads,); for MHSA blocks combined
        (B, heads, 1 + N, 1 + N), class token first.
    """
    model = check_model(model)
    kinds = attention_kinds(model)
    chosen = _check_layers(layers, len(kinds))
    seen: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}

    def recorder(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["x"]
            grid = args[1] if len(args) > 1 else kwargs["grid"]
            seen[index] = (x.detach(), (int(grid[0]), int(grid[1])))

        return hook

    handles = [model.blocks[i].attn.register_forward_pre_hook(recorder(i), with_kwargs=True) for i in chosen]
    try:
        with evaluating(model), torch.no_grad():
            model.forward_intermediates(_check_images(model, images), chosen, intermediates_only=True)
            records = [_layer_attention(i, kinds[i], model.blocks[i].attn, *seen[i]) for i in chosen]
    finally:
        for handle in handles:
            handle.remove()
    return records


def _layer_attention(index: int, kind: str, attn: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> LayerAttention:
    if kind == MHSA_KIND:
        return LayerAttention(index, kind, grid, x, attn.attention_maps(x, grid))
    return LayerAttention(
        index,
        kind,
        grid,
        x,
        combined=attn.attention_maps(x, grid),
        positional=attn.positional_attention(grid),
        content=attn.content_attention(x),
        gate=attn.gate(),
    )
