"""Results to stdout as a readable table or JSON; logs go to stderr."""

from __future__ import annotations

import json
from typing import Sequence

import click


def log(msg: str) -> None:
    """A message for people: to stderr, so stdout keeps only results."""
    click.echo(msg, err=True)


def emit(rows: Sequence[dict], *, as_json: bool, columns: Sequence[str] | None = None, obj=None) -> None:
    """Print `rows` as an aligned table, or `obj` (default: rows) as JSON."""
    if as_json:
        click.echo(json.dumps(rows if obj is None else obj, indent=2, default=str))
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
