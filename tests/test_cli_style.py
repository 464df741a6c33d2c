"""One CLI style (issue 17 item 5): `--json` is a flag on every command and prints exactly one JSON object;
the destination key is `dst`; `export` reports the step it wrote; progress bars honour TQDM_DISABLE and
--quiet; --quiet/--verbose set the "vistok" logger, through which library code logs."""

import json
import logging

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import vistok
from vistok.cli import main


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def ok(*args, env=None):
    res = invoke(*args, env=env)
    assert res.exit_code == 0, res.output
    return res


def one_object(res) -> dict:
    """stdout holds exactly one JSON object (not a list, nothing else)."""
    out = json.loads(res.stdout)
    assert isinstance(out, dict), res.stdout
    return out


@pytest.fixture(scope="module")
def kl_release(tmp_path_factory):
    torch.manual_seed(0)
    return vistok.create_tokenizer("tiny-kl").save_pretrained(tmp_path_factory.mktemp("rel") / "tiny-kl")


@pytest.fixture(scope="module")
def kl_ckpt(tmp_path_factory):
    """A KL checkpoint laid out as MAR's kl16.ckpt ({"model": state dict}), at the tiny preset's size."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"model": vistok.create_tokenizer("tiny-kl").state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 3-step tiny-kl run, checkpoints at steps 2 and 3."""
    d = tmp_path_factory.mktemp("run")
    cfg = {"family": "kl", "model": {"preset": "tiny-kl"},
           "data": {"source": "builtin:photos-train", "eval_source": None},
           "loss": {"perceptual_weight": 0.0, "disc_start": 100},
           "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
           "train": {"steps": 3, "batch_size": 2, "precision": "fp32", "log_every": 1, "save_every": 2,
                     "image_every": 100, "keep_last": 5, "export": False}}
    (d / "cfg.json").write_text(json.dumps(cfg))
    res = ok("train", d / "cfg.json", "--out", d / "run", "--json")
    summary = one_object(res)
    assert summary["steps"] == 3 and summary["run_dir"] == str(d / "run")
    return d / "run"


def test_every_json_output_is_one_object(kl_release, kl_ckpt, image_dir, tmp_path):
    models = one_object(ok("list-models", "tiny-*", "--json"))["models"]
    assert {m["name"] for m in models} == {n for n in vistok.list_models("tiny-*")}
    assert one_object(ok("info", kl_release, "--json"))["grid"] == [8, 8]
    enc = one_object(ok("encode", kl_release, image_dir, "--out", tmp_path / "lat.safetensors", "--json"))
    assert enc["images"] == 3 and enc["latents"] == [3, 4, 8, 8]
    dec = one_object(ok("decode", kl_release, tmp_path / "lat.safetensors", "--out-dir", tmp_path / "dec", "--json"))
    assert dec == {"out_dir": str(tmp_path / "dec"),
                   "images": [str(tmp_path / "dec" / f"img{i}.png") for i in range(3)]}
    assert all((tmp_path / "dec" / f"img{i}.png").is_file() for i in range(3))
    rec = one_object(ok("reconstruct", kl_release, image_dir, "--out-dir", tmp_path / "rec", "--no-grid", "--json"))
    assert rec["grid"] is None and [r["image"] for r in rec["images"]] == ["img0.png", "img1.png", "img2.png"]
    conv = one_object(ok("convert", "mar-kl16", kl_ckpt, tmp_path / "conv", "--preset", "tiny-kl", "--json"))
    assert conv["dst"] == str(tmp_path / "conv") and conv["preset"] == "tiny-kl"
    diff = one_object(ok("export-diffusers", kl_release, tmp_path / "diff", "--json"))
    assert diff["dst"] == str(tmp_path / "diff")


def test_decode_without_json_prints_the_directory(kl_release, image_dir, tmp_path):
    ok("encode", kl_release, image_dir, "--out", tmp_path / "lat.safetensors")
    res = ok("decode", kl_release, tmp_path / "lat.safetensors", "--out-dir", tmp_path / "dec")
    assert res.stdout.strip() == str(tmp_path / "dec")


def test_export_reports_the_step_it_wrote(trained_run, tmp_path):
    out = one_object(ok("export", trained_run, tmp_path / "latest", "--json"))
    assert out == {"run": str(trained_run), "step": 3, "ema": False, "dst": str(tmp_path / "latest")}
    out = one_object(ok("export", trained_run, tmp_path / "two", "--step", "2", "--json"))
    assert out["step"] == 2 and json.loads((tmp_path / "two" / "config.json").read_text())["trained_steps"] == 2
    table = ok("export", trained_run, tmp_path / "latest2").stdout.splitlines()
    assert table[0].split() == ["run", "step", "ema", "dst"] and table[1].split()[1] == "3"


def test_siglip_converter_names_its_destination_dst(tmp_path):
    from vistok.convert import convert_siglip

    torch.manual_seed(0)
    tower = vistok.create_tokenizer("tiny-dualtoken").siglip
    weights = {k: v.contiguous() for k, v in tower.state_dict().items()}
    save_file(weights, str(tmp_path / "open_clip_model.safetensors"))
    report = convert_siglip(tmp_path / "open_clip_model.safetensors", tmp_path / "rel", preset="tiny-dualtoken")
    assert report["dst"] == str(tmp_path / "rel") and "destination" not in report


