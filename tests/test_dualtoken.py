import copy
import json

import pytest
import torch

import vistok
from vistok.builtin import builtin_photos
from vistok.losses.dualtoken import DualTokenLoss
from vistok.losses.semantic import mse_minus_cosine, semantic_loss
from vistok.tokenizers.dualtoken import DualTokenTokenizer


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(0)
    tok = vistok.create_tokenizer("tiny-dualtoken")
    return tok


@pytest.fixture
def tiny(tiny_state):
    return copy.deepcopy(tiny_state)


@pytest.fixture(scope="module")
def photos():
    tok = vistok.create_tokenizer("tiny-dualtoken", with_teacher=False, with_text=False)
    return tok.preprocess([im for _, im in builtin_photos("train")])


def block_grads(tok, loss):
    blocks = list(tok.siglip.trunk.blocks)
    params = [list(b.parameters()) for b in blocks]
    flat = [p for ps in params for p in ps]
    grads = torch.autograd.grad(loss, flat, allow_unused=True, retain_graph=True)
    out, i = [], 0
    for ps in params:
        g = grads[i:i + len(ps)]
        out.append(sum(float(x.abs().sum()) for x in g if x is not None))
        i += len(ps)
    return out


def test_reconstruction_gradient_stops_at_the_pixel_tap(tiny, photos):
    tiny.train()
    out = tiny(photos[:4])
    norms = block_grads(tiny, out.reconstruction.square().mean())
    assert tiny.pixel_layer == 2 and tiny.shortcut_layer == 1
    assert all(n > 0 for n in norms[:2])  # layers 1..6 in the paper's numbering
    assert all(n == 0 for n in norms[2:])  # layers after the pixel tap get nothing from reconstruction
    sem_params = list(tiny.semantic_in.parameters()) + list(tiny.semantic_out.parameters())
    grads = torch.autograd.grad(out.reconstruction.square().mean(), sem_params, allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0 for g in grads)


def test_semantic_loss_reaches_blocks_up_to_the_deep_tap(tiny, photos):
    tiny.train()
    out = tiny(photos[:4])
    feature_term = mse_minus_cosine(out.semantic_features, out.teacher_features)
    norms = block_grads(tiny, feature_term)
    assert tiny.semantic_layer == 5
    assert all(n > 0 for n in norms[:5])
    assert norms[5] == 0  # the last layer runs after the replaced hidden state
    pooled_norms = block_grads(tiny, mse_minus_cosine(out.pooled, out.teacher_pooled))
    assert pooled_norms[5] > 0
    # the teacher's outputs carry no graph at all
    assert not out.teacher_features.requires_grad and not out.teacher_pooled.requires_grad


def test_teacher_is_frozen_and_unchanged_by_training(tiny, photos):
    before = {k: v.clone() for k, v in tiny.teacher.state_dict().items()}
    loss_fn = DualTokenLoss(lpips_weight=0.0, gan_weight=0.0)
    opt = torch.optim.AdamW(tiny.trainable_parameters(), lr=1e-3)
    tiny.train()
    assert not tiny.teacher.training and all(not p.requires_grad for p in tiny.teacher.parameters())
    assert not any(p is q for p in tiny.trainable_parameters() for q in tiny.teacher.parameters())
    for step in range(3):
        out = tiny(photos[step * 4:(step + 1) * 4])
        loss = loss_fn(out, photos[step * 4:(step + 1) * 4], step=step, last_layer=tiny.decoder.last_layer)
        opt.zero_grad()
        loss.total.backward()
        assert all(p.grad is None for p in tiny.teacher.parameters())
        opt.step()
    after = tiny.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # while the student did move
    assert not torch.equal(tiny.siglip.trunk.blocks[0].attn.qkv.weight, tiny.teacher.trunk.blocks[0].attn.qkv.weight)


def test_decode_of_encoded_ids_equals_training_reconstruction(tiny, photos):
    tiny.eval()
    x = photos[:3]
    with torch.no_grad():
        out = tiny(x, with_teacher=False)
        enc = tiny.encode(x)
        recon = tiny.decode(ids=enc.ids, clamp=False)
    assert torch.equal(enc.ids["pixel"], out.ids["pixel"]) and torch.equal(enc.ids["semantic"], out.ids["semantic"])
    torch.testing.assert_close(recon, out.reconstruction, atol=1e-4, rtol=1e-4)
    assert enc.grid == (8, 8) and enc.ids["pixel"].shape == (3, 8, 8, 4)
    assert enc.features.shape == (3, 64, 64) and enc.pooled.shape == (3, 64)
    torch.testing.assert_close(enc.features, out.semantic_features)


