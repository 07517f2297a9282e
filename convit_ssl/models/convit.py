"""The ConViT backbone (d'Ascoli et al., ICML 2021), pure PyTorch.

State-dict keys equal timm's `ConVit` (and the official release): a timm or
official checkpoint is this model's state dict. Differences from timm, all
additive: the width argument is the total width (timm's `embed_dim` is per
head), any H x W patch grid works and the input size may differ from the
construction size (the position embedding is resampled to the input grid),
and intermediate features are available by name (`forward_features`).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from convit_ssl.models.attention import GPSA, MHSA
from convit_ssl.models.geometry import Size, patch_grid, to_pair
from convit_ssl.models.layers import DropPath, Mlp, PatchEmbed
from convit_ssl.models.pos_embed import resample_pos_embed


# Feature names (VISSL's ViT names plus pooled and map variants). Every
# feature is taken after the final LayerNorm `norm`, as VISSL's ViT does.
FEATURE_NAMES_HELP = (
    "lastCLS, blkCLS{i}, concatCLS{n}, lastPOOL, blkPOOL{i}, concatPOOL{n}, lastBLK, lastMAP"
)
_FEATURE_RE = re.compile(r"^(lastCLS|lastPOOL|lastBLK|lastMAP|blkCLS\d+|blkPOOL\d+|concatCLS\d+|concatPOOL\d+)$")


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

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
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
    ) -> None:
        super().__init__()
        img_hw = to_pair(img_size, "img_size")
        _check_config(img_hw, patch_size, width, num_heads, depth, num_gpsa_layers, num_classes, {
            "drop_rate": drop_rate, "pos_drop_rate": pos_drop_rate, "proj_drop_rate": proj_drop_rate,
            "attn_drop_rate": attn_drop_rate, "drop_path_rate": drop_path_rate,
        })
        self.img_size = img_hw
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.width = self.num_features = width
        self.depth = depth
        self.num_heads = num_heads
        self.num_gpsa_layers = num_gpsa_layers
        self.locality_strength = locality_strength

        self.patch_embed = PatchEmbed(patch_size, in_chans, width)
        self.grid = patch_grid(img_hw, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        if use_pos_embed:
            self.pos_embed: Optional[nn.Parameter] = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], width))
        else:
            self.register_parameter("pos_embed", None)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                width, num_heads, use_gpsa=i < num_gpsa_layers, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=rates[i],
                locality_strength=locality_strength, norm_eps=norm_eps,
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

    # --------------------------------------------------------------- forward
    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        tokens, grid = self.patch_embed(x)
        if self.pos_embed is not None:
            tokens = tokens + resample_pos_embed(self.pos_embed, grid, self.grid)
        # Dropout sees timm's (transposed) memory layout, so seeded masks match timm's; the
        # residual stream is then made contiguous, or every later op on it would copy.
        return self.pos_drop(tokens).contiguous(), grid

    def _blocks(self, x: torch.Tensor, grid: Tuple[int, int]):
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

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, 1 + N, width), class token first."""
        x, grid = self._embed(x)
        for _, x in self._blocks(x, grid):
            pass
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Normalised tokens (B, 1 + N, width) -> logits (B, num_classes) from the class token."""
        x = self.head_drop(tokens[:, 0])
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes), or (B, width) when num_classes == 0."""
        return self.forward_head(self.forward_tokens(x))

    # ------------------------------------------------------------ features
    def parse_feature_names(self, names: Sequence[str]) -> Dict[str, Tuple[str, List[int]]]:
        """Validate names; map each to (kind, block indices) with kind in
        CLS / POOL / BLK / MAP. Raises ValueError naming an unknown or out-of-range name."""
        if not names:
            raise ValueError(f"no feature names given; valid names: {FEATURE_NAMES_HELP}")
        parsed: Dict[str, Tuple[str, List[int]]] = {}
        last = self.depth - 1
        for name in names:
            if not isinstance(name, str) or not _FEATURE_RE.match(name):
                raise ValueError(f"unknown feature name {name!r}; valid names: {FEATURE_NAMES_HELP}")
            kind = re.sub(r"^(last|blk|concat)|\d+$", "", name)
            number = int(re.sub(r"^\D+", "", name) or -1)
            if name.startswith("last"):
                blocks = [last]
            elif name.startswith("blk"):
                if not 0 <= number <= last:
                    raise ValueError(f"feature {name!r}: block index must be in 0..{last}")
                blocks = [number]
            else:
                if not 1 <= number <= self.depth:
                    raise ValueError(f"feature {name!r}: the number of blocks must be in 1..{self.depth}")
                blocks = list(range(self.depth - number, self.depth))
            parsed[name] = (kind, blocks)
        return parsed

    def forward_features(self, x: torch.Tensor, names: Sequence[str]) -> List[torch.Tensor]:
        """Named features of images (B, C, H, W), in the order of `names`.

        Every feature is taken from a block's output after the final norm:
        - ``lastCLS`` (B, width): class token of the last block.
        - ``blkCLS{i}`` (B, width): class token after block i. Blocks before the
          class token joins (GPSA blocks) have none; their "CLS" is the mean of
          their patch tokens, the global summary they carry.
        - ``concatCLS{n}`` (B, n * width): blkCLS of the last n blocks, concatenated.
        - ``lastPOOL`` / ``blkPOOL{i}`` (B, width): mean of the patch tokens.
        - ``concatPOOL{n}`` (B, n * width): blkPOOL of the last n blocks, concatenated.
        - ``lastBLK`` (B, 1 + N, width): all tokens of the last block, class token first.
        - ``lastMAP`` (B, width, H, W): patch tokens of the last block as a feature map.
        """
        parsed = self.parse_feature_names(names)
        wanted = {b for _, blocks in parsed.values() for b in blocks}
        stop = max(wanted)
        normed: Dict[int, torch.Tensor] = {}
        x, grid = self._embed(x)
        for i, x in self._blocks(x, grid):
            if i in wanted:
                normed[i] = self.norm(x)
            if i == stop:
                break

        def patches(i: int) -> torch.Tensor:
            t = normed[i]
            return t if i < self.num_gpsa_layers else t[:, 1:]

        def cls(i: int) -> torch.Tensor:
            return patches(i).mean(dim=1) if i < self.num_gpsa_layers else normed[i][:, 0]

        out = []
        for name in names:
            kind, blocks = parsed[name]
            if kind == "CLS":
                out.append(torch.cat([cls(i) for i in blocks], dim=-1))
            elif kind == "POOL":
                out.append(torch.cat([patches(i).mean(dim=1) for i in blocks], dim=-1))
            elif kind == "BLK":
                out.append(normed[blocks[0]])
            else:  # MAP
                t = patches(blocks[0])
                out.append(t.transpose(1, 2).reshape(t.shape[0], -1, *grid))
        return out


def _check_config(
    img_hw: Tuple[int, int],
    patch_size: int,
    width: int,
    num_heads: int,
    depth: int,
    num_gpsa_layers: int,
    num_classes: int,
    rates: Dict[str, float],
) -> None:
    if patch_size <= 0 or img_hw[0] % patch_size or img_hw[1] % patch_size:
        raise ValueError(
            f"image size {img_hw[0]}x{img_hw[1]} is not divisible by the patch size {patch_size}"
        )
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
