"""Checkpoints of the official DualToken code (songweii/DualToken) -> a vistok release directory.

SRC is an `epoch_N.pt` as the official `main.py` writes it: `{"epoch", "name", "state_dict",
"optimizer"[, "scaler"]}` with the `RQVAESiglipModel` state dict (read with weights_only=True; the
optimizer and scaler entries are ignored). The model config is the official
`model_config_*/config.json` (the outer `rqvaesigliptransformer_model` config with its nested
`rqvaesiglip` section, or that section alone). Its `pretrained_model` names an HF SigLIP folder
whose `config.json` gives the tower and text geometry; the weights all come from the checkpoint.

Name mapping (official -> vistok):

| official | vistok |
|---|---|
| `siglip_model.{vision_model,text_model}.*`, `logit_scale`, `logit_bias` | `siglip.*` (siglip_hf mapping) |
| `prequant_pix` / `prequant_shortcut` / `prequant_sem` | `pixel_in` / `shortcut_in` / `semantic_in` |
| `postquant_pix` / `postquant_sem` | `pixel_out` / `semantic_out` |
| AttnProjection `norm1` / `norm3` / `norm2` / `proj` | `attn_norm` / `linear_norm` / `mlp_norm` / `linear` |
| GeGluMlp `mlp.{norm,w0,w1,w2}` | `mlp.{norm,gate,value,out}` |
| `quantizer_{pix,sem}.codebooks.i.{weight[:-1], embed_ema, cluster_size_ema}` | `{pixel,semantic}_quantizer.{embed, embed_avg, cluster_size}[i]` |
| `post_quant_conv.*`, `decoder.*` | `post_quant.*`, `decoder.*` |

Deliberately dropped: each codebook's padding row (`weight[n_embed]`, the nn.Embedding padding
index, never a code), the all-zero `attn.zero_k_bias` buffers (vistok adds no key bias), the
weightless `*.position_ids` buffers, and with a shared codebook the repeated `codebooks.1..D-1`
entries (the same tensors as `codebooks.0`; checked). Every other key must be consumed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from ..tokenizers.dualtoken import DualTokenTokenizer
from ..tokenizers.siglip_hf import (clip_config_from_hf, hf_siglip_state_dict_to_vistok, key_list, read_hf_config,
                                    read_hf_weights)
from ..weights import load_state_dict_strict, read_checkpoint, strip_prefixes
from .checkpoint_io import check_destination

PROJECTIONS = {"prequant_pix": "pixel_in", "prequant_shortcut": "shortcut_in", "prequant_sem": "semantic_in",
               "postquant_pix": "pixel_out", "postquant_sem": "semantic_out"}
PROJECTION_PARTS = {"norm1": "attn_norm", "norm3": "linear_norm", "norm2": "mlp_norm", "proj": "linear",
                    "attn.qkv": "attn.qkv", "attn.q_bias": "attn.q_bias", "attn.v_bias": "attn.v_bias",
                    "attn.proj": "attn.proj", "mlp.norm": "mlp.norm", "mlp.w0": "mlp.gate", "mlp.w1": "mlp.value",
                    "mlp.w2": "mlp.out"}
SCHEDULES = {"rq": "per_depth", "rq_ema": "per_step"}
QUANTIZERS = {"quantizer_pix": "pixel_quantizer", "quantizer_sem": "semantic_quantizer"}
OFFICIAL_BUFFERS = {"embed": "weight[:-1]", "embed_avg": "embed_ema", "cluster_size": "cluster_size_ema"}
# vistok-only quantizer bookkeeping (usage statistics, step counters): fresh values in a converted release
VISTOK_ONLY = re.compile(r"(pixel|semantic)_quantizer\.(steps_unused|last_used|last_counts|step|restarts_total|"
                         r"restarts_last|initted|dead_last)$")


# ---------------------------------------------------------------------------------------------- config
def find_config(src: Path, config: Optional[str | os.PathLike]) -> Path:
    """The official model config: `config` (a file, or a folder holding config.json), else
    config.json beside SRC."""
    path = Path(config) if config is not None else src.parent / "config.json"
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        where = f"--config {config}" if config is not None else f"beside {src} (no config.json there)"
        raise FileNotFoundError(f"official DualToken model config not found: {where}; pass --config with the "
                                "model_config_*/config.json the checkpoint was trained with (or its folder)")
    return path


def read_official_config(path: Path) -> dict:
    """The `rqvaesiglip` section (the inner RQVAESiglipConfig) of an official config.json."""
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not an official DualToken model config: it holds {json.dumps(cfg)[:40]}, "
                         "not a JSON object")
    if isinstance(cfg.get("rqvaesiglip"), dict):
        return _checked(cfg["rqvaesiglip"], path)
    if cfg.get("model_type") == "rqvaesiglip_model" or "vq_pix" in cfg:
        return _checked(cfg, path)
    raise ValueError(f"{path} is not an official DualToken model config: it has neither an 'rqvaesiglip' "
                     f"section nor the RQVAESiglip fields (model_type {cfg.get('model_type')!r})")


# the fields dualtoken_args reads, with their JSON types (None: may be null)
REQUIRED = {"layer_recon": (int,), "layer_sem": (int,), "ddconfig": (dict,), "vq_pix": (dict,), "vq_sem": (dict,)}
REQUIRED_DD = {"ch": (int,), "ch_mult": (list,), "num_res_blocks": (int,), "attn_resolutions": (list,),
               "decoder_in_channels": (int,)}
REQUIRED_VQ = {"code_shape": (list,), "latent_shape": (list,), "embed_dim": (int,), "n_embed": (int,),
               "decay": (float, int)}


def _checked(cfg: dict, path: Path) -> dict:
    """The rqvaesiglip section, once every field `dualtoken_args` reads is there with its JSON type."""
    def check(section: dict, fields: dict, where: str) -> None:
        for field, types in fields.items():
            value = section.get(field)
            if value is None or isinstance(value, bool) or not isinstance(value, types):
                what = "lacks" if field not in section else f"has {json.dumps(value)} for"
                raise ValueError(f"{path}: the rqvaesiglip section {what} {where}{field} (expected a JSON "
                                 f"{ {dict: 'object', list: 'list', int: 'integer', float: 'number'}[types[0]]})")

    check(cfg, REQUIRED, "")
    check(cfg["ddconfig"], REQUIRED_DD, "ddconfig.")
    for branch in ("vq_pix", "vq_sem"):
        check(cfg[branch], REQUIRED_VQ, f"{branch}.")
        for field in ("code_shape", "latent_shape"):
            if len(cfg[branch][field]) != 3:
                raise ValueError(f"{path}: {branch}.{field} {cfg[branch][field]} is not [height, width, depth]")
    return cfg


def find_pretrained(cfg: dict, config_path: Path, pretrained: Optional[str | os.PathLike]) -> Path:
    """The HF SigLIP folder: `pretrained`, else the config's `pretrained_model` as given, then relative
    to the config's folder."""
    if pretrained is not None:
        candidates = [Path(pretrained)]
    else:
        name = cfg.get("pretrained_model")
        if not name:
            raise ValueError(f"{config_path} names no pretrained_model; pass --pretrained with the HF SigLIP folder")
        candidates = [Path(os.path.expandvars(name)), config_path.parent / os.path.expandvars(name)]
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    if pretrained is not None:
        raise FileNotFoundError(f"--pretrained {pretrained} has no config.json: it must be the HF SigLIP folder "
                                "(its config.json gives the tower geometry)")
    raise FileNotFoundError(f"HF SigLIP folder {candidates[0]} (the model config's pretrained_model) has no config.json "
                            "here: pass --pretrained with the local folder (its config.json gives the tower geometry)")


