"""Presets (JSON files in presets/) and the factory: create_tokenizer, load_tokenizer, list_models."""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import torch

from ..weights import (CONFIG_NAME, WEIGHTS_NAME, check_model_args, load_state_dict_strict, read_release,
                       read_release_config, tokenizer_class)
from .base import VisualTokenizer, build_checked
from .empty_init import assign_state_dict, parameters_on_meta

HF_HUB_PREFIX = "hf-hub:"


@lru_cache(maxsize=None)
def _presets() -> dict[str, dict]:
    out = {}
    for entry in resources.files(__package__).joinpath("presets").iterdir():
        if entry.name.endswith(".json"):
            preset = json.loads(entry.read_text())
            out[preset["name"]] = preset
    return out


def list_models(pattern: Optional[str] = None) -> list[str]:
    """Preset names, optionally filtered by a glob pattern ("*kl*")."""
    names = sorted(_presets())
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def get_preset(name: str) -> dict:
    """A copy of preset `name` ({name, class, description, args}); ValueError naming close matches if unknown."""
    presets = _presets()
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; available: {', '.join(sorted(presets))}"
        raise ValueError(f"unknown model {name!r}{hint}")
    return json.loads(json.dumps(presets[name]))


# whole architecture descriptions: an override replaces the preset's (an HF SigLIP geometry merged into
# an open_clip one would build neither); a partial update of a named open_clip model still works through
# clip_model + clip_config (see siglip.clip_model_config)
REPLACED_WHOLE = ("clip_config",)


def _merge(base: dict, overrides: dict, top: bool = True) -> dict:
    out = dict(base)
    for k, v in overrides.items():
        merge = isinstance(v, dict) and isinstance(out.get(k), dict) and not (top and k in REPLACED_WHOLE)
        out[k] = _merge(out[k], v, top=False) if merge else v
    return out


def create_tokenizer(name: str, **overrides) -> VisualTokenizer:
    """Build a preset with freshly initialised weights (never downloads). Keyword overrides replace
    constructor arguments; dicts (`preprocess`, `decoder`) are merged into the preset's, except
    `clip_config`, which replaces it whole. `hf-hub:org/name[@revision]` loads that release from the
    local Hugging Face cache instead (as `load_tokenizer`; overrides do not apply to trained weights)."""
    if str(name).startswith(HF_HUB_PREFIX):
        if overrides:
            raise ValueError(f"{name} is a trained release: overrides ({', '.join(sorted(overrides))}) do not apply "
                             "to it; load it with vistok.load_tokenizer, or build a preset to change its arguments")
        return load_tokenizer(name)
    cls, args, source = _preset_args(name, overrides)
    tok = build_checked(cls, args, source)
    tok.preset_name = name  # recorded in a saved release's config.json and model card
    return tok


def _preset_args(name: str, overrides: dict) -> tuple[type[VisualTokenizer], dict, str]:
    preset = get_preset(name)
    cls = tokenizer_class(preset["class"])
    args = check_model_args(cls, _merge(preset.get("args", {}), overrides), f"preset {name!r}", release=False)
    return cls, args, f"preset {name!r}"


