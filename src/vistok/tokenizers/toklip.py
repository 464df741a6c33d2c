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
        self.vq.requires_grad_(False)
        # unused (the trunk reads codes); TokLIP's files lack it, `convert toklip` fills it from initialisation
        self.siglip.trunk.patch_embed.requires_grad_(False)
        for name in ("text", "logit_bias"):  # TokLIP trains the vision trunk and the logit scale
            part = getattr(self.siglip, name, None)
            if part is not None:
                part.requires_grad_(False)
        self.siglip.grad_checkpointing = grad_checkpointing
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        self.vq.eval()  # frozen: never updates its usage window
        if hasattr(self, "teacher"):
            self.teacher.eval()
        if hasattr(self.siglip, "text"):
            self.siglip.text.eval()
        return self

    @property
    def stride(self) -> int:
        return self.vq.stride

    @property
    def codebooks(self) -> dict[str, CodebookSpec]:
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
        if not hasattr(self, "teacher"):
            raise ValueError("this tokenizer was built with with_teacher=False; training needs the teacher "
                             "(build it from the SigLIP weights instead of an inference release)")
        size = tuple(self.teacher.trunk.patch_embed.img_size)
        if tuple(pixels.shape[-2:]) != size:  # TokLIP resizes bilinearly when the resolutions differ
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        h = run_blocks(self.teacher, embed_patches(self.teacher, pixels), 0, len(self.teacher.trunk.blocks))
        return pool(self.teacher, h)

    def forward(self, pixels: torch.Tensor, *, with_teacher: bool = True) -> TokLIPForward:
        pixels = self.validate_pixels(pixels)
        with torch.no_grad():
            ids = self.vq.encode(pixels).ids
        features, pooled = self.features_from_ids(ids)
        return TokLIPForward(pooled, features, ids, self.teacher_pooled(pixels) if with_teacher else None)

    # ------------------------------------------------------------------ inference API
    def encode(self, pixels: torch.Tensor) -> TokenizerEncoding:
        """ids {"vq"} from the frozen VQ, quantized {"vq"} unit code vectors, features (B, N, width)
        per token, pooled (B, E) CLIP-space embedding."""
        pixels = self.validate_pixels(pixels)
        enc = self.vq.encode(pixels)
        features, pooled = self.features_from_ids(enc.ids)
        return TokenizerEncoding(grid=enc.grid, ids=enc.ids, quantized=enc.quantized, features=features,
                                 pooled=pooled)

    def decode(self, *, ids: Optional[dict] = None, latents=None, clamp: bool = True) -> torch.Tensor:
        """Pixels from ids through the frozen VQGAN (TokLIP's reconstruction is the VQ's)."""
        return self.vq.decode(ids=ids, latents=latents, clamp=clamp)

    def embed(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-position semantic features for an LLM: the token encoder's output (B, N, width)."""
        return self.features_from_ids(ids)[0]

    def encode_text(self, texts, *, normalize: bool = True) -> torch.Tensor:
        return self.siglip.encode_text(texts, normalize=normalize)
