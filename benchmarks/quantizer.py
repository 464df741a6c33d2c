"""CPU time and memory of an eval-mode residual-VQ encode: vistok's ResidualQuantizer vs vector-quantize-pytorch.

What it measures: one call encodes `--tokens` random vectors of `--dim` channels to ids at residual depth
`--depth`, each depth with its own `--codebook-size`-entry codebook, in eval mode under
`torch.inference_mode()` on the CPU:
  * vistok:  `ResidualQuantizer(dim, codebook_size, depth, shared_codebook=False).eval().encode(x)` -- a chunked
    nearest-code search (`nearest_code`), extra memory about one chunk x codebook matrix;
  * library: `vector_quantize_pytorch.ResidualVQ(..., num_quantizers=depth, decay=0.99, rotation_trick=False,
    sync_codebook=False, threshold_ema_dead_code=0).eval()(x)[1]` -- full tokens x codes distance matrices plus a
    one-hot per depth (reference/libraries.md section 1.7).
Both search the same codes: vistok's seeded codebooks (`q.embed[d]`) are copied into the library's layers
(`rvq.layers[d]._codebook.embed`, already `initted`, no k-means), and the input is the same seeded tensor
x ~ N(0, 1/dim) of shape (1, tokens, dim).

Each implementation runs in a fresh subprocess (this script re-invoked with a hidden `--only CONFIG`), so one's
allocations cannot hide or inflate the other's memory numbers.
  * median s / tokens/s: median wall time of the `--repeats` timed calls (after `--warmup` untimed calls);
    the JSON also has the median process CPU time per call, steadier on a busy machine.
  * peak MiB: peak resident memory (RSS) increase during the timed calls -- peak RSS over the timed calls minus
    RSS just before them. On Linux the kernel's peak counter is reset first (/proc/self/clear_refs); elsewhere it
    falls back to the growth of `getrusage(RUSAGE_SELF).ru_maxrss`, which can read 0.
  * total peak MiB: `ru_maxrss` of that process at the end (construction included).
A third subprocess encodes with both and counts mismatching ids (expected 0: same distance expression).

Progress goes to stderr; stdout gets a table and, as its last line, one JSON object with
`peak_memory_ratio_vs_library`, `time_ratio_vs_library`, `ids_mismatch`, per-config numbers and the settings.

    python benchmarks/quantizer.py                  # 16384 tokens, dim 32, 16384 codes, depth 8, warmup 1, repeats 3
    python benchmarks/quantizer.py --tokens 4096 --repeats 1 --warmup 0 --threads 2
"""

from __future__ import annotations

import argparse
import json

from _harness import make_logger, measure, parse_args, run_all, run_worker

CONFIGS = ("vistok", "library")
SEED = 0


log = make_logger("quantizer")


def build(impl: str, args):
    """Return an encode callable x (1, N, dim) -> ids (1, N, depth) for `impl`; both use the same codebooks."""
    import torch
    from vistok.tokenizers.quantizers import ResidualQuantizer

    torch.manual_seed(SEED)
    q = ResidualQuantizer(dim=args.dim, codebook_size=args.codebook_size, depth=args.depth,
                          shared_codebook=False).eval()
    if impl == "vistok":
        return q.encode

    from vector_quantize_pytorch import ResidualVQ

    rvq = ResidualVQ(dim=args.dim, codebook_size=args.codebook_size, num_quantizers=args.depth, decay=0.99,
                     rotation_trick=False, sync_codebook=False, threshold_ema_dead_code=0).eval()
    with torch.no_grad():
        for d, layer in enumerate(rvq.layers):
            book = layer._codebook
            assert book.embed.shape == (1, args.codebook_size, args.dim), book.embed.shape
            book.embed.copy_(q.embed[d][None])
            book.embed_avg.copy_(q.embed[d][None])
            assert bool(book.initted), "library codebook would run k-means init on the first call"
    del q
    return lambda x: rvq(x)[1]


def make_input(args):
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    return torch.randn(1, args.tokens, args.dim, generator=g) / args.dim**0.5


def run_config(impl: str, args) -> dict:
    import torch

    encode = build(impl, args)
    x = make_input(args)

    def step():
        with torch.inference_mode():
            ids = encode(x)
        assert ids.shape == (1, args.tokens, args.depth), ids.shape
        return ids

    r = measure(step, name=impl, warmup=args.warmup, repeats=args.repeats, log=log)
    return {**r, "tokens_per_s": args.tokens / r["median_s"]}


def run_check(args) -> dict:
    """Ids of both implementations on the benchmark input; number of mismatches and first mismatching depth."""
    import torch

    x = make_input(args)
    with torch.inference_mode():
        iv = build("vistok", args)(x)
        il = build("library", args)(x)
    diff = iv != il
    depths = diff.any(dim=(0, 1)).nonzero().flatten().tolist()
    return {"config": "check", "ids_mismatch": int(diff.sum()), "tokens_with_mismatch": int(diff.any(-1).sum()),
            "first_mismatching_depth": depths[0] if depths else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--codebook-size", type=int, default=16384)
    ap.add_argument("--depth", type=int, default=8)
    args = parse_args(ap, CONFIGS)

    if run_worker(args, run_config, run_check):  # a `--only` subprocess
        return

    import torch

    results = run_all(__file__, CONFIGS, args, log)
    check = results.pop("check")
    v, lib = results["vistok"], results["library"]

    print(f"{'impl':<8} {'median s':>9} {'tokens/s':>10} {'peak MiB':>9} {'total peak MiB':>15}")
    for r in results.values():
        print(f"{r['config']:<8} {r['median_s']:>9.3f} {r['tokens_per_s']:>10.0f} "
              f"{r['peak_rss_growth_mib']:>9.1f} {r['total_peak_rss_mib']:>15.1f}")
    print(f"{args.tokens} tokens x dim {args.dim}, {args.codebook_size} codes x depth {args.depth}, "
          f"{v['threads']} thread(s); median of {args.repeats} timed call(s); peak MiB = peak RSS increase during "
          f"the timed calls; mismatching ids vistok vs library = {check['ids_mismatch']}")
    print(json.dumps({
        "peak_memory_ratio_vs_library": v["peak_rss_growth_mib"] / lib["peak_rss_growth_mib"],
        "time_ratio_vs_library": v["median_s"] / lib["median_s"],
        "cpu_time_ratio_vs_library": v["median_cpu_s"] / lib["median_cpu_s"],
        "ids_mismatch": check["ids_mismatch"],
        "configs": results, "check": check,
        "settings": {"tokens": args.tokens, "dim": args.dim, "codebook_size": args.codebook_size,
                     "depth": args.depth, "warmup": args.warmup, "repeats": args.repeats, "threads": v["threads"],
                     "torch": torch.__version__, "tokens_per_s": "tokens / median repeat time"},
    }))


if __name__ == "__main__":
    main()
