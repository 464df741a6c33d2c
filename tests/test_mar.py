"""MAR family (MAR's transformer over KL-16 latents, Harmon's shared encoder): parity with the official
LTH14/mar and wusize/Harmon code on files saved as they save them (tests/data/mar/README.md), the
official full-size layouts, mask and label checks, and the sampling loop against an oracle."""

import argparse
import math

import pytest
import torch
from conftest import DATA, read_key_list
from safetensors.torch import load_file

import vistok
from vistok.convert import convert_harmon, convert_mar
from vistok.convert.mar import mar_args_from_state_dict
from vistok.tokenizers import CheckpointMismatchError, KLTokenizer, MARTokenizer
from vistok.tokenizers.mar import resize_pos_embed
from vistok.tokenizers.mar_sampling import mask_lengths

MAR_DIR = DATA / "mar"
MAR_CKPT, HARMON_PTH = MAR_DIR / "mar_tiny_checkpoint.pth", MAR_DIR / "harmon_tiny.pth"
# a small stride-16 VAE with 16 channels, so the converted tiny MAR runs on real-shaped latents (the
# official 66M-parameter KL-16 would only slow the tests down; `--kl16` loading is tested below)
SMALL_VAE = {"ch": 8, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 1, "encoder_attn_levels": [4],
             "decoder_attn_levels": [], "mid_attention": True, "z_channels": 16, "embed_dim": 16, "norm_groups": 4,
             "scaling_factor": 0.2325}
TOL = 2e-5  # relative to the reference's largest magnitude; tanh GELU or LayerNorm eps 1e-5 cost ~1e-4


def rel_err(got, ref):
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def mar_release(tmp_path_factory):
    dst = tmp_path_factory.mktemp("mar") / "release"
    report = convert_mar(MAR_CKPT, dst, num_heads=4, vae=SMALL_VAE)
    return report, vistok.load_tokenizer(dst)


@pytest.fixture(scope="module")
def official():
    return load_file(str(MAR_DIR / "mar_tiny_outputs.safetensors"))


# ------------------------------------------------------------------------------- parity with the official code
def test_encoder_features_match_official_mar(mar_release, official):
    _, tok = mar_release
    o = official
    with torch.no_grad():
        by_class = tok.encode_latents(o["latents"], class_labels=torch.tensor([3, 7])).features
        by_fake = tok.encode_latents(o["latents"]).features
        masked = tok.encode_latents(o["latents"], o["mask"], class_labels=torch.tensor([3, 7])).features
    assert by_fake.shape == (2, 64 + 16, 32) and masked.shape == (2, 64 + 6, 32)
    assert rel_err(by_class, o["enc_class"]) <= TOL
    assert rel_err(by_fake, o["enc_fake"]) <= TOL
    assert rel_err(masked, o["enc_masked"]) <= TOL
    assert rel_err(by_fake, o["enc_class"]) > 1e-2  # the buffer vector matters: the comparison can fail


def test_decoder_outputs_match_official_mar(mar_release, official):
    _, tok = mar_release
    o = official
    with torch.no_grad():
        full = tok.decode_features(tok.encode_latents(o["latents"]).features, (4, 4))
        enc = tok.encode_latents(o["latents"], o["mask"], class_labels=torch.tensor([3, 7])).features
        masked = tok.decode_features(enc, (4, 4), o["mask"])
    assert full.shape == (2, 16, 24)
    assert rel_err(full, o["dec_fake"]) <= TOL
    assert rel_err(masked, o["dec_masked"]) <= TOL


def test_other_grids_match_harmons_interpolated_position_embeddings(mar_release, official):
    _, tok = mar_release
    o = official
    with torch.no_grad():
        f66 = tok.encode_latents(o["latents_6x6"]).features
        f35 = tok.encode_latents(o["latents_3x5"], o["mask_3x5"].bool()).features
        d66 = tok.decode_features(f66, (6, 6))
        d35 = tok.decode_features(f35, (3, 5), o["mask_3x5"])
    assert f66.shape == (2, 64 + 36, 32) and f35.shape == (2, 64 + 10, 32)
    for got, key in ((f66, "enc_6x6"), (f35, "enc_3x5_masked"), (d66, "dec_6x6"), (d35, "dec_3x5_masked")):
        assert rel_err(got, o[key]) <= TOL, key


