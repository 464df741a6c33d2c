"""Typed values from JSON: a value checked against its Python annotation and range, keyword arguments
against a signature, each error a ValueError naming the key. Training configs, loss arguments, model
overrides and release configs are all checked this way before anything is built.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from typing import Any, Callable, Optional

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object"}


def describe(annotation: Any) -> str:
    """A reader's name for an annotation: 'an integer', 'null or a number', 'a list of numbers' ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [describe(a) for a in args if a is not type(None)]
        return ("null or " if type(None) in args else "") + " or ".join(names)
    if origin in (list, tuple, collections.abc.Sequence):
        items = [a for a in args if a is not Ellipsis]
        if origin is tuple and items and Ellipsis not in args:
            return f"a list of {len(items)} " + " / ".join(describe(a).split(" ", 1)[-1] + "s" for a in items[:1])
        return "a list" + (f" of {describe(items[0]).split(' ', 1)[-1]}s" if items else "")
    if origin is dict:
        return "an object"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def check_value(value: Any, annotation: Any, key: str) -> Any:
    """`value` if it fits `annotation` (JSON types: an integral float counts as an integer and is returned as
    one; numbers must be finite); otherwise ValueError '<key> must be <type>, got <value>'."""
    if annotation in (Any, inspect.Parameter.empty):
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    wrong = ValueError(f"{key} must be {describe(annotation)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return check_value(value, option, key)
            except ValueError:
                continue
        raise wrong
    if annotation is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise wrong
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise wrong
        return value
    if annotation in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise wrong
        items = [a for a in args if a is not Ellipsis]
        if origin is tuple and items and Ellipsis not in args:
            if len(value) != len(items):
                raise ValueError(f"{key} must be a list of {len(items)} values, got {value!r}")
            checked = [check_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, items))]
        else:
            checked = [check_value(v, items[0], f"{key}[{i}]") if items else v for i, v in enumerate(value)]
        return tuple(checked) if isinstance(value, tuple) else checked
    if isinstance(annotation, type):
        if not isinstance(value, annotation):
            raise wrong
        return value
    return value  # an annotation form this checker does not know: left to the constructor


def check_range(value: Any, key: str, *, ge=None, gt=None, le=None, lt=None, choices=None, length=None) -> None:
    """Bounds for a number, or for every number of a list; `choices` for strings; `length` for lists."""
    if value is None:
        return
    if length is not None and len(value) != length:
        raise ValueError(f"{key} must be a list of {length} values, got {value!r}")
    if choices is not None and value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for bound, ok, word in ((ge, lambda b: v >= b, ">="), (gt, lambda b: v > b, ">"),
                                (le, lambda b: v <= b, "<="), (lt, lambda b: v < b, "<")):
            if bound is not None and not ok(bound):
                what = "values" if isinstance(value, (list, tuple)) else "value"
                raise ValueError(f"{key} must be {word} {bound}" + (" (each value)" if what == "values" else "")
                                 + f", got {value!r}")


def signature_types(fn: Callable) -> dict[str, Any]:
    """Parameter name -> resolved annotation (empty where it cannot be resolved)."""
    fn = inspect.unwrap(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation naming a type only imported for type checking
        hints = {}
    params = inspect.signature(fn).parameters
    return {name: hints.get(name, p.annotation if not isinstance(p.annotation, str) else inspect.Parameter.empty)
            for name, p in params.items() if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def check_kwargs(fn: Callable, kwargs: Any, prefix: str, *, what: Optional[str] = None) -> dict:
    """Keyword arguments for `fn` from JSON: an object whose keys `fn` takes, each of its annotated type.
    Returns the (coerced) arguments; ValueError names `prefix.key` and what was expected."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"{prefix} must be an object of keyword arguments, got {kwargs!r}")
    types_ = signature_types(fn)
    unknown = sorted(set(kwargs) - set(types_))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{prefix}.{k}' for k in unknown)}"
                         f"{' for ' + what if what else ''}; {prefix} takes: {', '.join(sorted(types_))}")
    return {k: check_value(v, types_[k], f"{prefix}.{k}") for k, v in kwargs.items()}
