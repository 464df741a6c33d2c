"""Zero-shot classification (open_clip's protocol) and the image-text models the semantic benchmarks use.

MODEL is a vistok tokenizer with a text tower (image embedding = `encode(x).pooled`, text
embedding = `encode_text`), or a plain open_clip model as a baseline row:
- `open_clip:ARCH@FILE`: open_clip's architecture ARCH with weights from a local FILE. The image
  preprocessing is the one open_clip records for ARCH's pretrained tags (append `#TAG` when its
  tags disagree, e.g. `open_clip:ViT-L-14@/w/openai.bin#openai`); an architecture without tags
  keeps open_clip's defaults.
- `open_clip:local-dir:DIR`: open_clip's local folder format (open_clip_config.json with
  model_cfg and preprocess_cfg, weights, and for HF-tokenizer models the tokenizer files).

Classifier: for every class, each template is filled in, the texts are embedded and L2-normalised,
averaged over templates and re-normalised (open_clip's build_zero_shot_classifier). An image is
classified by the largest cosine similarity; top-1 / top-5 are the fraction of images whose class is
among the 1 / 5 best.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..progress import progress_bar
from .data import ImageSet, Preprocessed, Skipped, image_folder, iter_batches, load_item

OPEN_CLIP_PREFIX = "open_clip:"


# ------------------------------------------------------------------------------------------ models
class ImageTextModel:
    """Images and texts -> L2-normalised embeddings in one space."""

    name = ""
    transform: Callable  # an ImageItem -> (3, H, W) model input (picklable, for loader workers)

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> L2-normalised image embeddings (B, E)."""
        raise NotImplementedError

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> L2-normalised text embeddings (N, E) in the images' space."""
        raise NotImplementedError

    def settings(self) -> dict:
        """The model and embedding rules, for the result's `settings`."""
        return {"model": self.name}


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


class _OpenCLIPTransform:
    def __init__(self, preprocess):
        self.preprocess = preprocess

    def __call__(self, item) -> torch.Tensor:
        return self.preprocess(load_item(item))


class VistokImageText(ImageTextModel):
    """A vistok tokenizer: `encode(x).pooled` for images, `encode_text` for texts."""

    def __init__(self, tok, name: str = ""):
        self.tok, self.name = tok, name or type(tok).__name__
        self.transform = Preprocessed(tok.preprocess_config)

    def embed_images(self, pixels):
        """`encode(x).pooled`, L2-normalised (B, E); ValueError for a model without a pooled embedding."""
        pooled = self.tok.encode(self.tok.validate_pixels(pixels)).pooled
        if pooled is None:
            raise ValueError(f"{self.name} has no CLIP-space image embedding (encode(...).pooled is None): the "
                             "semantic benchmarks need a tokenizer with a text tower (DualToken, TokLIP) or "
                             "open_clip:ARCH@WEIGHTS")
        return _normalise(pooled)

    def embed_texts(self, texts):
        """`encode_text(texts)`, L2-normalised (N, E); ValueError for a model without a text tower."""
        try:
            return _normalise(self.tok.encode_text(list(texts)))
        except NotImplementedError as exc:
            raise ValueError(f"{self.name}: {exc}; the semantic benchmarks need a text tower") from None

    def settings(self) -> dict:
        """The model, embedding rules and preprocessing, for the result's `settings`."""
        return {"model": self.name, "image_embedding": "encode(x).pooled, L2-normalised",
                "text_embedding": "encode_text, L2-normalised", "preprocess": self.tok.preprocess_config.to_dict()}


class OpenCLIPImageText(ImageTextModel):
    """A plain open_clip model with its own validation preprocessing and tokenizer."""

    def __init__(self, model, preprocess, tokenizer, name: str, preprocess_cfg: dict):
        self.model, self.preprocess, self.tokenizer, self.name = model.eval(), preprocess, tokenizer, name
        self.preprocess_cfg, self.transform = preprocess_cfg, _OpenCLIPTransform(preprocess)

    def embed_images(self, pixels):
        """open_clip's `encode_image(normalize=True)`: (B, E)."""
        return _normalise(self.model.encode_image(pixels, normalize=True))

    def embed_texts(self, texts):
        """open_clip's `encode_text(normalize=True)` of the tokenized texts: (N, E)."""
        device = next(self.model.parameters()).device
        return _normalise(self.model.encode_text(self.tokenizer(list(texts)).to(device), normalize=True))

    def settings(self) -> dict:
        """The model, embedding rules and preprocessing, for the result's `settings`."""
        return {"model": self.name, "image_embedding": "open_clip encode_image(normalize=True)",
                "text_embedding": "open_clip encode_text(normalize=True)", "preprocess": self.preprocess_cfg}


