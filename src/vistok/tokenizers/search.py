"""Nearest-code search: the one search every vistok quantizer uses (residual VQ, LlamaGen's
L2-normalised VQ, TokLIP's frozen VQ).

For rows x (N, d) and codes c (K, d) it returns argmin_j ||x - c_j||^2 = argmin_j (||c_j||^2 - 2 x.c_j):
the ||x||^2 term does not change the argmin and is dropped, and so are the sqrt and clamp some libraries
apply. Scores come from one GEMM per chunk of rows (`torch.addmm`, fp32 output), so the extra memory
is one chunk x K score matrix however many rows there are.

Score modes (`score_dtype`), all giving the ids of an fp32 search:

- "float32": fp32 scores and argmin (ties: the lowest index); the CPU default. On the CPU the argmin
  is `blocked_argmin` (the same index, without argmin's unvectorised index-tracking reduction).
- "tfloat32" (the CUDA default) and "bfloat16": the GEMM rounds its inputs (TF32 tensor cores; bf16
  inputs with fp32 accumulation and output). The `candidates` smallest scores per row are re-ranked
  exactly in fp32 by elementwise products (no matmul precision setting touches them), and a
  rounding-error bound certifies per row that the true nearest code is among them: the row is
  accepted when the k-th smallest fast score exceeds the smallest by more than twice the bound. The
  rows that fail (near-ties in the fast scores) are searched again on the exact path (in fp64 where
  fp32 products are not exact). On the CPU the two modes round the inputs explicitly, then run the
  fp32 GEMM, which is what the tests exercise.

TF32 is the CUDA default rather than bf16: with 8x smaller input rounding, the certificate accepts
nearly every row at 8 candidates (random data, 16k codes, dim 32: 0 % fall back, against 17 % for
bf16 inputs), and a GEMM of inner size 32 is bound by writing the scores, not by its arithmetic.
Where an fp32 product is not exact (TF32 on, "high"/"medium" matmul precision), "float32" takes the
certified path too, with a bf16-sized bound. The fast path's ids are the fp32 argmin's except where two
codes' fp32 scores differ only by fp32 rounding (a different summation order can flip such a tie).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

SCORE_DTYPES = ("auto", "float32", "tfloat32", "bfloat16")
DEFAULT_CANDIDATES = 8
# score-matrix elements per chunk: 1 Mi (4 MiB of fp32 scores, cache-resident for the argmin: 2x faster
# than 64 MiB chunks on a CPU core) on the CPU, 128 Mi (512 MiB: few launches) on accelerators
CPU_CHUNK_ELEMENTS, DEVICE_CHUNK_ELEMENTS = 1 << 20, 1 << 27
_INPUT_ROUNDOFF = {"tfloat32": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-8}  # float32: when inexact
ARGMIN_BLOCK = 128  # columns per block of `blocked_argmin`
_SAFETY = 2.0  # headroom for truncating conversions, reduced-precision split-K reductions, blocking orders


def fp32_matmul_rounding(device: torch.device) -> Optional[str]:
    """What an fp32 matrix product on `device` may round its inputs to: None (exact IEEE fp32), "tf32" or
    "bf16". Read from torch's per-backend `fp32_precision` (cuda / mkldnn, else the generic one), which
    answers whichever API set it: `torch.get_float32_matmul_precision()` raises once the newer
    `torch.backends.*.fp32_precision` API has been used."""
    backend = {"cuda": torch.backends.cuda.matmul, "cpu": torch.backends.mkldnn.matmul}.get(device.type)
    precision = getattr(backend, "fp32_precision", "none")
    if precision == "none":
        precision = torch.backends.fp32_precision
    if precision == "tf32":
        try:  # the legacy "medium" reads as tf32 on CUDA but allows bf16: keep the bound conservative
            if torch.get_float32_matmul_precision() == "medium":
                return "bf16"
        except RuntimeError:  # the newer API was used: its reading stands
            pass
    return None if precision in ("ieee", "none") else precision


def fp32_matmul_is_exact(device: torch.device) -> bool:
    """False where an fp32 matrix product may round its inputs (TF32 on CUDA, "high"/"medium" float32
    matmul precision, a backend's `fp32_precision` set to "tf32" / "bf16")."""
    return fp32_matmul_rounding(device) is None


def resolve_score_dtype(score_dtype, device: torch.device) -> str:
    """"auto"/None -> "tfloat32" on CUDA, "float32" elsewhere; else one of SCORE_DTYPES (or
    torch.float32 / torch.bfloat16). Raises ValueError otherwise."""
    if score_dtype is None:
        score_dtype = "auto"
    elif isinstance(score_dtype, torch.dtype):
        score_dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(score_dtype, str(score_dtype))
    if score_dtype not in SCORE_DTYPES:
        raise ValueError(f"score_dtype must be one of {SCORE_DTYPES}, got {score_dtype!r}")
    if score_dtype == "auto":
        return "tfloat32" if device.type == "cuda" else "float32"
    return score_dtype


def default_chunk_rows(codebook_size: int, device: torch.device) -> int:
    """Rows of x per search chunk so one (rows, codebook_size) fp32 score block stays within the device's
    budget (4 MiB on the CPU: cache-resident for the argmin; 512 MiB on CUDA); at least 64."""
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_CHUNK_ELEMENTS
    return max(64, budget // max(codebook_size, 1))


@torch.no_grad()
def nearest_code(x: torch.Tensor, codebook: torch.Tensor, chunk_size: Optional[int] = None, *,
                 score_dtype=None, candidates: int = DEFAULT_CANDIDATES,
                 sq_norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Index of the nearest code (squared L2) for every row.

    x: (N, d) float; codebook: (K, d) float, same device (the exact parts run in fp32).
    chunk_size: rows per GEMM (None: a 1 Mi-element score matrix on the CPU, 128 Mi on accelerators).
    score_dtype: "auto" / None ("tfloat32" on CUDA, "float32" elsewhere), "float32", "tfloat32",
    "bfloat16". candidates: fast-score candidates re-ranked in fp32 (fast modes only). sq_norms: the
    codebook's fp32 `codebook.float().pow(2).sum(-1)` (K,), when the caller searches one codebook
    several times (a residual quantizer's depths); None computes it.
    Returns int64 (N,) in [0, K); ties go to the lowest index. Runs without autocast and without grad.
    Raises ValueError on mismatched shapes, an empty codebook, a bad score_dtype / chunk_size, or NaN / inf
    in x or the codebook (no nearest code exists; the fast modes check only the rows they could not certify,
    which include every non-finite one, so the check adds no host sync to a clean call).
    """
    if x.ndim != 2 or codebook.ndim != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"need x (N, d) and codebook (K, d) with the same d, got {tuple(x.shape)} and "
                         f"{tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("the codebook is empty")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be an int >= 1, got {candidates!r}")
    mode = resolve_score_dtype(score_dtype, x.device)
    chunk = chunk_size or default_chunk_rows(codebook.shape[0], x.device)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, codebook = x.float(), codebook.float()
        sq_norms = codebook.pow(2).sum(-1) if sq_norms is None else sq_norms
        if mode == "float32" and fp32_matmul_is_exact(x.device):
            _require_finite(x, codebook)
            for start in range(0, x.shape[0], chunk):
                out[start:start + chunk] = _exact_search(x[start:start + chunk], codebook, sq_norms)
            return out
        search = _certified_search(codebook, sq_norms, mode, candidates)
        unsure = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for start in range(0, x.shape[0], chunk):
            out[start:start + chunk], unsure[start:start + chunk] = search(x[start:start + chunk], codebook, sq_norms)
        rows = unsure.nonzero().flatten()  # one host sync per call, not per chunk
        if rows.numel():
            _require_finite(x, codebook, rows)
        for start in range(0, rows.numel(), chunk):
            part = rows[start:start + chunk]
            out[part] = _fallback_search(x[part], codebook, sq_norms)
    return out


def _require_finite(x: torch.Tensor, codebook: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
    """ValueError naming the non-finite rows of x (x[rows] when given, the fast modes' uncertified rows)."""
    for name, t, index in (("x", x if rows is None else x[rows], rows), ("codebook", codebook, None)):
        bad = (~torch.isfinite(t).all(-1)).nonzero().flatten()
        if bad.numel():
            bad = bad if index is None else index[bad]
            raise ValueError(f"nearest_code: {name} holds NaN or inf in {bad.numel()} row(s) (e.g. row(s) "
                             f"{bad[:5].tolist()}): no nearest code exists for them")


def _exact_search(x: torch.Tensor, codebook: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """fp32 scores ||c||^2 - 2 x.c from one addmm, then argmin (first minimum on ties). The 1-D bias
    lets cuBLASLt add it in the GEMM's epilogue."""
    scores = torch.addmm(sq_norms, x, codebook.T, beta=1, alpha=-2)
    return blocked_argmin(scores) if scores.device.type == "cpu" else scores.argmin(-1)


def blocked_argmin(scores: torch.Tensor, block: int = ARGMIN_BLOCK) -> torch.Tensor:
    """`scores.argmin(-1)` for a 2-D tensor, by blocks: the vectorised `amin` of each `block` columns,
    the first block holding the row minimum, then the argmin inside that block only. The same index
    as argmin (the first minimum; a NaN counts as the minimum, as in argmin), about 5x faster on the
    CPU, where argmin's index-tracking reduction is not vectorised (16k columns: 1.5 ms against 9 ms
    per 512 rows on one core). Columns past the last full block are compared at the end."""
    n, k = scores.shape
    full = k // block * block
    if full == 0:
        return scores.argmin(-1)
    blocks = scores[:, :full].view(n, full // block, block)
    first = blocks.amin(-1).argmin(-1)  # (n,): first block that holds the row minimum
    rows = torch.arange(n, device=scores.device)
    ids = first * block + blocks[rows, first].argmin(-1)
    if full < k:
        tail_ids = scores[:, full:].argmin(-1)
        tail, best = scores[rows, full + tail_ids], scores[rows, ids]
        take = (tail < best) | (tail.isnan() & ~best.isnan())
        ids = torch.where(take, full + tail_ids, ids)
    return ids


def _fallback_search(x: torch.Tensor, codebook: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    if fp32_matmul_is_exact(x.device):
        return _exact_search(x, codebook, sq_norms)
    return _exact_search(x.double(), codebook.double(), sq_norms.double())


def round_mantissa(t: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 values rounded to `bits` explicit mantissa bits (round half away from zero), e.g. 10 for
    TF32, 7 for bf16; finite inputs only."""
    drop = 23 - bits
    i = t.view(torch.int32)
    return ((i + (1 << (drop - 1))) & ~((1 << drop) - 1)).view(torch.float32)


@contextlib.contextmanager
def _tf32_matmul(device: torch.device):
    """TF32 for the block where fp32 products are exact, through the API torch reads back whichever set it.
    A setting that already rounds is left alone: toggling the legacy `allow_tf32` turned a user's "medium"
    into "high" and made `torch.get_float32_matmul_precision()` raise from then on."""
    matmul = torch.backends.cuda.matmul
    if fp32_matmul_rounding(device) is not None:
        yield
        return
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def _score_function(codebook: torch.Tensor, sq_norms: torch.Tensor, mode: str):
    """chunk -> fp32 scores (n, K) for a fast mode; the codebook is prepared once per call."""
    bias, cuda = sq_norms[None], codebook.is_cuda
    if mode == "bfloat16" and cuda:  # bf16 inputs, fp32 accumulation and output (cublasGemmEx)
        book_t = (-2 * codebook).T.bfloat16()
        return lambda x: torch.mm(x.bfloat16(), book_t, out_dtype=torch.float32).add_(bias)
    if mode == "tfloat32" and cuda:
        book_t = (-2 * codebook).T  # -2 folded in exactly; 1-D bias: one fused cuBLASLt GEMM + bias

        def tf32(x):
            with _tf32_matmul(x.device):
                return torch.addmm(sq_norms, x, book_t)
        return tf32
    if mode == "float32":  # an fp32 product the backend may round: take it as it is
        return lambda x: torch.addmm(bias, x, codebook.T, beta=1, alpha=-2)
    bits = 10 if mode == "tfloat32" else 7  # elsewhere: round the inputs, then an fp32 GEMM
    book_t = round_mantissa(codebook, bits).T
    return lambda x: torch.addmm(bias, round_mantissa(x, bits), book_t, beta=1, alpha=-2)


def _certified_search(codebook: torch.Tensor, sq_norms: torch.Tensor, mode: str, candidates: int):
    k = min(candidates, codebook.shape[0])
    scores_of = _score_function(codebook, sq_norms, mode)
    code_norm, bias_max, d = sq_norms.max().sqrt(), sq_norms.max(), codebook.shape[1]
    u = _INPUT_ROUNDOFF[mode]
    if mode != "bfloat16" and fp32_matmul_rounding(codebook.device) == "bf16":
        u = _INPUT_ROUNDOFF["bfloat16"]  # "medium" (or fp32_precision "bf16") lets fp32 products run in bf16

    def search(x: torch.Tensor, codebook: torch.Tensor, sq_norms: torch.Tensor):
        """-> ids from the re-ranked candidates, and the rows whose candidates are not certified."""
        fast, cand = scores_of(x).topk(k, dim=-1, largest=False, sorted=True)
        ids = _rerank(x, codebook, sq_norms, cand)
        if k == codebook.shape[0]:  # every code re-ranked: exact unless a score is NaN / inf
            return ids, ~torch.isfinite(x).all(-1) | ~torch.isfinite(sq_norms).all()
        # |fast - exact| per score <= err: both inputs rounded (2u + u^2 relative on each product),
        # fp32 accumulation over d terms and the bias add, fp32 output rounding
        dot_bound = 2 * x.norm(dim=-1) * code_norm  # >= |2 x.c| for every code
        err = _SAFETY * ((2 * u + u * u + (d + 2) * 2.0**-24) * dot_bound + 2.0**-23 * bias_max)
        # written as "not certified" so that NaN gaps or bounds (non-finite rows) count as uncertified
        return ids, ~(fast[:, -1] - fast[:, 0] > 2 * err)

    return search


def _rerank(x: torch.Tensor, codebook: torch.Tensor, sq_norms: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Exact fp32 scores of the candidates (n, k) by elementwise products; lowest index on ties."""
    exact = sq_norms[cand] - 2 * (x[:, None, :] * codebook[cand]).sum(-1)
    best = exact.min(-1, keepdim=True).values
    return torch.where(exact == best, cand, codebook.shape[0]).min(-1).values


def set_search_dtype(module: torch.nn.Module, score_dtype: str) -> int:
    """Set `search_dtype` on every quantizer inside `module` (e.g. a whole tokenizer); returns how many.
    Raises ValueError for a score_dtype not in SCORE_DTYPES."""
    resolve_score_dtype(score_dtype, torch.device("cpu"))
    found = [m for m in module.modules() if hasattr(m, "search_dtype")]
    for m in found:
        m.search_dtype = score_dtype
    return len(found)
