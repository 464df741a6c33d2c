"""TokLIP's objective (`DistillSimpleClipLoss`): symmetric softmax InfoNCE with a learnable logit
scale, over the negatives of every DDP rank, plus 1000 x MSE between the L2-normalised pooled
embeddings of the student and the frozen SigLIP teacher.

Across ranks the features are all-gathered without gradient and the local slice is put back with
its gradient (open_clip's default: each rank's loss back-propagates into its own features, and DDP
averages), so every rank scores its images against all texts of the global batch.
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
    all_image, offset = gather_with_local_grad(image)
    all_text, _ = gather_with_local_grad(text)
    scale = logit_scale.exp()
    logits_image = scale * image @ all_text.T  # local images vs every text
    logits_text = scale * text @ all_image.T
    labels = torch.arange(image.shape[0], device=image.device) + offset
    return (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2


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
