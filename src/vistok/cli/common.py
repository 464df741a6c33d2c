"""Shared CLI plumbing: model resolution with a random-weights warning, device checks."""

from __future__ import annotations

from pathlib import Path

from .output import log


def check_device(device: str):
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"invalid --device {device!r} (expected cpu, cuda, cuda:N, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def load_model(spec: str, device: str = "cpu"):
    """A release directory, hf-hub:ORG/NAME, or a preset name (random weights, with a warning)."""
    from ..tokenizers.registry import HF_HUB_PREFIX, resolve_tokenizer

    dev = check_device(device)
    tok = resolve_tokenizer(spec)
    if not spec.startswith(HF_HUB_PREFIX) and not Path(spec).exists():
        log(f"warning: {spec} is a preset with random weights (pass a release directory for trained weights)")
    return tok.to(dev).eval()
