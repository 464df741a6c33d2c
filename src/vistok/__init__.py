"""vistok: visual tokenizers for multimodal LLMs behind one encode/decode API."""

__version__ = "0.1.0"

from .tokenizers import (  # noqa: E402  (the version must exist before tokenizers import it)
    CodebookSpec,
    TokenizerEncoding,
    VisualTokenizer,
    create_tokenizer,
    list_models,
    load_tokenizer,
)

__all__ = ["CodebookSpec", "TokenizerEncoding", "VisualTokenizer", "__version__", "create_tokenizer",
           "list_models", "load_tokenizer"]
