"""What every training loss returns and the interface the objectives (train/objectives.py) rely on.

A loss sees tensors only: the family's forward output, the targets, and the model tensors it needs
passed in by the caller (the decoder's last layer for the adaptive GAN weight, as LlamaGen's
`VQLoss(..., last_layer=)`; the logit scale for InfoNCE, as open_clip's `ClipLoss(..., logit_scale)`).
It never holds or reads the model.

    TrainingLoss      loss(out, target, *, step, **tensors) -> LossOutput
    AdversarialLoss   + discriminator, gan_active(step), discriminator_loss(out, pixels, *, step)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class LossOutput:
    """One generator-side loss evaluation.

    total: 0-dim float32 tensor with the autograd graph, the value to back-propagate.
    terms: name -> 0-dim float32 tensor, detached and unweighted (as the official code logs them;
        `gan_weight` is the adaptive weight itself), for logging.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)

    def check_finite(self, step: int) -> None:
        """Raise FloatingPointError naming `step` and the non-finite terms if `total` is NaN or infinite
        (the trainer stops on it); return silently otherwise."""
        if torch.isfinite(self.total):
            return
        bad = [k for k, v in self.terms.items() if not torch.isfinite(v).all()]
        raise FloatingPointError(f"non-finite loss at step {step}: total={self.total.item()}"
                                 + (f"; non-finite terms: {bad}" if bad else ""))


@runtime_checkable
class TrainingLoss(Protocol):
    """A family's generator-side objective (an `nn.Module`: its state, e.g. a learned log-variance or a
    discriminator, moves and checkpoints with it).

    `loss(out, target, *, step, **tensors)`: `out` is the family's training-forward dataclass, `target`
    the pixels (B, 3, H, W) in [-1, 1] or, for contrastive losses, the text features (B, E); `step` the
    0-based optimiser step (schedules such as the GAN start read it); `tensors` the model tensors the
    loss needs, by keyword (`last_layer=`, `logit_scale=`). Returns a `LossOutput`; raises ValueError
    when `out` lacks a part the configured terms need (e.g. the teacher's targets).
    """

    def __call__(self, out: Any, target: torch.Tensor, *, step: int, **tensors: torch.Tensor) -> LossOutput: ...


@runtime_checkable
class AdversarialLoss(TrainingLoss, Protocol):
    """A reconstruction loss that may play a GAN game with its own discriminator.

    discriminator: the `nn.Module` it trains, or None when the GAN is configured off.
    gan_active(step): whether the adversarial terms count at `step` (False without a discriminator).
    discriminator_loss(out, pixels, *, step): the discriminator's 0-dim loss on `pixels` and the
        detached `out.reconstruction`; zero before the GAN starts.
    """

    discriminator: Optional[nn.Module]

    def gan_active(self, step: int) -> bool:
        """Whether the adversarial terms count at the 0-based optimiser `step`."""
        ...

    def discriminator_loss(self, out: Any, pixels: torch.Tensor, *, step: int) -> torch.Tensor:
        """The discriminator's 0-dim loss on real `pixels` and the detached `out.reconstruction`."""
        ...


def require_last_layer(last_layer: Optional[torch.Tensor], loss: str) -> torch.Tensor:
    """`last_layer`, or a ValueError saying the adaptive GAN weight needs it."""
    if last_layer is None:
        raise ValueError(f"{loss}: the adaptive GAN weight needs the decoder's last-layer weight: pass "
                         "last_layer= (e.g. model.decoder.last_layer)")
    return last_layer
