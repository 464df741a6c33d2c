"""MAR training checkpoints and Harmon release files -> a vistok `MARTokenizer` release directory.

MAR (`util/misc.py save_model`): `{'model', 'model_ema', 'optimizer', 'epoch', 'scaler', 'args'}`,
`args` a pickled `argparse.Namespace` (the one non-tensor class allowed when reading). MAR evaluates
with `model_ema`, so that is the default. Harmon (`harmon_0.5b.pth`, `harmon_1.5b.pth`): a flat dict
of `mar.*`, `llm.*`, `proj_in.*`, `proj_out.*`; the `mar.*` part loads strictly, the rest is listed
as dropped. Neither file holds the KL-16 VAE: `kl16` names MAR's `kl16.ckpt` to include it.

The size is read off the weight shapes (widths, depths, buffer, grid, classes, head). Head counts
are in no file: they come from `num_heads`, else from `args.model` when it names an official
factory, else from the width as the official factories set it (768 -> 12, 1024 -> 16, 1280 -> 16).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional

import torch

from ..tokenizers.mar import OFFICIAL_NUM_HEADS, OFFICIAL_SIZES, MARTokenizer
from ..tokenizers.registry import get_preset
from ..weights import load_state_dict_strict, read_checkpoint, strip_prefixes, unwrap_state_dict
from .checkpoint_io import check_destination
from .mar_kl import normalize_kl_state_dict

HARMON_DROPPED = ("llm.", "proj_in.", "proj_out.")


def _count(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _need(sd: dict, key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"{source}: no {key!r} among the MAR weights: not a MAR state dict "
                         f"(first keys: {sorted(sd)[:5]})")
    return sd[key]


def _heads(width: int, num_heads: Optional[int], model_name: Optional[str], source: str) -> int:
    if num_heads is not None:
        heads = num_heads
    elif model_name in OFFICIAL_SIZES and OFFICIAL_SIZES[model_name][0] == width:
        heads = OFFICIAL_SIZES[model_name][2]
    elif width in OFFICIAL_NUM_HEADS:
        heads = OFFICIAL_NUM_HEADS[width]
    else:
        raise ValueError(f"{source}: width {width} is none of the official MAR sizes "
                         f"({sorted(OFFICIAL_NUM_HEADS)}) and the file does not store head counts: pass --num-heads")
    if heads < 1 or width % heads:
        raise ValueError(f"{source}: width {width} is not divisible by {heads} heads")
    return heads


def mar_args_from_state_dict(sd: dict[str, torch.Tensor], *, num_heads: Optional[int] = None,
                             args: Optional[argparse.Namespace] = None, source: str = "checkpoint") -> dict:
    """`MARTokenizer` model args (without `vae`/`preprocess`) read off a MAR state dict's shapes;
    `args` (MAR's Namespace, when the file has one) supplies patch size and sampling steps."""
    width, token_dim = _need(sd, "z_proj.weight", source).shape
    dec_width = _need(sd, "decoder_embed.weight", source).shape[0]
    seq_len = _need(sd, "diffusion_pos_embed_learned", source).shape[1]
    buffer_size = _need(sd, "encoder_pos_embed_learned", source).shape[1] - seq_len
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(f"{source}: {seq_len} positions are not a square grid")
    patch = int(getattr(args, "patch_size", 1) or 1)
    model_name = getattr(args, "model", None)
    depth = _count(sd, "encoder_blocks.")
    if model_name in OFFICIAL_SIZES and OFFICIAL_SIZES[model_name][:2] != (width, depth):
        raise ValueError(f"{source}: args.model is {model_name!r} ({OFFICIAL_SIZES[model_name][0]} wide, "
                         f"{OFFICIAL_SIZES[model_name][1]} blocks) but the weights are {width} wide with {depth} blocks")
    return dict(
        img_size=side * 16 * patch, patch_size=patch,
        encoder_embed_dim=width, encoder_depth=depth,
        encoder_num_heads=_heads(width, num_heads, model_name, source),
        decoder_embed_dim=dec_width, decoder_depth=_count(sd, "decoder_blocks."),
        decoder_num_heads=_heads(dec_width, num_heads, model_name, source),
        mlp_ratio=_need(sd, "encoder_blocks.0.mlp.fc1.weight", source).shape[0] / width,
        buffer_size=buffer_size, class_num=_need(sd, "class_emb.weight", source).shape[0],
        diffloss_d=_count(sd, "diffloss.net.res_blocks."),
        diffloss_w=_need(sd, "diffloss.net.input_proj.weight", source).shape[0],
        num_sampling_steps=int(getattr(args, "num_sampling_steps", 100) or 100),
    )


def _vae_args(token_dim: int, patch: int, source: str) -> dict:
    vae = {k: v for k, v in get_preset("mar-kl16")["args"].items() if k != "preprocess"}
    if token_dim != vae["embed_dim"] * patch * patch:
        raise ValueError(f"{source}: tokens of {token_dim} channels with patch size {patch} are not MAR KL-16 "
                         f"latents ({vae['embed_dim']} channels); vistok's MAR family runs on KL-16 only")
    return vae


def _build(sd: dict, model_args: dict, *, vae: Optional[dict], preprocess: dict, kl16, vae_sd, source: str):
    """Build the tokenizer, load the MAR weights strictly and the VAE from `kl16` (or `vae_sd`)."""
    vae = vae if vae is not None else _vae_args(sd["z_proj.weight"].shape[1], model_args["patch_size"], source)
    tok = MARTokenizer(**model_args, vae=vae, preprocess=preprocess)
    load_state_dict_strict(tok.mar, sd, target=f"MAR transformer (from {source})")
    vae_from = None
    if kl16 is not None:
        vae_sd, vae_from = normalize_kl_state_dict(unwrap_state_dict(read_checkpoint(kl16))), Path(kl16).name
    elif vae_sd:
        vae_from = f"{Path(source).name} (vae.*)"
    if vae_sd:
        load_state_dict_strict(tok.vae, vae_sd, target=f"KL-16 VAE (from {vae_from})")
    return tok.eval(), vae_from


def _report(tok: MARTokenizer, dst, vae_from, **extra) -> dict:
    return {**extra, "encoder": f"{tok.width} x {len(tok.mar.encoder_blocks)} blocks, "
                                f"{tok.mar.encoder_blocks[0].attn.num_heads} heads",
            "parameters": tok.num_parameters(),
            "vae": vae_from or "random weights: pass --kl16 kl16.ckpt to include MAR's VAE", "dst": str(dst)}


def convert_mar(src: str | Path, dst: str | Path, *, ema: bool = True, num_heads: Optional[int] = None,
                kl16: Optional[str | Path] = None, vae: Optional[dict] = None, overwrite: bool = False) -> dict:
    """A MAR checkpoint (`save_model`'s dict, or a bare state dict) -> release directory `dst`.
    ema: take `model_ema` (MAR's evaluation weights; `model` when the file has none);
    num_heads: override the head count; kl16: MAR's `kl16.ckpt` for the VAE;
    vae: KL constructor args replacing MAR KL-16's (tests use a small stride-16 VAE)."""
    check_destination(dst, "mar", overwrite=overwrite)
    raw = read_checkpoint(src, allowed_globals=[argparse.Namespace])
    args = raw.get("args") if isinstance(raw, dict) and isinstance(raw.get("args"), argparse.Namespace) else None
    used = "state dict"
    if isinstance(raw, dict) and ("model" in raw or "model_ema" in raw):
        used = "model_ema" if ema and isinstance(raw.get("model_ema"), dict) else "model"
        if used not in raw or not isinstance(raw[used], dict):
            raise ValueError(f"{src}: no {used!r} weights in the checkpoint")
        raw = raw[used]
    sd = strip_prefixes(unwrap_state_dict(raw), ["module."])
    model_args = mar_args_from_state_dict(sd, num_heads=num_heads, args=args, source=str(src))
    preprocess = {"image_size": model_args["img_size"], "crop": "adm"}
    tok, vae_from = _build(sd, model_args, vae=vae, preprocess=preprocess, kl16=kl16, vae_sd=None, source=str(src))
    tok.save_pretrained(dst, extra={"source": {"kind": "mar", "file": Path(src).name, "weights": used,
                                               "args_model": getattr(args, "model", None), "vae": vae_from}})
    return _report(tok, dst, vae_from, weights=used, tensors=len(sd))


def convert_harmon(src: str | Path, dst: str | Path, *, num_heads: Optional[int] = None,
                   kl16: Optional[str | Path] = None, vae: Optional[dict] = None, image_size: int = 512,
                   overwrite: bool = False) -> dict:
    """A Harmon file (flat `mar.*`, `llm.*`, `proj_in.*`, `proj_out.*`) -> release directory `dst`
    holding Harmon's MAR (encoder, decoder, diffusion head); `llm.*` and the projectors are dropped
    and counted in the report. image_size: the preprocessing size (Harmon runs 512 px)."""
    check_destination(dst, "harmon", overwrite=overwrite)
    flat = strip_prefixes(unwrap_state_dict(read_checkpoint(src, allowed_globals=[argparse.Namespace]),
                                            keys=("state_dict", "model")), ["module."])
    sd = {k[len("mar."):]: v for k, v in flat.items() if k.startswith("mar.")}
    vae_sd = {k[len("vae."):]: v for k, v in flat.items() if k.startswith("vae.")}
    dropped = {p.rstrip("."): sum(k.startswith(p) for k in flat) for p in HARMON_DROPPED}
    unknown = sorted(k for k in flat if not k.startswith(("mar.", "vae.") + HARMON_DROPPED))
    if not sd:
        raise ValueError(f"{src}: no mar.* weights: not a Harmon checkpoint (first keys: {sorted(flat)[:5]})")
    if unknown:
        raise ValueError(f"{src}: {len(unknown)} key(s) outside Harmon's mar/llm/proj_in/proj_out/vae: {unknown[:10]}")
    model_args = mar_args_from_state_dict(sd, num_heads=num_heads, source=str(src))
    preprocess = {"image_size": image_size, "crop": "center"}
    tok, vae_from = _build(sd, model_args, vae=vae, preprocess=preprocess, kl16=kl16, vae_sd=vae_sd, source=str(src))
    tok.save_pretrained(dst, extra={"source": {"kind": "harmon", "file": Path(src).name, "vae": vae_from,
                                               "dropped": dropped}})
    return _report(tok, dst, vae_from, tensors=len(sd), dropped=dropped)
