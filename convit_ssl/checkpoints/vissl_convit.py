"""Convert state dicts of VISSL's built-in ``convit`` trunk to timm's ConViT keys and back.

VISSL 0.1.6 ships a ConViT trunk of its own (``vissl/models/trunks/convit.py``,
registered as ``convit``). Its computation is timm's ConViT (the official
release) with other parameter names, another parametrisation of the GPSA
positional projection and another LayerNorm epsilon. Pure functions over
state dicts; only torch is needed (VISSL need not be installed).

Facts about VISSL's trunk (checked against its source):

- ``class_token`` (1, 1, C) and ``pos_embedding`` (1, N, C), N = (IMAGE_SIZE /
  PATCH_SIZE)^2: the position embedding has **no class slot**. It is added to
  the patch tokens only, and the class token joins, without any position
  embedding, before block ``N_GPSA_LAYERS`` (with CLASS_TOKEN_IN_LOCAL_LAYERS
  False, its default and its only working setting: with True the GPSA layers
  would see N + 1 tokens and fail to build a square relative grid). This is
  exactly timm's ``cls_token`` / ``pos_embed``, so both map one to one.
- GPSA blocks: ``attn.{qk, v, proj, pos_proj}`` as in timm; the gate is
  ``attn.alpha`` of shape (1, H, 1, 1) (timm: ``gating_param`` (H,)), and
  ``pos_proj`` is ``Linear(3 * L, H)`` with L = LOCALITY_DIM (10 by default)
  applied to the relative encoding [dx]*L + [dy]*L + [dx^2+dy^2]*L, its output
  divided by L. So the score of head h is
  ``(sum_k (sum_{j in block k} W[h, j]) r_k + b[h]) / L``, which equals timm's
  ``W'[h, k] r_k + b'[h]`` with ``W'[h, k] = sum_{j in block k} W[h, j] / L``
  and ``b' = b / L``: an exact reparametrisation.
- MHSA blocks: ``attn.qkv`` and ``attn.proj`` as in timm; MLPs are
  ``mlp.linear_1`` / ``mlp.linear_2`` (timm: ``mlp.fc1`` / ``mlp.fc2``) with
  any hidden width MLP_DIM.
- ``qk_scale``: ``QK_SCALE or head_dim ** -0.5``; the default (False) is
  timm's scale. A non-default QK_SCALE is not recorded in the state dict and
  has no equivalent here.
- LayerNorms are ``nn.LayerNorm`` with PyTorch's default eps 1e-5
  (``VISSL_CONVIT_NORM_EPS``), timm uses 1e-6: build the equivalent model with
  ``norm_eps=1e-5`` (``vissl_convit_model_kwargs`` does).
- The trunk has no classifier head. Its ``forward(x, out_feat_keys)`` ignores
  ``out_feat_keys`` and returns the class-token feature after the final norm
  with a leading axis, shape (1, B, C); convit_ssl's ``ConViT(num_classes=0)``
  returns the same feature as (B, C). (With CLASSIFIER "gap" VISSL returns the
  mean of all tokens, class token included, instead; the state dict does not
  record which.)
- The relative-position buffer ``rel_indices`` is non-persistent, so it is
  normally absent; if present it is recognised and discarded (it is derived
  from the grid size alone).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from convit_ssl.checkpoints.infer import infer_model_kwargs
from convit_ssl.checkpoints.io import CheckpointError

__all__ = [
    "VISSL_CONVIT_NORM_EPS",
    "timm_to_vissl_convit",
    "vissl_convit_model_kwargs",
    "vissl_convit_to_timm",
]

#: LayerNorm epsilon of VISSL's convit trunk (PyTorch's default; timm's ConViT uses 1e-6).
VISSL_CONVIT_NORM_EPS = 1e-5

_BLOCKS = "blocks."

# Keys outside the blocks: VISSL name -> timm name (identical shapes).
_TOP_VISSL_TO_TIMM: tuple[tuple[str, str], ...] = (
    ("class_token", "cls_token"),
    ("pos_embedding", "pos_embed"),
    ("patch_embed.proj.weight", "patch_embed.proj.weight"),
    ("patch_embed.proj.bias", "patch_embed.proj.bias"),
    ("norm.weight", "norm.weight"),
    ("norm.bias", "norm.bias"),
)

# Keys of every block (relative to "blocks.{i}."): VISSL name -> timm name.
_COMMON_VISSL_TO_TIMM: tuple[tuple[str, str], ...] = (
    ("norm1.weight", "norm1.weight"),
    ("norm1.bias", "norm1.bias"),
    ("attn.proj.weight", "attn.proj.weight"),
    ("attn.proj.bias", "attn.proj.bias"),
    ("norm2.weight", "norm2.weight"),
    ("norm2.bias", "norm2.bias"),
    ("mlp.linear_1.weight", "mlp.fc1.weight"),
    ("mlp.linear_1.bias", "mlp.fc1.bias"),
    ("mlp.linear_2.weight", "mlp.fc2.weight"),
    ("mlp.linear_2.bias", "mlp.fc2.bias"),
)

# Attention-specific keys renamed one to one (same name on both sides).
_GPSA_SAME = ("attn.qk.weight", "attn.v.weight")
_GPSA_BIASES = ("attn.qk.bias", "attn.v.bias")  # present when QKV_BIAS
_MHSA_SAME = ("attn.qkv.weight",)
_MHSA_BIASES = ("attn.qkv.bias",)

# Keys whose presence marks a block as GPSA, in VISSL's and timm's names.
_VISSL_GPSA_MARKERS = ("attn.pos_proj.weight", "attn.pos_proj.bias", "attn.alpha", "attn.qk.weight", "attn.v.weight")
_TIMM_GPSA_MARKERS = (
    "attn.pos_proj.weight",
    "attn.pos_proj.bias",
    "attn.gating_param",
    "attn.qk.weight",
    "attn.v.weight",
)
_MHSA_MARKERS = ("attn.qkv.weight", "attn.qkv.bias")


# --------------------------------------------------------------------------- helpers
def _pop(sd: dict[str, Tensor], key: str, what: str) -> Tensor:
    """Remove and return sd[key]; a missing key is a ValueError naming it."""
    if key not in sd:
        raise ValueError(f"{what} state dict lacks the expected key {key!r}")
    return sd.pop(key)


def _block_indices(sd: dict[str, Tensor]) -> list[int]:
    """Sorted indices i of the keys 'blocks.{i}.*'; they must be 0..depth-1."""
    indices = set()
    for key in sd:
        if key.startswith(_BLOCKS):
            head, sep, _ = key[len(_BLOCKS) :].partition(".")
            if sep and head.isdigit():
                indices.add(int(head))
    found = sorted(indices)
    missing = sorted(set(range(len(found) and found[-1] + 1)) - indices)
    if missing:
        raise ValueError(f"state dict has no keys for block(s) {missing} (blocks found: {found})")
    return found


def _is_gpsa(sd: dict[str, Tensor], prefix: str, gpsa_markers: tuple[str, ...]) -> bool:
    """Whether block `prefix` is GPSA (True) or MHSA (False), from its keys."""
    gpsa = [m for m in gpsa_markers if prefix + m in sd]
    mhsa = [m for m in _MHSA_MARKERS if prefix + m in sd]
    if gpsa and mhsa:
        raise ValueError(
            f"block {prefix!r} has both GPSA keys {[prefix + m for m in gpsa]} "
            f"and MHSA keys {[prefix + m for m in mhsa]}"
        )
    if not gpsa and not mhsa:
        raise ValueError(
            f"cannot tell whether block {prefix!r} is GPSA or MHSA: it lacks the expected key "
            f"{prefix + gpsa_markers[0]!r} (GPSA) or {prefix + _MHSA_MARKERS[0]!r} (MHSA)"
        )
    return bool(gpsa)


def _optional_biases(sd: dict[str, Tensor], prefix: str, names: tuple[str, ...]) -> bool:
    """True when all of `names` are present under `prefix`, False when none is;
    a partial set is a ValueError naming the missing ones."""
    present = [n for n in names if prefix + n in sd]
    if present and len(present) != len(names):
        missing = [prefix + n for n in names if n not in present]
        raise ValueError(f"state dict has {[prefix + n for n in present]} but lacks the expected key(s) {missing}")
    return bool(present)


def _check_leftovers(sd: dict[str, Tensor], what: str, hint: str = "") -> None:
    if sd:
        raise ValueError(f"unexpected key(s) in the {what} state dict, not converted: {sorted(sd)}{hint}")


# --------------------------------------------------------------------------- VISSL -> timm
def vissl_convit_to_timm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Convert a state dict of VISSL's built-in ``convit`` trunk to timm's ConViT keys.

    Args:
        state_dict: the trunk's own keys (no ``trunk.`` / ``base_model.`` prefix;
            strip those first). Shapes, with C the width, H the heads, N the
            patches, L = LOCALITY_DIM and M = MLP_DIM:
            ``class_token`` (1, 1, C), ``pos_embedding`` (1, N, C) (no class slot),
            ``patch_embed.proj.weight`` (C, 3, p, p); GPSA blocks
            ``attn.alpha`` (1, H, 1, 1), ``attn.pos_proj.weight`` (H, 3 L),
            ``attn.pos_proj.bias`` (H,), ``attn.qk.weight`` (2 C, C),
            ``attn.v.weight`` (C, C); MHSA blocks ``attn.qkv.weight`` (3 C, C);
            ``mlp.linear_1.weight`` (M, C), ``mlp.linear_2.weight`` (C, M).

    Returns:
        A new dict with timm's ConViT keys (loadable with ``strict=True`` into
        ``convit_ssl.models.ConViT(num_classes=0, norm_eps=1e-5, ...)``, see
        `vissl_convit_model_kwargs`): ``attn.gating_param`` (H,) =
        alpha.reshape(H); ``attn.pos_proj.weight`` (H, 3) whose column k is the
        sum of VISSL's k-th block of L columns divided by L;
        ``attn.pos_proj.bias`` (H,) = bias / L; ``mlp.fc1`` / ``mlp.fc2`` for
        ``mlp.linear_1`` / ``mlp.linear_2``; everything else renamed only.
        Tensors keep their dtype (the sums and divisions are computed in
        float64 and cast back, so fp32 results are correctly rounded). The
        input dict is not modified; converted tensors other than pos_proj and
        the gate are the input's own tensors, not copies.

    Raises:
        ValueError: a missing expected key (named), any key left unconverted
            (all listed), or a pos_proj weight whose width is not a positive
            multiple of 3 or disagrees between blocks.
    """
    sd = dict(state_dict)  # shallow copy: every converted key is popped from it
    what = "VISSL convit"
    out: dict[str, Tensor] = {}
    for old, new in _TOP_VISSL_TO_TIMM:
        out[new] = _pop(sd, old, what)
    locality_dim: int | None = None
    for i in _block_indices(sd):
        p = f"{_BLOCKS}{i}."
        gpsa = _is_gpsa(sd, p, _VISSL_GPSA_MARKERS)
        for old, new in _COMMON_VISSL_TO_TIMM:
            out[p + new] = _pop(sd, p + old, what)
        if gpsa:
            names = _GPSA_SAME + (_GPSA_BIASES if _optional_biases(sd, p, _GPSA_BIASES) else ())
            for name in names:
                out[p + name] = _pop(sd, p + name, what)
            weight = _pop(sd, p + "attn.pos_proj.weight", what)
            bias = _pop(sd, p + "attn.pos_proj.bias", what)
            alpha = _pop(sd, p + "attn.alpha", what)
            dim = _locality_dim(weight, p + "attn.pos_proj.weight")
            if locality_dim is not None and dim != locality_dim:
                raise ValueError(f"{p}attn.pos_proj.weight implies LOCALITY_DIM {dim}, earlier blocks {locality_dim}")
            locality_dim = dim
            heads = weight.shape[0]
            if bias.shape != (heads,) or alpha.numel() != heads:
                raise ValueError(
                    f"{p}attn: pos_proj.bias {tuple(bias.shape)} and alpha {tuple(alpha.shape)} "
                    f"do not match pos_proj.weight {tuple(weight.shape)} ({heads} heads)"
                )
            wide = weight.to(torch.float64).reshape(heads, 3, dim)
            out[p + "attn.pos_proj.weight"] = (wide.sum(dim=-1) / dim).to(weight.dtype)
            out[p + "attn.pos_proj.bias"] = (bias.to(torch.float64) / dim).to(bias.dtype)
            out[p + "attn.gating_param"] = alpha.reshape(heads).clone()
        else:
            names = _MHSA_SAME + (_MHSA_BIASES if _optional_biases(sd, p, _MHSA_BIASES) else ())
            for name in names:
                out[p + name] = _pop(sd, p + name, what)
        # The relative-position buffer is non-persistent in VISSL 0.1.6; should a
        # state dict carry it anyway, it is derived data (grid size only): discard it.
        sd.pop(p + "attn.rel_indices", None)
    _check_leftovers(sd, what, " (a head or a prefix such as 'trunk.' must be removed first)")
    return out


