"""Devices and dtypes (issue 17 item 3): --device auto, --dtype, load_tokenizer(device=, dtype=), tok.dtype,
and tok.config as a read-only attribute-style mapping that still is the plain dict."""

import copy
import json
import pickle

import pytest
import torch
from click.testing import CliRunner

import vistok
from vistok.cli import main
from vistok.tokenizers.frozen_config import FrozenConfig


@pytest.fixture
def release(tmp_path, tiny_kl):
    return tiny_kl.save_pretrained(tmp_path / "rel"), tiny_kl


def test_config_reads_as_attributes_and_is_read_only(tiny_kl):
    cfg = tiny_kl.config
    assert isinstance(cfg, dict) and isinstance(cfg, FrozenConfig)
    assert cfg.scaling_factor == cfg["scaling_factor"] == 1.0
    assert cfg.preprocess.image_size == cfg["preprocess"]["image_size"] == 32
    plain = json.loads(json.dumps(cfg))
    assert type(plain) is dict and plain == cfg and cfg == plain  # JSON-serialisable, equal to the dict
    with pytest.raises(TypeError, match="read-only"):
        cfg["scaling_factor"] = 2.0
    with pytest.raises(TypeError, match="read-only"):
        cfg.scaling_factor = 2.0
    with pytest.raises(TypeError, match="read-only"):
        cfg.preprocess.update(image_size=64)
    with pytest.raises(AttributeError, match="no field 'scale'.*scaling_factor"):
        cfg.scale
    edited = cfg.to_dict()
    edited["preprocess"]["image_size"] = 64  # an editable copy; the model is untouched
    assert tiny_kl.config.preprocess.image_size == 32
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg
    assert vistok.create_tokenizer("tiny-kl", **{k: v for k, v in edited.items() if k != "preprocess"}).config == \
        {**plain, "preprocess": plain["preprocess"]}


def test_load_tokenizer_device_and_dtype(release):
    path, tok = release
    assert tok.dtype == torch.float32
    half = vistok.load_tokenizer(path, dtype="bf16")
    assert half.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert vistok.load_tokenizer(path, dtype=torch.float16).dtype == torch.float16
    assert vistok.load_tokenizer(path, device="cpu").device == torch.device("cpu")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref = tok.eval().decode(latents=tok.encode(x).latents)
        out = half.decode(latents=half.encode(x).latents)  # fp32 pixels are cast to the model's dtype
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1
    with pytest.raises(ValueError, match="unsupported dtype 'int8': expected fp32, bf16 or fp16"):
        vistok.load_tokenizer(path, dtype="int8")
    with pytest.raises(ValueError, match="disagree"):
        vistok.load_tokenizer(path, device="cpu", map_location="meta")


def test_load_tokenizer_takes_device_auto_like_the_cli(release, monkeypatch):
    from vistok.tokenizers.registry import resolve_device

    path, _ = release
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vistok.load_tokenizer(path, device="auto").device == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"invalid device 'gpu' \(expected auto, cpu, cuda, cuda:N"):
        vistok.load_tokenizer(path, device="gpu")


def test_device_auto_is_cuda_when_available(monkeypatch):
    from vistok.cli.common import auto_device, check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_device() == "cpu" and check_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_device() == "cuda"


@pytest.mark.parametrize("command", ["encode", "decode", "reconstruct"])
def test_codec_commands_default_to_auto_device_and_take_dtype(command):
    res = CliRunner().invoke(main, [command, "--help"])
    assert "--device TEXT" in res.output and "[default: auto]" in res.output
    assert "--dtype [fp32|bf16|fp16]" in res.output


@pytest.mark.parametrize("command", ["recon", "codebook", "zeroshot", "retrieval"])
def test_bench_commands_default_to_auto_device_and_take_dtype(command):
    res = CliRunner().invoke(main, ["bench", command, "--help"])
    assert "[default: auto]" in res.output and "--dtype [fp32|bf16|fp16]" in res.output


def test_reconstruct_in_bf16_is_close_to_fp32(release, image_dir, tmp_path):
    import numpy as np
    from PIL import Image

    path, _ = release
    runner = CliRunner()
    for dtype in ("fp32", "bf16"):
        res = runner.invoke(main, ["reconstruct", str(path), str(image_dir), "--out-dir", str(tmp_path / dtype),
                                   "--dtype", dtype, "--no-grid"])
        assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (tmp_path / "fp32").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "bf16").iterdir()) and len(names) == 3
    for name in names:
        a, b = (np.asarray(Image.open(tmp_path / d / name), dtype=np.float64) for d in ("fp32", "bf16"))
        psnr = 10 * np.log10(255.0**2 / max(((a - b) ** 2).mean(), 1e-10))
        assert psnr > 30, (name, psnr)  # bf16 rounding, not another model
    res = runner.invoke(main, ["reconstruct", str(path), str(image_dir), "--out-dir", str(tmp_path / "x"),
                               "--dtype", "int8"])
    assert res.exit_code == 2 and "'int8' is not one of 'fp32', 'bf16', 'fp16'" in res.output


def test_a_device_this_machine_lacks_is_named_before_loading(release):
    release, _ = release
    # before: load_tokenizer and bench_recon read the weights, then torch raised "Found no NVIDIA driver" (or
    # "invalid device ordinal") from .to(); now a ValueError naming the device, as the CLI's --device check
    missing = f"cuda:{torch.cuda.device_count() + 7}"
    lacks = rf"device '{missing}': (CUDA is not available on this machine|this machine has \d+ CUDA device\(s\))"
    with pytest.raises(ValueError, match=lacks):
        vistok.load_tokenizer(release, device=missing)
    with pytest.raises(ValueError, match=r"invalid device 'gpu' \(expected auto, cpu, cuda, cuda:N"):
        vistok.load_tokenizer(release, map_location="gpu")
    with pytest.raises(ValueError, match=lacks):
        vistok.bench_recon(release, "builtin:photos", device=missing, limit=1)
    assert vistok.load_tokenizer(release, device="auto").device.type == ("cuda" if torch.cuda.is_available() else "cpu")
