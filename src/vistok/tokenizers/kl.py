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
from torch import nn

from ..images import PreprocessConfig
from ..rng import randn
from .base import TokenizerEncoding, VisualTokenizer, register_tokenizer
from .decoders import Decoder, Encoder


@dataclass
class DiagonalGaussian:
    """The posterior q(z|x): diagonal Gaussian with log-variance clamped to [-30, 20] as in LDM/MAR."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """(B, 2C, h, w) encoder moments -> mean and log-variance (clamped to [-30, 20]), split on dim 1."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        """exp(logvar / 2), the same shape as `mean`."""
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        """exp(logvar), the same shape as `mean`."""
        return torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """mean + std * N(0, I) noise drawn with `generator` (on its device, then moved): unscaled latents."""
        noise = randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The mean: the deterministic latent (unscaled)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over (C, H, W): one value per sample."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=(1, 2, 3))

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Gaussian negative log-likelihood of `sample` (B, C, h, w), summed over (C, h, w): one value per sample."""
        return 0.5 * torch.sum(math.log(2 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=(1, 2, 3))


@dataclass
class KLForwardOutput:
    """What the training forward gives the KL loss: the unclamped reconstruction and the posterior."""

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
        if not math.isfinite(scaling_factor) or scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be a positive finite number (latents are divided by it), "
                             f"got {scaling_factor}")
        if norm_groups < 1:
            raise ValueError(f"norm_groups must be >= 1, got {norm_groups}")
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
        """Pixels per latent position: 2^(len(ch_mult) - 1) (16 for MAR KL-16)."""
        return self._stride

    @property
    def scaling_factor(self) -> float:
        """The latent scale (MAR KL-16: 0.2325): `latents = scaling_factor * z`."""
        return self._scaling_factor

    # ---------------------------------------------------------------- raw (unscaled) paths
    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        use = self.channels_last if self.channels_last is not None else x.device.type == "cpu"
        return x.contiguous(memory_format=torch.channels_last) if use else x

    def encode_posterior(self, pixels: torch.Tensor) -> DiagonalGaussian:
        """(B, 3, H, W) in [-1, 1] -> the unscaled posterior over (B, embed_dim, H/stride, W/stride), no checks."""
        moments = self.quant_conv(self.encoder(self._layout(pixels))).contiguous()
        return DiagonalGaussian.from_moments(moments)

    def decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output for raw (unscaled) latents, unclamped: what training losses see."""
        return self.decoder(self.post_quant_conv(self._layout(z))).contiguous()

    def forward(self, pixels: torch.Tensor, *, sample_posterior: bool = True,
                generator: Optional[torch.Generator] = None) -> KLForwardOutput:
        """Training forward: the posterior of pixels (B, 3, H, W) in [-1, 1], and the unclamped decoder output
        of a sample (sample_posterior=True, drawn with `generator`) or of its mean."""
        posterior = self.encode_posterior(pixels)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return KLForwardOutput(self.decode_unscaled(z), posterior)

    # ---------------------------------------------------------------- public API
    def encode(self, pixels: torch.Tensor, *, sample: Optional[bool] = None,
               generator: Optional[torch.Generator] = None) -> TokenizerEncoding:
        """(B, 3, H, W) float in [-1, 1], H and W multiples of the stride -> `latent_dist` (the unscaled
        posterior) and `latents` (B, embed_dim, H/stride, W/stride) = scaling_factor * (sample or mean).
        `sample` defaults to the config's `sample_latents` (False: the mean, deterministic); `generator` makes
        samples reproducible. LDM AutoencoderKL as MAR's KL-16 (LTH14/mar)."""
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
        """Latents must be a float (B, embed_dim, h, w) tensor; ValueError naming the expected shape or dtype."""
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
