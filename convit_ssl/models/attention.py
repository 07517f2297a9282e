"""Gated positional self-attention (GPSA) and multi-head self-attention (MHSA).

Parameter names are those of timm's ConViT (and the official release), so
their state dicts load into these modules unchanged.

GPSA, per head h, for patch tokens x of shape (B, N, C) on an (H, W) grid:

    A = (1 - g_h) softmax(Q K^T / sqrt(d)) + g_h softmax(P_h),   g_h = sigmoid(gating_param[h])
    P_h[i, j] = pos_proj(r_ij)[h],   r_ij = [dx, dy, dx^2 + dy^2]  (see geometry.py)

The positional term does not depend on the image, so it is computed once per
forward as an (heads, N, N) tensor, and the output is formed without
materialising A per image:

    A V = (1 - g) SDPA(Q, K, V) + g softmax(P) V

which is exact whenever attention dropout is off; softmax(P) V is one
(N, N) x (N, B * d) matrix product per head for the whole batch. The explicit path (A built,
renormalised and dropped out, as in the paper's code) is used when attention
dropout is active and by `attention_maps`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from convit_ssl.models.geometry import relative_offsets


def _split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C // heads)."""
    b, n, c = t.shape
    return t.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V for (B, heads, N, d) inputs.

    `scaled_dot_product_attention`, except in half precision on the CPU
    (bf16/fp16, as under autocast) without dropout: there PyTorch's CPU
    flash-attention kernel takes 2x (forward) to 2.6x (forward + backward) the
    time of the explicit product (ConViT-Ti shapes, 2 threads), while in fp32
    the two are on par and on GPUs the fused kernels win.
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and dropout_p == 0.0:
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class GPSA(nn.Module):
    """Gated positional self-attention over patch tokens (no class token)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        locality_strength: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dim = dim
        self.scale = (dim // num_heads) ** -0.5
        self.locality_strength = locality_strength
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gating_param = nn.Parameter(torch.ones(num_heads))

    @torch.no_grad()
    def local_init(self) -> None:
        """Convolutional init: value = identity, head h attends around offset (dx_h, dy_h).

        Heads are laid on a k x k grid, k = floor(sqrt(heads)), centred on the
        query; the score of head h for offset delta is
        alpha * (2 delta . Delta_h - |delta|^2) = -alpha |delta - Delta_h|^2 + const.
        Heads beyond k^2 keep their random init (as in the official code).
        """
        self.v.weight.copy_(torch.eye(self.dim))
        k = int(math.isqrt(self.num_heads))
        centre = (k - 1) / 2 if k % 2 == 0 else k // 2
        for h1 in range(k):
            for h2 in range(k):
                head = h1 + k * h2
                self.pos_proj.weight[head, 0] = 2 * (h2 - centre)
                self.pos_proj.weight[head, 1] = 2 * (h1 - centre)
                self.pos_proj.weight[head, 2] = -1
        self.pos_proj.weight.mul_(self.locality_strength)

    def gate(self) -> torch.Tensor:
        """(heads,) weight sigmoid(lambda_h) of the positional attention."""
        return torch.sigmoid(self.gating_param)

    def positional_attention(self, grid: tuple[int, int]) -> torch.Tensor:
        """(heads, N, N) softmax of the positional scores for an (H, W) grid.

        Probabilities below the smallest normal float are set to zero: they
        carry no visible mass, and denormal arithmetic is many times slower on
        x86 CPUs (after the local init most of this matrix would be denormal).
        """
        rel = relative_offsets(grid, self.pos_proj.weight.device, self.pos_proj.weight.dtype)
        scores = self.pos_proj(rel).permute(2, 0, 1)
        probs = scores.softmax(dim=-1)
        return probs.masked_fill(probs < torch.finfo(probs.dtype).tiny, 0.0)

    def content_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, N) softmax(Q K^T / sqrt(d)) for tokens (B, N, C)."""
        q, k = self.qk(x).chunk(2, dim=-1)
        q, k = _split_heads(q, self.num_heads), _split_heads(k, self.num_heads)
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)

    def attention_maps(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, heads, N, N) gated attention matrix, each row renormalised to sum 1."""
        gate = self.gate().view(1, -1, 1, 1)
        attn = (1.0 - gate) * self.content_attention(x) + gate * self.positional_attention(grid)
        return attn / attn.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens (B, N, C) on an (H, W) grid, N = H * W -> (B, N, C)."""
        b, n, c = x.shape
        if n != grid[0] * grid[1]:
            raise ValueError(f"GPSA got {n} tokens for a {grid[0]}x{grid[1]} grid")
        if self.training and self.attn_drop.p > 0:
            v = _split_heads(self.v(x), self.num_heads)
            out = _merge_heads(self.attn_drop(self.attention_maps(x, grid)) @ v)
        else:
            out = self._fused(x, grid).reshape(b, n, c)
        return self.proj_drop(self.proj(out))

    def _fused(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N, heads, d) = lerp(SDPA(Q, K, V), softmax(P) V, gate), without any (B, heads, N, N) tensor.

        One projection gives Q, K and V (the qk and v weights side by side); the
        positional term is one (N, N) x (N, B * d) product per head over the whole batch.
        """
        b, n, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        bias = None if self.qk.bias is None else torch.cat([self.qk.bias, self.v.bias])
        qkv = F.linear(x, torch.cat([self.qk.weight, self.v.weight]), bias).view(b, n, 3, heads, d)
        q, k, v = qkv.unbind(2)  # each (B, N, heads, d)
        content = softmax_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        values = v.permute(2, 1, 0, 3).reshape(heads, n, b * d)
        positional = torch.bmm(self.positional_attention(grid), values).view(heads, n, b, d)
        gate = self.gate().to(content.dtype).view(heads, 1)  # autocast: lerp wants one dtype
        return torch.lerp(content.transpose(1, 2), positional.permute(2, 1, 0, 3), gate)


class MHSA(nn.Module):
    """Multi-head self-attention (timm's ConViT `MHSA` names: qkv, proj)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return tuple(_split_heads(t, self.num_heads) for t in (q, k, v))  # type: ignore[return-value]

    def attention_maps(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, heads, N, N) attention matrix for tokens (B, N, C)."""
        q, k, _ = self._qkv(x)
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Tokens (B, N, C) -> (B, N, C); `grid` is accepted for a uniform block interface."""
        q, k, v = self._qkv(x)
        drop = self.attn_drop.p if self.training else 0.0
        out = softmax_attention(q, k, v, dropout_p=drop)
        return self.proj_drop(self.proj(_merge_heads(out)))
