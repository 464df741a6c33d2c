"""vistok: visual tokenizers for multimodal LLMs behind one encode/decode API."""

from ._version import __version__
from .tokenizers import (
    CodebookSpec,
    TokenizerEncoding,
    VisualTokenizer,
    create_tokenizer,
    list_models,
    load_tokenizer,
)

__all__ = ["CodebookSpec", "TokenizerEncoding", "VisualTokenizer", "__version__", "create_tokenizer",
           "list_models", "load_tokenizer"]
