"""Presets (JSON files in presets/) and the factory: create_tokenizer, load_tokenizer, list_models."""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional

from .base import (CONFIG_NAME, VisualTokenizer, build_checked, check_model_args, load_state_dict_strict, read_release,
                   read_release_config, tokenizer_class)
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
    `clip_config`, which replaces it whole."""
    cls, args, source = _preset_args(name, overrides)
    return build_checked(cls, args, source)


def _preset_args(name: str, overrides: dict) -> tuple[type[VisualTokenizer], dict, str]:
    preset = get_preset(name)
    cls = tokenizer_class(preset["class"])
    args = check_model_args(cls, _merge(preset.get("args", {}), overrides), f"preset {name!r}", release=False)
    return cls, args, f"preset {name!r}"


def _resolve_hf_hub(spec: str) -> Path:
    repo_id = spec[len(HF_HUB_PREFIX):]
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "model.safetensors"]))
    except ImportError:
        raise OSError("hf-hub: models need the huggingface_hub package (pip install huggingface_hub)") from None
    except Exception as exc:
        raise OSError(f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}): without a "
                      "network, download the directory elsewhere and pass its local path") from None


def load_tokenizer(path: str | os.PathLike, *, map_location: str = "cpu") -> VisualTokenizer:
    """Load a release directory (config.json + model.safetensors) or `hf-hub:org/name`, strictly.
    The model comes back in eval mode (create_tokenizer's, like any fresh nn.Module, is in train mode)."""
    spec = str(path)
    directory = _resolve_hf_hub(spec) if spec.startswith(HF_HUB_PREFIX) else Path(spec)
    if not directory.exists():
        hint = f" ({spec!r} is a preset: use create_tokenizer)" if spec in _presets() else ""
        raise FileNotFoundError(f"no such tokenizer directory: {directory}{hint}")
    config, weights = read_release(directory)
    source = str(directory / "config.json")
    cls = tokenizer_class(config["_class_name"])
    target = f"{cls.__name__} from {directory}"
    with parameters_on_meta():  # the file overwrites every parameter: nothing to initialise
        tok = build_checked(cls, config["model_args"], source)
    tok.check_release_config(config, source=source)
    try:
        assign_state_dict(tok, weights, target=target)
    except RuntimeError:  # a module that loads by copying into its parameters: build and copy the usual way
        tok = build_checked(cls, config["model_args"], source)
        load_state_dict_strict(tok, weights, target=target)
    tok.eval()
    if map_location != "cpu":
        tok.to(map_location)
    return tok


def empty_tokenizer(spec: str) -> VisualTokenizer:
    """A preset or release directory built with its parameters on the meta device: shapes, counts and config
    without allocating or initialising weights (what `vistok info` shows). Buffers are real."""
    if spec.startswith(HF_HUB_PREFIX) or Path(spec).exists():
        directory = _resolve_hf_hub(spec) if spec.startswith(HF_HUB_PREFIX) else Path(spec)
        config = read_release_config(directory)
        cls, args, source = tokenizer_class(config["_class_name"]), config["model_args"], str(directory / CONFIG_NAME)
    else:
        if os.sep in spec or "/" in spec or spec.startswith("."):
            raise FileNotFoundError(f"no such release directory: {spec}")
        cls, args, source = _preset_args(spec, {})
    with parameters_on_meta():
        return build_checked(cls, args, source)


def resolve_tokenizer(spec: str) -> VisualTokenizer:
    """A directory, `hf-hub:...` or preset name (random weights) -> tokenizer. Used by the CLI."""
    if spec.startswith(HF_HUB_PREFIX) or Path(spec).exists():
        return load_tokenizer(spec)
    if os.sep in spec or "/" in spec or spec.startswith("."):
        raise FileNotFoundError(f"no such release directory: {spec}")
    return create_tokenizer(spec).eval()
