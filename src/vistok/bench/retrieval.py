"""Image-text retrieval R@K, Flickr/COCO style (CLIP_benchmark's zeroshot_retrieval protocol).

Captions file (`--captions FILE`), either
- JSON Lines (`.jsonl`): one object per image, `{"image": "relative/path.jpg", "captions": ["...", ...]}`
  (a single `"caption": "..."` string is accepted too), or
- CSV (`.csv`) with a header that has `image` and `caption` columns, one row per caption (several
  rows per image; rows of one image need not be adjacent).
Image paths are relative to DATA (a directory), or built-in crop names for `builtin:` DATA. The
images are those of the captions file, in its order of first appearance.

Scores: L2-normalised embeddings, cosine similarity, raw captions (no template).
- text -> image R@K: for each caption, 1 if its image is among the K most similar images; mean over captions.
- image -> text R@K: for each image, 1 if at least one of its captions is among the K most similar
  captions; mean over images.
A tie with the correct item counts in its favour (rank = number of strictly better candidates).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .data import BUILTIN_PREFIX, ImageItem, ImageSet, Skipped, builtin_items
from .zeroshot import ImageTextModel, embed_image_set

KS = (1, 5, 10)


def read_captions(path: str | Path) -> list[tuple[str, list[str]]]:
    """[(image, [captions...]), ...] in order of first appearance."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    rows = _read_jsonl(path) if path.suffix.lower() in (".jsonl", ".json") else _read_csv(path)
    grouped: dict[str, list[str]] = {}
    for image, caption in rows:
        grouped.setdefault(image, []).append(caption)
    if not grouped:
        raise ValueError(f"{path} holds no captions")
    return list(grouped.items())


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from None
        captions = record.get("captions", record.get("caption")) if isinstance(record, dict) else None
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not captions \
                or not all(isinstance(c, str) for c in captions):
            raise ValueError(f'{path}:{number}: expected {{"image": "path", "captions": ["...", ...]}}')
        rows += [(record["image"], c) for c in captions]
    return rows


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a CSV captions file needs a header with 'image' and 'caption' columns "
                             f"(found {reader.fieldnames}); use .jsonl for JSON Lines")
        return [(row["image"], row["caption"]) for row in reader]


def caption_images(data: str, names: Sequence[str]) -> ImageSet:
    """The captioned images, looked up in DATA (a directory, or builtin: crop names)."""
    if data.startswith(BUILTIN_PREFIX):
        available = {item.name: item for item in builtin_items(data)}
        missing = [n for n in names if n not in available]
        items = [available[n] for n in names if n in available]
    else:
        root = Path(data)
        if not root.is_dir():
            raise FileNotFoundError(f"retrieval DATA must be the image directory the captions file refers to: {root}")
        missing = [n for n in names if not (root / n).is_file()]
        items = [ImageItem(n, root / n) for n in names]
    if missing:
        raise FileNotFoundError(f"{len(missing)} captioned image(s) not found in {data}: {', '.join(missing[:5])}")
    return ImageSet(data, items)


def recall_at_k(similarity: torch.Tensor, caption_image: torch.Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """R@K from a (captions, images) similarity matrix; caption_image[t] is caption t's image index."""
    sim = similarity.float()
    n_text, n_image = sim.shape
    caption_image = caption_image.long()
    if caption_image.shape != (n_text,) or caption_image.min() < 0 or caption_image.max() >= n_image:
        raise ValueError(f"caption_image must give an image index in [0, {n_image}) for each of {n_text} captions")
    true = sim[torch.arange(n_text), caption_image]
    t2i_rank = (sim > true[:, None]).sum(1)
    positive = caption_image[:, None] == torch.arange(n_image)[None]
    best = sim.masked_fill(~positive, float("-inf")).max(0).values  # best caption score per image
    i2t_rank = (sim > best[None]).sum(0)
    if not positive.any(0).all():
        raise ValueError("every image needs at least one caption")
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).float().mean())
    for k in ks:
        out[f"t2i_r{k}"] = float((t2i_rank < k).float().mean())
    return out


@dataclass
class RetrievalResult:
    """What `bench_retrieval` returns: recall@k both ways, the counts, the skipped inputs, the protocol."""

    recalls: dict[str, float]
    images: int
    captions: int
    skipped: list[Skipped] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The result as JSON types (what `--json` writes)."""
        return {"command": "retrieval", **self.recalls, "images": self.images, "captions": self.captions,
                "skipped": len(self.skipped), "skipped_files": [asdict(s) for s in self.skipped],
                "settings": self.settings}


@torch.inference_mode()
def bench_retrieval(model: ImageTextModel, data: str, captions: str, *, limit: Optional[int] = None,
                    batch_size: int = 64, workers: int = 0, device: str = "cpu",
                    progress: Optional[str] = None) -> RetrievalResult:
    """Image-text retrieval on DATA's images and a captions file: recall@1/5/10 for image->text and
    text->image over L2-normalised embeddings (cosine similarity)."""
    entries = read_captions(captions)[:limit]
    images = caption_images(data, [name for name, _ in entries])
    image_emb, kept = embed_image_set(model, images, batch_size=batch_size, workers=workers, device=device,
                                      progress=progress)
    index = {item.name: i for i, item in enumerate(kept)}  # unreadable images drop out with their captions
    texts, owners = [], []
    for name, caps in entries:
        if name in index:
            texts += caps
            owners += [index[name]] * len(caps)
    text_emb = torch.cat([model.embed_texts(texts[i:i + batch_size]).cpu() for i in range(0, len(texts), batch_size)])
    recalls = recall_at_k(text_emb @ image_emb.T, torch.tensor(owners))
    settings = {**model.settings(), "data": data, "captions_file": str(captions), "limit": limit,
                "protocol": "CLIP_benchmark zeroshot_retrieval: cosine similarity, raw captions; i2t hit if any "
                            "caption of the image is in the top K; ties count as hits"}
    return RetrievalResult(recalls, len(kept), len(texts), images.skipped, settings)
