"""Time and memory of an eval-mode nearest-code encode: vistok's quantizers vs vector-quantize-pytorch.

What it measures, on `--device` (cpu or cuda), in eval mode under `torch.inference_mode()`:
  * vistok / library: `--tokens` random vectors of `--dim` channels to ids at residual depth `--depth`, each
    depth with its own `--codebook-size`-entry codebook:
      vistok:  `ResidualQuantizer(dim, codebook_size, depth, shared_codebook=False).eval().encode(x)`, the
               shared search `vistok.tokenizers.search.nearest_code` (one GEMM per chunk; on CUDA TF32 scores
               with an exact fp32 re-rank), extra memory about one chunk x codebook matrix;
      library: `vector_quantize_pytorch.ResidualVQ(..., num_quantizers=depth, decay=0.99, rotation_trick=False,
               sync_codebook=False, threshold_ema_dead_code=0).eval()(x)[1]`: full tokens x codes distance
               matrices plus a one-hot per depth (reference/libraries.md section 1.7);
  * vqgan / vqgan-library: LlamaGen's L2-normalised quantizer (TokLIP's frozen VQ) on `--tokens` vectors of
    `--vqgan-dim` channels against `--vqgan-codebook-size` codes:
      vqgan:         `vistok.tokenizers.vqgan.L2VectorQuantizer(...).eval()` (the same shared search);
      vqgan-library: `vector_quantize_pytorch.VectorQuantize(use_cosine_sim=True, ...)` (its cosine codebook:
                     argmax of normalised x . normalised codes over a full tokens x codes matrix).
Both sides of each pair search the same codes (vistok's seeded codebooks copied into the library's layers,
already `initted`, no k-means) on the same seeded input.

Each configuration runs in a fresh subprocess (this script re-invoked with a hidden `--only CONFIG`).
  * median s / tokens/s: median wall time of the `--repeats` timed calls (after `--warmup` untimed calls;
    CUDA synchronised); the JSON also has the median process CPU time per call.
  * peak MiB: on the CPU the peak resident memory (RSS) increase during the timed calls (the kernel's peak
    counter reset first via /proc/self/clear_refs); on CUDA the caching allocator's peak over the timed calls
    minus what was allocated before them.
  * total peak MiB: `ru_maxrss` of that process at the end (construction included).
A last subprocess counts mismatching ids: vistok vs library for both pairs (0 expected, up to fp32 near-ties
between the two expressions), and vistok's default search vs its exact fp32 search (0 expected: on CUDA this
is the TF32 + re-rank path against fp32).

Progress goes to stderr; stdout gets a table and, as its last line, one JSON object with
`peak_memory_ratio_vs_library`, `time_ratio_vs_library` (residual pair), `vqgan_peak_memory_ratio_vs_library`,
`vqgan_time_ratio_vs_library`, `ids_mismatch`, per-config numbers and the settings.

    python benchmarks/quantizer.py                  # 16384 tokens, dim 32, 16384 codes, depth 8; VQGAN dim 8
    python benchmarks/quantizer.py --tokens 4096 --repeats 1 --warmup 0 --threads 2
    python benchmarks/quantizer.py --device cuda --tokens 65536
"""

from __future__ import annotations

import argparse
import json

from _harness import make_logger, measure, parse_args, run_all, run_worker

CONFIGS = ("vistok", "library", "vqgan", "vqgan-library")
SEED = 0


log = make_logger("quantizer")


def build(impl: str, args, search_dtype: str = "auto"):
    """An encode callable x (1, N, dim) -> ids (1, N, depth) for `impl`; each pair uses the same codebooks."""
    if impl.startswith("vqgan"):
        return build_vqgan(impl, args, search_dtype)
    import torch
    from vistok.tokenizers.quantizers import ResidualQuantizer

    torch.manual_seed(SEED)
    q = ResidualQuantizer(dim=args.dim, codebook_size=args.codebook_size, depth=args.depth,
                          shared_codebook=False, search_dtype=search_dtype).eval().to(args.device)
    if impl == "vistok":
        return q.encode

    from vector_quantize_pytorch import ResidualVQ

    rvq = ResidualVQ(dim=args.dim, codebook_size=args.codebook_size, num_quantizers=args.depth, decay=0.99,
                     rotation_trick=False, sync_codebook=False, threshold_ema_dead_code=0).eval().to(args.device)
    with torch.no_grad():
        for d, layer in enumerate(rvq.layers):
            book = layer._codebook
            assert book.embed.shape == (1, args.codebook_size, args.dim), book.embed.shape
            book.embed.copy_(q.embed[d][None])
            book.embed_avg.copy_(q.embed[d][None])
            assert bool(book.initted), "library codebook would run k-means init on the first call"
    del q
    return lambda x: rvq(x)[1]


