"""DualToken's training objective, composed from the semantic, reconstruction and commitment terms.

Official stage-1 weights (songweii/DualToken `train.py`):
    L = 1 x L_sem + 5 x (commit_pix + commit_sem) + 5 x MSE + 1 x LPIPS + w_adapt x 0.75 x L_G
with L_sem = 5 (MSE - cos)(features) + 1 (MSE - cos)(pooled), and w_adapt from the unit-weight
(MSE + LPIPS) gradient at the decoder's last layer, clamped to [0.3, 10].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .reconstruction import ReconstructionLoss
from .semantic import semantic_loss


@dataclass
class LossOutput:
    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, detached, for logging

    def check_finite(self, step: int) -> None:
        """Raise naming the step and the first non-finite term (the trainer stops on it)."""
        if torch.isfinite(self.total):
            return
        bad = [k for k, v in self.terms.items() if not torch.isfinite(v).all()]
        raise FloatingPointError(f"non-finite loss at step {step}: total={self.total.item()}"
                                 + (f"; non-finite terms: {bad}" if bad else ""))


class DualTokenLoss(nn.Module):
    def __init__(self, *, semantic_weight: float = 1.0, feature_weight: float = 5.0, pooled_weight: float = 1.0,
                 commitment_weight: float = 5.0, pixel_weight: float = 5.0, lpips_weight: float = 1.0,
                 gan_weight: float = 0.75, gan_start: int = 0, pixel: str = "mse", lpips_net: str = "vgg",
                 lpips_backbone: Optional[str] = None, adaptive_clamp: tuple[float, float] = (0.3, 10.0),
                 d_loss: str = "leaky_hinge", discriminator: Optional[dict] = None, disc_loss_weight: float = 0.75):
        super().__init__()
        self.semantic_weight, self.feature_weight, self.pooled_weight = semantic_weight, feature_weight, pooled_weight
        self.commitment_weight, self.pixel_weight, self.lpips_weight = commitment_weight, pixel_weight, lpips_weight
        self.gan_weight, self.disc_loss_weight = gan_weight, disc_loss_weight
        self.reconstruction = ReconstructionLoss(
            pixel=pixel, lpips_weight=lpips_weight, lpips_net=lpips_net, lpips_backbone=lpips_backbone,
            gan_start=gan_start, gan_weight=gan_weight, adaptive_clamp=adaptive_clamp, d_loss=d_loss,
            discriminator=discriminator)

    @property
    def discriminator(self) -> Optional[nn.Module]:
        return self.reconstruction.discriminator

    def gan_active(self, step: int) -> bool:
        return self.reconstruction.gan_active(step)

    def forward(self, model, out, pixels: torch.Tensor, *, step: int) -> LossOutput:
        """The generator-side objective for a `DualTokenForward` `out` of `model` on `pixels`."""
        terms: dict[str, torch.Tensor] = {}
        total = pixels.new_zeros((), dtype=torch.float32)
        if self.semantic_weight:
            if out.teacher_features is None:
                raise ValueError("the semantic loss needs the teacher's targets: run the model with with_teacher=True")
            sem = semantic_loss(out.semantic_features, out.teacher_features, out.pooled, out.teacher_pooled,
                                feature_weight=self.feature_weight, pooled_weight=self.pooled_weight)
            total = total + self.semantic_weight * sem.total
            terms.update(semantic_features=sem.features, semantic_pooled=sem.pooled)
        commit = sum(out.commitment_loss.values())
        total = total + self.commitment_weight * commit
        terms.update({f"commit_{k}": v for k, v in out.commitment_loss.items()})
        rec = self.reconstruction.generator_terms(out.reconstruction.float(), pixels.float(), step=step,
                                                  last_layer=model.decoder.last_layer)
        total = total + self.pixel_weight * rec.pixel + self.lpips_weight * rec.perceptual
        total = total + rec.adaptive_weight * self.gan_weight * rec.adversarial
        terms.update(pixel=rec.pixel, lpips=rec.perceptual, gan=rec.adversarial, gan_weight=rec.adaptive_weight)
        return LossOutput(total, {k: v.detach().float() for k, v in terms.items()})

    def discriminator_loss(self, out, pixels: torch.Tensor, *, step: int) -> torch.Tensor:
        """The discriminator's loss, scaled by 0.75 as the official code back-propagates it (the code leaves
        it unscaled during its GAN start epoch; vistok scales it throughout)."""
        loss = self.reconstruction.discriminator_step_loss(out.reconstruction.float(), pixels.float(), step=step)
        return self.disc_loss_weight * loss
