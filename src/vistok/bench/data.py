"""The DATA argument of the benchmarks, and loading it in batches.

DATA is one of:
- a directory: every image file below it (recursive), sorted by relative path;
- a text file listing image paths, one per line (relative paths are relative to the list file;
  blank lines and lines starting with `#` are ignored), in the order given;
- `builtin:photos` (or another `builtin:` name): the held-out scikit-image photo crops.

An image that cannot be read (corrupt, truncated, too small) is skipped and recorded in
`ImageSet.skipped`, so a benchmark reports how many images it actually scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..builtin import resolve_builtin
from ..images import list_image_files, load_image, pil_to_pixels, preprocess_image
from ..progress import progress_bar

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class ImageItem:
    """One image of DATA: `name` identifies it in outputs (relative path, list entry or crop name)."""

    name: str
    source: Any  # a Path or a PIL image
    label: Optional[int] = None  # class index, for ImageFolder trees


@dataclass
class Skipped:
    """An input left out of a benchmark, and why (unreadable, too small, ...)."""

    name: str
    reason: str


@dataclass
class ImageSet:
    """A benchmark's images (`spec` names where they came from) and the ones skipped while loading."""

    spec: str
    items: list[ImageItem]
    skipped: list[Skipped] = field(default_factory=list)  # filled while the images are loaded

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Batch:
    """One batch of items and what the transform gave for each."""

    items: list[ImageItem]
    values: list  # what the transform returned for each item


def resolve_images(spec: str, *, limit: Optional[int] = None) -> ImageSet:
    """DATA -> the images in a fixed order, truncated to the first `limit`."""
    items = builtin_items(spec) if spec.startswith(BUILTIN_PREFIX) else _path_items(Path(spec))
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be at least 1, got {limit}")
        items = items[:limit]
    if not items:
        raise ValueError(f"no image files found in {spec}")
    return ImageSet(spec, items)


