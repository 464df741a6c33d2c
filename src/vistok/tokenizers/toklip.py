"""TokLIP (Lin et al., arXiv 2505.05422): CLIP-space semantics for a frozen VQGAN's discrete ids.

Frozen LlamaGen VQ -> L2-normalised code vectors (B, N, 8) -> MLP (8 -> 4608 -> width, GELU) ->
+ SigLIP's position embedding -> the SigLIP trunk's blocks with causal attention in raster order
-> final norm (per-token features) -> attention-pool head (pooled embedding, attending to all
tokens). Because the trunk reads only code vectors, an MLLM that generated ids gets their features
with `features_from_ids`, no pixels needed. Trained with softmax InfoNCE against the (frozen) SigLIP
text tower plus distillation from the frozen SigLIP image tower (losses/contrastive.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..images import PreprocessConfig
from ..weights import load_state_dict_strict, read_release
from .base import CodebookSpec, TokenizerEncoding, VisualTokenizer, register_tokenizer
from .siglip import SiglipTower, embed_patches, load_siglip_weights, pool, run_blocks
from .vqgan import VQGANTokenizer


@dataclass
class TokLIPForward:
    """What one training forward gives the objective (TokLIP, arXiv 2505.05422; TencentARC/TokLIP)."""

    pooled: torch.Tensor  # (B, E) student image embedding (unnormalised)
    features: torch.Tensor  # (B, N, width) per-token features (final norm)
    ids: dict[str, torch.Tensor]  # {"vq": (B, h, w, 1)}
    teacher_pooled: Optional[torch.Tensor] = None  # (B, E) frozen SigLIP on the pixels


@register_tokenizer
class TokLIPTokenizer(VisualTokenizer):
    """Keyword-only; defaults are TokLIP-L (SigLIP2-SO400M/16 at 384 px over LlamaGen VQ-16's 24x24 ids).

    vq: the VQGAN's constructor arguments (LlamaGen VQ-16 by default); vq_weights: a vistok release
    directory of that VQGAN (e.g. `vistok convert llamagen-vq16 vq_ds16_t2i.pt`) read at construction;
    siglip_weights: an open_clip SigLIP weights file for the trunk, text tower and teacher;
    mlp_hidden: the token MLP's width (4608); with_teacher: keep the frozen SigLIP image tower."""

    family = "toklip"
    default_preprocess = {"image_size": 384, "crop": "center", "interpolation": "bicubic"}
    load_time_args = ("siglip_weights", "vq_weights")
    # TokLIP trains the token MLP, the vision trunk and the logit scale; the VQ (which then never updates
    # its usage window), the teacher, the text tower and the logit bias stay frozen. The patch embedding is
    # unused (the trunk reads codes); TokLIP's files lack it, `convert toklip` fills it from initialisation.
    frozen_modules = ("vq", "teacher", "siglip.text", "siglip.logit_bias", "siglip.trunk.patch_embed")

    def __init__(
        self,
        *,
        clip_model: Optional[str] = "ViT-SO400M-16-SigLIP2-384",
        clip_config: Optional[dict] = None,
        siglip_weights: Optional[str] = None,
        vq: Optional[dict] = None,
        vq_weights: Optional[str] = None,
        with_text: bool = True,
        text_tokenizer: Optional[str] = None,
        mlp_hidden: int = 4608,
        with_teacher: bool = True,
        grad_checkpointing: bool = False,
        preprocess: Optional[PreprocessConfig | dict] = None,
    ):
        super().__init__()
        self.vq = VQGANTokenizer(**(vq or {}))
        self.siglip = SiglipTower(clip_model=clip_model, clip_config=clip_config, with_text=with_text,
                                  text_tokenizer=text_tokenizer)
        width, dim = self.siglip.width, self.vq.quantize.dim
        self.vq_table = nn.Linear(dim, mlp_hidden)
        self.vq_mapping = nn.Linear(mlp_hidden, width)
        tokens = self.siglip.trunk.pos_embed.shape[1]
        size = PreprocessConfig.from_any(preprocess, **self.default_preprocess).image_size
        grid = size // self.vq.stride
        if grid * grid != tokens:
            raise ValueError(f"the VQ gives {grid}x{grid} ids at {size} px but the trunk's position embedding has "
                             f"{tokens} positions; set preprocess.image_size to {int(tokens ** 0.5) * self.vq.stride}")
        if siglip_weights:
            load_siglip_weights(self.siglip, siglip_weights)
        if vq_weights:
            load_state_dict_strict(self.vq, read_release(Path(vq_weights))[1], target=f"VQGAN from {vq_weights}")
        if with_teacher:
            self.teacher = self.siglip.teacher()
        self.siglip.grad_checkpointing = grad_checkpointing

    @property
    def stride(self) -> int:
        """Pixels per token: the frozen VQGAN's stride (16 for LlamaGen VQ-16)."""
        return self.vq.stride

    @property
    def codebooks(self) -> dict[str, CodebookSpec]:
        """The frozen VQGAN's {"vq": CodebookSpec(size, 1, dim, shared=True)}."""
        return self.vq.codebooks

    # ------------------------------------------------------------------ the token encoder
    def features_from_ids(self, ids: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids {"vq": (B, h, w, 1)} -> (per-token features (B, N, width), pooled (B, E)); causal in
        raster order, so the feature of token t depends only on ids 0..t."""
        codes = self.vq.embed(ids)  # unit code vectors (B, N, dim)
        trunk = self.siglip.trunk
        if codes.shape[1] != trunk.pos_embed.shape[1]:
            raise ValueError(f"{codes.shape[1]} ids per image, but the trunk takes {trunk.pos_embed.shape[1]}")
        x = self.vq_mapping(F.gelu(self.vq_table(codes.to(self.vq_table.weight.dtype)))) + trunk.pos_embed
        x = self.siglip.run_blocks(trunk.norm_pre(x), 0, self.siglip.num_layers, is_causal=True)
        return trunk.norm(x), self.siglip.pool(x)

    @torch.no_grad()
    def teacher_pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen SigLIP image tower's pooled embedding (B, E) of pixels (B, 3, H, W) in [-1, 1],
        resized bilinearly to the teacher's size when it differs (as TokLIP does). ValueError without a teacher."""
        teacher = self.require_teacher()
        size = tuple(teacher.trunk.patch_embed.img_size)
        if tuple(pixels.shape[-2:]) != size:  # TokLIP resizes bilinearly when the resolutions differ
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        h = run_blocks(teacher, embed_patches(teacher, pixels), 0, len(teacher.trunk.blocks))
        return pool(teacher, h)

    def forward(self, pixels: torch.Tensor, *, with_teacher: bool = True) -> TokLIPForward:
        """Training forward: frozen-VQ ids, the token encoder's features (B, N, width) and pooled (B, E)
        (with gradients), and (with_teacher) the teacher's pooled embedding. Raises ValueError for bad pixels
        or a missing teacher."""
        pixels = self.validate_pixels(pixels)
        with torch.no_grad():
            ids = self.vq.encode(pixels).ids
        features, pooled = self.features_from_ids(ids)
        return TokLIPForward(pooled, features, ids, self.teacher_pooled(pixels) if with_teacher else None)

    # ------------------------------------------------------------------ inference API
    def encode(self, pixels: torch.Tensor) -> TokenizerEncoding:
        """(B, 3, H, W) float in [-1, 1] -> ids {"vq": int64 (B, h, w, 1)} from the frozen VQ, quantized
        {"vq": (B, h*w, dim)} unit code vectors, features (B, h*w, width) per token (causal in raster order),
        pooled (B, E) CLIP-space embedding."""
        pixels = self.validate_pixels(pixels)
        enc = self.vq.encode(pixels)
        features, pooled = self.features_from_ids(enc.ids)
        return TokenizerEncoding(grid=enc.grid, ids=enc.ids, quantized=enc.quantized, features=features,
                                 pooled=pooled)

    def decode(self, *, ids: Optional[dict] = None, latents=None, clamp: bool = True) -> torch.Tensor:
        """ids {"vq": (B, h, w, 1)} -> images (B, 3, H, W) in [-1, 1] through the frozen VQGAN (TokLIP's
        reconstruction is the VQ's). Raises ValueError as `VQGANTokenizer.decode`."""
        return self.vq.decode(ids=ids, latents=latents, clamp=clamp)

    def reconstruct(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen VQGAN's round trip (the token encoder plays no part in it): (B, 3, H, W) in [-1, 1] ->
        the same shape in [-1, 1]."""
        return self.vq.reconstruct(pixels)

    def embed(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """ids {"vq": (B, h, w, 1)} -> per-position semantic features for an LLM: the token encoder's
        output (B, h*w, width). Raises ValueError for bad ids or a grid the trunk does not take."""
        return self.features_from_ids(ids)[0]

    def encode_text(self, texts, *, normalize: bool = True) -> torch.Tensor:
        """SigLIP text embeddings (B, E) in the space of `pooled`, L2-normalised (normalize=True);
        strings need `text_tokenizer`, int64 token ids always work. NotImplementedError without the text tower."""
        return self.siglip.encode_text(texts, normalize=normalize)
