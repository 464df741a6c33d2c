"""Tokenizer families, the base class and the registry. Importing this registers every family."""

from .base import CheckpointMismatchError, CodebookSpec, TokenizerEncoding, VisualTokenizer, register_tokenizer
from .dualtoken import DualTokenForward, DualTokenTokenizer
from .kl import DiagonalGaussian, KLTokenizer
from .mar import MARSampleOutput, MARTokenizer
from .layout import TokenLayout
from .registry import create_tokenizer, list_models, load_tokenizer, resolve_tokenizer
from .toklip import TokLIPForward, TokLIPTokenizer
from .vqgan import VQGANForward, VQGANTokenizer

__all__ = [
    "CheckpointMismatchError", "CodebookSpec", "DiagonalGaussian", "DualTokenForward", "DualTokenTokenizer", "KLTokenizer", "MARSampleOutput", "MARTokenizer", "TokenLayout",
    "TokLIPForward", "TokLIPTokenizer", "TokenizerEncoding", "VQGANForward", "VQGANTokenizer", "VisualTokenizer", "create_tokenizer", "list_models", "load_tokenizer",
    "register_tokenizer", "resolve_tokenizer",
]