def _tag_preprocess(arch: str, tag: Optional[str]) -> dict:
    """mean/std/interpolation/resize_mode that open_clip records for ARCH's pretrained tags."""
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    keys = ("mean", "std", "interpolation", "resize_mode")
    tags = list_pretrained_tags_by_model(arch)
    if tag is not None and tag not in tags:
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {arch}; its tags: {', '.join(tags) or 'none'}")
    found = {}
    for t in [tag] if tag else tags:
        cfg = get_pretrained_cfg(arch, t)
        found.setdefault(tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in keys), t)
    if len(found) > 1:
        raise ValueError(f"{arch}'s pretrained tags preprocess differently ({', '.join(found.values())}); append "
                         f"#TAG to the weights to say which one the file is, e.g. open_clip:{arch}@FILE#{tags[0]}")
    return dict(next(iter(found))) if found else {}


def load_open_clip(spec: str, device: str = "cpu") -> OpenCLIPImageText:
    """`open_clip:ARCH@FILE[#TAG]` or `open_clip:local-dir:DIR` -> model, never downloading weights."""
    import open_clip

    body = spec[len(OPEN_CLIP_PREFIX):]
    if body.startswith("local-dir:"):
        name, kwargs = body, {}
        if not Path(body[len("local-dir:"):]).is_dir():
            raise FileNotFoundError(f"{spec}: no such open_clip model directory")
    else:
        arch, sep, weights = body.partition("@")
        if not sep or not arch or not weights:
            raise ValueError(f"expected open_clip:ARCH@WEIGHTS_FILE (or open_clip:local-dir:DIR), got {spec!r}")
        weights, _, tag = weights.partition("#")
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{spec}: weights file not found: {weights} (open_clip weights must be a local "
                                    "file here; nothing is downloaded)")
        if open_clip.get_model_config(arch) is None:
            raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
        pp = _tag_preprocess(arch, tag or None)
        name, kwargs = arch, {"pretrained": weights, "image_mean": pp.get("mean"), "image_std": pp.get("std"),
                              "image_interpolation": pp.get("interpolation"),
                              "image_resize_mode": pp.get("resize_mode")}
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, **kwargs)
    except RuntimeError as exc:
        raise ValueError(f"{spec}: open_clip could not build the model: {str(exc).splitlines()[0]}") from None
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # HF tokenizers need files from the hub
        raise OSError(f"{spec}: open_clip's text tokenizer is not available offline ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); use "
                      "open_clip:local-dir:DIR with the tokenizer files in DIR") from None
    return OpenCLIPImageText(model, preprocess, tokenizer, spec, dict(model.visual.preprocess_cfg))


def embed_image_set(model: ImageTextModel, images: ImageSet, *, batch_size: int = 64, workers: int = 0,
                    device: str = "cpu", progress: Optional[str] = None) -> tuple[torch.Tensor, list]:
    """(N, E) normalised embeddings of the readable images, and those images' items."""
    chunks, kept = [], []
    for batch in iter_batches(images.items, model.transform, skipped=images.skipped, batch_size=batch_size,
                              workers=workers, progress=progress):
        chunks.append(model.embed_images(torch.stack(batch.values).to(device)).cpu())
        kept.extend(batch.items)
    if not chunks:
        raise ValueError(f"none of the {len(images)} images in {images.spec} could be read")
    return torch.cat(chunks), kept


# ------------------------------------------------------------------------------------------ zero-shot
def resolve_classnames(spec: str, folders: Sequence[str]) -> list[str]:
    """`imagenet` (open_clip's 1000 names, folders = sorted synsets), `folders` (the folder names) or a
    text file with one name per line, in sorted folder order."""
    if spec == "imagenet":
        from open_clip import IMAGENET_CLASSNAMES

        if len(folders) != len(IMAGENET_CLASSNAMES):
            raise ValueError(f"--classnames imagenet needs the {len(IMAGENET_CLASSNAMES)} ImageNet class folders "
                             f"(sorted synsets, as in ImageNet val), found {len(folders)}; pass --classnames "
                             "folders or a file of names for other data")
        return list(IMAGENET_CLASSNAMES)
    if spec == "folders":
        return [f.replace("_", " ") for f in folders]
    names = [line.strip() for line in _read_text(spec, "--classnames").splitlines() if line.strip()]
    if len(names) != len(folders):
        raise ValueError(f"{spec} lists {len(names)} class names but DATA has {len(folders)} class folders; "
                         "give one name per line, in sorted folder order")
    return names


