"""DualToken throughput: `encode` against the bare SigLIP tower, and one training step's time, FLOPs, MFU and
peak memory (the training step also for the other trainable families: `--preset toklip-l-384`, `mar-kl16`).

What it measures, on `--device` (cpu or cuda), for `--preset` with random weights (seeded), under bf16 autocast
(`--precision bf16`, the training default; quantizers stay fp32) or fp32:
  * tower:  `tok.siglip.visual(x)`, the bare open_clip SigLIP vision tower (patch embedding, every block, the
            attention-pool head) on a batch of `--batch` random images, under `torch.inference_mode()`;
  * encode: `tok.encode(x)` on the same batch: the same tower with the pixel and semantic branches (projections,
            two residual quantizers, the up projection replacing the deep hidden state);
  * train:  one training step at `--train-batch`: the trainer's objective of the preset's family
            (`vistok.train.objectives`; LPIPS off; the GAN and its adaptive weight on from step 0; TokLIP's
            contrastive + distillation loss against its frozen text tower on random caption token ids)
            forward + backward, the discriminator's loss + backward, AdamW steps (fused on CUDA unless `--no-fused`); options `--grad-checkpointing` (tower and
            pixel decoder), `--channels-last` (CUDA), `--compile`;
  * matmul: a square `--matmul-size` matrix product in the step's dtype (bf16 for `--precision bf16`), the rate
            the MFU is measured against.
Training FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` over one (untimed) step; MFU =
counted FLOPs / median step time / the matmul rate of the same run.

Each configuration runs in a fresh subprocess (this script re-invoked with a hidden `--only CONFIG`).
  * images/s = batch / median wall time of the `--repeats` timed calls (after `--warmup` untimed ones; CUDA
    synchronised).
  * peak memory: on CUDA the allocator's peak during the timed calls (`train_peak_gib` is absolute: weights,
    optimizer state and activations); on the CPU `train_peak_gib` is the training process's peak RSS.

Progress goes to stderr; stdout gets a table and, as its last line, one JSON object with at least
`encode_ratio_vs_tower`, `train_mfu`, `train_peak_gib`, `train_tflop_per_step`, `train_step_s`.

    python benchmarks/dualtoken_throughput.py --device cuda                  # so400m-384, batch 32 / train 16
    python benchmarks/dualtoken_throughput.py --device cuda --grad-checkpointing --channels-last --compile
    python benchmarks/dualtoken_throughput.py --device cpu --preset dualtoken-siglip-l16-256 --batch 2 \
        --train-batch 1 --repeats 1 --warmup 0 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

from _harness import make_logger, measure, parse_args, run_all, run_worker

CONFIGS = ("matmul", "tower", "encode", "train")
# training objectives as the trainer builds them, LPIPS off (its VGG weights are a separate download);
# the GAN (and KL's from step 0) on
NO_LPIPS = {"dualtoken": {"lpips_weight": 0.0}, "kl": {"perceptual_weight": 0.0, "disc_start": 0},
            "vqgan": {"perceptual_weight": 0.0}}
SEED = 0
DEFAULTS = {"cuda": {"preset": "dualtoken-so400m-384", "batch": 32, "train_batch": 16, "matmul_size": 8192},
            "cpu": {"preset": "dualtoken-siglip-l16-256", "batch": 2, "train_batch": 1, "matmul_size": 2048}}


log = make_logger("dualtoken_throughput")


def autocast(args):
    import torch

    return torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def family_of(preset: str) -> str:
    from vistok.tokenizers.base import tokenizer_class
    from vistok.tokenizers.registry import get_preset

    return tokenizer_class(get_preset(preset)["class"]).family


def build(args, *, train: bool):
    import torch
    import vistok

    torch.manual_seed(SEED)
    family = family_of(args.preset)
    kwargs = {}
    if family in ("dualtoken", "toklip"):  # TokLIP's frozen text tower gives the contrastive targets
        kwargs.update(with_text=family == "toklip" and train, with_teacher=train,
                      grad_checkpointing=train and args.grad_checkpointing)
    tok = vistok.create_tokenizer(args.preset, **kwargs)
    return tok.to(args.device).train(train)


def images(args, batch: int):
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    return (torch.rand(batch, 3, args.size, args.size, generator=g) * 2 - 1).to(args.device)


def run_matmul(args) -> dict:
    import torch

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    n = args.matmul_size
    a = torch.randn(n, n, device=args.device, dtype=dtype)
    b = torch.randn(n, n, device=args.device, dtype=dtype)
    r = measure(lambda: a @ b, name="matmul", warmup=max(args.warmup, 1), repeats=max(args.repeats, 3), log=log,
                device=args.device)
    return {**r, "tflop_per_s": 2 * n**3 / r["median_s"] / 1e12, "dtype": str(dtype)}


def run_inference(name: str, args) -> dict:
    import torch

    tok = build(args, train=False)
    x = images(args, args.batch)
    fn = tok.siglip.visual if name == "tower" else tok.encode

    def step():
        with torch.inference_mode(), autocast(args):
            return fn(x)

    r = measure(step, name=name, warmup=args.warmup, repeats=args.repeats, log=log, device=args.device)
    return {**r, "images_per_s": args.batch / r["median_s"]}


def make_train_step(args):
    """One trainer-like step (generator + discriminator) and the eager step for FLOP counting."""
    import torch
    from vistok.train.objectives import objective_class

    try:
        from vistok.train import speed
    except ImportError:  # a vistok without train/speed.py: plain AdamW, no layout options
        speed = None
    device = torch.device(args.device)
    tok = build(args, train=True)
    family = tok.family
    objective = objective_class(family)(NO_LPIPS.get(family, {}))
    objective.loss.to(device)
    disc = objective.discriminator or torch.nn.Linear(1, 1).to(device)  # TokLIP: no discriminator
    params = [p for p in tok.parameters() if p.requires_grad] + objective.extra_parameters()
    if speed is not None:
        if args.channels_last:
            speed.channels_last(tok, disc, device=device)
        opt = speed.make_adamw([{"params": params}], lr=1e-5, betas=(0.5, 0.9), device=device, fused=args.fused)
        d_opt = speed.make_adamw([{"params": list(disc.parameters())}], lr=1e-5, betas=(0.5, 0.9), device=device,
                                 fused=args.fused)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.5, 0.9))
        d_opt = torch.optim.AdamW(disc.parameters(), lr=1e-5, betas=(0.5, 0.9))
    x = images(args, args.train_batch)

    if family == "toklip":  # random caption token ids: the SigLIP2 text tokenizer files are not offline
        g = torch.Generator().manual_seed(SEED + 2)
        tokens = torch.randint(1, 1000, (args.train_batch, tok.siglip.context_length), generator=g).to(device)

        def generator_step(model, raw_model, pixels, step):
            out = model(pixels)
            with torch.no_grad():
                text = raw_model.encode_text(tokens, normalize=False)
            return objective.loss(raw_model, out, text, step=step), out
    else:
        generator_step = objective.generator_step

    def step_with(forward_model):
        def step():
            with autocast(args):
                loss, out = generator_step(forward_model, tok, x, 0)
            loss.total.backward()
            with autocast(args):
                d_loss = objective.discriminator_loss(out, x, 0) if disc is objective.discriminator else None
            if d_loss is not None:
                d_loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)
            return loss.total.detach()
        return step

    eager = step_with(tok)
    timed = step_with(speed.compile_module(tok)) if args.compile and speed is not None else eager
    return eager, timed


def run_train(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    eager, timed = make_train_step(args)
    counter = FlopCounterMode(display=False)
    t0 = time.perf_counter()
    with counter:
        eager()
    log(f"train: FLOP-counted step {time.perf_counter() - t0:.1f}s")
    flops = counter.get_total_flops()
    r = measure(timed, name="train", warmup=args.warmup, repeats=args.repeats, log=log, device=args.device)
    cuda = args.device == "cuda"
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else r["total_peak_rss_mib"] / 1024
    return {**r, "flops_per_step": flops, "train_peak_gib": peak_gib,
            "train_peak_method": "cuda max_memory_allocated" if cuda else "process peak RSS"}


def run_config(name: str, args) -> dict:
    if name == "matmul":
        return run_matmul(args)
    if name == "train":
        return run_train(args)
    return run_inference(name, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--preset", default=None, help="default: dualtoken-so400m-384 on cuda, dualtoken-siglip-l16-256 on cpu")
    ap.add_argument("--batch", type=int, default=None, help="encode / tower batch (default 32 cuda, 2 cpu)")
    ap.add_argument("--train-batch", type=int, default=None, help="training batch (default 16 cuda, 1 cpu)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--matmul-size", type=int, default=None)
    flag = argparse.BooleanOptionalAction
    ap.add_argument("--grad-checkpointing", action=flag, default=False, help="tower and pixel decoder")
    ap.add_argument("--channels-last", action=flag, default=False, help="decoder / discriminator NHWC (CUDA)")
    ap.add_argument("--compile", action=flag, default=False, help="torch.compile the training forward")
    ap.add_argument("--fused", action=flag, default=True, help="fused AdamW (CUDA)")
    ap.add_argument("--skip-train", action=flag, default=False)
    ap.add_argument("--skip-encode", action=flag, default=False, help="matmul and train only")
    ap.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)  # set from the preset
    args = parse_args(ap, CONFIGS)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.size is None:
        from vistok.tokenizers.base import tokenizer_class
        from vistok.tokenizers.registry import get_preset

        preset = get_preset(args.preset)
        default = tokenizer_class(preset["class"]).default_preprocess["image_size"]
        args.size = (preset["args"].get("preprocess") or {}).get("image_size", default)

    if run_worker(args, run_config, lambda a: {}):  # a `--only` subprocess
        return

    import torch

    skip = {"train"} if args.skip_train else set()
    # encode vs tower is DualToken's question; other families (toklip-l-384, mar-kl16) train only
    skip |= {"tower", "encode"} if args.skip_encode or family_of(args.preset) != "dualtoken" else set()
    results = run_all(__file__, [n for n in CONFIGS if n not in skip], args, log)
    results.pop("check", None)
    mm, tower, enc = results["matmul"], results.get("tower"), results.get("encode")
    train = results.get("train")
    rate = mm["tflop_per_s"]
    out = {"encode_ratio_vs_tower": None, "matmul_tflop_per_s": rate, "train_mfu": None, "train_peak_gib": None}
    if enc:
        out.update(encode_ratio_vs_tower=enc["images_per_s"] / tower["images_per_s"],
                   encode_ratio_vs_tower_cpu_time=tower["median_cpu_s"] / enc["median_cpu_s"],  # steadier on a busy CPU
                   encode_images_per_s=enc["images_per_s"], tower_images_per_s=tower["images_per_s"])
    if train:
        achieved = train["flops_per_step"] / train["median_s"] / 1e12
        # the same ratio from process CPU times: on a busy CPU machine wall times mix in other load
        cpu_mfu = (train["flops_per_step"] / train["median_cpu_s"]) / (rate * 1e12 * mm["median_s"] / mm["median_cpu_s"])
        out.update(train_mfu_cpu_time=cpu_mfu if args.device == "cpu" else None)
        out.update(train_step_s=train["median_s"], train_step_cpu_s=train["median_cpu_s"], train_tflop_per_step=train["flops_per_step"] / 1e12,
                   train_tflop_per_s=achieved, train_mfu=achieved / rate, train_peak_gib=train["train_peak_gib"])

    print(f"{args.device}, {args.preset}, {args.precision}, {mm['threads']} thread(s), median of {args.repeats}")
    print(f"{'what':<10} {'median s':>9} {'images/s':>9} {'peak MiB':>9}  note")
    print(f"{'matmul':<10} {mm['median_s']:>9.4f} {'':>9} {'':>9}  {args.matmul_size}^3 {mm['dtype']}: {rate:.3f} TFLOP/s")
    if enc:
        for r in (tower, enc):
            print(f"{r['config']:<10} {r['median_s']:>9.3f} {r['images_per_s']:>9.2f} {r['peak_growth_mib']:>9.1f}  "
                  f"batch {args.batch}")
        print(f"encode / tower images/s = {out['encode_ratio_vs_tower']:.3f} (by process CPU time: "
              f"{out['encode_ratio_vs_tower_cpu_time']:.3f})")
    if train:
        print(f"{'train':<10} {train['median_s']:>9.3f} {args.train_batch / train['median_s']:>9.2f} "
              f"{train['peak_growth_mib']:>9.1f}  batch {args.train_batch}: {out['train_tflop_per_step']:.3f} TFLOP "
              f"counted, {out['train_tflop_per_s']:.3f} TFLOP/s = MFU {out['train_mfu']:.3f}; peak "
              f"{out['train_peak_gib']:.2f} GiB ({train['train_peak_method']})")
    out.update(configs=results, settings={
        "device": args.device, "preset": args.preset, "batch": args.batch, "train_batch": args.train_batch,
        "precision": args.precision, "grad_checkpointing": args.grad_checkpointing,
        "channels_last": args.channels_last, "compile": args.compile, "fused": args.fused,
        "warmup": args.warmup, "repeats": args.repeats, "torch": torch.__version__})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
