"""Codebook usage of a discrete tokenizer on DATA: per codebook and depth, how many codes are used.

For the ids of one codebook at one depth over all images and positions, with counts n_k of code k
(K codes) and N = sum n_k:
- usage: fraction of the K codes used at least once;
- perplexity: exp(-sum p_k ln p_k) with p_k = n_k / N (K when all codes are equally used, 1 when one is);
- dead: codes never used (K - used).
A codebook shared by all depths also gets an "all" row over every depth together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .data import ImageSet, Preprocessed, Skipped, iter_batches


@dataclass
class CodebookUsage:
    """One row of `bench codebook`: usage of one codebook at one depth (or "all" depths of a shared one)."""

    codebook: str
    depth: str  # "0", "1", ... or "all"
    size: int
    used: int
    usage: float
    perplexity: float
    dead: int
    tokens: int


def usage_from_counts(codebook: str, depth: str, counts: torch.Tensor) -> CodebookUsage:
    """A usage row from per-code counts (size,): codes used, usage = used / size, perplexity = exp(entropy
    of the empirical code distribution) (0 for no tokens), dead = never-used codes, tokens counted."""
    counts = counts.double()
    total = counts.sum()
    p = counts[counts > 0] / total
    used = int((counts > 0).sum())
    perplexity = float(torch.exp(-(p * p.log()).sum())) if total > 0 else 0.0
    return CodebookUsage(codebook, depth, counts.numel(), used, used / counts.numel(), perplexity,
                         counts.numel() - used, int(total))


class CodeCounter:
    """Accumulates code counts per codebook and depth from `encode(...).ids`."""

    def __init__(self, codebooks: dict):
        if not codebooks:
            raise ValueError("the model has no discrete codebooks (continuous tokens): nothing to count")
        self.specs = codebooks
        self.counts = {name: torch.zeros(spec.depth, spec.size, dtype=torch.long) for name, spec in codebooks.items()}

    def update(self, ids: dict[str, torch.Tensor]) -> None:
        """Add the ids {name: (B, h, w, depth)} of one batch; ValueError for other codebooks, shapes or ids
        out of range."""
        if ids is None or set(ids) != set(self.specs):
            raise ValueError(f"encode returned ids for {sorted(ids or {})}, expected codebooks {sorted(self.specs)}")
        for name, tensor in ids.items():
            spec = self.specs[name]
            if tensor.ndim != 4 or tensor.shape[-1] != spec.depth:
                raise ValueError(f"ids[{name!r}] has shape {tuple(tensor.shape)}, expected (B, h, w, {spec.depth})")
            flat = tensor.reshape(-1, spec.depth).long().cpu()
            if flat.numel() and (flat.min() < 0 or flat.max() >= spec.size):
                raise ValueError(f"ids[{name!r}] out of range [0, {spec.size}): {int(flat.min())}..{int(flat.max())}")
            for d in range(spec.depth):
                self.counts[name][d] += torch.bincount(flat[:, d], minlength=spec.size)

    def results(self) -> list[CodebookUsage]:
        """A row per codebook and depth (plus "all" for a shared codebook with several depths)."""
        rows = []
        for name, counts in self.counts.items():
            rows += [usage_from_counts(name, str(d), counts[d]) for d in range(counts.shape[0])]
            if self.specs[name].shared and counts.shape[0] > 1:
                rows.append(usage_from_counts(name, "all", counts.sum(0)))
        return rows


@dataclass
class CodebookResult:
    """What `bench_codebook` returns: the usage rows, the images counted, the ones skipped, the protocol."""

    rows: list[CodebookUsage]
    images: int
    skipped: list[Skipped] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The result as JSON types (what `--json` writes)."""
        return {"command": "codebook", "codebooks": [asdict(r) for r in self.rows], "images": self.images,
                "skipped": len(self.skipped), "skipped_files": [asdict(s) for s in self.skipped],
                "settings": self.settings}


@torch.inference_mode()
def bench_codebook(tok, images: ImageSet, *, batch_size: int = 16, workers: int = 0, device: str = "cpu",
                   progress: Optional[str] = None) -> CodebookResult:
    """Encode every image of `images` with `tok` (its own preprocessing) and count its ids: usage,
    perplexity and dead codes per codebook and depth. ValueError for a model without codebooks."""
    counter = CodeCounter(tok.codebooks)
    count = 0
    for batch in iter_batches(images.items, Preprocessed(tok.preprocess_config), skipped=images.skipped,
                              batch_size=batch_size, workers=workers, progress=progress):
        counter.update(tok.encode(tok.validate_pixels(torch.stack(batch.values).to(device))).ids)
        count += len(batch.items)
    settings = {"data": images.spec, "preprocess": tok.preprocess_config.to_dict(),
                "perplexity": "exp(entropy) with natural log of the code frequencies",
                "codebooks": {name: asdict(spec) for name, spec in tok.codebooks.items()}}
    return CodebookResult(counter.results(), count, images.skipped, settings)
