"""One contract over every registered tiny preset (timm-style): a new family gets these checks for free.

create -> encode -> decode -> reconstruct -> embed (families with ids) -> encode_text (families with a
text tower) -> save_pretrained -> load_tokenizer -> exactly the same outputs, with the field shapes
docs/api.md promises (`TokenizerEncoding` table). Also the frozen parts each family declares
(`frozen_modules`) and the encode options `reconstruct` passes on.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import vistok
from vistok.tokenizers import TokenizerEncoding, VisualTokenizer
from vistok.tokenizers.registry import get_preset
from vistok.weights import _TOKENIZER_CLASSES, tokenizer_class

TINY = vistok.list_models("tiny-*")
BATCH = 2


def _class(preset: str) -> type[VisualTokenizer]:
    return tokenizer_class(get_preset(preset)["class"])


def test_every_registered_family_has_a_tiny_preset():
    """The contract below covers the families with a tiny preset: every registered class needs one."""
    missing = set(_TOKENIZER_CLASSES) - {_class(name).__name__ for name in TINY}
    assert len(_TOKENIZER_CLASSES) >= 5 and not missing, f"tokenizer classes without a tiny-* preset: {sorted(missing)}"


def _overrides(cls: type, name: str) -> bool:
    return getattr(cls, name) is not getattr(VisualTokenizer, name)


def _pixels(tok: VisualTokenizer) -> torch.Tensor:
    size = tok.preprocess_config.image_size
    return torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _outputs(tok: VisualTokenizer, pixels: torch.Tensor) -> dict:
    """Everything the public API returns for `pixels`, as name -> tensor."""
    with torch.no_grad():
        enc = tok.encode(pixels)
        out = {f"enc.{f}.{k}": v for f in ("ids", "quantized") for k, v in (getattr(enc, f) or {}).items()}
        out.update({f"enc.{f}": getattr(enc, f) for f in ("features", "pooled", "latents")
                    if getattr(enc, f) is not None})
        if enc.latent_dist is not None:
            out["enc.latent_dist.mean"], out["enc.latent_dist.logvar"] = enc.latent_dist.mean, enc.latent_dist.logvar
        out["decoded"] = tok.decode(latents=enc.latents) if enc.latents is not None else tok.decode(ids=enc.ids)
        out["reconstructed"] = tok.reconstruct(pixels)
        if _overrides(type(tok), "embed"):
            out["embedded"] = tok.embed(enc.ids)
        if _overrides(type(tok), "encode_text"):
            out["text"] = tok.encode_text(["a photo of a cat", "a diagram"])
    return out


def _check_encoding(tok: VisualTokenizer, enc: TokenizerEncoding, pixels: torch.Tensor) -> None:
    """The field shapes of docs/api.md's `TokenizerEncoding` table."""
    b, _, height, width = pixels.shape
    h, w = height // tok.stride, width // tok.stride
    assert enc.grid == (h, w) == tok.grid_for(height, width)
    assert enc.ids is not None or enc.latents is not None, "nothing to decode"
    books = tok.codebooks
    if enc.ids is not None:
        assert set(enc.ids) == set(books)
        for name, ids in enc.ids.items():
            assert ids.dtype == torch.int64 and tuple(ids.shape) == (b, h, w, books[name].depth), name
            assert 0 <= int(ids.min()) and int(ids.max()) < books[name].size, name
        assert enc.quantized is not None and set(enc.quantized) == set(books)
        for name, q in enc.quantized.items():
            assert q.is_floating_point() and tuple(q.shape) == (b, h * w, books[name].dim), name
    else:
        assert books == {} and enc.quantized is None
    if enc.features is not None:  # MAR keeps its buffer slots in front of the image tokens
        assert enc.features.ndim == 3 and enc.features.shape[:2] == (b, getattr(tok, "buffer_size", 0) + h * w)
    if enc.pooled is not None:
        assert enc.pooled.ndim == 2 and enc.pooled.shape[0] == b
    assert (enc.latents is None) == (enc.latent_dist is None) == (tok.scaling_factor is None)
    if enc.latents is not None:
        assert enc.latents.ndim == 4 and enc.latents.shape[0] == b and tuple(enc.latents.shape[-2:]) == (h, w)
        assert torch.equal(enc.latents, tok.scaling_factor * enc.latent_dist.mean)  # default: the posterior mean


