"""`vistok.train(...)`: the function behind `vistok train`, for training from Python."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .config import RunConfig, apply_overrides, build_config, read_config_source


def _config_data(recipe_or_config: Any) -> tuple[dict, Optional[str]]:
    """(config dict, the name a default run folder is called after)."""
    if isinstance(recipe_or_config, RunConfig):
        return recipe_or_config.to_dict(), None
    if isinstance(recipe_or_config, Mapping):
        data = copy.deepcopy(dict(recipe_or_config))  # overrides must not write into the caller's dict
        data.pop("description", None)
        return data, None
    if isinstance(recipe_or_config, (str, os.PathLike)):
        source = os.fspath(recipe_or_config)
        return read_config_source(source), Path(source).stem
    raise ValueError("recipe_or_config must be a recipe name, a JSON file path, a config dict or a RunConfig, "
                     f"got {type(recipe_or_config).__name__}")


def _apply_values(data: dict, overrides: Mapping[str, Any]) -> dict:
    """{"section.key": value} with Python values (not JSON text), nested keys with more dots."""
    for dotted, value in overrides.items():
        if not isinstance(dotted, str) or not dotted.strip():
            raise ValueError(f"overrides keys are 'section.key' strings, got {dotted!r}")
        parts = dotted.strip().split(".")
        target = data
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"overrides {dotted}: {part!r} is not a section")
        target[parts[-1]] = value
    return data


def resolve_config(recipe_or_config: Any, *, overrides: Optional[Mapping[str, Any]] = None,
                   set: Sequence[str] = ()) -> RunConfig:  # noqa: A002 (the CLI's --set)
    """The checked RunConfig of a recipe/file/dict/RunConfig with `overrides` ({"train.steps": 100}, Python
    values) and then `set` (["train.steps=100"], JSON text as on the command line) applied."""
    return _resolve(_config_data(recipe_or_config)[0], overrides, set)


def _resolve(data: dict, overrides: Optional[Mapping[str, Any]], assignments: Sequence[str]) -> RunConfig:
    if isinstance(assignments, str):
        raise ValueError(f"set is a list of 'section.key=value' strings, got the string {assignments!r}")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ValueError(f"overrides is a dict of 'section.key': value, got {type(overrides).__name__}")
    return build_config(apply_overrides(_apply_values(data, overrides or {}), list(assignments)))


def train(recipe_or_config: Union[str, os.PathLike, Mapping, RunConfig], out: Union[str, os.PathLike, None] = None, *,
          overrides: Optional[Mapping[str, Any]] = None, set: Sequence[str] = (),  # noqa: A002 (the CLI's --set)
          resume: bool = False, quiet: bool = False) -> dict:
    """Train a tokenizer, as `vistok train` does, and return the run's summary.

    Args:
        recipe_or_config: a shipped recipe name ("quickstart", "dualtoken-tiny", ...), a JSON config file, a
            config dict (the file's contents) or a `RunConfig`.
        out: the run folder; default `checkpoints/<recipe or file name>` (required for a dict or RunConfig).
        overrides: {"section.key": value} with Python values, e.g. {"train.steps": 100, "data.hflip": True}.
        set: ["section.key=value", ...] parsed as on the command line (JSON values, else strings); applied
            after `overrides`.
        resume: continue from the latest readable checkpoint in `out`.
        quiet: no progress bar and no log lines on stderr.

    Returns:
        {"start_step", "psnr_before" (runs from step 0), "steps", "seconds", "skipped_images", "psnr_after",
        "export" (with train.export), "run_dir"}: PSNRs in dB on the held-out `data.eval_source` (None without
        one). Under torchrun every rank trains and returns the summary.

    Raises:
        ValueError: unknown or out-of-range config keys (named), an `out` that already holds checkpoints without
            `resume`, a non-finite loss (FloatingPointError, a ValueError's sibling), missing data.
        FileNotFoundError: a config file, data source or (with `resume`) checkpoint that does not exist.
    """
    from .trainer import Trainer

    data, name = _config_data(recipe_or_config)
    cfg = _resolve(data, overrides, set)
    if out is None:
        if name is None:
            raise ValueError("out is required when training from a config dict or RunConfig (no name to call "
                             "the run folder after)")
        out = Path("checkpoints") / name
    summary = Trainer(cfg, Path(out), resume=resume, quiet=quiet).fit()
    return {**summary, "run_dir": str(out)}
