"""MAR kl16.ckpt / LDM kl-f16 import: synthetic checkpoints with the real key layout, strict loading."""

import argparse

import pytest
import torch
from click.testing import CliRunner
from conftest import read_key_list
from safetensors.torch import save_file

import vistok
from vistok.cli import main
from vistok.convert import convert_mar_kl16, read_checkpoint
from vistok.tokenizers.base import CheckpointMismatchError

LDM_DECODER_ATTN = [
    (f"decoder.up.4.attn.{j}.{leaf}.{kind}", (512, 512, 1, 1) if kind == "weight" and leaf != "norm" else (512,))
    for j in range(3) for leaf in ("norm", "q", "k", "v", "proj_out") for kind in ("weight", "bias")
]


def synthetic_state_dict(keys, seed=0):
    """Random tensors with the reference names and shapes, made independently of vistok's model."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.02 for k, shape in keys}


@pytest.fixture(scope="module")
def mar_sd():
    return synthetic_state_dict(read_key_list("mar_kl16.txt"))


def assert_loaded(directory, expected):
    tok = vistok.load_tokenizer(directory)
    got = tok.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    return tok


def test_mar_checkpoint_converts_and_every_key_loads(tmp_path, mar_sd):
    src = tmp_path / "kl16.ckpt"
    torch.save({"model": mar_sd}, src)
    report = convert_mar_kl16(src, tmp_path / "out")
    assert report["preset"] == "mar-kl16" and report["tensors"] == 312
    tok = assert_loaded(tmp_path / "out", mar_sd)
    assert tok.scaling_factor == 0.2325


def test_ldm_lightning_checkpoint_with_prefixes_and_loss_is_detected(tmp_path, mar_sd):
    sd = dict(mar_sd, **synthetic_state_dict(LDM_DECODER_ATTN, seed=1))
    wrapped = {f"first_stage_model.{k}": v for k, v in sd.items()}
    wrapped["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    wrapped["loss.logvar"] = torch.zeros(())
    src = tmp_path / "model.ckpt"
    torch.save({"state_dict": wrapped, "epoch": 3}, src)
    assert convert_mar_kl16(src, tmp_path / "out")["preset"] == "ldm-kl-f16"
    assert_loaded(tmp_path / "out", sd)


def test_bare_module_prefixed_and_safetensors_sources(tmp_path, mar_sd):
    bare = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in mar_sd.items()}, bare)
    convert_mar_kl16(bare, tmp_path / "a")
    assert_loaded(tmp_path / "a", mar_sd)
    st = tmp_path / "kl16.safetensors"
    save_file(mar_sd, str(st))
    convert_mar_kl16(st, tmp_path / "b")
    assert_loaded(tmp_path / "b", mar_sd)


def test_missing_extra_and_misshaped_keys_are_all_reported(tmp_path, mar_sd):
    sd = dict(mar_sd)
    del sd["encoder.down.4.attn.1.q.weight"]
    sd["encoder.extra.weight"] = torch.zeros(3)
    sd["quant_conv.bias"] = torch.zeros(31)
    src = tmp_path / "bad.ckpt"
    torch.save({"model": sd}, src)
    with pytest.raises(CheckpointMismatchError) as err:
        convert_mar_kl16(src, tmp_path / "out")
    msg = str(err.value)
    assert "1 missing key(s): encoder.down.4.attn.1.q.weight" in msg
    assert "1 unexpected key(s): encoder.extra.weight" in msg
    assert "quant_conv.bias (checkpoint (31,) vs model (32,))" in msg
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_pickle_needing_code_execution_is_refused(tmp_path):
    src = tmp_path / "mar.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, src)
    with pytest.raises(ValueError, match="needs code execution"):
        read_checkpoint(src)


def test_cli_convert_reports_one_line_error(tmp_path, mar_sd):
    runner = CliRunner()
    src = tmp_path / "kl16.ckpt"
    torch.save({"model": {k: v for k, v in mar_sd.items() if not k.startswith("post_quant_conv")}}, src)
    res = runner.invoke(main, ["convert", "mar-kl16", str(src), str(tmp_path / "out")])
    assert res.exit_code == 1
    err_lines = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(err_lines) == 1 and "2 missing key(s): post_quant_conv.weight, post_quant_conv.bias" in err_lines[0]
    assert "Traceback" not in res.output
    res = runner.invoke(main, ["convert", "mar-kl16", str(tmp_path / "nope.ckpt"), str(tmp_path / "o")])
    assert res.exit_code == 1 and "checkpoint not found" in res.stderr
    bad = tmp_path / "kl16.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    res = runner.invoke(main, ["convert", "mar-kl16", str(bad), str(tmp_path / "o")])
    assert res.exit_code == 1 and "cannot read checkpoint" in res.stderr and "Traceback" not in res.output
