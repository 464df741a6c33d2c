"""KL family: reference layout, posterior maths against torch.distributions, encode/decode contract."""

import pytest
import torch
from conftest import read_key_list

import vistok
from vistok.tokenizers.kl import DiagonalGaussian, KLTokenizer


def test_mar_kl16_state_dict_equals_reference_key_list():
    tok = vistok.create_tokenizer("mar-kl16")
    ref = read_key_list("mar_kl16.txt")
    got = [(k, tuple(v.shape)) for k, v in tok.state_dict().items()]
    assert got == ref  # names, shapes and module order
    assert tok.num_parameters() == 66_456_019  # MAR's count (reference sheet)
    assert tok.stride == 16 and tok.scaling_factor == 0.2325


def test_ldm_kl_f16_adds_exactly_the_decoder_attention():
    mar = dict(read_key_list("mar_kl16.txt"))
    ldm = {k: tuple(v.shape) for k, v in vistok.create_tokenizer("ldm-kl-f16").state_dict().items()}
    extra = set(ldm) - set(mar)
    assert set(mar) <= set(ldm) and len(ldm) == 342 and len(extra) == 30
    assert all(k.startswith("decoder.up.4.attn.") for k in extra)
    assert sum(torch.Size(s).numel() for s in ldm.values()) == 69_610_963


def test_posterior_matches_torch_distributions():
    torch.manual_seed(0)
    moments = torch.randn(2, 8, 3, 5) * 3
    moments[:, 4:] = moments[:, 4:].clamp(-25, 15)
    post = DiagonalGaussian.from_moments(moments)
    mean, logvar = moments[:, :4], moments[:, 4:]
    ref = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    std_normal = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected_kl = torch.distributions.kl_divergence(ref, std_normal).sum((1, 2, 3))
    torch.testing.assert_close(post.kl(), expected_kl, rtol=1e-5, atol=1e-5)
    x = torch.randn_like(mean)
    torch.testing.assert_close(post.nll(x), -ref.log_prob(x).sum((1, 2, 3)), rtol=1e-5, atol=1e-4)
    assert torch.equal(post.mode(), mean)


def test_logvar_is_clamped_like_ldm():
    moments = torch.cat([torch.zeros(1, 2, 2, 2), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)], 1)
    post = DiagonalGaussian.from_moments(moments)
    assert post.logvar[0, 0].unique().item() == -30.0 and post.logvar[0, 1].unique().item() == 20.0


def test_sample_uses_generator_and_has_posterior_statistics():
    mean = torch.full((4, 4, 16, 16), 2.0)
    post = DiagonalGaussian(mean, torch.full_like(mean, 2 * torch.log(torch.tensor(0.5))))
    a = post.sample(torch.Generator().manual_seed(1))
    b = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 2.0) < 0.05 and abs(a.std().item() - 0.5) < 0.05


def test_encode_latents_are_scaled_posterior():
    tok = vistok.create_tokenizer("tiny-kl", scaling_factor=0.25).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        enc = tok.encode(x)
        assert enc.grid == (8, 8) and enc.latents.shape == (2, 4, 8, 8)
        torch.testing.assert_close(enc.latents, enc.latent_dist.mean * 0.25)
        sampled = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(3)).latents
        noise = torch.randn(enc.latent_dist.mean.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(sampled, (enc.latent_dist.mean + enc.latent_dist.std * noise) * 0.25)
        # decode undoes the scaling: decoding scaled latents == decoder on raw latents
        torch.testing.assert_close(tok.decode(latents=enc.latents, clamp=False),
                                   tok.decode_unscaled(enc.latent_dist.mean))
        assert tok.decode(latents=enc.latents * 50).abs().max() <= 1.0


def test_attention_block_equals_explicit_softmax_attention():
    from vistok.tokenizers.decoders import AttnBlock

    torch.manual_seed(0)
    blk = AttnBlock(16, groups=4)
    x = torch.randn(2, 16, 5, 3)
    h = blk.norm(x)
    q, k, v = (m(h).flatten(2) for m in (blk.q, blk.k, blk.v))  # (B, C, N)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / 16 ** 0.5, dim=-1)
    out = torch.einsum("bij,bcj->bci", w, v).view_as(x)
    torch.testing.assert_close(blk(x), x + blk.proj_out(out), rtol=1e-5, atol=1e-5)


def test_patchify_follows_mar_token_order():
    lat = torch.randn(2, 3, 4, 6)
    tok1 = KLTokenizer.patchify(lat, 1)
    assert tok1.shape == (2, 24, 3)
    assert torch.equal(tok1[1, 2 * 6 + 5], lat[1, :, 2, 5])
    tok2 = KLTokenizer.patchify(lat, 2)
    assert tok2.shape == (2, 6, 12)
    for c, p, q in [(0, 0, 0), (2, 1, 0), (1, 0, 1), (2, 1, 1)]:
        assert tok2[0, 1 * 3 + 2, c * 4 + p * 2 + q] == lat[0, c, 2 * 1 + p, 2 * 2 + q]
    assert torch.equal(KLTokenizer.unpatchify(tok2, (2, 3), 2), lat)
    with pytest.raises(ValueError, match="divisible"):
        KLTokenizer.patchify(torch.randn(1, 3, 5, 4), 2)


def test_invalid_architecture_is_rejected():
    with pytest.raises(ValueError, match="encoder_attn_levels"):
        KLTokenizer(ch_mult=(1, 2), encoder_attn_levels=(3,))
    with pytest.raises(ValueError, match="norm_groups"):
        KLTokenizer(ch=20, ch_mult=(1,), encoder_attn_levels=(), norm_groups=32)


def test_channels_last_fast_path_gives_same_contiguous_outputs():
    torch.manual_seed(0)
    tok = vistok.create_tokenizer("tiny-kl").eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    outs = {}
    with torch.no_grad():
        for flag in (False, True):
            tok.channels_last = flag
            post = tok.encode_posterior(x)
            outs[flag] = (post.mean, tok.decode_unscaled(post.mean))
    torch.testing.assert_close(outs[True][0], outs[False][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[True][1], outs[False][1], rtol=1e-5, atol=1e-5)
    assert outs[True][1].is_contiguous() and "channels_last" not in tok.config


def test_sample_with_a_generator_on_another_device():
    from vistok import rng

    g = torch.Generator().manual_seed(0)
    post = DiagonalGaussian(torch.zeros(1, 2, 3, 3, device="meta"), torch.zeros(1, 2, 3, 3, device="meta"))
    assert post.sample(g).device.type == "meta"  # a CPU generator drives tensors elsewhere
    a = rng.randn((4, 5), generator=torch.Generator().manual_seed(1), device="cpu")
    assert torch.equal(a, torch.randn(4, 5, generator=torch.Generator().manual_seed(1)))


def test_encode_accepts_other_float_dtypes():
    tok = vistok.create_tokenizer("tiny-kl").eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        a, b = tok.encode(x).latents, tok.encode(x.double()).latents
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
        assert tok.decode(latents=b.double()).dtype == torch.float32


def test_subclass_without_init_keeps_its_config(tmp_path):
    class MyKL(KLTokenizer):
        pass

    tok = MyKL(ch=32, ch_mult=(1, 2), encoder_attn_levels=(), norm_groups=8, z_channels=4, embed_dim=4)
    assert tok.config["ch"] == 32 and tok.config["z_channels"] == 4
