"""The ConViT backbone (d'Ascoli et al., ICML 2021), pure PyTorch.

State-dict keys equal timm's `ConVit` (and the official release): a timm or
official checkpoint is this model's state dict. Differences from timm, all
additive: the width argument is the total width (timm's `embed_dim` is per
head), any H x W patch grid works and the input size may differ from the
construction size (the position embedding is resampled to the input grid).
timm's interface: `forward_features(x)` (normalised tokens), `forward_head`,
`forward_intermediates(x, indices, norm, output_fmt, ...)`; VISSL's named
features (lastCLS, concatPOOL2, ...) live in the trunk adapter,
`convit_ssl.vissl.model.trunk`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from convit_ssl.data.constants import IMAGENET_MEAN, IMAGENET_STD
from convit_ssl.models.attention import GPSA, MHSA
from convit_ssl.models.geometry import Size, patch_grid, to_pair
from convit_ssl.models.layers import DropPath, Mlp, PatchEmbed
from convit_ssl.models.pos_embed import resample_pos_embed


# Feature names (VISSL's ViT names plus pooled and map variants). Every
# feature is taken after the final LayerNorm `norm`, as VISSL's ViT does.
class Block(nn.Module):
    """Pre-norm transformer block whose attention is GPSA or MHSA."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        use_gpsa: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        locality_strength: float = 1.0,
        norm_eps: float = 1e-6,
        global_pool: str = "token",
    ) -> None:
        super().__init__()
        self.use_gpsa = use_gpsa
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if use_gpsa:
            self.attn: nn.Module = GPSA(dim, num_heads, qkv_bias, attn_drop, proj_drop, locality_strength)
        else:
            self.attn = MHSA(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConViT(nn.Module):
    """ConViT: the first `num_gpsa_layers` blocks use GPSA on patch tokens, the
    class token joins after them and the remaining blocks use MHSA. With
    `num_gpsa_layers=0` this is DeiT (with a position embedding that has no
    class slot).

    Args:
        img_size: construction image size (int or (height, width)); sets the
            position-embedding grid. Other sizes are accepted at forward time.
        patch_size: side of the square patches.
        in_chans: input channels.
        num_classes: classifier outputs; 0 gives a features-only model.
        width: total embedding width (all heads together), divisible by num_heads.
        depth: number of blocks.
        num_heads: attention heads per block.
        num_gpsa_layers: how many leading blocks use GPSA (0 <= n < depth).
        mlp_ratio: MLP hidden width / width.
        qkv_bias: bias on the query/key/value projections.
        drop_rate: dropout before the classifier.
        pos_drop_rate: dropout after adding the position embedding.
        proj_drop_rate: dropout after attention and MLP projections.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth at the last block (linear from 0).
        locality_strength: alpha of the convolutional init of GPSA.
        use_pos_embed: learn an absolute position embedding.
        norm_eps: LayerNorm epsilon (timm and the official code: 1e-6).
        global_pool: what the head sees (timm's names): "token" the class token,
            "avg" the mean patch token, "" every token (no pooling).

    timm's model interface: `get_classifier`, `reset_classifier`,
    `group_matcher` (for timm's layer-wise lr decay), `no_weight_decay`,
    `pretrained_cfg` / `default_cfg` (the input the weights expect; ImageNet's
    unless a loader set it from the weights' source), `num_prefix_tokens`,
    `feature_info` (one entry per block), `forward_features`, `forward_head`,
    `forward_intermediates`, `set_grad_checkpointing`.
    """

    def __init__(
        self,
        *,
        img_size: Size = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 16,
        num_gpsa_layers: int = 10,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        locality_strength: float = 1.0,
        use_pos_embed: bool = True,
        norm_eps: float = 1e-6,
        global_pool: str = "token",
    ) -> None:
        super().__init__()
        img_hw = to_pair(img_size, "img_size")
        _check_config(
            img_hw,
            patch_size,
            width,
            num_heads,
            depth,
            num_gpsa_layers,
            num_classes,
            {
                "drop_rate": drop_rate,
                "pos_drop_rate": pos_drop_rate,
                "proj_drop_rate": proj_drop_rate,
                "attn_drop_rate": attn_drop_rate,
                "drop_path_rate": drop_path_rate,
            },
        )
        self.img_size = img_hw
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.width = self.num_features = width
        self.depth = depth
        self.num_heads = num_heads
        self.num_gpsa_layers = num_gpsa_layers
        self.locality_strength = locality_strength
        self.global_pool = _check_pool(global_pool)
        self.num_prefix_tokens = 1  # the class token, in the output of forward_features
        self.feature_info = [dict(num_chs=width, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.pretrained_cfg = default_pretrained_cfg(in_chans, img_hw, num_classes)

        self.patch_embed = PatchEmbed(patch_size, in_chans, width)
        self.grid = patch_grid(img_hw, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        if use_pos_embed:
            self.pos_embed: nn.Parameter | None = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], width))
        else:
            self.register_parameter("pos_embed", None)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                width,
                num_heads,
                use_gpsa=i < num_gpsa_layers,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=rates[i],
                locality_strength=locality_strength,
                norm_eps=norm_eps,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """timm's init (truncated normal 0.02, zero biases, unit norms), then the
        convolutional init of every GPSA layer, applied last so nothing overwrites it."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, GPSA):
                module.gating_param.fill_(1.0)
                module.local_init()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing (timm's name): while gradients are recorded, each
        block keeps only its input and recomputes its activations in the backward
        pass, trading about one extra forward for memory. Seeded randomness (drop
        path, dropout) is replayed, so results are unchanged."""
        self.grad_checkpointing = bool(enable)

    def no_weight_decay(self) -> set:
        """Parameter names that the paper's recipe trains without weight decay (besides biases and norms)."""
        names = {"cls_token", "pos_embed"}
        names.update(n for n, _ in self.named_parameters() if n.endswith("gating_param"))
        return names

    # ------------------------------------------------------- timm interface
    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of `pretrained_cfg`."""
        return self.pretrained_cfg

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by name, as timm's ConVit groups them: the embeddings
        first, then each block, the final norm last (timm's layer-wise lr decay)."""
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier of `num_classes` outputs (0: none), initialised as at
        construction, in the model's device, dtype and train/eval mode."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        reference = self.norm.weight
        self.num_classes = num_classes
        if num_classes > 0:
            self.head = nn.Linear(self.width, num_classes, device=reference.device, dtype=reference.dtype)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)
        self.pretrained_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    # --------------------------------------------------------------- forward
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens, grid = self.patch_embed(x)
        if self.pos_embed is not None:
            tokens = tokens + resample_pos_embed(self.pos_embed, grid, self.grid)
        # Dropout sees timm's (transposed) memory layout, so seeded masks match timm's; the
        # residual stream is then made contiguous, or every later op on it would copy.
        return self.pos_drop(tokens).contiguous(), grid

    def _blocks(self, x: torch.Tensor, grid: tuple[int, int]):
        """Yield (block index, tokens after the block); the class token is
        prepended before block `num_gpsa_layers`."""
        for i, block in enumerate(self.blocks):
            if i == self.num_gpsa_layers:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, grid, use_reentrant=False)
            else:
                x = block(x, grid)
            yield i, x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, 1 + N, width), class token first."""
        x, grid = self._embed(x)
        blocks = self._blocks(x, grid)
        for _, x in blocks:  # noqa: B007  (x: the last block's output)
            pass
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Normalised tokens (B, 1 + N, width) -> logits (B, num_classes), from
        the class token (`global_pool` "token"), the mean patch token ("avg") or
        every token ("": (B, 1 + N, num_classes))."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes), or (B, width) when num_classes == 0."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """timm's `forward_intermediates` (as its VisionTransformer has it): the
        outputs of the blocks `indices` (an int n: the last n; a sequence: those,
        negative counting from the end; None: all), patch tokens only, as
        (B, C, H, W) (``output_fmt="NCHW"``) or (B, N, C) (``"NLC"``), normalised
        with the final norm if `norm`. ``return_prefix_tokens`` makes each entry a
        pair (patch tokens, prefix tokens (B, P, C)): P = 1 (the class token) for
        the blocks after the class token joins, P = 0 for the GPSA blocks before.
        Returns the list, or (the final normalised tokens, the list) unless
        `intermediates_only`; with `stop_early` the blocks after the last index do
        not run (and the final tokens are those of that block)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = block_indices(indices, self.depth)
        stop = max(take) if stop_early or intermediates_only else self.depth - 1
        x, grid = self._embed(x)
        intermediates: list[Any] = []
        blocks = self._blocks(x, grid)
        for i, x in blocks:
            if i in take:
                y = self.norm(x) if norm else x
                prefix, patches = (y[:, :0], y) if i < self.num_gpsa_layers else (y[:, :1], y[:, 1:])
                if output_fmt == "NCHW":
                    patches = patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid)
                intermediates.append((patches, prefix) if return_prefix_tokens else patches)
            if i == stop:
                break
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


