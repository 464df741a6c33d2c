"""SigLIP towers from open_clip / timm, run block by block so callers can tap and replace layers.

`SiglipTower` holds an open_clip `CustomTextCLIP`'s parts under open_clip's own names (`visual.trunk.*`,
`text.*`, `logit_scale`, `logit_bias`), so an open_clip SigLIP weights file loads into it strictly.
Building never downloads: the architecture comes from open_clip's bundled JSON configs (or a config
dict), with timm's `pretrained=False`, or from an explicit geometry (`vision_cfg` with image_size,
patch_size, width, layers, heads, mlp_dim, act, norm_eps instead of a timm model name: what
`siglip_hf.clip_config_from_hf` makes of an HF transformers SigLIP config.json), under the same names.

Layers are counted from 1 as in the DualToken paper: "layer k" is the output of `trunk.blocks[k-1]`.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..weights import load_state_dict_strict, read_checkpoint, strip_prefixes, unwrap_state_dict
from .siglip_hf import is_hf_siglip_folder, load_hf_siglip_folder_into, tokenizer_hint

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
    vision = cfg.get("vision_cfg", {})
    if "timm_model_name" not in vision and not EXPLICIT_VISION_KEYS <= set(vision):
        missing = sorted(EXPLICIT_VISION_KEYS - set(vision))
        raise ValueError("the SigLIP tower needs vision_cfg.timm_model_name (a timm trunk) or an explicit geometry "
                         f"(vision_cfg lacks {missing}; see vistok.tokenizers.siglip_hf.clip_config_from_hf)")
    return cfg


# vision_cfg keys of an explicit geometry (built as a timm VisionTransformer without a registered name)
EXPLICIT_VISION_KEYS = {"image_size", "patch_size", "width", "layers", "heads", "mlp_dim", "act", "norm_eps"}


class ExplicitVisual(nn.Module):
    """open_clip `TimmModel`'s layout (`trunk`, empty `head`) for a SigLIP ViT of any geometry.
    open_clip's TimmModel passes no architecture arguments to timm, so the trunk is built here."""

    def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_dim: int,
                 act: str, norm_eps: float, pool: str = "map", hf_model_type: Optional[str] = None, **unknown):
        super().__init__()
        if unknown:  # a misspelt field would otherwise build a default geometry without a word
            raise ValueError(f"unknown vision_cfg field(s) {sorted(unknown)} in an explicit SigLIP geometry; known: "
                             f"{sorted(EXPLICIT_VISION_KEYS | {'pool', 'hf_model_type'})}")
        from functools import partial

        from timm.models.vision_transformer import VisionTransformer

        if pool != "map":
            raise ValueError(f"vision_cfg.pool={pool!r} is not supported (SigLIP's attention pool: 'map')")
        self.trunk = VisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=width, depth=layers, num_heads=heads,
            mlp_ratio=exact_ratio(mlp_dim, width), class_token=False, global_pool="map", num_classes=0,
            act_layer=act, norm_layer=partial(nn.LayerNorm, eps=norm_eps))
        self.head = nn.Sequential()
        self.image_size = (image_size, image_size)


def exact_ratio(hidden: int, width: int) -> float:
    """An mlp_ratio with int(width * ratio) == hidden (timm and open_clip size MLPs that way)."""
    return (hidden + 0.5) / width


def explicit_text_tower(embed_dim: int, text_cfg: dict) -> nn.Module:
    """open_clip's TextTransformer from a text_cfg whose `mlp_dim` gives the exact MLP width."""
    from open_clip.model import _build_text_tower

    cfg = dict(text_cfg)
    if "mlp_dim" in cfg:
        cfg["mlp_ratio"] = exact_ratio(cfg.pop("mlp_dim"), cfg["width"])
    return _build_text_tower(embed_dim, cfg)


