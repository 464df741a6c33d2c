"""HF transformers SigLIP / SigLIP2 folders built into vistok's tower without transformers.

The folders and reference outputs in tests/data/hf_siglip were made with transformers' own
SiglipModel / Siglip2Model (see tests/data/hf_siglip/README.md); transformers is not needed here."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vistok.tokenizers.base import load_state_dict_strict
from vistok.tokenizers.siglip import SiglipTower
from vistok.tokenizers.siglip_hf import (
    clip_config_from_hf,
    hf_siglip_state_dict_to_vistok,
    load_hf_siglip_folder,
    read_hf_config,
    read_hf_weights,
)

from conftest import DATA

HF = DATA / "hf_siglip"
CASES = [("siglip", 32), ("siglip2", 16), ("siglip2", 24)]  # siglip2 (NaFlex) at its own 16 px and at 24 px


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_tower(kind: str, size: int) -> SiglipTower:
    cfg, state, dropped = load_hf_siglip_folder(HF / kind, image_size=size if kind == "siglip2" else None)
    assert dropped == []
    tower = SiglipTower(clip_config=cfg).eval()
    load_state_dict_strict(tower, state, target=kind)
    return tower


@pytest.mark.parametrize("kind,size", CASES)
def test_hf_folder_matches_transformers(kind, size):
    """Per-layer features, pooled output and text embeddings equal transformers' (fp32, 1e-4 relative)."""
    ref = load_file(str(HF / f"{kind}_outputs.safetensors"))
    tower = hf_tower(kind, size)
    with torch.no_grad():
        h = tower.embed_patches(ref[f"pixels_{size}"])
        assert rel(h, ref[f"hidden_{size}_0"]) < 1e-4
        for layer in range(1, tower.num_layers + 1):
            h = tower.run_blocks(h, layer - 1, layer)
            assert rel(h, ref[f"hidden_{size}_{layer}"]) < 1e-4, f"layer {layer}"
        assert rel(tower.pool(h), ref[f"pooled_{size}"]) < 1e-4
        assert rel(tower.encode_text(ref["input_ids"], normalize=False), ref["text_embeds"]) < 1e-4
    assert tower.logit_scale.item() == pytest.approx(ref["logit_scale"].item())
    assert tower.logit_bias.item() == pytest.approx(ref["logit_bias"].item())


def gelu_kind(act: torch.nn.Module) -> str:
    x = torch.tensor([1.5])
    return "tanh" if torch.equal(act(x), torch.nn.functional.gelu(x, approximate="tanh")) else \
        "erf" if torch.equal(act(x), torch.nn.functional.gelu(x)) else "other"


def test_geometry_from_config():
    """Every geometry field is taken from the config: widths, depths, exact MLP widths, GELU kind, eps."""
    tanh = hf_tower("siglip", 32)
    trunk = tanh.trunk
    assert (tanh.width, tanh.num_layers, tanh.grid, tanh.image_size) == (32, 3, (4, 4), (32, 32))
    assert trunk.blocks[0].attn.num_heads == 4 and trunk.blocks[0].mlp.fc1.out_features == 37
    assert trunk.attn_pool.mlp.fc1.out_features == 37 and gelu_kind(trunk.attn_pool.mlp.act) == "tanh"
    assert gelu_kind(trunk.blocks[0].mlp.act) == "tanh" and trunk.norm.eps == 1e-6
    block = tanh.text.transformer.resblocks[0]
    assert block.mlp.c_fc.out_features == 37 and gelu_kind(block.mlp.gelu) == "tanh"
    assert (tanh.context_length, tanh.text.vocab_size) == (12, 100)

    erf = hf_tower("siglip2", 24)
    assert gelu_kind(erf.trunk.blocks[0].mlp.act) == "erf" and erf.trunk.norm.eps == 1e-5
    assert gelu_kind(erf.text.transformer.resblocks[0].mlp.gelu) == "erf"
    assert erf.text.ln_final.eps == 1e-5 and erf.grid == (6, 6)


