"""The CLI's one output style: results on stdout, as an aligned table or, with `--json`, as exactly one
JSON object; logs, warnings and progress bars on stderr, through the "vistok" logger."""

from __future__ import annotations

import json
import logging
import math
import sys
from typing import Optional, Sequence

import click

logger = logging.getLogger("vistok.cli")


class _StderrHandler(logging.Handler):
    """Writes records to stderr through tqdm.write, so a running progress bar is redrawn below them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001  (logging's own convention: never raise from a handler)
            self.handleError(record)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING and not message.startswith("warning:"):
            return f"{record.levelname.lower()}: {message}"
        return message


def configure_logging(level: int) -> None:
    """The "vistok" logger at `level`, printing to stderr (set once per CLI invocation)."""
    root = logging.getLogger("vistok")
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Format())
    root.addHandler(handler)
    root.setLevel(level)  # records still propagate: an application's own root handlers see them too


def log(msg: str) -> None:
    """An informational line on stderr (hidden by --quiet)."""
    logger.info(msg)


def warn(msg: str) -> None:
    """A warning on stderr (shown even with --quiet)."""
    logger.warning(msg if msg.startswith("warning:") else f"warning: {msg}")


def json_safe(obj):
    """inf/nan -> null (JSON has neither), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def emit(rows: Sequence[dict], *, as_json: bool, columns: Optional[Sequence[str]] = None,
         obj: Optional[dict] = None) -> None:
    """`rows` as an aligned table, or with `as_json` the JSON object `obj` (default: the single row).

    Every command prints one JSON object: a command with several rows passes them inside `obj`."""
    if as_json:
        if obj is None:
            if len(rows) != 1:
                raise AssertionError("emit: several rows need an explicit JSON object")
            obj = rows[0]
        click.echo(json.dumps(json_safe(obj), indent=2, default=str))
        return
    if not rows:
        return
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return str(v)
