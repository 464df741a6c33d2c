"""Hugging Face transformers SigLIP / SigLIP2 folders read without transformers.

Two pieces, both pure functions:

- `clip_config_from_hf(config)`: an HF `config.json` dict (`SiglipModel`, `SiglipVisionModel`, or a
  NaFlex `Siglip2Model` at a fixed resolution) -> the open_clip-style `clip_config` that
  `SiglipTower` builds with that exact geometry (width, depth, heads, patch, image size, MLP width,
  tanh or erf GELU, LayerNorm eps; text tower width/depth/heads/MLP/vocab/context/projection).
- `hf_siglip_state_dict_to_vistok(state)`: HF tensor names (any prefix, e.g. the official DualToken
  model's `siglip_model.`) -> vistok's (open_clip/timm) names `visual.trunk.*`, `text.*`,
  `logit_scale`, `logit_bias`, with q/k/v fused as timm and `nn.MultiheadAttention` hold them.

Module correspondence (transformers `modeling_siglip.py` / `modeling_siglip2.py`):

| HF | vistok (timm trunk / open_clip text) |
|---|---|
| `vision_model.embeddings.patch_embedding` (Conv2d; SigLIP2 NaFlex: Linear over (py, px, c) patches) | `visual.trunk.patch_embed.proj` (Conv2d) |
| `vision_model.embeddings.position_embedding.weight` (N, D) (NaFlex: resized like HF, bilinear+antialias) | `visual.trunk.pos_embed` (1, N, D) |
| `vision_model.encoder.layers.i.{layer_norm1,layer_norm2}` | `visual.trunk.blocks.i.{norm1,norm2}` |
| `...self_attn.{q,k,v}_proj`, `out_proj` | `...attn.qkv` (fused), `attn.proj` |
| `...mlp.fc1/fc2` | `...mlp.fc1/fc2` |
| `vision_model.post_layernorm` | `visual.trunk.norm` |
| `vision_model.head.{probe, attention.in_proj_*, attention.out_proj, layernorm, mlp}` | `visual.trunk.attn_pool.{latent, q + kv, proj, norm, mlp}` |
| `text_model.embeddings.{token_embedding, position_embedding}` | `text.{token_embedding, positional_embedding}` |
| `text_model.encoder.layers.i.{layer_norm1, self_attn, layer_norm2, mlp.fc1, mlp.fc2}` | `text.transformer.resblocks.i.{ln_1, attn.in_proj_*/out_proj, ln_2, mlp.c_fc, mlp.c_proj}` |
| `text_model.final_layer_norm`, `text_model.head` | `text.ln_final`, `text.text_projection` |
| `logit_scale` (1,), `logit_bias` (1,) | `logit_scale` (), `logit_bias` () |
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..weights import load_state_dict_strict
from .registry import get_preset

# HF hidden_act -> timm act_layer name; gelu_new is the same tanh formula as gelu_pytorch_tanh
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
                   "layer_norm_eps": 1e-6, "vision_use_head": True}
SIGLIP2_VISION_DEFAULTS = {**{k: v for k, v in VISION_DEFAULTS.items() if k != "image_size"}, "num_patches": 256}
TEXT_DEFAULTS = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
                 "layer_norm_eps": 1e-6, "projection_size": None}
MODEL_TYPES = {"siglip": "siglip", "siglip_vision_model": "siglip", "siglip2": "siglip2",
               "siglip2_vision_model": "siglip2"}
# text vocabularies -> the tokenizer that goes with them (what the missing-tokenizer error names)
TOKENIZERS = {256000: "the Gemma tokenizer of SigLIP2 (GemmaTokenizerFast: tokenizer.json / tokenizer.model)",
              32000: "SigLIP's English SentencePiece tokenizer (SiglipTokenizer: spiece.model)",
              250000: "SigLIP's multilingual SentencePiece tokenizer (SiglipTokenizer: spiece.model)"}
# keys HF checkpoints may hold that carry no weights (position index buffers)
DROPPED = re.compile(r"(vision_model|text_model)\.embeddings\.position_ids$")


def model_type(config: dict) -> str:
    """'siglip' (fixed resolution: SigLIP and the fixed-resolution SigLIP2 checkpoints) or 'siglip2'
    (NaFlex) from a config.json dict; ValueError for anything else."""
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"config model_type {kind!r} is not a SigLIP model; supported: {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[kind]


def _section(config: dict, name: str, defaults: dict) -> dict:
    """A sub-config with transformers' defaults filled in (save_pretrained may omit default fields)."""
    section = config.get(name, {})
    if not isinstance(section, dict):
        raise ValueError(f"{name} is {json.dumps(section)[:40]}, not a JSON object")
    return _typed(name, {**defaults, **{k: v for k, v in section.items() if k in defaults}})


