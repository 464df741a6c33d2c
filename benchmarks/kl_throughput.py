"""CPU throughput and memory of the MAR KL-16 VAE: vistok vs diffusers' AutoencoderKL, fp32 vs bf16 autocast.

What it measures: one "step" is encode (posterior mean) + decode of a batch of random images, under
`torch.inference_mode()`, for four configurations -- vistok fp32, vistok bf16 autocast, diffusers fp32,
diffusers bf16 autocast (`torch.autocast("cpu", dtype=torch.bfloat16)`). Both implementations hold the
same weights: `mar-kl16` is built with a fixed seed (plus a small seeded weight perturbation), exported
with `vistok.convert.export_diffusers` and loaded with `diffusers.AutoencoderKL.from_pretrained`.

Each configuration runs in a fresh subprocess (this script re-invoked with a hidden `--only CONFIG`),
so that allocations of one configuration cannot hide or inflate another's memory numbers.
  * images/s = batch / median wall time of the `--repeats` timed steps (after `--warmup` untimed steps).
    The JSON also has the median process CPU time per step, a steadier number on a busy machine.
  * peak MiB = peak resident memory (RSS) increase during the timed steps: the process's peak RSS over
    the timed steps minus its RSS just before them (model built, input allocated, warmup done). On Linux
    the kernel's peak counter is reset first (/proc/self/clear_refs), so construction peaks do not mask
    it; elsewhere it falls back to the growth of `getrusage(RUSAGE_SELF).ru_maxrss`, which can read 0.
  * total peak MiB = `ru_maxrss` of that process at the end (model construction included).
A fifth subprocess checks that both implementations agree (max abs diff of decoded images, fp32).

Progress goes to stderr; stdout gets a table and, as its last line, one JSON object with
`fp32_ratio_vs_diffusers`, `bf16_speedup`, per-config numbers and the settings.

    python benchmarks/kl_throughput.py                        # batch 4, 256 px, warmup 1, repeats 3
    python benchmarks/kl_throughput.py --repeats 1 --warmup 0 --threads 2
"""

from __future__ import annotations

import argparse
import json
import tempfile

from _harness import make_logger, measure, parse_args, run_all, run_worker

CONFIGS = ("vistok-fp32", "vistok-bf16", "diffusers-fp32", "diffusers-bf16")
SEED = 0


log = make_logger("kl_throughput")


def build_models(impl: str):
    """Return (encode, decode) callables for `impl` ("vistok" or "diffusers"), same weights either way."""
    import torch
    from vistok import create_tokenizer

    torch.manual_seed(SEED)
    tok = create_tokenizer("mar-kl16").eval()
    with torch.no_grad():
        for p in tok.parameters():
            p.add_(0.01 * torch.randn_like(p))
    if impl == "vistok":
        return (lambda x: tok.encode_posterior(x).mean), tok.decode_unscaled

    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging
    from vistok.convert import export_diffusers

    diffusers_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as d:
        export_diffusers(tok, d)
        vae = AutoencoderKL.from_pretrained(d).eval()
    del tok
    return (lambda x: vae.encode(x).latent_dist.mean), (lambda z: vae.decode(z).sample)


def make_input(args):
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    return torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=g) * 2 - 1


def run_config(name: str, args) -> dict:
    import torch

    impl, precision = name.split("-")
    encode, decode = build_models(impl)
    x = make_input(args)

    def step():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return decode(encode(x))

    r = measure(step, name=name, warmup=args.warmup, repeats=args.repeats, log=log)
    return {**r, "impl": impl, "precision": precision, "images_per_s": args.batch_size / r["median_s"]}


def run_check(args) -> dict:
    """fp32 agreement of the two implementations on the benchmark input."""
    import torch

    (venc, vdec), (denc, ddec) = build_models("vistok"), build_models("diffusers")
    x = make_input(args)
    with torch.inference_mode():
        zv, zd = venc(x), denc(x)
        yv, yd = vdec(zv), ddec(zv)
    return {"config": "check", "latent_max_abs_diff": (zv - zd).abs().max().item(),
            "decoded_max_abs_diff": (yv - yd).abs().max().item(), "decoded_abs_max": yv.abs().max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=256)
    args = parse_args(ap, CONFIGS)

    if run_worker(args, run_config, run_check):  # a `--only` subprocess
        return

    import torch

    results = run_all(__file__, CONFIGS, args, log)
    check = results.pop("check")

    print(f"{'impl':<10} {'precision':<9} {'images/s':>9} {'peak MiB':>9} {'total peak MiB':>15}")
    for r in results.values():
        print(f"{r['impl']:<10} {r['precision']:<9} {r['images_per_s']:>9.3f} "
              f"{r['peak_rss_growth_mib']:>9.1f} {r['total_peak_rss_mib']:>15.1f}")
    print(f"images/s = batch / median of {args.repeats} timed step(s); peak MiB = peak RSS increase during the "
          f"timed encode+decode; decoded max |vistok - diffusers| (fp32) = {check['decoded_max_abs_diff']:.3g}")
    ips = {k: v["images_per_s"] for k, v in results.items()}
    print(json.dumps({
        "fp32_ratio_vs_diffusers": ips["vistok-fp32"] / ips["diffusers-fp32"],
        "bf16_speedup": ips["vistok-bf16"] / ips["vistok-fp32"],
        "diffusers_bf16_speedup": ips["diffusers-bf16"] / ips["diffusers-fp32"],
        "configs": results, "check": check,
        "settings": {"batch_size": args.batch_size, "resolution": args.resolution, "warmup": args.warmup,
                     "repeats": args.repeats, "threads": next(iter(results.values()))["threads"],
                     "torch": torch.__version__, "images_per_s": "batch / median repeat time"},
    }))


if __name__ == "__main__":
    main()
