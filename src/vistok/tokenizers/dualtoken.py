"""DualToken (Song et al., arXiv 2503.14324): one SigLIP tower, two residual-VQ tokenizers.

Pixel branch: tokens after the shallow layer (6; plus 0.6 x layer 4 in the official code) -> down
projection -> residual VQ ("pixel" ids) -> causal up projection -> conv decoder -> image. Semantic
branch: tokens after the deep layer (26) -> down projection -> residual VQ ("semantic" ids) ->
causal up projection, which *replaces* the hidden state; the remaining layers and the
attention-pool head then give the CLIP-space embedding. A frozen copy of the initial tower (the
teacher) gives the semantic targets. The pixel decoder therefore sees only the shallow layers, and
layers after the pixel tap learn only from the semantic and commitment losses.

`variant="naive"` is the paper's ablation (a): reconstruction and semantics both read the deep
layer through one codebook ("semantic" ids feed the decoder too).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ..images import PreprocessConfig
from .base import CodebookSpec, TokenizerEncoding, VisualTokenizer, register_tokenizer
from .decoders import Decoder, ResnetBlock, attn_levels_for
from .projection import make_projection
from .quantizers import QuantizerOutput, ResidualQuantizer
from .siglip import SiglipTower, embed_patches, load_siglip_weights, pool, run_blocks  # noqa: F401 (re-exported)

VARIANTS = ("dual", "naive")
DEFAULT_DECODER = {"ch": 128, "ch_mult": [1, 1, 4, 4, 8], "num_res_blocks": 2, "attn_resolutions": [24],
                   "in_channels": 1024, "groups": 32, "dropout": 0.0}


@dataclass
class DualTokenForward:
    """What one training forward gives the trainer (which composes the loss from losses/)."""

    reconstruction: torch.Tensor  # (B, 3, H, W), unclamped decoder output
    semantic_features: torch.Tensor  # (B, N, width): quantized, up-projected deep features
    pooled: torch.Tensor  # (B, E): pooled embedding computed on the quantized path
    ids: dict[str, torch.Tensor]  # name -> (B, h, w, depth)
    commitment_loss: dict[str, torch.Tensor]  # name -> scalar
    teacher_features: Optional[torch.Tensor] = None  # (B, N, width): frozen tower's deep-layer output
    teacher_pooled: Optional[torch.Tensor] = None  # (B, E)
    quantized: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, N, code_dim)


@register_tokenizer
class DualTokenTokenizer(VisualTokenizer):
    """Keyword-only; defaults are the official SigLIP-SO400M/14-384 configuration.

    clip_model / clip_config: the SigLIP architecture (a bundled open_clip config name, updated by
    clip_config; or clip_model=None and an explicit-geometry clip_config, e.g.
    `siglip_hf.clip_config_from_hf(config.json)` of an HF SigLIP / SigLIP2 folder); siglip_weights: an
    open_clip weights file or an HF SigLIP / SigLIP2 folder (of the same geometry) to initialise tower
    and teacher from (read once at construction; not recorded in saved configs); with_text / text_tokenizer: keep the
    text tower for zero-shot (frozen, as in the official recipe); pixel_layer / semantic_layer /
    shortcut_layer (None: the paper's variant without the layer-4 mix) / shortcut_weight: 1-based
    layers; code_dim, codebook_size, pixel_depth, semantic_depth, decay, shared_codebook, restart:
    the residual quantizers; pixel_ema_schedule "per_depth" and semantic_ema_schedule "per_step"
    follow the code's "rq" / "rq_ema"; projection "attention" (the code) or "linear";
    causal_post_projection: raster-causal up projections; decoder: the conv decoder's settings;
    decoder_latent_size: the grid is resized to this before decoding (27 -> 24 at 384 px);
    with_teacher: keep the frozen teacher (needed for training only); grad_checkpointing: recompute
    the tower's blocks and the pixel decoder's blocks in backward (training memory).
    """

    family = "dualtoken"
    default_preprocess = {"image_size": 384, "crop": "center", "interpolation": "bicubic"}
    load_time_args = ("siglip_weights",)
    # the official recipe trains the vision side only: text tower and logit scalars stay frozen
    frozen_modules = ("teacher", "siglip.text", "siglip.logit_scale", "siglip.logit_bias")

    def __init__(
        self,
        *,
        clip_model: Optional[str] = "ViT-SO400M-14-SigLIP-384",
        clip_config: Optional[dict] = None,
        siglip_weights: Optional[str] = None,
        with_text: bool = True,
        text_tokenizer: Optional[str] = None,
        variant: str = "dual",
        pixel_layer: int = 6,
        semantic_layer: int = 26,
        shortcut_layer: Optional[int] = 4,
        shortcut_weight: float = 0.6,
        code_dim: int = 32,
        codebook_size: int = 16384,
        pixel_depth: int = 8,
        semantic_depth: int = 8,
        decay: float = 0.99,
        shared_codebook: bool = True,
        restart: str = "ema",
        pixel_ema_schedule: str = "per_depth",
        semantic_ema_schedule: str = "per_step",
        projection: str = "attention",
        causal_post_projection: bool = True,
        decoder: Optional[dict] = None,
        decoder_latent_size: Optional[int] = 24,
        with_teacher: bool = True,
        grad_checkpointing: bool = False,
        preprocess: Optional[PreprocessConfig | dict] = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.siglip = SiglipTower(clip_model=clip_model, clip_config=clip_config, with_text=with_text,
                                  text_tokenizer=text_tokenizer)
        layers = self.siglip.num_layers
        if variant == "naive":
            pixel_layer, shortcut_layer = semantic_layer, None
        for name, value in (("pixel_layer", pixel_layer), ("semantic_layer", semantic_layer),
                            ("shortcut_layer", shortcut_layer)):
            if value is not None and not 1 <= value <= layers:
                raise ValueError(f"{name}={value} is outside the tower's layers 1..{layers}")
        if pixel_layer > semantic_layer:
            raise ValueError(f"pixel_layer ({pixel_layer}) must not be deeper than semantic_layer ({semantic_layer})")
        self.variant = variant
        self.pixel_layer, self.semantic_layer = pixel_layer, semantic_layer
        self.shortcut_layer, self.shortcut_weight = shortcut_layer, shortcut_weight
        self.code_dim = code_dim
        width = self.siglip.width

        def quantizer(depth: int, schedule: str) -> ResidualQuantizer:
            return ResidualQuantizer(dim=code_dim, codebook_size=codebook_size, depth=depth,
                                     shared_codebook=shared_codebook, decay=decay, restart=restart,
                                     commitment="cumulative", ema_schedule=schedule)

        self.semantic_in = make_projection(projection, in_dim=width, out_dim=code_dim)
        self.semantic_quantizer = quantizer(semantic_depth, semantic_ema_schedule)
        self.semantic_out = make_projection(projection, in_dim=code_dim, out_dim=width, causal=causal_post_projection)
        if variant == "dual":
            self.pixel_in = make_projection(projection, in_dim=width, out_dim=code_dim)
            if shortcut_layer is not None:
                self.shortcut_in = make_projection(projection, in_dim=width, out_dim=code_dim)
            self.pixel_quantizer = quantizer(pixel_depth, pixel_ema_schedule)
        self.pixel_out = make_projection(projection, in_dim=code_dim, out_dim=width, causal=causal_post_projection)

        dec = {**DEFAULT_DECODER, **(decoder or {})}
        self.decoder_latent_size = decoder_latent_size or self.siglip.grid[0]
        resolution = self.decoder_latent_size * 2 ** (len(dec["ch_mult"]) - 1)
        self.post_quant = ResnetBlock(width, dec["in_channels"], groups=dec["groups"], dropout=dec["dropout"],
                                      first_kernel=1)
        self.decoder = Decoder(z_channels=dec["in_channels"], ch=dec["ch"], ch_mult=tuple(dec["ch_mult"]),
                               num_res_blocks=dec["num_res_blocks"], out_channels=3, groups=dec["groups"],
                               attn_levels=attn_levels_for(resolution, dec["ch_mult"], dec["attn_resolutions"]),
                               dropout=dec["dropout"], mid_attention=True)
        if resolution != self.siglip.image_size[0]:
            raise ValueError(f"decoder output {resolution} px (latent {self.decoder_latent_size} x "
                             f"{2 ** (len(dec['ch_mult']) - 1)}) differs from the tower's {self.siglip.image_size[0]} px")

        if siglip_weights:
            load_siglip_weights(self.siglip, siglip_weights)
        if with_teacher:
            self.teacher = self.siglip.teacher()
        self.siglip.grad_checkpointing = grad_checkpointing
        self.decoder.grad_checkpointing = grad_checkpointing

    # ------------------------------------------------------------------ config / structure
    @property
    def stride(self) -> int:
        """Pixels per token along each side: the tower's patch size (14 for SO400M/14)."""
        return int(self.siglip.trunk.patch_embed.patch_size[0])

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """The tower's fixed token grid (it takes one image size only; see `check_image_size`)."""
        return self.siglip.grid

    def check_image_size(self, h: int, w: int) -> None:
        """Raise ValueError unless h x w is the SigLIP tower's own input size."""
        if (h, w) != self.siglip.image_size:
            size = self.siglip.image_size
            raise ValueError(f"image size {h}x{w} does not fit the SigLIP tower: it takes {size[0]}x{size[1]} "
                             f"(use tok.preprocess, which resizes to {size[0]})")

    @property
    def codebooks(self) -> dict[str, CodebookSpec]:
        """{"pixel", "semantic"} (`naive`: {"semantic"}): each a residual codebook of `codebook_size`
        codes of `code_dim` channels, `depth` levels per position (shared across levels by default)."""
        books = {}
        for name in self.codebook_names:
            q = self._quantizer(name)
            books[name] = CodebookSpec(size=q.codebook_size, depth=q.depth, dim=q.codebook_dim, shared=q.shared_codebook)
        return books

    @property
    def codebook_names(self) -> tuple[str, ...]:
        """The codebooks this variant has, in `enc.ids` order: ("pixel", "semantic"), or ("semantic",) for `naive`."""
        return ("pixel", "semantic") if self.variant == "dual" else ("semantic",)

    @property
    def decode_codebook(self) -> str:
        """The codebook whose ids the pixel decoder consumes."""
        return "pixel" if self.variant == "dual" else "semantic"

    def _quantizer(self, name: str) -> ResidualQuantizer:
        return self.pixel_quantizer if name == "pixel" else self.semantic_quantizer

    # ------------------------------------------------------------------ the two branches
    def _tower_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """[-1, 1] pixels -> the tower's normalisation (identity for SigLIP's mean = std = 0.5)."""
        cfg = self.preprocess_config
        if cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5):
            return pixels
        mean = torch.tensor(cfg.mean, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
        return ((pixels + 1) / 2 - mean) / std

    def _branches(self, pixels: torch.Tensor) -> tuple[dict[str, QuantizerOutput], torch.Tensor, torch.Tensor]:
        """Run the tower with the quantized semantic features replacing the deep hidden state.
        Returns the quantizer outputs, the up-projected semantic features and the pooled embedding."""
        h = self.siglip.embed_patches(self._tower_input(pixels))
        taps, done = {}, 0
        for layer in sorted({self.shortcut_layer or 0, self.pixel_layer, self.semantic_layer} - {0}):
            h = self.siglip.run_blocks(h, done, layer)
            taps[layer], done = h, layer
        out = {}
        if self.variant == "dual":
            latent = self.pixel_in(taps[self.pixel_layer])
            if self.shortcut_layer is not None:
                latent = latent + self.shortcut_weight * self.shortcut_in(taps[self.shortcut_layer])
            out["pixel"] = self.pixel_quantizer(latent)
        out["semantic"] = self.semantic_quantizer(self.semantic_in(taps[self.semantic_layer]))
        features = self.semantic_out(out["semantic"].quantized)
        final = self.siglip.run_blocks(features, self.semantic_layer, self.siglip.num_layers)
        return out, features, self.siglip.pool(final)

    def _grid_ids(self, ids: torch.Tensor) -> torch.Tensor:
        h, w = self.siglip.grid
        return ids.view(ids.shape[0], h, w, ids.shape[-1])

    def _decode_codes(self, quantized: torch.Tensor) -> torch.Tensor:
        """(B, N, code_dim) code vectors -> unclamped image."""
        b = quantized.shape[0]
        h, w = self.siglip.grid
        quantized = quantized.to(next(self.pixel_out.parameters()).dtype)  # fp32 codebook, maybe half decoder
        z = self.pixel_out(quantized).transpose(1, 2).reshape(b, -1, h, w)
        size = self.decoder_latent_size
        if (h, w) != (size, size):
            z = F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)
        return self.decoder(self.post_quant(z))

    @torch.no_grad()
    def teacher_targets(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen initial tower's deep-layer tokens and pooled embedding."""
        teacher = self.require_teacher()
        h = embed_patches(teacher, self._tower_input(pixels))
        deep = run_blocks(teacher, h, 0, self.semantic_layer)
        final = run_blocks(teacher, deep, self.semantic_layer, len(teacher.trunk.blocks))
        return deep, pool(teacher, final)

    # ------------------------------------------------------------------ training forward
    def forward(self, pixels: torch.Tensor, *, with_teacher: bool = True) -> DualTokenForward:
        """Training forward: reconstruction, quantized semantic features, pooled embedding, ids,
        commitment losses and (with_teacher) the teacher's targets. Updates the EMA codebooks in
        training mode."""
        pixels = self.validate_pixels(pixels)
        out, features, pooled = self._branches(pixels)
        recon = self._decode_codes(out[self.decode_codebook].quantized)
        teacher = self.teacher_targets(pixels) if with_teacher else (None, None)
        return DualTokenForward(
            reconstruction=recon, semantic_features=features, pooled=pooled,
            ids={k: self._grid_ids(v.ids) for k, v in out.items()},
            commitment_loss={k: v.commitment_loss for k, v in out.items()},
            teacher_features=teacher[0], teacher_pooled=teacher[1],
            quantized={k: v.quantized for k, v in out.items()},
        )

    # ------------------------------------------------------------------ inference API
    @contextlib.contextmanager
    def _frozen_codebooks(self):
        """Inference never updates codebooks, whatever mode the module is in."""
        quantizers = [self._quantizer(n) for n in self.codebook_names]
        modes = [q.training for q in quantizers]
        for q in quantizers:
            q.eval()
        try:
            yield
        finally:
            for q, mode in zip(quantizers, modes):
                q.train(mode)

    def encode(self, pixels: torch.Tensor) -> TokenizerEncoding:
        """(B, 3, S, S) float in [-1, 1] at the tower's size S -> ids {"pixel", "semantic"} int64
        (B, h, w, depth); quantized (B, h*w, code_dim) per codebook; features: the quantized deep features that
        replace layer 26 (B, h*w, width), what an MLLM reads for understanding; pooled: the CLIP-space
        embedding (B, E). Codebooks are never updated here (DualToken, arXiv 2503.14324; songweii/DualToken)."""
        pixels = self.validate_pixels(pixels)
        with self._frozen_codebooks():
            out, features, pooled = self._branches(pixels)
        return TokenizerEncoding(
            grid=self.siglip.grid,
            ids={k: self._grid_ids(out[k].ids) for k in self.codebook_names},
            quantized={k: out[k].quantized for k in self.codebook_names},
            features=features, pooled=pooled,
        )

    def check_ids(self, ids: dict, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """ids {name: (B, h, w, k)} for each of `names`, 1 <= k <= that codebook's depth, on the grid ->
        the same tensors on the model's device. Raises ValueError naming a missing codebook or a wrong shape."""
        if not isinstance(ids, dict):
            raise ValueError(f"ids must be a dict name -> (B, h, w, depth) tensor, got {type(ids).__name__}")
        h, w = self.siglip.grid
        out = {}
        for name in names:
            if name not in ids:
                raise ValueError(f"ids lack the {name!r} codebook; got {sorted(ids)}")
            x = torch.as_tensor(ids[name])
            depth = self._quantizer(name).depth
            if x.ndim != 4 or tuple(x.shape[1:3]) != (h, w) or not 1 <= x.shape[-1] <= depth:
                raise ValueError(f"ids[{name!r}] must be (B, {h}, {w}, 1..{depth}), got {tuple(x.shape)}")
            out[name] = x.to(self.device)
        return out

    def decode(self, *, ids: Optional[dict] = None, latents=None, clamp: bool = True) -> torch.Tensor:
        """Pixel ids {"pixel": (B, h, w, k)}, k <= depth (fewer levels = coarser image; `naive`: "semantic")
        -> images (B, 3, S, S) in [-1, 1] (unclamped with clamp=False). Raises ValueError for latents, a
        missing codebook, a wrong shape or ids out of range."""
        if latents is not None or ids is None:
            raise ValueError("DualToken decodes discrete ids: call decode(ids=enc.ids)")
        name = self.decode_codebook
        x = self.check_ids(ids, (name,))[name]
        codes = self._quantizer(name).decode(x).flatten(1, 2)
        image = self._decode_codes(codes)
        return image.clamp(-1, 1) if clamp else image

    def embed(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """The paper's unified visual token: per position, the depth-summed pixel and semantic code
        vectors concatenated along channels -> (B, h*w, 2 * code_dim) (code_dim for `naive`)."""
        x = self.check_ids(ids, self.codebook_names)
        parts = [self._quantizer(n).codes_from_ids(x[n]).flatten(1, 2) for n in self.codebook_names]
        return torch.cat(parts, dim=-1)

    def encode_text(self, texts, *, normalize: bool = True) -> torch.Tensor:
        """SigLIP text embeddings (B, E), L2-normalised (normalize=True); strings need `text_tokenizer`,
        int64 token ids (B, context_length) always work. NotImplementedError without the text tower."""
        return self.siglip.encode_text(texts, normalize=normalize)

    def zero_shot_logits(self, pooled: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """SigLIP's calibrated logits exp(scale) * cos + bias."""
        if not hasattr(self.siglip, "logit_scale"):
            raise NotImplementedError("this tokenizer was built without the text tower (with_text=False)")
        image = F.normalize(pooled, dim=-1)
        return self.siglip.logit_scale.exp() * image @ text_features.T + self.siglip.logit_bias
