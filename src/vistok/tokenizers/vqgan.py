"""VQGAN family: LlamaGen's VQ tokenizer (VQ-16: stride 16, 16384 x 8 codebook), which TokLIP
keeps frozen and Janus reuses.

Parameter names follow LlamaGen (`encoder.conv_blocks.{L}.res.{j}`, `.attn.{j}`, `mid.{0,1,2}`,
`quantize.embedding`, `quant_conv`, `post_quant_conv`) so released `vq_ds16_*.pt` weights load
strictly. The decoder's `conv_blocks.0` is its *lowest* resolution (reversed against LDM's
`up.{L}`); attention sits only at the lowest resolution (encoder's last level, decoder's first).
The building blocks are the taming/LDM ones shared with the other families (`decoders.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..images import PreprocessConfig
from .base import CodebookSpec, TokenizerEncoding, VisualTokenizer, register_tokenizer
from .decoders import AttnBlock, Downsample, ResnetBlock, Upsample, _Level, _norm
from .search import nearest_code, resolve_score_dtype


def _mid(channels: int, groups: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(channels, channels, groups=groups, dropout=dropout),
                          AttnBlock(channels, groups=groups),
                          ResnetBlock(channels, channels, groups=groups, dropout=dropout)])


class VQEncoder(nn.Module):
    """LlamaGen's VQ encoder: (B, 3, H, W) -> (B, z_channels, H/2^(L-1), W/2^(L-1)); attention at the last level."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, groups: int,
                 dropout: float):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        levels, c_in = [], ch
        for i, mult in enumerate(ch_mult):
            c_out = ch * mult
            res = [ResnetBlock(c_in if j == 0 else c_out, c_out, groups=groups, dropout=dropout)
                   for j in range(num_res_blocks)]
            last = i == len(ch_mult) - 1
            attn = [AttnBlock(c_out, groups=groups) for _ in range(num_res_blocks)] if last else []
            levels.append(_Level(res, attn, None if last else Downsample(c_out), "downsample", blocks_name="res"))
            c_in = c_out
        self.conv_blocks = nn.ModuleList(levels)
        self.mid = _mid(c_in, groups, dropout)
        self.norm_out = _norm(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) -> pre-quantization features (B, z_channels, h, w)."""
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQDecoder(nn.Module):
    """LlamaGen's VQ decoder (conv_blocks.0 = lowest resolution, attention there only)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, groups: int,
                 dropout: float):
        super().__init__()
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = _mid(c_in, groups, dropout)
        levels = []
        for i, mult in enumerate(reversed(ch_mult)):  # level 0 = lowest resolution
            c_out = ch * mult
            res = [ResnetBlock(c_in if j == 0 else c_out, c_out, groups=groups, dropout=dropout)
                   for j in range(num_res_blocks + 1)]
            attn = [AttnBlock(c_out, groups=groups) for _ in range(num_res_blocks + 1)] if i == 0 else []
            last = i == len(ch_mult) - 1
            levels.append(_Level(res, attn, None if last else Upsample(c_out), "upsample", blocks_name="res"))
            c_in = c_out
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = _norm(c_in, groups)
        self.conv_out = nn.Conv2d(c_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Features (B, z_channels, h, w) -> unclamped images (B, 3, H, W)."""
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer(self) -> torch.Tensor:
        """The output convolution's weight: the adaptive GAN weight's reference layer."""
        return self.conv_out.weight


@dataclass
class VQOutput:
    """What `L2VectorQuantizer.forward` returns."""

    quantized: torch.Tensor  # (B, C, h, w), straight-through
    ids: torch.Tensor  # (B, h, w)
    codebook_loss: torch.Tensor  # mean((z_q - sg z)^2): trains the codebook
    commitment_loss: torch.Tensor  # beta * mean((sg z_q - z)^2)
    entropy_loss: torch.Tensor  # ratio * (mean per-sample entropy - entropy of the mean)


class L2VectorQuantizer(nn.Module):
    """LlamaGen's VectorQuantizer: L2-normalised z and codebook (nearest = highest cosine), codebook
    learned by gradient (no EMA), commitment beta, optional entropy loss, straight-through estimator
    in the normalised space, and `codebook_used` (a rolling window of recent ids, for usage).
    search_chunk_size / search_dtype: the nearest-code search (`search.nearest_code`); the ids are
    the fp32 search's either way."""

    def __init__(self, *, codebook_size: int, dim: int, l2_norm: bool = True, beta: float = 0.25,
                 entropy_loss_ratio: float = 0.0, entropy_temperature: float = 0.01, usage_window: int = 65536,
                 search_chunk_size: Optional[int] = None, search_dtype: str = "auto"):
        super().__init__()
        resolve_score_dtype(search_dtype, torch.device("cpu"))  # validates
        self.search_chunk_size, self.search_dtype = search_chunk_size, search_dtype
        self.codebook_size, self.dim, self.l2_norm = codebook_size, dim, l2_norm
        self.beta, self.entropy_loss_ratio, self.entropy_temperature = beta, entropy_loss_ratio, entropy_temperature
        self.embedding = nn.Embedding(codebook_size, dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.register_buffer("codebook_used", torch.zeros(usage_window))

    def codebook(self) -> torch.Tensor:
        """The code vectors (codebook_size, dim), L2-normalised when `l2_norm`."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def nearest(self, z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """z (N, dim), codebook (K, dim) -> ids (N,): LlamaGen's argmin of ||z||^2 + ||e||^2 - 2 z.e,
        by `search.nearest_code` (chunked GEMMs, fast dtype on CUDA, the fp32 argmin's ids)."""
        return nearest_code(z, codebook, self.search_chunk_size, score_dtype=self.search_dtype)

    def forward(self, z: torch.Tensor) -> VQOutput:
        """z (B, C, h, w) -> quantized (B, C, h, w), ids (B, h, w) and the training losses."""
        b, c, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):
            flat = z.float().permute(0, 2, 3, 1).reshape(-1, c)
            if self.l2_norm:
                flat = F.normalize(flat, dim=-1)
            book = self.codebook().float()
            ids = self.nearest(flat, book)
            zq = book[ids]
            codebook_loss = F.mse_loss(zq, flat.detach())
            commitment = self.beta * F.mse_loss(zq.detach(), flat)
            entropy = flat.new_zeros(())
            if self.training and self.entropy_loss_ratio > 0:
                entropy = self.entropy_loss_ratio * self._entropy(flat, book)
            zq = flat + (zq - flat).detach()
        if self.training:
            self._track(ids)
        out = zq.to(z.dtype).view(b, h, w, c).permute(0, 3, 1, 2)
        return VQOutput(out, ids.view(b, h, w), codebook_loss, commitment, entropy)

    def _entropy(self, flat: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
        affinity = -(flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * flat @ book.T)
        probs = F.softmax(affinity / self.entropy_temperature, dim=-1)
        log_probs = F.log_softmax(affinity / self.entropy_temperature, dim=-1)
        sample_entropy = -(probs * log_probs).sum(-1).mean()
        mean_probs = probs.mean(0)
        avg_entropy = -(mean_probs * torch.log(mean_probs + 1e-5)).sum()
        return sample_entropy - avg_entropy

    @torch.no_grad()
    def _track(self, ids: torch.Tensor) -> None:
        n = min(ids.numel(), self.codebook_used.numel())
        self.codebook_used.copy_(torch.cat([self.codebook_used[n:], ids[-n:].float()]))

    def usage(self) -> float:
        """Distinct ids in the window of recent training ids over the codebook size (LlamaGen's
        measure; the window starts filled with id 0)."""
        return torch.unique(self.codebook_used).numel() / self.codebook_size

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...,) -> (normalised) code vectors (..., dim)."""
        return self.codebook()[ids]


@dataclass
class VQGANForward:
    """What the training forward gives the VQ loss: unclamped reconstruction, ids and the quantizer's losses."""

    reconstruction: torch.Tensor  # unclamped
    ids: dict[str, torch.Tensor]
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    entropy_loss: torch.Tensor


@register_tokenizer
class VQGANTokenizer(VisualTokenizer):
    """LlamaGen VQ (keyword-only; defaults = VQ-16). ch_mult sets the stride (2^(len-1))."""

    family = "vqgan"
    default_preprocess = {"image_size": 256, "crop": "adm", "interpolation": "bicubic"}

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        decoder_ch_mult: Optional[Sequence[int]] = None,
        num_res_blocks: int = 2,
        z_channels: int = 256,
        codebook_size: int = 16384,
        codebook_dim: int = 8,
        codebook_l2_norm: bool = True,
        commit_beta: float = 0.25,
        entropy_loss_ratio: float = 0.0,
        usage_window: int = 65536,
        norm_groups: int = 32,
        dropout: float = 0.0,
        preprocess: Optional[PreprocessConfig | dict] = None,
    ):
        super().__init__()
        decoder_ch_mult = tuple(decoder_ch_mult or ch_mult)
        if len(decoder_ch_mult) != len(ch_mult):
            raise ValueError("encoder and decoder must have the same number of levels (the same stride)")
        common = dict(ch=ch, num_res_blocks=num_res_blocks, z_channels=z_channels, groups=norm_groups, dropout=dropout)
        self.encoder = VQEncoder(ch_mult=tuple(ch_mult), **common)
        self.decoder = VQDecoder(ch_mult=decoder_ch_mult, **common)
        self.quant_conv = nn.Conv2d(z_channels, codebook_dim, 1)
        self.quantize = L2VectorQuantizer(codebook_size=codebook_size, dim=codebook_dim, l2_norm=codebook_l2_norm,
                                          beta=commit_beta, entropy_loss_ratio=entropy_loss_ratio,
                                          usage_window=usage_window)
        self.post_quant_conv = nn.Conv2d(codebook_dim, z_channels, 1)
        self._stride = 2 ** (len(ch_mult) - 1)

    @property
    def stride(self) -> int:
        """Pixels per token: 2^(len(ch_mult) - 1) (16 for VQ-16)."""
        return self._stride

    @property
    def codebooks(self) -> dict[str, CodebookSpec]:
        """{"vq": CodebookSpec(codebook_size, depth 1, codebook_dim, shared=True)}."""
        q = self.quantize
        return {"vq": CodebookSpec(size=q.codebook_size, depth=1, dim=q.dim, shared=True)}

    def _quantize(self, pixels: torch.Tensor) -> VQOutput:
        return self.quantize(self.quant_conv(self.encoder(pixels)))

    def _decode_quantized(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quantized))

    def forward(self, pixels: torch.Tensor) -> VQGANForward:
        """Training forward: reconstruction and the quantizer's losses (updates the usage window)."""
        q = self._quantize(self.validate_pixels(pixels))
        return VQGANForward(self._decode_quantized(q.quantized), {"vq": q.ids[..., None]}, q.codebook_loss,
                            q.commitment_loss, q.entropy_loss)

    def encode(self, pixels: torch.Tensor) -> TokenizerEncoding:
        """(B, 3, H, W) float in [-1, 1], H and W multiples of the stride -> ids {"vq": int64 (B, h, w, 1)}
        in [0, codebook_size) and quantized {"vq": (B, h*w, codebook_dim)} (unit code vectors); the usage
        window is not updated (LlamaGen `VQModel.encode`, FoundationVision/LlamaGen)."""
        pixels = self.validate_pixels(pixels)
        was = self.quantize.training
        self.quantize.eval()  # inference never touches the usage window
        try:
            q = self._quantize(pixels)
        finally:
            self.quantize.train(was)
        return TokenizerEncoding(grid=tuple(q.ids.shape[1:]), ids={"vq": q.ids[..., None]},
                                 quantized={"vq": q.quantized.flatten(2).transpose(1, 2)})

    def _check_ids(self, ids) -> torch.Tensor:
        if not isinstance(ids, dict) or "vq" not in ids:
            raise ValueError(f"ids must be a dict with a 'vq' entry (B, h, w, 1), got {type(ids).__name__}"
                             + (f" with keys {sorted(ids)}" if isinstance(ids, dict) else ""))
        x = torch.as_tensor(ids["vq"])
        if x.is_floating_point() or x.ndim != 4 or x.shape[-1] != 1:
            raise ValueError(f"ids['vq'] must be an integer (B, h, w, 1) tensor, got {x.dtype} {tuple(x.shape)}")
        if x.numel() and (x.min() < 0 or x.max() >= self.quantize.codebook_size):
            raise ValueError(f"ids out of range [0, {self.quantize.codebook_size}): "
                             f"min {int(x.min())}, max {int(x.max())}")
        return x[..., 0].to(self.quantize.embedding.weight.device).long()

    def decode(self, *, ids: Optional[dict] = None, latents=None, clamp: bool = True) -> torch.Tensor:
        """ids {"vq": integer (B, h, w, 1)} -> images (B, 3, h*stride, w*stride) in [-1, 1] (unclamped with
        clamp=False; LlamaGen's decode_code). Raises ValueError for latents, a missing "vq" entry, a wrong
        shape or ids out of range."""
        if latents is not None or ids is None:
            raise ValueError("the VQGAN decodes discrete ids: call decode(ids=enc.ids)")
        codes = self.quantize.lookup(self._check_ids(ids)).permute(0, 3, 1, 2)
        image = self._decode_quantized(codes)
        return image.clamp(-1, 1) if clamp else image

    def embed(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """ids {"vq": (B, h, w, 1)} -> (B, h*w, codebook_dim): the unit code vectors (TokLIP's input)."""
        return self.quantize.lookup(self._check_ids(ids)).flatten(1, 2)
