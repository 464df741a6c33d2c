"""TokenLayout: where a tokenizer's discrete ids live in an LLM's extended vocabulary.

Layout: text ids [0, V), then special tokens, then one block of ids per codebook (and per depth
when the depths do not share a codebook). A sequence for one image is the raster scan of the grid,
each position contributing its ids codebook by codebook, depth by depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULT_SPECIALS = ("<image>", "</image>")


@dataclass
class TokenLayout:
    """Where a tokenizer's ids sit in an LLM vocabulary: text ids first, then one id per special token,
    then one block of ids per codebook and depth (one per codebook when its depths share it)."""

    text_vocab_size: int
    specials: dict[str, int]
    offsets: dict[tuple[str, int], int]  # (codebook, depth) -> first LLM id of that block
    sizes: dict[str, int]
    depths: dict[str, int]
    order: list[str] = field(default_factory=list)

    @classmethod
    def from_codebooks(cls, codebooks: dict, text_vocab_size: int, specials=DEFAULT_SPECIALS) -> "TokenLayout":
        """The layout of `codebooks` ({name: CodebookSpec}) after `text_vocab_size` text ids and `specials`.
        Raises ValueError for a negative vocabulary size."""
        if text_vocab_size < 0:
            raise ValueError(f"text_vocab_size must be >= 0, got {text_vocab_size}")
        nxt = text_vocab_size
        special_ids = {}
        for s in specials:
            special_ids[s] = nxt
            nxt += 1
        offsets, sizes, depths = {}, {}, {}
        for name, spec in codebooks.items():
            sizes[name], depths[name] = spec.size, spec.depth
            for d in range(spec.depth):
                offsets[(name, d)] = nxt if (d == 0 or not spec.shared) else offsets[(name, 0)]
                if d == 0 or not spec.shared:
                    nxt += spec.size
        return cls(text_vocab_size, special_ids, offsets, sizes, depths, list(codebooks))

    @property
    def vocab_size(self) -> int:
        """Total LLM vocabulary size including text, specials and every code block."""
        ends = [off + self.sizes[name] for (name, _), off in self.offsets.items()]
        return max([self.text_vocab_size + len(self.specials), *ends])

    @property
    def tokens_per_position(self) -> int:
        """LLM tokens per grid position: the sum of the codebooks' depths."""
        return sum(self.depths[n] for n in self.order)

    def to_llm_ids(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: (B, h, w, D)} -> (B, h*w*tokens_per_position) LLM ids in raster order."""
        cols, grids = [], set()
        for name in self.order:
            if name not in ids:
                raise ValueError(f"ids lack codebook {name!r}; got {sorted(ids)}")
            x = ids[name]
            if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise ValueError(f"ids[{name!r}] must be an integer tensor, got {x.dtype}")
            if x.ndim != 4 or x.shape[-1] != self.depths[name]:
                raise ValueError(f"ids[{name!r}] must be (B, h, w, {self.depths[name]}), got {tuple(x.shape)}")
            if x.numel() and (x.min() < 0 or x.max() >= self.sizes[name]):
                raise ValueError(f"ids[{name!r}] out of range [0, {self.sizes[name]}): "
                                 f"min {int(x.min())}, max {int(x.max())}")
            grids.add(tuple(x.shape[:3]))
            if len(grids) > 1:
                raise ValueError(f"codebooks have different (B, h, w): {sorted(grids)}")
            offs = torch.tensor([self.offsets[(name, d)] for d in range(self.depths[name])], device=x.device)
            cols.append(x.flatten(1, 2) + offs)
        return torch.cat(cols, dim=-1).flatten(1)

    def from_llm_ids(self, llm_ids: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Inverse of `to_llm_ids` for (B, h*w*tokens_per_position) ids."""
        h, w = grid
        per = self.tokens_per_position
        if llm_ids.ndim != 2 or llm_ids.shape[1] != h * w * per:
            raise ValueError(f"expected (B, {h * w * per}) ids for grid {h}x{w}, got {tuple(llm_ids.shape)}")
        x = llm_ids.view(llm_ids.shape[0], h * w, per)
        out, col = {}, 0
        for name in self.order:
            d = self.depths[name]
            offs = torch.tensor([self.offsets[(name, i)] for i in range(d)], device=x.device)
            local = x[..., col:col + d] - offs
            if local.numel() and (local.min() < 0 or local.max() >= self.sizes[name]):
                raise ValueError(f"LLM ids outside the {name!r} code block")
            out[name] = local.view(x.shape[0], h, w, d)
            col += d
        return out

    # ------------------------------------------------------------------ whole image spans
    @property
    def image_start(self) -> int:
        """The first special token opens an image span (default `<image>`)."""
        return list(self.specials.values())[0]

    @property
    def image_end(self) -> int:
        """The second special token closes it (default `</image>`)."""
        return list(self.specials.values())[1]

    def to_sequence(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """{name: (B, h, w, D)} -> (B, 2 + h*w*tokens_per_position): <image> codes </image>."""
        body = self.to_llm_ids(ids)
        start = body.new_full((body.shape[0], 1), self.image_start)
        end = body.new_full((body.shape[0], 1), self.image_end)
        return torch.cat([start, body, end], dim=1)

    def from_sequence(self, sequence: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Inverse of `to_sequence`; a sequence with a missing or misplaced <image> / </image>, the
        wrong length, or an id outside its position's code block is rejected with a ValueError."""
        h, w = grid
        expected = 2 + h * w * self.tokens_per_position
        if sequence.ndim != 2 or sequence.shape[1] != expected:
            raise ValueError(f"expected (B, {expected}) ids (<image>, {h}x{w} positions x {self.tokens_per_position} "
                             f"codes, </image>), got {tuple(sequence.shape)}")
        if (sequence[:, 0] != self.image_start).any() or (sequence[:, -1] != self.image_end).any():
            raise ValueError(f"an image span must start with <image> ({self.image_start}) and end with "
                             f"</image> ({self.image_end})")
        return self.from_llm_ids(sequence[:, 1:-1], grid)
