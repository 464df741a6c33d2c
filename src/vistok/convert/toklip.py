"""TokLIP checkpoints (TencentARC/TokLIP) -> a vistok release directory (inference: no teacher).

What a TokLIP file holds: its training (`open_clip_train/main.py`, `train.py`) saves
`{"epoch", "name", "state_dict", "optimizer", "scaler"}`; the state dict's keys carry DDP's `module.`
prefix in distributed runs (the saved model is the DDP wrapper), and the optimizer's learning rate is a NumPy float
(`cosine_lr`), pickled as `numpy.core.multiarray.scalar` under NumPy 1. The released `TokLIP_*.pt`
files are such checkpoints. `read_checkpoint` accepts those NumPy globals without running code.

Name mapping (TokLIP's open_clip model -> vistok):
    visual.trunk.vq.*          -> vq.*            (the frozen LlamaGen VQ, 344 tensors)
    visual.trunk.vq_table.*    -> vq_table.*      (token MLP 8 -> 4 x width)
    visual.trunk.vq_mapping.*  -> vq_mapping.*    (token MLP 4 x width -> width)
    visual.trunk.*             -> siglip.visual.trunk.*   (blocks, pos_embed, norm, attn_pool)
    text.*, logit_scale, logit_bias -> siglip.*

Keys TokLIP does not save are filled from vistok's initialisation of the SigLIP tower and reported
(`filled_from_init`): `visual.trunk.patch_embed.proj.{weight,bias}` (TokLIP's vendored timm comments
the patch projection out; its input is VQ ids, so it is never used) and `logit_bias` (removed by
`--siglip-train` before saving; SigLIP's initial value -10). Every other key is strict: one that
cannot be placed, is missing or has the wrong shape is a ValueError naming it.

The architecture comes from a preset (detected from `pos_embed`: 256 positions = TokLIP-S,
576 = TokLIP-L) or from TokLIP's model-config JSON (`src/open_clip/model_configs/*-toklip.json`),
see `toklip_args_from_model_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..tokenizers.registry import create_tokenizer, get_preset
from ..tokenizers.toklip import TokLIPTokenizer
from ..weights import load_state_dict_strict, read_checkpoint, strip_prefixes, unwrap_state_dict
from .checkpoint_io import check_destination

RULES = (("visual.trunk.vq_table.", "vq_table."), ("visual.trunk.vq_mapping.", "vq_mapping."),
         ("visual.trunk.vq.", "vq."), ("visual.", "siglip.visual."), ("text.", "siglip.text."),
         ("logit_scale", "siglip.logit_scale"), ("logit_bias", "siglip.logit_bias"))
# keys TokLIP's files lack by construction; anything else missing is an error
FILLABLE = ("siglip.visual.trunk.patch_embed.proj.weight", "siglip.visual.trunk.patch_embed.proj.bias",
            "siglip.logit_bias")
# TokLIP's timm trunk names (vendored timm, vision_transformer.py) with a vistok preset
KNOWN_TRUNKS = {"vit_so400m_patch16_toklip_256": "toklip-s-256", "vit_so400m_patch16_toklip_384": "toklip-l-384"}
PRESET_BY_POSITIONS = {256: "toklip-s-256", 576: "toklip-l-384"}
VISION_FIELDS = ("image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio")


def map_toklip_keys(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """TokLIP's state dict -> (vistok keys -> tensors, the TokLIP keys no rule places), by `RULES` prefix."""
    mapped, unplaced = {}, []
    for key, value in state_dict.items():
        rule = next((r for r in RULES if key.startswith(r[0])), None)
        if rule is None:
            unplaced.append(key)
        else:
            mapped[rule[1] + key[len(rule[0]):]] = value
    return mapped, unplaced