def _locality_dim(weight: Tensor, key: str) -> int:
    """LOCALITY_DIM L from a VISSL pos_proj weight of shape (H, 3 L)."""
    if weight.ndim != 2 or weight.shape[1] < 3 or weight.shape[1] % 3:
        raise ValueError(
            f"{key} has shape {tuple(weight.shape)}; VISSL's pos_proj weight is (heads, 3 * LOCALITY_DIM), "
            "so its width must be a positive multiple of 3"
        )
    return weight.shape[1] // 3


# --------------------------------------------------------------------------- timm -> VISSL
def timm_to_vissl_convit(state_dict: dict[str, Tensor], locality_dim: int = 10) -> dict[str, Tensor]:
    """Convert a timm ConViT state dict (convit_ssl's keys) to VISSL's ``convit`` trunk keys.

    Args:
        state_dict: timm ConViT keys without a classifier head (VISSL's trunk has
            none; remove ``head.*`` first). GPSA ``attn.pos_proj.weight`` (H, 3),
            ``attn.pos_proj.bias`` (H,), ``attn.gating_param`` (H,).
        locality_dim: VISSL's LOCALITY_DIM L (its config default is 10).

    Returns:
        A new dict with VISSL's keys: ``attn.pos_proj.weight`` (H, 3 L) with each
        timm column repeated L times (VISSL's score is sum(block) / L = w when
        all L entries equal w), ``attn.pos_proj.bias`` = bias * L,
        ``attn.alpha`` (1, H, 1, 1), ``mlp.linear_1`` / ``mlp.linear_2``.
        Dtypes are kept. The round trip timm -> VISSL -> timm is exact for
        every tensor except the pos_proj bias, which is multiplied and divided
        by L and so comes back within one unit in the last place of its dtype
        (bias * L is rounded once when stored; exact when L is a power of two).

    Raises:
        ValueError: locality_dim < 1, a missing expected key (named), any key
            left unconverted (all listed, e.g. ``head.weight``), or a pos_proj
            weight that is not (H, 3).
    """
    if isinstance(locality_dim, bool) or not isinstance(locality_dim, int) or locality_dim < 1:
        raise ValueError(f"locality_dim must be a positive integer, got {locality_dim!r}")
    sd = dict(state_dict)
    what = "timm ConViT"
    out: dict[str, Tensor] = {}
    for old, new in _TOP_VISSL_TO_TIMM:
        out[old] = _pop(sd, new, what)
    for i in _block_indices(sd):
        p = f"{_BLOCKS}{i}."
        gpsa = _is_gpsa(sd, p, _TIMM_GPSA_MARKERS)
        for old, new in _COMMON_VISSL_TO_TIMM:
            out[p + old] = _pop(sd, p + new, what)
        if gpsa:
            names = _GPSA_SAME + (_GPSA_BIASES if _optional_biases(sd, p, _GPSA_BIASES) else ())
            for name in names:
                out[p + name] = _pop(sd, p + name, what)
            weight = _pop(sd, p + "attn.pos_proj.weight", what)
            bias = _pop(sd, p + "attn.pos_proj.bias", what)
            gate = _pop(sd, p + "attn.gating_param", what)
            if weight.ndim != 2 or weight.shape[1] != 3:
                raise ValueError(f"{p}attn.pos_proj.weight has shape {tuple(weight.shape)}, expected (heads, 3)")
            heads = weight.shape[0]
            if bias.shape != (heads,) or gate.shape != (heads,):
                raise ValueError(
                    f"{p}attn: pos_proj.bias {tuple(bias.shape)} and gating_param {tuple(gate.shape)} "
                    f"do not match pos_proj.weight {tuple(weight.shape)} ({heads} heads)"
                )
            out[p + "attn.pos_proj.weight"] = weight.repeat_interleave(locality_dim, dim=1)
            out[p + "attn.pos_proj.bias"] = (bias.to(torch.float64) * locality_dim).to(bias.dtype)
            out[p + "attn.alpha"] = gate.reshape(1, heads, 1, 1).clone()
        else:
            names = _MHSA_SAME + (_MHSA_BIASES if _optional_biases(sd, p, _MHSA_BIASES) else ())
            for name in names:
                out[p + name] = _pop(sd, p + name, what)
    _check_leftovers(sd, what, " (VISSL's convit trunk has no classifier head: remove head.* first)")
    return out


