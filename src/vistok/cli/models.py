"""list-models, info, convert, export-diffusers."""

from __future__ import annotations

import click

from .common import load_model, refuse_overwrite
from .output import emit, log, warn


@click.command("list-models")
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="JSON output")
def list_models_cmd(pattern, as_json):
    """List the presets (optionally matching a glob PATTERN)."""
    from ..tokenizers.registry import get_preset, list_models

    rows = []
    for name in list_models(pattern):
        p = get_preset(name)
        rows.append({"name": name, "class": p["class"], "description": p.get("description", "")})
    emit(rows, as_json=as_json, obj={"models": rows})


@click.command("info")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="JSON output")
def info_cmd(model, as_json):
    """Show a model's configuration: a preset name, a release directory or hf-hub:ORG/NAME[@REV].

    Built with its parameters on the meta device: no weights are initialised or read."""
    from ..tokenizers.registry import empty_tokenizer

    tok = empty_tokenizer(model)
    cfg = tok.release_config()
    pp = tok.preprocess_config
    summary = {
        "model": model,
        "class": cfg["_class_name"],
        "family": cfg["family"],
        "parameters": tok.num_parameters(),
        "stride": tok.stride,
        "image_size": pp.image_size,
        "grid": list(tok.grid_for(pp.image_size, pp.image_size)),
        "codebooks": cfg["codebooks"],
        "scaling_factor": cfg["scaling_factor"],
        "preprocess": {"adm": f"ADM center crop to {pp.image_size}px (box + bicubic)",
                       "center": f"resize short side ({pp.interpolation}) + center crop to {pp.image_size}px",
                       "none": "native size (must fit the stride)"}[pp.crop],
    }
    if as_json:
        emit([], as_json=True, obj={**summary, "config": cfg})
    else:
        emit([{"field": k, "value": v} for k, v in summary.items()], as_json=False)


@click.command("convert")
@click.argument("kind", type=click.Choice(["mar-kl16", "llamagen-vq16", "siglip", "toklip", "dualtoken", "mar",
                                         "harmon"]), metavar="KIND")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--preset", default=None,
              help="Architecture to load into (default: mar-kl16 / ldm-kl-f16 detected from the keys, "
                   "llamagen-vq16, dualtoken-so400m-384)")
@click.option("--scaling-factor", type=float, default=None,
              help="KL latent scaling factor to record (default: the preset's, 0.2325 for MAR KL-16)")
@click.option("--config", "model_config", type=click.Path(exists=True), default=None,
              help="dualtoken: the official model_config_*/config.json (or its folder; default: config.json "
                   "beside SRC); toklip: TokLIP's model-config JSON (src/open_clip/model_configs/*-toklip.json), "
                   "which builds the matching architecture when no preset fits")
@click.option("--pretrained", type=click.Path(exists=True, file_okay=False), default=None,
              help="dualtoken: the HF SigLIP folder (default: the config's pretrained_model)")
@click.option("--ema/--no-ema", default=None, help="mar: convert model_ema (default, what MAR evaluates) or model")
@click.option("--num-heads", type=click.IntRange(1), default=None,
              help="mar/harmon: attention heads (default: from args.model or the official width -> heads)")
@click.option("--kl16", type=click.Path(dir_okay=False), default=None,
              help="mar/harmon: MAR's kl16.ckpt, to include the KL-16 VAE (otherwise random)")
@click.option("--overwrite", is_flag=True,
              help="replace DST when it holds a release an earlier `vistok convert KIND` wrote")
