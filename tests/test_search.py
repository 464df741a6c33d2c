"""The shared nearest-code search: the fast path (low-precision scores + exact fp32 re-rank) must give
exactly the fp32 argmin's ids, including at near-ties that bf16 cannot resolve."""

import pytest
import torch

from vistok.tokenizers import search
from vistok.tokenizers.quantizers import ResidualQuantizer
from vistok.tokenizers.search import nearest_code
from vistok.tokenizers.vqgan import L2VectorQuantizer


def brute_force(x: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """fp64 argmin of ||x - c||^2 from the differences themselves (no expansion)."""
    return torch.cdist(x.double(), book.double()).argmin(-1)


def near_tie_data(n_pairs: int = 300, d: int = 32, gap: float = 0.03, seed: int = 0):
    """Codes in pairs c, c' = c + gap * v (|c| ~ 5.7), rows x on the segment between a pair, 20-40 % of
    the way from one end (plus an orthogonal offset): the pair's scores differ by >= 0.2 gap^2 =
    1.8e-4, about 45 fp32 ulps of the scores (~32) but under one bf16 ulp (0.25)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_pairs, d, generator=g)
    step = torch.randn(n_pairs, d, generator=g)
    step = gap * step / step.norm(dim=-1, keepdim=True)
    book = torch.cat([base, base + step])  # code i and i + n_pairs are a near-tie
    side = torch.rand(n_pairs, 1, generator=g) * 0.2 + 0.2  # 0.2..0.4 of the way from c or from c'
    side = torch.where(torch.rand(n_pairs, 1, generator=g) < 0.5, side, 1 - side)
    # rows on the segment between the pair plus a component orthogonal to it (keeps the pair nearest)
    ortho = torch.randn(n_pairs, d, generator=g) * 0.05
    ortho = ortho - (ortho * step).sum(-1, keepdim=True) * step / gap**2
    x = base + side * step + ortho
    return x, book


def sphere_data(rows: int = 50, per_row: int = 40, d: int = 32, seed: int = 0):
    """Each row x (|x| ~ 3) has `per_row` codes around it at radii 1 + 1e-3 * j / per_row (shuffled):
    neighbouring scores differ by 5e-5 (~50 fp32 ulps of scores ~10) but by far less than the
    TF32 or bf16 rounding of the products (~1e-2), and there are more of them than the re-rank takes:
    only the certificate + fallback finds the nearest. Other rows' codes are >= 2 further away."""
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(rows, d, generator=g) / d**0.5
    v = torch.randn(rows, per_row, d, generator=g)
    radii = 1 + 1e-3 * torch.stack([torch.randperm(per_row, generator=g) for _ in range(rows)]) / per_row
    v = v / v.norm(dim=-1, keepdim=True) * radii[..., None]
    return x, (x[:, None] + v).reshape(-1, d)


def test_fast_path_equals_fp32_on_random_data():
    g = torch.Generator().manual_seed(1)
    book = torch.randn(4096, 32, generator=g) / 32**0.5
    x = torch.randn(3000, 32, generator=g) / 32**0.5
    exact = nearest_code(x, book, score_dtype="float32")
    assert torch.equal(exact, brute_force(x, book))
    for mode in ("bfloat16", "tfloat32"):
        for k in (1, 4, 8):
            assert torch.equal(nearest_code(x, book, 700, score_dtype=mode, candidates=k), exact), (mode, k)


def test_fast_path_equals_fp32_at_near_ties():
    x, book = near_tie_data()
    exact = nearest_code(x, book, score_dtype="float32")
    truth = brute_force(x, book)
    assert torch.equal(exact, truth)
    # the bf16 scores cannot order the pairs: a plain bf16 argmin gets some of them wrong
    bf16_argmin = torch.addmm(book.pow(2).sum(-1)[None].bfloat16(), x.bfloat16(), book.T.bfloat16(),
                              alpha=-2).argmin(-1)
    assert (bf16_argmin != truth).sum() > 10
    for k in (1, 2, 8):  # k=1: every row rests on the certificate or the exact fallback
        assert torch.equal(nearest_code(x, book, 64, score_dtype="bfloat16", candidates=k), truth), k
        assert torch.equal(nearest_code(x, book, 64, score_dtype="tfloat32", candidates=k), truth), k


def test_certificate_sends_crowded_rows_to_the_exact_search(monkeypatch):
    x, book = sphere_data()
    truth = brute_force(x, book)
    assert torch.equal(nearest_code(x, book, score_dtype="float32"), truth)
    for mode in ("bfloat16", "tfloat32"):
        assert torch.equal(nearest_code(x, book, 16, score_dtype=mode, candidates=8), truth), mode
    # without the error bound the top-8 of the rounded scores misses the nearest code in many rows
    monkeypatch.setattr(search, "_SAFETY", 0.0)
    assert (nearest_code(x, book, 16, score_dtype="bfloat16", candidates=8) != truth).sum() > 5


def test_analytic_grid_and_ties_go_to_the_lowest_index():
    # codes on the integer grid {0..7}^2 x {0}: the nearest code of x is round(x)
    grid = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).reshape(-1, 2)
    book = torch.cat([grid, torch.zeros(64, 1)], -1)
    g = torch.Generator().manual_seed(2)
    x = torch.cat([grid + (torch.rand(64, 2, generator=g) - 0.5) * 0.8, torch.randn(64, 1, generator=g)], -1)
    expected = torch.arange(64)
    for dtype in ("float32", "tfloat32", "bfloat16"):
        assert torch.equal(nearest_code(x, book, score_dtype=dtype, candidates=3), expected)
    # duplicated codes: equal scores, the lowest index wins on both paths
    dup = torch.cat([book, book])
    for dtype in ("float32", "tfloat32", "bfloat16"):
        assert torch.equal(nearest_code(x, dup, score_dtype=dtype), expected)


