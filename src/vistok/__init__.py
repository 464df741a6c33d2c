"""vistok: visual tokenizers for multimodal LLMs behind one encode/decode API.

Training and benchmarking are loaded on first use (so `import vistok` stays fast):
`vistok.train(...)` (docs/training.md) and `vistok.bench_recon`, `bench_compare`, `bench_zeroshot`,
`bench_retrieval`, `bench_codebook` (docs/bench.md).
"""

from ._version import __version__
from .tokenizers import (
    CodebookSpec,
    TokenizerEncoding,
    VisualTokenizer,
    create_tokenizer,
    list_models,
    load_tokenizer,
)

_BENCH = ("bench_recon", "bench_compare", "bench_zeroshot", "bench_retrieval", "bench_codebook")


def __getattr__(name: str):
    """PEP 562: `train` (the callable vistok.train package) and the bench_* functions, imported on first use."""
    import importlib

    if name == "train":
        return importlib.import_module(".train", __name__)  # importing it also sets vistok.train
    if name in _BENCH:
        value = getattr(importlib.import_module(".bench.api", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"train", *_BENCH})


__all__ = ["CodebookSpec", "TokenizerEncoding", "VisualTokenizer", "__version__", "bench_codebook", "bench_compare",
           "bench_recon", "bench_retrieval", "bench_zeroshot", "create_tokenizer", "list_models", "load_tokenizer",
           "train"]