def resolve_templates(spec: str) -> list:
    """`openai` (80), `simple` (7) or a text file with one template per line containing {}."""
    if spec in ("openai", "simple"):
        from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES if spec == "openai" else SIMPLE_IMAGENET_TEMPLATES)
    templates = [line.strip() for line in _read_text(spec, "--templates").splitlines() if line.strip()]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"{spec}: every template line must contain {{}} for the class name"
                         + (f" (e.g. not {bad[0]!r})" if bad else " (the file is empty)"))
    return templates


def _read_text(path: str, option: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{option} {path}: no such file (use a built-in name or a text file)")
    return Path(path).read_text()


def _fill(template, classname: str) -> str:
    return template.format(classname) if isinstance(template, str) else template(classname)


@torch.no_grad()
def zero_shot_classifier(model: ImageTextModel, classnames: Sequence[str], templates: Sequence,
                         *, texts_per_batch: int = 256, progress: Optional[str] = None) -> torch.Tensor:
    """(E, C): per class, the mean of the normalised template embeddings, re-normalised."""
    per_batch = max(1, texts_per_batch // len(templates))
    columns = []
    with progress_bar(total=len(classnames), desc=progress, unit="class", enabled=progress is not None) as bar:
        for start in range(0, len(classnames), per_batch):
            chunk = classnames[start:start + per_batch]
            emb = model.embed_texts([_fill(t, c) for c in chunk for t in templates])
            columns.append(_normalise(emb.reshape(len(chunk), len(templates), -1).mean(1)).T.cpu())
            bar.update(len(chunk))
    return torch.cat(columns, 1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k largest logits (k capped at the class count)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {k: float(hits[:, :k].any(1).float().mean()) for k in ks}


@dataclass
class ZeroShotResult:
    """What `bench_zeroshot` returns: top-1 / top-5 accuracy, counts, predictions, skipped inputs, the protocol."""

    top1: float
    top5: float
    images: int
    classes: int
    predictions: list[int] = field(repr=False)  # top-1 class index per scored image
    skipped: list[Skipped] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The result as JSON types (what `--json` writes)."""
        return {"command": "zeroshot", "top1": self.top1, "top5": self.top5, "images": self.images,
                "classes": self.classes, "skipped": len(self.skipped),
                "skipped_files": [asdict(s) for s in self.skipped], "settings": self.settings}


@torch.inference_mode()
def bench_zeroshot(model: ImageTextModel, root: str, *, classnames: str = "imagenet", templates: str = "openai",
                   limit: Optional[int] = None, batch_size: int = 64, workers: int = 0, device: str = "cpu",
                   progress: Optional[str] = None) -> ZeroShotResult:
    """Zero-shot classification of an ImageFolder-style `root`: one classifier row per class (the mean of
    its prompt embeddings, `templates` x `classnames`), top-1 / top-5 accuracy of cosine similarity."""
    folders, images = image_folder(root, limit=limit)
    names, prompts = resolve_classnames(classnames, folders), resolve_templates(templates)
    classifier = zero_shot_classifier(model, names, prompts, texts_per_batch=batch_size * 4,
                                      progress=progress and f"{progress} classifier")
    features, kept = embed_image_set(model, images, batch_size=batch_size, workers=workers, device=device,
                                     progress=progress)
    logits = features @ classifier
    labels = torch.tensor([item.label for item in kept])
    acc = topk_accuracy(logits, labels)
    settings = {**model.settings(), "data": str(root), "classnames": classnames, "templates": templates,
                "num_templates": len(prompts), "classifier": "mean of L2-normalised template embeddings, "
                "re-normalised (open_clip build_zero_shot_classifier)", "score": "cosine similarity",
                "top5_k": min(5, len(names)), "limit": limit}
    return ZeroShotResult(acc[1], acc[5], len(kept), len(names), logits.argmax(1).tolist(), images.skipped, settings)
