"""Attention projection between a tower's width and a small code dimension (DualToken's
`AttnProjection`, songweii/DualToken modeling_rqvaesiglip.py; UniTok-style).

Down (width -> code dim): `y = Linear(LN3(x)) + Attn(LN1(x))`, where q/k/v keep the wide dimension
split into `width / code_dim` heads of `code_dim` channels and the heads are averaged; then
`y + GeGLU(LN2(y))`, the GeGLU MLP opening with its own LayerNorm (eps 1e-6). Up (code dim ->
width): the same with q/k/v projected up and the heads concatenated. The key projection has no
bias. `causal=True` attends in raster order (DualToken's post-quantisation projections), so a
token's feature depends only on the codes before it. The linear path, the attention path and the
MLP each have their own LayerNorm (eps 1e-5), exactly as the official module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeGluMlp(nn.Module):
    """LN (eps 1e-6) -> tanh-GELU(gate) * value -> out; the official `GeGluMlp` (w0, w1, w2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.gate = nn.Linear(dim, hidden)
        self.value = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim)."""
        x = self.norm(x)
        return self.out(F.gelu(self.gate(x), approximate="tanh") * self.value(x))


class ProjectionAttention(nn.Module):
    """The official projection's attention: heads = wide / narrow of width narrow, q and v biases (no k
    bias); reducing heads are averaged, expanding heads concatenated. (B, N, in_dim) -> (B, N, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, *, causal: bool = False):
        super().__init__()
        wide, narrow = max(in_dim, out_dim), min(in_dim, out_dim)
        if wide % narrow:
            raise ValueError(f"attention projection needs one dimension to divide the other, got {in_dim} -> {out_dim}")
        self.num_heads, self.head_dim, self.causal = wide // narrow, narrow, causal
        self.reduce_heads = in_dim > out_dim
        self.qkv = nn.Linear(in_dim, 3 * wide, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(wide))
        self.v_bias = nn.Parameter(torch.zeros(wide))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, in_dim) -> (B, N, out_dim); raster-causal when `causal`."""
        b, n, _ = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, heads, N, head_dim)
        y = y.mean(1) if self.reduce_heads else y.transpose(1, 2).reshape(b, n, -1)
        return self.proj(y)


class AttentionProjection(nn.Module):
    """(B, N, in_dim) -> (B, N, out_dim); see the module docstring."""

    def __init__(self, *, in_dim: int, out_dim: int, causal: bool = False, mlp_ratio: float = 2.0):
        super().__init__()
        self.attn_norm = nn.LayerNorm(in_dim)  # official norm1
        self.attn = ProjectionAttention(in_dim, out_dim, causal=causal)
        self.linear_norm = nn.LayerNorm(in_dim)  # official norm3
        self.linear = nn.Linear(in_dim, out_dim)  # official proj
        self.mlp_norm = nn.LayerNorm(out_dim)  # official norm2
        self.mlp = GeGluMlp(out_dim, int(out_dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, in_dim) -> (B, N, out_dim)."""
        y = self.linear(self.linear_norm(x)) + self.attn(self.attn_norm(x))
        return y + self.mlp(self.mlp_norm(y))


def make_projection(kind: str, *, in_dim: int, out_dim: int, causal: bool = False) -> nn.Module:
    """A DualToken projection: "attention" (the official code's `AttentionProjection`) or "linear";
    (B, N, in_dim) -> (B, N, out_dim). Raises ValueError for another kind."""
    if kind == "attention":
        return AttentionProjection(in_dim=in_dim, out_dim=out_dim, causal=causal)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    raise ValueError(f"projection must be 'attention' or 'linear', got {kind!r}")
