"""DualToken's semantic loss: keep the quantized deep features and the pooled embedding close to
the frozen initial tower's, by MSE minus cosine similarity.

Official recipe: 5 x (MSE - cos) on the layer-26 features + 1 x (MSE - cos) on the pooled output.
The paper writes a single `-cos + L2` on the final-layer feature (`pooled_weight` only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def mse_minus_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE over all elements minus the mean cosine similarity over the last (channel) dimension."""
    with torch.autocast(student.device.type, enabled=False):  # fp32 even under bf16 autocast
        student, teacher = student.float(), teacher.float()
        return F.mse_loss(student, teacher) - F.cosine_similarity(student, teacher, dim=-1).mean()


@dataclass
class SemanticLossOutput:
    """0-dim tensors of `semantic_loss`: the weighted total and its two unweighted parts."""

    total: torch.Tensor
    features: torch.Tensor  # unweighted (MSE - cos) on the deep features
    pooled: torch.Tensor  # unweighted (MSE - cos) on the pooled embedding


def semantic_loss(features: torch.Tensor, teacher_features: torch.Tensor, pooled: torch.Tensor,
                  teacher_pooled: torch.Tensor, *, feature_weight: float = 5.0,
                  pooled_weight: float = 1.0) -> SemanticLossOutput:
    """feature_weight x (MSE - cos)(features, teacher_features) + pooled_weight x (MSE - cos)(pooled,
    teacher_pooled), in fp32, with no gradient into the teacher's tensors (DualToken's `train.py`).

    features, teacher_features: (B, N, width); pooled, teacher_pooled: (B, E); the cosine is over the
    last dimension. Shapes must match pairwise (torch raises otherwise).
    """
    feat = mse_minus_cosine(features, teacher_features.detach())
    pool = mse_minus_cosine(pooled, teacher_pooled.detach())
    return SemanticLossOutput(feature_weight * feat + pooled_weight * pool, feat, pool)
