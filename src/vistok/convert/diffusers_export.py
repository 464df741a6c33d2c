"""KL family -> a diffusers `AutoencoderKL` directory (config.json + diffusion_pytorch_model.safetensors).

Written with our own key mapping: diffusers' single-file converter drops the encoder's level
attention (it only knows mid-block attention), which is silently wrong for MAR KL-16.
Needs no diffusers install to write; diffusers loads the result with `from_pretrained`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..fileio import atomic_path
from ..tokenizers.kl import KLTokenizer

_ATTN_LEAF = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def kl_diffusers_config(tok: KLTokenizer) -> dict:
    """The diffusers `AutoencoderKL` config.json dict that expresses KL tokenizer `tok` (block types per
    level, channels, scaling factor)."""
    cfg = tok.config
    levels = len(cfg["ch_mult"])
    down = ["AttnDownEncoderBlock2D" if i in cfg["encoder_attn_levels"] else "DownEncoderBlock2D"
            for i in range(levels)]
    # diffusers' up_blocks run from the lowest resolution: up_blocks[k] is LDM level levels-1-k
    up = ["AttnUpDecoderBlock2D" if (levels - 1 - k) in cfg["decoder_attn_levels"] else "UpDecoderBlock2D"
          for k in range(levels)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": [cfg["ch"] * m for m in cfg["ch_mult"]],
        "layers_per_block": cfg["num_res_blocks"],
        "act_fn": "silu",
        "latent_channels": cfg["embed_dim"],
        "norm_num_groups": cfg["norm_groups"],
        "sample_size": tok.preprocess_config.image_size,
        "scaling_factor": tok.scaling_factor,
        "mid_block_add_attention": cfg["mid_attention"],
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }


def _map_key(key: str, levels: int) -> str:
    part, rest = key.split(".", 1) if "." in key else (key, "")
    if part in ("quant_conv", "post_quant_conv"):
        return key
    rest = rest.replace("norm_out.", "conv_norm_out.", 1) if rest.startswith("norm_out.") else rest
    rest = rest.replace("nin_shortcut.", "conv_shortcut.")
    rest = re.sub(r"^mid\.block_(\d)\.", lambda m: f"mid_block.resnets.{int(m.group(1)) - 1}.", rest)
    rest = re.sub(r"^mid\.attn_1\.", "mid_block.attentions.0.", rest)
    rest = re.sub(r"^down\.(\d+)\.block\.", r"down_blocks.\1.resnets.", rest)
    rest = re.sub(r"^down\.(\d+)\.attn\.", r"down_blocks.\1.attentions.", rest)
    rest = re.sub(r"^down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0.", rest)
    rest = re.sub(r"^up\.(\d+)\.", lambda m: f"up_blocks.{levels - 1 - int(m.group(1))}.", rest)
    rest = re.sub(r"^(up_blocks\.\d+)\.block\.", r"\1.resnets.", rest)
    rest = re.sub(r"^(up_blocks\.\d+)\.upsample\.", r"\1.upsamplers.0.", rest)
    rest = re.sub(r"^(up_blocks\.\d+)\.attn\.", r"\1.attentions.", rest)
    rest = re.sub(r"attentions\.(\d+)\.(norm|q|k|v|proj_out)\.",
                  lambda m: f"attentions.{m.group(1)}.{_ATTN_LEAF[m.group(2)]}.", rest)
    return f"{part}.{rest}"


def kl_to_diffusers_state_dict(tok: KLTokenizer) -> dict[str, torch.Tensor]:
    """Rename to diffusers' layout; attention 1x1 conv weights (C, C, 1, 1) become linear (C, C)."""
    levels = len(tok.config["ch_mult"])
    out = {}
    for k, v in tok.state_dict().items():
        nk = _map_key(k, levels)
        if ".attentions." in nk and nk.endswith(".weight") and v.ndim == 4:
            v = v[:, :, 0, 0]
        out[nk] = v.detach().clone().contiguous()
    return out


def export_diffusers(tok: KLTokenizer, dst: str | Path) -> Path:
    """Write KL tokenizer `tok` as a diffusers `AutoencoderKL` directory `dst` (config.json +
    diffusion_pytorch_model.safetensors, renamed keys); returns `dst`. Raises ValueError for another family
    or a KL model diffusers cannot express (z_channels != embed_dim, ch_mult[0] != 1)."""
    if not isinstance(tok, KLTokenizer):
        raise ValueError(f"export-diffusers supports the KL family only, got {type(tok).__name__}")
    cfg = tok.config
    if cfg["z_channels"] != cfg["embed_dim"] or cfg["ch_mult"][0] != 1:
        raise ValueError("diffusers' AutoencoderKL cannot express this KL model: it needs z_channels == "
                         f"embed_dim (got {cfg['z_channels']}, {cfg['embed_dim']}) and ch_mult[0] == 1 "
                         f"(got {cfg['ch_mult'][0]})")
    dst = Path(dst)
    with atomic_path(dst / "diffusion_pytorch_model.safetensors") as tmp:
        save_file(kl_to_diffusers_state_dict(tok), str(tmp), metadata={"format": "pt"})
    with atomic_path(dst / "config.json") as tmp:
        tmp.write_text(json.dumps(kl_diffusers_config(tok), indent=2) + "\n")
    return dst
