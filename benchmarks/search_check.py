"""Correctness of the fast nearest-code search on a device: ids of the default search (TF32 scores + exact
fp32 re-rank on CUDA) and of the bf16 mode must equal an exact fp32 search's, on the real presets'
quantizer geometries and through whole tokenizers (random weights).

Checks, on `--device`:
  * raw searches: `--tokens` random rows x {the presets' codebooks: 16384 x 32 residual (DualToken), 16384 x 8
    L2-normalised (LlamaGen VQ-16 / TokLIP)}, at depth 8 for the residual quantizer;
  * tokenizers: `encode` of `--batch` random images with every quantizer's `search_dtype` set to "auto",
    "bfloat16" and "float32" (the last with TF32 off and "highest" matmul precision), ids compared.
Prints one line per check and, last, a JSON object {"ok": bool, "checks": [...]}; exits 1 when any differ.

    python benchmarks/search_check.py --device cuda
    python benchmarks/search_check.py --device cpu --presets tiny-dualtoken,tiny-toklip,tiny-vqgan --tokens 2048
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

import vistok
from vistok.tokenizers.quantizers import ResidualQuantizer
from vistok.tokenizers.search import set_search_dtype
from vistok.tokenizers.vqgan import L2VectorQuantizer

MODES = ("auto", "bfloat16", "tfloat32")


@contextlib.contextmanager
def exact_fp32():
    """fp32 products really in fp32 for the reference search."""
    tf32, precision = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def compare(name: str, run, module) -> list[dict]:
    set_search_dtype(module, "float32")
    with exact_fp32(), torch.inference_mode():
        ref = run()
    rows = []
    for mode in MODES:
        set_search_dtype(module, mode)
        with torch.inference_mode():
            ids = run()
        bad = sum(int((ids[k] != ref[k]).sum()) for k in ref)
        total = sum(ref[k].numel() for k in ref)
        rows.append({"check": name, "mode": mode, "mismatching_ids": bad, "ids": total})
        print(f"{name:<40} {mode:<9} mismatching ids {bad} / {total}", flush=True)
    return rows


def raw_checks(args) -> list[dict]:
    torch.manual_seed(0)
    dev = torch.device(args.device)
    rows = []
    rq = ResidualQuantizer(dim=32, codebook_size=16384, depth=8, shared_codebook=False).eval().to(dev)
    x = torch.randn(args.tokens, 32, device=dev) / 32**0.5
    rows += compare(f"residual 16384x32 depth 8, {args.tokens} rows", lambda: {"ids": rq(x).ids}, rq)
    vq = L2VectorQuantizer(codebook_size=16384, dim=8).eval().to(dev)
    with torch.no_grad():
        vq.embedding.weight.normal_()  # spread codes (LlamaGen's init is a tiny uniform box)
    z = torch.randn(1, 8, args.tokens // 64, 64, device=dev)
    rows += compare(f"l2 vq 16384x8, {args.tokens} rows", lambda: {"ids": vq(z).ids}, vq)
    return rows


def tokenizer_checks(args) -> list[dict]:
    rows = []
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        extra = {"with_text": False, "with_teacher": False} if "dualtoken" in preset else {}
        tok = vistok.create_tokenizer(preset, **extra).eval().to(args.device)
        size = tok.preprocess_config.image_size
        g = torch.Generator().manual_seed(1)
        pixels = (torch.rand(args.batch, 3, size, size, generator=g) * 2 - 1).to(args.device)
        rows += compare(f"{preset} encode, batch {args.batch}", lambda: tok.encode(pixels).ids, tok)
        del tok
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--presets", default="dualtoken-so400m-384,dualtoken-siglip-l16-256,llamagen-vq16,toklip-l-384")
    args = ap.parse_args()
    rows = raw_checks(args) + tokenizer_checks(args)
    ok = all(r["mismatching_ids"] == 0 for r in rows)
    print(json.dumps({"ok": ok, "device": args.device, "checks": rows}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
