"""sample: class-conditional image generation with a MAR-family model (MAR's masked decoding)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import SEED, device_option, load_model
from .output import emit, log


@click.command("sample")
@click.argument("model")
@click.option("--class-label", "class_labels", type=int, multiple=True,
              help="ImageNet class id, one image each (repeatable); none: unconditional, --num-images images")
@click.option("--num-images", type=click.IntRange(1), default=None, help="images per class label (or in all, unconditional)")
@click.option("--num-iter", default=64, show_default=True, type=click.IntRange(1), help="masked-decoding steps")
@click.option("--cfg", default=1.0, show_default=True, type=float, help="classifier-free guidance scale (1: none)")
@click.option("--cfg-schedule", default="linear", show_default=True, type=click.Choice(["linear", "constant"]))
@click.option("--temperature", default=1.0, show_default=True, type=float, help="diffusion head's noise temperature")
@click.option("--num-sampling-steps", default=None, type=click.IntRange(2),
              help="diffusion head steps (default: the model's, MAR: 100)")
@click.option("--seed", default=0, show_default=True, type=SEED, help="seed of the orders and the noise")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--out-dir", required=True, type=click.Path(file_okay=False), help="directory for the PNGs")
@device_option()
@click.option("--json", "as_json", is_flag=True, help="JSON output")
def sample_cmd(model, class_labels, num_images, num_iter, cfg, cfg_schedule, temperature, num_sampling_steps, seed,
               batch_size, out_dir, device, as_json):
    """Generate images with MODEL (a MAR-family release directory or preset) and write PNGs to --out-dir.

    \b
    MAR's README settings: --num-iter 256 --cfg 2.9 (base) / 3.0 (large) / 3.2 (huge), temperature 1.0;
    without guidance --cfg 1.0 --temperature 0.95.
    """
    import torch

    from ..images import pixels_to_pil
    from ..progress import progress_bar

    out = Path(out_dir)
    if (out / "config.json").exists():
        raise ValueError(f"--out-dir {out_dir} holds a config.json (a release or run folder): write the samples "
                         "to a directory of their own")
    tok = load_model(model, device)
    if not hasattr(tok, "sample"):
        raise ValueError(f"{model} is a {type(tok).__name__}: sampling needs a MAR-family model (MARTokenizer)")
    if class_labels:
        jobs = [c for c in class_labels for _ in range(num_images or 1)]
    elif num_images is None:
        raise ValueError("pass --class-label (one or more) or --num-images for unconditional sampling")
    else:
        jobs = [None] * num_images
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    bar = progress_bar(total=len(jobs), desc="sampling", unit="img", enabled=len(jobs) >= 2)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        labels = None if chunk[0] is None else list(chunk)
        with torch.inference_mode():  # the first batch checks every argument before --out-dir is created
            res = tok.sample(labels, num_images=len(chunk), num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule,
                             temperature=temperature, num_sampling_steps=num_sampling_steps, generator=generator,
                             progress=len(jobs) == 1)
        out.mkdir(parents=True, exist_ok=True)
        for i, (label, img) in enumerate(zip(chunk, pixels_to_pil(res.images.float().cpu()))):
            name = f"{start + i:05d}" + ("" if label is None else f"_class{label}")
            img.save(out / f"{name}.png")
            rows.append({"file": str(out / f"{name}.png"), "class": "" if label is None else label})
        bar.update(len(chunk))
    bar.close()
    log(f"wrote {len(rows)} image(s) to {out}")
    emit(rows, as_json=as_json, obj={"out_dir": str(out), "images": rows})


COMMANDS = [sample_cmd]
