"""The public API contract: factory, release round trip, strict loading, atomic saves, input validation."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vistok
from vistok.images import adm_center_crop
from vistok.tokenizers import CodebookSpec, TokenLayout
from vistok.tokenizers.base import CheckpointMismatchError


def test_list_and_create_with_overrides():
    assert {"mar-kl16", "ldm-kl-f16", "tiny-kl"} <= set(vistok.list_models())
    assert vistok.list_models("tiny-*") == ["tiny-dualtoken", "tiny-dualtoken-s4", "tiny-kl", "tiny-mar", "tiny-toklip",
                                            "tiny-vqgan"]
    tok = vistok.create_tokenizer("tiny-kl", scaling_factor=0.5, preprocess={"image_size": 64})
    assert tok.config["scaling_factor"] == 0.5 and tok.preprocess_config.image_size == 64
    assert tok.preprocess_config.crop == "center"  # merged, not replaced
    with pytest.raises(ValueError, match="did you mean mar-kl16"):
        vistok.create_tokenizer("mar-kl-16")
    with pytest.raises(ValueError, match="bogus"):
        vistok.create_tokenizer("tiny-kl", bogus=1)


def test_save_load_round_trip_is_exact(tmp_path, tiny_kl):
    with torch.no_grad():
        for p in tiny_kl.parameters():
            p.add_(torch.randn_like(p))
    tiny_kl.save_pretrained(tmp_path / "rel")
    cfg = json.loads((tmp_path / "rel" / "config.json").read_text())
    assert cfg["_class_name"] == "KLTokenizer" and cfg["scaling_factor"] == 1.0
    assert cfg["preprocess"]["image_size"] == 32 and cfg["vistok_version"] == vistok.__version__
    loaded = vistok.load_tokenizer(tmp_path / "rel")
    assert loaded.config == tiny_kl.config
    a, b = tiny_kl.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tiny_kl.encode(x).latents, loaded.encode(x).latents)
    from vistok.tokenizers import KLTokenizer

    assert isinstance(KLTokenizer.from_pretrained(tmp_path / "rel"), KLTokenizer)


def test_load_reports_missing_and_unexpected_keys(tmp_path, tiny_kl):
    tiny_kl.save_pretrained(tmp_path / "rel")
    weights = load_file(str(tmp_path / "rel" / "model.safetensors"))
    weights.pop("decoder.conv_out.bias")
    weights["decoder.bonus"] = torch.zeros(2)
    save_file(weights, str(tmp_path / "rel" / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing key\(s\): decoder.conv_out.bias.*unexpected key\(s\): decoder.bonus"):
        vistok.load_tokenizer(tmp_path / "rel")


def test_truncated_weights_and_missing_files_are_clear_errors(tmp_path, tiny_kl):
    tiny_kl.save_pretrained(tmp_path / "rel")
    path = tmp_path / "rel" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot read .*model.safetensors"):
        vistok.load_tokenizer(tmp_path / "rel")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        vistok.load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is a preset: use create_tokenizer"):
        vistok.load_tokenizer("tiny-kl")


def test_crash_mid_save_keeps_previous_release(tmp_path, tiny_kl, monkeypatch):
    tiny_kl.save_pretrained(tmp_path / "rel")
    before = {p.name: p.read_bytes() for p in (tmp_path / "rel").iterdir()}

    def exploding_save(model, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr("vistok.tokenizers.base.save_model", exploding_save)
    with torch.no_grad():
        next(tiny_kl.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        tiny_kl.save_pretrained(tmp_path / "rel")
    after = {p.name: p.read_bytes() for p in (tmp_path / "rel").iterdir()}
    assert after == before  # no temp file left, nothing overwritten
    vistok.load_tokenizer(tmp_path / "rel")


@pytest.mark.parametrize("x,match", [
    (torch.zeros(3, 32, 32), r"shape \(B, 3, H, W\)"),
    (torch.zeros(1, 1, 32, 32), "3 RGB channels"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float pixels"),
    (torch.full((1, 3, 32, 32), 255.0), r"values in \[-1, 1\]"),
    (torch.zeros(1, 3, 30, 32), "multiples of 4"),
    (torch.zeros(1, 3, 2, 2), "multiples of 4"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
    (np.zeros((1, 3, 32, 32), np.float32), "torch.Tensor"),
])
def test_bad_pixels_raise_value_error(tiny_kl, x, match):
    with pytest.raises(ValueError, match=match):
        tiny_kl.encode(x)


def test_bad_latents_raise_value_error(tiny_kl):
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        tiny_kl.decode(latents=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="continuous"):
        tiny_kl.decode(ids={"vq": torch.zeros(1, 8, 8, 1, dtype=torch.long)})
    with pytest.raises(NotImplementedError, match="continuous tokens"):
        tiny_kl.token_layout(32000)


def test_preprocess_paths_pil_and_arrays(tiny_kl, image_dir):
    x = tiny_kl.preprocess(image_dir)  # a directory expands to its images
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    pil = Image.open(image_dir / "img1.png")
    y = tiny_kl.preprocess([pil, np.asarray(pil)])
    assert torch.equal(y[0], y[1]) and torch.equal(y[0], x[1])
    bad = image_dir / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        tiny_kl.preprocess([bad])
    with pytest.raises(ValueError, match="too small: 8x8"):
        tiny_kl.preprocess([Image.new("RGB", (8, 8))])
    with pytest.raises(ValueError, match="straight to tok.encode"):
        tiny_kl.preprocess(torch.zeros(1, 3, 32, 32))


def test_adm_center_crop_matches_adm_reference():
    def center_crop_arr(pil_image, image_size):  # guided-diffusion's function, as in MAR/LlamaGen
        while min(*pil_image.size) >= 2 * image_size:
            pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
        scale = image_size / min(*pil_image.size)
        pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
        arr = np.array(pil_image)
        cy, cx = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
        return arr[cy:cy + image_size, cx:cx + image_size]

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (300, 530, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(adm_center_crop(img, 64)), center_crop_arr(img, 64))


def test_token_layout_round_trip_and_range_check():
    books = {"pixel": CodebookSpec(size=10, depth=2, dim=4, shared=True),
             "semantic": CodebookSpec(size=7, depth=2, dim=4, shared=False)}
    layout = TokenLayout.from_codebooks(books, text_vocab_size=100)
    assert layout.specials == {"<image>": 100, "</image>": 101}
    assert layout.offsets == {("pixel", 0): 102, ("pixel", 1): 102, ("semantic", 0): 112, ("semantic", 1): 119}
    assert layout.vocab_size == 126
    ids = {"pixel": torch.randint(0, 10, (2, 3, 4, 2)), "semantic": torch.randint(0, 7, (2, 3, 4, 2))}
    llm = layout.to_llm_ids(ids)
    assert llm.shape == (2, 3 * 4 * 4) and llm[0, 3].item() == ids["semantic"][0, 0, 0, 1].item() + 119
    back = layout.from_llm_ids(llm, (3, 4))
    assert all(torch.equal(back[k], ids[k]) for k in ids)
    with pytest.raises(ValueError, match="out of range"):
        layout.to_llm_ids({**ids, "semantic": ids["semantic"] + 7})


def test_no_top_level_package_shadows_hf_tokenizers():
    repo = Path(__file__).resolve().parents[1]
    for name in ("tokenizers", "losses", "cli"):
        spec = importlib.util.find_spec(name)
        assert spec is None or repo not in Path(spec.origin or "").parents


def test_config_copies_must_agree_with_model_args(tmp_path, tiny_kl):
    tiny_kl.save_pretrained(tmp_path / "rel")
    path = tmp_path / "rel" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["scaling_factor"] = 0.3  # edited the descriptive copy instead of model_args
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="scaling_factor 0.3 disagrees .* edit model_args"):
        vistok.load_tokenizer(tmp_path / "rel")


def test_release_files_get_normal_permissions(tmp_path, tiny_kl):
    import os

    mask = os.umask(0o022)
    try:
        tiny_kl.save_pretrained(tmp_path / "rel")
    finally:
        os.umask(mask)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "rel" / name).stat().st_mode & 0o777 == 0o644


def test_kl_rejects_non_identity_normalisation():
    with pytest.raises(ValueError, match="mean/std must be 0.5"):
        vistok.create_tokenizer("tiny-kl", preprocess={"mean": [0.485, 0.456, 0.406]})


def test_token_layout_rejects_mismatched_grids():
    books = {"a": CodebookSpec(size=4), "b": CodebookSpec(size=4)}
    layout = TokenLayout.from_codebooks(books, text_vocab_size=10)
    with pytest.raises(ValueError, match="integer tensor"):
        layout.to_llm_ids({"a": torch.ones(1, 2, 2, 1) * 1.5, "b": torch.zeros(1, 2, 2, 1, dtype=torch.long)})
    with pytest.raises(ValueError, match="different"):
        layout.to_llm_ids({"a": torch.zeros(1, 2, 2, 1, dtype=torch.long), "b": torch.zeros(1, 3, 3, 1, dtype=torch.long)})