def test_bench_json_is_a_flag_and_json_out_writes_the_same_object(kl_release, image_dir, tmp_path):
    args = ["bench", "recon", kl_release, image_dir, "--metrics", "psnr"]
    res = ok(*args, "--json", "--json-out", tmp_path / "r.json")
    printed = one_object(res)
    assert printed == json.loads((tmp_path / "r.json").read_text())
    assert printed["images"] == 3 and printed["psnr"] > 0
    table = ok(*args, "--json-out", tmp_path / "r2.json").stdout
    assert table.splitlines()[0].split() == ["metric", "value", "protocol"] and (tmp_path / "r2.json").is_file()
    res = invoke(*args, "--json", tmp_path / "r3.json")  # the old FILE spelling: a usage error, not a silent table
    assert res.exit_code == 2 and "r3.json" in res.output
    assert "--json is a flag (JSON on stdout): write a file with --json-out FILE" in res.output


def test_progress_bars_honour_tqdm_disable_and_quiet(kl_release, image_dir, tmp_path):
    args = ["reconstruct", kl_release, image_dir, "--no-grid"]
    shown = ok(*args, "--out-dir", tmp_path / "a")
    assert "reconstruct: 100%" in shown.stderr
    hidden = ok(*args, "--out-dir", tmp_path / "b", env={"TQDM_DISABLE": "1"})
    assert "reconstruct" not in hidden.stderr and hidden.stdout == shown.stdout.replace(str(tmp_path / "a"), "")
    quiet = ok("--quiet", *args, "--out-dir", tmp_path / "c")
    assert quiet.stderr == "" or "reconstruct" not in quiet.stderr


def test_quiet_and_verbose_set_the_vistok_logger(kl_ckpt, tmp_path):
    args = ["convert", "mar-kl16", kl_ckpt]
    loud = ok(*args, tmp_path / "a", "--preset", "tiny-kl")
    assert f"converting {kl_ckpt} (mar-kl16) ..." in loud.stderr
    quiet = ok("-q", *args, tmp_path / "b", "--preset", "tiny-kl")
    assert "converting" not in quiet.stderr and quiet.stdout == loud.stdout.replace(str(tmp_path / "a"),
                                                                                       str(tmp_path / "b"))
    assert logging.getLogger("vistok").level == logging.WARNING
    ok("--verbose", "list-models", "tiny-kl")
    assert logging.getLogger("vistok").level == logging.DEBUG
    res = invoke("-q", "-v", "list-models")
    assert res.exit_code == 2 and "--quiet and --verbose exclude each other" in res.output


def test_warnings_survive_quiet(image_dir, tmp_path):
    res = ok("-q", "reconstruct", "tiny-kl", image_dir / "img0.png", "--out-dir", tmp_path / "r")
    assert "warning: tiny-kl is a preset with random weights" in res.stderr


def test_library_code_logs_through_logging(trained_run, tmp_path, caplog):
    from vistok.train.trainer import export_run

    (trained_run.parent / "broken").mkdir()
    import shutil

    run = trained_run.parent / "broken" / "run"
    shutil.copytree(trained_run, run)
    (run / "step_3" / "model.safetensors").write_bytes(b"cut")
    with caplog.at_level(logging.INFO, logger="vistok"):
        export_run(run, tmp_path / "exp")
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    assert ("vistok.train.trainer", "export: using step_2, the latest readable checkpoint") in messages
    assert any(name == "vistok.train.trainer" and m.startswith("export: skipping step_3") for name, m in messages)


def test_convert_into_an_earlier_release_needs_overwrite(kl_ckpt, tmp_path):
    args = ["convert", "mar-kl16", kl_ckpt, tmp_path / "k", "--preset", "tiny-kl"]
    ok(*args)
    before = (tmp_path / "k" / "model.safetensors").stat().st_mtime_ns
    res = invoke(*args)
    assert res.exit_code == 1 and "already holds a `vistok convert mar-kl16` release; pass --overwrite" in res.stderr
    assert (tmp_path / "k" / "model.safetensors").stat().st_mtime_ns == before
    ok(*args, "--overwrite")
    assert vistok.load_tokenizer(tmp_path / "k").family == "kl"


def test_convert_toklip_refuses_preset_with_config(tmp_path):
    (tmp_path / "cfg.json").write_text("{}")
    res = invoke("convert", "toklip", tmp_path / "cfg.json", tmp_path / "o", "--preset", "toklip-s-256",
                 "--config", tmp_path / "cfg.json")
    assert res.exit_code == 1 and "takes --preset or --config, not both" in res.stderr
    assert not (tmp_path / "o").exists()


def test_sample_checks_before_creating_out_dir(tmp_path, kl_release):
    torch.manual_seed(0)
    mar = vistok.create_tokenizer("tiny-mar").save_pretrained(tmp_path / "m")
    res = invoke("sample", mar, "--class-label", "10", "--num-iter", "2", "--out-dir", tmp_path / "never")
    assert res.exit_code == 1 and "class labels must be in [0, 10)" in res.stderr
    assert not (tmp_path / "never").exists()
    before = sorted(p.name for p in kl_release.iterdir())
    res = invoke("sample", mar, "--class-label", "1", "--num-iter", "2", "--out-dir", kl_release)
    assert res.exit_code == 1 and "holds a config.json" in res.stderr
    assert sorted(p.name for p in kl_release.iterdir()) == before
    out = one_object(ok("sample", mar, "--class-label", "1", "--num-iter", "2", "--num-sampling-steps", "2",
                        "--out-dir", tmp_path / "s", "--json"))
    assert out == {"out_dir": str(tmp_path / "s"), "images": [{"file": str(tmp_path / "s" / "00000_class1.png"),
                                                                "class": 1}]}


def test_train_help_lists_every_shipped_recipe_unwrapped():
    from vistok.train.config import recipe_names

    res = CliRunner().invoke(main, ["train", "--help"])
    assert res.exit_code == 0, res.output
    listed = res.output.split("Recipes (CONFIG):\n", 1)[1].split()
    assert listed == recipe_names() and "quickstart" in listed and "dualtoken-siglip2-so400m14-384" in listed
