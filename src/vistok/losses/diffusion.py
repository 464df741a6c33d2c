"""MAR's diffusion-loss head: models each continuous token (e.g. a KL-16 latent) with a small
conditional diffusion MLP instead of a softmax (arXiv 2406.11838, `models/diffloss.py`).

- `SimpleMLPAdaLN`: the denoiser, parameter names as MAR (`net.*`; `diffloss.net.*` in MAR checkpoints).
- `GaussianDiffusion`: ADM/IDDPM maths for a cosine schedule, eps prediction with learned-range
  variance, the hybrid loss (MSE + variational bound on the variance only) and ancestral sampling.
- `DiffusionHead`: training loss (one timestep per token, mask, batch multiplier) and sampling
  (respaced steps, temperature on the per-step noise, classifier-free guidance on eps).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..rng import randint, randn
from ..weights import load_state_dict_strict, read_checkpoint, strip_prefixes


# ----------------------------------------------------------------------------------- denoiser
def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding ([cos, sin], max period 10000) of the original 0..T-1 index, then an MLP."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """LN -> shift/scale modulation -> MLP -> gated residual; (shift, scale, gate) from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """Per-token denoiser: (x_t (N, C), t (N,), cond (N, Z)) -> (N, 2C) = [eps, variance interpolation]."""

    def __init__(self, *, token_dim: int, cond_dim: int, width: int, depth: int, grad_checkpointing: bool = False):
        super().__init__()
        self.token_dim = token_dim
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * token_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAR's init: xavier-uniform Linears with zero bias, N(0, 0.02) time MLP, zero modulation and
        output layers, so the network outputs exactly zero at initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        zero = [b.adaLN_modulation[-1] for b in self.res_blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(cond)
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)


