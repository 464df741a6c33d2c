"""Losses see tensors only: each is called here with plain tensors and no model, against values
computed by hand (numpy, float64), and the loss interface of losses/base.py."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from vistok.losses.base import AdversarialLoss, LossOutput, TrainingLoss
from vistok.losses.contrastive import TokLIPLoss
from vistok.losses.dualtoken import DualTokenLoss
from vistok.losses.kl import LDMKLLoss
from vistok.losses.vq import LlamaGenVQLoss

B, C, H, W = 2, 3, 4, 4
SCALE = np.array([0.5, -1.0, 2.0])  # the "decoder's last layer": one weight per output channel
V = np.array([3.0, -2.0, 1.0])  # a 1x1-conv discriminator, D(x)_bhw = sum_c v_c x_bchw


def _setup():
    """x_hat = W_c * z (so d x_hat / d W_c = z) and a linear discriminator: both gradients by hand."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((B, C, H, W))
    x = rng.uniform(-1, 1, (B, C, H, W))
    last_layer = nn.Parameter(torch.tensor(SCALE, dtype=torch.float32))
    x_hat = last_layer[None, :, None, None] * torch.tensor(z, dtype=torch.float32)
    disc = nn.Conv2d(C, 1, 1, bias=False)
    with torch.no_grad():
        disc.weight.copy_(torch.tensor(V, dtype=torch.float32).view(1, C, 1, 1))
    return z, x, last_layer, x_hat, disc


def _gan_by_hand(z):
    """-mean D(x_hat) and its gradient with respect to W."""
    g = -np.mean(np.einsum("c,bchw->bhw", V * SCALE, z))
    return g, -V * z.sum(axis=(0, 2, 3)) / (B * H * W)


def _ratio(nll_grad, g_grad, low, high):
    return float(np.clip(np.linalg.norm(nll_grad) / (np.linalg.norm(g_grad) + 1e-4), low, high))


def test_dualtoken_adaptive_gan_weight_from_a_last_layer_tensor():
    z, x, last_layer, x_hat, disc = _setup()
    loss_fn = DualTokenLoss(semantic_weight=0.0, lpips_weight=0.0, gan_start=0)
    loss_fn.reconstruction.discriminator = disc
    commit = {"pixel": torch.tensor(0.2), "semantic": torch.tensor(0.1)}
    out = SimpleNamespace(reconstruction=x_hat, commitment_loss=commit)
    got = loss_fn(out, torch.tensor(x, dtype=torch.float32), step=0, last_layer=last_layer)

    x_hat_np = SCALE[None, :, None, None] * z
    mse = np.mean((x_hat_np - x) ** 2)
    mse_grad = 2 * ((x_hat_np - x) * z).sum(axis=(0, 2, 3)) / x.size
    g, g_grad = _gan_by_hand(z)
    weight = _ratio(mse_grad, g_grad, 0.3, 10.0)
    assert 0.3 < weight < 10  # the ratio itself, not a clamp bound
    assert got.terms["gan_weight"].item() == pytest.approx(weight, rel=1e-5)
    assert got.total.item() == pytest.approx(5 * mse + 5 * 0.3 + weight * 0.75 * g, rel=1e-5)


def test_llamagen_adaptive_gan_weight_from_a_last_layer_tensor():
    z, x, last_layer, x_hat, disc = _setup()
    loss_fn = LlamaGenVQLoss(perceptual_weight=0.0, disc_start=0, adaptive=True)
    loss_fn.discriminator = disc
    zero = torch.tensor(0.0)
    out = SimpleNamespace(reconstruction=x_hat, codebook_loss=torch.tensor(0.4), commitment_loss=torch.tensor(0.1),
                          entropy_loss=zero)
    got = loss_fn(out, torch.tensor(x, dtype=torch.float32), step=0, last_layer=last_layer)

    x_hat_np = SCALE[None, :, None, None] * z
    mse = np.mean((x_hat_np - x) ** 2)
    mse_grad = 2 * ((x_hat_np - x) * z).sum(axis=(0, 2, 3)) / x.size
    g, g_grad = _gan_by_hand(z)
    weight = _ratio(mse_grad, g_grad, 0.0, 1e4)
    assert got.terms["gan_weight"].item() == pytest.approx(weight, rel=1e-5)
    assert got.total.item() == pytest.approx(mse + 0.5 + weight * 0.5 * g, rel=1e-5)