def test_reduced_precision_fp32_products_take_the_certified_path(monkeypatch):
    x, book = near_tie_data(seed=3)
    truth = brute_force(x, book)
    calls = []
    monkeypatch.setattr(search, "fp32_matmul_is_exact", lambda device: calls.append(device) or False)
    # fp32 requested, but "TF32": candidates + re-rank, fallback rows in fp64
    assert torch.equal(nearest_code(x, book, score_dtype="float32", candidates=1), truth)
    assert calls


def test_round_mantissa_is_tf32_and_bf16_rounding():
    t = torch.tensor([1.0, 1 + 2.0**-11, 1 + 2.0**-10 + 2.0**-12, -3.0 - 2.0**-9, 1 + 2.0**-8 + 2.0**-12])
    expected = torch.tensor([1.0, 1 + 2.0**-10, 1 + 2.0**-10, -3.0 - 2.0**-9, 1 + 2.0**-8])
    assert torch.equal(search.round_mantissa(t, 10), expected)
    r = torch.randn(1000, generator=torch.Generator().manual_seed(6))
    assert torch.equal(search.round_mantissa(r, 7), r.bfloat16().float())  # no exact halfway case here


def test_chunking_does_not_change_ids_and_bad_input():
    g = torch.Generator().manual_seed(4)
    book, x = torch.randn(300, 16, generator=g), torch.randn(1000, 16, generator=g)
    ref = nearest_code(x, book)
    for chunk in (1, 7, 999, 5000):
        assert torch.equal(nearest_code(x, book, chunk), ref)
        assert torch.equal(nearest_code(x, book, chunk, score_dtype="bfloat16"), ref)
        assert torch.equal(nearest_code(x, book, chunk, score_dtype="tfloat32"), ref)
    with pytest.raises(ValueError, match="same d"):
        nearest_code(x, book[:, :8])
    with pytest.raises(ValueError, match="score_dtype"):
        nearest_code(x, book, score_dtype="float16")
    with pytest.raises(ValueError, match="chunk_size"):
        nearest_code(x, book, 0)
    with pytest.raises(ValueError, match="empty"):
        nearest_code(x, book[:0])
    with pytest.raises(ValueError, match="search_dtype|score_dtype"):
        ResidualQuantizer(dim=4, codebook_size=8, search_dtype="fp8")


