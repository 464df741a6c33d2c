"""Training configuration: JSON files or shipped recipes, `--set section.key=value` overrides,
unknown keys rejected by name, the resolved config saved with the run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Optional


@dataclass
class ModelConfig:
    preset: str = "tiny-dualtoken"
    overrides: dict = field(default_factory=dict)  # constructor arguments on top of the preset
    init: Optional[str] = None  # a release directory to start from instead of the preset's random weights


@dataclass
class DataConfig:
    source: str = "builtin:photos-train"  # directory, .jsonl/.csv list, webdataset shards (*.tar, brace ranges) or builtin:
    eval_source: Optional[str] = "builtin:photos"  # held-out images scored (PSNR) at the start and end
    eval_limit: int = 64
    workers: int = 0
    crop_scale: tuple = (0.9, 1.0)  # RandomResizedCrop area range (DualToken: open_clip's (0.9, 1.0))
    hflip: bool = False
    shuffle_buffer: int = 1000  # webdataset only


@dataclass
class OptimConfig:
    lr: float = 7.2e-5
    betas: tuple = (0.5, 0.9)
    weight_decay: float = 1e-4
    warmup_steps: int = 10000
    schedule: str = "cosine"  # cosine | constant
    min_lr: float = 0.0
    grad_clip: Optional[float] = None
    disc_lr: Optional[float] = None  # None: the main lr
    disc_betas: tuple = (0.5, 0.9)
    disc_min_lr: float = 4e-5
    disc_warmup_steps: Optional[int] = None  # None: warmup_steps (DualToken: half an epoch)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # per process
    accumulation: int = 1
    precision: str = "bf16"  # bf16 | fp32 (quantizers always run in fp32)
    seed: int = 0
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 3
    image_every: int = 1000
    ema_decay: Optional[float] = None
    grad_checkpointing: bool = False
    export: bool = True  # write OUT/export (a release directory) at the end


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    family: str = "dualtoken"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: dict = field(default_factory=dict)  # keyword arguments of the family's loss
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("vistok.train").joinpath("recipes").iterdir()
                  if p.name.endswith(".json"))


def read_config_source(source: str) -> dict:
    """A JSON file path, or the name of a recipe shipped with the package."""
    path = Path(source)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {source}")
        text = path.read_text()
    else:
        recipe = resources.files("vistok.train").joinpath("recipes", f"{source}.json")
        if not recipe.is_file():
            raise ValueError(f"{source!r} is neither a JSON file nor a recipe; recipes: {', '.join(recipe_names())}")
        text = recipe.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a config is a JSON object with sections {['family', 'loss', *SECTIONS]}")
    data.pop("description", None)
    return data


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string such as a path or preset name


def apply_overrides(data: dict, assignments: list[str]) -> dict:
    """`section.key=value` (value parsed as JSON when it is JSON); nested keys with more dots."""
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        target = data
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {dotted}: {part!r} is not a section")
        target[parts[-1]] = _parse_value(value)
    return data


def _section(cls, values: Any, name: str):
    if not isinstance(values, dict):
        raise ValueError(f"config section {name!r} must be an object, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                         f"{name} takes: {', '.join(sorted(known))}")
    return cls(**values)


def build_config(data: dict) -> RunConfig:
    top = {"family", "loss", *SECTIONS}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; sections: {sorted(top)}")
    cfg = RunConfig(family=data.get("family", "dualtoken"), loss=dict(data.get("loss", {})),
                    **{name: _section(cls, data.get(name, {}), name) for name, cls in SECTIONS.items()})
    from .objectives import objective_class

    objective_class(cfg.family).check_loss_args(cfg.loss)
    if cfg.train.precision not in ("bf16", "fp32"):
        raise ValueError(f"train.precision must be 'bf16' or 'fp32', got {cfg.train.precision!r}")
    if cfg.optim.schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {cfg.optim.schedule!r}")
    for key in ("steps", "batch_size", "accumulation", "log_every", "save_every", "keep_last", "image_every"):
        if getattr(cfg.train, key) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {getattr(cfg.train, key)}")
    return cfg


def load_config(source: str, assignments: list[str] = ()) -> RunConfig:
    return build_config(apply_overrides(read_config_source(source), list(assignments)))
