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
    # transformers 5 saves a SiglipVisionModel without the `vision_model.` level
    bare = {k[len("vision_model."):]: v for k, v in read_hf_weights(HF / "siglip").items() if k.startswith("vision_model.")}
    bare_state, _ = hf_siglip_state_dict_to_vistok(bare)
    assert set(bare_state) == {k for k in state if k.startswith("visual.")}
    assert all(torch.equal(bare_state[k], state[k]) for k in bare_state)


@pytest.mark.parametrize("section,field,value,message", [
    ("vision_config", "hidden_act", "relu", "vision_config.hidden_act='relu'"),
    ("text_config", "hidden_act", "quick_gelu", "text_config.hidden_act='quick_gelu'"),
    ("vision_config", "num_channels", 1, "num_channels=1"),
    ("vision_config", "vision_use_head", False, "vision_use_head=false"),
    ("vision_config", "image_size", 4, "smaller than vision_config.patch_size 8"),
    ("vision_config", "num_attention_heads", 5, "not divisible by num_attention_heads 5"),
    ("text_config", "projection_size", 16, "projection_size 16"),
    (None, "model_type", "clip", "model_type 'clip' is not a SigLIP model"),
    (None, "vision_config", None, "vision_config is null, not a JSON object"),
    (None, "text_config", 3, "text_config is 3, not a JSON object"),
    ("vision_config", "hidden_size", "32", 'vision_config.hidden_size is "32"; expected a positive integer'),
    ("text_config", "num_attention_heads", None, "text_config.num_attention_heads is null; expected a positive integer"),
    ("vision_config", "patch_size", 0, "vision_config.patch_size is 0; expected a positive integer"),
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


def test_damaged_safetensors_or_index_is_a_value_error_naming_the_file(tmp_path):
    shutil.copy(HF / "siglip" / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes((HF / "siglip" / "model.safetensors").read_bytes()[:3000])
    with pytest.raises(ValueError, match=r"cannot read .*model\.safetensors"):
        load_hf_siglip_folder(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ValueError, match="is not a safetensors index"):
        load_hf_siglip_folder(tmp_path)


# ---------------------------------------------------------------------------------------------- DualToken
def tiny_dualtoken_args(size: int, grid: int) -> dict:
    """DualToken settings that fit the tiny HF towers (2-3 layers, 4x4 or 6x6 grid)."""
    ch_mult = {4: [1, 2, 2, 2], 6: [1, 2, 2]}[grid]
    return {"pixel_layer": 1, "semantic_layer": 2, "shortcut_layer": None, "code_dim": 8, "codebook_size": 64,
            "pixel_depth": 2, "semantic_depth": 2, "decoder_latent_size": grid, "text_tokenizer": None,
            "decoder": {"ch": 16, "ch_mult": ch_mult, "num_res_blocks": 1, "attn_resolutions": [grid],
                        "in_channels": 16, "groups": 8},
            "preprocess": {"image_size": size, "crop": "center", "interpolation": "bicubic",
                           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}


def check_teacher(tok, kind: str, size: int) -> None:
    """The teacher (frozen initial tower) gives transformers' layer-2 features and pooled output."""
    ref = load_file(str(HF / f"{kind}_outputs.safetensors"))
    deep, pooled = tok.teacher_targets(ref[f"pixels_{size}"])
    assert rel(deep, ref[f"hidden_{size}_2"]) < 1e-4 and rel(pooled, ref[f"pooled_{size}"]) < 1e-4
    with torch.no_grad():
        assert rel(tok.encode_text(ref["input_ids"], normalize=False), ref["text_embeds"]) < 1e-4


def test_convert_siglip_from_hf_folder_reloads(tmp_path):
    """`convert siglip` on an HF folder: tower geometry from its config.json, every weight from its
    safetensors, a release that reloads (no transformers) with the teacher and text tower intact."""
    import vistok
    from vistok.convert import convert_siglip

    report = convert_siglip(HF / "siglip", tmp_path / "rel", preset="tiny-dualtoken", **tiny_dualtoken_args(32, 4))
    assert report["format"] == "hf-transformers" and report["text_tower"]
    config = json.loads((tmp_path / "rel" / "config.json").read_text())
    assert config["model_args"]["siglip_weights"] is None and config["model_args"]["clip_model"] is None
    assert config["model_args"]["clip_config"]["vision_cfg"]["act"] == "gelu_tanh"
    tok = vistok.load_tokenizer(tmp_path / "rel")
    check_teacher(tok, "siglip", 32)
    enc = tok.encode(load_file(str(HF / "siglip_outputs.safetensors"))["pixels_32"])
    assert enc.ids["pixel"].shape == (2, 4, 4, 2) and enc.pooled.shape == (2, 32)


def test_model_init_takes_a_naflex_siglip2_folder_at_the_preset_size():
    """model.init = an HF SigLIP2 (NaFlex) folder: built at the run's 24 px (6x6 grid, resized position
    table), tower and teacher from the folder."""
    from vistok.train.config import load_config
    from vistok.train.trainer import build_model

    cfg = load_config("dualtoken-tiny", [])
    cfg.model.init = str(HF / "siglip2")
    cfg.model.overrides = tiny_dualtoken_args(24, 6)
    tok = build_model(cfg).eval()
    assert tok.siglip.grid == (6, 6) and tok.config["clip_config"]["vision_cfg"]["hf_model_type"] == "siglip2"
    check_teacher(tok, "siglip2", 24)


def test_siglip_weights_into_another_geometry_is_refused():
    import vistok

    with pytest.raises(ValueError, match=r"not built with the geometry of .*siglip.*vision_cfg\.image_size: folder 32"):
        vistok.create_tokenizer("tiny-dualtoken", siglip_weights=str(HF / "siglip"))


def test_cli_convert_accepts_an_hf_folder(tmp_path):
    """The CLI takes a folder as SRC; the tiny-dualtoken preset's layer taps do not fit the 3-layer tower,
    which the error names (the folder's geometry was used)."""
    from click.testing import CliRunner

    from vistok.cli import main

    res = CliRunner().invoke(main, ["convert", "siglip", str(HF / "siglip"), str(tmp_path / "o"),
                                    "--preset", "tiny-dualtoken"])
    assert res.exit_code != 0
    assert "semantic_layer=5 is outside the tower's layers 1..3" in str(res.exception) + res.output


def test_official_backbone_preset_takes_every_hf_key():
    """dualtoken-siglip2-so400m14-384 holds exactly HF siglip2-so400m-patch14-384's tensors (key list
    written by transformers' SiglipModel with that config, tests/data/keys): all 888 map and fit."""
    import vistok
    from conftest import read_key_list

    with torch.device("meta"):
        tok = vistok.create_tokenizer("dualtoken-siglip2-so400m14-384", with_teacher=False)
        hf = {k: torch.empty(shape) for k, shape in read_key_list("hf_siglip2_so400m14_384.txt")}
        mapped, dropped = hf_siglip_state_dict_to_vistok(hf)
    assert len(hf) == 888 and dropped == []
    ours = {k: tuple(v.shape) for k, v in tok.siglip.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in mapped.items()}
    assert tok.siglip.grid == (27, 27) and tok.codebooks["pixel"].depth == tok.codebooks["semantic"].depth == 8
    assert gelu_kind(tok.siglip.trunk.blocks[0].mlp.act.to_empty(device="cpu")) == "tanh"
    with pytest.raises(ValueError, match="Gemma tokenizer of SigLIP2"):
        tok.siglip.tokenize(["a photo"])


def test_explicit_geometry_refuses_unknown_vision_fields():
    from vistok.tokenizers.siglip import SiglipTower

    vision = {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "heads": 2, "mlp_dim": 32,
              "act": "gelu_tanh", "norm_eps": 1e-6, "pool": "map", "num_layer": 4}
    with pytest.raises(ValueError, match=r"unknown vision_cfg field\(s\) \['num_layer'\]"):
        SiglipTower(clip_config={"embed_dim": 16, "vision_cfg": vision}, with_text=False)


def test_model_init_hf_folder_passes_the_config_checks():
    """`--set model.init=<HF folder>` goes through load_config's family check (the preset decides the class)."""
    from vistok.train.config import load_config

    cfg = load_config("dualtoken-tiny", [f"model.init={HF / 'siglip2'}"])
    assert cfg.model.init == str(HF / "siglip2")
