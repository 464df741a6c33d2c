"""DualToken against the official code (songweii/DualToken 29e7c84): checkpoints written by its main.py,
converted by `vistok convert dualtoken`, reproduce its eval outputs, one training step's codebooks and its
restart rules. The reference outputs were computed by the official code (tests/data/dualtoken_official/README.md)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import vistok
from vistok.cli import main
from vistok.convert.dualtoken import convert_dualtoken

DATA = Path(__file__).parent / "data" / "dualtoken_official"
SIZES = ("small", "medium")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dualtoken_official")
    return {size: convert_dualtoken(DATA / size / "epoch_1.pt", root / size) and root / size for size in SIZES}


def reference(size: str) -> dict[str, torch.Tensor]:
    return load_file(str(DATA / size / "official_outputs.safetensors"))


def codebook_errors(tok, ref: dict, prefix: str) -> list[float]:
    errors = []
    for name, q in (("pixel", tok.pixel_quantizer), ("semantic", tok.semantic_quantizer)):
        for b in range(q.embed.shape[0]):
            for ours, theirs in ((q.embed, "embed"), (q.embed_avg, "embed_ema"), (q.cluster_size, "cluster_size_ema")):
                errors.append(rel(ours[b], ref[f"{prefix}_{name}_codebook.{b}.{theirs}"]))
    return errors


@pytest.mark.parametrize("size", SIZES)
def test_eval_outputs_equal_the_official_model(converted, size):
    tok = vistok.load_tokenizer(converted[size]).eval()
    ref = reference(size)
    with torch.no_grad():
        enc = tok.encode(ref["images"])
        recon = tok.decode(ids=enc.ids, clamp=False)
        text = tok.encode_text(ref["text_ids"], normalize=False)
        text_normalized = tok.encode_text(ref["text_ids"])
        teacher = tok.teacher_targets(ref["images"])
    assert torch.equal(enc.ids["pixel"], ref["ids_pixel"])
    assert torch.equal(enc.ids["semantic"], ref["ids_semantic"])
    for ours, theirs in ((recon, "reconstruction"), (enc.pooled, "pooled"), (enc.features, "features"),
                         (text, "text_embeds"), (text_normalized, "text_embeds_normalized"),
                         (teacher[0], "teacher_features"), (teacher[1], "teacher_pooled")):
        assert rel(ours, ref[theirs]) < 1e-4, theirs


@pytest.mark.parametrize("size", SIZES)
def test_one_training_step_equals_the_official_codebooks(converted, size):
    """Restart off: the per-depth ("rq") pixel schedule looks codes up before rewriting the codebook."""
    tok = vistok.load_tokenizer(converted[size]).train()
    for q in (tok.pixel_quantizer, tok.semantic_quantizer):
        q.restart = "none"
    ref = reference(size)
    out = tok(ref["images"], with_teacher=False)
    assert torch.equal(out.ids["pixel"], ref["train_ids_pixel"])
    assert torch.equal(out.ids["semantic"], ref["train_ids_semantic"])
    assert rel(out.reconstruction, ref["train_reconstruction"]) < 1e-4
    for name in ("pixel", "semantic"):
        assert rel(out.commitment_loss[name], ref[f"train_commitment_{name}"]) < 1e-4
    assert max(codebook_errors(tok, ref, "train")) < 1e-4
    # the one deliberate difference: per-depth residuals for "rq_ema", not the official aliased cache
    sem = tok.semantic_quantizer
    assert rel(sem.embed_avg[0], ref["train_semantic_codebook_official_cache.0.embed_ema"]) > 1e-2
    torch.testing.assert_close(sem.cluster_size[0], ref["train_semantic_codebook_official_cache.0.cluster_size_ema"])


@pytest.mark.parametrize("size", SIZES)
def test_restart_follows_the_official_rules(converted, size):
    """Seeded as the official run (its draws are the forward's only random numbers): post-restart
    smoothing, dead code i takes draw i, a batch smaller than the codebook tiled and jittered."""
    tok = vistok.load_tokenizer(converted[size]).train()
    ref = reference(size)
    torch.manual_seed(1234)
    out = tok(ref["images"][:1], with_teacher=False)
    assert torch.equal(out.ids["pixel"], ref["restart_ids_pixel"])
    assert torch.equal(out.ids["semantic"], ref["restart_ids_semantic"])
    assert int(tok.pixel_quantizer.restarts_total) > 0
    assert max(codebook_errors(tok, ref, "restart")) < 1e-4


def test_release_records_its_teacher_and_reloads_without_transformers_or_network(converted):
    small = json.loads((converted["small"] / "config.json").read_text())["source"]
    medium = json.loads((converted["medium"] / "config.json").read_text())["source"]
    assert small["teacher"] == "pretrained:pretrained_model"  # the folder holds weights, as main.py loads
    assert medium["teacher"] == "checkpoint"  # config.json only: the checkpoint's tower
    code = f"""
import socket, sys
sys.modules["transformers"] = None  # importing it fails
def no_network(*a, **k):
    raise OSError("network used")
socket.socket.connect = no_network
socket.create_connection = no_network
import torch, vistok
from safetensors.torch import load_file
tok = vistok.load_tokenizer({str(converted['small'])!r}).eval()
ref = load_file({str(DATA / 'small' / 'official_outputs.safetensors')!r})
enc = tok.encode(ref["images"])
assert torch.equal(enc.ids["pixel"], ref["ids_pixel"]) and torch.equal(enc.ids["semantic"], ref["ids_semantic"])
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_every_official_key_is_consumed_or_listed_as_dropped(converted):
    state = torch.load(DATA / "small" / "epoch_1.pt", weights_only=True)["state_dict"]
    weights = load_file(str(converted["small"] / "model.safetensors"))
    # only the documented kinds are dropped: 5 zero key biases, the shared codebooks' repeats
    # codebooks.1..3 (2 branches x 3 depths x 3 tensors), the two padding rows, position_ids buffers
    dropped = [k for k in state if k.endswith(("zero_k_bias", "position_ids"))
               or any(f"codebooks.{i}." in k for i in (1, 2, 3))]
    assert sum(k.endswith("zero_k_bias") for k in dropped) == 5 and sum("codebooks." in k for k in dropped) == 18
    kept = sum(state[k].numel() for k in state if k not in dropped) - 2 * 8  # minus the two padding rows
    teacher = sum(v.numel() for k, v in weights.items() if k.startswith("teacher."))
    stats = sum(v.numel() for k, v in weights.items() if "_quantizer." in k and not
                k.endswith(("embed", "embed_avg", "cluster_size")))
    assert sum(v.numel() for v in weights.values()) - teacher - stats == kept


def _damaged(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "damaged"
    shutil.copytree(DATA / "small", folder)
    ckpt = torch.load(folder / "epoch_1.pt", weights_only=True)
    edit(ckpt["state_dict"])
    torch.save(ckpt, folder / "epoch_1.pt")
    return folder / "epoch_1.pt"


def test_missing_extra_and_misshaped_keys_fail_in_one_line_naming_them(tmp_path):
    def edit(sd):
        del sd["decoder.conv_out.bias"]
        sd["prequant_pix.extra.weight"] = torch.zeros(3)
        sd["post_quant_conv.conv1.weight"] = torch.zeros(32, 32, 3, 3)  # vistok's old 3x3 shape

    with pytest.raises(ValueError) as info:
        convert_dualtoken(_damaged(tmp_path, edit), tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message
    assert "missing 1: decoder.conv_out.bias" in message
    assert "unexpected 1: prequant_pix.extra.weight" in message
    assert "mis-shaped 1: post_quant.conv1.weight (32, 32, 3, 3) vs (32, 32, 1, 1)" in message
    assert not (tmp_path / "out").exists()


def test_tower_key_missing_and_diverged_shared_codebook_are_named(tmp_path):
    src = _damaged(tmp_path, lambda sd: sd.pop("siglip_model.vision_model.post_layernorm.bias"))
    with pytest.raises(ValueError, match="missing 1: siglip_model.vision_model.post_layernorm.bias"):
        convert_dualtoken(src, tmp_path / "out")
    shutil.rmtree(tmp_path / "damaged")
    src = _damaged(tmp_path, lambda sd: sd.__setitem__("quantizer_sem.codebooks.2.embed_ema", torch.zeros(32, 8)))
    with pytest.raises(ValueError, match=r"quantizer_sem.codebooks.2.embed_ema differs .* shared_codebook=true"):
        convert_dualtoken(src, tmp_path / "out")


def _with_config(tmp_path: Path, edit, hf_edit=None) -> Path:
    folder = tmp_path / "cfg"
    shutil.copytree(DATA / "small", folder)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg["rqvaesiglip"])
    (folder / "config.json").write_text(json.dumps(cfg))
    if hf_edit:
        hf = json.loads((folder / "pretrained_model" / "config.json").read_text())
        hf_edit(hf)
        (folder / "pretrained_model" / "config.json").write_text(json.dumps(hf))
    return folder / "epoch_1.pt"


@pytest.mark.parametrize("edit,hf_edit,message", [
    (lambda c: c["vq_sem"].update(embed_dim=16), None, "vq_pix.embed_dim=8 differs from vq_sem.embed_dim=16"),
    (lambda c: c["vq_pix"].update(code_shape=[2, 2, 4]), None, r"vq_pix code_shape \[2, 2, 4\]"),
    (lambda c: c["vq_pix"].update(bottleneck_type="vq"), None, "vq_pix.bottleneck_type='vq'"),
    (lambda c: c.update(decoder_latent_shape=[4, 2]), None, r"decoder_latent_shape \[4, 2\] is not square"),
    (lambda c: None, lambda h: h["vision_config"].update(hidden_act="relu"), "vision_config.hidden_act='relu'"),
    (lambda c: c.update(hidden_size=64), None, "hidden_size 64 differs from the SigLIP tower width 32"),
])
def test_unbuildable_config_says_what_is_unsupported(tmp_path, edit, hf_edit, message):
    with pytest.raises(ValueError, match=message):
        convert_dualtoken(_with_config(tmp_path, edit, hf_edit), tmp_path / "out")


def test_config_and_pretrained_folder_are_found_or_asked_for(tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(DATA / "small" / "epoch_1.pt", lone / "epoch_1.pt")
    with pytest.raises(FileNotFoundError, match="pass --config"):
        convert_dualtoken(lone / "epoch_1.pt", tmp_path / "out")
    config_dir = tmp_path / "model_config_tiny"
    config_dir.mkdir()
    shutil.copy(DATA / "small" / "config.json", config_dir / "config.json")
    with pytest.raises(FileNotFoundError, match="pass --pretrained"):
        convert_dualtoken(lone / "epoch_1.pt", tmp_path / "out", config=config_dir)
    runner = CliRunner()
    res = runner.invoke(main, ["convert", "dualtoken", str(lone / "epoch_1.pt"), str(tmp_path / "out"), "--config",
                               str(config_dir / "config.json"), "--pretrained", str(DATA / "small" / "pretrained_model"),
                               "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["teacher"] == "pretrained:pretrained_model" and report["tensors"] == 332
    res = runner.invoke(main, ["convert", "toklip", str(lone / "epoch_1.pt"), str(tmp_path / "o2"), "--pretrained",
                               str(DATA / "small" / "pretrained_model")])
    assert res.exit_code == 1 and "--pretrained applies to dualtoken, not to toklip" in res.stderr
    res = runner.invoke(main, ["convert", "mar-kl16", str(lone / "epoch_1.pt"), str(tmp_path / "o3"), "--config",
                               str(config_dir)])
    assert res.exit_code == 1 and "--config applies to dualtoken and toklip, not to mar-kl16" in res.stderr
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_official_384_config_builds_the_official_parameter_count_and_the_preset():
    """The official model_config_siglip_384_rvq8 on SigLIP2-So400M/14-384: the official RQVAESiglipModel
    has 1,347,264,469 parameters besides its two (16384 + 1) x 32 nn.Embedding codebooks (counted by
    building it with transformers 4.50.3 on the meta device; tests/data/dualtoken_official/README.md)."""
    from vistok.convert.dualtoken import dualtoken_args
    from vistok.tokenizers.dualtoken import DualTokenTokenizer

    vq = {"code_shape": [27, 27, 8], "decay": 0.99, "embed_dim": 32, "latent_shape": [27, 27, 32], "n_embed": 16384,
          "restart_unused_codes": True, "shared_codebook": True}
    cfg = {"layer_recon": 6, "layer_sem": 26, "layer_shortcut": 4, "weight_shortcut": 0.6, "hidden_size": 1152,
           "ddconfig": {"attn_resolutions": [24], "ch": 128, "ch_mult": [1, 1, 4, 4, 8], "decoder_in_channels": 1024,
                        "double_z": False, "dropout": 0.0, "in_channels": 3, "num_res_blocks": 2, "out_ch": 3,
                        "resolution": 384},
           "decoder_latent_shape": [24, 24], "vq_sem": {**vq, "bottleneck_type": "rq_ema"},
           "vq_pix": {**vq, "bottleneck_type": "rq"}}
    with torch.device("meta"):
        preset = vistok.create_tokenizer("dualtoken-siglip2-so400m14-384", with_teacher=False)
        tok = DualTokenTokenizer(**dualtoken_args(cfg, preset.config["clip_config"]), with_teacher=False)
    assert tok.num_parameters() == 1_347_264_469
    books = sum(b.numel() for n, b in tok.named_buffers() if n.endswith("_quantizer.embed"))
    assert books == 2 * 16384 * 32  # the official rows minus the two padding rows
    assert {k: v.shape for k, v in tok.state_dict().items()} == {k: v.shape for k, v in preset.state_dict().items()}


def test_destination_that_holds_other_files_is_refused_and_nothing_is_overwritten(tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(DATA / "small", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    # DST = the checkpoint's own folder: its official config.json must not be replaced by the release's
    with pytest.raises(ValueError, match="is not empty and is not an earlier `vistok convert dualtoken` release"):
        convert_dualtoken(folder / "epoch_1.pt", folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    res = CliRunner().invoke(main, ["convert", "dualtoken", str(folder / "epoch_1.pt"), str(other)])
    assert res.exit_code == 1 and "Traceback" not in res.output and "['notes.txt']" in res.stderr
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    # converting again into its own earlier release is refused without overwrite, replaces it with
    assert convert_dualtoken(folder / "epoch_1.pt", tmp_path / "out")["tensors"] == 332
    with pytest.raises(ValueError, match="already holds a `vistok convert dualtoken` release; pass --overwrite"):
        convert_dualtoken(folder / "epoch_1.pt", tmp_path / "out")
    assert convert_dualtoken(folder / "epoch_1.pt", tmp_path / "out", overwrite=True)["tensors"] == 332
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    (tmp_path / "out" / "README.md").write_text("# my notes on this run\n")  # not vistok's card: refused
    with pytest.raises(ValueError, match="is not empty and is not an earlier"):
        convert_dualtoken(folder / "epoch_1.pt", tmp_path / "out", overwrite=True)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("ddconfig"), "lacks ddconfig"),
    (lambda c: c.update(ddconfig=None), "has null for ddconfig"),
    (lambda c: c.pop("layer_recon"), "lacks layer_recon"),
    (lambda c: c.update(layer_sem="26"), "has \"26\" for layer_sem"),
    (lambda c: c.update(vq_pix=[1]), r"has \[1\] for vq_pix"),
    (lambda c: c["vq_sem"].pop("code_shape"), "lacks vq_sem.code_shape"),
    (lambda c: c["vq_pix"].update(latent_shape=[4, 4]), r"vq_pix.latent_shape \[4, 4\] is not \[height, width, depth\]"),
    (lambda c: c["ddconfig"].pop("decoder_in_channels"), "lacks ddconfig.decoder_in_channels"),
])
def test_config_missing_or_mistyped_field_is_named(tmp_path, edit, message):
    src = _with_config(tmp_path, edit)
    res = CliRunner().invoke(main, ["convert", "dualtoken", str(src), str(tmp_path / "out")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["[1, 2]", "null", "3"])
def test_config_that_is_not_a_json_object_is_refused(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="is not an official DualToken model config: it holds .* not a JSON object"):
        convert_dualtoken(DATA / "small" / "epoch_1.pt", tmp_path / "out", config=tmp_path)


def test_pretrained_folder_of_another_geometry_is_named(tmp_path):
    # the tiny HF SigLIP folder is a 32 px tower; the small official model decodes 16 px
    with pytest.raises(ValueError, match=r"with the SigLIP tower of .*hf_siglip/siglip/config.json does not build "
                                         r"a DualToken: decoder output 16 px"):
        convert_dualtoken(DATA / "small" / "epoch_1.pt", tmp_path / "out", pretrained=DATA.parent / "hf_siglip" / "siglip")
    assert not (tmp_path / "out").exists()


def test_misshaped_codebook_of_one_depth_is_named(tmp_path):
    folder = tmp_path / "medium"  # one codebook per depth
    shutil.copytree(DATA / "medium", folder)
    ckpt = torch.load(folder / "epoch_1.pt", weights_only=True)
    ckpt["state_dict"]["quantizer_pix.codebooks.1.embed_ema"] = torch.zeros(5, 8)
    torch.save(ckpt, folder / "epoch_1.pt")
    res = CliRunner().invoke(main, ["convert", "dualtoken", str(folder / "epoch_1.pt"), str(tmp_path / "out")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "mis-shaped: quantizer_pix.codebooks.1.embed_ema (5, 8) vs" in res.stderr, res.output
    assert not (tmp_path / "out").exists()


def test_pretrained_option_without_config_json_is_named_as_the_option(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^--pretrained .*empty has no config.json"):
        convert_dualtoken(DATA / "small" / "epoch_1.pt", tmp_path / "out", pretrained=tmp_path / "empty")