INT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
              "image_size", "patch_size", "num_patches", "vocab_size", "max_position_embeddings")


def _typed(name: str, section: dict) -> dict:
    """ValueError naming a size field that is not a positive integer (a string or null in config.json)."""
    for field in INT_FIELDS:
        value = section.get(field, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}.{field} is {json.dumps(value)}; expected a positive integer")
    return section


def _activation(section: str, act: str) -> str:
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"{section}.hidden_act={act!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[act]


def _check_heads(section: str, width: int, heads: int) -> None:
    if width % heads:
        raise ValueError(f"{section}: hidden_size {width} is not divisible by num_attention_heads {heads}")


def vision_geometry(config: dict, *, image_size: Optional[int] = None) -> dict:
    """The vision tower's geometry in vistok's terms (see `SiglipTower`'s explicit-geometry vision_cfg).
    `image_size` is needed only for NaFlex SigLIP2 (default: sqrt(num_patches) * patch_size, square)."""
    kind = model_type(config)
    vision = config if config.get("model_type", "").endswith("_vision_model") else None
    defaults = SIGLIP2_VISION_DEFAULTS if kind == "siglip2" else VISION_DEFAULTS
    v = _section({"vision_config": vision}, "vision_config", defaults) if vision is not None else \
        _section(config, "vision_config", defaults)
    if v["num_channels"] != 3:
        raise ValueError(f"vision_config.num_channels={v['num_channels']} is not supported (RGB only: 3)")
    if not v["vision_use_head"]:
        raise ValueError("vision_config.vision_use_head=false is not supported: DualToken and TokLIP pool with "
                         "the attention-pool head")
    _check_heads("vision_config", v["hidden_size"], v["num_attention_heads"])
    patch = int(v["patch_size"])
    if kind == "siglip2":
        side = math.isqrt(int(v["num_patches"]))
        if side * side != v["num_patches"]:
            raise ValueError(f"vision_config.num_patches={v['num_patches']} is not a square grid")
        size = int(image_size or side * patch)
    else:
        size = int(v["image_size"])
        if image_size is not None and image_size != size:
            raise ValueError(f"image_size={image_size} differs from the fixed-resolution config's {size}; only "
                             "NaFlex SigLIP2 (model_type siglip2) is rebuilt at another resolution")
    if size < patch:  # otherwise floor(size / patch) patches per side, as HF's strided conv (384 / 14 -> 27)
        raise ValueError(f"image size {size} is smaller than vision_config.patch_size {patch}")
    return {"image_size": size, "patch_size": patch, "width": int(v["hidden_size"]),
            "layers": int(v["num_hidden_layers"]), "heads": int(v["num_attention_heads"]),
            "mlp_dim": int(v["intermediate_size"]), "act": _activation("vision_config", v["hidden_act"]),
            "norm_eps": float(v["layer_norm_eps"]), "pool": "map"}