class SiglipTower(nn.Module):
    """An open_clip SigLIP model's vision tower (and optionally its text tower), tap-friendly.

    clip_model: an open_clip model name; clip_config: an open_clip config dict updating it, or a
    whole explicit-geometry config (see the module docstring); with_text: build the text tower and
    logit scalars; text_tokenizer: see `build_text_tokenizer`. ValueError for a config it cannot build.
    """

    def __init__(self, *, clip_model: Optional[str] = None, clip_config: Optional[dict] = None,
                 with_text: bool = True, text_tokenizer: Optional[str] = None):
        super().__init__()
        import open_clip

        register_tiny_trunk()
        cfg = clip_model_config(clip_model, clip_config)
        self.clip_config = cfg
        if "timm_model_name" in cfg["vision_cfg"]:
            args = {k: v for k, v in cfg.items() if k not in ("custom_text",)}
            clip = open_clip.CustomTextCLIP(**args)
            self.visual = clip.visual
            if with_text:
                self.text, self.logit_scale, self.logit_bias = clip.text, clip.logit_scale, clip.logit_bias
        else:
            self.visual = ExplicitVisual(**cfg["vision_cfg"])
            if with_text:
                if "text_cfg" not in cfg:
                    raise ValueError("this SigLIP config has no text tower (a vision-only model): build with "
                                     "with_text=False")
                self.text = explicit_text_tower(cfg["embed_dim"], cfg["text_cfg"])
                self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))  # SigLIP's init (t' = log 10)
                self.logit_bias = nn.Parameter(torch.tensor(float(cfg.get("init_logit_bias", -10.0))))
        self.context_length = int(cfg.get("text_cfg", {}).get("context_length", 77))
        self.tokenizer_hint = tokenizer_hint(cfg)
        self.text_tokenizer = text_tokenizer
        self._tokenizer = None
        self.grad_checkpointing = False

    @property
    def trunk(self) -> nn.Module:
        """The timm ViT trunk of the vision tower (`visual.trunk`)."""
        return self.visual.trunk

    @property
    def num_layers(self) -> int:
        """The number of transformer blocks in the vision trunk."""
        return len(self.trunk.blocks)

    @property
    def width(self) -> int:
        """The trunk's token width."""
        return self.trunk.embed_dim

    @property
    def grid(self) -> tuple[int, int]:
        """The token grid (h, w) at the tower's input size."""
        return tuple(self.trunk.patch_embed.grid_size)

    @property
    def image_size(self) -> tuple[int, int]:
        """The one input size (H, W) the tower takes."""
        return tuple(self.trunk.patch_embed.img_size)

    # ------------------------------------------------------------------ vision, block by block
    def embed_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W), normalised for the tower -> the input of layer 1 (B, h*w, width)."""
        return embed_patches(self.visual, pixels)

    def run_blocks(self, x: torch.Tensor, start: int, stop: int, *, is_causal: bool = False) -> torch.Tensor:
        """Run layers start+1..stop (1-based) on tokens x that are the output of layer `start`."""
        return run_blocks(self.visual, x, start, stop, is_causal=is_causal,
                          checkpointing=self.grad_checkpointing and self.training)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Layer outputs (B, N, width) -> final norm + attention-pool head: the CLIP image embedding (B, E)."""
        return pool(self.visual, x)

    def teacher(self) -> nn.Module:
        """A frozen, eval-mode copy of the vision tower (the DualToken / TokLIP distillation target)."""
        teacher = copy.deepcopy(self.visual)
        return teacher.eval().requires_grad_(False)

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> int64 token ids (B, context_length) with the configured text tokenizer (built on first use)."""
        if self._tokenizer is None:
            self._tokenizer = build_text_tokenizer(self.text_tokenizer, self.context_length, hint=self.tokenizer_hint)
        return self._tokenizer(list(texts))

    def encode_text(self, texts: Sequence[str] | torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """Texts (strings or int64 ids (B, context_length)) -> text embeddings (B, E), L2-normalised when
        `normalize`. NotImplementedError without a text tower; ValueError when strings need a tokenizer
        that is not configured."""
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
    """Run blocks start+1..stop (1-based) of `visual`'s trunk on x (B, N, width), optionally causal or checkpointed."""
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


def build_text_tokenizer(spec: Optional[str], context_length: int, *, hint: Optional[str] = None):
    """`simple`: open_clip's bundled CLIP BPE (offline); a local directory: a Hugging Face tokenizer
    saved there (SigLIP's SentencePiece or SigLIP2's Gemma tokenizer, e.g. the HF SigLIP folder
    itself, with open_clip's canonicalize cleaning); `hf:NAME`: from the HF cache. `hint` names the
    tokenizer the text tower needs (in the error raised when none is configured)."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if spec == "simple":
        return SimpleTokenizer(context_length=context_length)
    if spec:
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise ImportError(f"text tokenizer {spec!r} is a Hugging Face tokenizer, which needs the transformers "
                              "package: pip install 'vistok[text]' (transformers + sentencepiece)")
    if spec and spec.startswith("hf:"):
        return HFTokenizer(spec[3:], context_length=context_length, clean="canonicalize")
    if spec and os.path.isdir(spec):
        return HFTokenizer(spec, context_length=context_length, clean="canonicalize")
    if spec:
        raise FileNotFoundError(f"text tokenizer {spec!r} is neither 'simple', 'hf:NAME' nor a local directory")
    which = (f"this text tower needs {hint}" if hint else
             "this text tower needs the tokenizer named by the open_clip config's text_cfg.hf_tokenizer_name")
    raise ValueError(f"no text tokenizer configured ({which}); its files cannot be downloaded here: set "
                     "text_tokenizer to a local directory holding them (the HF SigLIP folder's tokenizer files, or "
                     "any tokenizer saved with save_pretrained), 'hf:NAME' with a filled Hugging Face cache, or pass "
                     "token ids to encode_text")


def load_siglip_weights(tower: SiglipTower, path: str) -> None:
    """SigLIP weights into the tower, strictly: an open_clip weights file (safetensors or torch pickle,
    `state_dict` / `module.` unwrapped), or an HF transformers SigLIP / SigLIP2 folder (config.json +
    model.safetensors), whose geometry must be the one the tower was built with (build with
    `siglip_hf.siglip_init_args(folder)`, as `vistok convert siglip` does). Without a text tower the
    text keys are skipped."""
    if is_hf_siglip_folder(path):
        load_hf_siglip_folder_into(tower, path)
        return
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory but not an HF SigLIP folder (config.json with model_type siglip "
                         "or siglip2): give an open_clip weights file or an HF SigLIP / SigLIP2 folder")
    state = strip_prefixes(unwrap_state_dict(read_checkpoint(path)), ["module."])
    if not hasattr(tower, "text"):
        state = {k: v for k, v in state.items() if not k.startswith(("text.", "logit_scale", "logit_bias"))}
    load_state_dict_strict(tower, state, target=f"SigLIP tower from {path}")
