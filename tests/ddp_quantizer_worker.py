"""Run under `torchrun --nproc_per_node=2`: train ResidualQuantizers on rank-specific data, save buffers.

The quantizers are built BEFORE init_process_group on purpose: vistok decides at call time whether to
sync (vector-quantize-pytorch caches that decision at construction and would silently diverge).
"""

import sys

import torch
import torch.distributed as dist

from vistok.tokenizers.quantizers import ResidualQuantizer


def main(out_dir: str) -> None:
    rank = int(__import__("os").environ["RANK"])
    torch.manual_seed(rank)  # different random init per rank: the first step must adopt rank 0's
    quantizers = {  # "none" first: the test rebuilds it from seed 0 in a single process
        "none": ResidualQuantizer(dim=8, codebook_size=32, depth=3, restart="none"),
        "ema": ResidualQuantizer(dim=8, codebook_size=32, depth=3, restart="ema"),
        "unused": ResidualQuantizer(dim=8, codebook_size=32, depth=3, restart="unused", restart_unused_steps=2,
                                    shared_codebook=False, ema_schedule="per_depth"),
    }
    dist.init_process_group("gloo")
    for step in range(6):
        g = torch.Generator().manual_seed(1000 * step + rank)  # different data on each rank
        x = torch.randn(50 + 10 * rank, 8, generator=g) * (1 + rank)
        for q in quantizers.values():
            q.train()(x)
    torch.save({name: {k: v.clone() for k, v in q.state_dict().items()} for name, q in quantizers.items()},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