def toklip_args_from_model_config(config: dict | str | Path) -> tuple[Optional[str], dict]:
    """TokLIP's open_clip model config (a dict or the JSON file) -> (preset, constructor arguments).

    A trunk name in KNOWN_TRUNKS gives its preset and no arguments. Otherwise the SigLIP-style trunk
    is built from the config's own `vision_cfg` fields (image_size, patch_size, width, layers,
    heads = width / head_width, mlp_ratio; no class token, MAP pool, tanh GELU, LayerNorm eps 1e-6,
    as TokLIP's `vit_so400m_patch16_toklip_*`), the text tower from `text_cfg` and `embed_dim`, the
    token MLP 8 -> 4 x width -> width (TokLIP's `vq_table`/`vq_mapping`) and the VQ as LlamaGen VQ-16.
    Raises ValueError naming a missing or inconsistent field."""
    if not isinstance(config, dict):
        path = Path(config)
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the TokLIP model config {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"a TokLIP model config is a JSON object, not {json.dumps(config)[:40]}")
    vision, text = config.get("vision_cfg"), config.get("text_cfg")
    if not isinstance(vision, dict) or not isinstance(text, dict) or "embed_dim" not in config:
        raise ValueError("a TokLIP model config needs embed_dim, vision_cfg and text_cfg "
                         f"(got keys {sorted(config)})")
    name = vision.get("timm_model_name")
    if name in KNOWN_TRUNKS:
        return KNOWN_TRUNKS[name], {}
    missing = [f for f in VISION_FIELDS if f not in vision]
    if missing:
        raise ValueError(f"vision_cfg.timm_model_name {name!r} is not a known TokLIP trunk "
                         f"({', '.join(KNOWN_TRUNKS)}), so the trunk is built from vision_cfg's fields, "
                         f"but {missing} are missing")
    for field, value in [*((f"vision_cfg.{f}", vision[f]) for f in VISION_FIELDS), ("embed_dim", config["embed_dim"])]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{field} is {json.dumps(value)}; a TokLIP model config needs a positive number there")
    width, head_width = int(vision["width"]), int(vision["head_width"])
    if width % head_width:
        raise ValueError(f"vision_cfg.width {width} is not a multiple of head_width {head_width}")
    size, patch = int(vision["image_size"]), int(vision["patch_size"])
    vq = get_preset("toklip-s-256")["args"]["vq"]  # LlamaGen VQ-16: stride 16
    if size % 16:
        raise ValueError(f"vision_cfg.image_size {size} is not a multiple of the VQ-16 stride 16")
    heads, layers = width // head_width, int(vision["layers"])
    clip_config = {  # SiglipTower's explicit geometry: TokLIP's trunk has no timm entrypoint outside TokLIP
        "embed_dim": int(config["embed_dim"]),
        "init_logit_bias": config.get("init_logit_bias", -10),
        "vision_cfg": {"image_size": size, "patch_size": patch, "width": width, "layers": layers, "heads": heads,
                       "mlp_dim": int(width * float(vision["mlp_ratio"])), "act": "gelu_tanh", "norm_eps": 1e-6,
                       "pool": "map"},
        "text_cfg": {k: v for k, v in text.items() if k not in ("hf_tokenizer_name", "tokenizer_kwargs")},
    }
    args = {"clip_model": None, "clip_config": clip_config, "vq": vq, "mlp_hidden": 4 * width,
            "preprocess": {"image_size": size}}
    return None, args


def convert_toklip(src: str | Path, dst: str | Path, *, preset: Optional[str] = None,
                   config: Optional[str | Path | dict] = None, overwrite: bool = False) -> dict:
    """Convert a TokLIP checkpoint `src` into the release directory `dst`; returns a report (preset
    or "config", tensors read, parameters, the keys filled from initialisation, destination).
    `config`: TokLIP's model-config JSON, needed for a geometry without a preset; `preset` overrides."""
    check_destination(dst, "toklip", overwrite=overwrite)
    sd = strip_prefixes(unwrap_state_dict(read_checkpoint(src)), ["module."])
    mapped, unplaced = map_toklip_keys(sd)
    if unplaced:
        raise ValueError(f"{src}: {len(unplaced)} key(s) have no place in a TokLIP model: {sorted(unplaced)[:10]}")
    args: dict = {}
    if preset is None and config is not None:
        preset, args = toklip_args_from_model_config(config)
    if preset is None and not args:
        pos_embed = mapped.get("siglip.visual.trunk.pos_embed")
        positions = pos_embed.shape[1] if pos_embed is not None and pos_embed.ndim == 3 else None
        if positions in PRESET_BY_POSITIONS:
            preset = PRESET_BY_POSITIONS[positions]
        else:
            raise ValueError(f"{src}: visual.trunk.pos_embed has {positions or 'no'} positions, which no "
                             "preset has (TokLIP-S 256, TokLIP-L 576); pass --config with the model's TokLIP "
                             "model-config JSON (src/open_clip/model_configs/*-toklip.json) or --preset")
    try:
        tok = _build(preset, args)
    except (TypeError, ValueError) as exc:  # text_cfg fields open_clip's CLIPTextCfg cannot take
        if not args:
            raise
        raise ValueError(f"cannot build the TokLIP model from the model config's fields: {exc}") from None
    filled = _fill_from_init(tok, mapped)
    mapped = {k: v.float() if v.is_floating_point() else v for k, v in mapped.items()}
    load_state_dict_strict(tok, mapped, target=f"{preset or 'the TokLIP model config'} (from {src})")
    source = {"kind": "toklip", "file": Path(src).name, "preset": preset, "filled_from_init": filled}
    tok.save_pretrained(dst, extra={"source": source})
    return {"preset": preset or "config", "tensors": len(sd), "parameters": tok.num_parameters(),
            "filled_from_init": filled, "dst": str(dst)}


def _build(preset: Optional[str], args: dict):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the filled keys are the same on every conversion
        if preset is not None:
            return create_tokenizer(preset, with_teacher=False, **args)
        return TokLIPTokenizer(with_teacher=False, **args)


def _fill_from_init(tok, mapped: dict[str, torch.Tensor]) -> list[str]:
    """Add the FILLABLE keys the file lacks from the freshly built model; returns their names."""
    own = tok.state_dict()
    filled = [k for k in FILLABLE if k in own and k not in mapped]
    for key in filled:
        mapped[key] = own[key].detach().clone()
    return filled
