"""Adapt a ConViT state dict to a new image size or patch size (torch only, no VISSL).

Only two tensors of a ConViT depend on the input geometry:

- ``pos_embed`` (1, H * W, C): the absolute position embedding on the row-major
  (H, W) patch grid, with no class slot. `resample_state_dict` resamples it with
  the package's one resampler, `convit_ssl.models.pos_embed.resample_pos_embed`
  (bicubic, antialiased when shrinking, float32, explicit grids), i.e. exactly
  what a model does on the fly when it sees an input of another size. GPSA's
  relative geometry follows the grid by itself and has no parameters.
- ``patch_embed.proj.weight`` (C, in_chans, p, p): the patch-embedding kernel.
  `resize_patch_embed` converts it to another patch size with FlexiViT's
  pseudo-inverse resize (PI-resize; Beyer et al., "FlexiViT: One Model for All
  Patch Sizes", CVPR 2023). Its bias is unchanged.

A new patch size usually comes with a new image size that keeps the grid
(e.g. patch 16 at 64 px -> patch 8 at 32 px), in which case ``pos_embed`` needs
no change; otherwise apply both functions.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from convit_ssl.models.geometry import square_grid, to_pair
from convit_ssl.models.pos_embed import resample_pos_embed

__all__ = [
    "resample_state_dict",
    "resize_matrix",
    "resize_patch_embed",
    "resize_patch_embed_state_dict",
]

POS_EMBED_KEY = "pos_embed"
PATCH_EMBED_KEY = "patch_embed.proj.weight"


def _copy(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Shallow copy that keeps torch's `_metadata` (as `Module.load_state_dict` does)."""
    out: dict[str, Tensor] = OrderedDict(state_dict)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


# --------------------------------------------------------------- pos_embed
def resample_state_dict(
    state_dict: Mapping[str, Tensor],
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    prefix: str = "",
) -> dict[str, Tensor]:
    """Return a new state dict whose ``prefix + "pos_embed"`` is resampled to `new_grid`.

    Args:
        state_dict: a ConViT state dict (timm's keys, optionally under `prefix`).
            Its ``pos_embed`` has shape (1, H_old * W_old, C), row-major, no class slot.
        new_grid: target patch grid (H_new, W_new); see `convit_ssl.models.geometry.patch_grid`.
        old_grid: grid of the stored embedding; when None it is taken as square,
            sqrt(N) x sqrt(N), and a token count N that is not a perfect square
            is a ValueError.
        prefix: key prefix of the trunk, e.g. ``"trunk.base_model."`` or ``"module."``.

    Returns:
        A shallow copy: ``pos_embed`` becomes (1, H_new * W_new, C) in its original
        dtype (interpolated in float32 with `resample_pos_embed`, bicubic,
        antialiased when shrinking); every other value is the same tensor object.
        The input is not modified.

    Raises:
        KeyError: the state dict has no ``prefix + "pos_embed"`` (e.g. a model
            built with ``use_pos_embed=False``).
        ValueError: ``pos_embed`` is not (1, N, C), or N does not match `old_grid`,
            or N is not a perfect square and `old_grid` is None.
    """
    key = prefix + POS_EMBED_KEY
    if key not in state_dict:
        raise KeyError(f"state dict has no {key!r} (keys with prefix {prefix!r} expected; is the prefix right?)")
    pos_embed = state_dict[key]
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"{key!r} must have shape (1, N, C), got {tuple(pos_embed.shape)}")
    num_tokens = pos_embed.shape[1]
    if old_grid is None:
        try:
            old_grid = square_grid(num_tokens, repr(key))
        except ValueError as e:
            raise ValueError(f"{e}: pass old_grid=(H, W) explicitly") from None
    old_hw = to_pair(old_grid, "old_grid")
    new_hw = to_pair(new_grid, "new_grid")
    out = _copy(state_dict)
    out[key] = resample_pos_embed(pos_embed, new_hw, old_hw)
    return out


