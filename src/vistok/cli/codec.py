"""encode, decode, reconstruct: images <-> ids/latents files <-> images."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from .common import SEED, device_option, dtype_option, load_model, refuse_dir_inside_inputs, refuse_overwrite
from .output import emit, warn

GRID_MAX = 16
_device_option = device_option()
_dtype_option = dtype_option()
_batch_option = click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _progress(total, desc):
    from ..progress import progress_bar

    return progress_bar(total=total, desc=desc, unit="img", enabled=total >= 2)


def _inference(fn):
    """Run a command body under torch.inference_mode (scoped: no global grad switch)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


def _decode_rows(tok, tensors, rows, device):
    """Decode rows of an encode file's tensors: `latents`, or `ids.<codebook>` for discrete families."""
    if "latents" in tensors:
        return tok.decode(latents=tensors["latents"][rows].to(device))
    return tok.decode(ids={k[4:]: v[rows].to(device) for k, v in tensors.items() if k.startswith("ids.")})


def _image_files(images, reserved=()):
    """Expand IMAGES; outputs are named by file stem, so duplicate stems are refused up front."""
    from ..images import list_image_files

    files = list_image_files(images)
    if not files:
        raise ValueError("no image files found in the given paths")
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen or f.stem in reserved:
            other = seen.get(f.stem, f"the {f.stem}.png output")
            raise ValueError(f"{f} and {other} would write the same output {f.stem}.png; rename one")
        seen[f.stem] = f
    return files


def provenance(tok) -> dict[str, str]:
    """What an encode file records about its model: the latent scaling factor and a weights fingerprint."""
    return {"scaling_factor": json.dumps(tok.scaling_factor), "weights_fingerprint": weights_fingerprint(tok)}


