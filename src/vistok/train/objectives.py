"""Family plug-ins for the trainer: how a family's model and loss make one generator step and one
discriminator step. The trainer itself is family-agnostic and talks to the objective only: the
objective owns the loss (device, checkpoint state, parameters, gradient sync across ranks) and hands
it the model tensors it needs (the decoder's last layer, the logit scale), so the loss sees tensors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..losses.base import AdversarialLoss, LossOutput, TrainingLoss
from ..losses.contrastive import TokLIPLoss
from ..losses.dualtoken import DualTokenLoss
from ..losses.kl import LDMKLLoss
from ..losses.vq import LlamaGenVQLoss
from ..schema import check_kwargs
from ..tokenizers.registry import get_preset
from ..tokenizers.siglip_hf import is_hf_siglip_folder
from ..weights import read_release_config, tokenizer_class


def _average_gradients(params, world: int) -> None:
    """Sum each existing gradient over the ranks and divide by `world` (DDP's mean), in place."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


class Objective:
    """A family's training objective: the one object the trainer talks to for everything loss-side.

    Built from the config's `loss` section (`loss_class` keyword arguments, checked by
    `check_loss_args`: ValueError naming an unknown key or a wrongly typed value). The trainer calls:

        to(device)                          move the loss (discriminator, LPIPS, log-variance)
        state_dict() / load_state_dict()    the loss's tensors, as `loss.safetensors` of a checkpoint
        has_state()                         whether there are any (a checkpoint then holds that file)
        extra_parameters(), discriminator   what the generator / discriminator optimisers train
        generator_step(...)                 forward + loss -> (LossOutput, the family's forward output)
        gan_active(step), discriminator_loss(out, pixels, step)
        sync_gradients(world)               average the loss's own gradients over DDP ranks
        after_step(raw_model)               after every optimiser step (e.g. clamp a parameter)
    """

    family: str = ""
    loss_class: type = nn.Module
    # constructor overrides that turn a training model into an inference release on export
    export_overrides: dict = {}
    export_drop_prefixes: tuple[str, ...] = ()

    @classmethod
    def check_loss_args(cls, args) -> dict:
        """The `loss` section: keys the family's loss takes, each of its annotated type."""
        return check_kwargs(cls.loss_class.__init__, args, "loss", what=f"family {cls.family!r}")

    @classmethod
    def check_model(cls, cfg) -> None:
        """The model (preset or model.init release) must be of this objective's family, and model.overrides
        must be arguments of its class: both refused before anything is built."""
        # an HF SigLIP folder as model.init initialises the preset's tower (see build_model): the preset decides
        if cfg.model.init and not is_hf_siglip_folder(cfg.model.init):
            model_cls = tokenizer_class(read_release_config(Path(cfg.model.init))["_class_name"])
            source = f"model.init {cfg.model.init}"
        else:
            model_cls = tokenizer_class(get_preset(cfg.model.preset)["class"])
            source = f"model.preset {cfg.model.preset!r}"
        if model_cls.family != cls.family:
            raise ValueError(f"{source} is a {model_cls.family}-family model, but the config's family is "
                             f"{cls.family!r}: set family (and its loss section) to match, or pick a {cls.family} model")
        cfg.model.overrides = check_kwargs(model_cls.__init__, cfg.model.overrides, "model.overrides",
                                           what=model_cls.__name__)

    def __init__(self, loss_args: dict):
        self.check_loss_args(loss_args)
        self.loss: TrainingLoss = self.loss_class(**loss_args)

    # ---------------------------------------------------------------- device, state, parameters
    def to(self, device: torch.device | str) -> "Objective":
        """Move the loss's parameters and buffers to `device`; returns self."""
        self.loss.to(device)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The loss's tensors under the loss's own names (e.g. `discriminator.*`, `logvar`); LPIPS's
        frozen network is not part of it (see losses/lpips.py)."""
        return self.loss.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Load what `state_dict()` gave (a checkpoint's `loss.safetensors`); torch's strict-load errors."""
        return self.loss.load_state_dict(state_dict, strict=strict)

    def has_state(self) -> bool:
        """Whether the loss holds tensors a checkpoint must keep (a discriminator, a log-variance)."""
        return bool(self.state_dict())

    @property
    def discriminator(self) -> Optional[nn.Module]:
        """The discriminator the trainer's second optimiser trains, or None (no GAN)."""
        return getattr(self.loss, "discriminator", None)

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable loss parameters optimised with the model (e.g. a learned log-variance)."""
        return []

    def sync_gradients(self, world: int) -> None:
        """Average the gradients of the loss's own parameters (extra parameters, then the discriminator's)
        over `world` ranks: they live outside the DDP-wrapped model. Call on every rank after the
        backward passes of a step and before the optimisers step; a no-op for world 1."""
        if world <= 1:
            return
        _average_gradients(self.extra_parameters(), world)
        if self.discriminator is not None:
            _average_gradients(self.discriminator.parameters(), world)

    # ---------------------------------------------------------------- the step
    def gan_active(self, step: int) -> bool:
        """Whether the discriminator plays at `step` (0-based optimiser step)."""
        return False

    def generator_step(self, model: nn.Module, raw_model: nn.Module, pixels: torch.Tensor, step: int,
                       captions: Optional[list[str]] = None) -> tuple[LossOutput, object]:
        """Run `model` (possibly DDP-wrapped) on `pixels` (B, 3, H, W) in [-1, 1] and compute the loss;
        `raw_model` is the unwrapped tokenizer the loss's tensors (last layer, logit scale) come from;
        `captions` (B strings) where the family trains on image-text pairs. Returns (LossOutput, the
        family's forward output, for `discriminator_loss`). Raises ValueError for missing captions."""
        raise NotImplementedError

    def discriminator_loss(self, out, pixels: torch.Tensor, step: int) -> Optional[torch.Tensor]:
        """The discriminator's 0-dim loss for the forward output `out` on `pixels`; None without a GAN
        game at `step`."""
        return None

    def find_unused_parameters(self) -> bool:
        """Whether some trainable model parameters get no gradient (DDP must then look for them)."""
        return False

    def after_step(self, raw_model: nn.Module) -> None:
        """Called after every optimiser step (e.g. to clamp a parameter)."""

    @classmethod
    def check_run(cls, cfg) -> None:
        """Refuse configurations that would train something meaningless."""


class ReconstructionObjective(Objective):
    """Families whose loss reconstructs pixels and may play a GAN game (an `AdversarialLoss`); the
    model's `decoder.last_layer` weight is passed to it for the adaptive GAN weight."""

    loss: AdversarialLoss

    def gan_active(self, step: int) -> bool:
        return self.loss.gan_active(step)

    def generator_step(self, model, raw_model, pixels, step, captions=None):
        out = model(pixels)
        return self.loss(out, pixels, step=step, last_layer=raw_model.decoder.last_layer), out

    def discriminator_loss(self, out, pixels, step):
        return self.loss.discriminator_loss(out, pixels, step=step) if self.gan_active(step) else None


class DualTokenObjective(ReconstructionObjective):
    """DualToken: semantic distillation to the frozen teacher + pixel reconstruction, commitment and GAN."""

    family = "dualtoken"
    loss_class = DualTokenLoss
    export_overrides = {"with_teacher": False, "siglip_weights": None}
    export_drop_prefixes = ("teacher.",)

    def find_unused_parameters(self) -> bool:
        # without the semantic loss, the semantic projections, the last layers and the pool get no gradient
        return not self.loss.semantic_weight

    @classmethod
    def check_run(cls, cfg) -> None:
        siglip = cfg.model.init or cfg.model.overrides.get("siglip_weights")
        if not siglip and not cfg.model.preset.startswith("tiny-"):
            raise ValueError(f"DualToken on {cfg.model.preset} starts from real SigLIP weights: set model.init to a "
                             "`vistok convert siglip` directory or an HF SigLIP / SigLIP2 folder (or "
                             "model.overrides.siglip_weights to an open_clip weights file); a random tower would be "
                             "distilled from a random teacher")


class KLObjective(ReconstructionObjective):
    """LDM / MAR KL-16: a sampled posterior, L1 + LPIPS under a learned log-variance, KL, PatchGAN."""

    family = "kl"
    loss_class = LDMKLLoss

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.loss.logvar] if self.loss.logvar.requires_grad else []


