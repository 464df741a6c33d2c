"""Bad input across the API, the CLI and training (issue 14): every case ends in a clear error that names
the problem (and a one-line CLI error with exit 1), or in the right result; nothing silent, nothing lost.

Kinds: 1 outputs over inputs and the run-folder lock, 2 config types and ranges, 3 image decoding,
4 the dtype/device/id contract, 5 latents provenance and sanity, 6 resume, 7 hostile release configs,
8 family vs model, 9 late or cut-off errors.
"""

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import vistok
from vistok.cli import main

FAMILIES = ["tiny-kl", "tiny-vqgan", "tiny-dualtoken", "tiny-toklip"]
DISCRETE = {"tiny-vqgan": "vq", "tiny-dualtoken": "pixel", "tiny-toklip": "vq"}


# ---------------------------------------------------------------------------------------------- helpers
def photo(h=48, w=40, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([np.sin(xx / 5), np.cos(yy / 7), np.sin((xx + yy) / 9)], -1)
    return ((img + 1) * 127.5 + rng.normal(0, 5, img.shape)).clip(0, 255).astype(np.uint8)


def digest(path) -> dict:
    path = os.fspath(path)
    if os.path.isdir(path):
        return {os.path.relpath(os.path.join(r, f), path): digest(os.path.join(r, f))
                for r, _, files in os.walk(path) for f in files}
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cli_error(args, *words):
    """Run the CLI expecting a one-line `Error:` naming `words`, exit 1, no traceback."""
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    for w in words:
        assert w.lower() in errors[0].lower(), (w, errors[0])
    return errors[0]


def cli_ok(args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def toks():
    out = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        out[name] = vistok.create_tokenizer(name).eval()
    return out


def pixels(tok, b=2):
    s = tok.preprocess_config.image_size
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def kl_release(tmp_path_factory, toks):
    return toks["tiny-kl"].save_pretrained(tmp_path_factory.mktemp("rel") / "tiny-kl")


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for i in range(3):
        Image.fromarray(photo(48 + 8 * i, 40, i)).save(d / f"img{i}.png")
    return d


def run_config(path, **train):
    cfg = {"family": "kl", "model": {"preset": "tiny-kl"},
           "data": {"source": "builtin:photos-train", "eval_source": None},
           "loss": {"perceptual_weight": 0.0, "disc_start": 100},
           "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
           "train": {"steps": 2, "batch_size": 2, "precision": "fp32", "log_every": 1, "save_every": 1,
                     "image_every": 100, "keep_last": 5, "export": False, **train}}
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 2-step tiny-kl run with checkpoints step_1 and step_2 (copy it before changing it)."""
    d = tmp_path_factory.mktemp("run")
    cli_ok(["train", run_config(d / "cfg.json"), "--out", d / "run"])
    return d / "run"


@pytest.fixture
def run(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------------------------------------- 1
def test_encode_refuses_out_over_an_input(kl_release, images):
    before = digest(images)
    cli_error(["encode", kl_release, images / "img0.png", images / "img1.png", "--out", images / "img1.png"],
              "overwrite the input", "img1.png")
    assert digest(images) == before


@pytest.mark.parametrize("target", ["dir", "file's dir", "subdir"])
def test_reconstruct_refuses_out_dir_over_inputs(kl_release, images, target):
    before = digest(images)
    args = {"dir": [images, "--out-dir", images], "file's dir": [images / "img1.png", "--out-dir", images],
            "subdir": [images, "--out-dir", images / "recon"]}[target]
    cli_error(["reconstruct", kl_release, *args], "input")
    assert digest(images) == before


def test_decode_refuses_to_write_over_the_encoded_originals(kl_release, images, tmp_path):
    enc = tmp_path / "lat.safetensors"
    cli_ok(["encode", kl_release, images, "--out", enc])
    before = digest(images)
    cli_error(["decode", kl_release, enc, "--out-dir", images], "overwrite the input")
    assert digest(images) == before


def test_convert_refuses_to_replace_the_files_it_reads_besides_src(tmp_path):
    from conftest import DATA as data
    # `convert dualtoken DIR/epoch_1.pt DIR` replaced DIR/config.json, the official model config it reads
    dt = tmp_path / "dt"
    shutil.copytree(data / "dualtoken_official" / "small", dt)
    before = digest(dt)
    cli_error(["convert", "dualtoken", dt / "epoch_1.pt", dt], "overwrite the input", "config.json")
    # an HF SigLIP folder converted into itself
    hf = tmp_path / "hf"
    shutil.copytree(data / "hf_siglip" / "siglip", hf)
    cli_error(["convert", "siglip", hf, hf, "--preset", "tiny-dualtoken"], "overwrite the input")
    assert digest(dt) == before


def test_convert_and_export_diffusers_refuse_their_source(kl_release, tmp_path):
    src = tmp_path / "rel"
    shutil.copytree(kl_release, src)
    before = digest(src)
    cli_error(["convert", "mar-kl16", src / "model.safetensors", src, "--preset", "tiny-kl"], "overwrite the input")
    cli_error(["export-diffusers", src, src], "overwrite")
    assert digest(src) == before


@pytest.mark.parametrize("dst", [".", "step_2", "tensorboard"])
def test_export_refuses_the_run_folder(run, dst):
    before = digest(run)
    cli_error(["export", run, run / dst if dst != "." else run], "run folder")
    assert digest(run) == before


def test_run_folder_is_held_by_one_process(tmp_path):
    from vistok.train.config import load_config
    from vistok.train.runlock import RunFolderBusy, RunLock
    from vistok.train.trainer import Trainer

    cfg = run_config(tmp_path / "cfg.json", steps=1)
    out = tmp_path / "run"
    holder = RunLock(out).acquire()
    with pytest.raises(RunFolderBusy, match=f"in use by another process \\(pid {os.getpid()}"):
        Trainer(load_config(str(cfg)), out, quiet=True)
    cli_error(["train", cfg, "--out", out], "in use by another process", str(os.getpid()))
    assert not list(out.glob("step_*"))
    holder.release()
    cli_ok(["train", cfg, "--out", out])  # free again
    assert (out / "step_1").is_dir() and not (out / ".lock.owner.json").exists()


def test_a_lock_left_by_a_killed_process_is_stale(tmp_path):
    from vistok.train.runlock import RunLock

    code = ("import sys; from vistok.train.runlock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); sys.stdin.read()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"pid {p.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    said = []
    lock = RunLock(tmp_path, said.append).acquire()
    assert lock.held and any(f"pid {p.pid}" in s and "gone" in s for s in said)
    lock.release()


@pytest.mark.parametrize("owner", ['{"pid": null, "host": "%s"}', '{"pid": "abc", "host": "%s"}',
                                   '{"pid": true, "host": "%s"}', '{"host": "%s"}'])
def test_a_mangled_lock_owner_file_does_not_stop_the_run(tmp_path, owner):
    import socket

    from vistok.train.runlock import RunLock

    # the owner file is only for the busy message; {"pid": null} raised TypeError after taking the lock
    (tmp_path / ".lock.owner.json").write_text(owner % socket.gethostname())
    lock = RunLock(tmp_path).acquire()
    assert lock.held
    lock.release()


# ---------------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("assignment, message", [
    ("train.batch_size=2.5", "train.batch_size must be an integer, got 2.5"),
    ("train.steps=abc", "train.steps must be an integer, got 'abc'"),
    ("train.steps=true", "train.steps must be an integer, got True"),
    ("train.steps=1e300", "train.steps must be <= 1000000000000"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("data.crop_scale=[2,3]", "data.crop_scale must be <= 1.0"),
    ("data.crop_scale=[0.5]", "data.crop_scale must be a list of 2 values"),
    ("data.crop_scale=[0.9,0.1]", "data.crop_scale must be [low, high] with low <= high"),
    ('data.hflip="yes"', "data.hflip must be true or false"),
    ("data.workers=-1", "data.workers must be >= 0"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("optim.lr=NaN", "optim.lr must be a number"),
    ("optim.betas=[1.5,0.9]", "optim.betas must be < 1.0"),
    ("optim.min_lr=1", "optim.min_lr (1.0) must not exceed optim.lr"),
    ("train.ema_decay=1.5", "train.ema_decay must be < 1.0"),
    ("train.precision=fp16", "train.precision must be one of ['bf16', 'fp32']"),
    ('model.overrides="x"', "model.overrides must be an object"),
    ('model.overrides={"ch":"wide"}', "model.overrides.ch must be an integer"),
    ('model.overrides={"chh":8}', "unknown config key(s) model.overrides.chh"),
    ("loss.disc_start=abc", "loss.disc_start must be an integer"),
    ("loss=[1]", "loss must be an object"),
    ("family=5", "family must be a string"),
])
def test_config_values_are_typed_and_ranged(assignment, message):
    from vistok.train.config import load_config

    with pytest.raises(ValueError) as err:
        load_config("kl-tiny", [assignment])
    assert message in str(err.value)


def test_integral_float_counts_as_an_integer():
    from vistok.train.config import load_config

    cfg = load_config("kl-tiny", ["train.batch_size=8.0", "train.steps=3"])
    assert cfg.train.batch_size == 8 and type(cfg.train.batch_size) is int


@pytest.mark.parametrize("assignment, key", [("train.batch_size=2.5", "train.batch_size"),
                                             ("train.steps=abc", "train.steps"),
                                             ("data.crop_scale=[2,3]", "data.crop_scale")])
def test_cli_config_errors_are_one_line_before_anything_is_written(tmp_path, assignment, key):
    cli_error(["train", run_config(tmp_path / "cfg.json"), "--out", tmp_path / "run", "--set", assignment], key)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- 3
def _gray16():
    return photo(48, 40)[..., 0].astype(np.uint16) * 257


def _rgb(arr8):
    return np.repeat(arr8[..., None], 3, -1) if arr8.ndim == 2 else arr8


@pytest.mark.parametrize("kind", ["png16", "pil16", "mode I", "float tiff", "exif6", "exif3", "palette", "1-bit"])
def test_image_modes_decode_to_the_right_8bit_rgb(tmp_path, toks, kind):
    tok = toks["tiny-kl"]
    g = _gray16()
    rgb = photo(40, 64)
    if kind == "png16":
        Image.fromarray(g).save(tmp_path / "x.png")
        src, want = tmp_path / "x.png", _rgb((g // 257).astype(np.uint8))
    elif kind == "pil16":
        src, want = Image.fromarray(g), _rgb((g // 257).astype(np.uint8))
    elif kind == "mode I":
        src, want = Image.fromarray(g.astype(np.int32), mode="I"), _rgb((g // 257).astype(np.uint8))
    elif kind == "float tiff":
        Image.fromarray(photo()[..., 1].astype(np.float32) / 255, mode="F").save(tmp_path / "x.tif")
        src, want = tmp_path / "x.tif", _rgb(photo()[..., 1])
    elif kind in ("exif6", "exif3"):
        exif = Image.Exif()
        exif[0x0112] = 6 if kind == "exif6" else 3
        stored = np.rot90(rgb, 1) if kind == "exif6" else rgb[::-1, ::-1]  # what a camera writes
        Image.fromarray(np.ascontiguousarray(stored)).save(tmp_path / "x.png", exif=exif)
        src, want = tmp_path / "x.png", rgb
    elif kind == "palette":
        p = Image.fromarray(rgb).quantize(32)
        src, want = p, np.asarray(p.convert("RGB"))
    else:
        b = rgb[..., 0] > 128
        src, want = Image.fromarray(b), _rgb(b.astype(np.uint8) * 255)
    got = tok.preprocess(src)
    torch.testing.assert_close(got, tok.preprocess(Image.fromarray(want)), atol=0, rtol=0)


def test_sixteen_bit_png_reconstructs_like_its_8bit_copy_in_the_cli(kl_release, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    g = _gray16()
    Image.fromarray(g).save(d / "a.png")
    Image.fromarray(_rgb((g // 257).astype(np.uint8))).save(d / "b.png")
    cli_ok(["reconstruct", kl_release, d, "--out-dir", tmp_path / "out", "--no-grid"])
    a, b = (np.asarray(Image.open(tmp_path / "out" / n)) for n in ("a.png", "b.png"))
    assert np.array_equal(a, b)


def test_training_and_bench_readers_decode_16bit(toks):
    from vistok.bench.data import ImageItem, load_item
    from vistok.train.data import Augment, WebDatasetStream, sample_generator

    g = _gray16()
    want = Image.fromarray(_rgb((g // 257).astype(np.uint8)))
    assert np.array_equal(np.asarray(load_item(ImageItem(name="x", source=Image.fromarray(g)))), np.asarray(want))
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, format="PNG")
    aug = Augment(toks["tiny-kl"].preprocess_config, (1.0, 1.0))
    sample = WebDatasetStream("x.tar", aug, seed=0, shuffle_buffer=0)._decode({"__key__": "k", "png": buf.getvalue()}, 0)
    torch.testing.assert_close(sample["pixels"], aug(want, sample_generator(0, 0, 0)), atol=0, rtol=0)


@pytest.mark.parametrize("source, message", [
    (None, "cannot read an image from None"),
    (123, "cannot read an image from int"),
    ([None], "cannot read an image from None"),
    (Image.fromarray(np.full((40, 40), 3.5, np.float32), mode="F"), "float image with values in [3.5, 3.5]"),
    (Image.fromarray(np.full((40, 40), -7, np.int32), mode="I"), "values in [-7, -7]"),
    (np.zeros((40, 40, 3), np.uint16), "expected a uint8 array, got uint16"),
])
def test_unusable_images_are_refused_by_name(toks, source, message):
    with pytest.raises(ValueError) as err:
        toks["tiny-kl"].preprocess(source)
    assert message in str(err.value)


def test_images_over_the_pixel_limit_are_unreadable_not_a_crash(tmp_path, toks, monkeypatch):
    from vistok.train.data import Augment, ImageDataset, Item

    Image.fromarray(photo(64, 64)).save(tmp_path / "big.png")
    Image.fromarray(photo(20, 20)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 > 2x the limit: PIL's bomb error
    with pytest.raises(ValueError, match="big.png.*MAX_IMAGE_PIXELS"):
        toks["tiny-kl"].preprocess(tmp_path / "big.png")
    items = [Item(str(tmp_path / "big.png"), None, "big.png"), Item(str(tmp_path / "small.png"), None, "small.png")]
    sample = ImageDataset(items, Augment(toks["tiny-kl"].preprocess_config), seed=0)[(0, 0, 0)]
    assert sample["pixels"].shape == (3, 32, 32) and "big.png" in sample["skipped"][0]


# ---------------------------------------------------------------------------------------------- 4
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_any_float_pixels_are_cast_to_the_model(toks, name, dtype):
    tok = toks[name]
    x = pixels(tok).to(dtype)
    with torch.no_grad():
        got, want = tok.encode(x), tok.encode(x.float())
    if got.ids is not None:
        assert all(torch.equal(got.ids[k], want.ids[k]) for k in want.ids)
    else:
        torch.testing.assert_close(got.latents, want.latents, atol=0, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_half_precision_models_work_end_to_end(toks, name):
    ref = toks[name]
    half = vistok.create_tokenizer(name).eval()
    half.load_state_dict(ref.state_dict())
    half = half.to(torch.bfloat16)
    x = pixels(ref)
    with torch.no_grad():
        enc, ref_enc = half.encode(x), ref.encode(x)
        if enc.latents is not None:
            out, want = half.decode(latents=enc.latents), ref.decode(latents=ref_enc.latents)
        else:
            out, want = half.decode(ids=enc.ids), ref.decode(ids=ref_enc.ids)
            emb, ref_emb = half.embed(enc.ids).float(), ref.embed(ref_enc.ids)
            assert emb.shape == ref_emb.shape and torch.isfinite(emb).all()
    assert out.dtype == torch.bfloat16 and (out.float() - want).abs().mean() < 0.05


@pytest.mark.parametrize("name", list(DISCRETE))
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32])
def test_any_integer_id_dtype_decodes_and_embeds_like_int64(toks, name, dtype):
    tok = toks[name]
    with torch.no_grad():
        ids = {k: v.clamp(max=100) for k, v in tok.encode(pixels(tok)).ids.items()}
        cast = {k: v.to(dtype) for k, v in ids.items()}
        assert torch.equal(tok.decode(ids=cast), tok.decode(ids=ids))
        assert torch.equal(tok.embed(cast), tok.embed(ids))


@pytest.mark.parametrize("name", list(DISCRETE))
@pytest.mark.parametrize("bad", ["negative", "too large", "float", "bool"])
def test_bad_ids_are_refused_by_name(toks, name, bad):
    tok = toks[name]
    cb = DISCRETE[name]
    ids = tok.encode(pixels(tok)).ids
    size = tok.codebooks[cb].size
    if bad in ("negative", "too large"):
        ids[cb][0, 0, 0, 0] = -1 if bad == "negative" else size
        message = f"ids['{cb}'] out of range [0, {size}): min {-1 if bad == 'negative' else ''}"
    else:
        ids = {k: v.float() if bad == "float" else v.bool() for k, v in ids.items()}
        message = f"must be an integer tensor, got torch.{'float32' if bad == 'float' else 'bool'}"
    with pytest.raises(ValueError) as err:
        tok.decode(ids=ids)
    assert message in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", FAMILIES)
def test_cpu_inputs_are_moved_to_a_cuda_model(toks, name):
    tok = vistok.create_tokenizer(name).eval()
    tok.load_state_dict(toks[name].state_dict())
    tok = tok.cuda()
    x = pixels(tok)
    with torch.no_grad():
        enc = tok.encode(x)
        out = tok.decode(latents=enc.latents.cpu()) if enc.latents is not None else \
            tok.decode(ids={k: v.cpu() for k, v in enc.ids.items()})
    assert out.device.type == "cuda" and out.shape == x.shape


# ---------------------------------------------------------------------------------------------- 5
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_latents_are_refused(toks, kl_release, tmp_path, value):
    lat = torch.zeros(1, 4, 8, 8)
    lat[0, 1, 2, 3] = value
    with pytest.raises(ValueError, match="latents contain NaN or Inf \\(1 of 256 values\\)"):
        toks["tiny-kl"].decode(latents=lat)
    save_file({"latents": lat}, str(tmp_path / "bad.safetensors"), metadata={"family": "kl"})
    cli_error(["decode", kl_release, tmp_path / "bad.safetensors", "--out-dir", tmp_path / "out"], "NaN or Inf")
    assert not list(tmp_path.glob("out/*.png"))


def _release_with(src, dst, **args):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_args"].update(args)
    cfg.update({k: v for k, v in args.items() if k in cfg})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("value, message", [(0, "scaling_factor must be a positive finite number"),
                                            (-1.0, "scaling_factor must be a positive finite number"),
                                            ("abc", "model_args.scaling_factor must be a number")])
def test_release_with_an_impossible_scaling_factor_is_refused(kl_release, tmp_path, images, value, message):
    bad = _release_with(kl_release, tmp_path / "bad", scaling_factor=value)
    with pytest.raises(ValueError, match="config.json") as err:
        vistok.load_tokenizer(bad)
    assert message in str(err.value)
    cli_error(["reconstruct", bad, images, "--out-dir", tmp_path / "out"], "scaling_factor")


def test_latents_files_record_their_model_and_are_checked(kl_release, images, tmp_path):
    enc = tmp_path / "lat.safetensors"
    cli_ok(["encode", kl_release, images, "--out", enc])
    with safe_open(str(enc), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["scaling_factor"]) == 1.0 and len(meta["weights_fingerprint"]) == 16
    other = _release_with(kl_release, tmp_path / "other", scaling_factor=0.5)
    cli_error(["decode", other, enc, "--out-dir", tmp_path / "out"], "scaling_factor 1.0", "scaling_factor 0.5")
    torch.manual_seed(3)
    retrained = vistok.create_tokenizer("tiny-kl").save_pretrained(tmp_path / "retrained")
    out = cli_ok(["decode", retrained, enc, "--out-dir", tmp_path / "out2"])
    assert "warning:" in out and "other weights" in out and meta["weights_fingerprint"] in out


# ---------------------------------------------------------------------------------------------- 6
def test_resume_applies_the_changed_optim_settings(run, tmp_path):
    cfg = json.loads(run_config(tmp_path / "cfg.json", steps=3).read_text())
    cfg["optim"].update(lr=5e-4, weight_decay=0.05)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = cli_ok(["train", tmp_path / "cfg.json", "--out", run, "--resume"])
    assert "optim.lr 0.001 -> 0.0005" in out
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [1e-3, 1e-3, 5e-4]
    groups = torch.load(run / "step_3" / "optimizer.pt", weights_only=True)["param_groups"]
    assert groups[0]["weight_decay"] == 0.05 and groups[0]["initial_lr"] == 5e-4


def test_non_finite_loss_message_says_how_to_recover(run, tmp_path):
    cfg = json.loads(run_config(tmp_path / "cfg.json", steps=5).read_text())
    cfg["optim"]["lr"] = 1e30
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    cli_error(["train", tmp_path / "cfg.json", "--out", run, "--resume"], "non-finite loss", "lower optim.lr")
    for step in run.glob("step_*"):  # the documented recovery: drop the damaged checkpoints
        if int(step.name[5:]) > 2:
            shutil.rmtree(step)
    cfg["optim"]["lr"] = 1e-3
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    cli_ok(["train", tmp_path / "cfg.json", "--out", run, "--resume"])
    assert (run / "step_5").is_dir()


def _truncate(file):
    file.write_bytes(file.read_bytes()[:100])


def test_truncated_latest_checkpoint_falls_back(run, tmp_path):
    _truncate(run / "step_2" / "model.safetensors")
    out = cli_ok(["export", run, tmp_path / "exp"])
    assert "skipping step_2" in out and "using step_1" in out
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["trained_steps"] == 1
    cli_error(["export", run, tmp_path / "exp2", "--step", "2"], "step_2", "unreadable")
    out = cli_ok(["train", run_config(tmp_path / "cfg.json", steps=3), "--out", run, "--resume"])
    assert "continuing from step_1" in out
    assert (run / "step_3").is_dir()


def test_resume_does_not_repeat_logged_steps(run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shutil.rmtree(run / "step_2")  # killed after logging step 2, before its checkpoint
    cli_ok(["train", run_config(tmp_path / "cfg.json", steps=3), "--out", run, "--resume"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]


def test_temp_files_of_a_killed_export_are_removed(run, tmp_path):
    exp = run / "export"
    exp.mkdir()
    (exp / ".model.safetensors.k1ll3d.tmp").write_bytes(b"x" * 100)
    (exp / ".config.json.k1ll3d.tmp").write_text("{")
    (exp / ".README.md.k1ll3d.tmp").write_text("# half a model card")
    cli_ok(["export", run, exp])
    assert sorted(p.name for p in exp.iterdir()) == ["README.md", "config.json", "model.safetensors"]


# ---------------------------------------------------------------------------------------------- 7
@pytest.mark.parametrize("edit, message", [
    ("null", "must hold a JSON object with '_class_name' and 'model_args', got NoneType"),
    ('"abc"', "must hold a JSON object"),
    ("[1, 2]", "must hold a JSON object"),
    ({"model_args": None}, "model_args must be an object of keyword arguments, got None"),
    ({"_class_name": 5}, "_class_name must be a string"),
    ({"_class_name": "Nope"}, "_class_name: unknown tokenizer class 'Nope'"),
    ({"model_args": {"ch": "abc"}}, "model_args.ch must be an integer, got 'abc'"),
    ({"model_args": {"ch_mult": "abc"}}, "model_args.ch_mult must be a list of integers"),
    ({"model_args": {"bogus": 1}}, "unknown config key(s) model_args.bogus"),
    ({"model_args": {"preprocess": "x"}}, "model_args.preprocess must be null or an object"),
    ({"model_args": {"norm_groups": 0}}, "norm_groups must be >= 1"),
])
def test_broken_release_configs_are_refused_by_name(kl_release, tmp_path, edit, message):
    d = tmp_path / "rel"
    shutil.copytree(kl_release, d)
    if isinstance(edit, str):
        (d / "config.json").write_text(edit)
    else:
        cfg = json.loads((d / "config.json").read_text())
        for key, value in edit.items():
            if isinstance(value, dict):
                cfg[key].update(value)
            else:
                cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        vistok.load_tokenizer(d)
    assert "config.json" in str(err.value) and message in str(err.value)
    cli_error(["info", d], "config.json")


@pytest.fixture
def no_network(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return calls


@pytest.mark.parametrize("flag", ["timm_model_pretrained", "siglip_weights"])
def test_release_configs_cannot_reach_the_network_or_files(toks, tmp_path, no_network, flag):
    d = toks["tiny-dualtoken"].save_pretrained(tmp_path / "rel")
    cfg = json.loads((d / "config.json").read_text())
    if flag == "siglip_weights":
        cfg["model_args"]["siglip_weights"] = str(tmp_path / "elsewhere.bin")
        message = "model_args.siglip_weights names a file read at construction"
    else:
        cfg["model_args"]["clip_config"]["vision_cfg"]["timm_model_pretrained"] = True
        message = "model_args.clip_config.vision_cfg.timm_model_pretrained would download pretrained weights"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        vistok.load_tokenizer(d)
    assert message in str(err.value) and not no_network
    cli_error(["info", d], flag)
    with pytest.raises(ValueError, match="would download pretrained weights"):
        vistok.create_tokenizer("tiny-dualtoken", clip_config={"vision_cfg": {"timm_model_pretrained": True}})
    assert not no_network


# ---------------------------------------------------------------------------------------------- 8
@pytest.mark.parametrize("recipe, assignment, message", [
    ("kl-tiny", "model.preset=tiny-vqgan", "model.preset 'tiny-vqgan' is a vqgan-family model, but the config's family is 'kl'"),
    ("vqgan-tiny", "model.preset=tiny-kl", "model.preset 'tiny-kl' is a kl-family model, but the config's family is 'vqgan'"),
    ("kl-tiny", "model.preset=tiny-dualtoken", "is a dualtoken-family model"),
])
def test_model_family_must_match_the_objective(recipe, assignment, message, tmp_path):
    from vistok.train.config import load_config

    with pytest.raises(ValueError) as err:
        load_config(recipe, [assignment])
    assert message in str(err.value)
    cli_error(["train", recipe, "--out", tmp_path / "run", "--set", assignment], "family")
    assert not (tmp_path / "run").exists()


def test_model_init_release_family_must_match(toks, tmp_path):
    from vistok.train.config import load_config

    rel = toks["tiny-vqgan"].save_pretrained(tmp_path / "vq")
    with pytest.raises(ValueError, match="model.init .* is a vqgan-family model, but the config's family is 'kl'"):
        load_config("kl-tiny", [f"model.init={rel}"])


# ---------------------------------------------------------------------------------------------- 9
def _shards(d, n):
    d.mkdir()
    for s in range(n):
        with tarfile.open(d / f"shard-{s}.tar", "w") as tf:
            for i in range(2):
                buf = io.BytesIO()
                Image.fromarray(photo(48, 48, s * 10 + i)).save(buf, format="PNG")
                info = tarfile.TarInfo(f"s{s}_{i}.png")
                info.size = len(buf.getvalue())
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    return f"{d}/shard-{{0..{n - 1}}}.tar"


def test_webdataset_with_fewer_shards_than_readers_fails_before_training(tmp_path):
    cfg = json.loads(run_config(tmp_path / "cfg.json").read_text())
    cfg["data"].update(source=_shards(tmp_path / "shards", 2), workers=4, shuffle_buffer=0)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    cli_error(["train", tmp_path / "cfg.json", "--out", tmp_path / "run"], "2 shard(s)", "4 readers")
    assert not list((tmp_path / "run").glob("step_*"))
    cfg["data"]["source"] = str(tmp_path / "shards" / "missing-{0..1}.tar")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    cli_error(["train", tmp_path / "cfg.json", "--out", tmp_path / "run2"], "not found", "missing-0.tar")


def test_dataloader_worker_errors_show_their_cause():
    from vistok.cli import one_line

    exc = ValueError("Caught ValueError in DataLoader worker process 3.\nOriginal Traceback (most recent call last):\n"
                     '  File "x.py", line 1, in f\nValueError: no samples in shards.tar for this rank / worker')
    assert one_line(exc) == "ValueError: no samples in shards.tar for this rank / worker (in a DataLoader worker)"


def test_disk_full_during_a_checkpoint_loses_nothing(run, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import vistok.train.checkpoint as ckpt

    before = digest(run / "step_2")

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    line = cli_error(["train", run_config(tmp_path / "cfg.json", steps=3), "--out", run, "--resume"],
                     "could not write checkpoint step_3", "No space left on device", "nothing was lost",
                     "latest: step_2")
    assert line.count("\n") == 0 and digest(run / "step_2") == before
    assert not [p for p in run.iterdir() if p.name.startswith(".step_")]


@pytest.mark.parametrize("name", FAMILIES)
def test_empty_batches_work_in_every_family(toks, name):
    tok = toks[name]
    with torch.no_grad():
        enc = tok.encode(pixels(tok, b=0))
        out = tok.decode(latents=enc.latents) if enc.latents is not None else tok.decode(ids=enc.ids)
        one = tok.encode(pixels(tok, b=1))
    assert out.shape == (0, *pixels(tok, b=1).shape[1:])
    for field in ("ids", "quantized"):
        if getattr(one, field) is not None:
            for k, v in getattr(enc, field).items():
                assert v.shape == (0, *getattr(one, field)[k].shape[1:]) and v.dtype == getattr(one, field)[k].dtype
    if enc.ids is not None:
        assert tok.embed(enc.ids).shape[0] == 0


def test_save_pretrained_refuses_another_librarys_model_folder(tiny_kl, tmp_path):
    # before: a diffusers/transformers folder's config.json and model.safetensors were replaced silently
    foreign = tmp_path / "diffusers-vae"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"_class_name": "AutoencoderKL", "latent_channels": 4}')
    (foreign / "model.safetensors").write_bytes(b"their weights")
    with pytest.raises(ValueError, match=r"holds config.json, model.safetensors that are not a vistok release's"):
        tiny_kl.save_pretrained(foreign)
    assert (foreign / "model.safetensors").read_bytes() == b"their weights"
    assert json.loads((foreign / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="holds model.safetensors that are not"):
        tiny_kl.save_pretrained(lone)
    again = tiny_kl.save_pretrained(tmp_path / "ours")  # a vistok release is replaced as before
    assert tiny_kl.save_pretrained(again) == again