def text_config_from_hf(config: dict) -> Optional[dict]:
    """open_clip `text_cfg` of the HF text tower (`mlp_dim` is vistok's exact MLP width), None without one."""
    if "text_config" not in config and config.get("model_type", "").endswith("_vision_model"):
        return None
    t = _section(config, "text_config", TEXT_DEFAULTS)
    _check_heads("text_config", t["hidden_size"], t["num_attention_heads"])
    act = _activation("text_config", t["hidden_act"])
    out = {"context_length": int(t["max_position_embeddings"]), "vocab_size": int(t["vocab_size"]),
           "width": int(t["hidden_size"]), "heads": int(t["num_attention_heads"]),
           "layers": int(t["num_hidden_layers"]), "mlp_dim": int(t["intermediate_size"]),
           "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
           "norm_kwargs": {"eps": float(t["layer_norm_eps"])}}
    if act == "gelu_tanh":
        out["act_kwargs"] = {"approximate": "tanh"}
    out["projection_dim"] = int(t["projection_size"] or t["hidden_size"])
    return out


def clip_config_from_hf(config: dict, *, image_size: Optional[int] = None) -> dict:
    """An HF SigLIP / SigLIP2 `config.json` dict -> the `clip_config` that `SiglipTower` (and
    DualToken / TokLIP's `clip_config` argument, with `clip_model=None`) builds exactly.

    Accepts model_type "siglip" (SiglipModel; also the fixed-resolution SigLIP2 checkpoints such as
    siglip2-so400m-patch14-384), "siglip_vision_model" (vision only: no text tower), "siglip2" (NaFlex,
    rebuilt at the fixed square `image_size`, default sqrt(num_patches) x patch) and
    "siglip2_vision_model". Raises ValueError naming the field for anything it cannot build
    (another model_type, non-RGB input, hidden_act other than gelu / gelu_pytorch_tanh / gelu_new,
    no attention-pool head, widths not divisible by the head count, image smaller than a patch).

    The returned dict is JSON-serialisable: `vision_cfg` carries the explicit geometry (no timm
    model name), `text_cfg` open_clip's text fields plus `mlp_dim` (exact MLP width), and
    `embed_dim` is the text projection width (= the vision width for SigLIP: both pooled outputs
    live in one space).
    """
    if not isinstance(config, dict):
        raise ValueError(f"an HF config must be a dict (config.json), got {type(config).__name__}")
    vision = vision_geometry(config, image_size=image_size)
    vision["hf_model_type"] = model_type(config)
    out = {"embed_dim": vision["width"], "vision_cfg": vision}
    text = text_config_from_hf(config)
    if text is not None:
        projection = text.pop("projection_dim")
        if projection != vision["width"]:
            raise ValueError(f"text_config.projection_size {projection} differs from vision_config.hidden_size "
                             f"{vision['width']}: SigLIP image and text embeddings must share one width")
        out["text_cfg"] = text
    return out


def tokenizer_hint(clip_config: dict) -> Optional[str]:
    """Which tokenizer an HF-built text tower needs, from its vocabulary size (None if not known)."""
    return TOKENIZERS.get(clip_config.get("text_cfg", {}).get("vocab_size"))


# ---------------------------------------------------------------------------------------------- weights
def find_prefix(state: dict[str, torch.Tensor]) -> str:
    """The prefix before `vision_model.` in HF names ('' for a SiglipModel file, 'siglip_model.' inside
    the official DualToken model, ...); ValueError if no key holds `vision_model.`."""
    prefixes = {k[: k.index("vision_model.")] for k in state if "vision_model." in k}
    if not prefixes:
        raise ValueError("no HF SigLIP vision keys (`vision_model.*`, or a bare vision tower's "
                         "`embeddings.patch_embedding.weight`) found in the state dict")
    if len(prefixes) > 1:
        raise ValueError(f"HF SigLIP keys under several prefixes {sorted(prefixes)}: pass prefix=")
    return prefixes.pop()


BARE_VISION_KEY = "embeddings.patch_embedding.weight"


