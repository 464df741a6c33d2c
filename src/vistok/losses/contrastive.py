"""TokLIP's objective (`DistillSimpleClipLoss`): symmetric softmax InfoNCE with a learnable logit
scale, over the negatives of every DDP rank, plus 1000 x MSE between the L2-normalised pooled
embeddings of the student and the frozen SigLIP teacher.

Across ranks the features are all-gathered without gradient and the local slice is put back with
its gradient; every rank computes the loss of the whole global similarity matrix (open_clip's
default, `local_loss=False, gather_with_grad=False`, which TokLIP trains with): the loss is the
global batch's, and DDP's averaging gives the global gradient divided by the number of ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .base import LossOutput


def gather_with_local_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x (B, ...) -> (the global batch (world x B, ...), offset of this rank's rows): other ranks' rows
    without gradient, this rank's with it; (x, 0) without an initialised process group. Every rank must
    pass the same shape (all_gather)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    rank = dist.get_rank()
    parts[rank] = x
    return torch.cat(parts), rank * x.shape[0]


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (open_clip's `ClipLoss`) over the global batch.

    image, text: (B, E) L2-normalised features of matching pairs, row i with row i. logit_scale: 0-dim,
    the log of the inverse temperature (the logits are exp(logit_scale) x cosine). Returns a 0-dim
    tensor: the mean of the image->text and text->image cross-entropies.
    """
    all_image, _ = gather_with_local_grad(image)
    all_text, _ = gather_with_local_grad(text)
    logits = logit_scale.exp() * all_image @ all_text.T  # the global batch, on every rank
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class TokLIPLoss(nn.Module):
    """TokLIP's `DistillSimpleClipLoss`: clip_weight x InfoNCE + distill_weight x MSE to the teacher
    (a `TrainingLoss` with no GAN; it holds no parameters: the logit scale is the model's, passed in)."""

    def __init__(self, *, clip_weight: float = 1.0, distill_weight: float = 1000.0):
        super().__init__()
        self.clip_weight, self.distill_weight = clip_weight, distill_weight

    def forward(self, out, text_features: torch.Tensor, *, step: int, logit_scale: torch.Tensor) -> LossOutput:
        """The objective of one batch of image-text pairs, in fp32 (autocast off).

        out: a `TokLIPForward` (pooled (B, E) unnormalised; teacher_pooled (B, E) with distill_weight > 0).
        text_features: (B, E) caption embeddings of the frozen text tower, unnormalised (row i is image
            i's caption). step: the optimiser step (unused; the interface's). logit_scale: 0-dim, the
            model's learnable log inverse temperature (`model.siglip.logit_scale`), as open_clip's
            `ClipLoss(image, text, logit_scale)` takes it.
        Returns a `LossOutput` (terms clip, distill, logit_scale = exp(logit_scale)). Raises ValueError
        without the teacher's embedding when distill_weight > 0.
        """
        with torch.autocast(out.pooled.device.type, enabled=False):
            image = F.normalize(out.pooled.float(), dim=-1)
            text = F.normalize(text_features.float(), dim=-1)
            clip = clip_loss(image, text, logit_scale.float())
            distill = image.new_zeros(())
            if self.distill_weight:
                if out.teacher_pooled is None:
                    raise ValueError("the distillation loss needs the teacher: run the model with with_teacher=True")
                teacher = F.normalize(out.teacher_pooled.float(), dim=-1)
                distill = F.mse_loss(image, teacher.detach())
        total = self.clip_weight * clip + self.distill_weight * distill
        terms = {"clip": clip, "distill": distill, "logit_scale": logit_scale.exp()}
        return LossOutput(total, {k: v.detach().float() for k, v in terms.items()})
