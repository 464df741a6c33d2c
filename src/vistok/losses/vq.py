"""LlamaGen's VQGAN objective (`vq_loss.py`, `vq_train.py` defaults):

    L_G = 1 x MSE(x, x_hat) + 1 x LPIPS + codebook + commitment (beta 0.25 inside) + entropy
          + a x adopt(0.5, step, 20000) x (-mean D(x_hat))
    L_D = adopt(0.5, step, 20000) x 0.5 x (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))

`adopt(w, step, s)` is 0 before step s and w after; a = 1 (the taming adaptive weight exists in the
code but is off: `adaptive=True` turns it on, clamped to [0, 1e4]). The discriminator is pix2pix's
BatchNorm PatchGAN. The codebook terms enter unweighted.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import LossOutput, require_last_layer
from .lpips import FrozenLPIPS
from .reconstruction import NLayerDiscriminator, adaptive_weight, discriminator_step_loss, generator_gan_term, pixel_loss


class LlamaGenVQLoss(nn.Module):
    """LlamaGen's `VQLoss` with `vq_train.py`'s defaults (an `AdversarialLoss`).

    `pixel` is "mse" or "l1"; `perceptual_weight` > 0 needs LPIPS's VGG weights locally
    (`lpips_backbone`); `disc_weight` 0 builds no discriminator; `discriminator` is `NLayerDiscriminator`
    keyword arguments; `adaptive=True` turns on the taming adaptive weight (off in LlamaGen's runs).
    """

    def __init__(self, *, pixel: str = "mse", pixel_weight: float = 1.0, perceptual_weight: float = 1.0,
                 codebook_weight: float = 1.0, disc_start: int = 20000, disc_weight: float = 0.5,
                 adaptive: bool = False, lpips_net: str = "vgg", lpips_backbone: Optional[str] = None,
                 discriminator: Optional[dict] = None):
        super().__init__()
        self.pixel, self.pixel_weight, self.perceptual_weight = pixel, pixel_weight, perceptual_weight
        self.codebook_weight, self.disc_start, self.disc_weight, self.adaptive = codebook_weight, disc_start, disc_weight, adaptive
        self.lpips = FrozenLPIPS(lpips_net, lpips_backbone) if perceptual_weight > 0 else None
        self.discriminator = NLayerDiscriminator(**(discriminator or {})) if disc_weight > 0 else None

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms count at `step` (from `disc_start` on, with a discriminator)."""
        return self.discriminator is not None and step >= self.disc_start

    def forward(self, out, pixels: torch.Tensor, *, step: int,
                last_layer: Optional[torch.Tensor] = None) -> LossOutput:
        """The generator-side objective.

        out: a `VQGANForward` (reconstruction (B, 3, H, W); codebook_loss, commitment_loss, entropy_loss
            0-dim). pixels: the targets (B, 3, H, W), float in [-1, 1]. step: the 0-based optimiser step.
        last_layer: the decoder's last-layer weight (`model.decoder.last_layer`); needed only with
            `adaptive=True` once the GAN is active and gradients are on, as in LlamaGen's
            `VQLoss.forward(..., last_layer=)`.
        Returns a `LossOutput` (fp32 total; terms pixel, lpips, codebook, commit, entropy, gan, gan_weight).
        Raises ValueError for an unknown `pixel`, or without `last_layer` when the adaptive weight needs it.
        """
        x, x_hat = pixels.float(), out.reconstruction.float()
        rec = pixel_loss(x_hat, x, self.pixel)
        perceptual = self.lpips(x_hat, x) if self.lpips is not None else x.new_zeros(())
        nll = self.pixel_weight * rec + self.perceptual_weight * perceptual
        quant = out.codebook_loss + out.commitment_loss + out.entropy_loss
        total = nll + self.codebook_weight * quant
        g_loss = weight = x.new_zeros(())
        if self.gan_active(step):
            g_loss = generator_gan_term(self.discriminator, x_hat)
            weight = x.new_ones(())
            if self.adaptive and torch.is_grad_enabled():
                weight = adaptive_weight(nll, g_loss, require_last_layer(last_layer, "LlamaGenVQLoss"),
                                         clamp=(0.0, 1e4))
            total = total + weight * self.disc_weight * g_loss
        terms = {"pixel": rec, "lpips": perceptual, "codebook": out.codebook_loss, "commit": out.commitment_loss,
                 "entropy": out.entropy_loss, "gan": g_loss, "gan_weight": weight}
        return LossOutput(total, {k: v.detach().float() for k, v in terms.items()})

    def discriminator_loss(self, out, pixels: torch.Tensor, *, step: int) -> torch.Tensor:
        """disc_weight x the relu hinge of the discriminator on `pixels` and the detached
        `out.reconstruction` ((B, 3, H, W) in [-1, 1]): a 0-dim tensor, zero before `disc_start`."""
        if not self.gan_active(step):
            return pixels.new_zeros(())
        return self.disc_weight * discriminator_step_loss(self.discriminator, pixels, out.reconstruction)
