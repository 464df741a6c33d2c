"""Progress bars (tqdm, on stderr) that every part of vistok builds the same way.

A bar is hidden when `TQDM_DISABLE` is set to a true value (1, true, yes, on) in the environment,
when the "vistok" logger is set quieter than INFO (`vistok --quiet` does that), or when the caller
turns it off (e.g. a single image). tqdm reads `TQDM_*` variables only once, when it is imported,
and only for arguments left at their defaults; this module reads the environment at each bar.
"""

from __future__ import annotations

import logging
import os
import sys

_TRUE = {"1", "true", "yes", "on"}


def bars_enabled() -> bool:
    """False under TQDM_DISABLE=1 or a "vistok" logger level above INFO."""
    if os.environ.get("TQDM_DISABLE", "").strip().lower() in _TRUE:
        return False
    level = logging.getLogger("vistok").level
    return level == logging.NOTSET or level <= logging.INFO


def progress_bar(iterable=None, *, total=None, desc: str | None = None, unit: str = "it", enabled: bool = True,
                 **kwargs):
    """A tqdm bar on stderr; `enabled=False` (or the switches above) makes it a silent pass-through."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not (enabled and bars_enabled()),
                **kwargs)
