"""Training data: image folders, JSONL/CSV image(-text) lists, webdataset shards, built-in photos.

Map-style sources are read through a resumable sampler that yields (epoch, position, index) keys:
each rank takes a disjoint slice of a per-epoch permutation, and every sample's augmentation draws
from a generator seeded by (seed, epoch, index). The data position is therefore two integers, and a
resumed run sees exactly the batches an uninterrupted one would, whatever the worker count.

A corrupt or unreadable image is replaced by the next readable one in list order (index + 1, ...),
counted and reported to the trainer, never fatal.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from PIL import Image

from ..builtin import caption_of, photo_of, resolve_builtin
from ..images import ImageLike, PreprocessConfig, _INTERPOLATIONS, list_image_files, load_image, open_image, pil_to_pixels

MAX_REPLACEMENTS = 16


@dataclass
class Item:
    image: ImageLike  # path or PIL image
    caption: Optional[str] = None
    name: str = ""


def read_items(source: str) -> list[Item]:
    """A directory (recursive), a .jsonl ({"image": path, "caption"|"text": str}) or .csv (image,caption
    columns) list with paths relative to the list file, or `builtin:photos[-train|-heldout]`."""
    if source.startswith("builtin:"):
        return [Item(img, caption_of(name), name) for name, img in resolve_builtin(source)]
    path = Path(source)
    if path.is_dir():
        return [Item(str(p), None, str(p)) for p in list_image_files([path])]
    if not path.is_file():
        raise FileNotFoundError(f"training data not found: {source}")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{source}:{n}: invalid JSON: {exc}") from None
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise ValueError(f"unsupported data source {source}: expected a directory, .jsonl, .csv, .tar shards or builtin:")
    items = []
    for n, row in enumerate(rows, 1):
        image = row.get("image") or row.get("path") or row.get("file")
        if not image:
            raise ValueError(f"{source}: row {n} has no 'image' field")
        full = image if os.path.isabs(image) else str(path.parent / image)
        caption = row.get("caption") or row.get("text")
        if caption is None and isinstance(row.get("captions"), list) and row["captions"]:
            caption = row["captions"][0]  # a retrieval-style list: train on its first caption
        items.append(Item(full, caption, full))
    if not items:
        raise ValueError(f"{source} lists no images")
    return items


def item_group(item: Item) -> str:
    """What an item was taken from: a built-in crop's photo, otherwise the image file's folder."""
    if item.name and not isinstance(item.image, (str, os.PathLike)):  # built-in crops are PIL images
        return photo_of(item.name)
    return str(Path(item.name).parent)


def spread_indices(groups: Sequence[str], k: int) -> list[int]:
    """Up to k indices spread over the groups (photos, folders): the k places are dealt round-robin over the
    groups in order of first appearance, and each group's places are evenly spaced within it."""
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    lists = list(members.values())
    counts, turn = [0] * len(lists), 0
    while sum(counts) < min(k, len(groups)):
        if counts[turn] < len(lists[turn]):
            counts[turn] += 1
        turn = (turn + 1) % len(lists)
    return sorted(lst[(2 * q + 1) * len(lst) // (2 * c)] for lst, c in zip(lists, counts) for q in range(c))


def is_webdataset(source: str) -> bool:
    return source.endswith(".tar") or ("{" in source and ".tar" in source)


def check_data(cfg, world: int = 1) -> None:
    """Preconditions of the data, checked before a model is built: the sources exist, and webdataset
    shards are at least as many as the (process, worker) readers that each take a share of them."""
    d = cfg.data
    for key, source in (("data.source", d.source), ("data.eval_source", d.eval_source)):
        if source is None:
            continue
        if is_webdataset(source):
            if key == "data.eval_source":
                raise ValueError(f"{key} {source}: webdataset shards are for training; give a directory, list or builtin:")
            check_shards(source, world, d.workers)
        else:
            read_items(source)


def check_shards(urls: str, world: int, workers: int) -> list[str]:
    """The expanded shard list; ValueError unless every (process, worker) pair gets at least one shard."""
    from braceexpand import braceexpand

    shards = [s for part in urls.split("::") for s in braceexpand(part)]
    local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
    missing = [s for s in local if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"data.source: {len(missing)} of {len(shards)} shard(s) not found, e.g. {missing[0]}")
    readers = world * max(1, workers)
    if len(shards) < readers:
        raise ValueError(f"data.source has {len(shards)} shard(s) but {world} process(es) x {max(1, workers)} "
                         f"data.workers = {readers} readers, each of which needs a shard of its own: set "
                         f"data.workers to at most {max(1, len(shards) // world) if len(shards) >= world else 0} "
                         "or split the data into more shards")
    return shards


# ---------------------------------------------------------------------------------------- augmentation
def random_resized_crop(image: Image.Image, size: int, scale: Sequence[float], interpolation: str,
                        generator: torch.Generator, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop drawn from `generator` (10 tries, then a centre crop)."""
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(u[2] * (width - w + 1)), int(u[3] * (height - h + 1))
            break
    else:
        w = h = min(width, height)
        left, top = (width - w) // 2, (height - h) // 2
    return image.resize((size, size), _INTERPOLATIONS[interpolation], box=(left, top, left + w, top + h))


class Augment:
    def __init__(self, preprocess: PreprocessConfig, crop_scale: Sequence[float] = (0.9, 1.0), hflip: bool = False):
        self.cfg, self.crop_scale, self.hflip = preprocess, tuple(crop_scale), hflip

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        if min(image.size) < self.cfg.min_image_size:
            raise ValueError(f"image of {image.size[0]}x{image.size[1]} px is below min_image_size {self.cfg.min_image_size}")
        out = random_resized_crop(image, self.cfg.image_size, self.crop_scale, self.cfg.interpolation, generator)
        if self.hflip and torch.rand((), generator=generator) < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_pixels(out)


# ---------------------------------------------------------------------------------------- map-style
def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    # reduced to torch's 64-bit seed range (unchanged below it): from train.seed ~18447 up the product
    # overflowed and manual_seed raised "Overflow when unpacking long long" at the first batch
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2**64)


class ImageDataset(torch.utils.data.Dataset):
    """Keys (epoch, position, index) -> dict(pixels, caption, key, skipped names)."""

    def __init__(self, items: list[Item], augment: Augment, seed: int):
        self.items, self.augment, self.seed = items, augment, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        epoch, position, index = key
        skipped = []
        for attempt in range(MAX_REPLACEMENTS):
            item = self.items[(index + attempt) % len(self.items)]
            try:
                image = load_image(item.image)
                pixels = self.augment(image, sample_generator(self.seed, epoch, index))
                return {"pixels": pixels, "caption": item.caption or "", "key": key, "skipped": skipped}
            except (OSError, ValueError) as exc:
                skipped.append(f"{item.name}: {exc}")
        raise RuntimeError(f"{MAX_REPLACEMENTS} consecutive unreadable images from index {index}: {skipped[-3:]}")


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Batches of (epoch, position, index) keys: per epoch a seeded permutation, rank r takes
    positions r, r + world, ... (an equal share; the remainder is dropped), starting at `start`."""

    def __init__(self, size: int, batch_size: int, *, seed: int, rank: int = 0, world: int = 1,
                 start: tuple[int, int] = (0, 0), shuffle: bool = True):
        if size < world:
            raise ValueError(f"{size} training images cannot be split over {world} processes")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world, self.start, self.shuffle = rank, world, tuple(start), shuffle
        self.per_rank = size // world

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch, position = self.start
        batch = []
        while True:
            order = self._order(epoch)
            for pos in range(position, self.per_rank):
                batch.append((epoch, pos, order[self.rank + pos * self.world]))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            epoch, position = epoch + 1, 0

    def __len__(self) -> int:  # an endless stream; DataLoader only needs this for its own bookkeeping
        return 1 << 62


def collate(samples: list[dict]) -> dict:
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "keys": [s["key"] for s in samples],
        "skipped": [name for s in samples for name in s["skipped"]],
    }


def next_position(batch: dict, per_rank: int) -> tuple[int, int]:
    """The data position after this batch (where a resumed run starts)."""
    epoch, position, _ = batch["keys"][-1]
    return (epoch + 1, 0) if position + 1 >= per_rank else (epoch, position + 1)


# ---------------------------------------------------------------------------------------- webdataset
def sample_caption(sample: dict) -> str:
    """A webdataset sample's caption: its `.txt` member, else the "caption" (img2dataset) or "txt" field of its
    `.json` member, else "". ValueError if the `.json` member is not a JSON object."""
    if isinstance(sample.get("txt"), bytes):
        return sample["txt"].decode("utf-8", "replace")
    if not isinstance(sample.get("json"), bytes):
        return ""
    try:
        meta = json.loads(sample["json"])
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise ValueError(f"unreadable .json member: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f".json member is a {type(meta).__name__}, not an object")
    caption = next((meta[k] for k in ("caption", "txt") if isinstance(meta.get(k), str)), "")
    return caption


class WebDatasetStream(torch.utils.data.IterableDataset):
    """Image(-text) samples from tar shards (jpg/png/webp + a caption in .txt or .json, see `sample_caption`),
    split by rank and worker, repeated pass after pass. Each pass shuffles the shard order of this
    (rank, worker) within a buffer of `shard_shuffle` shards (0: in the listed order) and the samples
    within `shuffle_buffer`, both seeded by (seed, pass). Resuming skips (without decoding) the samples
    this rank already consumed, counted across passes; exact with workers=0."""

    def __init__(self, urls: str, augment: Augment, *, seed: int, shuffle_buffer: int, shard_shuffle: int = 100,
                 skip: int = 0):
        self.urls, self.augment, self.seed = urls, augment, seed
        self.shuffle_buffer, self.shard_shuffle, self.skip = shuffle_buffer, shard_shuffle, skip
        self.stream = 0

    def _one_pass(self, epoch: int):
        import random

        import webdataset as wds

        # webdataset shuffles the shards after the node/worker split: each reader reorders its own share
        pipeline = wds.WebDataset(self.urls, shardshuffle=self.shard_shuffle if self.shard_shuffle > 1 else False,
                                  seed=self.seed + epoch, nodesplitter=wds.split_by_node,
                                  workersplitter=wds.split_by_worker, empty_check=False)
        if self.shuffle_buffer > 1:
            pipeline = pipeline.shuffle(self.shuffle_buffer, rng=random.Random(self.seed + epoch))
        return pipeline

    def _decode(self, sample: dict, n: int) -> dict:
        import io

        name = sample.get("__key__", "?")
        caption = ""
        try:
            caption = sample_caption(sample)
            image_key = next((k for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            if image_key is None:
                raise ValueError("no image in the sample")
            image = open_image(io.BytesIO(sample[image_key]), f"{name}.{image_key}")
            pixels = self.augment(image, sample_generator(self.seed, self.stream, n))
            return {"pixels": pixels, "caption": caption, "key": (0, n, n), "skipped": []}
        except Exception as exc:  # a corrupt sample is skipped and counted
            return {"pixels": None, "caption": caption, "key": (0, n, n), "skipped": [f"{name}: {exc}"]}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        # batches come round-robin from the workers, so each consumed about 1/workers of the count
        # (exact with workers=0); each (rank, worker) stream has its own augmentation seeds
        skip = self.skip // workers + (1 if worker < self.skip % workers else 0)
        self.stream = rank * 4096 + worker
        n, epoch = 0, 0
        while True:
            produced = False
            for sample in self._one_pass(epoch):
                produced = True
                if n >= skip:
                    yield self._decode(sample, n)
                n += 1
            if not produced:
                raise ValueError(f"no samples in {self.urls} for this rank / worker (fewer shards than processes?)")
            epoch += 1


def collate_stream(samples: list[dict]) -> dict:
    good = [s for s in samples if s["pixels"] is not None]
    out = collate(good) if good else {"pixels": None, "captions": [], "keys": [], "skipped": []}
    out["skipped"] = [name for s in samples for name in s["skipped"]]
    return out