def build_vqgan(impl: str, args, search_dtype: str):
    """x (1, N, vqgan_dim) -> ids (1, N, 1): LlamaGen's quantizer in vistok, or the library's cosine VQ."""
    import torch
    from vistok.tokenizers.vqgan import L2VectorQuantizer

    torch.manual_seed(SEED)
    vq = L2VectorQuantizer(codebook_size=args.vqgan_codebook_size, dim=args.vqgan_dim,
                           search_dtype=search_dtype).eval().to(args.device)
    if impl == "vqgan":
        def encode(x):
            n = x.shape[1]
            return vq(x[0].T.reshape(1, args.vqgan_dim, n, 1)).ids.reshape(1, n, 1)
        return encode

    from vector_quantize_pytorch import VectorQuantize

    lib = VectorQuantize(dim=args.vqgan_dim, codebook_size=args.vqgan_codebook_size, use_cosine_sim=True,
                         decay=0.99, sync_codebook=False, threshold_ema_dead_code=0).eval().to(args.device)
    with torch.no_grad():
        book = lib._codebook
        book.embed.copy_(vq.codebook()[None])
        book.embed_avg.copy_(vq.codebook()[None])
        assert bool(book.initted), "library codebook would run k-means init on the first call"
    del vq
    return lambda x: lib(x)[1][..., None]


def make_input(impl: str, args):
    import torch

    dim = args.vqgan_dim if impl.startswith("vqgan") else args.dim
    g = torch.Generator().manual_seed(SEED + 1)
    return (torch.randn(1, args.tokens, dim, generator=g) / dim**0.5).to(args.device)


def run_config(impl: str, args) -> dict:
    import torch

    encode = build(impl, args)
    x = make_input(impl, args)
    depth = 1 if impl.startswith("vqgan") else args.depth

    def step():
        with torch.inference_mode():
            ids = encode(x)
        assert ids.shape == (1, args.tokens, depth), ids.shape
        return ids

    r = measure(step, name=impl, warmup=args.warmup, repeats=args.repeats, log=log, device=args.device)
    return {**r, "tokens_per_s": args.tokens / r["median_s"]}


def run_check(args) -> dict:
    """Mismatching ids: vistok vs library per pair, and vistok's default search vs its exact fp32 one."""
    import torch

    out = {"config": "check"}
    for ours, theirs in (("vistok", "library"), ("vqgan", "vqgan-library")):
        x = make_input(ours, args)
        with torch.inference_mode():
            iv = build(ours, args)(x)
            il = build(theirs, args)(x)
            exact = build(ours, args, search_dtype="float32")(x)
        diff = iv != il
        depths = diff.any(dim=(0, 1)).nonzero().flatten().tolist()
        out[ours] = {"ids_mismatch_vs_library": int(diff.sum()), "tokens_with_mismatch": int(diff.any(-1).sum()),
                     "first_mismatching_depth": depths[0] if depths else None,
                     "ids_mismatch_default_vs_fp32_search": int((iv != exact).sum())}
    out["ids_mismatch"] = out["vistok"]["ids_mismatch_vs_library"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--codebook-size", type=int, default=16384)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--vqgan-dim", type=int, default=8)
    ap.add_argument("--vqgan-codebook-size", type=int, default=16384)
    args = parse_args(ap, CONFIGS)

    if run_worker(args, run_config, run_check):  # a `--only` subprocess
        return

    import torch

    results = run_all(__file__, CONFIGS, args, log)
    check = results.pop("check")
    v, lib = results["vistok"], results["library"]
    gv, glib = results["vqgan"], results["vqgan-library"]

    print(f"{'impl':<14} {'median s':>9} {'tokens/s':>11} {'peak MiB':>9} {'total peak MiB':>15}")
    for r in results.values():
        print(f"{r['config']:<14} {r['median_s']:>9.4f} {r['tokens_per_s']:>11.0f} "
              f"{r['peak_growth_mib']:>9.1f} {r['total_peak_rss_mib']:>15.1f}")
    print(f"{args.device}: {args.tokens} tokens; residual: dim {args.dim}, {args.codebook_size} codes x depth "
          f"{args.depth}; vqgan: dim {args.vqgan_dim}, {args.vqgan_codebook_size} codes; {v['threads']} thread(s); "
          f"median of {args.repeats} timed call(s); peak MiB = "
          f"{'CUDA allocator peak growth' if args.device == 'cuda' else 'peak RSS increase'} during the timed calls; "
          f"mismatching ids vs library: residual {check['vistok']['ids_mismatch_vs_library']}, vqgan "
          f"{check['vqgan']['ids_mismatch_vs_library']}; default vs fp32 search: residual "
          f"{check['vistok']['ids_mismatch_default_vs_fp32_search']}, vqgan "
          f"{check['vqgan']['ids_mismatch_default_vs_fp32_search']}")

    def ratio(a, b, key):
        return a[key] / b[key] if b[key] else None

    print(json.dumps({
        "peak_memory_ratio_vs_library": ratio(v, lib, "peak_growth_mib"),
        "time_ratio_vs_library": ratio(v, lib, "median_s"),
        "cpu_time_ratio_vs_library": ratio(v, lib, "median_cpu_s"),
        "vqgan_peak_memory_ratio_vs_library": ratio(gv, glib, "peak_growth_mib"),
        "vqgan_time_ratio_vs_library": ratio(gv, glib, "median_s"),
        "ids_mismatch": check["ids_mismatch"],
        "configs": results, "check": check,
        "settings": {"device": args.device, "tokens": args.tokens, "dim": args.dim,
                     "codebook_size": args.codebook_size, "depth": args.depth, "vqgan_dim": args.vqgan_dim,
                     "vqgan_codebook_size": args.vqgan_codebook_size, "warmup": args.warmup,
                     "repeats": args.repeats, "threads": v["threads"], "torch": torch.__version__,
                     "tokens_per_s": "tokens / median repeat time"},
    }))


if __name__ == "__main__":
    main()
