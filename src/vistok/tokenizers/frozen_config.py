"""FrozenConfig: a read-only dict with attribute access, what `tok.config` returns (as diffusers' `FrozenDict`)."""

from __future__ import annotations

import copy
from typing import Any, NoReturn


class FrozenConfig(dict):
    """A JSON-typed config you read as `cfg["scaling_factor"]` or `cfg.scaling_factor` (nested dicts too:
    `cfg.preprocess.image_size`). It is a `dict` subclass, so it compares equal to the plain dict,
    `json.dumps` writes it and `dict(cfg)` copies it; every mutation (`cfg[k] = v`, `cfg.k = v`, `update`,
    `pop`, ...) raises TypeError; `to_dict()` is an editable copy. Lists stay lists, so
    `cfg == json.loads(json.dumps(cfg))`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for k, v in dict.items(self):
            if isinstance(v, dict) and not isinstance(v, FrozenConfig):
                dict.__setitem__(self, k, FrozenConfig(v))

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no field {name!r}; fields: {', '.join(sorted(self))}") from None

    def _refuse(self, *args, **kwargs) -> NoReturn:
        raise TypeError("the config is read-only (it rebuilds this model); to change an argument, build a new "
                        "tokenizer: vistok.create_tokenizer(preset, **{name: value}), or edit a copy: "
                        "tok.config.to_dict()")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = _refuse
    update = pop = popitem = clear = setdefault = __ior__ = _refuse

    def to_dict(self) -> dict:
        """A plain, editable deep copy (nested dicts plain too)."""
        return {k: v.to_dict() if isinstance(v, FrozenConfig) else copy.deepcopy(v) for k, v in self.items()}

    def __reduce__(self):
        return type(self), (dict(self),)

    def __copy__(self) -> "FrozenConfig":
        return self

    def __deepcopy__(self, memo) -> "FrozenConfig":
        return type(self)(copy.deepcopy(dict(self), memo))

    def __repr__(self) -> str:
        return f"FrozenConfig({dict.__repr__(self)})"
