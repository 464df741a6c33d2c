"""MAR's transformer over KL-16 latents, the visual encoder Harmon shares between understanding and
generation (MAR: arXiv 2406.11838, LTH14/mar `models/mar.py`; Harmon: arXiv 2503.21979,
wusize/Harmon `src/models/mar/mar.py`, `src/models/harmon.py`).

`MARTransformer` holds MAR's parameters under MAR's own names (`z_proj`, `encoder_blocks.{i}`,
`decoder_pos_embed_learned`, `diffloss.net.*`, ...), so a MAR or Harmon state dict loads strictly.
`MARTokenizer` pairs it with the KL-16 VAE (`vae.*`): pixels -> scaled latents -> encoder features.

Encoder (facts checked against both official repositories):
  latents (B, C, h, w) -> raster tokens (B, h*w, C*p^2) -> `z_proj` -> `buffer_size` slots in front,
  all set to one vector (Harmon: `fake_latent`; MAR: the class embedding) -> + position embedding
  (image part bilinearly resized for another grid, buffer rows kept) -> `z_proj_ln` -> masked
  tokens dropped (raster order kept) -> timm pre-norm blocks -> `encoder_norm`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..losses.diffusion import DiffusionHead
from .base import TokenizerEncoding, VisualTokenizer, register_tokenizer
from .kl import KLTokenizer

#: Heads per width in the official factories (`mar_base`, `mar_large`, `mar_huge`); no file stores them.
#: `args.model` of a MAR checkpoint -> (width, depth, heads), from `models/mar.py`.
OFFICIAL_SIZES = {"mar_base": (768, 12, 12), "mar_large": (1024, 16, 16), "mar_huge": (1280, 20, 16)}
OFFICIAL_NUM_HEADS = {width: heads for width, _, heads in OFFICIAL_SIZES.values()}


def resize_pos_embed(pos_embed: torch.Tensor, base_grid: tuple[int, int], grid: tuple[int, int],
                     num_prefix: int) -> torch.Tensor:
    """Harmon's rule (`get_encoder_pos_embed`): the image rows of a (1, prefix + H*W, D) table, viewed
    as an H x W map, are resized bilinearly (align_corners False, no antialias) to `grid`; the
    `num_prefix` buffer rows are kept as they are."""
    if tuple(grid) == tuple(base_grid):
        return pos_embed
    prefix, image = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    d = image.shape[-1]
    image = image.reshape(1, *base_grid, d).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=tuple(grid), mode="bilinear", align_corners=False)
    return torch.cat([prefix, image.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)], dim=1)


def check_grid(grid) -> tuple[int, int]:
    """A token grid (h, w) of two positive ints, else ValueError."""
    try:
        h, w = (operator.index(g) for g in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be two positive ints (h, w), got {grid!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"grid must be two positive ints (h, w), got {grid!r}")
    return h, w


def class_label_tensor(class_labels, num_classes: int, device) -> torch.Tensor:
    """1-D integer class labels in [0, num_classes) -> int64 on `device`; bool, float, strings, other
    shapes and out-of-range labels raise ValueError."""
    try:
        labels = torch.as_tensor(class_labels, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"class_labels must be a 1-D sequence of ints, got {class_labels!r}") from None
    if labels.ndim != 1 or labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"class_labels must be a 1-D sequence of ints, got {class_labels!r}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"class labels must be in [0, {num_classes}), got {labels.tolist()}")
    return labels.long()


class MARTransformer(nn.Module):
    """MAR's encoder, decoder and diffusion head (no VAE), parameter names as `models/mar.py`.

    Blocks are timm's `Block` (pre-norm, fused qkv with bias, exact GELU, MLP ratio 4) with LayerNorm
    eps `norm_eps` (the official factories pass 1e-6; `z_proj_ln` is always 1e-6).
    """

    def __init__(self, *, grid: tuple[int, int] = (16, 16), token_dim: int = 16, encoder_embed_dim: int = 1024,
                 encoder_depth: int = 16, encoder_num_heads: int = 16, decoder_embed_dim: int = 1024,
                 decoder_depth: int = 16, decoder_num_heads: int = 16, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-6, buffer_size: int = 64, class_num: int = 1000,
                 attn_dropout: float = 0.1, proj_dropout: float = 0.1, diffloss_d: int = 3, diffloss_w: int = 1024,
                 num_sampling_steps: int = 100, grad_checkpointing: bool = False):
        super().__init__()
        self.grid = tuple(grid)
        seq_len = self.grid[0] * self.grid[1]
        self.token_dim, self.buffer_size = token_dim, buffer_size
        norm = partial(nn.LayerNorm, eps=norm_eps)
        from timm.models.vision_transformer import Block  # here: timm costs ~2 s at `import vistok`

        def blocks(dim, depth, heads):
            return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm, proj_drop=proj_dropout,
                                       attn_drop=attn_dropout) for _ in range(depth))

        # the registration order is MAR's, so state_dict() lists keys in the official order
        self.class_emb = nn.Embedding(class_num, encoder_embed_dim)
        self.fake_latent = nn.Parameter(torch.zeros(1, encoder_embed_dim))
        self.z_proj = nn.Linear(token_dim, encoder_embed_dim)
        self.z_proj_ln = nn.LayerNorm(encoder_embed_dim, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + buffer_size, encoder_embed_dim))
        self.encoder_blocks = blocks(encoder_embed_dim, encoder_depth, encoder_num_heads)
        self.encoder_norm = norm(encoder_embed_dim)
        self.decoder_embed = nn.Linear(encoder_embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + buffer_size, decoder_embed_dim))
        self.decoder_blocks = blocks(decoder_embed_dim, decoder_depth, decoder_num_heads)
        self.decoder_norm = norm(decoder_embed_dim)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, decoder_embed_dim))
        self.grad_checkpointing = grad_checkpointing
        self.reset_parameters()
        self.diffloss = DiffusionHead(token_dim=token_dim, cond_dim=decoder_embed_dim, width=diffloss_w,
                                      depth=diffloss_d, num_sampling_steps=num_sampling_steps,
                                      grad_checkpointing=grad_checkpointing)

    def reset_parameters(self) -> None:
        """MAR's `initialize_weights`: N(0, 0.02) embeddings, xavier-uniform Linears, unit LayerNorms."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_encoder(self, tokens: torch.Tensor, grid: tuple[int, int], buffer: torch.Tensor,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens (B, h*w, token_dim) in raster order, buffer (B, D) the vector in every buffer slot,
        mask (B, h*w) bool (True = dropped, equal counts per row) -> (B, buffer_size + kept, D)."""
        x = self.z_proj(tokens)
        b, _, d = x.shape
        x = torch.cat([buffer[:, None].to(x.dtype).expand(b, self.buffer_size, d), x], dim=1)
        x = self.z_proj_ln(x + resize_pos_embed(self.encoder_pos_embed_learned, self.grid, grid, self.buffer_size))
        if mask is not None:
            keep = torch.cat([mask.new_zeros(b, self.buffer_size), mask], dim=1).logical_not()
            kept = int(keep[0].sum()) if b else keep.shape[1]  # rows keep equal counts; B = 0 has no row
            x = x[keep].reshape(b, kept, d)
        return self.encoder_norm(self._run(self.encoder_blocks, x))

    def forward_decoder(self, x: torch.Tensor, grid: tuple[int, int], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encoder output (B, buffer_size + kept, D) -> diffusion conditions (B, h*w, D_dec): `mask_token`
        fills the dropped positions, then decoder position embedding, blocks, `decoder_norm`, the
        buffer removed and the diffusion position embedding added (both resized for another grid)."""
        x = self.decoder_embed(x)
        b, _, d = x.shape
        n = grid[0] * grid[1]
        if mask is not None:
            keep = torch.cat([mask.new_zeros(b, self.buffer_size), mask], dim=1).logical_not()
            full = self.mask_token.to(x.dtype).expand(b, self.buffer_size + n, d).clone()
            full[keep] = x.reshape(-1, d)
            x = full
        x = x + resize_pos_embed(self.decoder_pos_embed_learned, self.grid, grid, self.buffer_size)
        x = self.decoder_norm(self._run(self.decoder_blocks, x))[:, self.buffer_size:]
        return x + resize_pos_embed(self.diffusion_pos_embed_learned, self.grid, grid, 0)