def _same(cfg: dict, field: str) -> object:
    """A quantizer field vistok holds once for both branches; the two official values must agree."""
    pix, sem = cfg["vq_pix"].get(field), cfg["vq_sem"].get(field)
    if pix != sem:
        raise ValueError(f"unsupported config: vq_pix.{field}={pix!r} differs from vq_sem.{field}={sem!r}; "
                         f"vistok's DualToken uses one {field} for both codebooks")
    return pix


def _vq_depth(cfg: dict, branch: str, grid: tuple[int, int]) -> int:
    vq = cfg[branch]
    code, latent = list(vq["code_shape"]), list(vq["latent_shape"])
    if code[:2] != latent[:2] or tuple(code[:2]) != grid or latent[2] != vq["embed_dim"]:
        raise ValueError(f"unsupported config: {branch} code_shape {code} / latent_shape {latent} must be "
                         f"[{grid[0]}, {grid[1]}, depth] / [{grid[0]}, {grid[1]}, embed_dim] (one code per "
                         f"token of the {grid[0]}x{grid[1]} grid, as the released configs)")
    if vq.get("bottleneck_type") not in SCHEDULES:
        raise ValueError(f"unsupported config: {branch}.bottleneck_type={vq.get('bottleneck_type')!r} "
                         f"(supported: {sorted(SCHEDULES)})")
    return int(code[2])