def test_encode_never_updates_codebooks(tiny, photos):
    tiny.train()
    before = tiny.pixel_quantizer.embed.clone(), tiny.semantic_quantizer.cluster_size.clone()
    tiny.encode(photos[:2])
    assert torch.equal(before[0], tiny.pixel_quantizer.embed)
    assert torch.equal(before[1], tiny.semantic_quantizer.cluster_size)
    assert tiny.pixel_quantizer.training  # mode restored


def test_embed_concatenates_depth_summed_codes(tiny, photos):
    tiny.eval()
    ids = tiny.encode(photos[:2]).ids
    emb = tiny.embed(ids)
    assert emb.shape == (2, 64, 16)
    book_p, book_s = tiny.pixel_quantizer.embed[0], tiny.semantic_quantizer.embed[0]
    expected = torch.cat([book_p[ids["pixel"]].sum(-2), book_s[ids["semantic"]].sum(-2)], -1).flatten(1, 2)
    torch.testing.assert_close(emb, expected)


def test_token_layout_round_trip_and_rejects_malformed_sequences(tiny, photos):
    tiny.eval()
    ids = tiny.encode(photos[:2]).ids
    layout = tiny.token_layout(1000)
    assert layout.vocab_size == 1000 + 2 + 256 + 256
    seq = layout.to_sequence(ids)
    assert seq.shape == (2, 2 + 64 * 8)
    assert (seq[:, 0] == 1000).all() and (seq[:, -1] == 1001).all()
    back = layout.from_sequence(seq, (8, 8))
    assert all(torch.equal(back[k], ids[k]) for k in ids)
    with pytest.raises(ValueError, match="</image>"):
        layout.from_sequence(torch.cat([seq[:, :-1], seq[:, 1:2]], 1), (8, 8))
    swapped = seq.clone()
    swapped[:, 1], swapped[:, 5] = seq[:, 5], seq[:, 1]  # a semantic id in a pixel slot
    with pytest.raises(ValueError, match="code block"):
        layout.from_sequence(swapped, (8, 8))
    with pytest.raises(ValueError, match="expected"):
        layout.from_sequence(seq[:, :-2], (8, 8))


def test_bad_inputs_are_rejected_with_clear_errors(tiny, photos):
    tiny.eval()
    with pytest.raises(ValueError, match="64x64"):
        tiny.encode(torch.zeros(1, 3, 32, 32))
    ids = tiny.encode(photos[:1]).ids
    with pytest.raises(ValueError, match="out of range"):
        tiny.decode(ids={"pixel": ids["pixel"] + 256})
    with pytest.raises(ValueError, match="lack"):
        tiny.decode(ids={"semantic": ids["semantic"]})
    with pytest.raises(ValueError, match=r"\(B, 8, 8"):
        tiny.decode(ids={"pixel": ids["pixel"][:, :4]})
    with pytest.raises(ValueError, match="outside"):
        vistok.create_tokenizer("tiny-dualtoken", semantic_layer=9)


def test_fewer_depths_decode_coarser(tiny, photos):
    """Residual VQ: the first k depths decode too (a coarser image)."""
    tiny.eval()
    ids = tiny.encode(photos[:1]).ids
    coarse = tiny.decode(ids={"pixel": ids["pixel"][..., :2]}, clamp=False)
    book = tiny.pixel_quantizer.embed[0]
    with torch.no_grad():
        expected = tiny._decode_codes(book[ids["pixel"][..., :2]].sum(-2).flatten(1, 2))
    torch.testing.assert_close(coarse, expected)
    assert not torch.allclose(coarse, tiny.decode(ids=ids, clamp=False))


def test_semantic_loss_matches_hand_computation():
    torch.manual_seed(0)
    f, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    p, q = torch.randn(2, 4), torch.randn(2, 4)

    def by_hand(a, b):
        mse = ((a - b) ** 2).mean()
        cos = ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean()
        return mse - cos

    out = semantic_loss(f, t, p, q)
    torch.testing.assert_close(out.total, 5 * by_hand(f, t) + by_hand(p, q))