@dataclass
class MARSampleOutput:
    """What `MARTokenizer.sample` returns."""

    images: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    latents: torch.Tensor  # (B, C, h, w) scaled latents


@register_tokenizer
class MARTokenizer(VisualTokenizer):
    """MAR's transformer over the KL-16 VAE's latents: Harmon's shared visual encoder, and MAR's
    class-conditional generator where the weights hold a trained decoder and head.

    `encode(pixels)` gives the KL latents (as the KL family) and `features`: the encoder output for the
    whole image, (B, buffer_size + h*w, D), buffer first, buffer slots set to `fake_latent` (Harmon's
    understanding input, before its projector). `encode_latents(latents, mask)` does the same from
    scaled latents with masked tokens dropped. Any latent grid works: the position embeddings are
    resized from the training grid (`img_size` // stride) as Harmon does for 512 px on 256-px MAR.
    """

    family = "mar"
    default_preprocess = {"image_size": 256, "crop": "adm"}

    def __init__(self, *, img_size: int = 256, patch_size: int = 1, encoder_embed_dim: int = 1024,
                 encoder_depth: int = 16, encoder_num_heads: int = 16, decoder_embed_dim: int = 1024,
                 decoder_depth: int = 16, decoder_num_heads: int = 16, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-6, buffer_size: int = 64, class_num: int = 1000, attn_dropout: float = 0.1,
                 proj_dropout: float = 0.1, diffloss_d: int = 3, diffloss_w: int = 1024,
                 num_sampling_steps: int = 100, grad_checkpointing: bool = False,
                 vae: Optional[dict] = None, preprocess: Optional[dict] = None):
        super().__init__()
        for name, value, low in (("patch_size", patch_size, 1), ("encoder_num_heads", encoder_num_heads, 1),
                                 ("decoder_num_heads", decoder_num_heads, 1), ("buffer_size", buffer_size, 0),
                                 ("class_num", class_num, 1)):
            if value < low:  # 0 heads / patch_size 0 were "integer modulo by zero", naming nothing
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.vae = KLTokenizer(**(vae or {}), preprocess=preprocess)
        self.patch_size = patch_size
        self._stride = self.vae.stride * patch_size
        if img_size < self._stride or img_size % self._stride:  # a negative img_size built a negative grid
            raise ValueError(f"img_size {img_size} is not a positive multiple of the token stride {self._stride}")
        side = img_size // self._stride
        for dim, heads, name in ((encoder_embed_dim, encoder_num_heads, "encoder"),
                                 (decoder_embed_dim, decoder_num_heads, "decoder")):
            if dim % heads:
                raise ValueError(f"{name}_embed_dim {dim} is not divisible by {name}_num_heads {heads}")
        self.mar = MARTransformer(
            grid=(side, side), token_dim=self.vae.embed_dim * patch_size ** 2, encoder_embed_dim=encoder_embed_dim,
            encoder_depth=encoder_depth, encoder_num_heads=encoder_num_heads, decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
            buffer_size=buffer_size, class_num=class_num, attn_dropout=attn_dropout, proj_dropout=proj_dropout,
            diffloss_d=diffloss_d, diffloss_w=diffloss_w, num_sampling_steps=num_sampling_steps,
            grad_checkpointing=grad_checkpointing)

    @property
    def stride(self) -> int:
        """Pixels per token: the VAE's stride times patch_size."""
        return self._stride

    @property
    def scaling_factor(self) -> float:
        """The KL-16 VAE's latent scale."""
        return self.vae.scaling_factor

    @property
    def buffer_size(self) -> int:
        """The number of buffer slots in front of the image tokens in `features`."""
        return self.mar.buffer_size

    @property
    def width(self) -> int:
        """The encoder's width D (the last dimension of `features`)."""
        return self.mar.z_proj.out_features

    # ---------------------------------------------------------------- checks
    def _latent_grid(self, latents) -> tuple[int, int]:
        latents = self.vae.validate_latents(latents)
        h, w = latents.shape[-2:]
        p = self.patch_size
        if h < p or w < p or h % p or w % p:
            raise ValueError(f"latent grid {h}x{w} must be positive multiples of patch_size {p}")
        return h // p, w // p

    def validate_mask(self, mask, batch: int, num_tokens: int) -> Optional[torch.Tensor]:
        """(B, h*w) bool or 0/1 float, True / 1 = masked (dropped), the same count in every row -> bool."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, num_tokens):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a tensor of shape (B, h*w) = ({batch}, {num_tokens}), got {shape}")
        if mask.dtype != torch.bool:
            if not ((mask == 0) | (mask == 1)).all():
                raise ValueError("mask must be bool or hold only 0 and 1 (1 = masked)")
            mask = mask != 0
        counts = mask.sum(1)
        if batch and (counts != counts[0]).any():
            raise ValueError(f"every row of mask must mask the same number of tokens (the encoder drops them); "
                             f"got counts {counts.tolist()}")
        return mask

    def _buffer(self, batch: int, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        if class_labels is None:
            return self.mar.fake_latent.expand(batch, -1)
        labels = class_label_tensor(class_labels, self.mar.class_emb.num_embeddings, self.mar.fake_latent.device)
        if labels.numel() != batch:
            raise ValueError(f"class_labels must hold one label per latent ({batch}), got {labels.numel()}")
        return self.mar.class_emb(labels)

    # ---------------------------------------------------------------- public API
    def encode(self, pixels: torch.Tensor, *, sample: Optional[bool] = None,
               generator: Optional[torch.Generator] = None) -> TokenizerEncoding:
        """Pixels (B, 3, H, W) in [-1, 1], H and W multiples of the stride -> `latents` (B, C, h, w) scaled,
        `latent_dist` (unscaled posterior), `features` (B, buffer_size + h*w, D) float, buffer first."""
        enc = self.vae.encode(pixels, sample=sample, generator=generator)
        enc.features = self.encode_latents(enc.latents).features
        enc.grid = self.grid_for(*pixels.shape[-2:])
        return enc

    def encode_latents(self, latents: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                       class_labels: Optional[torch.Tensor] = None) -> TokenizerEncoding:
        """Scaled latents (B, C, h, w) -> `features` (B, buffer_size + visible, D), buffer first.

        mask: (B, h*w) bool or 0/1 float over the raster-order tokens, True / 1 = masked: those tokens
        are dropped (the buffer never is), the rest keep their order; every row must mask the same
        number. class_labels: (B,) ints to fill the buffer with MAR's class embedding instead of
        `fake_latent` (Harmon's choice, and MAR's unconditional one). Raises ValueError on bad shapes.
        """
        latents = self.prepare_latents(latents)  # NaN/Inf refused, moved to the model's device and dtype
        grid = self._latent_grid(latents)
        tokens = KLTokenizer.patchify(latents.to(self.mar.z_proj.weight.dtype), self.patch_size)
        mask = self.validate_mask(mask, tokens.shape[0], tokens.shape[1])
        features = self.mar.forward_encoder(tokens, grid, self._buffer(tokens.shape[0], class_labels), mask)
        return TokenizerEncoding(grid=grid, features=features, latents=latents)

    def decode_features(self, features: torch.Tensor, grid: tuple[int, int],
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """MAR's decoder: encoder features (B, buffer_size + visible, D) -> per-position conditions of the
        diffusion head (B, h*w, D_dec); `mask` is the one given to `encode_latents`."""
        grid = check_grid(grid)
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            kind = features.dtype if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a float tensor (B, buffer_size + visible, D), got {kind}")
        features = features.to(device=self.device, dtype=self.mar.decoder_embed.weight.dtype)
        mask = self.validate_mask(mask, features.shape[0], grid[0] * grid[1])
        visible = grid[0] * grid[1] - (int(mask[0].sum()) if mask is not None and len(mask) else 0)
        if features.ndim != 3 or features.shape[1] != self.buffer_size + visible or features.shape[2] != self.width:
            raise ValueError(f"features must be (B, {self.buffer_size + visible}, {self.width}) for grid {grid} and "
                             f"this mask, got {tuple(features.shape)}")
        return self.mar.forward_decoder(features, grid, mask)

    def to_llm_order(self, features: torch.Tensor) -> torch.Tensor:
        """Harmon's understanding order: (B, buffer + n, D) encoder output, buffer first -> image tokens
        first, this model's `buffer_size` buffer tokens last. ValueError if features are not (B, N, width)
        with N > buffer_size."""
        if features.ndim != 3 or features.shape[1] <= self.buffer_size or features.shape[2] != self.width:
            raise ValueError(f"features must be (B, {self.buffer_size} + tokens, {self.width}), the encoder "
                             f"output with its buffer first; got {tuple(features.shape)}")
        b = self.buffer_size
        return torch.cat([features[:, b:], features[:, :b]], dim=1)

    def decode(self, *, ids: Optional[dict] = None, latents: Optional[torch.Tensor] = None,
               clamp: bool = True) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], through the KL-16 decoder."""
        return self.vae.decode(ids=ids, latents=latents, clamp=clamp)

    def reconstruct(self, pixels: torch.Tensor, **encode_options) -> torch.Tensor:
        """The KL-16 VAE's round trip (the transformer plays no part in it): (B, 3, H, W) in [-1, 1] -> the
        same shape in [-1, 1]; `encode_options` as `encode` (`sample`, `generator`)."""
        return self.vae.reconstruct(pixels, **encode_options)

    @torch.no_grad()
    def sample(self, class_labels: Optional[Sequence[int] | torch.Tensor] = None, *, num_images: Optional[int] = None,
               num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear", temperature: float = 1.0,
               grid: Optional[tuple[int, int]] = None, num_sampling_steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None, progress: bool = False) -> MARSampleOutput:
        """MAR's iterative masked generation (LTH14/mar `MAR.sample_tokens`, cosine mask schedule, random
        order per image, this model's diffusion head), then the KL-16 decoder.

        class_labels: (B,) ints in [0, class_num), or None with `num_images` for unconditional samples;
        num_iter: 1..h*w steps; cfg: guidance scale (1 = none), `cfg_schedule` "linear" (MAR's) or
        "constant"; temperature > 0 scales the head's per-step noise; grid: token grid (default the
        training grid); num_sampling_steps: the head's DDPM steps (default its config);
        generator: reproducible orders and noise. Returns `MARSampleOutput` with `images`
        (B, 3, H, W) in [-1, 1] and scaled `latents` (B, C, h, w). Raises ValueError on bad arguments.
        """
        from .mar_sampling import sample_latents

        latents = sample_latents(self, class_labels, num_images=num_images, num_iter=num_iter, cfg=cfg,
                                 cfg_schedule=cfg_schedule, temperature=temperature, grid=grid,
                                 num_sampling_steps=num_sampling_steps, generator=generator, progress=progress)
        return MARSampleOutput(images=self.decode(latents=latents), latents=latents)