# ----------------------------------------------------------------------------------- diffusion maths
def cosine_alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule, t in [0, 1]."""
    return torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    i = torch.arange(num_timesteps, dtype=torch.float64)
    betas = 1 - cosine_alpha_bar((i + 1) / num_timesteps) / cosine_alpha_bar(i / num_timesteps)
    return betas.clamp(max=max_beta)


def respaced_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """ADM `space_timesteps(T, str(num_steps))`: a running float stride, rounded; first and last kept."""
    if not 2 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [2, {num_timesteps}], got {num_steps}")
    stride = (num_timesteps - 1) / (num_steps - 1)
    steps, position = [], 0.0
    for _ in range(num_steps):
        steps.append(round(position))  # ADM accumulates the stride; round(i * stride) differs sometimes
        position += stride
    return sorted(set(steps))


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """ADM's decoder NLL for data in [-1, 1] quantised to 256 levels (used for the t = 0 term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
    """Discrete-time Gaussian diffusion over `betas` (float64 tables, ADM conventions), with eps
    prediction and learned-range variance. `timestep_map` maps respaced indices to the original
    timesteps that the denoiser's time embedding sees."""

    def __init__(self, betas: torch.Tensor, timestep_map: Optional[list[int]] = None):
        self.betas = betas.double()
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(self.num_timesteps))
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        ac, acp = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ac).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / ac).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ac - 1).sqrt()
        self.posterior_variance = self.betas * (1.0 - acp) / (1.0 - ac)
        # log of the posterior variance, with the (zero) variance at t = 0 replaced by that at t = 1
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = self.betas * acp.sqrt() / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * alphas.sqrt() / (1.0 - ac)
        self.log_betas = torch.log(self.betas)

    def to(self, device) -> "GaussianDiffusion":
        """Move every table (float64) to `device`, so lookups during a loss or a sampling loop do not
        copy tables from the host at every step."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, num_steps: Optional[int] = None) -> "GaussianDiffusion":
        """The cosine schedule over `num_timesteps`, optionally respaced to `num_steps` (ADM SpacedDiffusion)."""
        base = cls(cosine_betas(num_timesteps))
        if num_steps is None or num_steps == num_timesteps:
            return base
        use = respaced_timesteps(num_timesteps, num_steps)
        ac = base.alphas_cumprod[use]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        return cls(1.0 - ac / prev, timestep_map=use)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table.to(t.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_log_variance_clipped, t, xt)

    def p_mean_variance(self, model_output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Model output [eps, v] -> (mean, log-variance, predicted x0) of p(x_{t-1} | x_t)."""
        eps, v = model_output.chunk(2, dim=1)
        min_log = self._at(self.posterior_log_variance_clipped, t, xt)
        max_log = self._at(self.log_betas, t, xt)
        frac = (v + 1) / 2  # v in [-1, 1] interpolates between the two variance bounds
        log_variance = frac * max_log + (1 - frac) * min_log
        x0 = self._at(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self._at(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps
        mean, _ = self.q_posterior(x0, xt, t)
        return mean, log_variance, x0

    def vb_terms(self, model_output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Variational bound in bits per dim, per row: KL(q || p) for t > 0, decoder NLL at t = 0."""
        true_mean, true_logvar = self.q_posterior(x0, xt, t)
        mean, logvar, _ = self.p_mean_variance(model_output, xt, t)
        kl = _normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).mean(1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


# ----------------------------------------------------------------------------------- the head
@dataclass
class DiffusionLossOutput:
    loss: torch.Tensor  # scalar: masked mean of (mse + vb)
    mse: torch.Tensor  # per row (N * batch_mul,)
    vb: torch.Tensor  # per row


class DiffusionHead(nn.Module):
    """MAR's DiffLoss: a per-token diffusion model conditioned on a vector `cond` (the generator's
    output at that position). Defaults = MAR's README training example (depth 3, width 1024)."""

    def __init__(self, *, token_dim: int = 16, cond_dim: int = 1024, width: int = 1024, depth: int = 3,
                 num_timesteps: int = 1000, num_sampling_steps: int = 100, grad_checkpointing: bool = False):
        super().__init__()
        self.config = dict(token_dim=token_dim, cond_dim=cond_dim, width=width, depth=depth,
                           num_timesteps=num_timesteps, num_sampling_steps=num_sampling_steps,
                           grad_checkpointing=grad_checkpointing)
        self.token_dim, self.cond_dim = token_dim, cond_dim
        self.net = SimpleMLPAdaLN(token_dim=token_dim, cond_dim=cond_dim, width=width, depth=depth,
                                  grad_checkpointing=grad_checkpointing)
        self.train_diffusion = GaussianDiffusion.cosine(num_timesteps)
        self.num_sampling_steps = num_sampling_steps
        self._schedules: dict[tuple, GaussianDiffusion] = {}

    def schedule(self, num_steps: Optional[int], device) -> GaussianDiffusion:
        """The training schedule (num_steps None) or its respacing to `num_steps`, with its tables on
        `device`; built once per (steps, device)."""
        key = (num_steps, str(torch.device(device)))
        if key not in self._schedules:
            base = self.train_diffusion.num_timesteps
            self._schedules[key] = GaussianDiffusion.cosine(base, num_steps).to(device)
        return self._schedules[key]

    def _check(self, name: str, x: torch.Tensor, dim: int) -> None:
        if x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"{name} must be (N, {dim}), got {tuple(x.shape)}")

    def loss(self, target: torch.Tensor, cond: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
             batch_mul: int = 1, generator: Optional[torch.Generator] = None) -> DiffusionLossOutput:
        """Hybrid loss for tokens `target` (N, C) given `cond` (N, Z): one timestep and noise per row.
        `batch_mul` draws that many (t, noise) pairs per condition (MAR trains with 4); `mask` (N,)
        selects the tokens that count (MAR: the masked, to-be-predicted ones)."""
        self._check("target", target, self.token_dim)
        self._check("cond", cond, self.cond_dim)
        if cond.shape[0] != target.shape[0]:
            raise ValueError(f"target and cond disagree on N: {target.shape[0]} vs {cond.shape[0]}")
        if batch_mul > 1:
            target, cond = target.repeat(batch_mul, 1), cond.repeat(batch_mul, 1)
            mask = mask.repeat(batch_mul) if mask is not None else None
        n, device = target.shape[0], target.device
        diffusion = self.schedule(None, device)
        t = randint(diffusion.num_timesteps, (n,), generator=generator, device=device)
        noise = randn(target.shape, generator=generator, device=device, dtype=target.dtype)
        xt = diffusion.q_sample(target, t, noise)
        out = self.net(xt, t, cond)
        eps, v = out.chunk(2, dim=1)
        mse = (eps - noise).pow(2).mean(1)
        # the VB term trains only the variance: its mean prediction is detached
        vb = diffusion.vb_terms(torch.cat([eps.detach(), v], 1), target, xt, t)
        per_row = mse + vb
        if mask is None:
            loss = per_row.mean()
        else:
            mask = mask.to(per_row.dtype)
            loss = (per_row * mask).sum() / mask.sum().clamp_min(1.0)
        return DiffusionLossOutput(loss, mse.detach(), vb.detach())

    forward = loss

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, *, uncond: Optional[torch.Tensor] = None, cfg: float = 1.0,
               temperature: float = 1.0, num_steps: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw one token per row of `cond` (N, Z) by ancestral sampling over respaced steps.
        `temperature` scales the per-step noise (not x_T); with `uncond` (N, Z) and `cfg` != 1 the eps
        prediction is guided: eps_u + cfg (eps_c - eps_u), cond and uncond rows sharing their noise."""
        self._check("cond", cond, self.cond_dim)
        guided = uncond is not None and cfg != 1.0
        if guided:
            self._check("uncond", uncond, self.cond_dim)
            cond = torch.cat([cond, uncond])
        diffusion = self.schedule(self.num_sampling_steps if num_steps is None else num_steps, cond.device)
        n = cond.shape[0] // 2 if guided else cond.shape[0]
        kw = dict(device=cond.device, dtype=cond.dtype, generator=generator)
        x = randn((n, self.token_dim), **kw)
        tmap = diffusion.timestep_map.to(cond.device)
        for i in reversed(range(diffusion.num_timesteps)):
            t = torch.full((n,), i, device=cond.device, dtype=torch.long)
            xin = torch.cat([x, x]) if guided else x
            out = self.net(xin, tmap[torch.cat([t, t]) if guided else t], cond)
            if guided:
                eps, v = out.chunk(2, dim=1)
                eps_c, eps_u = eps.chunk(2)
                out = torch.cat([eps_u + cfg * (eps_c - eps_u), v[:n]], dim=1)  # the cond rows' variance
            mean, logvar, _ = diffusion.p_mean_variance(out, x, t)
            if i > 0:
                x = mean + torch.exp(0.5 * logvar) * randn(x.shape, **kw) * temperature
            else:
                x = mean
        return x

    @classmethod
    def from_mar(cls, path: str | Path, *, ema: bool = True, **overrides) -> "DiffusionHead":
        """Load the head from a MAR checkpoint (`{'model', 'model_ema', ..., 'args'}`; `diffloss.net.*`
        weights). The architecture is read off the weight shapes. Weights only: the one non-tensor
        class allowed in the pickle is argparse.Namespace (MAR's `args`); anything else is refused."""
        ckpt = read_checkpoint(path, allowed_globals=[argparse.Namespace])
        key = "model_ema" if ema and isinstance(ckpt, dict) and "model_ema" in ckpt else "model"
        sd = ckpt.get(key, ckpt) if isinstance(ckpt, dict) else ckpt
        net = {k[len("net."):]: v for k, v in strip_prefixes(sd, ("module.", "diffloss.")).items()
               if k.startswith("net.")}
        if not net:
            raise ValueError(f"{path} has no diffloss.net.* weights (looked in {key!r})")
        width, token_dim = net["input_proj.weight"].shape
        depth = len({k.split(".")[1] for k in net if k.startswith("res_blocks.")})
        args = dict(token_dim=token_dim, cond_dim=net["cond_embed.weight"].shape[1], width=width, depth=depth)
        head = cls(**{**args, **overrides})
        load_state_dict_strict(head.net, {k: v.float() for k, v in net.items()}, target=f"DiffusionHead from {path}")
        return head
