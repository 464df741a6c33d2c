"""The `vistok` command line (click). Heavy imports happen inside commands, never at import time."""

from __future__ import annotations

import logging
import os
import sys

import click

from .._version import __version__
from .output import configure_logging


class _Group(click.Group):
    """Turns expected failures (bad input, missing files, mismatched weights) into a one-line error
    and exit code 1; VISTOK_DEBUG=1 shows the traceback instead."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # `vistok list-models | head`: the reader has all it wanted
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # no second EPIPE when Python flushes stdout at exit
            sys.exit(0)
        except (ValueError, FileNotFoundError, OSError, NotImplementedError, FloatingPointError) as exc:
            if os.environ.get("VISTOK_DEBUG"):
                raise
            click.echo(f"Error: {one_line(exc)}", err=True)
            sys.exit(1)


def one_line(exc: BaseException) -> str:
    """The first line of the message; for an error re-raised from a DataLoader worker ("Caught ValueError in
    DataLoader worker process 3." + the worker's traceback), the worker's own error line, which is the cause."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "Original Traceback" in str(exc) and len(lines) > 1:
        return f"{lines[-1]} (in a DataLoader worker)"
    return lines[0]


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vistok")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr: no progress bars, no info logs")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs on stderr")
def main(quiet, verbose):
    """vistok: train, convert, run and benchmark visual tokenizers for multimodal LLMs."""
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose exclude each other")
    configure_logging(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


from . import bench, codec, generate, models, train  # noqa: E402,F401  (registers commands)

for _module in (models, codec, generate, train, bench):
    for _cmd in _module.COMMANDS:
        main.add_command(_cmd)