def _with_vision_model_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare vision tower's names (transformers 5 saves SiglipVisionModel as `embeddings.*`,
    `encoder.*`, `post_layernorm.*`, `head.*`) under `vision_model.` as SiglipModel names them."""
    if any("vision_model." in k for k in state):
        return state
    bare = [k[: -len(BARE_VISION_KEY)] for k in state if k.endswith(BARE_VISION_KEY)]
    if len(bare) != 1:
        return state
    return {(bare[0] + "vision_model." + k[len(bare[0]):] if k.startswith(bare[0]) else k): v for k, v in state.items()}


def _split_in_proj(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = w.shape[0] // 3
    return w[:d], w[d:]


# HF encoder-layer names -> timm Block (vision) and open_clip ResidualAttentionBlock (text) names; the fused
# q/k/v projection is the concatenation of HF's three, under the last entry's names
_VISION_LAYER_NAMES = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
                       "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "qkv": ("attn.qkv.weight", "attn.qkv.bias")}
_TEXT_LAYER_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                     "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj", "qkv": ("attn.in_proj_weight", "attn.in_proj_bias")}


def _encoder_layer(rest: str, get, names: dict) -> dict[str, torch.Tensor]:
    """One HF encoder layer's tensors under `rest` (e.g. 'vision_model.encoder.layers.3.') in vistok's names."""
    out = {}
    for hf, ours in names.items():
        if hf == "qkv":
            for p, fused in zip(("weight", "bias"), ours):
                out[fused] = torch.cat([get(f"{rest}self_attn.{n}_proj.{p}") for n in "qkv"])
        else:
            for p in ("weight", "bias"):
                out[f"{ours}.{p}"] = get(f"{rest}{hf}.{p}")
    return out


def _layer_indices(state: dict, stem: str) -> list[int]:
    pattern = re.compile(re.escape(stem) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def resize_position_embedding(weight: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """NaFlex SigLIP2's position table (side*side, D) -> (h*w, D) as transformers resizes it
    (bilinear, align_corners=False, antialias=True, in fp32), row-major."""
    side = math.isqrt(weight.shape[0])
    table = weight.float().reshape(side, side, -1).permute(2, 0, 1)[None]
    resized = F.interpolate(table, size=grid, mode="bilinear", align_corners=False, antialias=True)
    return resized[0].permute(1, 2, 0).reshape(grid[0] * grid[1], -1).to(weight.dtype)


def _vision(get, state: dict, grid: Optional[tuple[int, int]]) -> dict[str, torch.Tensor]:
    v = "vision_model."
    out = {}
    patch = get(f"{v}embeddings.patch_embedding.weight")
    if patch.ndim == 2:  # NaFlex SigLIP2: Linear over patches flattened as (py, px, channel)
        p = math.isqrt(patch.shape[1] // 3)
        patch = patch.reshape(patch.shape[0], p, p, 3).permute(0, 3, 1, 2).contiguous()
        positions = get(f"{v}embeddings.position_embedding.weight")
        side = math.isqrt(positions.shape[0])
        positions = resize_position_embedding(positions, tuple(grid or (side, side)))
    else:
        positions = get(f"{v}embeddings.position_embedding.weight")
    out["patch_embed.proj.weight"] = patch
    out["patch_embed.proj.bias"] = get(f"{v}embeddings.patch_embedding.bias")
    out["pos_embed"] = positions[None]
    out.update(_encoder_layers(get, state, f"{v}encoder.layers.", _VISION_LAYER_NAMES, "blocks"))
    for p in ("weight", "bias"):
        out[f"norm.{p}"] = get(f"{v}post_layernorm.{p}")
        out[f"attn_pool.norm.{p}"] = get(f"{v}head.layernorm.{p}")
        out[f"attn_pool.proj.{p}"] = get(f"{v}head.attention.out_proj.{p}")
        out[f"attn_pool.mlp.fc1.{p}"] = get(f"{v}head.mlp.fc1.{p}")
        out[f"attn_pool.mlp.fc2.{p}"] = get(f"{v}head.mlp.fc2.{p}")
    out["attn_pool.latent"] = get(f"{v}head.probe")
    out["attn_pool.q.weight"], out["attn_pool.kv.weight"] = _split_in_proj(get(f"{v}head.attention.in_proj_weight"))
    out["attn_pool.q.bias"], out["attn_pool.kv.bias"] = _split_in_proj(get(f"{v}head.attention.in_proj_bias"))
    return {f"visual.trunk.{k}": t for k, t in out.items()}


def _encoder_layers(get, state: dict, src: str, names, dst: str) -> dict[str, torch.Tensor]:
    """Every HF encoder layer under `src` ("...encoder.layers.") renamed to vistok's `dst.{i}.` blocks."""
    return {f"{dst}.{i}.{k}": t for i in _layer_indices(state, src)
            for k, t in _encoder_layer(f"{src}{i}.", get, names).items()}


