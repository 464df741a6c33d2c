"""train, export."""

from __future__ import annotations

import click

from .output import emit


class _TrainCommand(click.Command):
    """`vistok train --help` ends with every shipped recipe, read when the help is shown."""

    def format_epilog(self, ctx, formatter):
        from ..train.config import recipe_names

        formatter.write("\nRecipes (CONFIG):\n" + "".join(f"  {name}\n" for name in recipe_names()))  # unwrapped names
        super().format_epilog(ctx, formatter)


@click.command("train", cls=_TrainCommand)
@click.argument("config")
@click.option("--set", "assignments", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config value (JSON values; repeatable), e.g. --set train.steps=100")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: checkpoints/<config name>)")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out")
@click.option("--json", "as_json", is_flag=True, help="JSON summary on stdout")
def train_cmd(config, assignments, out_dir, resume, as_json):
    """Train a tokenizer. CONFIG is a JSON file or a shipped recipe name
    (quickstart, dualtoken-tiny, dualtoken-naive-tiny, dualtoken-so400m-384, ...).

    \b
    Multi-GPU / multi-node: torchrun --nproc_per_node=N -m vistok train CONFIG --out DIR
    """
    import os

    from ..train.api import train

    summary = train(config, out=out_dir, set=list(assignments), resume=resume)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or int(os.environ.get("RANK", "0")) == 0:  # torchrun: rank 0 reports
        emit([summary], as_json=as_json)


@click.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--step", type=int, default=None, help="Checkpoint step (default: the latest)")
@click.option("--ema", is_flag=True, help="Export the EMA weights")
@click.option("--json", "as_json", is_flag=True, help="JSON output")
def export_cmd(run_dir, dst, step, ema, as_json):
    """Write a training run's checkpoint as a release directory DST (config.json + model.safetensors)."""
    import json

    from ..train.trainer import export_run

    path = export_run(run_dir, dst, step=step, ema=ema)
    exported = json.loads((path / "config.json").read_text()).get("trained_steps")  # the step actually written
    emit([{"run": run_dir, "step": exported, "ema": ema, "dst": str(path)}], as_json=as_json)


COMMANDS = [train_cmd, export_cmd]
