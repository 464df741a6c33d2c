"""SigLIP towers from open_clip / timm, run block by block so callers can tap and replace layers.

`SiglipTower` holds an open_clip `CustomTextCLIP`'s parts under open_clip's own names (`visual.trunk.*`,
`text.*`, `logit_scale`, `logit_bias`), so an open_clip SigLIP weights file loads into it strictly.
Building never downloads: the architecture comes from open_clip's bundled JSON configs (or a config
dict), with timm's `pretrained=False`.

Layers are counted from 1 as in the DualToken paper: "layer k" is the output of `trunk.blocks[k-1]`.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

TINY_TRUNK = "vit_tiny_patch8_siglip_64_vistok"


def register_tiny_trunk() -> None:
    """A 64 px SigLIP-style timm trunk (MAP pooling, no class token) for tests and the quickstart.
    timm needs a registered entrypoint: open_clip's TimmModel passes no architecture arguments."""
    from timm.models import register_model
    from timm.models._registry import _model_entrypoints
    from timm.models.vision_transformer import _create_vision_transformer

    if TINY_TRUNK in _model_entrypoints:
        return

    def vit_tiny_patch8_siglip_64_vistok(pretrained: bool = False, **kwargs):
        args = dict(img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=4, mlp_ratio=3.0,
                    class_token=False, global_pool="map")
        builder = logging.getLogger("timm.models._builder")
        level = builder.level
        builder.setLevel(logging.ERROR)  # "No pretrained configuration specified": expected, it has none
        try:
            return _create_vision_transformer(TINY_TRUNK, pretrained=pretrained, **{**args, **kwargs})
        finally:
            builder.setLevel(level)

    vit_tiny_patch8_siglip_64_vistok.__module__ = __name__
    register_model(vit_tiny_patch8_siglip_64_vistok)


SIGLIP_TRUNK_DEFAULTS = {"class_token": False, "global_pool": "map", "act_layer": "gelu_tanh"}


def register_siglip_trunk(name: str, kwargs: dict) -> None:
    """Register a SigLIP-style timm ViT (no class token, MAP pool, tanh GELU, LayerNorm eps 1e-6:
    timm's default) of the geometry in `kwargs` (img_size, patch_size, embed_dim, depth, num_heads,
    mlp_ratio) under `name`, for configs whose trunk has no timm entrypoint (e.g. a TokLIP model
    config of its own size). Registering the same name twice with other arguments is a ValueError."""
    from timm.models import register_model
    from timm.models._registry import _model_entrypoints
    from timm.models.vision_transformer import _create_vision_transformer

    args = {**SIGLIP_TRUNK_DEFAULTS, **kwargs}
    known = _model_entrypoints.get(name)
    if known is not None:
        if getattr(known, "vistok_args", None) != args:
            raise ValueError(f"timm model {name!r} already exists with other arguments; rename the trunk")
        return

    def entrypoint(pretrained: bool = False, **kw):
        builder = logging.getLogger("timm.models._builder")
        level = builder.level
        builder.setLevel(logging.ERROR)  # "No pretrained configuration specified": expected, it has none
        try:
            return _create_vision_transformer(name, pretrained=pretrained, **{**args, **kw})
        finally:
            builder.setLevel(level)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.vistok_args = args
    register_model(entrypoint)


# open_clip-style config of the tiny tower (SimpleTokenizer vocabulary: fully offline text)
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "init_logit_bias": -10,
    "vision_cfg": {"image_size": 64, "timm_model_name": TINY_TRUNK, "timm_model_pretrained": False,
                   "timm_pool": "map", "timm_proj": "none"},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                 "no_causal_mask": True, "proj_bias": True, "pool_type": "argmax", "norm_kwargs": {"eps": 1e-6}},
}


def clip_model_config(clip_model: Optional[str], clip_config: Optional[dict]) -> dict:
    """An open_clip model config: a bundled one by name, updated by `clip_config` (nested merge)."""
    import open_clip

    cfg: dict = {}
    if clip_model:
        cfg = open_clip.get_model_config(clip_model)
        if cfg is None:
            raise ValueError(f"unknown open_clip model {clip_model!r}; see open_clip.list_models()")
    for key, value in (clip_config or {}).items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    if not cfg:
        raise ValueError("give clip_model (an open_clip model name) or clip_config")
    if "timm_model_name" not in cfg.get("vision_cfg", {}):
        raise ValueError("the SigLIP tower must be a timm trunk (vision_cfg.timm_model_name)")
    return cfg


