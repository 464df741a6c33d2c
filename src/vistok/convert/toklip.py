"""Released TokLIP checkpoints (`TokLIP_S_256.pt`, `TokLIP_L_384.pt`: `{"state_dict": sd, ...}`, keys
possibly `module.`-prefixed) -> a vistok release directory (inference: no teacher).

Name mapping (TokLIP's open_clip model -> vistok):
    visual.trunk.vq.*          -> vq.*            (the frozen LlamaGen VQ, 344 tensors)
    visual.trunk.vq_table.*    -> vq_table.*      (token MLP 8 -> 4608)
    visual.trunk.vq_mapping.*  -> vq_mapping.*    (token MLP 4608 -> 1152)
    visual.trunk.*             -> siglip.visual.trunk.*   (blocks, pos_embed, norm, attn_pool, patch_embed)
    text.*, logit_scale, logit_bias -> siglip.*
TokLIP drops SigLIP's logit bias before saving; when it is absent the converter keeps SigLIP's
initial value (-10) and says so. Any key it cannot place is an error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..tokenizers.base import load_state_dict_strict
from ..tokenizers.registry import create_tokenizer
from .checkpoint_io import read_checkpoint, strip_prefixes, unwrap_state_dict

RULES = (("visual.trunk.vq_table.", "vq_table."), ("visual.trunk.vq_mapping.", "vq_mapping."),
         ("visual.trunk.vq.", "vq."), ("visual.", "siglip.visual."), ("text.", "siglip.text."),
         ("logit_scale", "siglip.logit_scale"), ("logit_bias", "siglip.logit_bias"))


def map_toklip_keys(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    mapped, unplaced = {}, []
    for key, value in state_dict.items():
        rule = next((r for r in RULES if key.startswith(r[0])), None)
        if rule is None:
            unplaced.append(key)
        else:
            mapped[rule[1] + key[len(rule[0]):]] = value
    return mapped, unplaced


def _plain_globals() -> list:
    """Plain-data globals TokLIP's training pickles reference (argparse args, NumPy scalars such as a
    saved loss value); allow-listed for weights_only loading, nothing that runs code."""
    import argparse
    import codecs

    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import scalar
    return [argparse.Namespace, np.dtype, scalar, codecs.encode, type(np.dtype("float64")), type(np.dtype("float32"))]


def convert_toklip(src: str | Path, dst: str | Path, *, preset: Optional[str] = None) -> dict:
    sd = strip_prefixes(unwrap_state_dict(read_checkpoint(src, allowed_globals=_plain_globals())), ["module."])
    mapped, unplaced = map_toklip_keys(sd)
    if unplaced:
        raise ValueError(f"{src}: {len(unplaced)} key(s) have no place in a TokLIP model: {sorted(unplaced)[:10]}")
    if preset is None:
        positions = mapped.get("siglip.visual.trunk.pos_embed", torch.empty(0, 0)).shape[1:2]
        known = {(256,): "toklip-s-256", (576,): "toklip-l-384"}
        if tuple(positions) not in known:
            raise ValueError(f"{src}: cannot tell the TokLIP size from visual.trunk.pos_embed "
                             f"({tuple(positions) or 'missing'} positions); pass --preset")
        preset = known[tuple(positions)]
    tok = create_tokenizer(preset, with_teacher=False)
    filled = []
    if "siglip.logit_bias" not in mapped and hasattr(tok.siglip, "logit_bias"):
        mapped["siglip.logit_bias"] = tok.siglip.logit_bias.detach().clone()
        filled.append("siglip.logit_bias")
    mapped = {k: v.float() if v.is_floating_point() else v for k, v in mapped.items()}
    load_state_dict_strict(tok, mapped, target=f"{preset} (from {src})")
    tok.save_pretrained(dst, extra={"source": {"kind": "toklip", "file": Path(src).name, "preset": preset}})
    return {"preset": preset, "tensors": len(sd), "parameters": tok.num_parameters(),
            "filled_from_init": filled, "dst": str(dst)}
