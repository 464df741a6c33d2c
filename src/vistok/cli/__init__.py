"""The `vistok` command line (click). Heavy imports happen inside commands, never at import time."""

from __future__ import annotations

import os
import sys

import click

from .. import __version__


class _Group(click.Group):
    """Turns expected failures (bad input, missing files, mismatched weights) into a one-line error
    and exit code 1; VISTOK_DEBUG=1 shows the traceback instead."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ValueError, FileNotFoundError, OSError, NotImplementedError, FloatingPointError) as exc:
            if os.environ.get("VISTOK_DEBUG"):
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            click.echo(f"Error: {msg}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vistok")
def main():
    """vistok: train, convert, run and benchmark visual tokenizers for multimodal LLMs."""


from . import bench, codec, generate, models, train  # noqa: E402,F401  (registers commands)

for _module in (models, codec, generate, train, bench):
    for _cmd in _module.COMMANDS:
        main.add_command(_cmd)
