"""Training-speed options the trainer and benchmarks/dualtoken_throughput.py apply the same way:
fused AdamW and channels-last convolutions on CUDA, and `torch.compile` of the model.

None of them changes the maths: fused AdamW is the same update in one kernel per parameter group
(torch's `fused=True`, CUDA only here); channels-last only changes the memory layout of the pixel
decoder's / discriminator's convolution weights and activations (cuDNN's NHWC kernels avoid the
NCHW <-> NHWC conversions); `torch.compile` fuses elementwise work between the model's kernels
(graph breaks where the quantizers branch on data, which run eagerly).
"""

from __future__ import annotations

import torch
from torch import nn

# modules whose convolutions go channels-last: DualToken's pixel decoder path, the VQGAN / KL decoders
CONV_PARTS = ("post_quant", "decoder", "encoder", "post_quant_conv", "quant_conv")


def make_adamw(groups: list[dict], *, lr: float, betas: tuple[float, float], device: torch.device,
               fused: bool = True) -> torch.optim.AdamW:
    """AdamW; `fused=True` takes torch's fused kernel where the parameters are on CUDA (ignored elsewhere)."""
    use_fused = fused and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **({"fused": True} if use_fused else {}))


def channels_last(model: nn.Module, *others: nn.Module | None, device: torch.device) -> list[str]:
    """Convolution-heavy parts (CONV_PARTS of `model`, plus `others` such as the discriminator) to
    channels-last memory format on CUDA; returns the names converted (none on other devices)."""
    if device.type != "cuda":
        return []
    done = []
    for name in CONV_PARTS:
        part = getattr(model, name, None)
        if isinstance(part, nn.Module):
            part.to(memory_format=torch.channels_last)
            done.append(name)
    for i, part in enumerate(o for o in others if o is not None):
        part.to(memory_format=torch.channels_last)
        done.append(f"other{i}")
    return done


def compile_module(module: nn.Module) -> nn.Module:
    """`torch.compile(module)` (default mode, dynamic shapes off: the batch shape is fixed in training)."""
    return torch.compile(module, dynamic=False)