def split_hf_hub(spec: str, revision: Optional[str] = None) -> tuple[str, Optional[str]]:
    """`hf-hub:org/name[@rev]` -> (repo_id, revision); a `revision` argument and an `@rev` must agree."""
    repo_id, _, at = spec[len(HF_HUB_PREFIX):].partition("@")
    if not repo_id or repo_id.count("/") > 1:
        raise ValueError(f"{spec!r} is not hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    if at and revision and at != revision:
        raise ValueError(f"{spec!r} names revision {at!r} but revision={revision!r} was given: pass one")
    return repo_id, at or revision


def _resolve_hf_hub(spec: str, revision: Optional[str] = None) -> Path:
    """The folder of `hf-hub:org/name[@rev]` in the local Hugging Face cache (never the network): both release
    files must be there. Raises FileNotFoundError naming what is missing and the command that fetches it."""
    repo_id, revision = split_hf_hub(spec, revision)
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:
        raise OSError("hf-hub: models need the huggingface_hub package (pip install huggingface_hub)") from None
    found = {f: try_to_load_from_cache(repo_id, f, revision=revision) for f in (CONFIG_NAME, WEIGHTS_NAME)}
    missing = [f for f, p in found.items() if not isinstance(p, str)]
    if not missing:
        return Path(found[CONFIG_NAME]).parent
    rev = revision or "main"
    at = f" --revision {revision}" if revision else ""
    raise FileNotFoundError(
        f"{' and '.join(missing)} of {repo_id} at revision {rev!r} not in the local Hugging Face cache "
        f"({constants.HF_HUB_CACHE}); vistok never downloads: fetch them where there is a network with "
        f"`hf download {repo_id} {CONFIG_NAME} {WEIGHTS_NAME}{at}` (same HF_HOME / HF_HUB_CACHE), or pass the "
        "release directory's local path")


def _hub_hint(spec: str) -> str:
    """For `org/name` that is no folder: the hf-hub: spelling that loads it from the Hugging Face cache."""
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and all(spec.split("/")):
        return f"; to load {spec!r} from the Hugging Face Hub (local cache), pass 'hf-hub:{spec}'"
    return ""


def _missing_directory(spec: str, directory: Path) -> FileNotFoundError:
    hint = f" ({spec!r} is a preset: use create_tokenizer)" if spec in _presets() else _hub_hint(spec)
    return FileNotFoundError(f"no such tokenizer directory: {directory}{hint}")


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """`fp32` / `bf16` / `fp16` (or `float32` ..., or a floating torch.dtype) -> torch.dtype; None stays None."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"unsupported dtype {dtype!r}: expected fp32, bf16 or fp16 (or torch.float32/bfloat16/float16)")


def resolve_device(device: Union[str, torch.device, None]) -> Optional[torch.device]:
    """`"auto"` (cuda if available, else cpu, as the CLI's `--device auto`), a device string or torch.device
    -> torch.device; None stays None. ValueError naming the value for anything torch cannot parse."""
    if device is None or isinstance(device, torch.device):
        return device
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unsupported device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N' ({e})") from None


def release_directory(path: str | os.PathLike, revision: Optional[str] = None) -> Path:
    """A release directory, or `hf-hub:org/name[@rev]` resolved in the local Hugging Face cache."""
    spec = str(path)
    if spec.startswith(HF_HUB_PREFIX):
        return _resolve_hf_hub(spec, revision)
    if revision is not None:
        raise ValueError(f"revision={revision!r} applies to hf-hub: models, not to the directory {spec}")
    directory = Path(spec)
    if not directory.exists():
        raise _missing_directory(spec, directory)
    return directory


def load_tokenizer(path: str | os.PathLike, *, revision: Optional[str] = None,
                   device: Union[str, torch.device, None] = None, dtype: Union[str, torch.dtype, None] = None,
                   map_location: Union[str, torch.device, None] = None) -> VisualTokenizer:
    """Load a release directory (config.json + model.safetensors) or `hf-hub:org/name[@revision]` from the
    local Hugging Face cache (never the network), strictly.

    The model is built without initialising its parameters (they are the file's tensors, assigned), then
    moved to `device` (default cpu; `"auto"`: cuda if available, else cpu; `map_location` is the older name) and cast to `dtype` (fp32, bf16, fp16;
    default: as saved, fp32 for vistok's releases). It comes back in eval mode (create_tokenizer's, like any
    fresh nn.Module, is in train mode). Raises FileNotFoundError (no such directory, files missing from the
    cache), CheckpointMismatchError (a ValueError listing missing/unexpected/mis-shaped keys), ValueError
    (a bad config, dtype or revision)."""
    if device is not None and map_location is not None and str(device) != str(map_location):
        raise ValueError(f"device={device!r} and map_location={map_location!r} disagree: pass device only")
    device = resolve_device(device if device is not None else map_location)
    dtype = resolve_dtype(dtype)
    directory = release_directory(path, revision)
    config, weights = read_release(directory)
    source = str(directory / "config.json")
    cls = tokenizer_class(config["_class_name"])
    target = f"{cls.__name__} from {directory}"
    with parameters_on_meta():
        tok = build_checked(cls, config["model_args"], source)
    tok.check_release_config(config, source=source)
    try:
        assign_state_dict(tok, weights, target=target)
    except RuntimeError:  # a module that loads by copying into its parameters: build and copy the usual way
        tok = build_checked(cls, config["model_args"], source)
        load_state_dict_strict(tok, weights, target=target)
    tok.preset_name = config.get("preset")
    tok.eval()
    if device is not None or dtype is not None:
        tok.to(device=device, dtype=dtype)
    return tok


def empty_tokenizer(spec: str, revision: Optional[str] = None) -> VisualTokenizer:
    """A preset, release directory or `hf-hub:` release built with its parameters on the meta device: shapes,
    counts and config without allocating or initialising weights (what `vistok info` shows). Buffers are real."""
    if spec.startswith(HF_HUB_PREFIX) or Path(spec).exists():
        directory = release_directory(spec, revision)
        config = read_release_config(directory)
        cls, args, source = tokenizer_class(config["_class_name"]), config["model_args"], str(directory / CONFIG_NAME)
    else:
        _check_preset_spec(spec)
        cls, args, source = _preset_args(spec, {})
    with parameters_on_meta():
        return build_checked(cls, args, source)


def _check_preset_spec(spec: str) -> None:
    if os.sep in spec or "/" in spec or spec.startswith("."):
        raise FileNotFoundError(f"no such release directory: {spec}{_hub_hint(spec)}")


def resolve_tokenizer(spec: str) -> VisualTokenizer:
    """A directory, `hf-hub:...` or preset name (random weights) -> tokenizer. Used by the CLI."""
    if spec.startswith(HF_HUB_PREFIX) or Path(spec).exists():
        return load_tokenizer(spec)
    _check_preset_spec(spec)
    return create_tokenizer(spec).eval()
