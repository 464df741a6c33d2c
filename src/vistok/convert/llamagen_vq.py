"""LlamaGen `vq_ds16_c2i.pt` / `vq_ds16_t2i.pt` (`{"model": sd}`) -> vistok release directory.

Read with weights_only=True; `ema` is preferred over `model` when a training checkpoint has both
(LlamaGen's own loaders do the same); `module.` is stripped; the load is strict, so all 344 tensors
(including the `quantize.codebook_used` usage buffer) must be there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..tokenizers.registry import create_tokenizer
from ..weights import load_state_dict_strict, read_checkpoint, strip_prefixes, unwrap_state_dict
from .checkpoint_io import check_destination


def convert_llamagen_vq(src: str | Path, dst: str | Path, *, preset: Optional[str] = None,
                        overwrite: bool = False) -> dict:
    """LlamaGen's `vq_ds16_*.pt` (read with weights_only=True; `ema` / `model` / `state_dict`, `module.`
    unwrapped) -> a vistok release at `dst` of `preset` (default llamagen-vq16), loaded strictly. Returns a
    summary dict. Raises ValueError / CheckpointMismatchError naming the problem, and refuses a `dst` that
    holds other files."""
    import argparse

    check_destination(dst, "llamagen-vq16", overwrite=overwrite)
    raw = read_checkpoint(src, allowed_globals=[argparse.Namespace])  # training files carry `args`
    sd = strip_prefixes(unwrap_state_dict(raw, keys=("ema", "model", "state_dict")), ["module."])
    preset = preset or "llamagen-vq16"
    tok = create_tokenizer(preset)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    load_state_dict_strict(tok, sd, target=f"{preset} (from {src})")
    tok.save_pretrained(dst, extra={"source": {"kind": "llamagen-vq16", "file": Path(src).name, "preset": preset}})
    return {"preset": preset, "tensors": len(sd), "parameters": tok.num_parameters(), "dst": str(dst)}
