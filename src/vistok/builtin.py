"""Built-in real photos for the quickstart, tests and smoke benchmarks (no download).

scikit-image ships a handful of public-domain / CC0 photographs inside its wheel. They are cut
into square crops: the `train` split comes from six photos, the `heldout` split from two other
photos (a cat and a coffee cup), so held-out scores measure images the model never saw.

`builtin:photos` in a DATA argument means the held-out split; `builtin:photos-train` the
training split.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

TRAIN_PHOTOS = ("astronaut", "rocket", "stereo_motorcycle", "hubble_deep_field", "immunohistochemistry", "retina")
HELDOUT_PHOTOS = ("chelsea", "coffee")
SPLITS = {"train": TRAIN_PHOTOS, "heldout": HELDOUT_PHOTOS}
# one caption per photo, for image-text training (TokLIP) and retrieval smoke tests
CAPTIONS = {
    "astronaut": "a portrait of an astronaut in a space suit",
    "rocket": "a rocket on its launch pad",
    "stereo_motorcycle": "a motorcycle parked in a garage",
    "hubble_deep_field": "galaxies in the deep sky",
    "immunohistochemistry": "a stained tissue sample under a microscope",
    "retina": "a photograph of a human retina",
    "chelsea": "a photo of a cat",
    "coffee": "a cup of coffee on a saucer",
}
DATA_NAMES = {"builtin:photos": "heldout", "builtin:photos-heldout": "heldout", "builtin:photos-train": "train"}


def _photo(name: str) -> np.ndarray:
    try:
        from skimage import data
    except ImportError as e:  # pragma: no cover - scikit-image is a dependency
        raise ImportError("the built-in photos need scikit-image: pip install scikit-image") from e
    image = getattr(data, name)()
    if name == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity)
    return np.ascontiguousarray(image[..., :3])


def _square_crops(image: np.ndarray, scales: tuple[float, ...]) -> list[tuple[int, int, int]]:
    """(top, left, side) of square crops: per scale, a grid with half-side stride covering the photo."""
    height, width = image.shape[:2]
    boxes = []
    for scale in scales:
        side = int(min(height, width) * scale)
        stride = max(side // 2, 1)
        tops = range(0, height - side + 1, stride)
        lefts = range(0, width - side + 1, stride)
        boxes += [(top, left, side) for top in tops for left in lefts]
    return boxes


@lru_cache(maxsize=4)
def _crops(split: str, scales: tuple[float, ...]) -> tuple[tuple[str, np.ndarray], ...]:
    out = []
    for name in SPLITS[split]:
        image = _photo(name)
        for top, left, side in _square_crops(image, scales):
            crop = image[top : top + side, left : left + side]
            out.append((f"{name}_{top}_{left}_{side}", crop))
    return tuple(out)


def photo_of(crop_name: str) -> str:
    """The photo a built-in crop (named `<photo>_<top>_<left>_<side>`) was cut from, e.g. "chelsea"."""
    return crop_name.rsplit("_", 3)[0]


def caption_of(crop_name: str) -> str:
    """The caption of a built-in crop (named `<photo>_<top>_<left>_<side>`)."""
    return CAPTIONS[photo_of(crop_name)]


def builtin_photos(split: str = "heldout", *, scales: tuple[float, ...] = (1.0, 0.5)) -> list[tuple[str, Image.Image]]:
    """Named square RGB crops of the built-in photos: [(name, PIL image), ...] in a fixed order.

    Each crop is at native resolution (at least 150 px); the model's preprocessing resizes it.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown built-in photo split {split!r}; choose from {sorted(SPLITS)}")
    return [(name, Image.fromarray(arr)) for name, arr in _crops(split, tuple(scales))]


def resolve_builtin(spec: str) -> list[tuple[str, Image.Image]]:
    """`builtin:photos[-train|-heldout]` -> named crops; anything else starting with builtin: is an error."""
    if spec not in DATA_NAMES:
        raise ValueError(f"unknown built-in data {spec!r}; choose from {sorted(DATA_NAMES)}")
    return builtin_photos(DATA_NAMES[spec])
