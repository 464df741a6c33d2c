"""The command line: results on stdout, one-line errors with exit 1, files that round-trip."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open

import vistok
from vistok.cli import main
from vistok.images import pixels_to_pil


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def release(tmp_path, tiny_kl):
    with torch.no_grad():
        for p in tiny_kl.parameters():
            p.mul_(1.1)
    return tiny_kl.save_pretrained(tmp_path / "tiny-release")


def test_list_models_and_info(runner, release):
    res = runner.invoke(main, ["list-models", "--json"])
    assert res.exit_code == 0
    assert {r["name"] for r in json.loads(res.stdout)["models"]} >= {"mar-kl16", "tiny-kl"}
    res = runner.invoke(main, ["info", str(release), "--json"])
    info = json.loads(res.stdout)
    assert info["stride"] == 4 and info["grid"] == [8, 8]
    assert info["parameters"] == sum(p.numel() for p in vistok.load_tokenizer(release).parameters())
    assert info["config"]["model_args"]["z_channels"] == 4
    res = runner.invoke(main, ["info", "mar-kl16"])
    assert "66456019" in res.stdout and "0.2325" in res.stdout


def test_encode_decode_round_trip_matches_api(runner, release, image_dir, tmp_path):
    out = tmp_path / "lat.safetensors"
    res = runner.invoke(main, ["encode", str(release), str(image_dir), "--out", str(out), "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    with safe_open(str(out), "pt") as f:
        meta, latents = f.metadata(), f.get_tensor("latents")
    assert json.loads(meta["grid"]) == [8, 8] and meta["family"] == "kl" and latents.shape == (3, 4, 8, 8)
    tok = vistok.load_tokenizer(release)
    with torch.no_grad():
        expected = tok.encode(tok.preprocess(sorted(image_dir.iterdir()))).latents
        torch.testing.assert_close(latents, expected)
        res = runner.invoke(main, ["decode", str(release), str(out), "--out-dir", str(tmp_path / "dec")])
        assert res.exit_code == 0, res.output
        want = pixels_to_pil(tok.decode(latents=expected))
    got = [np.asarray(Image.open(tmp_path / "dec" / f"img{i}.png")) for i in range(3)]
    assert all(np.array_equal(g, np.asarray(w)) for g, w in zip(got, want))


def test_reconstruct_writes_images_and_grid(runner, release, image_dir, tmp_path):
    res = runner.invoke(main, ["reconstruct", str(release), str(image_dir / "img0.png"), str(image_dir / "img2.png"),
                               "--out-dir", str(tmp_path / "rec"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["out_dir"] == str(tmp_path / "rec") and out["grid"] == str(tmp_path / "rec" / "grid.png")
    rows = out["images"]
    assert [r["image"] for r in rows] == ["img0.png", "img2.png"]
    tok = vistok.load_tokenizer(release)
    for row, name in zip(rows, ["img0", "img2"]):
        x = tok.preprocess([image_dir / f"{name}.png"])
        with torch.no_grad():
            want = tok.decode(latents=tok.encode(x).latents)
        saved = np.asarray(Image.open(tmp_path / "rec" / f"{name}.png"))
        assert np.array_equal(saved, np.asarray(pixels_to_pil(want)[0]))  # the reconstruction, not the input
        mse = (((want - x) / 2) ** 2).mean().item()  # on the [0, 1] scale
        assert row["psnr"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-4)
    grid = Image.open(tmp_path / "rec" / "grid.png")
    assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2 columns (original | recon) x 2 rows, padding 2
    assert Image.open(tmp_path / "rec" / "img0.png").size == (32, 32)


@pytest.mark.parametrize("args,message", [
    (["info", "no-such-model"], "unknown model 'no-such-model'"),
    (["encode", "tiny-kl", "missing.png", "--out", "x.safetensors"], "image not found: missing.png"),
    (["decode", "tiny-kl", "missing.safetensors", "--out-dir", "d"], "no such file: missing.safetensors"),
])
def test_errors_are_one_line_and_exit_1(runner, args, message):
    res = runner.invoke(main, args)
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines()[-1].startswith(f"Error: {message}")
    assert "Traceback" not in res.output


def test_unreadable_image_is_named(runner, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    res = runner.invoke(main, ["reconstruct", "tiny-kl", str(bad), "--out-dir", str(tmp_path / "o")])
    assert res.exit_code == 1 and "cannot read image" in res.stderr and "bad.png" in res.stderr


def test_export_diffusers_command(runner, release, tmp_path):
    res = runner.invoke(main, ["export-diffusers", str(release), str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["latent_channels"] == 4
    assert (tmp_path / "d" / "diffusion_pytorch_model.safetensors").stat().st_size > 0


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "vistok", "list-models"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "mar-kl16" in res.stdout


def test_decode_rejects_foreign_and_mismatched_files(runner, release, image_dir, tmp_path):
    res = runner.invoke(main, ["decode", str(release), str(image_dir / "img0.png"), "--out-dir", str(tmp_path / "d")])
    assert res.exit_code == 1 and "is not a vistok encode file" in res.stderr
    lat = tmp_path / "lat.safetensors"
    assert runner.invoke(main, ["encode", str(release), str(image_dir), "--out", str(lat)]).exit_code == 0
    res = runner.invoke(main, ["decode", "mar-kl16", str(lat), "--out-dir", str(tmp_path / "d")])
    assert res.exit_code == 1
    assert f"{lat} (encoded with {release}) does not fit mar-kl16" in res.stderr and "(B, 16, h, w)" in res.stderr
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())  # nothing half-written


def test_missing_directory_bad_device_and_duplicate_names(runner, release, image_dir, tmp_path):
    res = runner.invoke(main, ["info", "checkpoints/nope"])
    assert res.exit_code == 1 and "no such release directory: checkpoints/nope" in res.stderr
    if not torch.cuda.is_available():
        res = runner.invoke(main, ["encode", str(release), str(image_dir), "--out", "x.st", "--device", "cuda"])
        assert res.exit_code == 1 and "CUDA is not available" in res.stderr
    res = runner.invoke(main, ["encode", str(release), str(image_dir), "--out", "x.st", "--device", "gpu0"])
    assert res.exit_code == 1 and "invalid --device 'gpu0'" in res.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "img0.png").write_bytes((image_dir / "img1.png").read_bytes())
    res = runner.invoke(main, ["reconstruct", str(release), str(image_dir), str(other), "--out-dir", str(tmp_path / "r")])
    assert res.exit_code == 1 and "would write the same output img0.png" in res.stderr


def test_convert_non_checkpoint_and_scaling_factor_override(runner, image_dir, tmp_path):
    res = runner.invoke(main, ["convert", "mar-kl16", str(image_dir / "img0.png"), str(tmp_path / "o")])
    assert res.exit_code == 1 and "is not a readable torch checkpoint" in res.stderr
    sd = vistok.create_tokenizer("tiny-kl").state_dict()
    torch.save({"model": sd}, tmp_path / "tiny.ckpt")
    res = runner.invoke(main, ["convert", "mar-kl16", str(tmp_path / "tiny.ckpt"), str(tmp_path / "o"),
                               "--preset", "tiny-kl", "--scaling-factor", "0.4", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["scaling_factor"] == 0.4
    assert vistok.load_tokenizer(tmp_path / "o").scaling_factor == 0.4


def test_a_closed_pipe_ends_output_quietly():
    """`vistok list-models | head`: the reader leaves early; no 'Broken pipe' error, exit 0."""
    proc = subprocess.Popen([sys.executable, "-m", "vistok", "list-models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before vistok writes anything: its first write raises EPIPE
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Broken pipe" not in stderr and "Error" not in stderr, stderr
