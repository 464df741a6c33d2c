"""The LDM AutoencoderKL objective that MAR's KL-16 follows (`LPIPSWithDiscriminator`):

    rec   = |x - x_hat| + perceptual_weight * LPIPS(x, x_hat)            (per pixel)
    nll   = sum(rec / exp(logvar) + logvar) / B                           (logvar: a learned scalar)
    L_G   = nll + kl_weight * KL(q(z|x) || N(0, I)) / B + w_adapt * disc_factor(step) * (-mean D(x_hat))
    w_adapt = disc_weight * clamp(||grad nll|| / (||grad g|| + 1e-4), 0, 1e4) at the decoder's last layer
    L_D   = disc_factor(step) * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))

Defaults are LDM kl-f16's: KL weight 1e-6, discriminator (pix2pix PatchGAN) from step 50001 with
weight 0.5. LDM declares logvar as a parameter but its optimiser only holds the autoencoder, so it
stays at its initial value: `learn_logvar=False` (the code); True trains it (the formula's intent).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import LossOutput, require_last_layer
from .lpips import FrozenLPIPS
from .reconstruction import NLayerDiscriminator, adaptive_weight, discriminator_step_loss, generator_gan_term


class LDMKLLoss(nn.Module):
    """LDM's `LPIPSWithDiscriminator` (an `AdversarialLoss`); defaults are kl-f16's.

    `perceptual_weight` > 0 needs LPIPS's VGG weights locally (`lpips_backbone`); `disc_factor` 0 builds no
    discriminator; `discriminator` is `NLayerDiscriminator` keyword arguments. `logvar` is the learned
    scalar log-variance (a parameter; trained only with `learn_logvar=True`, see the module docstring).
    """

    def __init__(self, *, kl_weight: float = 1e-6, perceptual_weight: float = 1.0, logvar_init: float = 0.0,
                 disc_start: int = 50001, disc_weight: float = 0.5, disc_factor: float = 1.0,
                 lpips_net: str = "vgg", lpips_backbone: Optional[str] = None, discriminator: Optional[dict] = None,
                 learn_logvar: bool = False):
        super().__init__()
        self.kl_weight, self.perceptual_weight = kl_weight, perceptual_weight
        self.disc_start, self.disc_weight, self.disc_factor = disc_start, disc_weight, disc_factor
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)
        self.lpips = FrozenLPIPS(lpips_net, lpips_backbone) if perceptual_weight > 0 else None
        self.discriminator = NLayerDiscriminator(**(discriminator or {})) if disc_factor > 0 else None

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms count at `step` (from `disc_start` on, with a discriminator)."""
        return self.discriminator is not None and step >= self.disc_start

    def _perceptual(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.lpips is None:
            return x.new_zeros(())
        return self.lpips.distance(x, x_hat)  # (B, 1, 1, 1), broadcast over pixels as in LDM

    def forward(self, out, pixels: torch.Tensor, *, step: int,
                last_layer: Optional[torch.Tensor] = None) -> LossOutput:
        """The generator-side objective.

        out: a `KLForwardOutput` (reconstruction (B, 3, H, W) from a sampled latent; posterior, whose
            `kl()` is per sample (B,)). pixels: the targets (B, 3, H, W), float in [-1, 1].
        step: the 0-based optimiser step. last_layer: the decoder's last-layer weight
            (`model.decoder.last_layer`), needed once the GAN is active and gradients are on.
        Returns a `LossOutput` (fp32 total; terms nll, kl, l1, logvar, gan, gan_weight).
        Raises ValueError without `last_layer` when the adaptive weight needs it.
        """
        x, x_hat = pixels.float(), out.reconstruction.float()
        batch = x.shape[0]
        rec = (x - x_hat).abs() + self.perceptual_weight * self._perceptual(x_hat, x)
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / batch
        kl = out.posterior.kl().float().sum() / batch
        total = nll + self.kl_weight * kl
        g_loss = weight = x.new_zeros(())
        if self.gan_active(step):
            g_loss = generator_gan_term(self.discriminator, x_hat)
            if torch.is_grad_enabled():
                layer = require_last_layer(last_layer, "LDMKLLoss")
                weight = self.disc_weight * adaptive_weight(nll, g_loss, layer, clamp=(0.0, 1e4))
            total = total + weight * self.disc_factor * g_loss
        terms = {"nll": nll, "kl": kl, "l1": (x - x_hat).abs().mean(), "logvar": self.logvar, "gan": g_loss,
                 "gan_weight": weight}
        return LossOutput(total, {k: v.detach().float() for k, v in terms.items()})

    def discriminator_loss(self, out, pixels: torch.Tensor, *, step: int) -> torch.Tensor:
        """disc_factor x the relu hinge of the discriminator on `pixels` and the detached
        `out.reconstruction` ((B, 3, H, W) in [-1, 1]): a 0-dim tensor, zero before `disc_start`."""
        if not self.gan_active(step):
            return pixels.new_zeros(())
        return self.disc_factor * discriminator_step_loss(self.discriminator, pixels, out.reconstruction)
