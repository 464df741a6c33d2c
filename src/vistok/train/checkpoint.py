"""Run checkpoints `RUN/step_<N>/`: everything needed to continue bit for bit.

model / ema / discriminator: safetensors; optimizers, schedulers: torch files read back with
weights_only=True; RNG states: safetensors (torch, CUDA) and trainer_state.json (Python, NumPy,
step, data position). A checkpoint is written into a temporary directory and renamed into place,
so a crash mid-write leaves the previous checkpoints untouched; only then are old ones pruned.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..weights import load_state_dict_strict

STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_NAME = "trainer_state.json"
T = TypeVar("T")


def _state_dict_tensors(module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (e.g. tied or aliased parameters)
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. disk full); the earlier checkpoints are untouched."""


class UnreadableCheckpointError(ValueError):
    """A checkpoint file is truncated or corrupt (e.g. the disk filled or the machine died mid-copy)."""


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of a checkpoint; a truncated or corrupt one raises UnreadableCheckpointError."""
    if not file.is_file():
        raise UnreadableCheckpointError(f"checkpoint {file.parent} lacks {file.name}")
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors' own error type
        raise UnreadableCheckpointError(f"{file} is unreadable (truncated or corrupt): {exc}") from None


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's random streams: (torch CPU and every CUDA device's generator states as uint8
    tensors, {"python": ..., "numpy": ...} as JSON-ready lists)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what `rng_state()` gave (the CUDA states only where CUDA is available)."""
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of RUN's complete `step_<N>/` folders (those with a trainer state), oldest first;
    [] when `run_dir` does not exist."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))
             and (p / STATE_NAME).is_file()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint folder of `run_dir`, or None (readability not checked)."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def newest_readable(candidates: Sequence[Path], read: Callable[[Path], T], *, log: Callable[[str], None],
                    context: str) -> tuple[Path, T]:
    """(path, read(path)) for the first of `candidates` (newest first) that `read` can read: one that raises
    UnreadableCheckpointError (e.g. truncated) is logged as `"{context}: skipping step_N: why"` and the
    next tried. Raises ValueError naming the folder and every checkpoint tried when none is readable."""
    for path in candidates:
        try:
            return path, read(path)
        except UnreadableCheckpointError as exc:
            log(f"{context}: skipping {path.name}: {exc}")
    where = candidates[0].parent if candidates else "the run folder"
    raise ValueError(f"{context}: no readable checkpoint under {where} (tried "
                     f"{', '.join(p.name for p in candidates)})")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial_checkpoints(run_dir: Path) -> list[Path]:
    """Temporary `.step_*` directories left by a process killed mid-write."""
    stale = [p for p in run_dir.glob(".step_*") if p.is_dir()] if run_dir.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def save_checkpoint(run_dir: Path, step: int, *, modules: dict[str, object],
                    states: dict[str, object], trainer_state: dict, keep_last: int,
                    rng_states: Optional[list] = None) -> Path:
    """modules (anything with `state_dict()`: an nn.Module, the trainer's Objective) -> <name>.safetensors;
    states (optimizers, schedulers: their state_dict()) -> <name>.pt;
    rng_states: one `rng_state()` per rank (default: this process's only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step}.", dir=run_dir))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
    try:
        for name, module in modules.items():
            save_file(_state_dict_tensors(module), str(tmp / f"{name}.safetensors"))
        for name, state in states.items():
            torch.save(state.state_dict(), tmp / f"{name}.pt")
        per_rank = rng_states or [rng_state()]
        save_file({f"{r}.{k}": v for r, (tensors, _) in enumerate(per_rank) for k, v in tensors.items()},
                  str(tmp / "rng.safetensors"))
        rng_meta = [meta for _, meta in per_rank]
        (tmp / STATE_NAME).write_text(json.dumps({**trainer_state, "step": step, "rng": rng_meta}) + "\n")
        for file in tmp.iterdir():  # durable before it becomes the latest checkpoint
            _fsync(file)
        _fsync(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(run_dir)
    except Exception as exc:  # disk full: safetensors / torch raise their own error types
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointWriteError(
            f"could not write checkpoint step_{step} in {run_dir} ({cause}); nothing was lost: the previous "
            f"checkpoints are intact (latest: {previous.name if previous else 'none'})") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, *, modules: dict[str, object], states: dict[str, object],
                    rank: int = 0) -> dict:
    """Load modules strictly (anything with `state_dict()` / `load_state_dict(strict=True)`: an nn.Module,
    the trainer's Objective) and optimizer/scheduler states; restore this rank's RNG streams (a run
    resumed on a different number of processes reuses them cyclically); return the trainer state."""
    try:
        meta = json.loads((path / STATE_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise UnreadableCheckpointError(f"{path / STATE_NAME} is unreadable: {exc}") from None
    tensors = {name: read_tensors(path / f"{name}.safetensors") for name in modules}  # all readable before any load
    saved_states = {}
    for name in states:
        file = path / f"{name}.pt"
        if not file.is_file():
            raise UnreadableCheckpointError(f"checkpoint {path} lacks {file.name}")
        try:
            saved_states[name] = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated zip archive is a RuntimeError
            raise UnreadableCheckpointError(f"{file} is unreadable (truncated or corrupt): {exc}") from None
    saved = read_tensors(path / "rng.safetensors")
    for name, module in modules.items():
        load_state_dict_strict(module, tensors[name], target=f"{name} from {path}")
    for name, obj in states.items():
        obj.load_state_dict(saved_states[name])
    which = rank % len(meta["rng"])
    prefix = f"{which}."
    set_rng_state({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}, meta["rng"][which])
    return meta