@click.option("--json", "as_json", is_flag=True, help="JSON output")
def convert_cmd(kind, src, dst, preset, scaling_factor, model_config, pretrained, ema, num_heads, kl16, overwrite,
                as_json):
    """Convert a released checkpoint SRC into a vistok release directory DST.

    \b
    mar-kl16   MAR kl16.ckpt / LDM kl-f16 (.ckpt, .pt or .safetensors)
    llamagen-vq16  LlamaGen vq_ds16_c2i.pt / vq_ds16_t2i.pt ({"model": state dict})
    toklip     TokLIP_S_256.pt / TokLIP_L_384.pt or a TokLIP training checkpoint
               ({"state_dict": ...}; preset from pos_embed, or --config MODEL_CONFIG.json)
    siglip     open_clip SigLIP weights file, or an HF transformers SigLIP / SigLIP2
               folder (config.json + model.safetensors; tower rebuilt with its geometry)
               -> DualToken initialised from them (--preset picks the DualToken preset,
               default dualtoken-so400m-384)
    dualtoken  official DualToken epoch_N.pt (songweii/DualToken main.py) with its
               model config (--config, default config.json beside SRC) -> a
               training-ready release (teacher included)
    mar        MAR checkpoint-*.pth (model_ema by default; size from the shapes)
    harmon     Harmon harmon_0.5b.pth / harmon_1.5b.pth (the mar.* part; LLM and projectors dropped)
    """
    from pathlib import Path

    from ..convert import CONVERTERS

    # every file the conversion reads, not only SRC: DualToken's model config (--config, by default
    # config.json beside SRC, which `convert dualtoken DIR/epoch_N.pt DIR` replaced), an HF folder's
    # own config.json / model.safetensors, --kl16
    inputs = [Path(src)]
    if kind == "dualtoken" and model_config is None:
        inputs.append(Path(src).parent / "config.json")
    for p in (src, model_config, kl16):
        if p is not None and Path(p).is_dir():
            inputs += [Path(p) / "config.json", Path(p) / "model.safetensors"]
        elif p is not None:
            inputs.append(Path(p))
    refuse_overwrite([Path(dst) / "config.json", Path(dst) / "model.safetensors"], inputs, "DST")
    log(f"converting {src} ({kind}) ...")
    if scaling_factor is not None and kind != "mar-kl16":
        raise ValueError(f"--scaling-factor applies to KL latents (mar-kl16), not to {kind}")
    if model_config is not None and kind not in ("dualtoken", "toklip"):
        raise ValueError(f"--config applies to dualtoken and toklip, not to {kind}")
    if pretrained is not None and kind != "dualtoken":
        raise ValueError(f"--pretrained applies to dualtoken, not to {kind}")
    if kind == "toklip" and preset is not None and model_config is not None:
        raise ValueError("convert toklip takes --preset or --config, not both: --config builds the architecture "
                         "from TokLIP's model config, --preset names one")
    extra = {"scaling_factor": scaling_factor} if scaling_factor is not None else {}
    mar_opts = {"ema": ema, "num_heads": num_heads, "kl16": kl16}
    if kind in ("mar", "harmon"):
        if preset is not None:
            raise ValueError(f"--preset does not apply to {kind}: the size is read from the weights")
        if kind == "harmon" and ema is not None:
            raise ValueError("--ema/--no-ema applies to MAR training checkpoints, not to Harmon's single weight set")
        report = CONVERTERS[kind](src, dst, overwrite=overwrite, **{k: v for k, v in mar_opts.items() if v is not None})
        if not kl16 and "random" in report["vae"]:
            warn("the release has a randomly initialised KL-16 VAE; pass --kl16 kl16.ckpt for MAR's")
        emit([report], as_json=as_json)
        return
    given = [f"--{k.replace('_', '-')}" for k, v in mar_opts.items() if v is not None]
    if given:
        raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to mar/harmon, not to {kind}")
    if kind == "dualtoken":
        extra = {"config": model_config, "pretrained": pretrained}
    elif model_config is not None:
        extra["config"] = model_config
    report = CONVERTERS[kind](src, dst, preset=preset, overwrite=overwrite, **extra)
    if not as_json:  # a table cell per list: "a, b" (the table's own list format is "AxB", for grids)
        report = {k: ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in report.items()}
    emit([report], as_json=as_json)


@click.command("export-diffusers")
@click.argument("model")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="JSON output")
def export_diffusers_cmd(model, dst, as_json):
    """Write a KL-family MODEL as a diffusers AutoencoderKL directory DST."""
    from ..convert import export_diffusers, kl_diffusers_config

    from pathlib import Path

    if Path(model).is_dir() and Path(model).resolve() == Path(dst).resolve():
        raise ValueError(f"DST {dst} is the model directory {model}: exporting there would overwrite its config.json; "
                         "write the diffusers directory elsewhere")
    tok = load_model(model)
    out = export_diffusers(tok, dst)
    cfg = kl_diffusers_config(tok)
    emit([{"dst": str(out), "latent_channels": cfg["latent_channels"], "scaling_factor": cfg["scaling_factor"],
           "down_block_types": ",".join(cfg["down_block_types"])}], as_json=as_json)


COMMANDS = [list_models_cmd, info_cmd, convert_cmd, export_diffusers_cmd]