class VQGANObjective(ReconstructionObjective):
    """LlamaGen VQ: MSE + LPIPS + codebook/commitment(/entropy) + PatchGAN hinge from a start step."""

    family = "vqgan"
    loss_class = LlamaGenVQLoss


class TokLIPObjective(Objective):
    """TokLIP: InfoNCE against the frozen text tower's caption embeddings + distillation."""

    family = "toklip"
    loss_class = TokLIPLoss
    export_overrides = {"with_teacher": False, "siglip_weights": None, "vq_weights": None}
    export_drop_prefixes = ("teacher.",)

    @classmethod
    def check_run(cls, cfg) -> None:
        over = cfg.model.overrides
        if not cfg.model.init and not cfg.model.preset.startswith("tiny-") and not (
                over.get("siglip_weights") and over.get("vq_weights")):
            raise ValueError(f"TokLIP on {cfg.model.preset} starts from SigLIP2 and LlamaGen's t2i VQ: set "
                             "model.overrides.siglip_weights (open_clip weights file) and model.overrides.vq_weights "
                             "(a `vistok convert llamagen-vq16` directory), or model.init")

    def after_step(self, raw_model) -> None:
        with torch.no_grad():  # open_clip's trainer: the temperature never goes below 1/100
            raw_model.siglip.logit_scale.clamp_(0, math.log(100))

    def generator_step(self, model, raw_model, pixels, step, captions=None):
        if not captions or not all(captions):
            raise ValueError("TokLIP trains on image-text pairs: every image needs a caption "
                             "(a .jsonl/.csv list with captions, webdataset .txt, or builtin photos)")
        out = model(pixels)
        with torch.no_grad():  # the text tower is frozen
            tokens = raw_model.siglip.tokenize(captions).to(pixels.device)
            text = raw_model.encode_text(tokens, normalize=False)
        return self.loss(out, text, step=step, logit_scale=raw_model.siglip.logit_scale), out


OBJECTIVES = {o.family: o for o in (DualTokenObjective, KLObjective, VQGANObjective, TokLIPObjective)}


def objective_class(family: str) -> type[Objective]:
    """The objective of `family` ("dualtoken", "kl", "vqgan", "toklip"); ValueError naming the trainable
    families otherwise."""
    try:
        return OBJECTIVES[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; trainable families: {sorted(OBJECTIVES)}") from None
