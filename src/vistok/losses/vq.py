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

from .dualtoken import LossOutput
from .lpips import FrozenLPIPS
from .reconstruction import NLayerDiscriminator, adaptive_weight, discriminator_step_loss, generator_gan_term, pixel_loss


class LlamaGenVQLoss(nn.Module):
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
        return self.discriminator is not None and step >= self.disc_start

    def forward(self, model, out, pixels: torch.Tensor, *, step: int) -> LossOutput:
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
                weight = adaptive_weight(nll, g_loss, model.decoder.last_layer, clamp=(0.0, 1e4))
            total = total + weight * self.disc_weight * g_loss
        terms = {"pixel": rec, "lpips": perceptual, "codebook": out.codebook_loss, "commit": out.commitment_loss,
                 "entropy": out.entropy_loss, "gan": g_loss, "gan_weight": weight}
        return LossOutput(total, {k: v.detach().float() for k, v in terms.items()})

    def discriminator_loss(self, out, pixels: torch.Tensor, *, step: int) -> torch.Tensor:
        if not self.gan_active(step):
            return pixels.new_zeros(())
        return self.disc_weight * discriminator_step_loss(self.discriminator, pixels, out.reconstruction)