def test_vision_only_config_builds_without_text():
    config = read_hf_config(HF / "siglip")
    vision = {**config["vision_config"], "model_type": "siglip_vision_model"}
    cfg = clip_config_from_hf(vision)
    assert "text_cfg" not in cfg
    with pytest.raises(ValueError, match="no text tower"):
        SiglipTower(clip_config=cfg)
    state, _ = hf_siglip_state_dict_to_vistok(read_hf_weights(HF / "siglip"), with_text=False)
    load_state_dict_strict(SiglipTower(clip_config=cfg, with_text=False), state)


@pytest.mark.parametrize("section,field,value,message", [
    ("vision_config", "hidden_act", "relu", "vision_config.hidden_act='relu'"),
    ("text_config", "hidden_act", "quick_gelu", "text_config.hidden_act='quick_gelu'"),
    ("vision_config", "num_channels", 1, "num_channels=1"),
    ("vision_config", "vision_use_head", False, "vision_use_head=false"),
    ("vision_config", "num_attention_heads", 5, "not divisible by num_attention_heads 5"),
    ("text_config", "projection_size", 16, "projection_size 16"),
    (None, "model_type", "clip", "model_type 'clip' is not a SigLIP model"),
])
def test_unsupported_config_names_the_field(section, field, value, message):
    config = read_hf_config(HF / "siglip")
    (config[section] if section else config)[field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        clip_config_from_hf(config)


def test_fixed_resolution_config_refuses_another_size():
    with pytest.raises(ValueError, match="only NaFlex SigLIP2"):
        clip_config_from_hf(read_hf_config(HF / "siglip"), image_size=64)


def test_mapping_under_a_prefix_consumes_every_key():
    """As inside the official DualToken model: HF names under `siglip_model.`, other keys beside them,
    position_ids buffers (older checkpoints) listed as dropped."""
    hf = read_hf_weights(HF / "siglip")
    state = {f"siglip_model.{k}": v for k, v in hf.items()}
    state["siglip_model.vision_model.embeddings.position_ids"] = torch.arange(16)[None]
    state["siglip_model.text_model.embeddings.position_ids"] = torch.arange(12)[None]
    state["prequant_pix.linear.weight"] = torch.zeros(2, 2)
    mapped, dropped = hf_siglip_state_dict_to_vistok(state)
    assert sorted(dropped) == ["siglip_model.text_model.embeddings.position_ids",
                               "siglip_model.vision_model.embeddings.position_ids"]
    tower = SiglipTower(clip_config=clip_config_from_hf(read_hf_config(HF / "siglip")))
    assert set(mapped) == set(tower.state_dict())
    load_state_dict_strict(tower, mapped)
    # q, k, v land in timm's fused qkv in that order
    q = hf["vision_model.encoder.layers.1.self_attn.q_proj.weight"]
    v = hf["vision_model.encoder.layers.1.self_attn.v_proj.weight"]
    assert torch.equal(mapped["visual.trunk.blocks.1.attn.qkv.weight"][:32], q)
    assert torch.equal(mapped["visual.trunk.blocks.1.attn.qkv.weight"][64:], v)


def test_mapping_names_missing_and_unknown_keys():
    hf = read_hf_weights(HF / "siglip")
    broken = {k: v for k, v in hf.items() if k != "vision_model.head.probe"}
    broken["vision_model.encoder.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing 1: vision_model\.head\.probe; unknown 1: "
                                         r"vision_model\.encoder\.layers\.0\.extra\.weight"):
        hf_siglip_state_dict_to_vistok(broken)
    with pytest.raises(ValueError, match="no HF SigLIP vision keys"):
        hf_siglip_state_dict_to_vistok({"visual.trunk.pos_embed": torch.zeros(1)})


def test_folder_without_safetensors_is_refused(tmp_path):
    shutil.copy(HF / "siglip" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_siglip_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"})[:-1])
    with pytest.raises(ValueError, match="not valid JSON"):
        read_hf_config(tmp_path)
