"""MAR `kl16.ckpt` (and LDM kl-f16) -> vistok release directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..tokenizers.registry import create_tokenizer
from ..weights import load_state_dict_strict, read_checkpoint, strip_prefixes, unwrap_state_dict
from .checkpoint_io import check_destination

KL_PREFIXES = ("module.", "first_stage_model.", "vae.")


def normalize_kl_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes; drop LDM's `loss.*` (LPIPS + discriminator) tensors."""
    sd = strip_prefixes(state_dict, KL_PREFIXES)
    return {k: v for k, v in sd.items() if not k.startswith("loss.")}


def detect_kl_preset(state_dict: dict[str, torch.Tensor]) -> str:
    """LDM kl-f16 has attention in the decoder's up levels; MAR KL-16 does not."""
    has_decoder_attn = any(k.startswith("decoder.up.") and ".attn." in k for k in state_dict)
    return "ldm-kl-f16" if has_decoder_attn else "mar-kl16"


def convert_mar_kl16(src: str | Path, dst: str | Path, *, preset: Optional[str] = None,
                     scaling_factor: Optional[float] = None, overwrite: bool = False) -> dict:
    """Convert and write a release directory; returns a report (preset, tensors, parameters).
    `preset` overrides the detected architecture (e.g. for a custom-size KL VAE); `scaling_factor`
    overrides the preset's (re-estimate it as 1 / std of the raw latents for a VAE other than MAR's)."""
    check_destination(dst, "mar-kl16", overwrite=overwrite)
    sd = normalize_kl_state_dict(unwrap_state_dict(read_checkpoint(src)))
    preset = preset or detect_kl_preset(sd)
    tok = create_tokenizer(preset, **({} if scaling_factor is None else {"scaling_factor": scaling_factor}))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    load_state_dict_strict(tok, sd, target=f"{preset} (from {src})")
    tok.save_pretrained(dst, extra={"source": {"kind": "mar-kl16", "file": Path(src).name, "preset": preset}})
    return {"preset": preset, "tensors": len(sd), "parameters": tok.num_parameters(),
            "scaling_factor": tok.scaling_factor, "dst": str(dst)}