def image_folder(root: str | Path, *, limit: Optional[int] = None) -> tuple[list[str], ImageSet]:
    """An ImageFolder tree (one subfolder per class, sorted) -> (class folder names, labelled images).

    With `limit`, images are taken round-robin over the classes (first image of every class, then
    the second, ...), so a limited run still covers every class.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DATA must be an ImageFolder directory (one subfolder per class): {root} "
                                "is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class subfolders: zero-shot DATA must be an ImageFolder tree "
                         "(e.g. ImageNet val as val/n01440764/*.JPEG)")
    per_class = [[ImageItem(p.relative_to(root).as_posix(), p, label)
                  for p in list_image_files([root / name])] for label, name in enumerate(classes)]
    items = [item for group in per_class for item in group]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be at least 1, got {limit}")
        longest = max(len(g) for g in per_class)
        items = [g[i] for i in range(longest) for g in per_class if i < len(g)][:limit]
    if not items:
        raise ValueError(f"no image files found in the class folders of {root}")
    return classes, ImageSet(str(root), items)


def builtin_items(spec: str) -> list[ImageItem]:
    """The images of a `builtin:photos...` spec as ImageItems."""
    return [ImageItem(name, image) for name, image in resolve_builtin(spec)]


def _path_items(path: Path) -> list[ImageItem]:
    if path.is_dir():
        return [ImageItem(p.relative_to(path).as_posix(), p) for p in list_image_files([path])]
    if not path.exists():
        raise FileNotFoundError(f"DATA not found: {path} (expected a directory, a text file of image paths, "
                                f"or builtin:photos)")
    return read_file_list(path)


def read_file_list(path: Path) -> list[ImageItem]:
    """A text file with one image path per line; every listed file must exist."""
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file: DATA must be a directory, a text file listing image "
                         "paths, or builtin:photos") from None
    items = []
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        file = Path(entry) if Path(entry).is_absolute() else path.parent / entry
        if not file.is_file():
            raise FileNotFoundError(f"{path}:{number}: listed image not found: {file}")
        items.append(ImageItem(entry, file))
    return items


def image_name_stem(name: str) -> str:
    """The name without its extension (the key that pairs images across folders)."""
    path = Path(name)
    return path.with_suffix("").as_posix() if path.suffix else name


def output_name(name: str) -> str:
    """A relative path, without extension, to save an image under: absolute list entries lose their
    root and `..` parts are dropped, so outputs always stay inside the output directory."""
    parts = [p for p in Path(image_name_stem(name)).parts if p not in ("..", ".") and p != Path(p).anchor]
    return "/".join(parts) or "image"


def pair_by_name(reference: ImageSet, test: ImageSet) -> list[tuple[ImageItem, ImageItem]]:
    """Pair two image sets by relative path without extension (a.JPEG pairs with a.png)."""
    ref, tst = _by_stem(reference), _by_stem(test)
    only_ref, only_test = sorted(set(ref) - set(tst)), sorted(set(tst) - set(ref))
    if only_ref or only_test:
        parts = []
        if only_ref:
            parts.append(f"{len(only_ref)} only in {reference.spec}: {_few(only_ref)}")
        if only_test:
            parts.append(f"{len(only_test)} only in {test.spec}: {_few(only_test)}")
        raise ValueError("images are paired by file name (without extension) but some have no partner: "
                         + "; ".join(parts))
    return [(ref[key], tst[key]) for key in sorted(ref)]


def _by_stem(images: ImageSet) -> dict[str, ImageItem]:
    out: dict[str, ImageItem] = {}
    for item in images.items:
        key = image_name_stem(item.name)
        if key in out:
            raise ValueError(f"{images.spec}: {out[key].name} and {item.name} have the same name without "
                             "extension, so they cannot be paired; rename one")
        out[key] = item
    return out


def _few(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def load_item(item: ImageItem) -> Image.Image:
    """The PIL image of an item (a path or an image already in memory); raises ValueError if unreadable."""
    source = item.source
    return load_image(source)


class Preprocessed:
    """Picklable transform: item -> the preprocessing `cfg` applied, as a (3, H, W) tensor: uint8, or
    float in [-1, 1] (the tokenizer input)."""

    def __init__(self, cfg, *, uint8: bool = False):
        self.cfg, self.uint8 = cfg, uint8

    def __call__(self, item: ImageItem) -> torch.Tensor:
        image = preprocess_image(load_item(item), self.cfg, name=item.name)
        if not self.uint8:
            return pil_to_pixels(image)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class _Loading:
    """Map-style dataset: item -> (item, transformed value or None, error or None)."""

    def __init__(self, items: Sequence, transform: Callable):
        self.items, self.transform = list(items), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        try:
            return item, self.transform(item), None
        except (ValueError, OSError) as exc:  # unreadable, truncated or too small: skip and count
            return item, None, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _as_list(batch):
    return batch


def iter_batches(items: Sequence, transform: Callable, *, skipped: list, batch_size: int = 16, workers: int = 0,
                 progress: Optional[str] = None) -> Iterator[Batch]:
    """Apply `transform` to every item (in `workers` processes when > 0) and yield batches in order.

    Items whose transform raises ValueError/OSError are appended to `skipped` as `Skipped` and left
    out of the batches. `progress` is the label of a progress bar on stderr (None: no bar).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    loader = torch.utils.data.DataLoader(_Loading(items, transform), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=_as_list)
    with progress_bar(total=len(items), desc=progress, unit="img",
                      enabled=progress is not None and len(items) >= 2) as bar:
        for rows in loader:
            good = [(item, value) for item, value, error in rows if error is None]
            for item, _, error in rows:
                if error is not None:
                    skipped.append(Skipped(_item_name(item), error))
            if good:
                yield Batch([g[0] for g in good], [g[1] for g in good])
            bar.update(len(rows))  # after the caller has processed the batch


def _item_name(item) -> str:
    if isinstance(item, tuple):  # a (reference, test) pair
        return " / ".join(_item_name(i) for i in item)
    return item.name