POOLS = ("token", "avg", "")


def _check_pool(global_pool: str) -> str:
    if global_pool not in POOLS:
        raise ValueError(f"global_pool must be one of 'token', 'avg' or '' (none), got {global_pool!r}")
    return global_pool


def default_pretrained_cfg(in_chans: int, img_hw: tuple[int, int], num_classes: int) -> dict[str, Any]:
    """timm's pretrained_cfg for weights trained as the paper's (ImageNet statistics,
    bicubic, 0.875 center crop) at this input size."""
    return {
        "input_size": (in_chans, *img_hw),
        "num_classes": num_classes,
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "crop_mode": "center",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "fixed_input_size": False,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def block_indices(indices: int | Sequence[int] | None, depth: int) -> list[int]:
    """timm's rule for `forward_intermediates(indices=...)`: None -> every block; an
    int n -> the last n; a sequence -> those blocks (negative from the end), sorted."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 1 <= indices <= depth:
            raise ValueError(f"indices={indices}: the number of last blocks must be in 1..{depth}")
        return list(range(depth - indices, depth))
    chosen = sorted({int(i) + depth if int(i) < 0 else int(i) for i in indices})
    if not chosen or chosen[0] < 0 or chosen[-1] >= depth:
        raise ValueError(f"indices={list(indices)}: block indices must be in -{depth}..{depth - 1}")
    return chosen


def _check_config(
    img_hw: tuple[int, int],
    patch_size: int,
    width: int,
    num_heads: int,
    depth: int,
    num_gpsa_layers: int,
    num_classes: int,
    rates: dict[str, float],
) -> None:
    patch_grid(img_hw, patch_size)
    if num_heads <= 0 or width <= 0 or width % num_heads:
        raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    if depth <= 0:
        raise ValueError(f"depth must be positive, got {depth}")
    if not 0 <= num_gpsa_layers < depth:
        raise ValueError(
            f"num_gpsa_layers must be in 0..{depth - 1} (depth {depth}: at least one MHSA block "
            f"must follow the GPSA blocks for the class token), got {num_gpsa_layers}"
        )
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    for name, rate in rates.items():
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate}")