def _text(get, state: dict) -> dict[str, torch.Tensor]:
    t = "text_model."
    out = {"token_embedding.weight": get(f"{t}embeddings.token_embedding.weight"),
           "positional_embedding": get(f"{t}embeddings.position_embedding.weight")}
    out.update(_encoder_layers(get, state, f"{t}encoder.layers.", _TEXT_LAYER_NAMES, "transformer.resblocks"))
    for p in ("weight", "bias"):
        out[f"ln_final.{p}"] = get(f"{t}final_layer_norm.{p}")
        out[f"text_projection.{p}"] = get(f"{t}head.{p}")
    return {f"text.{k}": v for k, v in out.items()}


def key_list(kind: str, keys: list[str]) -> str:
    """'missing 12: a, b, ... ' - a key-mismatch list cut to 8 names, for one-line errors."""
    return f"{kind} {len(keys)}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"


def hf_siglip_state_dict_to_vistok(
    state: dict[str, torch.Tensor], *, prefix: Optional[str] = None, grid: Optional[tuple[int, int]] = None,
    with_text: Optional[bool] = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF SigLIP / SigLIP2 tensors -> vistok `SiglipTower` tensors.

    state: HF names, optionally under a prefix (`prefix=None` finds it: the text before
    `vision_model.`; keys outside the prefix are ignored, so a whole official DualToken state dict
    can be passed, its prefix `siglip_model.` found). A bare vision tower's names (`embeddings.*`,
    `encoder.*`, `post_layernorm.*`, `head.*`, as transformers 5 saves SiglipVisionModel) are read as
    `vision_model.*` when prefix is None. grid: the (h, w) patch grid to resize a NaFlex
    SigLIP2 position table to (default its own square). with_text: map the text tower and logit
    scalars (default: if the state holds `text_model.*`).

    Returns (vistok state dict, dropped HF keys). Dropped are only the weightless
    `*.embeddings.position_ids` buffers. Every other key under the prefix must be consumed:
    ValueError lists missing HF keys and unknown ones. q/k/v are concatenated (timm `qkv`,
    `nn.MultiheadAttention.in_proj_*`), the MAP head's in_proj is split into timm's `q` and `kv`,
    logit_scale/logit_bias (1,) become scalars. Tensors keep their dtype.
    """
    if prefix is None:
        state = _with_vision_model_names(state)
        prefix = find_prefix(state)
    ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    dropped = [prefix + k for k in ours if DROPPED.match(k)]
    ours = {k: v for k, v in ours.items() if not DROPPED.match(k)}
    if with_text is None:
        with_text = any(k.startswith("text_model.") for k in ours)
    used: set[str] = set()
    missing: list[str] = []

    def get(name: str) -> torch.Tensor:
        if name not in ours:
            missing.append(prefix + name)
            return torch.empty(0)
        used.add(name)
        return ours[name]

    out = _vision(get, ours, grid)
    if with_text:
        out.update(_text(get, ours))
        for name in ("logit_scale", "logit_bias"):
            value = get(name)
            out[name] = value.reshape(()) if value.numel() == 1 else value
    else:
        used.update(k for k in ours if k.startswith("text_model.") or k in ("logit_scale", "logit_bias"))
    unknown = sorted(prefix + k for k in ours if k not in used)
    if missing or unknown:
        parts = [key_list(kind, keys) for kind, keys in (("missing", missing), ("unknown", unknown)) if keys]
        raise ValueError("HF SigLIP state dict does not fit the SigLIP layout: " + "; ".join(parts))
    return out, dropped


# ---------------------------------------------------------------------------------------------- folders
def is_hf_siglip_folder(path: str | Path) -> bool:
    """A directory with an HF config.json whose model_type is a SigLIP one."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in MODEL_TYPES
    except (json.JSONDecodeError, AttributeError):
        return False