def dualtoken_args(cfg: dict, clip_config: dict) -> dict:
    """DualTokenTokenizer arguments that build the official model's exact architecture."""
    vision = clip_config["vision_cfg"]
    size, patch = vision["image_size"], vision["patch_size"]
    grid = (size // patch, size // patch)
    if cfg.get("hidden_size") not in (None, vision["width"]):
        raise ValueError(f"config hidden_size {cfg['hidden_size']} differs from the SigLIP tower width {vision['width']}")
    dd = cfg["ddconfig"]
    if dd.get("out_ch", 3) != 3 or dd.get("conv_shortcut"):
        raise ValueError(f"unsupported ddconfig: out_ch {dd.get('out_ch')} (3 only)")
    latent = cfg.get("decoder_latent_shape")
    if latent is not None and latent[0] != latent[1]:
        raise ValueError(f"unsupported config: decoder_latent_shape {latent} is not square")
    restart = _same(cfg, "restart_unused_codes")
    return {
        "clip_model": None, "clip_config": clip_config, "with_text": "text_cfg" in clip_config,
        "pixel_layer": int(cfg["layer_recon"]), "semantic_layer": int(cfg["layer_sem"]),
        "shortcut_layer": cfg.get("layer_shortcut"),
        "shortcut_weight": float(cfg.get("weight_shortcut") or 0.0),
        "code_dim": int(_same(cfg, "embed_dim")), "codebook_size": int(_same(cfg, "n_embed")),
        "pixel_depth": _vq_depth(cfg, "vq_pix", grid), "semantic_depth": _vq_depth(cfg, "vq_sem", grid),
        "decay": float(_same(cfg, "decay")), "shared_codebook": bool(_same(cfg, "shared_codebook")),
        "restart": "ema" if restart else "none",
        "pixel_ema_schedule": SCHEDULES[cfg["vq_pix"]["bottleneck_type"]],
        "semantic_ema_schedule": SCHEDULES[cfg["vq_sem"]["bottleneck_type"]],
        "projection": "attention", "causal_post_projection": True,
        "decoder": {"ch": dd["ch"], "ch_mult": list(dd["ch_mult"]), "num_res_blocks": dd["num_res_blocks"],
                    "attn_resolutions": list(dd["attn_resolutions"]), "in_channels": dd["decoder_in_channels"],
                    "dropout": float(dd.get("dropout", 0.0))},
        "decoder_latent_size": int(latent[0]) if latent is not None else None,
        "preprocess": {"image_size": size},
    }


# ---------------------------------------------------------------------------------------------- weights
def _projection_key(rest: str) -> Optional[str]:
    for official, ours in PROJECTION_PARTS.items():
        if rest == official or rest.startswith(official + "."):
            return ours + rest[len(official):]
    return None


def _codebooks(state: dict, official: str, ours: str, shared: bool, depth: int, used: set, dropped: list) -> dict:
    """`official.codebooks.i.*` -> stacked `ours.{embed, embed_avg, cluster_size}` (books, K[, dim])."""
    books = 1 if shared else depth
    out: dict[str, list] = {"embed": [], "embed_avg": [], "cluster_size": []}
    for i in range(depth):
        stem = f"{official}.codebooks.{i}."
        names = {n: stem + n for n in ("weight", "embed_ema", "cluster_size_ema")}
        if any(name not in state for name in names.values()):
            continue  # reported as missing below
        if i >= books:  # shared: the repeated entries are the same module as codebooks.0
            first = f"{official}.codebooks.0."
            for n, name in names.items():
                if not torch.equal(state[name], state[first + n]):
                    raise ValueError(f"{name} differs from {first + n}, but the config says shared_codebook=true")
            used.update(names.values())
            dropped.extend(names.values())
            continue
        weight = state[names["weight"]]
        out["embed"].append(weight[:-1])
        out["embed_avg"].append(state[names["embed_ema"]])
        out["cluster_size"].append(state[names["cluster_size_ema"]])
        used.update(names.values())
        dropped.append(f"{names['weight']}[{weight.shape[0] - 1}] (padding row)")
    if any(len(v) != books for v in out.values()):
        return {}
    for k, tensors in out.items():  # one codebook per depth: all depths must agree before stacking
        odd = [f"{official}.codebooks.{i}.{OFFICIAL_BUFFERS[k]} {tuple(t.shape)}" for i, t in enumerate(tensors)
               if t.shape != tensors[0].shape]
        if odd:
            raise ValueError(f"mis-shaped: {', '.join(odd)} vs {tuple(tensors[0].shape)} at "
                             f"{official}.codebooks.0 (codebooks of one quantizer share a shape)")
    return {f"{ours}.{k}": torch.stack(v) for k, v in out.items()}


def map_official_state(state: dict[str, torch.Tensor], args: dict) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Official RQVAESiglipModel tensors -> (vistok DualToken tensors, dropped keys, unplaced keys)."""
    used: set[str] = set()
    dropped: list[str] = []
    tower, tower_dropped = hf_siglip_state_dict_to_vistok(state, prefix="siglip_model.", with_text=args["with_text"])
    out = {f"siglip.{k}": v for k, v in tower.items()}
    used.update(k for k in state if k.startswith("siglip_model."))
    dropped += tower_dropped
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in PROJECTIONS:
            if rest == "attn.zero_k_bias":
                if value.count_nonzero():
                    raise ValueError(f"{key} is not all zeros; vistok's projection has no key bias")
                used.add(key)
                dropped.append(key)
            elif (mapped := _projection_key(rest)) is not None:
                out[f"{PROJECTIONS[head]}.{mapped}"] = value
                used.add(key)
        elif head in ("post_quant_conv", "decoder"):
            out[("post_quant." if head == "post_quant_conv" else "decoder.") + rest] = value
            used.add(key)
    for official, ours in QUANTIZERS.items():
        depth = args["pixel_depth"] if official == "quantizer_pix" else args["semantic_depth"]
        out.update(_codebooks(state, official, ours, args["shared_codebook"], depth, used, dropped))
    unplaced = sorted(k for k in state if k not in used)
    return out, dropped, unplaced


def _teacher_state(pretrained: Path, model_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The frozen teacher: the pretrained folder's vision tower when it holds weights (main.py loads
    `SiglipVisionModel.from_pretrained(pretrained_model)`), else the checkpoint's own tower."""
    try:
        weights = read_hf_weights(pretrained)
    except FileNotFoundError:
        weights = None
    if weights is not None:
        tower, _ = hf_siglip_state_dict_to_vistok(weights, prefix="", with_text=False)
        source = f"pretrained:{pretrained.name}"
    else:
        tower = {k[len("siglip."):]: v for k, v in model_state.items() if k.startswith("siglip.visual.")}
        source = "checkpoint"
    return {"teacher." + k[len("visual."):]: v for k, v in tower.items() if k.startswith("visual.")}, source


def convert_dualtoken(src: str | os.PathLike, dst: str | os.PathLike, *, config: Optional[str | os.PathLike] = None,
                      pretrained: Optional[str | os.PathLike] = None, preset: Optional[str] = None,
                      overwrite: bool = False) -> dict:
    """An official `epoch_N.pt` (+ its model config and the HF folder it names) -> a training-ready
    vistok release at `dst` (teacher included; the release's `source.teacher` says where it came from).

    Raises FileNotFoundError for a missing checkpoint / config / pretrained folder, ValueError for a
    config vistok cannot build (naming the field) or a state dict whose keys do not all fit (one
    line naming the missing, unexpected and mis-shaped keys)."""
    if preset is not None:
        raise ValueError("convert dualtoken builds the architecture from the official config: drop --preset "
                         "and pass --config")
    src = Path(src)
    check_destination(dst, "dualtoken", overwrite=overwrite)
    ckpt = read_checkpoint(src)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{src} is not an official DualToken checkpoint: expected main.py's "
                         f"{{'epoch', 'name', 'state_dict', 'optimizer'}}, found {found}")
    state = strip_prefixes(ckpt["state_dict"], ["module."])
    config_path = find_config(src, config)
    cfg = read_official_config(config_path)
    folder = find_pretrained(cfg, config_path, pretrained)
    args = dualtoken_args(cfg, clip_config_from_hf(read_hf_config(folder)))

    try:
        mapped, dropped, unplaced = map_official_state(state, args)
    except ValueError as exc:  # the tower mapping names its missing / unknown keys
        raise ValueError(f"{src}: {exc}") from None
    try:
        tok = DualTokenTokenizer(**args, with_teacher=True)
    except ValueError as exc:  # e.g. a --pretrained folder of another geometry than the config's decoder
        raise ValueError(f"{config_path} with the SigLIP tower of {folder / 'config.json'} does not build a "
                         f"DualToken: {exc}") from None
    teacher, teacher_source = _teacher_state(folder, mapped)
    mapped.update(teacher)
    _check_fits(src, tok, mapped, unplaced)
    full = {k: v for k, v in tok.state_dict().items() if VISTOK_ONLY.match(k)}
    load_state_dict_strict(tok, {**full, **mapped}, target=f"DualToken (from {src})")  # copy_ casts to fp32
    tok.save_pretrained(dst, extra={"source": {"kind": "dualtoken", "file": src.name, "config": config_path.name,
                                               "pretrained_model": folder.name, "teacher": teacher_source,
                                               "epoch": ckpt.get("epoch")}})
    return {"tensors": len(state), "dropped": len(dropped), "teacher": teacher_source,
            "parameters": tok.num_parameters(), "dst": str(dst)}


def _check_fits(src: Path, tok: torch.nn.Module, mapped: dict, unplaced: list[str]) -> None:
    """One line naming every official key that has no place, every vistok tensor with no source and
    every shape that differs (what a checkpoint of another config or a damaged file gives)."""
    expected = {k: v.shape for k, v in tok.state_dict().items() if not VISTOK_ONLY.match(k)}
    missing = sorted(k for k in expected if k not in mapped)
    unexpected = sorted(unplaced + [k for k in mapped if k not in expected])
    shapes = sorted(f"{k} {tuple(mapped[k].shape)} vs {tuple(s)}" for k, s in expected.items()
                    if k in mapped and mapped[k].shape != s)
    if missing or unexpected or shapes:
        parts = [key_list(kind, keys) for kind, keys in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
        raise ValueError(f"{src} does not fit the DualToken built from its config: " + "; ".join(parts))
