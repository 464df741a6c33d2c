"""KL family: the LDM-style AutoencoderKL that MAR's KL-16 tokenizer is (continuous tokens).

Parameter names follow LDM / MAR (`encoder.down.{i}.block.{j}...`, `decoder.up.{i}...`) so released
`kl16.ckpt` weights load strictly. Attention placement is given per level index (level 0 is full
resolution): MAR KL-16 has encoder attention at level 4 and none in the decoder's up levels; LDM
kl-f16 (`attn_resolutions=[16]` at 256 px) also has it at decoder level 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..images import PreprocessConfig
from ..rng import randn
from .base import TokenizerEncoding, VisualTokenizer, register_tokenizer


@dataclass
class DiagonalGaussian:
    """The posterior q(z|x): diagonal Gaussian with log-variance clamped to [-30, 20] as in LDM/MAR."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        noise = randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over (C, H, W): one value per sample."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.sum(math.log(2 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=(1, 2, 3))


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        b, c, h, w = x.shape
        y = self.norm(x)
        # contiguous (B, 1, HW, C) so SDPA takes its fused CPU kernel, not the generic fallback
        q, k, v = (m(y).flatten(2).transpose(1, 2).unsqueeze(1).contiguous() for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale C^-1/2 as in LDM
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` res-blocks, `attn` after each block where enabled, then a resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: Optional[nn.Module], name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            self.add_module(name, resample)
        self._resample_name = name if resample is not None else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self._resample_name:
            h = getattr(self, self._resample_name)(h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, *, groups: int, dropout: float, attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups=groups, dropout=dropout)
        if attention:
            self.attn_1 = AttnBlock(channels, groups=groups)
        self.block_2 = ResnetBlock(channels, channels, groups=groups, dropout=dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.block_1(h)
        if hasattr(self, "attn_1"):
            h = self.attn_1(h)
        return self.block_2(h)


class Encoder(nn.Module):
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
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
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

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight used by the adaptive GAN weight (gradient-norm ratio)."""
        return self.conv_out.weight


@dataclass
class KLForwardOutput:
    reconstruction: torch.Tensor  # unclamped decoder output
    posterior: DiagonalGaussian


@register_tokenizer
class KLTokenizer(VisualTokenizer):
    """Continuous-token VAE (LDM AutoencoderKL layout). Defaults are MAR KL-16: stride 16, 16 channels,
    latents scaled by 0.2325 (= 1 / std of the raw latents over ImageNet train)."""

    family = "kl"
    default_preprocess = {"image_size": 256, "crop": "adm"}  # MAR: ADM center crop to 256
    #: Run the convolutions on channels-last activations: oneDNN's fast path on CPU (mar-kl16, batch 4,
    #: 256 px: about 2.3x faster in bf16 autocast and 1.2x in fp32). None = on for CPU tensors only.
    #: A runtime setting, not part of the saved config; outputs are returned contiguous either way.
    channels_last: Optional[bool] = None

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        encoder_attn_levels: Sequence[int] = (4,),
        decoder_attn_levels: Sequence[int] = (),
        mid_attention: bool = True,
        z_channels: int = 16,
        embed_dim: int = 16,
        norm_groups: int = 32,
        dropout: float = 0.0,
        scaling_factor: float = 0.2325,
        sample_latents: bool = False,
        preprocess: Optional[dict] = None,
    ):
        super().__init__()
        n = len(ch_mult)
        for name, levels in (("encoder_attn_levels", encoder_attn_levels), ("decoder_attn_levels", decoder_attn_levels)):
            bad = [lv for lv in levels if not 0 <= lv < n]
            if bad:
                raise ValueError(f"{name} {list(levels)} outside the {n} levels of ch_mult")
        for c in [ch * m for m in ch_mult]:
            if c % norm_groups:
                raise ValueError(f"channel count {c} is not divisible by norm_groups={norm_groups}")
        self.embed_dim = embed_dim
        self._scaling_factor = float(scaling_factor)
        self.sample_latents = sample_latents
        self._stride = 2 ** (n - 1)
        common = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, groups=norm_groups,
                      dropout=dropout, mid_attention=mid_attention)
        self.encoder = Encoder(in_channels=in_channels, attn_levels=tuple(encoder_attn_levels),
                               out_channels=2 * z_channels, **common)
        self.decoder = Decoder(z_channels=z_channels, attn_levels=tuple(decoder_attn_levels),
                               out_channels=out_channels, **common)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        pp = PreprocessConfig.from_any(preprocess, **self.default_preprocess)
        if pp.mean != (0.5, 0.5, 0.5) or pp.std != (0.5, 0.5, 0.5):
            raise ValueError("KLTokenizer works on [-1, 1] pixels: preprocess mean/std must be 0.5, "
                             f"got mean {pp.mean}, std {pp.std}")

    @property
    def stride(self) -> int:
        return self._stride

    @property
    def scaling_factor(self) -> float:
        return self._scaling_factor

    # ---------------------------------------------------------------- raw (unscaled) paths
    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        use = self.channels_last if self.channels_last is not None else x.device.type == "cpu"
        return x.contiguous(memory_format=torch.channels_last) if use else x

    def encode_posterior(self, pixels: torch.Tensor) -> DiagonalGaussian:
        moments = self.quant_conv(self.encoder(self._layout(pixels))).contiguous()
        return DiagonalGaussian.from_moments(moments)

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output for raw (unscaled) latents, unclamped: what training losses see."""
        return self.decoder(self.post_quant_conv(self._layout(z))).contiguous()

    def forward(self, pixels: torch.Tensor, *, sample_posterior: bool = True,
                generator: Optional[torch.Generator] = None) -> KLForwardOutput:
        posterior = self.encode_posterior(pixels)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return KLForwardOutput(self.decode_unscaled(z), posterior)

    # ---------------------------------------------------------------- public API
    def encode(self, pixels: torch.Tensor, *, sample: Optional[bool] = None,
               generator: Optional[torch.Generator] = None) -> TokenizerEncoding:
        """`latent_dist` is the unscaled posterior; `latents` = scaling_factor x (sample or mean).
        `sample` defaults to the config's `sample_latents` (False: the mean, deterministic)."""
        self.validate_pixels(pixels)
        posterior = self.encode_posterior(pixels.to(self.decoder.conv_out.weight.dtype))
        use_sample = self.sample_latents if sample is None else sample
        z = posterior.sample(generator) if use_sample else posterior.mode()
        return TokenizerEncoding(grid=self.grid_for(*pixels.shape[-2:]), latent_dist=posterior,
                                 latents=z * self.scaling_factor)

    def decode(self, *, ids: Optional[dict] = None, latents: Optional[torch.Tensor] = None,
               clamp: bool = True) -> torch.Tensor:
        """Scaled latents (B, embed_dim, h, w) -> images in [-1, 1] (clamped unless `clamp=False`)."""
        if ids is not None:
            raise ValueError("the KL tokenizer is continuous: decode(latents=...) takes latents, not ids")
        latents = self.validate_latents(latents).to(self.decoder.conv_out.weight.dtype)
        images = self.decode_unscaled(latents / self.scaling_factor)
        return images.clamp(-1, 1) if clamp else images

    def validate_latents(self, latents) -> torch.Tensor:
        if latents is None:
            raise ValueError("decode needs latents=(B, C, h, w)")
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != self.embed_dim:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"expected latents of shape (B, {self.embed_dim}, h, w), got {shape}")
        if not latents.is_floating_point():
            raise ValueError(f"expected float latents, got dtype {latents.dtype}")
        return latents

    @staticmethod
    def patchify(latents: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
        """(B, C, h, w) -> (B, h*w/p^2, C*p^2) tokens in MAR's order (channel, then row, column in patch)."""
        b, c, h, w = latents.shape
        p = patch_size
        if h % p or w % p:
            raise ValueError(f"latent grid {h}x{w} is not divisible by patch_size {p}")
        x = latents.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwcpq", x).reshape(b, (h // p) * (w // p), c * p * p)

    @staticmethod
    def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch_size: int = 1) -> torch.Tensor:
        """Inverse of `patchify`; `grid` is the token grid (h/p, w/p)."""
        b, n, d = tokens.shape
        gh, gw = grid
        p = patch_size
        if n != gh * gw or d % (p * p):
            raise ValueError(f"cannot unpatchify tokens {tuple(tokens.shape)} onto grid {grid} with patch {p}")
        c = d // (p * p)
        x = tokens.reshape(b, gh, gw, c, p, p)
        return torch.einsum("nhwcpq->nchpwq", x).reshape(b, c, gh * p, gw * p)
