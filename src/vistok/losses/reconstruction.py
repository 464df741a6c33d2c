"""Reconstruction losses shared by the pixel-decoding families: pixel error, LPIPS, and the
PatchGAN hinge game with the adaptive generator weight (taming's gradient-norm ratio).

DualToken's discriminator is taming's NLayerDiscriminator (ndf 64, 3 layers) with the
BatchNorm stages replaced by GroupNorm residual blocks; its "hinge" uses leaky_relu in place of
relu (`d_loss="leaky_hinge"`, the code's behaviour; "hinge" is the usual relu form).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .lpips import FrozenLPIPS

D_LOSSES = ("hinge", "leaky_hinge")


class _DiscriminatorBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm2 = nn.GroupNorm(min(groups, out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(self.norm1(x), 0.2))
        h = self.conv2(F.leaky_relu(self.norm2(h), 0.2))
        return self.skip(x) + h


class PatchDiscriminator(nn.Module):
    """Patch logits (B, 1, H/8, W/8): conv s2 + LeakyReLU, then residual blocks doubling the width
    (stride 2 except the last), then a 1-channel conv. Convolutions start from N(0, 0.02)."""

    def __init__(self, *, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, groups: int = 32):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, ndf, 3, stride=2, padding=1)
        blocks, width = [], ndf
        for i in range(n_layers):
            out = ndf * min(2 ** (i + 1), 8)
            blocks.append(_DiscriminatorBlock(width, out, stride=2 if i < n_layers - 1 else 1, groups=groups))
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(width, 1, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, H, W), images in [-1, 1] -> patch logits (B, 1, H/8, W/8) for 3 layers."""
        return self.head(self.blocks(F.leaky_relu(self.stem(x), 0.2)))


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """0.5 * (mean f(1 - D(x)) + mean f(1 + D(x_hat))), f = relu ("hinge") or leaky_relu ("leaky_hinge")."""
    if kind not in D_LOSSES:
        raise ValueError(f"discriminator loss must be one of {D_LOSSES}, got {kind!r}")
    f = F.relu if kind == "hinge" else F.leaky_relu
    return 0.5 * (f(1.0 - real_logits).mean() + f(1.0 + fake_logits).mean())


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-mean D(x_hat) over the patch logits of any shape: a 0-dim tensor (taming's hinge generator loss)."""
    return -fake_logits.mean()


def generator_gan_term(discriminator: nn.Module, x_hat: torch.Tensor) -> torch.Tensor:
    """-mean D(x_hat) with no gradient into D's parameters (the generator's step)."""
    discriminator.requires_grad_(False)
    try:
        return generator_adversarial_loss(discriminator(x_hat))
    finally:
        discriminator.requires_grad_(True)


def discriminator_step_loss(discriminator: nn.Module, x: torch.Tensor, x_hat: torch.Tensor,
                            kind: str = "hinge") -> torch.Tensor:
    """The discriminator's loss on real x and detached reconstructions, in fp32."""
    return discriminator_loss(discriminator(x.float()), discriminator(x_hat.detach().float()), kind)


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, *,
                    clamp: tuple[float, float] = (0.3, 10.0), eps: float = 1e-4) -> torch.Tensor:
    """clamp(||d nll / d W|| / (||d g / d W|| + eps)) with W the decoder's last layer, detached."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(*clamp).detach()


def pixel_loss(x_hat: torch.Tensor, x: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Mean squared ("mse") or absolute ("l1") error over all elements of same-shape tensors: 0-dim.
    Raises ValueError naming any other `kind`."""
    if kind == "mse":
        return F.mse_loss(x_hat, x)
    if kind == "l1":
        return F.l1_loss(x_hat, x)
    raise ValueError(f"pixel loss must be 'mse' or 'l1', got {kind!r}")


@dataclass
class ReconstructionTerms:
    """0-dim terms of `ReconstructionLoss.generator_terms`: unweighted losses and the adaptive weight."""

    pixel: torch.Tensor
    perceptual: torch.Tensor
    adversarial: torch.Tensor  # -mean D(x_hat); zero before the GAN starts
    adaptive_weight: torch.Tensor


class ReconstructionLoss(nn.Module):
    """Pixel + LPIPS + adaptive-weighted GAN terms and the discriminator's loss.

    lpips_weight > 0 needs LPIPS's VGG backbone locally (see losses/lpips.py); with weight 0 it is
    never built. The GAN terms are zero before `gan_start` steps (and the discriminator idle).
    """

    def __init__(self, *, pixel: str = "mse", lpips_weight: float = 1.0, lpips_net: str = "vgg",
                 lpips_backbone: Optional[str] = None, gan_start: int = 0, gan_weight: float = 0.75,
                 adaptive: bool = True, adaptive_clamp: tuple[float, float] = (0.3, 10.0),
                 d_loss: str = "leaky_hinge", discriminator: Optional[dict] = None):
        super().__init__()
        if d_loss not in D_LOSSES:
            raise ValueError(f"d_loss must be one of {D_LOSSES}, got {d_loss!r}")
        self.pixel, self.lpips_weight = pixel, lpips_weight
        self.gan_start, self.gan_weight, self.adaptive = gan_start, gan_weight, adaptive
        self.adaptive_clamp, self.d_loss = tuple(adaptive_clamp), d_loss
        self.lpips = FrozenLPIPS(lpips_net, lpips_backbone) if lpips_weight > 0 else None
        self.discriminator = PatchDiscriminator(**(discriminator or {})) if gan_weight > 0 else None

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms count at `step` (from `gan_start` on, with a discriminator)."""
        return self.discriminator is not None and step >= self.gan_start

    def generator_terms(self, x_hat: torch.Tensor, x: torch.Tensor, *, step: int,
                        last_layer: Optional[torch.Tensor] = None) -> ReconstructionTerms:
        """Terms of the generator's objective. The adaptive weight balances the GAN gradient against
        the unit-weight (pixel + LPIPS) gradient at `last_layer` (DualToken's convention)."""
        pix = pixel_loss(x_hat, x, self.pixel)
        perceptual = self.lpips(x_hat, x) if self.lpips is not None else x_hat.new_zeros(())
        zero = x_hat.new_zeros(())
        if not self.gan_active(step):
            return ReconstructionTerms(pix, perceptual, zero, zero)
        g_loss = generator_gan_term(self.discriminator, x_hat)
        weight = x_hat.new_ones(())
        if self.adaptive and last_layer is not None and torch.is_grad_enabled():
            weight = adaptive_weight(pix + perceptual, g_loss, last_layer, clamp=self.adaptive_clamp)
        return ReconstructionTerms(pix, perceptual, g_loss, weight)

    def discriminator_step_loss(self, x_hat: torch.Tensor, x: torch.Tensor, *, step: int) -> torch.Tensor:
        """The discriminator's loss on real x and detached reconstructions (zero before gan_start)."""
        if not self.gan_active(step):
            return x.new_zeros(())
        return discriminator_step_loss(self.discriminator, x, x_hat, self.d_loss)


class NLayerDiscriminator(nn.Module):
    """pix2pix / taming PatchGAN (LDM and LlamaGen): 4x4 convs, BatchNorm, LeakyReLU 0.2, N(0, 0.02)
    conv init (BatchNorm weights N(1, 0.02)); (B, 1, ~H/8, ~W/8) logits for 3 layers."""

    def __init__(self, *, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_channels, H, W), images in [-1, 1] -> patch logits (B, 1, ~H/8, ~W/8) for 3 layers."""
        return self.main(x)