def test_diffusion_head_matches_official_denoiser(mar_release, official):
    _, tok = mar_release
    o = official
    with torch.no_grad():
        out = tok.mar.diffloss.net(o["head_x"], o["head_t"], o["head_c"])
    assert rel_err(out, o["head_out"]) <= TOL


def test_harmon_file_converts_and_matches_extract_visual_feature(tmp_path):
    report = convert_harmon(HARMON_PTH, tmp_path / "h", num_heads=4, vae=SMALL_VAE)
    assert report["dropped"] == {"llm": 3, "proj_in": 4, "proj_out": 4}
    tok = vistok.load_tokenizer(tmp_path / "h")
    assert tok.preprocess_config.image_size == 512  # Harmon runs 512 px on the 256-px MAR
    ref = load_file(str(MAR_DIR / "harmon_tiny_outputs.safetensors"))
    with torch.no_grad():
        got = tok.encode_latents(ref["latents_8x8"]).features
    assert got.shape == (2, 64 + 64, 32)
    assert rel_err(got, ref["enc_8x8"]) <= TOL
    # Harmon's LLM input order: the image tokens first, the 64 buffer tokens last
    llm = tok.to_llm_order(got)
    assert torch.equal(llm[:, :64], got[:, 64:]) and torch.equal(llm[:, 64:], got[:, :64])


# ------------------------------------------------------------------------------- converters
def _official_checkpoint():
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(MAR_CKPT, map_location="cpu", weights_only=True)


def test_mar_converter_takes_ema_by_default_and_model_on_request(mar_release, tmp_path):
    report, tok = mar_release
    ckpt = _official_checkpoint()
    assert set(ckpt) == {"model", "model_ema", "optimizer", "epoch", "scaler", "args"}
    assert report["weights"] == "model_ema" and report["tensors"] == len(ckpt["model_ema"])
    ours = tok.mar.state_dict()
    assert set(ours) == set(ckpt["model_ema"])
    assert all(torch.equal(ours[k], ckpt["model_ema"][k]) for k in ours)
    assert not torch.equal(ckpt["model"]["z_proj.weight"], ckpt["model_ema"]["z_proj.weight"])
    convert_mar(MAR_CKPT, tmp_path / "raw", ema=False, num_heads=4, vae=SMALL_VAE)
    raw = vistok.load_tokenizer(tmp_path / "raw").mar.state_dict()
    assert all(torch.equal(raw[k], ckpt["model"][k]) for k in raw)


def test_mar_converter_needs_head_count_for_unofficial_width(tmp_path):
    with pytest.raises(ValueError, match="--num-heads"):
        convert_mar(MAR_CKPT, tmp_path / "x", vae=SMALL_VAE)
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        convert_mar(MAR_CKPT, tmp_path / "x", num_heads=5, vae=SMALL_VAE)


@pytest.mark.parametrize("name,width,heads", [("mar_base_d6_w1024", 768, 12), ("mar_large_d8_w1280", 1024, 16),
                                              ("mar_huge_d12_w1536", 1280, 16)])
def test_sizes_from_official_layouts(name, width, heads):
    sd = {k: torch.empty(shape, device="meta") for k, shape in read_key_list(f"{name}.txt")}
    got = mar_args_from_state_dict(sd)
    depth = {768: 12, 1024: 16, 1280: 20}[width]
    assert got["encoder_num_heads"] == got["decoder_num_heads"] == heads
    assert (got["encoder_embed_dim"], got["encoder_depth"], got["decoder_depth"]) == (width, depth, depth)
    assert (got["img_size"], got["buffer_size"], got["class_num"]) == (256, 64, 1000)
    # args.model names the factory (and must agree with the weights); --num-heads overrides the head count
    factory = {768: "mar_base", 1024: "mar_large", 1280: "mar_huge"}[width]
    assert mar_args_from_state_dict(sd, args=argparse.Namespace(model=factory))["encoder_num_heads"] == heads
    other = "mar_base" if width != 768 else "mar_huge"
    with pytest.raises(ValueError, match=f"args.model is '{other}'"):
        mar_args_from_state_dict(sd, args=argparse.Namespace(model=other))
    assert mar_args_from_state_dict(sd, num_heads=8)["encoder_num_heads"] == 8


