"""`vistok.bench_recon`, `bench_compare`, `bench_zeroshot`, `bench_retrieval`, `bench_codebook`: the functions
behind `vistok bench ...`, one per benchmark. Each takes what the command takes (a model spec or a built
tokenizer, a data spec, the options as keywords) and returns the result dict that `--json` prints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..tokenizers.registry import HF_HUB_PREFIX, resolve_device, resolve_dtype, resolve_tokenizer
from .codebook import bench_codebook as _codebook
from .data import resolve_images
from .metrics import build_metrics, parse_metric_list
from .recon import bench_compare as _compare, bench_recon as _recon
from .retrieval import bench_retrieval as _retrieval
from .zeroshot import OPEN_CLIP_PREFIX, VistokImageText, bench_zeroshot as _zeroshot, load_open_clip

logger = logging.getLogger(__name__)
Model = Union[str, torch.nn.Module]


def _device(device: Union[str, torch.device, None]) -> torch.device:
    return resolve_device("auto" if device is None else device)


def _tokenizer(model: Model, device: str, dtype: str = "fp32"):
    """A spec (preset, release directory, hf-hub:...) loaded on `device` in `dtype` (fp32, bf16, fp16), presets'
    random weights drawn from seed 0 so repeated runs agree (with a logged warning); or a built tokenizer, moved
    to `device` (its dtype kept unless `dtype` is given), in eval mode."""
    if isinstance(model, torch.nn.Module):
        return model.to(device=_device(device), dtype=resolve_dtype(dtype)).eval()
    if not isinstance(model, str):
        raise ValueError(f"model must be a preset name, a release directory, hf-hub:ORG/NAME or a tokenizer, got "
                         f"{type(model).__name__}")
    dev = _device(device)
    torch.manual_seed(0)
    tok = resolve_tokenizer(model)
    if not model.startswith(HF_HUB_PREFIX) and not Path(model).exists():
        logger.warning("%s is a preset with random weights (pass a release directory for trained weights)", model)
    return tok.to(device=dev, dtype=resolve_dtype(dtype or "fp32")).eval()


def _name(model: Model) -> str:
    return model if isinstance(model, str) else type(model).__name__


def _metric_list(metrics: Union[str, Sequence[str]]) -> str:
    return metrics if isinstance(metrics, str) else ",".join(metrics)


def _build_metrics(metrics, fid_name: str, device: str, fid_resize, inception, lpips_net, lpips_weights):
    built, errors = build_metrics(parse_metric_list(_metric_list(metrics)), fid_name=fid_name, inception=inception,
                                  fid_resize=fid_resize, lpips_net=lpips_net, lpips_weights=lpips_weights,
                                  device=device)
    if not built:  # every requested metric failed: nothing to run
        raise FileNotFoundError(next(iter(errors.values())))
    return built, errors


def _image_text_model(model: Model, device: str, dtype: Optional[str]):
    if isinstance(model, str) and model.startswith(OPEN_CLIP_PREFIX):
        if dtype not in (None, "fp32"):
            raise ValueError(f"dtype {dtype!r} applies to vistok models; the open_clip baseline runs in fp32")
        return load_open_clip(model, str(_device(device)))
    return VistokImageText(_tokenizer(model, device, dtype), _name(model))


def bench_recon(model: Model, data: str, *, metrics: Union[str, Sequence[str]] = "rfid,psnr,ssim,lpips",
                resolution: Optional[int] = None, save_recon: Optional[str] = None, limit: Optional[int] = None,
                batch_size: int = 16, device: str = "auto", dtype: Optional[str] = None, workers: int = 0,
                fid_resize: str = "clean", inception: Optional[str] = None, lpips_net: str = "vgg", lpips_weights: Optional[str] = None,
                progress: bool = True) -> dict:
    """Reconstruct every image of `data` with `model` and score it against the preprocessed original
    (`vistok bench recon`, docs/bench.md).

    model: a preset name (random weights, seed 0), release directory, hf-hub:ORG/NAME, or a built tokenizer.
    device: "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N"; dtype: "fp32" (a spec's default),
    "bf16", "fp16", or None (a built tokenizer keeps its own). The other benchmarks take the same two.
    data: a directory (recursive), a text file of image paths, or builtin:photos.
    metrics: "rfid,psnr,ssim,lpips" or a list of names. Returns {"rfid", "psnr" (dB), "ssim" ([0, 1]),
    "lpips", ... each per image then the mean (None if that metric failed: see "errors"), "images",
    "skipped", "skipped_files", "settings", "model", "data", "limit"}. Raises ValueError on bad options or
    data, FileNotFoundError when no requested metric can be built (e.g. LPIPS or Inception weights absent).
    """
    device = str(_device(device))
    images = resolve_images(data, limit=limit)
    tok = _tokenizer(model, device, dtype)
    built, errors = _build_metrics(metrics, "rfid", device, fid_resize, inception, lpips_net, lpips_weights)
    result = _recon(tok, images, built, errors=errors, resolution=resolution, batch_size=batch_size, device=device,
                 workers=workers, save_recon=save_recon, progress="recon" if progress else None)
    return {**result.to_dict(), "model": _name(model), "data": data, "limit": limit}


def bench_compare(reference: str, test: str, *, metrics: Union[str, Sequence[str]] = "fid,psnr,ssim,lpips",
                  limit: Optional[int] = None, batch_size: int = 16, device: str = "auto", workers: int = 0,
                  fid_resize: str = "clean", inception: Optional[str] = None, lpips_net: str = "vgg",
                  lpips_weights: Optional[str] = None, progress: bool = True) -> dict:
    """Score the images of directory `test` against those of `reference`, paired by file name without extension
    (`vistok bench compare`). Returns the dict of `bench_recon` with "reference" and "test" instead of
    "model" and "data"."""
    device = str(_device(device))
    images, others = resolve_images(reference), resolve_images(test)
    built, errors = _build_metrics(metrics, "fid", device, fid_resize, inception, lpips_net, lpips_weights)
    result = _compare(images, others, built, errors=errors, limit=limit, batch_size=batch_size, device=device,
                 workers=workers, progress="compare" if progress else None)
    return {**result.to_dict(), "reference": reference, "test": test, "limit": limit}


def bench_zeroshot(model: Model, data: str, *, classnames: str = "imagenet", templates: str = "openai",
                   limit: Optional[int] = None, batch_size: int = 64, device: str = "auto",
                   dtype: Optional[str] = None, workers: int = 0, progress: bool = True) -> dict:
    """Zero-shot top-1/top-5 of `model` on the ImageFolder tree `data` (`vistok bench zeroshot`).

    model: a vistok tokenizer with a text tower (spec or built), or "open_clip:ARCH@WEIGHTS_FILE".
    classnames: "imagenet", "folders" or a text file; templates: "openai", "simple" or a text file.
    Returns {"top1", "top5" (fractions in [0, 1]), "classes", "images", "skipped", "settings", "model", "data",
    "limit", ...}. Raises ValueError for a model without a text tower or image embedding.
    """
    device = str(_device(device))
    embedder = _image_text_model(model, device, dtype)
    result = _zeroshot(embedder, data, classnames=classnames, templates=templates, limit=limit, batch_size=batch_size,
                 workers=workers, device=device, progress="zeroshot" if progress else None)
    return {**result.to_dict(), "model": _name(model), "data": data, "limit": limit}


def bench_retrieval(model: Model, data: str, captions: str, *, limit: Optional[int] = None, batch_size: int = 64,
                    device: str = "auto", dtype: Optional[str] = None, workers: int = 0,
                    progress: bool = True) -> dict:
    """Image->text and text->image recall@1/5/10 of `model` on the captioned images in `data`
    (`vistok bench retrieval`). captions: .jsonl ({"image": path, "captions": [...]}) or .csv (image,caption)
    with image paths relative to `data`. Returns {"i2t_r1", ..., "t2i_r10" (fractions), "images", "captions",
    "skipped", "settings", "model", "data", "limit", ...}."""
    device = str(_device(device))
    embedder = _image_text_model(model, device, dtype)
    result = _retrieval(embedder, data, captions, limit=limit, batch_size=batch_size, workers=workers, device=device,
                 progress="retrieval" if progress else None)
    return {**result.to_dict(), "model": _name(model), "data": data, "limit": limit}


def bench_codebook(model: Model, data: str, *, limit: Optional[int] = None, batch_size: int = 16,
                   device: str = "auto", dtype: Optional[str] = None, workers: int = 0,
                   progress: bool = True) -> dict:
    """Per codebook and depth: usage, perplexity and dead codes of `model`'s ids on `data`
    (`vistok bench codebook`). Returns {"codebooks": [{"codebook", "depth", "size", "used", "usage",
    "perplexity", "dead", "tokens"}, ...], "images", "skipped", "settings", "model", "data", "limit", ...}.
    Raises ValueError for a continuous tokenizer (no codebooks)."""
    device = str(_device(device))
    images = resolve_images(data, limit=limit)
    tok = _tokenizer(model, device, dtype)
    if not tok.codebooks:
        raise ValueError(f"{_name(model)} has no discrete codebooks (continuous tokens): bench codebook needs a "
                         "discrete tokenizer")
    result = _codebook(tok, images, batch_size=batch_size, workers=workers, device=device,
                 progress="codebook" if progress else None)
    return {**result.to_dict(), "model": _name(model), "data": data, "limit": limit}
