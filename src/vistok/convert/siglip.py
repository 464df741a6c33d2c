"""`vistok convert siglip`: SigLIP weights -> a DualToken release directory whose tower and frozen
teacher start from them (projections, codebooks and decoder fresh).

SRC is an open_clip SigLIP weights file (the preset's open_clip architecture), or an HF transformers
SigLIP / SigLIP2 folder (config.json + model.safetensors): the tower is then rebuilt with that
folder's geometry (`siglip_hf.clip_config_from_hf`), its names mapped without transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..tokenizers.registry import create_tokenizer
from ..tokenizers.siglip_hf import is_hf_siglip_folder, siglip_init_args
from .checkpoint_io import check_destination


def convert_siglip(src: str | Path, dst: str | Path, *, preset: Optional[str] = None, overwrite: bool = False,
                   **overrides) -> dict:
    """SigLIP weights (an open_clip file, or an HF SigLIP / SigLIP2 folder) -> a DualToken release at
    `dst` of `preset` (default dualtoken-so400m-384) whose tower and teacher start from them; `overrides`
    are constructor arguments. Returns a summary dict; ValueError for a directory that is not an HF
    SigLIP folder or a `dst` that holds other files."""
    check_destination(dst, "siglip", overwrite=overwrite)

    preset = preset or "dualtoken-so400m-384"
    source = {"kind": "siglip", "file": Path(src).name, "preset": preset}
    if is_hf_siglip_folder(src):
        size = overrides.get("preprocess", {}).get("image_size")  # NaFlex SigLIP2: built at this size
        overrides = {**siglip_init_args(src, image_size=size, preset=preset), **overrides}
        source["format"] = "hf-transformers"
    elif Path(src).is_dir():
        raise ValueError(f"{src} is a directory but not an HF SigLIP folder (config.json with model_type siglip or "
                         "siglip2): give an open_clip weights file or an HF SigLIP / SigLIP2 folder")
    else:
        overrides = {"siglip_weights": str(src), **overrides}
        source["format"] = "open_clip"
    tok = create_tokenizer(preset, **overrides)
    tok.save_pretrained(dst, extra={"source": source})
    tower = tok.siglip.state_dict()
    return {"preset": preset, "format": source["format"], "tensors": len(tower),
            "parameters": tok.num_parameters(), "text_tower": hasattr(tok.siglip, "text"), "dst": str(dst)}
