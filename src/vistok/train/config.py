"""Training configuration: JSON files or shipped recipes, `--set section.key=value` overrides,
unknown keys rejected by name, the resolved config saved with the run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
import typing
from typing import Any, Optional

from ..schema import check_range, check_value


def _f(default, **limits):
    """A config field with its range (ge, gt, le, lt, choices; for lists each value), checked by `build_config`."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=limits)
    return field(default=default, metadata=limits)


@dataclass
class ModelConfig:
    preset: str = "tiny-dualtoken"
    overrides: dict = _f({})  # constructor arguments on top of the preset
    init: Optional[str] = None  # a release directory to start from instead of the preset's random weights


@dataclass
class DataConfig:
    source: str = "builtin:photos-train"  # directory, .jsonl/.csv list, webdataset shards (*.tar, brace ranges) or builtin:
    eval_source: Optional[str] = "builtin:photos"  # held-out images scored (PSNR) at the start and end
    eval_limit: int = _f(64, ge=1)
    workers: int = _f(0, ge=0)
    crop_scale: tuple[float, float] = _f((0.9, 1.0), gt=0.0, le=1.0)  # RandomResizedCrop area range (open_clip's)
    hflip: bool = False
    shuffle_buffer: int = _f(1000, ge=0)  # webdataset only: samples shuffled within this buffer (0 or 1: off)
    shard_shuffle: int = _f(100, ge=0)  # webdataset only: shard order shuffled within this buffer per pass (0 or 1: off)


@dataclass
class OptimConfig:
    lr: float = _f(7.2e-5, gt=0.0)
    betas: tuple[float, float] = _f((0.5, 0.9), ge=0.0, lt=1.0)
    weight_decay: float = _f(1e-4, ge=0.0)
    warmup_steps: int = _f(10000, ge=0)
    schedule: str = _f("cosine", choices=("cosine", "constant"))
    min_lr: float = _f(0.0, ge=0.0)
    grad_clip: Optional[float] = _f(None, gt=0.0)
    disc_lr: Optional[float] = _f(None, gt=0.0)  # None: the main lr
    disc_betas: tuple[float, float] = _f((0.5, 0.9), ge=0.0, lt=1.0)
    disc_min_lr: float = _f(4e-5, ge=0.0)
    disc_warmup_steps: Optional[int] = _f(None, ge=0)  # None: warmup_steps (DualToken: half an epoch)


@dataclass
class TrainConfig:
    steps: int = _f(1000, ge=1, le=10**12)  # an integral float such as 1e300 is not a run length
    batch_size: int = _f(32, ge=1)  # per process
    accumulation: int = _f(1, ge=1)
    precision: str = _f("bf16", choices=("bf16", "fp32"))  # quantizers always run in fp32
    seed: int = _f(0, ge=0, le=2**63 - 1)  # torch seeds are 64-bit; seed + 1 + rank must stay one
    log_every: int = _f(10, ge=1)
    save_every: int = _f(1000, ge=1)
    keep_last: int = _f(3, ge=1)
    image_every: int = _f(1000, ge=1)  # reconstruction grid of held-out images (and always at the last step)
    eval_every: int = _f(1000, ge=1)  # held-out PSNR/SSIM/codebook usage (at step 0, every N steps and the last)
    ema_decay: Optional[float] = _f(None, gt=0.0, lt=1.0)
    grad_checkpointing: bool = False  # recompute the tower's and the pixel decoder's blocks in backward
    compile: bool = False  # torch.compile the model's training forward
    fused_optimizer: bool = True  # fused AdamW kernel (CUDA only; elsewhere the plain one)
    channels_last: bool = False  # CUDA only: decoder / discriminator convolutions in NHWC memory format
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
    """Every key known, of its annotated type and inside its range, before the dataclass is built."""
    if not isinstance(values, dict):
        raise ValueError(f"config section {name!r} must be an object, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                         f"{name} takes: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in values.items():
        checked[key] = check_value(value, hints[key], f"{name}.{key}")
        check_range(checked[key], f"{name}.{key}", **known[key].metadata)
    return cls(**checked)


def _check_relations(cfg: RunConfig) -> None:
    lo, hi = cfg.data.crop_scale
    if lo > hi:
        raise ValueError(f"data.crop_scale must be [low, high] with low <= high, got {list(cfg.data.crop_scale)}")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ValueError(f"optim.min_lr ({cfg.optim.min_lr}) must not exceed optim.lr ({cfg.optim.lr})")


def build_config(data: Any) -> RunConfig:
    """A config dict -> RunConfig, every value type- and range-checked (errors name the key) and the model's
    family checked against `family`, before anything is built."""
    if not isinstance(data, dict):
        raise ValueError(f"a config is a JSON object with sections {['family', 'loss', *SECTIONS]}, got {data!r}")
    top = {"family", "loss", *SECTIONS}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; sections: {sorted(top)}")
    from .objectives import objective_class

    family = check_value(data.get("family", "dualtoken"), str, "family")
    objective = objective_class(family)
    loss = objective.check_loss_args(data.get("loss", {}))
    cfg = RunConfig(family=family, loss=loss,
                    **{name: _section(cls, data.get(name, {}), name) for name, cls in SECTIONS.items()})
    _check_relations(cfg)
    objective.check_model(cfg)
    return cfg


def load_config(source: str, assignments: list[str] = ()) -> RunConfig:
    return build_config(apply_overrides(read_config_source(source), list(assignments)))
