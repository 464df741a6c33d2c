"""Shared CLI plumbing: model resolution with a random-weights warning, device checks."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .output import warn


def auto_device() -> str:
    """cuda if a CUDA device is available, else cpu: what `--device auto` (the default) means."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_callback(ctx, param, value):
    return auto_device() if value == "auto" else value


def device_option(help_extra: str = ""):
    """--device, default auto (cuda if available, else cpu); commands receive the resolved name."""
    return click.option("--device", default="auto", show_default=True, callback=_device_callback,
                        help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:N" + help_extra)


def dtype_option():
    """--dtype fp32|bf16|fp16, default fp32: the dtype the model's weights are cast to."""
    return click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
                        help="model dtype (weights cast after loading; inputs follow the model)")


def check_device(device: str):
    """`--device` as a torch.device; ValueError when it is malformed or names a CUDA device this machine lacks."""
    from ..tokenizers.registry import resolve_device

    return resolve_device(device, "--device")


def load_model(spec: str, device: str = "auto", dtype: str = "fp32"):
    """A release directory, hf-hub:ORG/NAME, or a preset name (random weights, with a warning), on `device`
    (auto: cuda if available, else cpu) in `dtype` (fp32, bf16, fp16)."""
    from ..tokenizers.registry import HF_HUB_PREFIX, resolve_dtype, resolve_tokenizer

    dev = check_device(device)
    torch_dtype = resolve_dtype(dtype)
    tok = resolve_tokenizer(spec)
    if not spec.startswith(HF_HUB_PREFIX) and not Path(spec).exists():
        warn(f"{spec} is a preset with random weights (pass a release directory for trained weights)")
    return tok.to(device=dev, dtype=torch_dtype).eval()


# ------------------------------------------------------------------------------------------ outputs
def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


#: torch.Generator.manual_seed's range; a larger --seed failed with "Overflow when unpacking long long"
SEED = click.IntRange(-(2**63), 2**64 - 1)


def refuse_overwrite(outputs, inputs, option: str) -> None:
    """ValueError if any output path is (or links to) one of the input files: no command writes over its input."""
    inputs = [Path(p) for p in inputs]
    for out in outputs:
        out = Path(out)
        for inp in inputs:
            if _same_file(out, inp) or out.resolve() == inp.resolve():
                raise ValueError(f"{option} {out} would overwrite the input {inp}; write the output elsewhere")


def refuse_dir_inside_inputs(out_dir, input_paths, option: str) -> None:
    """ValueError if an output directory is an input directory or inside one: its outputs would replace or
    mix with the inputs (and be read as inputs by the next run)."""
    out = Path(out_dir).resolve()
    for p in input_paths:
        p = Path(p)
        if p.is_dir() and (out == p.resolve() or p.resolve() in out.parents):
            raise ValueError(f"{option} {out_dir} is inside the input directory {p}: the outputs would replace or "
                             "mix with the inputs; choose a directory outside it")
