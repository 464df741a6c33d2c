"""TokLIP files as TokLIP's own code writes them (tests/data/toklip_official/README.md says how they were
made): the NumPy-1 pickle loads, the conversion fills only what TokLIP never saves, the geometry comes
from TokLIP's model-config JSON, and the converted release, reloaded in a fresh process, reproduces
the official token features, pooled and text embeddings."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import vistok
from vistok.cli import main
from vistok.convert.checkpoint_io import read_checkpoint

DATA = Path(__file__).parent / "data" / "toklip_official"
OFFICIAL = DATA / "epoch_1_without_vq.pt"
CONFIG = DATA / "ViT-Mini-16-toklip-64.json"
FILLED = ["siglip.visual.trunk.patch_embed.proj.weight", "siglip.visual.trunk.patch_embed.proj.bias",
          "siglip.logit_bias"]


def test_official_training_file_with_numpy1_scalar_loads():
    assert b"numpy.core.multiarray\nscalar" in _pickle_bytes(OFFICIAL)  # written under NumPy 1.26
    ckpt = read_checkpoint(OFFICIAL)
    assert sorted(ckpt) == ["epoch", "name", "optimizer", "scaler", "state_dict"]
    lr = ckpt["optimizer"]["param_groups"][0]["lr"]
    assert isinstance(lr, np.float64) and lr == pytest.approx(0.5 * (1 + np.cos(np.pi * 3 / 8)) * 1e-5)
    assert ckpt["scaler"]["scale"] == 65536.0 and ckpt["optimizer"]["state"]  # AdamW moments after a step
    keys = ckpt["state_dict"]
    assert all(k.startswith("module.") for k in keys)  # saved from the DDP-wrapped model
    assert not any("patch_embed" in k or "logit_bias" in k for k in keys)


def _pickle_bytes(path: Path) -> bytes:
    import zipfile

    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """The official file with a LlamaGen VQ-16 put back (left out of tests/data for size): random
    weights, except the codebook rows of the ids the official VQ produced, which are the official ones."""
    ckpt = read_checkpoint(OFFICIAL)
    ref = load_file(DATA / "official_outputs.safetensors")
    torch.manual_seed(0)
    vq = vistok.create_tokenizer("llamagen-vq16").state_dict()
    vq["quantize.embedding.weight"][ref["codebook_ids"]] = ref["codebook_rows"]
    ckpt["state_dict"].update({f"module.visual.trunk.vq.{k}": v for k, v in vq.items()})
    path = tmp_path_factory.mktemp("toklip") / "epoch_1.pt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def release(official_file):
    dst = official_file.parent / "release"
    res = CliRunner().invoke(main, ["convert", "toklip", str(official_file), str(dst), "--config", str(CONFIG),
                                    "--json"])
    assert res.exit_code == 0, res.output
    return dst, res.stdout


def _relative_errors(ours: dict, ref: dict) -> dict:
    return {name: ((ours[name] - ref[name]).abs().max() / ref[name].abs().max()).item()
            for name in ("features", "pooled", "text")}


def test_convert_with_config_matches_official_outputs(release):
    dst, stdout = release
    report = json.loads(stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["preset"] == "config" and report["filled_from_init"] == FILLED
    assert json.loads((dst / "config.json").read_text())["source"]["filled_from_init"] == FILLED
    ref = load_file(DATA / "official_outputs.safetensors")
    tok = vistok.load_tokenizer(dst)
    with torch.no_grad():
        features, pooled = tok.features_from_ids({"vq": ref["ids"][..., None]})
        text = tok.encode_text(ref["text_tokens"], normalize=False)
    errors = _relative_errors({"features": features, "pooled": pooled, "text": text}, ref)
    assert all(e <= 1e-4 for e in errors.values()), errors


@pytest.mark.slow
def test_release_reloads_in_a_fresh_process(release, tmp_path):
    """A config-built trunk has no timm name of its own: the release must rebuild it from config.json."""
    dst, _ = release
    out = tmp_path / "ours.safetensors"
    script = (
        "import sys, torch, vistok; from safetensors.torch import load_file, save_file\n"
        "ref = load_file(sys.argv[2]); tok = vistok.load_tokenizer(sys.argv[1])\n"
        "with torch.no_grad():\n"
        "    feats, pooled = tok.features_from_ids({'vq': ref['ids'][..., None]})\n"
        "    text = tok.encode_text(ref['text_tokens'], normalize=False)\n"
        "save_file({'features': feats, 'pooled': pooled, 'text': text}, sys.argv[3])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(vistok.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", script, str(dst), str(DATA / "official_outputs.safetensors"), str(out)],
                   check=True, env=env, timeout=300)
    errors = _relative_errors(load_file(out), load_file(DATA / "official_outputs.safetensors"))
    assert all(e <= 1e-4 for e in errors.values()), errors


def test_official_eval_crops_equal_vistok_preprocess():
    """The official outputs were computed on skimage's chelsea and coffee photos through TokLIP's
    open_clip eval transform at 64 px; the crops are stored."""
    from PIL import Image
    from skimage import data as skdata

    from vistok.images import PreprocessConfig, pil_to_pixels, preprocess_image

    ref = load_file(DATA / "official_outputs.safetensors")["crops_uint8"]
    cfg = PreprocessConfig(image_size=64, crop="center", interpolation="bicubic")
    for i, photo in enumerate((skdata.chelsea(), skdata.coffee())):
        crop = preprocess_image(Image.fromarray(photo), cfg)
        assert torch.equal(torch.from_numpy(np.array(crop)).permute(2, 0, 1), ref[i])
        assert torch.equal(pil_to_pixels(crop), ref[i].float() / 127.5 - 1)


def test_only_the_never_saved_keys_are_filled(official_file, tmp_path):
    from vistok.convert.toklip import convert_toklip

    ckpt = read_checkpoint(official_file)
    del ckpt["state_dict"]["module.visual.trunk.blocks.0.attn.qkv.weight"]
    torch.save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"1 missing key\(s\): siglip.visual.trunk.blocks.0.attn.qkv.weight"):
        convert_toklip(tmp_path / "broken.pt", tmp_path / "out", config=CONFIG)


def test_without_config_an_unknown_geometry_asks_for_it(official_file, tmp_path):
    from vistok.convert.toklip import convert_toklip

    with pytest.raises(ValueError, match="pass --config"):
        convert_toklip(official_file, tmp_path / "out")


def test_model_config_known_trunks_pick_presets_and_bad_configs_are_named():
    from vistok.convert.toklip import toklip_args_from_model_config

    s256 = {"embed_dim": 1152, "vision_cfg": {"image_size": 256, "timm_model_name": "vit_so400m_patch16_toklip_256"},
            "text_cfg": {}}
    assert toklip_args_from_model_config(s256) == ("toklip-s-256", {})
    s256["vision_cfg"]["timm_model_name"] = "vit_so400m_patch16_toklip_384"
    assert toklip_args_from_model_config(s256)[0] == "toklip-l-384"
    s256["vision_cfg"]["timm_model_name"] = "vit_so400m_patch14_toklip_224"
    with pytest.raises(ValueError, match=r"\['patch_size', 'width', 'layers', 'head_width', 'mlp_ratio'\] are missing"):
        toklip_args_from_model_config(s256)
    cfg = json.loads(CONFIG.read_text())
    preset, args = toklip_args_from_model_config(cfg)
    trunk = args["clip_config"]["vision_cfg"]
    assert preset is None and args["mlp_hidden"] == 4 * 32 and args["preprocess"] == {"image_size": 64}
    assert trunk == {"image_size": 64, "patch_size": 16, "width": 32, "layers": 2, "heads": 2,
                     "mlp_dim": 119, "act": "gelu_tanh", "norm_eps": 1e-6, "pool": "map"}
    cfg["vision_cfg"]["head_width"] = 12
    with pytest.raises(ValueError, match="width 32 is not a multiple of head_width 12"):
        toklip_args_from_model_config(cfg)
    with pytest.raises(ValueError, match="cannot read the TokLIP model config"):
        toklip_args_from_model_config("/nonexistent/model.json")


@pytest.mark.parametrize("edit,message", [
    (lambda c: [1, 2], r"is a JSON object, not \[1, 2\]"),
    (lambda c: None, "is a JSON object, not null"),
    (lambda c: c["vision_cfg"].update(width=None) or c, "vision_cfg.width is null"),
    (lambda c: c["vision_cfg"].update(width="abc") or c, "vision_cfg.width is \"abc\""),
    (lambda c: c["vision_cfg"].update(head_width=0) or c, "vision_cfg.head_width is 0"),
    (lambda c: c["text_cfg"].update(foo=1) or c, "cannot build the TokLIP model .* unexpected keyword argument 'foo'"),
])
def test_bad_model_config_is_one_line_naming_the_problem(official_file, tmp_path, edit, message):
    config = edit(json.loads(CONFIG.read_text()))
    (tmp_path / "model.json").write_text(json.dumps(config))
    res = CliRunner().invoke(main, ["convert", "toklip", str(official_file), str(tmp_path / "out"),
                                    "--config", str(tmp_path / "model.json")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), res.output
    assert not (tmp_path / "out").exists()
