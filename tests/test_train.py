import json
import os
import socket

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

import vistok
from vistok.cli import main
from vistok.train.checkpoint import latest_checkpoint
from vistok.train.config import load_config
from vistok.train.data import ResumableBatchSampler
from vistok.train.trainer import Trainer, export_run

TINY = ["train.batch_size=2", "train.log_every=1", "data.eval_limit=4", "train.image_every=3"]


def config(*extra, recipe="dualtoken-tiny"):
    return load_config(recipe, [*TINY, *extra])


def test_unknown_config_keys_are_rejected_by_name():
    with pytest.raises(ValueError, match="train.stepz"):
        config("train.stepz=3")
    with pytest.raises(ValueError, match="loss.lpips_wieght"):
        config("loss.lpips_wieght=0")
    with pytest.raises(ValueError, match="sections"):
        load_config("dualtoken-tiny", ["trian.steps=3"])
    result = CliRunner().invoke(main, ["train", "dualtoken-tiny", "--set", "optim.lrr=1"])
    assert result.exit_code == 1 and "optim.lrr" in result.output


def test_sampler_shards_ranks_and_resumes_mid_epoch():
    full = ResumableBatchSampler(10, 3, seed=1)
    stream = iter(full)
    batches = [next(stream) for _ in range(5)]  # crosses the epoch boundary
    keys = [k for b in batches for k in b]
    assert sorted(k[2] for k in keys[:10]) == list(range(10))  # one epoch = a permutation
    resumed = iter(ResumableBatchSampler(10, 3, seed=1, start=(0, 6)))
    assert next(resumed) == keys[6:9]
    r0 = next(iter(ResumableBatchSampler(10, 5, seed=1, rank=0, world=2)))
    r1 = next(iter(ResumableBatchSampler(10, 5, seed=1, rank=1, world=2)))
    assert not {k[2] for k in r0} & {k[2] for k in r1}


def _train(cfg, out, **kw):
    return Trainer(cfg, out, quiet=True, **kw).fit()


def test_resume_is_bitwise_identical(tmp_path, monkeypatch):
    extra = ["train.steps=6", "train.save_every=3", "train.ema_decay=0.9", "loss.gan_start=2", "train.export=false"]
    _train(config(*extra), tmp_path / "once")

    original = Trainer.train_step

    def crash_after_checkpoint(self, batches):
        if self.step == 4:
            raise KeyboardInterrupt("simulated crash")
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        _train(config(*extra), tmp_path / "twice")
    monkeypatch.setattr(Trainer, "train_step", original)
    assert latest_checkpoint(tmp_path / "twice").name == "step_3"
    _train(config(*extra), tmp_path / "twice", resume=True)

    for name in ("model", "ema", "loss"):
        a = load_file(str(tmp_path / "once" / "step_6" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "twice" / "step_6" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a = torch.load(tmp_path / "once" / "step_6" / "optimizer.pt", weights_only=True)
    b = torch.load(tmp_path / "twice" / "step_6" / "optimizer.pt", weights_only=True)
    assert all(torch.equal(a["state"][i]["exp_avg"], b["state"][i]["exp_avg"]) for i in a["state"])


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    _train(config("train.steps=2", "train.save_every=2", "train.export=false"), tmp_path / "run")
    with pytest.raises(ValueError, match="--resume"):
        Trainer(config("train.steps=2"), tmp_path / "run", quiet=True)


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(data / f"ok{i}.png")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(data / "tiny.png")  # below min size
    cfg = config(f"data.source={data}", "data.eval_source=null", "train.steps=8", "train.save_every=8",
                 "train.export=false")
    summary = _train(cfg, tmp_path / "run")
    assert summary["steps"] == 8 and summary["skipped_images"] >= 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_images"] == summary["skipped_images"]


def test_non_finite_loss_stops_cleanly_keeping_the_last_checkpoint(tmp_path, monkeypatch):
    from vistok.losses.dualtoken import DualTokenLoss

    original = DualTokenLoss.forward

    def poisoned(self, out, pixels, *, step, last_layer=None):
        loss = original(self, out, pixels, step=step, last_layer=last_layer)
        if step == 3:
            loss.terms["pixel"] = torch.tensor(float("nan"))
            loss.total = loss.total * float("nan")
        return loss

    monkeypatch.setattr(DualTokenLoss, "forward", poisoned)
    cfg = config("train.steps=6", "train.save_every=2", "train.export=false")
    with pytest.raises(FloatingPointError, match=r"step 3.*pixel"):
        _train(cfg, tmp_path / "run")
    last = latest_checkpoint(tmp_path / "run")
    assert last.name == "step_2"
    state = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".step_")]  # no partial writes


