"""ResidualQuantizer: EMA and commitment by hand, dead-code restart, DDP sync, the library's ids, decoding."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_model, save_model

from vistok.tokenizers.quantizers import ResidualQuantizer, nearest_code


def make(**kw):
    torch.manual_seed(0)
    return ResidualQuantizer(**{"dim": 2, "codebook_size": 3, **kw})


def set_codebook(q, book):
    q.embed.copy_(book.expand_as(q.embed))
    q.embed_avg.copy_(q.embed)


def test_ema_update_equals_hand_computation():
    q = make(decay=0.9, restart="none").train()
    book = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    set_codebook(q, book)
    x = torch.tensor([[0.1, 0.0], [0.9, 0.1], [1.2, -0.1], [0.0, -0.3]])
    out = q(x)
    assert out.ids.flatten().tolist() == [0, 1, 1, 0]
    counts = torch.tensor([2.0, 2.0, 0.0])
    sums = torch.stack([x[0] + x[3], x[1] + x[2], torch.zeros(2)])
    cluster = 0.9 * 1.0 + 0.1 * counts  # without a restart rule counts start at 1
    avg = 0.9 * book + 0.1 * sums
    n = cluster.sum()
    smoothed = (cluster + 1e-5) / (n + 3 * 1e-5) * n
    torch.testing.assert_close(q.cluster_size[0], cluster)
    torch.testing.assert_close(q.embed_avg[0], avg)
    torch.testing.assert_close(q.embed[0], avg / smoothed[:, None])


def test_commitment_losses_equal_hand_computation():
    q = make(depth=2, restart="none").eval()
    set_codebook(q, torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[1.2, 0.9], [0.2, 0.1]], requires_grad=True)
    out = q(x)
    # depth 1: x0 -> code 1 (1,0), residual (0.2, 0.9) -> code 2 (0,1); x1 -> code 0, residual -> code 0
    assert out.ids.tolist() == [[1, 2], [0, 0]]
    p1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    p2 = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    l1, l2 = ((x - p1) ** 2).mean(), ((x - p2) ** 2).mean()
    torch.testing.assert_close(out.per_depth_loss, torch.stack([l1, l2]).detach())
    torch.testing.assert_close(out.commitment_loss, (l1 + l2) / 2)  # cumulative: mean over depths
    out.commitment_loss.backward()
    grad = (2 * (x - p1) / x.numel() + 2 * (x - p2) / x.numel()) / 2  # only the encoder side gets gradient
    torch.testing.assert_close(x.grad, grad.detach())
    per = make(depth=2, restart="none", commitment="per_depth", commitment_weight=0.25).eval()
    set_codebook(per, torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(per(x).commitment_loss, 0.25 * (l1 + l2))  # per-depth: summed, weighted
    # forward value is the sum of codes, gradient straight through
    torch.testing.assert_close(out.quantized, p2)


def test_per_depth_schedule_looks_codes_up_before_rewriting_the_codebook():
    """The official "rq" order: depth d returns the code it found, then rewrites the shared codebook;
    depth d+1 searches the rewritten one."""
    q = make(depth=2, decay=0.5, restart="none", ema_schedule="per_depth").train()
    book = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    set_codebook(q, book)
    x = torch.tensor([[0.9, 0.0], [2.0, 0.0]])
    out = q(x)
    # depth 1: both -> code 1 = (1, 0) of the old codebook; then counts [0, 2, 0], sums [0, (2.9, 0), 0]
    cluster = 0.5 * 1.0 + 0.5 * torch.tensor([0.0, 2.0, 0.0])
    avg = 0.5 * book + 0.5 * torch.tensor([[0.0, 0.0], [2.9, 0.0], [0.0, 0.0]])
    n = cluster.sum()
    new_book = avg / ((cluster + 1e-5) / (n + 3e-5) * n)[:, None]  # code 1 moves to ~(1.3, 0)
    # depth 2: residuals (-0.1, 0) -> code 0, (1, 0) -> code 1 of the *new* codebook
    assert out.ids.tolist() == [[1, 0], [1, 1]]
    expected = torch.stack([book[1] + new_book[0], book[1] + new_book[1]])
    torch.testing.assert_close(out.quantized, expected)


def test_restart_tiles_a_small_batch_and_gives_each_dead_code_its_own_draw():
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=4, codebook_size=16, depth=1, restart="ema").train()
    x = torch.randn(5, 4) + 10.0
    q(x)
    assert int(q.restarts_total) == 16  # counts start at 0: every code is below 1 after step 1
    # 16 candidates from the batch tiled 4 times (20 rows), each row jittered by U(0, 0.01 / sqrt(4)),
    # taken without replacement: distinct vectors, each batch vector used at most 4 times
    offsets = q.embed_avg[0][:, None] - x[None]  # (16, 5, 4)
    source = offsets.norm(dim=-1).argmin(1)
    jitter = offsets[torch.arange(16), source]
    assert jitter.min() >= 0 and jitter.max() < 0.005
    assert torch.bincount(source, minlength=5).max() <= 4
    assert torch.cdist(q.embed_avg[0], q.embed_avg[0]).add(torch.eye(16)).min() > 0


def usage_after(restart, steps=5, **kw):
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=8, codebook_size=64, depth=1, restart=restart, usage_window=1, **kw).train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        q(5.0 + 0.5 * torch.randn(512, 8, generator=g))  # skewed: far from every initial code
    return q.stats()


def test_dead_code_restart_revives_codes_on_skewed_data():
    without = usage_after("none")
    ema = usage_after("ema")
    unused = usage_after("unused", restart_unused_steps=2)
    assert without.usage[0] < 0.1 and without.restarts_total == 0
    assert ema.usage[0] > 0.8 and ema.restarts_total >= 50
    assert unused.usage[0] > 0.8 and unused.restarts_total >= 50
    assert without.perplexity[0] < 5 < ema.perplexity[0]


def test_dualtoken_counts_start_at_zero_so_step_one_reseeds_from_data():
    q = make(decay=0.99, restart="ema", codebook_size=8).train()
    assert q.cluster_size.sum() == 0
    x = torch.randn(200, 2) + 7.0
    hits = torch.bincount(q(x).ids.flatten(), minlength=8).float()
    # EMA count after step 1 = 0.01 * hits: every code with fewer than 100 hits is below 1 and replaced
    # by a batch vector (count reset to 1); the data sits far from all initial codes, so most are
    dead = hits < 100
    assert int(q.restarts_total) == int(dead.sum()) >= 6
    assert torch.cdist(q.embed_avg[0, dead], x, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() < 1e-6
    torch.testing.assert_close(q.cluster_size[0, dead], torch.ones(int(dead.sum())))
    torch.testing.assert_close(q.cluster_size[0, ~dead], 0.01 * hits[~dead])
    # the codebook is the EMA smoothed with the post-restart counts (official _update_embedding order)
    cluster = q.cluster_size[0]
    n = cluster.sum()
    torch.testing.assert_close(q.embed[0], q.embed_avg[0] / ((cluster + 1e-5) / (n + 8e-5) * n)[:, None])


def test_unused_rule_waits_n_steps_and_resets_state():
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=2, codebook_size=4, depth=1, restart="unused", restart_unused_steps=3).train()
    set_codebook(q, torch.tensor([[0.0, 0.0], [10.0, 10.0], [20.0, 20.0], [30.0, 30.0]]))
    x = torch.full((16, 2), 0.1)
    for step in range(1, 4):
        q(x)
        assert int(q.restarts_total) == (0 if step < 3 else 3)  # codes 1..3 unused for 3 steps
    assert q.steps_unused[0].tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(q.embed[0, 1:], torch.full((3, 2), 0.1))  # replaced by batch vectors
    torch.testing.assert_close(q.cluster_size[0, 1:], torch.ones(3))


def test_two_process_ddp_keeps_codebooks_identical(tmp_path):
    worker = Path(__file__).with_name("ddp_quantizer_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker), str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in r0:
        for key, value in r0[name].items():
            assert torch.equal(value, r1[name][key]), (name, key)
        assert int(r0[name]["restarts_total"]) > 0 or name == "none"
    # synced EMA == one process seeing both ranks' data (restart "none": no rank-0 draws involved)
    torch.manual_seed(0)
    single = ResidualQuantizer(dim=8, codebook_size=32, depth=3, restart="none").train()
    for step in range(6):
        xs = [torch.randn(50 + 10 * r, 8, generator=torch.Generator().manual_seed(1000 * step + r)) * (1 + r)
              for r in (0, 1)]
        single(torch.cat(xs))
    torch.testing.assert_close(single.embed, r0["none"]["embed"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single.cluster_size, r0["none"]["cluster_size"], rtol=1e-5, atol=1e-5)


def test_ids_equal_the_librarys_search():
    from vector_quantize_pytorch import ResidualVQ

    torch.manual_seed(0)
    q = ResidualQuantizer(dim=16, codebook_size=256, depth=4, shared_codebook=False, search_chunk_size=37).eval()
    lib = ResidualVQ(dim=16, codebook_size=256, num_quantizers=4, decay=0.99, rotation_trick=False,
                     sync_codebook=False).eval()
    for i, layer in enumerate(lib.layers):
        layer._codebook.embed.copy_(q.embed[i][None])
        layer._codebook.initted.fill_(True)
    x = torch.randn(3, 500, 16)
    with torch.no_grad():
        _, lib_ids, _ = lib(x)
        ours = q(x)
    assert torch.equal(ours.ids, lib_ids)
    book = torch.randn(300, 16)
    flat = torch.randn(1000, 16)
    assert torch.equal(nearest_code(flat, book, 7), nearest_code(flat, book, 10_000))


def test_decode_from_ids_and_errors():
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=12, codebook_dim=6, codebook_size=50, depth=3).eval()
    x = torch.randn(2, 10, 12)
    out = q(x)
    torch.testing.assert_close(q.decode(out.ids), out.quantized, rtol=1e-5, atol=1e-6)
    per = q.codes_from_ids(out.ids, per_depth=True)
    assert per.shape == (3, 2, 10, 6)
    torch.testing.assert_close(q.codes_from_ids(out.ids[..., :2]), per[:2].sum(0))
    with pytest.raises(ValueError, match=r"out of range \[0, 50\)"):
        q.decode(out.ids + 50)
    with pytest.raises(ValueError, match="depth 3"):
        q.decode(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        q.decode(out.ids.float())
    with pytest.raises(ValueError, match=r"\(\.\.\., 12\)"):
        q(torch.randn(4, 11))


def test_state_survives_safetensors_and_stays_fp32(tmp_path):
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=8, codebook_size=16, depth=4, shared_codebook=True).train()
    for _ in range(3):
        q(torch.randn(64, 8))
    save_model(q, str(tmp_path / "q.safetensors"))
    fresh = ResidualQuantizer(dim=8, codebook_size=16, depth=4, shared_codebook=True)
    load_model(fresh, str(tmp_path / "q.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), fresh.state_dict().values()))
    x = torch.randn(64, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q(x)  # a training step: EMA runs in fp32
        out = q.eval()(x)
    # the search ran in fp32: same ids as an fp32 call on the same values; output in the caller's dtype
    assert q.embed.dtype == torch.float32 and out.quantized.dtype == torch.bfloat16
    assert torch.equal(out.ids, q(x.float()).ids)
    q.train()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.cluster_size[0, 0] = 1234.567  # not representable in bf16
    before["cluster_size"][0, 0] = 1234.567
    q.to(torch.bfloat16)
    assert {b.dtype for b in q.buffers() if b.is_floating_point()} == {torch.float32}
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())  # values kept, not round-tripped


def test_kmeans_init_and_rotation_trick():
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=4, codebook_size=8, depth=1, kmeans_init=True, restart="none").train()
    centers = torch.eye(4).repeat(2, 1)[:8] * 10
    data = centers.repeat(32, 1) + 0.01 * torch.randn(256, 4)
    q(data)
    assert bool(q.initted)
    assert torch.cdist(torch.eye(4) * 10, q.embed[0]).min(1).values.max() < 0.5  # every cluster has a code
    rot = ResidualQuantizer(dim=4, codebook_size=8, depth=1, rotation_trick=True, restart="none").eval()
    x = torch.randn(5, 4, requires_grad=True)
    out = rot(x)
    torch.testing.assert_close(out.quantized, rot.decode(out.ids), rtol=1e-5, atol=1e-5)
    out.quantized.sum().backward()
    assert not torch.allclose(x.grad, torch.ones_like(x))  # not the identity gradient of plain STE


def test_unused_rule_counts_steps_not_depth_calls_and_stays_bounded():
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=4, codebook_size=16, depth=4, restart="unused", restart_unused_steps=5,
                          ema_schedule="per_depth").train()
    assert q.cluster_size.min() == 1.0  # only the "ema" rule starts counts at 0
    for _ in range(2):
        q(torch.randn(8, 4) * 0.1)  # few tokens: most codes unused
    assert int(q.steps_unused.max()) == 2  # two steps, not 2 x depth calls
    assert q.embed.norm(dim=-1).max() < 10  # no 1/eps blow-up of unused codes


def test_dead_code_stat_reports_codes_found_dead_before_replacement():
    stats = usage_after("ema", steps=1)
    assert stats.dead_codes[0] == stats.restarts_last_step > 0
    none = usage_after("none", steps=3)
    assert none.dead_codes[0] > 0 and none.restarts_total == 0  # reported, not replaced


def test_kmeans_fits_each_depth_on_its_own_residual():
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=4, codebook_size=8, depth=2, shared_codebook=False, kmeans_init=True,
                          restart="none").train()
    q(torch.randn(512, 4) * 5)
    assert bool(q.initted.all())
    # depth 1 is fitted on residuals, which are smaller than depth 0's inputs (sharing one fit made them equal)
    assert not torch.allclose(q.embed[0], q.embed[1])
    assert q.embed[1].norm(dim=-1).mean() < 0.8 * q.embed[0].norm(dim=-1).mean()


def test_empty_training_batch_is_a_clear_error():
    q = ResidualQuantizer(dim=4, codebook_size=8).train()
    with pytest.raises(ValueError, match="at least one token"):
        q(torch.zeros(0, 4))
    assert q.eval()(torch.zeros(0, 4)).ids.shape == (0, 1)
