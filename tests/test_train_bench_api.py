"""The Python API for the other two jobs: vistok.train(...) and vistok.bench_*(...), which the CLI calls."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import vistok
from vistok.bench.metrics import psnr_uint8
from vistok.builtin import builtin_photos
from vistok.cli import main
from vistok.images import to_uint8

FAST = {"train.steps": 2, "train.batch_size": 2, "train.export": False, "data.eval_limit": 2}


def test_import_vistok_loads_neither_the_trainer_nor_the_benchmarks():
    code = ("import sys, vistok; print(sorted(m for m in sys.modules if m.startswith(('vistok.train', "
            "'vistok.bench', 'vistok.cli', 'click', 'torch.utils.tensorboard'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(vistok.train) and vistok.bench_codebook.__module__ == "vistok.bench.api"
    assert {"train", "bench_recon", "bench_compare", "bench_zeroshot", "bench_retrieval", "bench_codebook"} <= set(
        dir(vistok))


def test_train_applies_overrides_then_set_and_returns_the_summary(tmp_path):
    overrides = {**FAST, "optim.lr": 5e-4, "data.crop_scale": [0.8, 1.0]}
    given = dict(overrides)
    summary = vistok.train("dualtoken-tiny", out=tmp_path / "run", overrides=overrides,
                           set=["optim.lr=2e-4", "train.log_every=1"], quiet=True)
    assert overrides == given  # the caller's dict is left alone
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optim"]["lr"] == 2e-4 and saved["data"]["crop_scale"] == [0.8, 1.0]  # set wins over overrides
    assert list(summary) == ["start_step", "psnr_before", "steps", "seconds", "skipped_images", "psnr_after",
                             "run_dir"]
    assert summary["steps"] == 2 and summary["run_dir"] == str(tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    # resume=True continues the same run
    more = vistok.train("dualtoken-tiny", out=tmp_path / "run", overrides={**overrides, "train.steps": 3},
                        set=["optim.lr=2e-4", "train.log_every=1"], resume=True, quiet=True)
    assert more["start_step"] == 2 and more["steps"] == 3 and "psnr_before" not in more


def test_train_takes_a_config_dict_and_names_its_errors(tmp_path):
    config = {"family": "kl", "model": {"preset": "tiny-kl"}, "description": "a dict, as a JSON file holds",
              "data": {"eval_source": None}, "loss": {"perceptual_weight": 0.0}, "train": {"precision": "fp32"}}
    with pytest.raises(ValueError, match="out is required"):
        vistok.train(config, overrides=FAST)
    summary = vistok.train(config, tmp_path / "kl", overrides=FAST, quiet=True)
    assert summary["steps"] == 2 and summary["psnr_after"] is None  # no eval_source
    assert "description" in config  # not consumed
    with pytest.raises(ValueError, match="train.stepz"):
        vistok.train("dualtoken-tiny", tmp_path / "x", overrides={"train.stepz": 3})
    with pytest.raises(ValueError, match="list of 'section.key=value'"):
        vistok.train("dualtoken-tiny", tmp_path / "x", set="train.steps=3")
    with pytest.raises(ValueError, match="recipe name, a JSON file path"):
        vistok.train(42, tmp_path / "x")
    with pytest.raises(ValueError, match="neither a JSON file nor a recipe"):
        vistok.train("no-such-recipe", tmp_path / "x")


def test_the_train_command_calls_vistok_train(monkeypatch, tmp_path):
    calls = []

    def fake(config, out=None, **kw):
        calls.append((config, out, kw))
        return {"steps": 7, "run_dir": "somewhere"}

    monkeypatch.setattr("vistok.train.api.train", fake)
    result = CliRunner().invoke(main, ["train", "quickstart", "--out", str(tmp_path), "--set", "train.steps=7",
                                       "--resume", "--json"])
    assert result.exit_code == 0, result.output
    assert calls == [("quickstart", str(tmp_path), {"set": ["train.steps=7"], "resume": True})]
    assert json.loads(result.stdout) == {"steps": 7, "run_dir": "somewhere"}  # one object, as every --json


@pytest.mark.parametrize("argv, function, expected", [
    (["recon", "tiny-kl", "builtin:photos", "--metrics", "psnr", "--limit", "2"], "bench_recon",
     (("tiny-kl", "builtin:photos"), {"metrics": "psnr", "limit": 2})),
    (["compare", "a", "b", "--metrics", "ssim"], "bench_compare", (("a", "b"), {"metrics": "ssim"})),
    (["zeroshot", "m", "d", "--classnames", "folders"], "bench_zeroshot", (("m", "d"), {"classnames": "folders"})),
    (["retrieval", "m", "d", "--captions", "c.jsonl"], "bench_retrieval", (("m", "d", "c.jsonl"), {})),
    (["codebook", "m", "d", "--batch-size", "3"], "bench_codebook", (("m", "d"), {"batch_size": 3})),
])
def test_each_bench_command_calls_its_api_function(monkeypatch, argv, function, expected):
    calls = []

    def fake(*args, **kw):
        calls.append((args, kw))
        return {"images": 0, "skipped": 0, "codebooks": [], "settings": {"top5_k": 5}, "top1": 0.0, "top5": 0.0,
                "classes": 0, "captions": 0}

    monkeypatch.setattr(f"vistok.bench.api.{function}", fake)
    result = CliRunner().invoke(main, ["bench", *argv])
    assert result.exit_code == 0, result.output
    (args, kw), = calls
    assert args == expected[0] and expected[1].items() <= kw.items()


def test_bench_codebook_counts_the_ids_and_a_presets_random_weights_come_from_seed_0():
    torch.manual_seed(0)
    tok = vistok.create_tokenizer("tiny-vqgan").eval()
    result = vistok.bench_codebook(tok, "builtin:photos", limit=4, progress=False)
    by_name = vistok.bench_codebook("tiny-vqgan", "builtin:photos", limit=4, progress=False)
    assert by_name["codebooks"] == result["codebooks"]  # the same weights: repeated runs agree
    with torch.no_grad():
        ids = tok.encode(tok.preprocess([im for _, im in builtin_photos("heldout")[:4]])).ids["vq"]
    (row,) = result["codebooks"]
    assert row["used"] == ids.unique().numel() and row["tokens"] == ids.numel()
    assert result["model"] == "VQGANTokenizer" and result["images"] == 4


def test_bench_recon_function_scores_a_built_tokenizers_round_trip():
    torch.manual_seed(2)
    tok = vistok.create_tokenizer("tiny-kl").eval()
    result = vistok.bench_recon(tok, "builtin:photos", metrics=["psnr"], limit=3, progress=False)
    x = tok.preprocess([im for _, im in builtin_photos("heldout")[:3]])
    with torch.no_grad():
        expected = psnr_uint8(to_uint8(x), to_uint8(tok.reconstruct(x))).mean().item()
    assert result["psnr"] == pytest.approx(expected, rel=1e-9) and result["images"] == 3
    with pytest.raises(ValueError, match="preset name, a release directory"):
        vistok.bench_recon(3, "builtin:photos")
    with pytest.raises(ValueError, match="no discrete codebooks"):
        vistok.bench_codebook(tok, "builtin:photos", limit=1, progress=False)


def test_resolve_config_takes_recipes_files_dicts_and_run_configs_alike(tmp_path):
    from vistok.train.api import resolve_config
    from vistok.train.config import load_config

    expected = load_config("kl-tiny", ["train.steps=3", "data.hflip=true"]).to_dict()
    path = tmp_path / "kl.json"
    path.write_text(json.dumps(load_config("kl-tiny").to_dict()))
    for source in ("kl-tiny", path, str(path), load_config("kl-tiny"), load_config("kl-tiny").to_dict()):
        assert resolve_config(source, overrides={"train.steps": 3}, set=["data.hflip=true"]).to_dict() == expected
    with pytest.raises(ValueError, match="overrides train.steps.x: 'steps' is not a section"):
        resolve_config("kl-tiny", overrides={"train.steps.x": 1})
