"""Build models without initialising their weights, and fill them from a checkpoint by assignment.

`info` needs shapes and counts, and `load_tokenizer` overwrites every parameter with the file's, so
neither should pay for random initialisation (a 1.5 B-parameter tower: tens of seconds and GBs). Inside
`parameters_on_meta()` every parameter a module registers lives on PyTorch's meta device (shape and
dtype, no storage, initialisers are no-ops); buffers are still built for real, so non-persistent
buffers (which no file holds) come out exactly as a normal build makes them. This is the approach of
accelerate's `init_empty_weights(include_buffers=False)`, without the dependency.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import nn

from ..weights import checked_state_dict

META = torch.device("meta")


_local = threading.local()  # this thread's {id(real): (real kept alive, meta)} while inside the block
_lock = threading.Lock()
_users = 0  # threads inside a block: the patch is installed while this is > 0
_original = nn.Module.register_parameter


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within the block, `nn.Module.register_parameter` puts this thread's parameters on the meta device.

    One parameter registered under several names (a tied weight) stays one meta parameter, so the
    model's ties are the real build's. Thread-safe: the patch of `nn.Module` is installed while any
    thread is inside a block, and acts only for the threads that are (others build real parameters).
    """
    outer = getattr(_local, "made", None)
    _local.made = outer if outer is not None else {}
    _install()
    try:
        yield
    finally:
        _local.made = outer
        _uninstall()


def _install() -> None:
    global _users, _original
    with _lock:
        if _users == 0:
            _original = nn.Module.register_parameter
            nn.Module.register_parameter = _register_on_meta
        _users += 1


def _uninstall() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            nn.Module.register_parameter = _original


def _register_on_meta(module: nn.Module, name: str, param) -> None:
    made = getattr(_local, "made", None)
    if made is None or param is None or param.device.type == "meta":
        return _original(module, name, param)
    if id(param) not in made:
        meta = type(param)(param.to(META), requires_grad=param.requires_grad)
        meta.__dict__.update(param.__dict__)
        made[id(param)] = (param, meta)
    _original(module, name, made[id(param)][1])


def meta_tensors(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of `module` still on the meta device."""
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return [n for n, t in tensors if t.is_meta]


def _alias_groups(expected: dict[str, torch.Tensor]) -> list[list[str]]:
    """State-dict keys grouped by the tensor object they name (a tied parameter appears under each name)."""
    groups: dict[int, list[str]] = {}
    for k, v in expected.items():
        groups.setdefault(id(v), []).append(k)
    return list(groups.values())


def assign_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor], target: str = "") -> None:
    """Strict load into a module built under `parameters_on_meta`: the checkpoint's tensors become the
    module's parameters and persistent buffers (`load_state_dict(assign=True)`), cast to the dtype the
    module declares, as a copying load would. Keys that alias one tensor (a tied weight) may appear once
    in `state_dict`, as safetensors' `save_model` stores them; the ties are kept.

    Raises `CheckpointMismatchError` (a ValueError) listing every missing, unexpected and mis-shaped key and
    every integer/floating dtype mismatch (an int tensor for a float weight is not cast silently),
    and RuntimeError if a tensor is still on the meta device afterwards (a module that loads by copying).
    """
    expected = module.state_dict(keep_vars=True)
    groups = _alias_groups(expected)
    given = checked_state_dict(expected, state_dict, groups, target or type(module).__name__)
    for names in groups:
        value = given[names[0]]
        dtype = expected[names[0]].dtype
        value = value if value.dtype == dtype else value.to(dtype)
        for n in names:
            given[n] = value
    module.load_state_dict(given, strict=True, assign=True)
    _retie(module, groups)
    left = meta_tensors(module)
    if left:
        raise RuntimeError(f"{target or type(module).__name__}: {len(left)} tensor(s) were not filled by assignment "
                           f"(still on the meta device): {', '.join(left[:5])}")


def _retie(module: nn.Module, groups: list[list[str]]) -> None:
    """`assign=True` wraps each key in its own Parameter: make every alias of a group the first one's object."""
    for names in groups:
        if len(names) < 2:
            continue
        owner, _, leaf = names[0].rpartition(".")
        first = module.get_submodule(owner)
        value = first._parameters.get(leaf, first._buffers.get(leaf))
        for n in names[1:]:
            prefix, _, name = n.rpartition(".")
            sub = module.get_submodule(prefix)
            table = sub._parameters if name in sub._parameters else sub._buffers
            table[name] = value
