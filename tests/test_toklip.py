import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vistok
from vistok.losses.contrastive import TokLIPLoss, clip_loss


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(0)
    return vistok.create_tokenizer("tiny-toklip")


@pytest.fixture
def tiny(tiny_state):
    import copy

    return copy.deepcopy(tiny_state)


def test_features_are_causal_in_raster_order(tiny):
    tiny.eval()
    gen = torch.Generator().manual_seed(0)
    ids = {"vq": torch.randint(0, 512, (1, 8, 8, 1), generator=gen)}
    base, pooled = tiny.features_from_ids(ids)
    t = 27  # row 3, column 3
    later = {"vq": ids["vq"].clone()}
    later["vq"].view(-1)[t + 1:] = (later["vq"].view(-1)[t + 1:] + 1) % 512
    feats, pooled_later = tiny.features_from_ids(later)
    torch.testing.assert_close(feats[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-5)
    assert (feats[:, t + 1:] - base[:, t + 1:]).abs().amax() > 1e-3
    assert (pooled_later - pooled).abs().amax() > 1e-4  # the pool attends to every token
    earlier = {"vq": ids["vq"].clone()}
    earlier["vq"].view(-1)[t - 1] = (earlier["vq"].view(-1)[t - 1] + 1) % 512
    assert (tiny.features_from_ids(earlier)[0][:, t] - base[:, t]).abs().amax() > 1e-3


def test_encode_equals_features_from_ids_and_decode_is_the_vq(tiny):
    tiny.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    enc = tiny.encode(x)
    feats, pooled = tiny.features_from_ids(enc.ids)
    torch.testing.assert_close(enc.features, feats)
    torch.testing.assert_close(enc.pooled, pooled)
    torch.testing.assert_close(tiny.decode(ids=enc.ids), tiny.vq.decode(ids=enc.ids))
    assert enc.ids["vq"].shape == (2, 8, 8, 1) and enc.features.shape == (2, 64, 64)


def test_clip_loss_equals_hand_computation():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(np.log(10.0))
    logits = 10.0 * img @ txt.T
    by_hand = 0
    for i in range(4):
        by_hand -= torch.log_softmax(logits[i], 0)[i] / 8 + torch.log_softmax(logits[:, i], 0)[i] / 8
    torch.testing.assert_close(clip_loss(img, txt, scale), by_hand)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(world * 3, 8, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(world * 3, 8, generator=gen), dim=-1)
    local_img = img[rank * 3:(rank + 1) * 3].clone().requires_grad_(True)
    loss = clip_loss(local_img, txt[rank * 3:(rank + 1) * 3], torch.tensor(np.log(5.0)))
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": local_img.grad}, os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_two_process_clip_loss_sees_the_negatives_of_both_ranks(tmp_path):
    """Each rank scores the global batch (open_clip's default): its loss is the loss of the whole
    6 x 6 similarity matrix, and its gradient is that loss's gradient for its own rows."""
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=gen), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    logits = 5.0 * img @ txt.T
    labels = torch.arange(6)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    expected.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], expected.detach())
        torch.testing.assert_close(got["grad"], img.grad[rank * 3:(rank + 1) * 3])


def test_training_steps_with_captions_lower_the_loss_and_keep_the_teacher(tmp_path):
    from vistok.train.config import load_config
    from vistok.train.trainer import Trainer

    torch.manual_seed(0)
    cfg = load_config("toklip-tiny", ["train.steps=20", "train.log_every=1", "train.export=true"])
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    teacher = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    vq = {k: v.clone() for k, v in trainer.model.vq.state_dict().items()}
    summary = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([r["loss"] for r in rows[-4:]]) < 0.7 * np.mean([r["loss"] for r in rows[:4]])
    assert all(torch.equal(teacher[k], v) for k, v in trainer.model.teacher.state_dict().items())
    assert all(torch.equal(vq[k], v) for k, v in trainer.model.vq.state_dict().items())  # frozen VQ
    release = vistok.load_tokenizer(summary["export"])
    assert not hasattr(release, "teacher")


def test_loss_needs_captions_and_teacher(tiny):
    from vistok.train.objectives import TokLIPObjective

    objective = TokLIPObjective({})
    with pytest.raises(ValueError, match="caption"):
        objective.generator_step(tiny, tiny, torch.zeros(2, 3, 32, 32), 0, ["", ""])
    out = tiny(torch.zeros(2, 3, 32, 32), with_teacher=False)
    with pytest.raises(ValueError, match="teacher"):
        TokLIPLoss()(out, torch.randn(2, 64), step=0, logit_scale=tiny.siglip.logit_scale)


def test_released_checkpoint_layout_converts_strictly(tiny, tmp_path):
    """A synthetic TokLIP file with TokLIP's own names (`visual.trunk.vq.*`, `vq_table`, ...), under
    `state_dict` with `module.` prefixes and without the logit bias, loads strictly."""
    from vistok.convert.toklip import convert_toklip

    ours = tiny.state_dict()
    theirs = {}
    for key, value in ours.items():
        if key.startswith("teacher.") or key == "siglip.logit_bias":
            continue
        if key.startswith(("vq_table.", "vq_mapping.", "vq.")):
            name = "visual.trunk." + key
        else:
            name = key[len("siglip."):]
        theirs["module." + name] = value + 0.01 if value.is_floating_point() else value
    torch.save({"epoch": 32, "state_dict": theirs}, tmp_path / "TokLIP_tiny.pt")
    report = convert_toklip(tmp_path / "TokLIP_tiny.pt", tmp_path / "out", preset="tiny-toklip")
    assert report["filled_from_init"] == ["siglip.logit_bias"]
    loaded = vistok.load_tokenizer(tmp_path / "out")
    state = loaded.state_dict()
    assert torch.equal(state["vq_table.weight"], ours["vq_table.weight"] + 0.01)
    assert torch.equal(state["siglip.visual.trunk.pos_embed"], ours["siglip.visual.trunk.pos_embed"] + 0.01)
    theirs["module.visual.trunk.extra"] = torch.zeros(1)
    torch.save({"state_dict": theirs}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="extra"):
        convert_toklip(tmp_path / "bad.pt", tmp_path / "bad", preset="tiny-toklip")


def test_logit_scale_is_clamped_after_each_step(tiny):
    from vistok.train.objectives import TokLIPObjective

    with torch.no_grad():
        tiny.siglip.logit_scale.fill_(10.0)
    TokLIPObjective({}).after_step(tiny)
    assert tiny.siglip.logit_scale.item() == pytest.approx(np.log(100))