# ------------------------------------------------------------- patch_embed
def resize_matrix(
    old_patch: tuple[int, int],
    new_patch: tuple[int, int],
    interpolation: str = "bilinear",
    antialias: bool = False,
    dtype: torch.dtype = torch.float64,
    device: torch.device | None = None,
) -> Tensor:
    """The linear resize operator B of single-channel patches, shape (p'h * p'w, ph * pw).

    Column k is basis patch e_k (ph, pw) resized to (p'h, p'w) with
    ``F.interpolate(mode=interpolation, antialias=antialias, align_corners=False)``,
    flattened row-major, so ``B @ x.flatten() == resize(x).flatten()`` for a patch x.
    """
    old_h, old_w = old_patch
    new_h, new_w = new_patch
    basis = torch.eye(old_h * old_w, dtype=dtype, device=device).reshape(-1, 1, old_h, old_w)
    kwargs = {"antialias": antialias} if antialias else {}
    if interpolation in ("bilinear", "bicubic"):
        kwargs["align_corners"] = False
    resized = F.interpolate(basis, size=(new_h, new_w), mode=interpolation, **kwargs)
    return resized.reshape(old_h * old_w, new_h * new_w).T


def resize_patch_embed(
    weight: Tensor,
    new_patch: tuple[int, int] | int,
    *,
    interpolation: str = "bilinear",
    antialias: bool = False,
) -> Tensor:
    """FlexiViT's pseudo-inverse resize (PI-resize) of a patch-embedding kernel.

    Args:
        weight: kernel (C, in_chans, ph, pw), e.g. ``patch_embed.proj.weight``.
        new_patch: new patch size p' (int or (p'h, p'w)).
        interpolation, antialias: the patch resize operator B (see `resize_matrix`).
            Default: bilinear without antialiasing (FlexiViT's choice of bilinear;
            antialias off, so that shrinking by an integer factor k is exactly
            k x k average pooling). timm's `resample_patch_embed` defaults to
            bicubic with antialias, available here with those arguments.

    Returns:
        Kernel (C, in_chans, p'h, p'w) in the dtype and device of `weight`:
        w' = pinv(B^T) w for each (output, input) channel pair, computed in
        float64. Then <B x, w'> = <P x, w> for every patch x, where P = B^T pinv(B^T)
        is the orthogonal projection onto the range of B^T:

        - upsampling (p' >= p, B has full column rank): P = I, so
          <x, w> == <B x, w'> exactly: a resized patch gives the same token;
        - downsampling: w' minimises ||B^T w' - w|| (FlexiViT's least-squares
          solution, which is also the minimiser of E_x[(<x, w> - <Bx, w'>)^2]
          for x ~ N(0, I)); equality holds for patches in range(B^T). Equivalently,
          a small patch z gets the token that w gives the minimum-norm large patch
          pinv(B) z with B pinv(B) z = z (for bilinear 2x shrinking: z upsampled by
          pixel repetition, i.e. nearest neighbour).

        The same size returns `weight` itself.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a kernel of shape (C, in_chans, p, p), got {tuple(weight.shape)}")
    old_hw = (int(weight.shape[-2]), int(weight.shape[-1]))
    new_hw = to_pair(new_patch, "new_patch")
    if new_hw == old_hw:
        return weight
    resize = resize_matrix(old_hw, new_hw, interpolation, antialias, torch.float64, weight.device)
    # Row form of w' = pinv(B^T) w:  w'_row = w_row @ pinv(B^T)^T = w_row @ pinv(B).
    pinv = torch.linalg.pinv(resize)  # (ph * pw, p'h * p'w)
    c_out, c_in = weight.shape[:2]
    flat = weight.to(torch.float64).reshape(c_out * c_in, old_hw[0] * old_hw[1])
    return (flat @ pinv).reshape(c_out, c_in, *new_hw).to(weight.dtype)


def resize_patch_embed_state_dict(
    state_dict: Mapping[str, Tensor],
    new_patch: tuple[int, int] | int,
    prefix: str = "",
    *,
    interpolation: str = "bilinear",
    antialias: bool = False,
) -> dict[str, Tensor]:
    """Return a new state dict whose ``prefix + "patch_embed.proj.weight"``
    (C, in_chans, p, p) is PI-resized to (C, in_chans, p', p') with
    `resize_patch_embed`; the bias and every other value are the same objects.
    ``pos_embed`` is untouched: use `resample_state_dict` too if the grid changes.
    KeyError when the kernel is missing."""
    key = prefix + PATCH_EMBED_KEY
    if key not in state_dict:
        raise KeyError(f"state dict has no {key!r} (keys with prefix {prefix!r} expected; is the prefix right?)")
    out = _copy(state_dict)
    out[key] = resize_patch_embed(state_dict[key], new_patch, interpolation=interpolation, antialias=antialias)
    return out
