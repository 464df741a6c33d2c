"""Reading third-party checkpoint files safely: pickles with weights_only=True, or safetensors."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch


# NumPy renamed `numpy.core` to `numpy._core` in 2.0; pickles name the module that wrote them
_NUMPY_SCALAR_NAMES = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
# fixed-size numeric dtypes only. Their __setstate__ ignores a pickle's itemsize and flags; that of the
# flexible ones (bytes "S", str "U", void "V") and of datetime/timedelta ("M", "m") accepts a crafted
# itemsize with the item-is-pointer flag, and `scalar` then reads out of bounds (a segfault)
_NUMPY_DTYPE_CODES = "?bhilqpBHILQPefdgFDG"
_STATE_DICT_KEYS = ("state_dict", "model", "ema", "module")


def numpy_plain_globals() -> list:
    """The NumPy globals a pickled NumPy scalar needs (`scalar`, `dtype` and the numeric dtype
    classes), under both the NumPy-1 and the NumPy-2 module names. Reconstructing them copies bytes
    into a scalar and runs no other code. Bytes, str, void and datetime dtypes are not allowed: a
    pickle can rebuild one (its __setstate__ is what unpickling calls) that makes `scalar` read out of
    bounds."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # NumPy < 2
        from numpy.core.multiarray import scalar
    dtype_classes = {type(np.dtype(c)) for c in _NUMPY_DTYPE_CODES}
    return [*((scalar, name) for name in _NUMPY_SCALAR_NAMES), np.dtype, *sorted(dtype_classes, key=str)]


def read_checkpoint(path: str | Path, *, allowed_globals: Sequence = ()) -> object:
    """Load a `.safetensors` file or a torch pickle without executing code.

    Pickles are read with `torch.load(weights_only=True)`; besides torch's own list, the plain-data
    NumPy scalar and dtype globals (both spellings, see `numpy_plain_globals`) and `allowed_globals`
    (classes, or `(object, "module.name")` pairs, e.g. argparse.Namespace, which MAR stores as `args`)
    are accepted. Raises FileNotFoundError for a missing file, and ValueError for an unreadable file
    or for a pickle that needs code execution; that message names the refused globals and the
    top-level keys the file holds."""
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
    with torch.serialization.safe_globals([*numpy_plain_globals(), *allowed_globals]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(_refusal_message(path, exc)) from None
        except (RuntimeError, EOFError, OSError) as exc:  # e.g. "[Errno 22] Invalid argument" for a cut zip
            raise ValueError(f"cannot read checkpoint {path} (truncated or damaged?): {exc}") from None


def _refusal_message(path: Path, exc: Exception) -> str:
    """Name what was refused (the globals torch does not allow) and what the file holds."""
    try:
        refused = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) files cannot be scanned statically
        refused = []
    if not refused:
        lines = [line.strip() for line in str(exc).splitlines()
                 if "GLOBAL" in line or "Unsupported" in line or "Can only build" in line]
        refused = lines[:1] or [str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__]
    keys = top_level_keys(path)
    key = next((k for k in _STATE_DICT_KEYS if k in keys), None)
    load = "torch.load(f, weights_only=False)" + (f"[{key!r}]" if key else "")
    held = f"; the file holds the keys {keys}" if keys else ""
    return (f"refusing to load {path}: it needs code execution to unpickle (refused global(s): "
            f"{', '.join(refused)}), and vistok only reads weights (torch.load(weights_only=True)){held}. "
            f"If you trust the file, re-save its weights in a trusted environment: "
            f"torch.save({load}, 'weights.pt')")


class _Opaque(dict):
    """Stands in for every global while listing a pickle's keys: never imports or calls the real one."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def __setstate__(self, state):
        pass


class _KeyLister(pickle.Unpickler):
    def find_class(self, module, name):
        return _Opaque

    def persistent_load(self, pid):
        return None


def top_level_keys(path: str | Path) -> list[str]:
    """The top-level keys of a torch zip checkpoint, read without importing or running any of its
    globals (each becomes an inert placeholder). Empty when the file is not a zip checkpoint or its
    top level is not a mapping."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            obj = _KeyLister(io.BytesIO(archive.read(name))).load()
    except Exception:
        return []
    return [str(k) for k in obj] if isinstance(obj, Mapping) else []


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


def check_destination(dst: str | Path, kind: str, *, overwrite: bool = False) -> None:
    """Refuse a conversion's DST that would overwrite or mix with other files: DST must be new, empty,
    or, with `overwrite`, a release an earlier `vistok convert KIND` wrote (only config.json and
    model.safetensors, with `source.kind == kind`), which converting again replaces. Called before
    anything is read or written; ValueError otherwise."""
    import json

    dst = Path(dst)
    if not dst.exists():
        return
    if not dst.is_dir():
        raise ValueError(f"destination {dst} exists and is not a directory; nothing was written")
    held = sorted(p.name for p in dst.iterdir())
    if not held:
        return
    try:
        kind_there = json.loads((dst / "config.json").read_text()).get("source", {}).get("kind")
    except (OSError, ValueError, AttributeError):
        kind_there = None
    if set(held) <= {"config.json", "model.safetensors"} and kind_there == kind:
        if overwrite:
            return
        raise ValueError(f"destination {dst} already holds a `vistok convert {kind}` release; pass --overwrite "
                         "(overwrite=True) to replace it, nothing was written")
    raise ValueError(f"destination {dst} is not empty and is not an earlier `vistok convert {kind}` release "
                     f"(it holds {held[:5]}{' ...' if len(held) > 5 else ''}); choose a new directory, "
                     "nothing was written")


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
