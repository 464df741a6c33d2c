"""Reading third-party checkpoint files (see `vistok.weights`, where the safe readers live) and
checking a conversion's destination."""

from __future__ import annotations

import json
from pathlib import Path

from ..tokenizers.model_card import README_NAME, is_ours

# re-exported: the readers moved down to vistok.weights, where tokenizers/ and losses/ import them
from ..weights import (numpy_plain_globals, read_checkpoint, strip_prefixes, top_level_keys,  # noqa: F401
                       unwrap_state_dict)


def check_destination(dst: str | Path, kind: str, *, overwrite: bool = False) -> None:
    """Refuse a conversion's DST that would overwrite or mix with other files: DST must be new, empty,
    or, with `overwrite`, a release an earlier `vistok convert KIND` wrote (only config.json, model.safetensors
    and vistok's own README.md model card, with `source.kind == kind`), which converting again replaces. Called
    before anything is read or written; ValueError otherwise."""
    dst = Path(dst)
    if not dst.exists():
        return
    if not dst.is_dir():
        raise ValueError(f"destination {dst} exists and is not a directory; nothing was written")
    held = sorted(p.name for p in dst.iterdir())
    if not held:
        return
    try:
        kind_there = json.loads((dst / "config.json").read_text()).get("source", {}).get("kind")
    except (OSError, ValueError, AttributeError):
        kind_there = None
    ours = {"config.json", "model.safetensors"} | ({README_NAME} if is_ours(dst / README_NAME) else set())
    if set(held) <= ours and kind_there == kind:
        if overwrite:
            return
        raise ValueError(f"destination {dst} already holds a `vistok convert {kind}` release; pass --overwrite "
                         "(overwrite=True) to replace it, nothing was written")
    raise ValueError(f"destination {dst} is not empty and is not an earlier `vistok convert {kind}` release "
                     f"(it holds {held[:5]}{' ...' if len(held) > 5 else ''}); choose a new directory, "
                     "nothing was written")