def test_training_steps_on_real_photos_lower_the_loss(tiny, photos):
    torch.manual_seed(0)
    tiny.train()
    loss_fn = DualTokenLoss(lpips_weight=0.0, gan_weight=0.0)
    opt = torch.optim.AdamW(tiny.trainable_parameters(), lr=1e-3, betas=(0.5, 0.9))
    fixed = photos[::9][:8]

    def evaluate():
        tiny.eval()
        with torch.no_grad():
            out = tiny(fixed)
            loss = loss_fn(out, fixed, step=0, last_layer=tiny.decoder.last_layer)
        tiny.train()
        return loss.total.item(), loss.terms["pixel"].item()

    start_total, start_pixel = evaluate()
    gen = torch.Generator().manual_seed(0)
    for step in range(25):
        batch = photos[torch.randint(len(photos), (8,), generator=gen)]
        loss = loss_fn(tiny(batch), batch, step=step, last_layer=tiny.decoder.last_layer)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    end_total, end_pixel = evaluate()
    assert end_total < start_total - 1.0
    assert end_pixel < 0.7 * start_pixel


def test_gan_terms_switch_on_and_the_adaptive_weight_is_clamped(tiny, photos):
    tiny.train()
    loss_fn = DualTokenLoss(lpips_weight=0.0, gan_start=5)
    x = photos[:2]
    out = tiny(x)
    early = loss_fn(out, x, step=4, last_layer=tiny.decoder.last_layer)
    assert early.terms["gan"] == 0 and loss_fn.discriminator_loss(out, x, step=4) == 0
    late = loss_fn(out, x, step=5, last_layer=tiny.decoder.last_layer)
    assert 0.3 <= late.terms["gan_weight"] <= 10.0
    d_loss = loss_fn.discriminator_loss(out, x, step=5)
    d_loss.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())


def test_naive_variant_has_one_codebook_on_the_deep_layer(photos):
    torch.manual_seed(0)
    tok = vistok.create_tokenizer("tiny-dualtoken", variant="naive").train()
    assert list(tok.codebooks) == ["semantic"] and tok.pixel_layer == tok.semantic_layer == 5
    out = tok(photos[:2])
    norms = block_grads(tok, out.reconstruction.square().mean())
    assert all(n > 0 for n in norms[:5]) and norms[5] == 0
    tok.eval()
    enc = tok.encode(photos[:2])
    assert set(enc.ids) == {"semantic"}
    assert tok.decode(ids=enc.ids).shape == (2, 3, 64, 64)
    assert tok.embed(enc.ids).shape == (2, 64, 8)


def test_save_and_load_round_trip(tiny, photos, tmp_path):
    tiny.eval()
    tiny.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["model_args"]["siglip_weights"] is None
    back = vistok.load_tokenizer(tmp_path / "tok")
    assert isinstance(back, DualTokenTokenizer)
    a, b = tiny.encode(photos[:2]), back.encode(photos[:2])
    assert torch.equal(a.ids["pixel"], b.ids["pixel"]) and torch.equal(a.ids["semantic"], b.ids["semantic"])
    torch.testing.assert_close(a.pooled, b.pooled)


@pytest.mark.parametrize("name,grid,depth", [("dualtoken-so400m-384", (27, 27), 8),
                                              ("dualtoken-siglip-l16-256", (16, 16), 4),
                                              ("dualtoken-siglip2-so400m16-256", (16, 16), 8)])