def test_quickstart_short_run_improves_heldout_psnr_and_exports(tmp_path):
    cfg = load_config("quickstart", ["train.steps=40", "train.save_every=40", "train.image_every=40", "train.log_every=1",
                                     "data.eval_limit=12"])
    summary = _train(cfg, tmp_path / "qs")
    rows = [json.loads(line) for line in (tmp_path / "qs" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]  # the training records (evaluations are lines of their own)
    assert rows[-1]["pixel"] < 0.5 * rows[0]["pixel"]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert summary["psnr_after"] > summary["psnr_before"] + 2.0
    assert (tmp_path / "qs" / "images" / "step_40.png").is_file()
    # the export is an inference release: no teacher, loads strictly, same codes as the run's weights
    release = vistok.load_tokenizer(tmp_path / "qs" / "export").eval()
    assert not hasattr(release, "teacher")
    trained = vistok.create_tokenizer(cfg.model.preset)  # the quickstart's preset (tiny-dualtoken-s4)
    from vistok.tokenizers.base import load_state_dict_strict

    load_state_dict_strict(trained, load_file(str(tmp_path / "qs" / "step_40" / "model.safetensors")))
    x = release.preprocess([im for _, im in vistok.builtin.builtin_photos("heldout")[:2]])
    assert torch.equal(release.encode(x).ids["pixel"], trained.eval().encode(x).ids["pixel"])


def test_export_command_with_ema(tmp_path):
    _train(config("train.steps=2", "train.save_every=1", "train.ema_decay=0.5", "train.export=false"), tmp_path / "r")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "r"), str(tmp_path / "e"), "--step", "1", "--ema"])
    assert result.exit_code == 0, result.output
    ema = load_file(str(tmp_path / "r" / "step_1" / "ema.safetensors"))
    release = load_file(str(tmp_path / "e" / "model.safetensors"))
    key = "decoder.conv_out.weight"
    assert torch.equal(release[key], ema[key.replace(".", "__")])
    with pytest.raises(FileNotFoundError, match="step_9"):
        export_run(tmp_path / "r", tmp_path / "x", step=9)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = load_config("dualtoken-tiny", [*TINY, "train.steps=4", "train.save_every=4", "loss.gan_start=2",
                                         "train.export=false", "data.eval_source=null"])
    trainer = Trainer(cfg, out, quiet=True)
    trainer.fit()
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state.update({f"disc.{k}": v.clone() for k, v in trainer.objective.discriminator.state_dict().items()})
    torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_process_gloo_ddp_keeps_ranks_identical(tmp_path):
    out = str(tmp_path / "ddp")
    os.makedirs(out)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    a = torch.load(os.path.join(out, "rank0.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "rank1.pt"), weights_only=True)
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, differing[:5]
    assert "pixel_quantizer.embed" in a
    start = vistok.create_tokenizer("tiny-dualtoken")  # training moved the weights
    assert not torch.equal(a["decoder.conv_out.weight"], start.state_dict()["decoder.conv_out.weight"])


def _write_shards(directory, shards=2, per_shard=6, corrupt=(3,)):
    import io
    import tarfile

    rng = np.random.default_rng(0)
    directory.mkdir()
    for shard in range(shards):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(buf, "JPEG")
                payloads = {"jpg": b"garbage" if i in corrupt else buf.getvalue(), "txt": f"caption {i}".encode()}
                for ext, payload in payloads.items():
                    info = tarfile.TarInfo(f"{shard}_{i}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(directory / ("{00000..%05d}.tar" % (shards - 1)))


def test_webdataset_shards_train_skip_corrupt_samples_and_resume_exactly(tmp_path):
    urls = _write_shards(tmp_path / "shards")
    base = [f"data.source={urls}", "data.eval_source=null", "data.shuffle_buffer=4", "train.batch_size=4",
            "train.export=false", "train.save_every=2", "optim.schedule=constant", "optim.warmup_steps=0"]
    once = _train(config(*base, "train.steps=6"), tmp_path / "once")
    assert once["skipped_images"] >= 2  # one corrupt sample per shard pass
    _train(config(*base, "train.steps=2"), tmp_path / "twice")
    _train(config(*base, "train.steps=6"), tmp_path / "twice", resume=True)
    a = load_file(str(tmp_path / "once" / "step_6" / "model.safetensors"))
    b = load_file(str(tmp_path / "twice" / "step_6" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kl_recipe_trains_and_its_loss_matches_the_ldm_formula(tmp_path):
    from vistok.losses.kl import LDMKLLoss

    cfg = load_config("kl-tiny", ["train.log_every=1", "train.export=false", "data.eval_limit=8"])
    _train(cfg, tmp_path / "kl")
    rows = [json.loads(line) for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    first, last = np.mean([r["l1"] for r in rows[:5]]), np.mean([r["l1"] for r in rows[-5:]])
    assert last < 0.85 * first
    assert rows[-1]["logvar"] == 0.0 and "d_loss" in rows[-1]  # LDM never optimises logvar; the GAN switched on

    torch.manual_seed(0)
    tok = vistok.create_tokenizer("tiny-kl")
    loss = LDMKLLoss(perceptual_weight=0.0, logvar_init=0.3, disc_start=10 ** 9)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = tok(x)
    got = loss(out, x, step=0)
    post = out.posterior
    kl = 0.5 * (post.mean ** 2 + post.var - 1 - post.logvar).sum() / 2
    nll = ((x - out.reconstruction).abs() / np.exp(0.3) + 0.3).sum() / 2
    torch.testing.assert_close(got.total, nll + 1e-6 * kl)


def test_training_from_an_init_release_with_overrides_and_export(tmp_path):
    torch.manual_seed(3)
    init = vistok.create_tokenizer("tiny-dualtoken")
    init.save_pretrained(tmp_path / "init")
    cfg = config("train.steps=2", "train.save_every=2", f"model.init={tmp_path / 'init'}",
                 "train.grad_checkpointing=true", "data.eval_source=null")
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    assert trainer.model.siglip.grad_checkpointing
    start = trainer.model.state_dict()["siglip.visual.trunk.pos_embed"].clone()
    assert torch.equal(start, init.state_dict()["siglip.visual.trunk.pos_embed"])  # init weights loaded
    summary = trainer.fit()
    release = vistok.load_tokenizer(summary["export"])
    assert not hasattr(release, "teacher") and release.config["grad_checkpointing"] is False


def test_large_seeds_give_per_sample_generators_and_huge_ones_are_named():
    from vistok.train.config import build_config
    from vistok.train.data import sample_generator

    # the seed product overflowed torch's 64-bit seed from train.seed ~18447 up ("Overflow when unpacking")
    for seed in (20000, 123456, 2**63 - 1):
        assert sample_generator(seed, 3, 5).initial_seed() < 2**64
    assert sample_generator(7, 3, 5).initial_seed() == (7 * 1_000_003 + 3) * 1_000_000_007 + 5  # small: unchanged
    with pytest.raises(ValueError, match=r"train.seed must be <= 9223372036854775807"):
        build_config({"train": {"seed": 99999999999999999999}})