def test_ldm_kl_adaptive_gan_weight_from_a_last_layer_tensor():
    z, x, last_layer, x_hat, disc = _setup()
    loss_fn = LDMKLLoss(perceptual_weight=0.0, logvar_init=0.2, disc_start=0)
    loss_fn.discriminator = disc
    kl = torch.tensor([3.0, 5.0])  # per sample, as DiagonalGaussian.kl() gives it
    out = SimpleNamespace(reconstruction=x_hat, posterior=SimpleNamespace(kl=lambda: kl))
    got = loss_fn(out, torch.tensor(x, dtype=torch.float32), step=0, last_layer=last_layer)

    x_hat_np = SCALE[None, :, None, None] * z
    nll = (np.abs(x - x_hat_np) / np.exp(0.2) + 0.2).sum() / B
    nll_grad = (np.sign(x_hat_np - x) * z).sum(axis=(0, 2, 3)) / (B * np.exp(0.2))
    g, g_grad = _gan_by_hand(z)
    weight = 0.5 * _ratio(nll_grad, g_grad, 0.0, 1e4)  # disc_weight x the clamped ratio
    assert got.terms["gan_weight"].item() == pytest.approx(weight, rel=1e-5)
    assert got.total.item() == pytest.approx(nll + 1e-6 * 8.0 / B + weight * g, rel=1e-5)


def _outputs(x_hat):
    """The parts of each family's forward output its loss reads, as plain tensors."""
    zero = torch.tensor(0.0)
    return {DualTokenLoss: SimpleNamespace(reconstruction=x_hat, commitment_loss={"pixel": zero}),
            LlamaGenVQLoss: SimpleNamespace(reconstruction=x_hat, codebook_loss=zero, commitment_loss=zero,
                                            entropy_loss=zero),
            LDMKLLoss: SimpleNamespace(reconstruction=x_hat, posterior=SimpleNamespace(kl=lambda: torch.zeros(B)))}


@pytest.mark.parametrize("make", [
    lambda: DualTokenLoss(semantic_weight=0.0, lpips_weight=0.0, gan_start=0),
    lambda: LlamaGenVQLoss(perceptual_weight=0.0, disc_start=0, adaptive=True),
    lambda: LDMKLLoss(perceptual_weight=0.0, disc_start=0),
])
def test_the_adaptive_weight_without_last_layer_is_refused_by_name(make):
    z, x, last_layer, x_hat, disc = _setup()
    loss_fn = make()
    setattr(getattr(loss_fn, "reconstruction", loss_fn), "discriminator", disc)
    out, pixels = _outputs(x_hat)[type(loss_fn)], torch.tensor(x, dtype=torch.float32)
    with pytest.raises(ValueError, match="last_layer="):
        loss_fn(out, pixels, step=0)
    with torch.no_grad():  # evaluation: no adaptive weight, nothing needed
        assert torch.isfinite(loss_fn(out, pixels, step=0).total)


def test_toklip_loss_from_tensors_and_a_logit_scale():
    rng = np.random.default_rng(1)
    pooled, text, teacher = (rng.standard_normal((3, 4)) for _ in range(3))
    scale = np.log(7.0)
    out = SimpleNamespace(pooled=torch.tensor(pooled, dtype=torch.float32),
                          teacher_pooled=torch.tensor(teacher, dtype=torch.float32))
    got = TokLIPLoss()(out, torch.tensor(text, dtype=torch.float32), step=0,
                       logit_scale=torch.tensor(scale, dtype=torch.float32))

    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    logits = 7.0 * unit(pooled) @ unit(text).T
    ce = lambda m: np.mean(np.log(np.exp(m).sum(axis=1)) - np.diag(m))  # noqa: E731
    clip = (ce(logits) + ce(logits.T)) / 2
    distill = np.mean((unit(pooled) - unit(teacher)) ** 2)
    assert got.terms["clip"].item() == pytest.approx(clip, rel=1e-5)
    assert got.terms["logit_scale"].item() == pytest.approx(7.0, rel=1e-6)
    assert got.total.item() == pytest.approx(clip + 1000 * distill, rel=1e-5)


def test_every_loss_follows_the_interface():
    adversarial = [DualTokenLoss(lpips_weight=0.0), LlamaGenVQLoss(perceptual_weight=0.0),
                   LDMKLLoss(perceptual_weight=0.0)]
    assert all(isinstance(loss, AdversarialLoss) for loss in adversarial)
    assert isinstance(TokLIPLoss(), TrainingLoss) and not isinstance(TokLIPLoss(), AdversarialLoss)
    assert all(loss.discriminator is not None and not loss.gan_active(-1) for loss in adversarial)


def test_loss_output_names_the_non_finite_term():
    out = LossOutput(torch.tensor(float("nan")), {"pixel": torch.tensor(1.0), "gan": torch.tensor(float("inf"))})
    with pytest.raises(FloatingPointError, match=r"step 7.*\['gan'\]"):
        out.check_finite(7)
    LossOutput(torch.tensor(1.0), {}).check_finite(0)
