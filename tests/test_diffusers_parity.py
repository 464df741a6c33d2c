"""Numerical parity with an independent implementation: diffusers' AutoencoderKL on the exported weights."""

import pytest
import torch

import vistok
from vistok.convert import export_diffusers, kl_diffusers_config, kl_to_diffusers_state_dict

diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name,size", [("tiny-kl", 32), ("mar-kl16", 64), ("ldm-kl-f16", 32)])
def test_diffusers_gives_same_posterior_and_images(name, size):
    torch.manual_seed(0)
    tok = vistok.create_tokenizer(name).eval()
    with torch.no_grad():  # move off the default init so every weight matters
        for p in tok.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = diffusers.AutoencoderKL.from_config(kl_diffusers_config(tok)).eval()
    ref.load_state_dict(kl_to_diffusers_state_dict(tok), strict=True)  # every key placed, none left over
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        ours, theirs = tok.encode(x).latent_dist, ref.encode(x).latent_dist
        assert rel_err(ours.mean, theirs.mean) < 1e-4
        assert rel_err(ours.logvar, theirs.logvar) < 1e-4
        z = ours.sample(torch.Generator().manual_seed(0))
        assert rel_err(z, theirs.sample(torch.Generator().manual_seed(0))) < 1e-4  # same noise draw
        assert rel_err(tok.decode_unscaled(z), ref.decode(z).sample) < 1e-4


def test_exported_directory_loads_with_from_pretrained(tmp_path):
    tok = vistok.create_tokenizer("tiny-kl", scaling_factor=0.3).eval()
    export_diffusers(tok, tmp_path / "d")
    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path / "d").eval()
    assert ref.config.scaling_factor == 0.3
    assert ref.config.down_block_types[-1] == "AttnDownEncoderBlock2D"
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert rel_err(tok.encode(x).latent_dist.mean, ref.encode(x).latent_dist.mean) < 1e-4


def test_mar_config_matches_reference_sheet():
    cfg = kl_diffusers_config(vistok.create_tokenizer("mar-kl16"))
    assert cfg["down_block_types"] == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    assert cfg["up_block_types"] == ["UpDecoderBlock2D"] * 5
    assert cfg["block_out_channels"] == [128, 128, 256, 256, 512]
    assert cfg["latent_channels"] == 16 and cfg["scaling_factor"] == 0.2325
    assert kl_diffusers_config(vistok.create_tokenizer("ldm-kl-f16"))["up_block_types"][0] == "AttnUpDecoderBlock2D"


def test_export_refuses_what_diffusers_cannot_express(tmp_path):
    tok = vistok.create_tokenizer("tiny-kl", z_channels=8)
    with pytest.raises(ValueError, match="z_channels == embed_dim"):
        export_diffusers(tok, tmp_path / "d")
    assert not (tmp_path / "d").exists()
