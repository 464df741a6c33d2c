import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import vistok
from conftest import read_key_list
from vistok.cli import main

REFERENCE = read_key_list("llamagen_vq16.txt")


def test_preset_state_dict_is_the_llamagen_key_layout():
    with torch.device("meta"):
        tok = vistok.create_tokenizer("llamagen-vq16")
    ours = [(k, tuple(v.shape)) for k, v in tok.state_dict().items()]
    assert sorted(ours) == sorted(REFERENCE)
    assert sum(p.numel() for p in tok.parameters()) == 71_883_403  # LlamaGen's VQ_16()
    assert tok.stride == 16 and tok.codebooks["vq"].size == 16384 and tok.codebooks["vq"].dim == 8


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A synthetic vq_ds16_t2i.pt: the reference key list, random values, `{"model": sd}`."""
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key, shape in REFERENCE:
        if key == "quantize.codebook_used":
            sd[key] = torch.randint(0, 16384, shape, generator=gen).float()
        elif key.endswith("weight") and len(shape) == 1:  # norms
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            sd[key] = torch.randn(shape, generator=gen) / np.sqrt(fan_in)
    path = tmp_path_factory.mktemp("lg") / "vq_ds16_t2i.pt"
    torch.save({"model": sd}, path)
    return path, sd


def test_released_checkpoint_converts_loads_strictly_and_matches_independent_lookup(released, tmp_path):
    path, sd = released
    result = CliRunner().invoke(main, ["convert", "llamagen-vq16", str(path), str(tmp_path / "vq"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tensors"] == 344
    tok = vistok.load_tokenizer(tmp_path / "vq").eval()
    state = tok.state_dict()
    assert all(torch.equal(state[k], sd[k]) for k in sd)  # every key consumed, values untouched
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    enc = tok.encode(x)
    assert enc.ids["vq"].shape == (1, 4, 4, 1)
    with torch.no_grad():
        z = tok.quant_conv(tok.encoder(x))[0].flatten(1).T  # (16, 8)
        book = sd["quantize.embedding.weight"]
        cosine = F.normalize(z, dim=-1) @ F.normalize(book, dim=-1).T
        assert torch.equal(enc.ids["vq"].flatten(), cosine.argmax(1))  # nearest = highest cosine
        codes = F.normalize(book, dim=-1)[enc.ids["vq"][0, ..., 0]].permute(2, 0, 1)[None]
        expected = tok.decoder(tok.post_quant_conv(codes)).clamp(-1, 1)
    torch.testing.assert_close(tok.decode(ids=enc.ids), expected)


def test_wrapped_prefixed_and_incomplete_checkpoints(released, tmp_path):
    from vistok.convert import convert_llamagen_vq

    _, sd = released
    torch.save({"ema": {f"module.{k}": v for k, v in sd.items()}, "model": {}}, tmp_path / "train.pt")
    assert convert_llamagen_vq(tmp_path / "train.pt", tmp_path / "a")["tensors"] == 344
    partial = {k: v for k, v in sd.items() if k != "quantize.codebook_used"}
    torch.save({"model": partial}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="codebook_used"):
        convert_llamagen_vq(tmp_path / "partial.pt", tmp_path / "b")


def test_quantizer_losses_gradients_and_usage_window():
    torch.manual_seed(0)
    tok = vistok.create_tokenizer("tiny-vqgan").train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = tok(x)
    z = F.normalize(tok.quant_conv(tok.encoder(x)).permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    zq = F.normalize(tok.quantize.embedding.weight, dim=-1)[out.ids["vq"].flatten()]
    torch.testing.assert_close(out.codebook_loss, ((zq - z) ** 2).mean())
    torch.testing.assert_close(out.commitment_loss, 0.25 * ((zq - z) ** 2).mean())
    out.reconstruction.square().mean().backward(retain_graph=True)
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through to the encoder
    assert tok.quantize.embedding.weight.grad is None or tok.quantize.embedding.weight.grad.abs().sum() == 0
    out.codebook_loss.backward()
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0  # the codebook learns by gradient
    used = tok.quantize.codebook_used[-out.ids["vq"].numel():]
    assert torch.equal(used.long(), out.ids["vq"].flatten())
    before = tok.quantize.codebook_used.clone()
    tok.encode(x)  # inference leaves the window alone
    assert torch.equal(before, tok.quantize.codebook_used)


def test_bad_ids_are_rejected():
    tok = vistok.create_tokenizer("tiny-vqgan").eval()
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(ids={"vq": torch.full((1, 8, 8, 1), 512)})
    with pytest.raises(ValueError, match="'vq'"):
        tok.decode(ids={"pixel": torch.zeros(1, 8, 8, 1, dtype=torch.long)})


def test_vqgan_recipe_loss_falls(tmp_path):
    from vistok.train.config import load_config
    from vistok.train.trainer import Trainer

    cfg = load_config("vqgan-tiny", ["train.steps=22", "train.log_every=1", "train.export=false",
                                     "data.eval_source=null"])
    Trainer(cfg, tmp_path / "vq", quiet=True).fit()
    rows = [json.loads(line) for line in (tmp_path / "vq" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([r["pixel"] for r in rows[-3:]]) < 0.6 * np.mean([r["pixel"] for r in rows[:3]])
    assert rows[-1]["codebook/quantize/usage"] > 0.15  # no collapse onto a few codes