def weights_fingerprint(model) -> str:
    """A short hash of the model's tensors (names, shapes and 64 strided values each): cheap at any size, and
    different for any two trainings in practice."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().flatten()
        step = max(1, flat.numel() // 64)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(flat[::step][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_provenance(meta: dict, tok, file: str, model: str) -> None:
    """A latents file decoded with another scaling factor is refused; tokens from other weights are warned about."""
    source = meta.get("vistok_model", "an unknown model")
    if "scaling_factor" in meta and json.loads(meta["scaling_factor"]) != tok.scaling_factor:
        raise ValueError(f"{file} was encoded with {source} at scaling_factor {json.loads(meta['scaling_factor'])}, but "
                         f"{model} uses scaling_factor {tok.scaling_factor}: decode it with the model that encoded it")
    if meta.get("weights_fingerprint") and meta["weights_fingerprint"] != weights_fingerprint(tok):
        warn(f"{file} was encoded with {source} (weights {meta['weights_fingerprint']}), but {model} has other "
            f"weights ({weights_fingerprint(tok)}): its tokens decode to what this model makes of them")


@click.command("encode")
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="output .safetensors file")
@click.option("--sample", is_flag=True, help="KL and MAR families: sample the posterior instead of taking its mean")
@click.option("--seed", default=0, show_default=True, type=SEED, help="seed for --sample")
@_batch_option
@_device_option
@_dtype_option
@click.option("--json", "as_json", is_flag=True, help="JSON output")
@_inference
def encode_cmd(model, images, out, sample, seed, batch_size, device, dtype, as_json):
    """Encode IMAGES (files or directories) with MODEL into ids or latents (safetensors)."""
    import torch
    from safetensors.torch import save_file

    from ..fileio import atomic_path

    files = _image_files(images)
    refuse_overwrite([out], files, "--out")
    tok = load_model(model, device, dtype)
    options = {}
    if sample:
        if "sample" not in tok.encode_options:
            raise ValueError(f"--sample: {model} ({type(tok).__name__}) encodes deterministically; only families "
                             "with a posterior (KL, MAR) take it")
        options = {"sample": True, "generator": torch.Generator(device=device).manual_seed(seed)}
    collected: dict[str, list] = {}
    grid = None
    with _progress(len(files), "encode") as bar:
        for chunk in _batches(files, batch_size):
            pixels = tok.preprocess(chunk).to(device)
            enc = tok.encode(pixels, **options)
            grid = enc.grid
            if enc.ids is not None:
                for name, v in enc.ids.items():
                    collected.setdefault(f"ids.{name}", []).append(v.cpu())
            if enc.latents is not None:
                collected.setdefault("latents", []).append(enc.latents.float().cpu())
            bar.update(len(chunk))
    tensors = {k: torch.cat(v).contiguous() for k, v in collected.items()}
    meta = {"vistok_model": model, "family": tok.family, "grid": json.dumps(list(grid)),
            "files": json.dumps([str(f) for f in files]), "kind": "ids" if "latents" not in tensors else "latents",
            **provenance(tok)}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    emit([{"file": out, "images": len(files), "grid": list(grid),
           **{k: list(v.shape) for k, v in tensors.items()}}], as_json=as_json)


@click.command("decode")
@click.argument("model")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--out-dir", required=True, type=click.Path(file_okay=False))
@_batch_option
@_device_option
@_dtype_option
@click.option("--json", "as_json", is_flag=True, help="JSON output")
@_inference
def decode_cmd(model, file, out_dir, batch_size, device, dtype, as_json):
    """Decode a FILE written by `vistok encode` into PNG images in OUT_DIR (printed; with --json
    {"out_dir", "images": [paths]})."""
    from safetensors import safe_open

    from ..images import pixels_to_pil

    if not Path(file).is_file():
        raise FileNotFoundError(f"no such file: {file}")
    tok = load_model(model, device, dtype)
    try:
        with safe_open(file, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error type for non-safetensors input
        raise ValueError(f"{file} is not a vistok encode file (safetensors): {exc}") from None
    if "latents" not in tensors and not any(k.startswith("ids.") for k in tensors):
        raise ValueError(f"{file} holds neither 'latents' nor 'ids.*' tensors: not written by `vistok encode`")
    source = meta.get("vistok_model", "an unknown model")
    if meta.get("family") and meta["family"] != tok.family:
        raise ValueError(f"{file} holds {meta['family']}-family tokens (from {source}) but {model} is a "
                         f"{tok.family} model")
    sources = [Path(p) for p in json.loads(meta.get("files", "[]"))]
    names = [p.stem for p in sources]
    n = next(iter(tensors.values())).shape[0]
    batches = [slice(start, start + batch_size) for start in range(0, n, batch_size)]
    try:  # the first batch fails before any output is written if the tokens do not fit this model
        first = _decode_rows(tok, tensors, batches[0], device)
    except ValueError as exc:
        raise ValueError(f"{file} (encoded with {source}) does not fit {model}: {exc}") from None
    check_provenance(meta, tok, file, model)
    names = names if len(names) == n else [f"{i:06d}" for i in range(n)]
    out = Path(out_dir)
    refuse_overwrite([out / f"{name}.png" for name in names], [file, *sources], "--out-dir")
    out.mkdir(parents=True, exist_ok=True)
    with _progress(n, "decode") as bar:
        for i, sl in enumerate(batches):
            images = first if i == 0 else _decode_rows(tok, tensors, sl, device)
            for name, img in zip(names[sl], pixels_to_pil(images)):
                img.save(out / f"{name}.png")
            bar.update(images.shape[0])
    if as_json:
        emit([], as_json=True, obj={"out_dir": str(out), "images": [str(out / f"{name}.png") for name in names]})
    else:
        click.echo(str(out))


@click.command("reconstruct")
@click.argument("model")
@click.argument("images", nargs=-1, required=True)
@click.option("--out-dir", required=True, type=click.Path(file_okay=False))
@click.option("--grid/--no-grid", default=True, show_default=True,
              help=f"also write grid.png: original | reconstruction for the first {GRID_MAX} images")
@_batch_option
@_device_option
@_dtype_option
@click.option("--json", "as_json", is_flag=True, help="JSON output")
@_inference
def reconstruct_cmd(model, images, out_dir, grid, batch_size, device, dtype, as_json):
    """Encode and decode IMAGES; write reconstructions (and an original|reconstruction grid)."""
    import torch
    from torchvision.utils import make_grid

    from ..images import pixels_to_pil

    files = _image_files(images, reserved=("grid",) if grid else ())
    out = Path(out_dir)
    refuse_dir_inside_inputs(out, images, "--out-dir")
    refuse_overwrite([out / f"{f.stem}.png" for f in files] + ([out / "grid.png"] if grid else []), files, "--out-dir")
    tok = load_model(model, device, dtype)
    out.mkdir(parents=True, exist_ok=True)
    pairs, rows = [], []
    with _progress(len(files), "reconstruct") as bar:
        for chunk in _batches(files, batch_size):
            pixels = tok.preprocess(chunk).to(device)
            recon = tok.reconstruct(pixels)
            mse = (recon.float() - pixels.float()).pow(2).flatten(1).mean(1) / 4.0  # on [0, 1] scale
            for f, img, e in zip(chunk, pixels_to_pil(recon), mse):
                img.save(out / f"{f.stem}.png")
                rows.append({"image": f.name, "psnr": float(-10 * torch.log10(e.clamp_min(1e-10)))})
            room = GRID_MAX - len(pairs) // 2  # bounded memory however many images are reconstructed
            if grid and room > 0:
                pairs.extend(torch.stack([pixels[:room].float().cpu(), recon[:room].float().cpu()], 1).flatten(0, 1))
            bar.update(len(chunk))
    if grid:
        pixels_to_pil(make_grid(torch.stack(pairs), nrow=2, padding=2, pad_value=1.0))[0].save(out / "grid.png")
    emit(rows, as_json=as_json, obj={"out_dir": str(out), "grid": str(out / "grid.png") if grid else None,
                                     "images": rows})


COMMANDS = [encode_cmd, decode_cmd, reconstruct_cmd]