def read_hf_config(path: str | Path) -> dict:
    """The parsed config.json of an HF SigLIP folder; FileNotFoundError without one, ValueError if it is not JSON."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no config.json in HF SigLIP folder {path}")
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config} is not valid JSON: {exc}") from None


def read_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards named by model.safetensors.index.json (never pickles)."""
    from safetensors.torch import load_file

    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    def load(file: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(file))
        except Exception as exc:  # safetensors raises its own error type for truncated / corrupt files
            raise ValueError(f"cannot read {file}: {exc}") from None

    if single.is_file():
        return load(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index} is not a safetensors index (no weight_map of shard names): {exc!r}") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load(path / shard))
        return state
    raise FileNotFoundError(f"HF SigLIP folder {path} has no model.safetensors (nor a sharded index); "
                            "transformers' pytorch_model.bin pickles are not read: re-save with safe_serialization")


def load_hf_siglip_folder(path: str | Path, *, image_size: Optional[int] = None,
                          with_text: Optional[bool] = None) -> tuple[dict, dict[str, torch.Tensor], list[str]]:
    """(clip_config, vistok state dict, dropped keys) of an HF SigLIP / SigLIP2 folder; `image_size`
    only for NaFlex SigLIP2 (see `clip_config_from_hf`)."""
    clip_config = clip_config_from_hf(read_hf_config(path), image_size=image_size)
    side = clip_config["vision_cfg"]["image_size"] // clip_config["vision_cfg"]["patch_size"]
    state, dropped = hf_siglip_state_dict_to_vistok(read_hf_weights(path), grid=(side, side), with_text=with_text)
    return clip_config, state, dropped


def siglip_init_args(path: str | Path, *, image_size: Optional[int] = None, preset: Optional[str] = None) -> dict:
    """Constructor arguments (DualToken / TokLIP) that build an HF SigLIP folder's exact geometry and
    load its weights: {"clip_model": None, "clip_config": ..., "siglip_weights": path}. A NaFlex
    SigLIP2 folder is built at `image_size`, else at the preset's preprocess image size."""
    hf = read_hf_config(path)
    if image_size is None and preset and model_type(hf) == "siglip2":
        image_size = get_preset(preset)["args"].get("preprocess", {}).get("image_size")
    config = clip_config_from_hf(hf, image_size=image_size)
    return {"clip_model": None, "clip_config": config, "siglip_weights": str(path)}


def load_hf_siglip_folder_into(tower, path: str | Path) -> None:
    """An HF SigLIP folder's weights into a `SiglipTower` built with its geometry, strictly; a tower of
    another geometry is refused naming the differing fields (activation and eps included, which shapes
    alone would not reveal)."""
    with_text = hasattr(tower, "text")
    kind = model_type(read_hf_config(path))
    size = tower.image_size[0] if kind == "siglip2" else None
    wanted = clip_config_from_hf(read_hf_config(path), image_size=size)
    built = tower.clip_config
    diffs = [f"vision_cfg.{k}: folder {v!r}, tower {built['vision_cfg'].get(k)!r}"
             for k, v in wanted["vision_cfg"].items() if built["vision_cfg"].get(k) != v]
    if with_text:
        if "text_cfg" not in wanted:
            raise ValueError(f"{path} is a vision-only SigLIP folder: build the tower with with_text=False")
        diffs += [f"text_cfg.{k}: folder {v!r}, tower {built.get('text_cfg', {}).get(k)!r}"
                  for k, v in wanted["text_cfg"].items() if built.get("text_cfg", {}).get(k) != v]
    if diffs:
        raise ValueError(f"the SigLIP tower was not built with the geometry of {path} ({'; '.join(diffs[:6])}): build "
                         "it with clip_model=None, clip_config=clip_config_from_hf(config.json) "
                         "(vistok.tokenizers.siglip_hf.siglip_init_args does; `vistok convert siglip` too)")
    _, state, _ = load_hf_siglip_folder(path, image_size=size, with_text=with_text)
    load_state_dict_strict(tower, state, target=f"SigLIP tower from {path}")