# --------------------------------------------------------------------------- model arguments
def vissl_convit_model_kwargs(state_dict: dict[str, Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """Arguments of ``convit_ssl.models.ConViT`` that reproduce a VISSL ``convit`` trunk.

    Inferred from tensor shapes alone (the state dict is validated by
    converting it with `vissl_convit_to_timm`): ``width`` (C, from
    ``patch_embed.proj.weight`` (C, in_chans, p, p)), ``in_chans``,
    ``patch_size`` (p), ``img_size`` (p * sqrt(N) for ``pos_embedding``
    (1, N, C), a square grid as VISSL's GPSA assumes), ``depth``,
    ``num_gpsa_layers`` (blocks with a pos_proj), ``num_heads`` (rows of
    pos_proj), ``mlp_ratio`` (MLP_DIM / C, chosen so that
    ``int(C * mlp_ratio) == MLP_DIM``), ``qkv_bias`` (presence of
    ``attn.qk.bias`` / ``attn.qkv.bias``), ``norm_eps`` = 1e-5 and
    ``num_classes`` = 0 (the trunk has no head).

    Args:
        state_dict: VISSL convit trunk keys (no prefix).
        num_heads: needed only when there is no GPSA block (the head count of
            MHSA blocks is not visible in shapes); must agree otherwise.

    Not recorded in a state dict and so assumed to be VISSL's defaults:
    QK_SCALE (head_dim ** -0.5), CLASSIFIER "token", CLASS_TOKEN_IN_LOCAL_LAYERS
    False, and an image size of p * sqrt(N).

    Raises:
        ValueError: the state dict does not convert, N is not a perfect
            square, the patch kernel is not square, blocks disagree on heads,
            MLP width or biases, a GPSA block follows an MHSA block, every
            block is GPSA (the class token would never join), or the heads
            cannot be inferred / contradict ``num_heads``.
    """
    try:
        kwargs = infer_model_kwargs(vissl_convit_to_timm(state_dict), num_heads=num_heads)
    except CheckpointError as e:
        raise ValueError(str(e).replace("pos_embed ", "pos_embedding ")) from e
    return {**kwargs, "norm_eps": VISSL_CONVIT_NORM_EPS}