def test_paper_presets_match_open_clip_key_layout(name, grid, depth):
    """Every key of the open_clip model the preset names is a key of the tower (so a real weights
    file converts strictly), built on the meta device (no memory, no download)."""
    import open_clip

    with torch.device("meta"):
        tok = vistok.create_tokenizer(name)
        ref = open_clip.create_model(vistok.tokenizers.registry.get_preset(name)["args"]["clip_model"], device="meta")
    assert tok.siglip.grid == grid and tok.codebooks["pixel"].depth == depth == tok.codebooks["semantic"].depth
    ours = {k: tuple(v.shape) for k, v in tok.siglip.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs


# an open_clip model config written independently of the tiny-dualtoken preset (same architecture)
TINY_OPEN_CLIP = {
    "embed_dim": 64, "init_logit_bias": -10, "custom_text": True,
    "vision_cfg": {"image_size": 64, "timm_model_name": "vit_tiny_patch8_siglip_64_vistok",
                   "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                 "no_causal_mask": True, "proj_bias": True, "pool_type": "argmax", "norm_kwargs": {"eps": 1e-6}},
}


@pytest.fixture(scope="module")
def open_clip_tiny(tmp_path_factory):
    """A tiny SigLIP-style model built and saved by open_clip itself, with non-trivial weights."""
    import open_clip
    from safetensors.torch import save_file

    from vistok.tokenizers.siglip import register_tiny_trunk

    register_tiny_trunk()
    d = tmp_path_factory.mktemp("openclip")
    (d / "tiny-sl-test.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(d / "tiny-sl-test.json")
    torch.manual_seed(1)
    model = open_clip.create_model("tiny-sl-test")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # move off the init so a wrong mapping shows
    path = d / "open_clip_model.safetensors"
    save_file(model.state_dict(), str(path))
    return model.eval(), path


def test_open_clip_weights_convert_and_teacher_matches_open_clip(open_clip_tiny, photos, tmp_path):
    from click.testing import CliRunner

    from vistok.cli import main

    model, path = open_clip_tiny
    result = CliRunner().invoke(main, ["convert", "siglip", str(path), str(tmp_path / "dt"),
                                       "--preset", "tiny-dualtoken", "--json"])
    assert result.exit_code == 0, result.output
    tok = vistok.load_tokenizer(tmp_path / "dt").eval()  # strict load of the written release
    theirs = model.state_dict()
    for prefix, part in (("", tok.siglip), ("visual.", tok.teacher)):
        for key, value in part.state_dict().items():
            assert torch.equal(value, theirs[prefix + key]), key
    x = photos[:2]
    deep, pooled = tok.teacher_targets(x)
    with torch.no_grad():
        ref = model.visual.trunk.forward_intermediates(x, indices=[tok.semantic_layer - 1], intermediates_only=True,
                                                       output_fmt="NLC")[0]
        torch.testing.assert_close(deep, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled, model.encode_image(x), atol=1e-5, rtol=1e-5)
        texts = ["a photo of a cat", "a rocket"]
        import open_clip

        tokens = open_clip.get_tokenizer("tiny-sl-test")(texts)
        torch.testing.assert_close(tok.encode_text(texts), model.encode_text(tokens, normalize=True))


def test_siglip_weights_with_wrong_architecture_fail_naming_keys(open_clip_tiny, tmp_path):
    from safetensors.torch import save_file

    model, _ = open_clip_tiny
    sd = dict(model.state_dict())
    sd.pop("visual.trunk.attn_pool.latent")
    sd["visual.trunk.extra"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="attn_pool.latent") as info:
        vistok.create_tokenizer("tiny-dualtoken", siglip_weights=str(tmp_path / "bad.safetensors"))
    assert "visual.trunk.extra" in str(info.value)


def test_total_loss_composition_and_adaptive_weight_by_hand(tiny, photos):
    """total = 1 x (5 feat + 1 pooled) + 5 x sum(commit) + 5 x MSE + 1 x LPIPS + w x 0.75 x G, with
    w = clamp(|d MSE / dW| / (|d G / dW| + 1e-4), 0.3, 10) at the decoder's last layer."""
    tiny.train()
    loss_fn = DualTokenLoss(lpips_weight=0.0, gan_start=0)
    x = photos[:2]
    out = tiny(x)
    got = loss_fn(out, x, step=0, last_layer=tiny.decoder.last_layer)
    t = got.terms
    w_layer = tiny.decoder.last_layer
    mse = ((out.reconstruction - x) ** 2).mean()
    g = -loss_fn.discriminator(out.reconstruction).mean()
    grad_mse = torch.autograd.grad(mse, w_layer, retain_graph=True)[0].norm()
    grad_g = torch.autograd.grad(g, w_layer, retain_graph=True)[0].norm()
    w = (grad_mse / (grad_g + 1e-4)).clamp(0.3, 10.0)
    torch.testing.assert_close(t["gan_weight"], w.detach(), rtol=1e-4, atol=1e-6)
    expected = (5 * t["semantic_features"] + t["semantic_pooled"] + 5 * (t["commit_pixel"] + t["commit_semantic"])
                + 5 * t["pixel"] + w * 0.75 * t["gan"])
    torch.testing.assert_close(got.total.detach(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t["pixel"], mse.detach())
    d = loss_fn.discriminator_loss(out, x, step=0)
    real, fake = loss_fn.discriminator(x), loss_fn.discriminator(out.reconstruction.detach())
    hand = 0.75 * 0.5 * (torch.nn.functional.leaky_relu(1 - real).mean() + torch.nn.functional.leaky_relu(1 + fake).mean())
    torch.testing.assert_close(d, hand)


def test_paper_scale_training_refuses_a_random_teacher(tmp_path):
    from vistok.train.config import load_config
    from vistok.train.objectives import DualTokenObjective

    with pytest.raises(ValueError, match="model.init"):
        DualTokenObjective.check_run(load_config("dualtoken-so400m-384"))
    # model.init must be a release directory (its config.json is checked when the config is loaded)
    (tmp_path / "config.json").write_text(json.dumps(vistok.create_tokenizer("tiny-dualtoken").release_config()))
    DualTokenObjective.check_run(load_config("dualtoken-so400m-384", [f"model.init={tmp_path}"]))
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_config("dualtoken-so400m-384", ["model.init=/some/dir"])
