"""Convolutional pixel encoders and decoders (taming / LDM layout).

Parameter names follow taming-transformers and LDM (`down.{i}.block.{j}`, `up.{i}.attn.{j}`,
`mid.block_1`, ...), which the KL family, LlamaGen's VQGAN and DualToken's pixel decoder share, so
released weights load strictly. Attention placement is given per level index (level 0 is full
resolution).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _run(block: nn.Module, h: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """block(h), recomputed in backward instead of keeping its activations when checkpointing
    (training with grad only)."""
    if checkpointing and block.training and torch.is_grad_enabled():
        return checkpoint(block, h, use_reentrant=False)
    return block(h)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that, under autocast with a half-precision input, normalises in that precision
    (the kernel accumulates its statistics in fp32) instead of autocast's fp32 upcast on CUDA. The next
    convolution casts to bf16 anyway, so the upcast only cost an fp32 copy of every activation in each
    direction (the largest tensors of the pixel decoder); the result differs by bf16 rounding. Without
    autocast, or with an fp32 input, it is nn.GroupNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> the same shape and dtype, normalised per group of C / num_groups channels."""
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)
        return super().forward(x)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """LDM / taming ResnetBlock: GroupNorm-SiLU-conv twice with dropout, plus a 1x1 shortcut when the
    channel count changes; (B, in_channels, h, w) -> (B, out_channels, h, w)."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, dropout: float = 0.0,
                 first_kernel: int = 3):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        # first_kernel=1: DualToken's PostQuantResnetBlock (a 1x1 conv1 on the wide tower features)
        self.conv1 = nn.Conv2d(in_channels, out_channels, first_kernel, padding=first_kernel // 2)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, h, w) -> (B, out_channels, h, w)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (LDM's AttnBlock)."""

    def __init__(self, channels: int, *, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w) -> x + attention over the h*w positions, the same shape."""
        b, c, h, w = x.shape
        y = self.norm(x)
        # contiguous (B, 1, HW, C) so SDPA takes its fused CPU kernel, not the generic fallback
        q, k, v = (m(y).flatten(2).transpose(1, 2).unsqueeze(1).contiguous() for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale C^-1/2 as in LDM
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after LDM's asymmetric (0, 1, 0, 1) padding: (B, C, h, w) -> (B, C, h/2, w/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w) -> (B, C, h/2, w/2)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM's asymmetric padding


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling then a 3x3 conv: (B, C, h, w) -> (B, C, 2h, 2w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w) -> (B, C, 2h, 2w)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: res-blocks (`block`, LlamaGen: `res`), `attn` after each block where
    enabled, then a resampler registered under `name`."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: Optional[nn.Module], name: str,
                 blocks_name: str = "block"):
        super().__init__()
        self.add_module(blocks_name, nn.ModuleList(blocks))
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            self.add_module(name, resample)
        self._blocks_name = blocks_name
        self._resample_name = name if resample is not None else None
        self.checkpointing = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(getattr(self, self._blocks_name)):
            h = _run(block, h, self.checkpointing)
            if len(self.attn):
                h = _run(self.attn[i], h, self.checkpointing)
        if self._resample_name:
            h = _run(getattr(self, self._resample_name), h, self.checkpointing)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, *, groups: int, dropout: float, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups=groups, dropout=dropout)
        if attention:
            self.attn_1 = AttnBlock(channels, groups=groups)
        self.block_2 = ResnetBlock(channels, channels, groups=groups, dropout=dropout)
        self.checkpointing = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = _run(self.block_1, h, self.checkpointing)
        if hasattr(self, "attn_1"):
            h = _run(self.attn_1, h, self.checkpointing)
        return _run(self.block_2, h, self.checkpointing)


class Encoder(nn.Module):
    """LDM's conv encoder (`down.{i}.block.{j}`, `down.{i}.attn.{j}`, `mid`): (B, in_channels, H, W) ->
    (B, out_channels, H/2^(L-1), W/2^(L-1)); attention at the levels in `attn_levels` (0 = full resolution)."""

    def __init__(self, *, in_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_levels: Sequence[int], out_channels: int, groups: int, dropout: float, mid_attention: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels, c_in = [], ch
        for i, mult in enumerate(ch_mult):
            c_out = ch * mult
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, groups=groups, dropout=dropout)
                      for j in range(num_res_blocks)]
            attns = [AttnBlock(c_out, groups=groups) for _ in range(num_res_blocks)] if i in attn_levels else []
            down = Downsample(c_out) if i != len(ch_mult) - 1 else None
            levels.append(_Level(blocks, attns, down, "downsample"))
            c_in = c_out
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(c_in, groups=groups, dropout=dropout, attention=mid_attention)
        self.norm_out = _norm(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, H, W) -> (B, out_channels, H/2^(L-1), W/2^(L-1))."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """LDM's conv decoder (`up.{i}` with `up.0` at full resolution, run from the last): (B, z_channels, h, w)
    -> (B, out_channels, h*2^(L-1), w*2^(L-1)), unclamped."""

    def __init__(self, *, z_channels: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_levels: Sequence[int], out_channels: int, groups: int, dropout: float, mid_attention: bool):
        super().__init__()
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in, groups=groups, dropout=dropout, attention=mid_attention)
        levels: list[nn.Module] = [None] * len(ch_mult)  # type: ignore[list-item]
        for i in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[i]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, groups=groups, dropout=dropout)
                      for j in range(num_res_blocks + 1)]
            attns = [AttnBlock(c_out, groups=groups) for _ in range(num_res_blocks + 1)] if i in attn_levels else []
            levels[i] = _Level(blocks, attns, Upsample(c_out) if i != 0 else None, "upsample")
            c_in = c_out
        self.up = nn.ModuleList(levels)  # up[0] is the full-resolution level; run from the last
        self.norm_out = _norm(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    @property
    def grad_checkpointing(self) -> bool:
        """Training recomputes every res-block, attention block and upsampler in backward instead of
        keeping their activations (same outputs and gradients, less memory, ~1 more forward)."""
        return self.mid.checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, on: bool) -> None:
        """Turn the recomputation of every res-block, attention block and upsampler on or off."""
        for part in (self.mid, *self.up):
            part.checkpointing = bool(on)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, z_channels, h, w) -> unclamped (B, out_channels, h*2^(L-1), w*2^(L-1))."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight used by the adaptive GAN weight (gradient-norm ratio)."""
        return self.conv_out.weight


def attn_levels_for(resolution: int, ch_mult: Sequence[int], attn_resolutions: Sequence[int]) -> tuple[int, ...]:
    """taming's `attn_resolutions` (feature-map sizes) -> level indices, level 0 at `resolution`."""
    return tuple(i for i in range(len(ch_mult)) if resolution // 2 ** i in set(attn_resolutions))
