"""MAR's iterative masked generation (LTH14/mar `models/mar.py` `MAR.sample_tokens`), on vistok's
diffusion head (`vistok.losses.diffusion.DiffusionHead`).

Every image starts fully masked, with its own random order over the h*w positions. Step k of K runs
the encoder on the known tokens and the decoder over all positions, then keeps
floor(h*w cos(pi/2 (k+1)/K)) positions masked (at least one, and at least one fewer than before; the
last step predicts all that remain) and samples the newly revealed ones with the diffusion head,
conditioned on the decoder's output there. Classifier-free guidance runs the same tokens with
`fake_latent` in the buffer as the unconditional branch; the linear schedule (MAR's default, from
Muse) guides with 1 + (cfg - 1) (h*w - still_masked) / (h*w).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from ..progress import progress_bar

if TYPE_CHECKING:
    from .mar import MARTokenizer

CFG_SCHEDULES = ("linear", "constant")


def mask_lengths(num_tokens: int, num_iter: int) -> list[int]:
    """How many positions stay masked after each of the `num_iter` steps (MAR's cosine schedule with
    its clamps); the last entry is 0: the final step predicts everything left."""
    masked, out = num_tokens, []
    for step in range(num_iter):
        target = math.floor(num_tokens * math.cos(math.pi / 2.0 * (step + 1) / num_iter))
        nxt = max(1, min(masked - 1, target))
        masked = 0 if step == num_iter - 1 else nxt
        out.append(masked)
    return out


def _labels(tok: "MARTokenizer", class_labels, num_images: Optional[int], device) -> Optional[torch.Tensor]:
    if class_labels is None:
        if num_images is None or num_images < 1:
            raise ValueError("unconditional sampling needs num_images >= 1 (or pass class_labels)")
        return None
    from .mar import class_label_tensor

    labels = class_label_tensor(class_labels, tok.mar.class_emb.num_embeddings, device)
    if labels.numel() == 0:
        raise ValueError("class_labels is empty: pass at least one label, or None with num_images")
    if num_images is not None and num_images != labels.numel():
        raise ValueError(f"num_images {num_images} disagrees with the {labels.numel()} class labels")
    return labels


@torch.no_grad()
def sample_latents(tok: "MARTokenizer", class_labels: Optional[Sequence[int] | torch.Tensor] = None, *,
                   num_images: Optional[int] = None, num_iter: int = 64, cfg: float = 1.0,
                   cfg_schedule: str = "linear", temperature: float = 1.0, grid: Optional[tuple[int, int]] = None,
                   num_sampling_steps: Optional[int] = None, generator: Optional[torch.Generator] = None,
                   progress: bool = False) -> torch.Tensor:
    """Generate scaled latents (B, C, h, w) with MAR's masked decoding.

    class_labels: (B,) ints in [0, class_num), or None for unconditional (`fake_latent`) with
    `num_images`; num_iter: steps, 1..h*w (MAR's README: 64 or 256); cfg: guidance scale (1 = none);
    temperature: scales the head's per-step noise; grid: token grid (default the training grid; others
    use the resized position embeddings); num_sampling_steps: the head's diffusion steps (default its
    config, MAR: 100); generator: makes the orders and the noise reproducible.
    """
    mar, head = tok.mar, tok.mar.diffloss
    device, dtype = mar.fake_latent.device, mar.fake_latent.dtype
    labels = _labels(tok, class_labels, num_images, device)
    bsz = labels.numel() if labels is not None else num_images
    from .mar import check_grid

    gh, gw = mar.grid if grid is None else check_grid(grid)
    seq_len = gh * gw
    if not 1 <= num_iter <= seq_len:
        raise ValueError(f"num_iter must be in [1, {seq_len}] (the number of tokens), got {num_iter}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if not math.isfinite(cfg):
        raise ValueError(f"cfg must be a finite number, got {cfg}")
    guided = cfg != 1.0
    fake = mar.fake_latent.expand(bsz, -1)
    buffer = mar.class_emb(labels) if labels is not None else fake
    if guided:
        buffer = torch.cat([buffer, fake])
    gen_device = generator.device if generator is not None else device
    orders = torch.stack([torch.randperm(seq_len, generator=generator, device=gen_device) for _ in range(bsz)]).to(device)
    tokens = torch.zeros(bsz, seq_len, mar.token_dim, device=device, dtype=dtype)
    mask = torch.ones(bsz, seq_len, dtype=torch.bool, device=device)
    steps = range(num_iter)
    if progress:
        steps = progress_bar(steps, desc="MAR sampling")
    for step, still_masked in zip(steps, mask_lengths(seq_len, num_iter)):
        both = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
        x = mar.forward_encoder(both(tokens), (gh, gw), buffer, both(mask))
        z = mar.forward_decoder(x, (gh, gw), both(mask))
        mask_next = torch.zeros_like(mask).scatter_(1, orders[:, :still_masked], True)
        to_pred = mask & ~mask_next
        if cfg_schedule == "linear":
            # MAR uses the clamped next mask length, which is 1 (not 0) at the last step
            cfg_iter = 1 + (cfg - 1) * (seq_len - max(still_masked, 1)) / seq_len
        else:
            cfg_iter = cfg
        cond = z[:bsz][to_pred]
        uncond = z[bsz:][to_pred] if guided else None
        sampled = head.sample(cond, uncond=uncond, cfg=cfg_iter, temperature=temperature,
                              num_steps=num_sampling_steps, generator=generator)
        tokens = tokens.clone()
        tokens[to_pred] = sampled.to(dtype)
        mask = mask_next
    from .kl import KLTokenizer

    return KLTokenizer.unpatchify(tokens, (gh, gw), tok.patch_size)