class SiglipTower(nn.Module):
    """An open_clip SigLIP model's vision tower (and optionally its text tower), tap-friendly."""

    def __init__(self, *, clip_model: Optional[str] = None, clip_config: Optional[dict] = None,
                 with_text: bool = True, text_tokenizer: Optional[str] = None):
        super().__init__()
        import open_clip

        register_tiny_trunk()
        cfg = clip_model_config(clip_model, clip_config)
        vision = dict(cfg["vision_cfg"])
        trunk_kwargs = vision.pop("timm_model_kwargs", None)  # vistok's: a trunk timm has no name for
        if trunk_kwargs is not None:
            register_siglip_trunk(vision["timm_model_name"], trunk_kwargs)
        args = {k: v for k, v in cfg.items() if k not in ("custom_text",)}
        args["vision_cfg"] = vision
        clip = open_clip.CustomTextCLIP(**args)
        self.visual = clip.visual
        if with_text:
            self.text = clip.text
            self.logit_scale = clip.logit_scale
            self.logit_bias = clip.logit_bias
        self.context_length = int(cfg["text_cfg"].get("context_length", 77))
        self.text_tokenizer = text_tokenizer
        self._tokenizer = None
        self.grad_checkpointing = False

    @property
    def trunk(self) -> nn.Module:
        return self.visual.trunk

    @property
    def num_layers(self) -> int:
        return len(self.trunk.blocks)

    @property
    def width(self) -> int:
        return self.trunk.embed_dim

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.grid_size)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.img_size)

    # ------------------------------------------------------------------ vision, block by block
    def embed_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        return embed_patches(self.visual, pixels)

    def run_blocks(self, x: torch.Tensor, start: int, stop: int, *, is_causal: bool = False) -> torch.Tensor:
        """Run layers start+1..stop (1-based) on tokens x that are the output of layer `start`."""
        return run_blocks(self.visual, x, start, stop, is_causal=is_causal,
                          checkpointing=self.grad_checkpointing and self.training)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return pool(self.visual, x)

    def teacher(self) -> nn.Module:
        """A frozen, eval-mode copy of the vision tower (the DualToken / TokLIP distillation target)."""
        teacher = copy.deepcopy(self.visual)
        return teacher.eval().requires_grad_(False)

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if self._tokenizer is None:
            self._tokenizer = build_text_tokenizer(self.text_tokenizer, self.context_length)
        return self._tokenizer(list(texts))

    def encode_text(self, texts: Sequence[str] | torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        if not hasattr(self, "text"):
            raise NotImplementedError("this tokenizer was built without the text tower (with_text=False)")
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        features = self.text(tokens.to(self.logit_scale.device))
        return nn.functional.normalize(features, dim=-1) if normalize else features


def embed_patches(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Patch embedding + position embedding (+ patch drop / pre-norm): the input of layer 1."""
    trunk = visual.trunk
    x = trunk._pos_embed(trunk.patch_embed(pixels))
    return trunk.norm_pre(trunk.patch_drop(x))


def run_blocks(visual: nn.Module, x: torch.Tensor, start: int, stop: int, *, is_causal: bool = False,
               checkpointing: bool = False) -> torch.Tensor:
    for block in visual.trunk.blocks[start:stop]:
        if checkpointing:
            x = checkpoint(block, x, None, is_causal, use_reentrant=False)
        else:
            x = block(x, is_causal=is_causal)
    return x


def pool(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final norm + attention-pool head (+ the tower's projection head): the CLIP image embedding."""
    trunk = visual.trunk
    return visual.head(trunk.forward_head(trunk.norm(x)))


def build_text_tokenizer(spec: Optional[str], context_length: int):
    """`simple`: open_clip's bundled CLIP BPE (offline); a local directory: a Hugging Face tokenizer
    saved there (SigLIP's, with open_clip's canonicalize cleaning); `hf:NAME`: from the HF cache."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if spec == "simple":
        return SimpleTokenizer(context_length=context_length)
    if spec:
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise ImportError(f"text tokenizer {spec!r} is a Hugging Face tokenizer, which needs the transformers "
                              "package: pip install transformers")
    if spec and spec.startswith("hf:"):
        return HFTokenizer(spec[3:], context_length=context_length, clean="canonicalize")
    if spec and os.path.isdir(spec):
        return HFTokenizer(spec, context_length=context_length, clean="canonicalize")
    if spec:
        raise FileNotFoundError(f"text tokenizer {spec!r} is neither 'simple', 'hf:NAME' nor a local directory")
    raise ValueError("no text tokenizer configured: SigLIP's tokenizer files cannot be downloaded here; set "
                     "text_tokenizer to a local directory holding them (the tokenizer named by the open_clip "
                     "config's text_cfg.hf_tokenizer_name, saved with save_pretrained), 'hf:NAME' with a filled "
                     "Hugging Face cache, or pass token ids to encode_text")
