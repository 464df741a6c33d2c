"""Training you can watch: timestamped metrics, held-out evaluations at train.eval_every and the last step,
reconstruction grids of varied held-out photos (PNG and TensorBoard), the resolved config in TensorBoard."""

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vistok
from vistok.bench.metrics import psnr_uint8
from vistok.builtin import builtin_photos, photo_of
from vistok.images import to_uint8
from vistok.weights import load_state_dict_strict
from vistok.train.config import load_config
from vistok.train.data import spread_indices
from vistok.train.trainer import Trainer

STEPS = 5
SETTINGS = ["train.batch_size=2", "train.log_every=2", "data.eval_limit=4", "train.steps=5", "train.eval_every=2",
            "train.image_every=100", "train.save_every=100", "train.export=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("watch") / "run"
    before = time.time()
    summary = Trainer(load_config("dualtoken-tiny", SETTINGS), out, quiet=True).fit()
    after = time.time()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, summary, rows, (before, after)


def test_every_record_has_a_timestamp_and_evaluations_come_at_eval_every_and_the_last_step(run):
    out, summary, rows, (before, after) = run
    assert all(before <= r["time"] <= after and 0 <= r["elapsed_s"] <= after - before for r in rows)
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    evals = [r for r in rows if "eval/psnr" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, STEPS]  # step 0, every 2, and the last (5) though 5 % 2 != 0
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, STEPS]
    # the summary keeps its keys, and its PSNRs are the first and last evaluations
    assert list(summary) == ["start_step", "psnr_before", "steps", "seconds", "skipped_images", "psnr_after"]
    assert summary["psnr_before"] == evals[0]["eval/psnr"] and summary["psnr_after"] == evals[-1]["eval/psnr"]
    assert all(0 < r["eval/ssim"] < 1 for r in evals)


def test_the_last_evaluation_scores_the_final_weights(run):
    """Recomputed from the saved step_5 weights: PSNR over eval_limit=4 held-out crops spread over the two
    photos (17 crops each: the 2nd and 4th quarter-midpoints of each, crops 4, 12 and 17+4, 17+12), and the
    fraction of each codebook's codes its ids use (mean over depths)."""
    out, _, rows, _ = run
    last = [r for r in rows if "eval/psnr" in r][-1]
    model = vistok.create_tokenizer("tiny-dualtoken")
    load_state_dict_strict(model, load_file(str(out / f"step_{STEPS}" / "model.safetensors")))
    model.eval()
    crops = builtin_photos("heldout")
    assert [name.split("_")[0] for name, _ in crops] == ["chelsea"] * 17 + ["coffee"] * 17
    x = model.preprocess([crops[i][1] for i in (4, 12, 21, 29)])
    with torch.no_grad():
        psnr = psnr_uint8(to_uint8(x), to_uint8(model.reconstruct(x))).mean().item()
        ids = model.encode(x).ids
    assert last["eval/psnr"] == pytest.approx(psnr, rel=1e-6)
    for name, spec in model.codebooks.items():
        used = [ids[name][..., d].unique().numel() / spec.size for d in range(spec.depth)]
        assert last[f"eval/codebook/{name}/usage"] == pytest.approx(sum(used) / len(used))


def _tiles(png, size, row):
    arr = np.asarray(Image.open(png).convert("RGB"))
    top = 2 + row * (size + 2)
    return [arr[top:top + size, 2 + c * (size + 2):2 + c * (size + 2) + size] for c in range(8)]


def test_a_grid_of_several_held_out_photos_is_written_at_the_last_step(run):
    out, *_ = run
    assert [p.name for p in (out / "images").iterdir()] == [f"step_{STEPS}.png"]  # image_every 100 > 5 steps
    model = vistok.create_tokenizer("tiny-dualtoken")
    size = model.preprocess_config.image_size
    crops = builtin_photos("heldout")
    originals = to_uint8(model.preprocess([im for _, im in crops])).permute(0, 2, 3, 1).numpy()
    photos = []
    for tile in _tiles(out / "images" / f"step_{STEPS}.png", size, row=0):
        match = [name for (name, _), arr in zip(crops, originals) if np.array_equal(arr, tile)]
        assert len(match) == 1  # every top-row tile is one held-out crop
        photos.append(photo_of(match[0]))
    assert len(set(photos)) >= 2, photos  # not only the first crops of one photo


def test_tensorboard_holds_the_grid_the_evaluations_and_the_config(run):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: no event reader")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, *_ = run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    images = events.Images("reconstructions")
    assert [e.step for e in images] == [STEPS]
    size = vistok.create_tokenizer("tiny-dualtoken").preprocess_config.image_size
    assert (images[0].width, images[0].height) == (8 * (size + 2) + 2, 2 * (size + 2) + 2)
    assert [e.step for e in events.Scalars("eval/psnr")] == [0, 2, 4, STEPS]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.strip("`\n").removeprefix("json\n"))["train"]["eval_every"] == 2
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")


def test_spread_indices_deals_places_round_robin_and_evenly_within_groups():
    assert spread_indices(["a"] * 17 + ["b"] * 17, 8) == [2, 6, 10, 14, 19, 23, 27, 31]
    assert spread_indices(["a"] * 10 + ["b"] * 2 + ["c"] * 10, 8) == [1, 5, 8, 10, 11, 13, 17, 20]  # 3 + 2 + 3
    assert spread_indices(["a", "b", "a"], 8) == [0, 1, 2]  # fewer images than places: all of them
    assert spread_indices(["x"] * 8, 4) == [1, 3, 5, 7]
