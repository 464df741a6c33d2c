"""Reconstruction benchmarks: `bench recon` (a tokenizer's round trip) and `bench compare` (two folders).

recon: every image of DATA is preprocessed with the model's own preprocessing (or at
`resolution`), rounded to uint8 (the "original"), encoded and decoded; the reconstruction is
rounded to uint8 the same way, and both go to the metrics. Saving the reconstructions as PNG and
running `compare` on the originals and those files gives the same numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..images import PreprocessConfig, to_uint8
from .data import ImageSet, Preprocessed, Skipped, iter_batches, load_item, output_name, pair_by_name
from .metrics import UINT8_RULE


@dataclass
class ScoreResult:
    """Metric values (None where a metric failed, with the reason in `errors`) and the protocol used."""

    command: str
    values: dict[str, Optional[float]]
    errors: dict[str, str]
    images: int
    skipped: list[Skipped] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The result as JSON types (what `--json` writes)."""
        return {"command": self.command, **self.values, "images": self.images, "skipped": len(self.skipped),
                "skipped_files": [dataclasses.asdict(s) for s in self.skipped], "errors": self.errors,
                "settings": self.settings}


def recon_preprocess(tok, resolution: Optional[int] = None) -> PreprocessConfig:
    """The tokenizer's preprocessing, or at `resolution` (center crop when it had none); ValueError for a
    resolution below 1."""
    cfg = tok.preprocess_config
    if resolution is None:
        return cfg
    if resolution < 1:
        raise ValueError(f"--resolution must be positive, got {resolution}")
    return dataclasses.replace(cfg, image_size=resolution, crop="center" if cfg.crop == "none" else cfg.crop)


def _stack(values: Sequence[torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    sizes = {tuple(v.shape) for v in values}
    if len(sizes) > 1:
        raise ValueError(f"images have different sizes after preprocessing ({sorted(sizes)}, e.g. {names[0]}); "
                         "pass --resolution to resize and center-crop them")
    return torch.stack(list(values))


def _save_pngs(images: torch.Tensor, names: Sequence[str], directory: Path) -> None:
    from PIL import Image

    for image, name in zip(images.permute(0, 2, 3, 1).cpu().numpy(), names):
        path = directory / f"{output_name(name)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)


def _check_output_names(images: ImageSet) -> None:
    seen: dict[str, str] = {}
    for item in images.items:
        stem = output_name(item.name)
        if stem in seen:
            raise ValueError(f"{seen[stem]} and {item.name} would both be saved as {stem}.png; rename one")
        seen[stem] = item.name


def _finish(command: str, metrics: list, errors: dict, images: int, skipped: list, settings: dict) -> ScoreResult:
    values: dict[str, Optional[float]] = {}
    for metric in metrics:
        try:
            values[metric.name] = metric.value()
        except ValueError as exc:  # e.g. FID of a single image
            errors[metric.name] = str(exc)
        settings[metric.name] = metric.settings()
    for name, message in errors.items():
        values[name] = None
        settings[name] = {"error": message}
    return ScoreResult(command, values, errors, images, skipped, settings)


@torch.inference_mode()
def bench_recon(tok, images: ImageSet, metrics: list, *, errors: Optional[dict] = None,
                resolution: Optional[int] = None, batch_size: int = 16, device: str = "cpu", workers: int = 0,
                save_recon: Optional[str] = None, progress: Optional[str] = None) -> ScoreResult:
    """Reconstruct every image of `images` with `tok` and score it with `metrics` (from build_metrics)."""
    cfg = recon_preprocess(tok, resolution)
    out = Path(save_recon) if save_recon else None
    if out is not None:
        _check_output_names(images)
        out.mkdir(parents=True, exist_ok=True)
    count = 0
    for batch in iter_batches(images.items, Preprocessed(cfg, uint8=True), skipped=images.skipped, batch_size=batch_size,
                              workers=workers, progress=progress):
        names = [item.name for item in batch.items]
        reference = _stack(batch.values, names).to(device)
        pixels = tok.validate_pixels(reference.float() / 127.5 - 1.0)
        test = to_uint8(tok.reconstruct(pixels))
        for metric in metrics:
            metric.update(reference, test)
        if out is not None:
            _save_pngs(test, names, out)
        count += len(names)
    settings = {"data": images.spec, "preprocess": cfg.to_dict(), "uint8": UINT8_RULE,
                "reconstruction": "decode(encode(x)): latents for KL models (posterior mean), ids otherwise",
                "saved_to": str(out) if out else None}
    return _finish("recon", metrics, dict(errors or {}), count, images.skipped, settings)


class _UInt8Pair:
    """Picklable transform: (reference, test) item pair -> two uint8 (3, H, W) tensors at native size."""

    def __call__(self, pair) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.from_numpy(np.array(load_item(i), dtype=np.uint8)).permute(2, 0, 1).contiguous()
                     for i in pair)


@torch.inference_mode()
def bench_compare(reference: ImageSet, test: ImageSet, metrics: list, *, errors: Optional[dict] = None,
                  limit: Optional[int] = None, batch_size: int = 16, device: str = "cpu", workers: int = 0,
                  progress: Optional[str] = None) -> ScoreResult:
    """Score the images of `test` against their namesakes in `reference` (native sizes, no resizing)."""
    pairs = pair_by_name(reference, test)[:limit]
    paired_metrics = [m for m in metrics if m.name in ("psnr", "ssim", "lpips")]
    skipped: list[Skipped] = []
    count = 0
    for batch in iter_batches(pairs, _UInt8Pair(), skipped=skipped, batch_size=batch_size, workers=workers,
                              progress=progress):
        groups: dict[tuple, list] = {}
        for (ref_item, test_item), (ref, tst) in zip(batch.items, batch.values):
            if paired_metrics and ref.shape != tst.shape:
                raise ValueError(f"{ref_item.name} is {ref.shape[2]}x{ref.shape[1]} but {test_item.name} is "
                                 f"{tst.shape[2]}x{tst.shape[1]}: PSNR/SSIM/LPIPS need equal sizes")
            groups.setdefault((ref.shape, tst.shape), []).append((ref, tst))
        for group in groups.values():
            ref = torch.stack([g[0] for g in group]).to(device)
            tst = torch.stack([g[1] for g in group]).to(device)
            for metric in metrics:
                metric.update(ref, tst)
        count += len(batch.items)
    settings = {"reference": reference.spec, "test": test.spec, "pairing": "relative path without extension",
                "resize": "none (native sizes)"}
    return _finish("compare", metrics, dict(errors or {}), count, skipped, settings)
