"""Reading third-party checkpoint files safely: pickles with weights_only=True, or safetensors."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch


def read_checkpoint(path: str | Path, *, allowed_globals: Sequence[type] = ()) -> object:
    """Load a `.safetensors` file or a torch pickle without executing code. A pickle that needs
    code execution (custom classes, ...) is refused with a clear message; `allowed_globals` names
    plain-data classes to accept (e.g. argparse.Namespace, which MAR stores as `args`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error type for corrupt files
            raise ValueError(f"cannot read checkpoint {path}: {exc}") from None
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch zip archive or legacy pickle
        raise ValueError(f"{path} is not a readable torch checkpoint (neither a zip archive nor a pickle)")
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(
            f"refusing to load {path}: it needs code execution to unpickle, and vistok only reads weights "
            f"(torch.load(weights_only=True)). Re-save just the state dict in a trusted environment, e.g. "
            f"torch.save(torch.load(f, weights_only=False)['model'], 'weights.pt'). Detail: {first}"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from None


def unwrap_state_dict(obj: object, keys: Iterable[str] = ("model", "state_dict")) -> dict[str, torch.Tensor]:
    """Find the flat name -> tensor dict inside a checkpoint (`{"model": sd}`, `{"state_dict": sd}`, bare)."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in keys if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    found = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"no state dict found (looked for a flat tensor dict or keys {list(keys)}); found {found}")


def strip_prefixes(state_dict: dict[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove any of `prefixes` from the front of each key, repeatedly (`module.vae.encoder...`)."""
    prefixes = tuple(prefixes)
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out