def test_kl16_file_fills_the_vae(tmp_path):
    torch.manual_seed(3)
    vae_sd = KLTokenizer(**SMALL_VAE).state_dict()
    torch.save({"model": vae_sd}, tmp_path / "kl16.ckpt")  # MAR's kl16.ckpt layout: {"model": flat dict}
    report = convert_mar(MAR_CKPT, tmp_path / "r", num_heads=4, vae=SMALL_VAE, kl16=tmp_path / "kl16.ckpt")
    assert report["vae"] == "kl16.ckpt"
    got = vistok.load_tokenizer(tmp_path / "r").vae.state_dict()
    assert all(torch.equal(got[k], vae_sd[k]) for k in vae_sd)


def test_harmon_converter_is_strict_on_mar_and_refuses_strangers(tmp_path):
    flat = torch.load(HARMON_PTH, map_location="cpu", weights_only=True)
    missing = {k: v for k, v in flat.items() if k != "mar.encoder_norm.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatchError, match="encoder_norm.bias"):
        convert_harmon(tmp_path / "missing.pth", tmp_path / "a", num_heads=4, vae=SMALL_VAE)
    torch.save({**flat, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="extra.weight"):
        convert_harmon(tmp_path / "extra.pth", tmp_path / "b", num_heads=4, vae=SMALL_VAE)
    torch.save({k: v for k, v in flat.items() if not k.startswith("mar.")}, tmp_path / "llm_only.pth")
    with pytest.raises(ValueError, match="no mar"):
        convert_harmon(tmp_path / "llm_only.pth", tmp_path / "c", num_heads=4, vae=SMALL_VAE)


class _NotData:
    pass


def test_checkpoint_needing_code_is_refused(tmp_path):
    ckpt = _official_checkpoint()
    ckpt["args"] = _NotData()  # anything but argparse.Namespace needs code execution to unpickle
    torch.save(ckpt, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refusing"):
        convert_mar(tmp_path / "evil.pth", tmp_path / "x", num_heads=4, vae=SMALL_VAE)


# ------------------------------------------------------------------------------- full-size presets
OFFICIAL_PARAMS = {"mar_base_d6_w1024": 207_924_768, "mar_large_d8_w1280": 478_326_304,
                   "mar_huge_d12_w1536": 942_403_104}  # official factories' parameter counts (README: 208M/479M/943M)


@pytest.mark.parametrize("preset,keys", [("mar-base", "mar_base_d6_w1024"), ("mar-large", "mar_large_d8_w1280"),
                                         ("mar-huge", "mar_huge_d12_w1536"), ("harmon-0.5b", "mar_base_d6_w1024"),
                                         ("harmon-1.5b", "mar_huge_d12_w1536")])
def test_full_presets_have_the_official_layout(preset, keys):
    with torch.device("meta"):
        tok = vistok.create_tokenizer(preset)
    got = [(k, tuple(v.shape)) for k, v in tok.mar.state_dict().items()]
    assert got == read_key_list(f"{keys}.txt")
    assert [(k, tuple(v.shape)) for k, v in tok.vae.state_dict().items()] == read_key_list("mar_kl16.txt")
    assert sum(p.numel() for p in tok.mar.parameters()) == OFFICIAL_PARAMS[keys]
    heads = tok.mar.encoder_blocks[0].attn.num_heads
    assert heads == {768: 12, 1024: 16, 1280: 16}[tok.width]
    assert tok.mar.encoder_blocks[0].norm1.eps == 1e-6 and tok.mar.z_proj_ln.eps == 1e-6


# ------------------------------------------------------------------------------- API and bad input
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = vistok.create_tokenizer("tiny-mar").eval()
    with torch.no_grad():
        for p in tok.mar.parameters():  # move LayerNorms and the zero-initialised head off their init
            p.add_(0.05 * torch.randn_like(p))
    return tok


def test_encode_gives_kl_latents_and_unmasked_features(tiny):
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        enc = tiny.encode(pixels)
        vae_latents = tiny.vae.encode(pixels).latents
        direct = tiny.encode_latents(vae_latents).features
    assert enc.grid == (8, 8) and torch.equal(enc.latents, vae_latents)
    assert enc.features.shape == (2, 8 + 64, 32) and torch.equal(enc.features, direct)


def test_float_and_bool_masks_agree_and_bad_masks_are_named(tiny):
    lat = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, ::2] = True
    mask[1, 1::2] = True
    with torch.no_grad():
        a = tiny.encode_latents(lat, mask).features
        b = tiny.encode_latents(lat, mask.float()).features
    assert a.shape == (2, 8 + 32, 32) and torch.equal(a, b)
    uneven = mask.clone()
    uneven[0, 1] = True
    with pytest.raises(ValueError, match="same number"):
        tiny.encode_latents(lat, uneven)
    with pytest.raises(ValueError, match=r"\(B, h\*w\) = \(2, 64\)"):
        tiny.encode_latents(lat, mask[:, :10])
    with pytest.raises(ValueError, match="only 0 and 1"):
        tiny.encode_latents(lat, mask.float() * 0.5)
    with pytest.raises(ValueError, match=r"latents of shape \(B, 4, h, w\)"):
        tiny.encode_latents(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\)"):
        tiny.encode_latents(lat, class_labels=torch.tensor([1, 10]))


@pytest.mark.parametrize("bad, message", [
    (lambda lat: lat * float("nan"), "NaN or Inf"),          # ran through to NaN features before
    (lambda lat: lat.masked_fill(lat > 1, float("inf")), "NaN or Inf"),
    (lambda lat: lat[..., :0, :0], "grid 0x0"),             # was interpolate's RuntimeError
])
def test_encode_latents_refuses_non_finite_and_empty_grids(tiny, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny.encode_latents(bad(torch.randn(2, 4, 8, 8)))


def test_encode_latents_empty_batch_with_mask_or_labels(tiny):
    lat = torch.randn(0, 4, 8, 8)
    with torch.no_grad():  # both raised RuntimeError (reshape of 0 rows, min() of no labels)
        masked = tiny.encode_latents(lat, torch.zeros(0, 64, dtype=torch.bool)).features
        labelled = tiny.encode_latents(lat, class_labels=torch.zeros(0, dtype=torch.long)).features
    assert masked.shape == labelled.shape == (0, 8 + 64, 32)


@pytest.mark.parametrize("labels", [[True, False], ["a", "b"], "ab", 3, [[1, 2]], [1.0, 2.0]])
def test_class_labels_of_wrong_type_are_named(tiny, labels):
    with pytest.raises(ValueError, match="class_labels must be a 1-D sequence of ints"):
        tiny.encode_latents(torch.randn(2, 4, 8, 8), class_labels=labels)


def test_decode_features_checks_grid_and_type_and_casts(tiny):
    lat = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        feats = tiny.encode_latents(lat).features
        ref = tiny.decode_features(feats, (8, 8))
        assert torch.allclose(tiny.decode_features(feats.double(), (8, 8)), ref)  # was a dtype RuntimeError
    for grid in [(-8, -8), 8, (8,), (8.5, 8)]:
        with pytest.raises(ValueError, match="grid must be two positive ints"):
            tiny.decode_features(feats, grid)
    with pytest.raises(ValueError, match="features must be a float tensor"):
        tiny.decode_features(feats.numpy(), (8, 8))


@pytest.mark.parametrize("args, message", [
    ({"img_size": -32}, "img_size -32 is not a positive multiple"),  # loaded, with a (-8, -8) grid
    ({"img_size": 0}, "img_size 0 is not a positive multiple"),
    ({"patch_size": 0}, "patch_size must be >= 1"),                   # ZeroDivisionError before
    ({"encoder_num_heads": 0}, "encoder_num_heads must be >= 1"),
    ({"decoder_num_heads": -4}, "decoder_num_heads must be >= 1"),
    ({"class_num": 0}, "class_num must be >= 1"),
])
def test_constructor_names_impossible_sizes(args, message):
    with pytest.raises(ValueError, match=message):
        vistok.create_tokenizer("tiny-mar", **args)


def test_position_embedding_resize_keeps_buffer_and_native_grid():
    table = torch.randn(1, 3 + 4 * 4, 5)
    assert resize_pos_embed(table, (4, 4), (4, 4), 3) is table
    big = resize_pos_embed(table, (4, 4), (8, 6), 3)
    assert big.shape == (1, 3 + 48, 5) and torch.equal(big[:, :3], table[:, :3])
    # bilinear, align_corners False: a 2x upsample's output pixel (1, 1) sits at source (0.25, 0.25)
    img = table[0, 3:].reshape(4, 4, 5)
    up = resize_pos_embed(table, (4, 4), (8, 8), 3)[0, 3:].reshape(8, 8, 5)
    expect = 0.75 * 0.75 * img[0, 0] + 0.75 * 0.25 * (img[0, 1] + img[1, 0]) + 0.25 * 0.25 * img[1, 1]
    torch.testing.assert_close(up[1, 1], expect, rtol=1e-6, atol=1e-6)


def test_save_and_reload_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "r")
    back = vistok.load_tokenizer(tmp_path / "r")
    lat = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(back.encode_latents(lat).features, tiny.encode_latents(lat).features)


# ------------------------------------------------------------------------------- sampling
def test_cosine_mask_schedule():
    # floor(16 cos(pi/2 k/4)) for k = 1..3 is 14, 11, 6; the last step reveals everything
    assert mask_lengths(16, 4) == [14, 11, 6, 0]
    assert mask_lengths(16, 1) == [0]
    lengths = mask_lengths(256, 64)
    assert all(a > b for a, b in zip([256] + lengths, lengths))  # at least one token per step
    assert lengths[0] == math.floor(256 * math.cos(math.pi / 128))


class PointMassOracle(torch.nn.Module):
    """The exact eps of a point mass at mu = cond[:, :C]: (x_t - sqrt(abar) mu) / sqrt(1 - abar)."""

    def __init__(self, alphas_cumprod, token_dim):
        super().__init__()
        self.abar, self.c = alphas_cumprod.float(), token_dim

    def forward(self, x, t, cond):
        ab = self.abar[t][:, None]
        eps = (x - ab.sqrt() * cond[:, :self.c]) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)


@pytest.fixture
def oracle_tok(monkeypatch):
    """tiny-mar whose decoder says, at every position, which token belongs there: target T for the
    conditional rows and U for the unconditional ones (the guided batch's second half)."""
    torch.manual_seed(1)
    tok = vistok.create_tokenizer("tiny-mar").eval()
    head = tok.mar.diffloss
    head.net = PointMassOracle(head.train_diffusion.alphas_cumprod, 4)
    T, U = torch.randn(2, 64, 4), torch.randn(2, 64, 4)
    calls = []
    real_encoder = tok.mar.forward_encoder

    def encoder(tokens, grid, buffer, mask=None):
        calls.append((tokens[:2].clone(), mask[:2].clone()))
        return real_encoder(tokens, grid, buffer, mask)

    def decoder(x, grid, mask=None):
        rows = [T, U][: x.shape[0] // 2]
        return torch.nn.functional.pad(torch.cat(rows), (0, 32 - 4))

    monkeypatch.setattr(tok.mar, "forward_encoder", encoder)
    monkeypatch.setattr(tok.mar, "forward_decoder", decoder)
    return tok, T, U, calls


def test_sampling_loop_with_oracle_reproduces_the_target(oracle_tok):
    tok, T, U, calls = oracle_tok
    out = tok.sample([1, 2], num_iter=5, generator=torch.Generator().manual_seed(0))
    assert out.latents.shape == (2, 4, 8, 8) and out.images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(KLTokenizer.patchify(out.latents), T, atol=1e-4, rtol=1e-4)
    # the encoder saw exactly the revealed tokens: masked where not yet predicted, T where known
    assert len(calls) == 5
    still = [64] + mask_lengths(64, 5)[:-1]
    for (tokens, mask), n in zip(calls, still):
        assert (mask.sum(1) == n).all()
        known = ~mask
        torch.testing.assert_close(tokens[known], T[known], atol=1e-4, rtol=1e-4)
        assert (tokens[mask] == 0).all()
    # each image has its own random order
    assert not torch.equal(calls[1][1][0], calls[1][1][1])


def test_guidance_follows_the_linear_schedule(oracle_tok):
    tok, T, U, calls = oracle_tok
    cfg, n_iter = 3.0, 4
    out = tok.sample([1, 2], num_iter=n_iter, cfg=cfg, generator=torch.Generator().manual_seed(0))
    got = KLTokenizer.patchify(out.latents)
    lengths = mask_lengths(64, n_iter)
    masks = [m for _, m in calls] + [torch.zeros(2, 64, dtype=torch.bool)]
    for step in range(n_iter):
        revealed = masks[step] & ~masks[step + 1]
        scale = 1 + (cfg - 1) * (64 - max(lengths[step], 1)) / 64  # MAR's linear cfg schedule
        # eps_u + s (eps_c - eps_u) is the exact eps of the point mass at U + s (T - U)
        torch.testing.assert_close(got[revealed], (U + scale * (T - U))[revealed], atol=1e-3, rtol=1e-4)
    constant = tok.sample([1, 2], num_iter=n_iter, cfg=cfg, cfg_schedule="constant",
                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(KLTokenizer.patchify(constant.latents), U + cfg * (T - U), atol=1e-3, rtol=1e-4)


def test_tiny_samples_are_deterministic_under_a_seed(tiny):
    run = lambda seed, **kw: tiny.sample([3, 4], num_iter=2, num_sampling_steps=3,
                                         generator=torch.Generator().manual_seed(seed), **kw).latents
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.isfinite(a).all() and a.shape == (2, 4, 8, 8)
    assert torch.equal(run(0, cfg=2.0), run(0, cfg=2.0))
    unconditional = tiny.sample(None, num_images=2, num_iter=1, num_sampling_steps=2,
                                generator=torch.Generator().manual_seed(0))
    assert unconditional.latents.shape == (2, 4, 8, 8)


def test_sampling_rejects_bad_arguments(tiny):
    with pytest.raises(ValueError, match=r"num_iter must be in \[1, 64\]"):
        tiny.sample([1], num_iter=65)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 10\)"):
        tiny.sample([10])
    with pytest.raises(ValueError, match="num_images"):
        tiny.sample(None)
    with pytest.raises(ValueError, match="cfg_schedule"):
        tiny.sample([1], cfg_schedule="cosine")
    # these ran to the end and failed at decoding with "latents contain NaN or Inf", or crashed
    for kw, message in [({"cfg": float("nan")}, "cfg must be a finite"), ({"cfg": float("inf")}, "cfg must be a finite"),
                        ({"temperature": float("inf")}, "temperature must be finite"),
                        ({"grid": (-2, -2)}, "grid must be two positive ints"),
                        ({"grid": 8}, "grid must be two positive ints")]:
        with pytest.raises(ValueError, match=message):
            tiny.sample([1], num_iter=2, num_sampling_steps=2, **kw)
    with pytest.raises(ValueError, match="class_labels must be a 1-D sequence of ints"):
        tiny.sample([True])
    with pytest.raises(ValueError, match="class_labels must be a 1-D sequence of ints"):
        tiny.sample(["cat"])


def test_zero_sampling_steps_is_refused_not_the_default(tiny):
    # `num_steps or default` took 0 for "use the default (100 steps)"
    with pytest.raises(ValueError, match=r"num_steps must be in \[2, 1000\], got 0"):
        tiny.sample([1], num_iter=1, num_sampling_steps=0)


# ------------------------------------------------------------------------------- CLI
def test_cli_sample_writes_reproducible_pngs(tmp_path):
    from click.testing import CliRunner

    from vistok.cli import main

    torch.manual_seed(0)
    vistok.create_tokenizer("tiny-mar").save_pretrained(tmp_path / "m")
    args = ["sample", str(tmp_path / "m"), "--class-label", "3", "--class-label", "5", "--num-iter", "2",
            "--num-sampling-steps", "2", "--cfg", "2.0", "--seed", "7", "--json"]
    runner = CliRunner()
    first = runner.invoke(main, args + ["--out-dir", str(tmp_path / "a")])
    second = runner.invoke(main, args + ["--out-dir", str(tmp_path / "b")])
    assert first.exit_code == 0 and second.exit_code == 0, first.output
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["00000_class3.png", "00001_class5.png"]
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    bad = runner.invoke(main, ["sample", str(tmp_path / "m"), "--class-label", "10", "--out-dir", str(tmp_path / "c")])
    assert bad.exit_code == 1 and "class labels must be in [0, 10)" in bad.output


def test_cli_convert_options_are_checked(tmp_path):
    from click.testing import CliRunner

    from vistok.cli import main

    runner = CliRunner()
    res = runner.invoke(main, ["convert", "harmon", str(HARMON_PTH), str(tmp_path / "h"), "--no-ema"])
    assert res.exit_code == 1 and "--ema/--no-ema applies to MAR training checkpoints" in res.output
    res = runner.invoke(main, ["convert", "mar-kl16", str(MAR_CKPT), str(tmp_path / "k"), "--num-heads", "4"])
    assert res.exit_code == 1 and "--num-heads applies to mar/harmon" in res.output
    res = runner.invoke(main, ["convert", "mar", str(MAR_CKPT), str(tmp_path / "m")])
    assert res.exit_code == 1 and "pass --num-heads" in res.output


@pytest.mark.slow
def test_cli_convert_mar_with_the_full_kl16_vae(tmp_path):
    from click.testing import CliRunner

    from vistok.cli import main

    res = CliRunner().invoke(main, ["convert", "mar", str(MAR_CKPT), str(tmp_path / "m"), "--num-heads", "4", "--json"])
    assert res.exit_code == 0, res.output
    tok = vistok.load_tokenizer(tmp_path / "m")
    assert tok.stride == 16 and tok.vae.num_parameters() == 66_456_019  # MAR KL-16's size (reference sheet)
    ref = load_file(str(MAR_DIR / "mar_tiny_outputs.safetensors"))
    with torch.no_grad():
        assert rel_err(tok.encode_latents(ref["latents"]).features, ref["enc_fake"]) <= TOL


@pytest.mark.parametrize("command", [["sample", "tiny-mar", "--class-label", "1", "--out-dir", "unused"],
                                     ["encode", "tiny-mar", "unused.png", "--out", "unused.safetensors"]])
def test_cli_seed_out_of_torch_range_is_a_usage_error(command):
    from click.testing import CliRunner

    from vistok.cli import main

    # was "Error: Overflow when unpacking long long" from manual_seed, naming no option
    res = CliRunner().invoke(main, command + ["--seed", str(2**64)])
    assert res.exit_code == 2 and "--seed" in res.output, res.output


def test_llm_order_uses_the_models_own_buffer_size():
    """tiny-mar has 8 buffer slots: the LLM order moves exactly those 8 to the end, whatever the grid."""
    from vistok import create_tokenizer

    tok = create_tokenizer("tiny-mar")
    features = torch.arange(2 * (tok.buffer_size + 6) * 3, dtype=torch.float32).reshape(2, -1, 3)
    features = features[..., :1].expand(-1, -1, tok.width).contiguous()
    llm = tok.to_llm_order(features)
    assert tok.buffer_size == 8
    assert torch.equal(llm[:, :6], features[:, 8:]) and torch.equal(llm[:, 6:], features[:, :8])
    with pytest.raises(ValueError, match="encoder output with its buffer first"):
        tok.to_llm_order(features[:, :8])
