"""encode, decode, reconstruct: images <-> ids/latents files <-> images."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .output import emit, log

_device_option = click.option("--device", default="cpu", show_default=True, help="torch device")
_batch_option = click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _progress(total, desc):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=total < 2, file=sys.stderr)


def _inference(fn):
    """Run a command body under torch.inference_mode (scoped: no global grad switch)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


def _load(model, device):
    from ..tokenizers.registry import resolve_tokenizer

    tok = resolve_tokenizer(model)
    if not Path(model).exists() and not model.startswith("hf-hub:"):
        log(f"warning: {model} is a preset with random weights (pass a release directory for trained weights)")
    return tok.to(device).eval()


@click.command("encode")
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="output .safetensors file")
@click.option("--sample", is_flag=True, help="KL family: sample the posterior instead of taking its mean")
@click.option("--seed", default=0, show_default=True, help="seed for --sample")
@_batch_option
@_device_option
@click.option("--json", "as_json", is_flag=True, help="JSON output")
@_inference
def encode_cmd(model, images, out, sample, seed, batch_size, device, as_json):
    """Encode IMAGES (files or directories) with MODEL into ids or latents (safetensors)."""
    import torch
    from safetensors.torch import save_file

    from ..images import list_image_files

    tok = _load(model, device)
    files = list_image_files(images)
    if not files:
        raise ValueError("no image files found in the given paths")
    gen = torch.Generator(device=device).manual_seed(seed)
    collected: dict[str, list] = {}
    grid = None
    with _progress(len(files), "encode") as bar:
        for chunk in _batches(files, batch_size):
            pixels = tok.preprocess(chunk).to(device)
            kwargs = {"sample": True, "generator": gen} if sample and tok.family == "kl" else {}
            enc = tok.encode(pixels, **kwargs)
            grid = enc.grid
            if enc.ids is not None:
                for name, v in enc.ids.items():
                    collected.setdefault(f"ids.{name}", []).append(v.cpu())
            if enc.latents is not None:
                collected.setdefault("latents", []).append(enc.latents.float().cpu())
            bar.update(len(chunk))
    tensors = {k: torch.cat(v).contiguous() for k, v in collected.items()}
    meta = {"vistok_model": model, "family": tok.family, "grid": json.dumps(list(grid)),
            "files": json.dumps([str(f) for f in files]), "kind": "ids" if "latents" not in tensors else "latents"}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out, metadata=meta)
    emit([{"file": out, "images": len(files), "grid": list(grid),
           **{k: list(v.shape) for k, v in tensors.items()}}], as_json=as_json)


@click.command("decode")
@click.argument("model")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--out-dir", required=True, type=click.Path(file_okay=False))
@_batch_option
@_device_option
@_inference
def decode_cmd(model, file, out_dir, batch_size, device):
    """Decode a FILE written by `vistok encode` into PNG images in OUT_DIR."""
    from safetensors import safe_open

    from ..images import pixels_to_pil

    if not Path(file).is_file():
        raise FileNotFoundError(f"no such file: {file}")
    tok = _load(model, device)
    with safe_open(file, "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = [Path(p).stem for p in json.loads(meta.get("files", "[]"))]
    if meta.get("family") and meta["family"] != tok.family:
        raise ValueError(f"{file} holds {meta['family']}-family tokens but {model} is a {tok.family} model")
    n = next(iter(tensors.values())).shape[0]
    names = names if len(names) == n else [f"{i:06d}" for i in range(n)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _progress(n, "decode") as bar:
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            if "latents" in tensors:
                images = tok.decode(latents=tensors["latents"][sl].to(device))
            else:
                ids = {k[4:]: v[sl].to(device) for k, v in tensors.items() if k.startswith("ids.")}
                images = tok.decode(ids=ids)
            for name, img in zip(names[sl], pixels_to_pil(images)):
                img.save(out / f"{name}.png")
            bar.update(images.shape[0])
    click.echo(str(out))


@click.command("reconstruct")
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option("--out-dir", required=True, type=click.Path(file_okay=False))
@click.option("--grid/--no-grid", default=True, show_default=True, help="also write a side-by-side grid.png")
@_batch_option
@_device_option
@click.option("--json", "as_json", is_flag=True, help="JSON output")
@_inference
def reconstruct_cmd(model, images, out_dir, grid, batch_size, device, as_json):
    """Encode and decode IMAGES; write reconstructions (and an original|reconstruction grid)."""
    import torch
    from torchvision.utils import make_grid

    from ..images import list_image_files, pixels_to_pil

    tok = _load(model, device)
    files = list_image_files(images)
    if not files:
        raise ValueError("no image files found in the given paths")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs, rows = [], []
    with _progress(len(files), "reconstruct") as bar:
        for chunk in _batches(files, batch_size):
            pixels = tok.preprocess(chunk).to(device)
            enc = tok.encode(pixels)
            recon = tok.decode(latents=enc.latents) if enc.latents is not None else tok.decode(ids=enc.ids)
            mse = (recon.float() - pixels.float()).pow(2).flatten(1).mean(1) / 4.0  # on [0, 1] scale
            for f, img, e in zip(chunk, pixels_to_pil(recon), mse):
                img.save(out / f"{f.stem}.png")
                rows.append({"image": f.name, "psnr": float(-10 * torch.log10(e.clamp_min(1e-10)))})
            pairs.extend(torch.stack([pixels.cpu(), recon.cpu()], 1).flatten(0, 1))
            bar.update(len(chunk))
    if grid:
        pixels_to_pil(make_grid(torch.stack(pairs), nrow=2, padding=2, pad_value=1.0))[0].save(out / "grid.png")
    emit(rows, as_json=as_json)


COMMANDS = [encode_cmd, decode_cmd, reconstruct_cmd]
