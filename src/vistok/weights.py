"""Weights on the bottom floor: reading weight files without running code, loading them strictly,
and reading vistok release directories.

Everything that puts weights into a module imports from here (tokenizers/, losses/, train/,
convert/); this module imports nothing from those packages, so no import runs upward.

- Third-party files (`.safetensors`, torch pickles) are read with `torch.load(weights_only=True)`:
  never by executing pickled code (`read_checkpoint`).
- `load_state_dict_strict` names every missing, unexpected and mis-shaped key
  (`CheckpointMismatchError`, a ValueError).
- A release directory is `config.json` (`_class_name`, `model_args`, ...) + `model.safetensors`;
  `read_release_config` checks the config against the tokenizer class it names (the class table that
  `register_tokenizer` fills) before anything is built.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from .schema import check_kwargs

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

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


# ---------------------------------------- strict loading
class CheckpointMismatchError(ValueError):
    """Weights that do not fit the model: lists every missing, unexpected and mis-shaped key."""

    def __init__(self, target: str, missing=(), unexpected=(), mismatched=(), wrong_dtype=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        self.wrong_dtype = list(wrong_dtype)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s): {_clip(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s): {_clip(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})" for k, a, b in self.mismatched]
            parts.append(f"{len(shapes)} shape mismatch(es): {_clip(shapes)}")
        if self.wrong_dtype:
            kinds = [f"{k} (checkpoint {a} vs model {b})" for k, a, b in self.wrong_dtype]
            parts.append(f"{len(kinds)} dtype mismatch(es) (integer/bool vs floating): {_clip(kinds)}")
        super().__init__(f"weights do not match {target}: " + "; ".join(parts))


def _clip(items: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def dtype_kind_mismatches(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[tuple]:
    """(key, checkpoint dtype, model dtype) where one is floating (or complex) and the other is not: a cast
    between them (int codes into float weights, float into an integer counter) would silently change the values.
    fp16/bf16 -> fp32 and the like are casts a load may do."""
    def kind(t: torch.Tensor) -> str:
        return "float" if t.is_floating_point() else "complex" if t.is_complex() else "int"
    return [(k, given[k].dtype, v.dtype) for k, v in expected.items() if k in given and kind(given[k]) != kind(v)]


def checked_state_dict(expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor],
                       alias_groups: Iterable[Sequence[str]], target: str) -> dict[str, torch.Tensor]:
    """`state_dict` completed for aliases (keys naming one tensor of the model, given once as safetensors'
    `save_model` stores them) and checked against the model's `expected` state dict. Raises
    `CheckpointMismatchError` naming every missing, unexpected, mis-shaped and integer/floating-mismatched key."""
    given = dict(state_dict)
    for names in alias_groups:
        present = [n for n in names if n in given]
        for n in names:
            if present and n not in given:
                given[n] = given[present[0]]
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [(k, given[k].shape, v.shape) for k, v in expected.items() if k in given and given[k].shape != v.shape]
    wrong_dtype = dtype_kind_mismatches(expected, given)
    if missing or unexpected or mismatched or wrong_dtype:
        raise CheckpointMismatchError(target, missing, unexpected, mismatched, wrong_dtype)
    return given


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], target: str = "") -> None:
    """Strict load that names every problem (see `checked_state_dict`). Keys that alias one tensor in the
    module (a shared codebook) may appear once in `state_dict`, as safetensors' `save_model` stores them."""
    expected = module.state_dict()
    by_storage: dict[tuple, list[str]] = {}
    for k, v in expected.items():
        by_storage.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)), []).append(k)
    given = checked_state_dict(expected, state_dict, by_storage.values(), target or type(module).__name__)
    module.load_state_dict(given, strict=True)


# ---------------------------------------- release directories
_TOKENIZER_CLASSES: dict[str, type[nn.Module]] = {}


def register_tokenizer(cls):
    """Class decorator: make a tokenizer class constructible from a config's `_class_name`."""
    _TOKENIZER_CLASSES[cls.__name__] = cls
    return cls


def tokenizer_class(name: str) -> type[nn.Module]:
    """The tokenizer class registered under `name` (a config's `_class_name`); ValueError listing the known ones."""
    try:
        return _TOKENIZER_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown tokenizer class {name!r}; known: {sorted(_TOKENIZER_CLASSES)}") from None


def _network_flags(value: Any, key: str) -> list[str]:
    """Keys under `value` that would make a library download weights (timm / open_clip `*pretrained*`)."""
    if isinstance(value, dict):
        return [k for name, v in value.items() for k in _network_flags(v, f"{key}.{name}")] + \
            [f"{key}.{name}" for name, v in value.items() if "pretrained" in str(name).lower() and v not in (None, False, "")]
    if isinstance(value, list):
        return [k for i, v in enumerate(value) for k in _network_flags(v, f"{key}[{i}]")]
    return []


def check_model_args(cls: type[nn.Module], args: Any, source: str, *, release: bool) -> dict:
    """Constructor arguments from JSON, checked before anything is built: keys `cls` takes, each of its
    annotated type, no flag that would download weights, and (release=True) no load-time file argument,
    since a release holds its weights. Raises ValueError naming `source` and the key."""
    try:
        args = check_kwargs(cls.__init__, args, "model_args", what=cls.__name__)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    flags = _network_flags(args, "model_args")
    if flags:
        raise ValueError(f"{source}: {', '.join(flags)} would download pretrained weights; vistok never reaches the "
                         "network when building a model (a release holds its weights): set them to false")
    if release:
        files = [f"model_args.{k}" for k in cls.load_time_args if args.get(k) is not None]
        if files:
            raise ValueError(f"{source}: {', '.join(files)} names a file read at construction, but a release holds its "
                             "own weights: set it to null")
    return args


def read_release_config(directory: Path) -> dict:
    """A release directory's config.json, checked: a JSON object with a known `_class_name` and `model_args`
    that fit that class (see `check_model_args`). Raises FileNotFoundError / ValueError naming the file."""
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory} is not a vistok release directory: missing {CONFIG_NAME}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object with '_class_name' and 'model_args', got "
                         f"{type(config).__name__} {str(config)[:60]!r}: not a vistok config")
    if "_class_name" not in config or "model_args" not in config:
        raise ValueError(f"{cfg_path} lacks '_class_name' / 'model_args': not a vistok config")
    if not isinstance(config["_class_name"], str):
        raise ValueError(f"{cfg_path}: _class_name must be a string naming the tokenizer class, got "
                         f"{config['_class_name']!r}")
    try:
        cls = tokenizer_class(config["_class_name"])
    except ValueError as exc:
        raise ValueError(f"{cfg_path}: _class_name: {exc}") from None
    config["model_args"] = check_model_args(cls, config["model_args"], str(cfg_path), release=True)
    return config


def read_release(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a release directory's config (checked, see `read_release_config`) and weights (no model built)."""
    config = read_release_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory} is not a vistok release directory: missing {weights_path.name}")
    try:
        weights = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise ValueError(f"cannot read {weights_path}: {exc}") from exc
    return config, weights