def test_quantizers_give_the_same_ids_on_both_paths():
    torch.manual_seed(5)
    q = ResidualQuantizer(dim=16, codebook_size=512, depth=4, shared_codebook=False).eval()
    x = torch.randn(2, 300, 16)
    ref = q(x).ids
    for mode in ("bfloat16", "tfloat32"):
        q.search_dtype = mode
        assert torch.equal(q(x).ids, ref)
    vq = L2VectorQuantizer(codebook_size=1024, dim=8).eval()
    z = torch.randn(2, 8, 9, 9)
    flat = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    book = vq.codebook()
    llamagen = (flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * flat @ book.T).argmin(1)
    assert torch.equal(vq(z).ids.flatten(), llamagen)
    for mode in ("bfloat16", "tfloat32"):
        vq.search_dtype = mode
        assert torch.equal(vq(z).ids.flatten(), llamagen)


@pytest.mark.parametrize("columns", [16384, 1000, 128, 100, 1])
def test_blocked_argmin_is_argmin(columns):
    """The CPU search's blocked argmin returns torch.argmin's index: the first minimum on ties (within a
    block, across blocks, against the columns past the last full block) and the first NaN."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(70, columns, generator=g)
    s[1] = 0.0  # every column tied: index 0
    s[2, -1] = s[2].min() - 1  # minimum in the tail (1000, 100: past the last full block)
    s[3, columns // 2:] = s[3].min() - 1  # tied minima in two blocks and the tail: the first one
    s[4, 5 % columns] = float("nan")  # a NaN counts as the minimum, as in argmin
    s[5, -1] = float("nan")
    s[6, :] = torch.arange(columns, 0, -1, dtype=torch.float32)  # strictly decreasing: the last index
    got = search.blocked_argmin(s)
    assert torch.equal(got, s.argmin(-1))
    assert int(got[1]) == 0 and int(got[3]) == columns // 2 and int(got[6]) == columns - 1


def test_cpu_search_ids_equal_plain_addmm_argmin():
    """nearest_code on the CPU (blocked argmin) gives the ids of one fp32 addmm + torch.argmin, the
    search vistok used before, on random data and a codebook of duplicated codes."""
    g = torch.Generator().manual_seed(6)
    book = torch.randn(16384, 32, generator=g) / 32**0.5
    book[8192:] = book[:8192]  # exact ties across blocks: the lower index
    x = torch.randn(512, 32, generator=g) * 0.3
    plain = torch.addmm(book.pow(2).sum(-1), x, book.T, beta=1, alpha=-2).argmin(-1)
    got = nearest_code(x, book, score_dtype="float32")
    assert torch.equal(got, plain)
    assert int(got.max()) < 8192


def residual_reference(q: ResidualQuantizer, x: torch.Tensor) -> torch.Tensor:
    """Ids of an independent residual loop: fp64 differences (cdist), no norm expansion, no chunks."""
    residual, ids = x.double(), []
    for d in range(q.depth):
        book = q.embed[q.book_of(d)].double()
        idx = torch.cdist(residual, book).argmin(-1)
        ids.append(idx)
        residual = residual - book[idx]
    return torch.stack(ids, -1)


@pytest.mark.parametrize("shared", [True, False])
def test_residual_quantizer_eval_ids_equal_the_reference(shared):
    """The eval forward (one codebook-norm computation per codebook, blocked argmin on the CPU) gives the
    ids of a plain fp64 residual loop on random codebooks, for shared and per-depth codebooks."""
    torch.manual_seed(7)
    q = ResidualQuantizer(dim=32, codebook_size=1000, depth=4, shared_codebook=shared).eval()
    x = torch.randn(300, 32) * 0.4
    assert torch.equal(q(x).ids, residual_reference(q, x))


@pytest.mark.parametrize("schedule", ["per_depth", "per_step"])
def test_cached_codebook_norms_follow_codebook_updates(monkeypatch, schedule):
    """Training forwards (the per-depth schedule rewrites the codebook between depths) give the same ids
    and codebooks as a search that recomputes the norms at every depth."""
    torch.manual_seed(8)
    a = ResidualQuantizer(dim=16, codebook_size=64, depth=3, ema_schedule=schedule, restart="none").train()
    b = ResidualQuantizer(dim=16, codebook_size=64, depth=3, ema_schedule=schedule, restart="none").train()
    b.load_state_dict(a.state_dict())
    xs = [torch.randn(200, 16) for _ in range(3)]
    out_a = [a(x).ids for x in xs]
    plain = search.nearest_code
    monkeypatch.setattr("vistok.tokenizers.quantizers.nearest_code",
                        lambda x, book, chunk, **kw: plain(x, book, chunk, **{**kw, "sq_norms": None}))
    out_b = [b(x).ids for x in xs]
    assert all(torch.equal(i, j) for i, j in zip(out_a, out_b))
    assert torch.equal(a.embed, b.embed)


@pytest.mark.parametrize("score_dtype", ["float32", "tfloat32", "bfloat16"])
@pytest.mark.parametrize("codes", [4, 64])  # 4 <= candidates: every code re-ranked; 64: the certificate decides
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_are_a_clear_error(score_dtype, codes, bad):
    # before: the fast modes returned id K (out of range) for a NaN row and the fp32 mode id 0
    g = torch.Generator().manual_seed(0)
    x, book = torch.randn(10, 8, generator=g), torch.randn(codes, 8, generator=g)
    x[3, 2] = bad
    with pytest.raises(ValueError, match=r"x holds NaN or inf in 1 row\(s\) \(e\.g\. row\(s\) \[3\]"):
        nearest_code(x, book, score_dtype=score_dtype)
    book[1, 0] = bad
    with pytest.raises(ValueError, match="codebook holds NaN or inf"):
        nearest_code(x[:3], book, score_dtype=score_dtype)


@pytest.mark.parametrize("chunk_size", [0, 1.5, True, "8"])
def test_chunk_size_must_be_a_positive_int(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        nearest_code(torch.zeros(3, 4), torch.randn(5, 4), chunk_size)


_PRECISION_CHECK = r"""
import torch
from vistok.tokenizers import search
from vistok.tokenizers.search import nearest_code
cuda = torch.device("cuda")
g = torch.Generator().manual_seed(0)
x, book = torch.randn(64, 16, generator=g), torch.randn(300, 16, generator=g)
exact = nearest_code(x, book)
# the newer per-backend API: the legacy getter raises from then on, the search must not
torch.backends.mkldnn.matmul.fp32_precision = "bf16"
assert search.fp32_matmul_rounding(torch.device("cpu")) == "bf16" and search.fp32_matmul_rounding(cuda) is None
assert torch.equal(nearest_code(x, book), exact)
torch.backends.mkldnn.matmul.fp32_precision = "ieee"
# a user's legacy "medium" survives the TF32 block (before: it became "high", then the getter raised)
torch.set_float32_matmul_precision("medium")
assert search.fp32_matmul_rounding(cuda) == "bf16"
with search._tf32_matmul(cuda):
    pass
assert torch.get_float32_matmul_precision() == "medium"
torch.set_float32_matmul_precision("highest")
with search._tf32_matmul(cuda):
    assert search.fp32_matmul_rounding(cuda) == "tf32"
assert search.fp32_matmul_rounding(cuda) is None and torch.get_float32_matmul_precision() == "highest"
print("ok")
"""


def test_matmul_precision_set_either_way_is_read_and_left_as_it_was():
    # a fresh process: these settings are process-global
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _PRECISION_CHECK], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
