"""DualToken's training objective, composed from the semantic, reconstruction and commitment terms.

Official stage-1 weights (songweii/DualToken `train.py`):
    L = 1 x L_sem + 5 x (commit_pix + commit_sem) + 5 x MSE + 1 x LPIPS + w_adapt x 0.75 x L_G
with L_sem = 5 (MSE - cos)(features) + 1 (MSE - cos)(pooled), and w_adapt from the unit-weight
(MSE + LPIPS) gradient at the decoder's last layer, clamped to [0.3, 10].
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import LossOutput, require_last_layer
from .reconstruction import ReconstructionLoss
from .semantic import semantic_loss


class DualTokenLoss(nn.Module):
    """DualToken's stage-1 generator objective and its discriminator's loss (an `AdversarialLoss`).

    Weights as the official `train.py` (module docstring); `pixel` is "mse" or "l1"; `lpips_weight` > 0
    needs LPIPS's VGG weights locally (`lpips_backbone`, see losses/lpips.py); `gan_weight` 0 builds no
    discriminator. `discriminator` is `PatchDiscriminator` keyword arguments. Raises ValueError for an
    unknown `d_loss` (and, at the first call, an unknown `pixel`).
    """

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
        """The PatchGAN discriminator, or None with gan_weight 0."""
        return self.reconstruction.discriminator

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms count at `step` (from `gan_start` on, with a discriminator)."""
        return self.reconstruction.gan_active(step)

    def forward(self, out, pixels: torch.Tensor, *, step: int,
                last_layer: Optional[torch.Tensor] = None) -> LossOutput:
        """The generator-side objective.

        out: a `DualTokenForward` (reconstruction (B, 3, H, W), semantic_features (B, N, width), pooled
            (B, E), commitment_loss name -> 0-dim, teacher_features / teacher_pooled with the semantic loss).
        pixels: the targets (B, 3, H, W), float in [-1, 1]. step: the 0-based optimiser step.
        last_layer: the decoder's last-layer weight (`model.decoder.last_layer`), where the adaptive GAN
            weight compares the gradient norms; needed once the GAN is active and gradients are on.
        Returns a `LossOutput` (fp32 total; terms semantic_*, commit_*, pixel, lpips, gan, gan_weight).
        Raises ValueError without the teacher's targets (semantic_weight > 0) or without `last_layer`
        when the adaptive weight needs it.
        """
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
        if self.gan_active(step) and torch.is_grad_enabled():
            require_last_layer(last_layer, "DualTokenLoss")
        rec = self.reconstruction.generator_terms(out.reconstruction.float(), pixels.float(), step=step,
                                                  last_layer=last_layer)
        total = total + self.pixel_weight * rec.pixel + self.lpips_weight * rec.perceptual
        total = total + rec.adaptive_weight * self.gan_weight * rec.adversarial
        terms.update(pixel=rec.pixel, lpips=rec.perceptual, gan=rec.adversarial, gan_weight=rec.adaptive_weight)
        return LossOutput(total, {k: v.detach().float() for k, v in terms.items()})

    def discriminator_loss(self, out, pixels: torch.Tensor, *, step: int) -> torch.Tensor:
        """The discriminator's 0-dim loss on `pixels` and the detached `out.reconstruction` (both (B, 3, H, W)
        in [-1, 1]), scaled by 0.75 as the official code back-propagates it (the code leaves it unscaled
        during its GAN start epoch; vistok scales it throughout); zero before the GAN starts."""
        loss = self.reconstruction.discriminator_step_loss(out.reconstruction.float(), pixels.float(), step=step)
        return self.disc_loss_weight * loss