@pytest.mark.parametrize("name", TINY)
def test_preset_contract_and_exact_reload(name, tmp_path):
    torch.manual_seed(0)
    tok = vistok.create_tokenizer(name).eval()
    pixels = _pixels(tok)
    with torch.no_grad():
        _check_encoding(tok, tok.encode(pixels), pixels)
    out = _outputs(tok, pixels)

    for key in ("decoded", "reconstructed"):
        assert tuple(out[key].shape) == tuple(pixels.shape) and out[key].dtype == torch.float32, key
        assert -1 <= float(out[key].min()) and float(out[key].max()) <= 1, key
    assert torch.equal(out["reconstructed"], out["decoded"])
    if "embedded" in out:
        assert out["embedded"].ndim == 3 and out["embedded"].shape[:2] == (BATCH, pixels.shape[-1] ** 2 // tok.stride ** 2)
    if "text" in out:  # the CLIP space that `pooled` lives in, L2-normalised
        assert tuple(out["text"].shape) == (2, out["enc.pooled"].shape[-1])
        torch.testing.assert_close(out["text"].norm(dim=-1), torch.ones(2))

    tok.save_pretrained(tmp_path / name)
    again = vistok.load_tokenizer(tmp_path / name)
    assert type(again) is type(tok) and not again.training
    assert again.config == tok.config
    mine, theirs = tok.state_dict(), again.state_dict()
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    reloaded = _outputs(again, pixels)
    assert list(reloaded) == list(out)
    for key in out:
        assert torch.equal(reloaded[key], out[key]), key


@pytest.mark.parametrize("name", TINY)
def test_frozen_parts_stay_frozen(name):
    """Every path a family declares in `frozen_modules` exists in its full tiny preset (a typo would
    otherwise be skipped silently), has no gradient, stays out of the optimiser and stays in eval mode
    through `train()`; everything else trains."""
    tok = vistok.create_tokenizer(name)
    parts = tok._frozen_parts()
    assert len(parts) == len(type(tok).frozen_modules)
    frozen = {id(p) for part in parts for p in ([part] if isinstance(part, torch.nn.Parameter) else part.parameters())}
    assert all(not p.requires_grad for p in tok.parameters() if id(p) in frozen)
    assert {id(p) for p in tok.trainable_parameters()} == {id(p) for p in tok.parameters()} - frozen
    tok.train()
    modules = [p for p in parts if isinstance(p, torch.nn.Module)]
    assert not any(m.training for part in modules for m in part.modules())
    frozen_modules = {id(m) for part in modules for m in part.modules()}
    assert all(m.training for m in tok.modules() if id(m) not in frozen_modules)
    tok.eval()
    assert not any(m.training for m in tok.modules())


@pytest.mark.parametrize("name", [n for n in TINY if "teacher" in _class(n).frozen_modules])
def test_training_without_teacher_names_the_problem(name):
    tok = vistok.create_tokenizer(name, with_teacher=False)
    with pytest.raises(ValueError, match=rf"this {type(tok).__name__} was built with with_teacher=False; training "
                                         "needs the teacher"):
        tok(_pixels(tok))


@pytest.mark.parametrize("name", [n for n in TINY if "sample" in inspect.signature(_class(n).encode).parameters])
def test_reconstruct_passes_encode_options(name):
    """`reconstruct(x, sample=True, generator=g)` decodes scaling_factor x a posterior sample drawn with g."""
    torch.manual_seed(0)
    tok = vistok.create_tokenizer(name).eval()
    pixels = _pixels(tok)
    with torch.no_grad():
        sampled = tok.reconstruct(pixels, sample=True, generator=torch.Generator().manual_seed(5))
        dist = tok.encode(pixels).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
        expected = tok.decode(latents=tok.scaling_factor * z)
        mean = tok.reconstruct(pixels)
    torch.testing.assert_close(sampled, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sampled, mean)


def test_encode_options_are_the_familys_keywords():
    assert vistok.create_tokenizer("tiny-kl").encode_options == ("sample", "generator")
    assert vistok.create_tokenizer("tiny-vqgan").encode_options == ()


def test_cli_sample_refused_by_a_deterministic_family(tmp_path, image_dir):
    from click.testing import CliRunner

    from vistok.cli import main

    res = CliRunner().invoke(main, ["encode", "tiny-vqgan", str(image_dir / "img1.png"), "--out",
                                    str(tmp_path / "ids.safetensors"), "--sample"])
    assert res.exit_code == 1
    assert "--sample: tiny-vqgan (VQGANTokenizer) encodes deterministically" in res.output
    assert not (tmp_path / "ids.safetensors").exists()
