"""Random draws that honour a user's generator wherever the tensors live.

Drawing on the generator's own device and moving the result (as diffusers' `randn_tensor` does)
lets a CPU `torch.Generator` drive CUDA tensors, and gives the same numbers on every device.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def randn(shape: Sequence[int], *, generator: Optional[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal draws of `shape` on `generator`'s device (then moved to `device`), or torch's global
    RNG without one."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def randint(high: int, shape: Sequence[int], *, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """Uniform ints in [0, high) of `shape` on `generator`'s device (then moved to `device`), or torch's global RNG."""
    if generator is None:
        return torch.randint(0, high, tuple(shape), device=device)
    return torch.randint(0, high, tuple(shape), generator=generator, device=generator.device).to(device)
