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

from .dualtoken import LossOutput


def gather_with_local_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(global batch, offset of this rank's rows); identity without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    rank = dist.get_rank()
    parts[rank] = x
    return torch.cat(parts), rank * x.shape[0]


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised features; logit_scale is the log of the temperature's inverse."""
    all_image, _ = gather_with_local_grad(image)
    all_text, _ = gather_with_local_grad(text)
    logits = logit_scale.exp() * all_image @ all_text.T  # the global batch, on every rank
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class TokLIPLoss(nn.Module):
    def __init__(self, *, clip_weight: float = 1.0, distill_weight: float = 1000.0):
        super().__init__()
        self.clip_weight, self.distill_weight = clip_weight, distill_weight

    def forward(self, model, out, text_features: torch.Tensor, *, step: int) -> LossOutput:
        with torch.autocast(out.pooled.device.type, enabled=False):
            image = F.normalize(out.pooled.float(), dim=-1)
            text = F.normalize(text_features.float(), dim=-1)
            clip = clip_loss(image, text, model.siglip.logit_scale.float())
            distill = image.new_zeros(())
            if self.distill_weight:
                if out.teacher_pooled is None:
                    raise ValueError("the distillation loss needs the teacher: run the model with with_teacher=True")
                teacher = F.normalize(out.teacher_pooled.float(), dim=-1)
                distill = F.mse_loss(image, teacher.detach())
        total = self.clip_weight * clip + self.distill_weight * distill
        terms = {"clip": clip, "distill": distill, "logit_scale": model.siglip.logit_scale.exp()}
        return LossOutput(total, {k: v.detach().float() for k, v in terms.items()})
