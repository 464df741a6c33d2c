"""`vistok convert siglip`: an open_clip SigLIP weights file -> a DualToken release directory whose
tower and frozen teacher start from those weights (projections, codebooks and decoder fresh)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def convert_siglip(src: str | Path, dst: str | Path, *, preset: Optional[str] = None, **overrides) -> dict:
    from ..tokenizers.registry import create_tokenizer

    preset = preset or "dualtoken-so400m-384"
    tok = create_tokenizer(preset, siglip_weights=str(src), **overrides)
    tok.save_pretrained(dst, extra={"source": {"kind": "siglip", "file": Path(src).name, "preset": preset}})
    tower = tok.siglip.state_dict()
    return {"preset": preset, "tensors": len(tower), "parameters": tok.num_parameters(),
            "text_tower": hasattr(tok.siglip, "text"), "destination": str(dst)}
