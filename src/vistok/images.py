"""Image files <-> model pixels: loading with clear errors, the config's preprocessing, uint8 output."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
_CROPS = ("center", "adm", "none")


@dataclass
class PreprocessConfig:
    """How raw images become model input; stored in every tokenizer's config.

    The model input is always RGB float in [-1, 1] (the API contract). `mean`/`std` are the
    normalisation the network applies to [0, 1] pixels internally (0.5/0.5 is the identity on
    [-1, 1] input); they are recorded so that exporters and baselines can reproduce it.

    crop: "center" is torchvision's `Resize(image_size)` + `CenterCrop(image_size)`, as open_clip
    composes its eval transform (TokLIP, DualToken): the long side truncated, crop offsets rounded;
    "adm" is the ADM `center_crop_arr` used by MAR and LlamaGen (box-downsample by 2 while the short
    side is at least twice the target, then bicubic resize with rounded sides and a floored center
    crop); "none" keeps the native size (it must then fit the model's stride).
    """

    image_size: int = 256
    crop: str = "center"
    interpolation: str = "bicubic"
    mean: Sequence[float] = field(default=(0.5, 0.5, 0.5))
    std: Sequence[float] = field(default=(0.5, 0.5, 0.5))
    min_image_size: int = 16

    def __post_init__(self):
        if self.crop not in _CROPS:
            raise ValueError(f"preprocess.crop must be one of {_CROPS}, got {self.crop!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"preprocess.interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)

    @classmethod
    def from_any(cls, value: "PreprocessConfig | dict | None", **defaults) -> "PreprocessConfig":
        """A config from a PreprocessConfig, a dict or None over `defaults`; ValueError naming unknown keys."""
        if isinstance(value, cls):
            return value
        merged = dict(defaults)
        merged.update(value or {})
        unknown = set(merged) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown preprocess keys: {sorted(unknown)}")
        return cls(**merged)

    def to_dict(self) -> dict:
        """The config as JSON types (mean and std as lists): what config.json stores."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


_HIGH_BIT_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb8(img: Image.Image, name: str = "image") -> Image.Image:
    """Any mode PIL opens -> 8-bit RGB, the way the pixels were meant.

    The EXIF orientation is applied (phone photos come out upright). 16-bit images (modes I;16*, and
    mode I with values in [0, 65535]) are scaled by 255/65535 and rounded, as an 8-bit export of them
    would be; float images (mode F) must hold values in [0, 1] and are scaled by 255. Every other mode
    goes through PIL's own conversion (palette, 1-bit, L, LA, RGBA (alpha dropped), CMYK, YCbCr, LAB,
    HSV). Raises ValueError naming `name` for values that have no 8-bit meaning (negative or above
    65535 in mode I, NaN or outside [0, 1] in mode F) or a mode PIL cannot convert.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in _HIGH_BIT_INT_MODES:
        arr = np.asarray(img).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"{name}: 32-bit integer image with values in [{arr.min()}, {arr.max()}]; vistok reads "
                             "integer images as 16-bit [0, 65535]: convert it to 8- or 16-bit first")
        return _gray_or_rgb(np.rint(arr * (255 / 65535)).astype(np.uint8))
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            lo, hi = (float(np.nanmin(arr)), float(np.nanmax(arr))) if np.isfinite(arr).any() else (np.nan, np.nan)
            raise ValueError(f"{name}: float image with values in [{lo:.4g}, {hi:.4g}]"
                             f"{' and NaN/Inf' if not np.isfinite(arr).all() else ''}; vistok reads float images "
                             "as [0, 1]")
        return _gray_or_rgb(np.rint(arr * 255).astype(np.uint8))
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"{name}: cannot convert PIL mode {img.mode!r} to RGB ({exc})") from None


def _gray_or_rgb(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr).convert("RGB")


def open_image(fp, name: str) -> Image.Image:
    """Open a path or binary file object and decode it with `to_rgb8`; unreadable data, and images over
    PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`), raise ValueError naming `name`."""
    try:
        with Image.open(fp) as img:
            img.load()
            return to_rgb8(img, name)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"cannot read image {name}: {exc} (over PIL's pixel limit PIL.Image.MAX_IMAGE_PIXELS="
                         f"{Image.MAX_IMAGE_PIXELS}; raise it to read larger images)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith(f"{name}:"):
            raise
        raise ValueError(f"cannot read image {name}: {exc}") from exc


def load_image(source: ImageLike) -> Image.Image:
    """Open an image as 8-bit RGB (see `to_rgb8`): a path, a PIL image (any mode) or an HxW / HxWx3|4
    uint8 array. A missing file raises FileNotFoundError, anything else unusable ValueError, with the
    path or the problem in the message."""
    if isinstance(source, Image.Image):
        return to_rgb8(source, "image")
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"expected an HxWx3 array, got shape {tuple(source.shape)}")
        if arr.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array, got {arr.dtype}")
        return Image.fromarray(arr[..., :3])
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"cannot read an image from {'None' if source is None else type(source).__name__}: "
                         "expected a file path, a PIL image or an HxWx3 uint8 array")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    return open_image(path, str(path))


def shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's `Resize(size)` (an int: the shorter edge becomes `size`,
    the longer one `int(size * long / short)`, truncated, as torchvision's
    `_compute_resized_output_size` computes it)."""
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def resize_shortest_edge(img: Image.Image, size: int, resample) -> Image.Image:
    """torchvision `Resize(size, interpolation)` on a PIL image (PIL does the resampling there too)."""
    return img.resize(shortest_edge_size(*img.size, size), resample=resample)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """torchvision `CenterCrop(size)`'s (left, top, right, bottom): offsets `int(round((L - size) / 2))`,
    Python's round (half to even), so 87 spare rows start the crop at row 44."""
    if width < size or height < size:
        raise ValueError(f"cannot center-crop {size}x{size} from a {width}x{height} image")
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision `CenterCrop(size)` on a PIL image at least `size` on each side."""
    return img.crop(center_crop_box(*img.size, size))


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM's `center_crop_arr` (guided-diffusion; copied by LlamaGen `dataset/augmentation.py` and MAR
    `util/crop.py`): BOX halvings while the short side is at least 2 x size, bicubic resize with the
    scaled sides rounded, then a crop at offsets `(L - size) // 2` (floored)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def preprocess_image(img: Image.Image, cfg: PreprocessConfig, name: str = "image") -> Image.Image:
    """Resize and crop one PIL image as `cfg` says (center: open_clip's eval transform; adm: ADM's
    center_crop_arr; none: as is). Raises ValueError naming `name` when its shorter side is below
    `cfg.min_image_size`."""
    if min(img.size) < cfg.min_image_size:
        raise ValueError(
            f"{name} is too small: {img.size[0]}x{img.size[1]} pixels, the shorter side must be at "
            f"least {cfg.min_image_size}"
        )
    if cfg.crop == "adm":
        return adm_center_crop(img, cfg.image_size)
    if cfg.crop == "center":  # open_clip's eval transform: Resize(int) + CenterCrop
        img = resize_shortest_edge(img, cfg.image_size, _INTERPOLATIONS[cfg.interpolation])
        return center_crop(img, cfg.image_size)
    return img


def pil_to_pixels(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (..., 3, H, W) -> uint8 by rounding (the benchmark convention)."""
    return ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pixels_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) or (3, H, W) in [-1, 1] -> list of PIL images."""
    if pixels.ndim == 3:
        pixels = pixels[None]
    arr = to_uint8(pixels).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def list_image_files(paths: Iterable[ImageLike]) -> list[Path]:
    """Expand directories (sorted, recursive) into image files; keep files as given."""
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in exts and q.is_file()))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"image not found: {p}")
    return out
