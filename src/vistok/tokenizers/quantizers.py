"""Residual vector quantizer with EMA codebooks, dead-code restart and a memory-bounded encode.

What DualToken's code does (RQ-VAE lineage, reference/dualtoken.md section 2.4), as one module:
- residual loop: depth d quantizes what depths < d left over; codebook shared across depths or one
  per depth; nearest code by squared L2; straight-through gradients (rotation trick optional);
- codebooks are not learned by gradient: EMA of per-code counts and sums (decay 0.99, Laplace
  smoothing), all-reduced across DDP ranks inside the training forward; counts start at 0;
- dead-code restart: DualToken's rule (EMA count below a threshold) or a literal "unused for
  N steps" rule; as the official VQEmbedding: one candidate per code drawn on rank 0 from the batch
  (tiled and jittered when it has fewer vectors than codes) and broadcast, dead code i takes
  candidate i, then the codebook is the smoothed EMA over the post-restart counts;
- per-depth schedule (the official pixel "rq"): each depth looks its code up, then rewrites the
  shared codebook; the next depth searches the rewritten one;
- the one deliberate difference from the official code: the per-step schedule ("rq_ema") feeds the
  EMA each depth's own residual, where the official cache holds views of one buffer that all end
  up equal to the final residual;
- commitment loss: DualToken's cumulative form or the per-depth form;
- quantization in fp32 under autocast, buffers that stay fp32.

vector-quantize-pytorch supplies k-means init and the rotation trick. Its ResidualVQ is the reference
for the search in tests and benchmarks. It is not the engine here: with a shared codebook it mixes
per-layer EMA steps, one renormalisation at the end and expiries at every layer (neither of
DualToken's two schedules), starts counts at 1, has no unused-steps rule, caches its distributed
check at construction and materialises several tokens x codes matrices per call. The search is
`search.nearest_code` (one GEMM per chunk, fast dtype on CUDA, exact fp32 ids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .search import nearest_code, resolve_score_dtype

COMMITMENT_FORMS = ("cumulative", "per_depth")
RESTART_RULES = ("ema", "unused", "none")
EMA_SCHEDULES = ("per_step", "per_depth")


@dataclass
class QuantizerOutput:
    """What `ResidualQuantizer.forward` returns."""

    quantized: torch.Tensor  # (..., dim) sum over depth, straight-through (or rotation-trick) gradients
    ids: torch.Tensor  # (..., depth) int64
    commitment_loss: torch.Tensor  # scalar, already multiplied by commitment_weight
    per_depth_loss: torch.Tensor  # (depth,) unweighted MSE(input, stop-grad prefix sum of codes)


@dataclass
class QuantizerStats:
    """Codebook health since training began (`ResidualQuantizer.stats`)."""

    usage: list[float]  # per depth: fraction of the codebook hit within the last `usage_window` steps
    perplexity: list[float]  # per depth: exp(entropy) of the last training batch's code histogram
    dead_codes: list[int]  # per codebook: codes the rule found dead in the last step, before replacement
    restarts_last_step: int
    restarts_total: int
    steps: int


def _distributed(sync: Optional[bool]) -> bool:
    if sync is not None:
        return sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ResidualQuantizer(nn.Module):
    """Residual VQ with EMA codebooks (keyword-only; defaults follow DualToken's code).

    dim: input channels; codebook_dim: code channels (a linear projection in/out when different);
    codebook_size, depth, shared_codebook; decay (0.99, not the library's 0.8); restart:
    "ema" (EMA count < restart_threshold, DualToken), "unused" (not hit for restart_unused_steps
    steps, a literal reading of "dead codes") or "none"; commitment: "cumulative" (DualToken: mean over depths of
    MSE(z, sg(prefix sum))) or "per_depth" (the library's: each depth's input vs its code, summed);
    ema_schedule: "per_step" (one EMA update per forward from all depths, DualToken's "rq_ema") or
    "per_depth" (each depth looks up its code, then updates the codebook: DualToken's pixel "rq"); initial_cluster_size: EMA counts at
    the start (None: 0 as DualToken with the "ema" rule, else 1); sync_codebook: None decides at
    every call (not cached) whether to all-reduce across ranks; search_chunk_size (rows per search
    GEMM, None: per device) and search_dtype ("auto": bf16 scores re-ranked in fp32 on CUDA, fp32
    elsewhere; "float32"; "bfloat16"): the nearest-code search of `search.py`, same ids either way.

    Under DDP, every rank must run every training-mode forward of this module: the EMA statistics and
    restart draws are collectives inside forward, and a rank that skips one hangs the others.
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        depth: int = 1,
        codebook_dim: Optional[int] = None,
        shared_codebook: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        rotation_trick: bool = False,
        commitment_weight: float = 1.0,
        commitment: str = "cumulative",
        restart: str = "ema",
        restart_threshold: float = 1.0,
        restart_unused_steps: int = 100,
        ema_schedule: str = "per_step",
        initial_cluster_size: Optional[float] = None,
        sync_codebook: Optional[bool] = None,
        search_chunk_size: Optional[int] = None,
        search_dtype: str = "auto",
        usage_window: int = 100,
    ):
        super().__init__()
        for name, value, allowed in (("commitment", commitment, COMMITMENT_FORMS), ("restart", restart, RESTART_RULES),
                                     ("ema_schedule", ema_schedule, EMA_SCHEDULES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if depth < 1 or codebook_size < 2:
            raise ValueError(f"need depth >= 1 and codebook_size >= 2, got {depth}, {codebook_size}")
        self.dim, self.codebook_size, self.depth = dim, codebook_size, depth
        self.codebook_dim = codebook_dim or dim
        self.shared_codebook = shared_codebook
        self.decay, self.eps = decay, eps
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.rotation_trick = rotation_trick
        self.commitment_weight, self.commitment = commitment_weight, commitment
        self.restart, self.restart_threshold, self.restart_unused_steps = restart, restart_threshold, restart_unused_steps
        self.ema_schedule, self.sync_codebook = ema_schedule, sync_codebook
        self.search_chunk_size = search_chunk_size  # None: per device (search.default_chunk_rows)
        resolve_score_dtype(search_dtype, torch.device("cpu"))  # validates
        self.search_dtype = search_dtype
        self.usage_window = usage_window

        self.project_in = nn.Linear(dim, self.codebook_dim) if self.codebook_dim != dim else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if self.codebook_dim != dim else nn.Identity()
        books = 1 if shared_codebook else depth
        embed = torch.randn(books, codebook_size, self.codebook_dim) / math.sqrt(self.codebook_dim)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        if initial_cluster_size is None:
            # DualToken starts counts at 0: its EMA-count rule then re-seeds nearly every code from data
            # at step 1. Any other rule would leave unused codes divided by ~eps in the Laplace
            # smoothing (growing without bound), so start at 1 as vector-quantize-pytorch does.
            initial_cluster_size = 0.0 if restart == "ema" else 1.0
        self.register_buffer("cluster_size", torch.full((books, codebook_size), float(initial_cluster_size)))
        self.register_buffer("steps_unused", torch.zeros(books, codebook_size, dtype=torch.long))
        self.register_buffer("last_used", torch.full((depth, codebook_size), -(1 << 40), dtype=torch.long))
        self.register_buffer("last_counts", torch.zeros(depth, codebook_size))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("restarts_total", torch.zeros((), dtype=torch.long))
        self.register_buffer("restarts_last", torch.zeros((), dtype=torch.long))
        self.register_buffer("initted", torch.full((books,), not kmeans_init))
        self.register_buffer("dead_last", torch.zeros(books, dtype=torch.long))
        self.register_buffer("_hit", torch.zeros(books, codebook_size, dtype=torch.bool), persistent=False)
        self._ranks_synced = False

    # ------------------------------------------------------------------ dtype policy
    def _apply(self, fn, recurse=True):
        """Let `.to()` / `.cuda()` move this module but never change its floating dtype: EMA
        statistics or a codebook rounded to bf16 are lost for good."""

        def device_only(t):
            out = fn(t)
            if t.is_floating_point() and out.dtype != t.dtype:
                return t.to(device=out.device)
            return out

        return super()._apply(device_only, recurse)

    def book_of(self, d: int) -> int:
        """The codebook index that depth d reads (0 for every depth when shared)."""
        return 0 if self.shared_codebook else d

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> QuantizerOutput:
        """x (..., dim) -> quantized (..., dim), ids (..., depth). Training mode updates the codebooks."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected input (..., {self.dim}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self.project_in(x.float().reshape(-1, self.dim))
            update = self.training  # EMA and restarts happen in every training-mode forward
            if update:
                if z.shape[0] == 0:
                    raise ValueError("a training-mode forward needs at least one token (EMA statistics and "
                                     "restarts); under DDP every rank must contribute")
                self._start_step()
            residual = z.detach()
            ids, codes, inputs = [], [], []
            norms: dict[int, torch.Tensor] = {}  # per codebook, while it is not rewritten
            for d in range(self.depth):
                if update and not bool(self.initted[self.book_of(d)]):
                    self._kmeans_init(self.book_of(d), residual)  # each codebook on its own depth's residual
                book = self.embed[self.book_of(d)]
                if self.book_of(d) not in norms:
                    norms[self.book_of(d)] = book.pow(2).sum(-1)
                idx = nearest_code(residual, book, self.search_chunk_size, score_dtype=self.search_dtype,
                                   sq_norms=norms[self.book_of(d)])
                code = book[idx]  # looked up before this depth rewrites the codebook (the official order)
                inputs.append(residual)
                if update and self.ema_schedule == "per_depth":
                    self._update([(d, residual, idx)])
                    norms.clear()  # the update rewrote the codebook
                residual = residual - code
                ids.append(idx)
                codes.append(code)
            if update and self.ema_schedule == "per_step":
                self._update(list(zip(range(self.depth), inputs, ids)))
            if update:
                self._end_step(ids)
            prefix = torch.stack(codes).cumsum(0)  # (depth, N, c): sum of the first d+1 codes
            per_depth = ((z[None] - prefix) ** 2).mean(dim=(1, 2))  # gradient to z only
            loss = per_depth.mean() if self.commitment == "cumulative" else per_depth.sum()
            total = prefix[-1]
            if self.rotation_trick:
                from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to

                zq = rotate_to(z, total)
            else:
                zq = z + (total - z).detach()
            out = self.project_out(zq).to(x.dtype)  # fp32 inside; the caller's dtype outside
        return QuantizerOutput(out.reshape(*lead, self.dim), torch.stack(ids, -1).reshape(*lead, self.depth),
                               loss * self.commitment_weight, per_depth.detach())

    # ------------------------------------------------------------------ EMA and restart
    def _all_reduce(self, *tensors: torch.Tensor) -> None:
        if _distributed(self.sync_codebook):
            for t in tensors:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if _distributed(self.sync_codebook):
            dist.broadcast(t, src=0)
        return t

    @torch.no_grad()
    def _update(self, batches: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """EMA of counts and sums per codebook from (depth, inputs, ids), the restart rule, then the
        codebook as the smoothed EMA (the official VQEmbedding._update_buffers + _update_embedding)."""
        books = sorted({self.book_of(d) for d, _, _ in batches})
        k, c = self.codebook_size, self.codebook_dim
        counts = torch.zeros(len(books), k, device=self.embed.device)
        sums = torch.zeros(len(books), k, c, device=self.embed.device)
        pools: dict[int, list[torch.Tensor]] = {b: [] for b in books}
        for d, inp, idx in batches:
            j = books.index(self.book_of(d))
            counts[j].index_add_(0, idx, torch.ones_like(idx, dtype=counts.dtype))
            sums[j].index_add_(0, idx, inp)
            pools[self.book_of(d)].append(inp)
        self._all_reduce(counts, sums)
        for j, b in enumerate(books):
            self.cluster_size[b].lerp_(counts[j], 1 - self.decay)
            self.embed_avg[b].lerp_(sums[j], 1 - self.decay)
            self._hit[b] |= counts[j] > 0
            self._restart(b, torch.cat(pools[b]))
            # Laplace smoothing over the post-restart counts, as VQEmbedding._update_embedding
            n = self.cluster_size[b].sum()
            smoothed = (self.cluster_size[b] + self.eps) / (n + k * self.eps) * n
            self.embed[b].copy_(self.embed_avg[b] / smoothed[:, None])

    def dead_mask(self, book: int) -> torch.Tensor:
        """(codebook_size,) bool: the codes of codebook `book` the restart rule counts as dead now."""
        if self.restart == "ema":
            return self.cluster_size[book] < self.restart_threshold
        if self.restart == "unused":  # not hit in this step, and this step completes N unused steps
            return ~self._hit[book] & (self.steps_unused[book] + 1 >= self.restart_unused_steps)
        return self.cluster_size[book] < self.restart_threshold  # "none": reported only, never replaced

    def _restart(self, book: int, pool: torch.Tensor) -> None:
        dead = self.dead_mask(book)
        n_dead = int(dead.sum())
        self.dead_last[book] = n_dead
        if self.restart == "none":
            return
        # drawn at every update, as the official code does (so a seeded run follows its random
        # stream); rank 0's draw is broadcast, so every rank replaces the same codes identically.
        # n_dead comes from all-reduced counts: every rank skips the collective together.
        draws = self._draw(pool)
        if n_dead == 0:
            return
        draws = self._broadcast(draws.contiguous())
        picks = draws[dead]  # dead code i takes draw i
        reset = self.restart_threshold if self.restart == "ema" else 1.0
        self.embed_avg[book][dead] = picks * reset
        self.cluster_size[book][dead] = reset
        self._hit[book] |= dead  # a replaced code starts its unused count afresh
        self.restarts_last += n_dead
        self.restarts_total += n_dead

    def _draw(self, pool: torch.Tensor) -> torch.Tensor:
        """One candidate per code (codebook_size, dim), as VQEmbedding._update_buffers: a batch with
        fewer vectors than codes is tiled and every copy jittered by U(0, 0.01 / sqrt(dim)), then
        the first codebook_size rows of a random permutation (without replacement)."""
        k = self.codebook_size
        if pool.shape[0] < k:
            pool = pool.repeat(-(-k // pool.shape[0]), 1)
            pool = pool + torch.rand_like(pool) * (0.01 / math.sqrt(self.codebook_dim))
        return pool[torch.randperm(pool.shape[0], device=pool.device)[:k]]

    @torch.no_grad()
    def _start_step(self) -> None:
        self.restarts_last.zero_()
        self._hit.zero_()
        if not self._ranks_synced and _distributed(self.sync_codebook):
            # ranks may have been seeded differently: start every rank from rank 0's codebook
            for t in (self.embed, self.embed_avg, self.cluster_size):
                dist.broadcast(t, src=0)
            self._ranks_synced = True

    @torch.no_grad()
    def _end_step(self, ids: list[torch.Tensor]) -> None:
        self.steps_unused.copy_(torch.where(self._hit, torch.zeros_like(self.steps_unused), self.steps_unused + 1))
        self.step += 1
        for d, idx in enumerate(ids):
            counts = torch.bincount(idx, minlength=self.codebook_size).float()
            self._all_reduce(counts)
            self.last_counts[d] = counts
            self.last_used[d][counts > 0] = self.step

    @torch.no_grad()
    def _kmeans_init(self, book: int, z: torch.Tensor) -> None:
        """k-means (the library's) on rank 0's input to this codebook, broadcast to every rank."""
        from vector_quantize_pytorch.vector_quantize_pytorch import kmeans

        if not _distributed(self.sync_codebook) or dist.get_rank() == 0:
            means, _ = kmeans(z[None], self.codebook_size, self.kmeans_iters)
            init = means[0]
        else:
            init = torch.empty(self.codebook_size, self.codebook_dim, device=z.device)
        init = self._broadcast(init.contiguous())
        count = max(self.restart_threshold, 1.0)
        self.embed[book] = init
        self.embed_avg[book] = init * count
        self.cluster_size[book] = count
        self.initted[book] = True

    # ------------------------------------------------------------------ encode / decode from ids
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Ids only (..., depth), no EMA update, memory bounded by one search chunk."""
        was = self.training
        self.eval()
        try:
            return self(x).ids
        finally:
            self.train(was)

    def codes_from_ids(self, ids: torch.Tensor, *, per_depth: bool = False) -> torch.Tensor:
        """Code vectors (codebook space) for ids (..., k) with k <= depth (the first k depths):
        summed over depth (..., codebook_dim), or stacked (k, ..., codebook_dim) with per_depth=True."""
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
        k = ids.shape[-1]
        if not 1 <= k <= self.depth:
            raise ValueError(f"ids have {k} depth column(s); this quantizer has depth {self.depth} "
                             f"(pass the first 1..{self.depth} depths)")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.codebook_size):
            raise ValueError(f"ids out of range [0, {self.codebook_size}): min {int(ids.min())}, max {int(ids.max())}")
        ids = ids.long()
        if self.shared_codebook:  # one gather for all depths
            codes = self.embed[0][ids]  # (..., k, c)
        else:
            codes = self.embed[torch.arange(k, device=ids.device), ids]  # depth d from codebook d
        return codes.movedim(-2, 0) if per_depth else codes.sum(-2)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (..., k) -> quantized vectors (..., dim) from the first k depths: the eval forward's
        output up to float rounding (the forward computes z + (codes - z))."""
        return self.project_out(self.codes_from_ids(ids))

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def stats(self) -> QuantizerStats:
        """Usage, perplexity, dead codes and restart counts per depth / codebook (no side effects)."""
        step = int(self.step)
        usage = ((step - self.last_used) < self.usage_window).float().mean(1).tolist()
        probs = self.last_counts / self.last_counts.sum(1, keepdim=True).clamp_min(1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
        return QuantizerStats(usage=usage, perplexity=entropy.exp().tolist(),
                              dead_codes=self.dead_last.tolist(),
                              restarts_last_step=int(self.restarts_last), restarts_total=int(self.restarts_total),
                              steps=step)
