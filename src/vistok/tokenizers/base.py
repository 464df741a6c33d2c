"""The VisualTokenizer base class, its output dataclasses and the release checkpoint format.

Release directory = `config.json` (class name, version, constructor args incl. preprocessing,
codebook specs, latent scaling factor) + `model.safetensors`. Loading rebuilds the model from the
config alone (no network) and loads the weights strictly.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

import torch
from safetensors.torch import save_model
from torch import nn

from .._version import __version__
from ..fileio import atomic_path, remove_stale_temps
from ..images import ImageLike, PreprocessConfig, list_image_files, load_image, pil_to_pixels, preprocess_image
# re-exported: these lived here before the weights helpers moved down to vistok.weights
from ..weights import (CONFIG_NAME, WEIGHTS_NAME, CheckpointMismatchError, check_model_args,  # noqa: F401
                       load_state_dict_strict, read_release, read_release_config, register_tokenizer, tokenizer_class)

if TYPE_CHECKING:
    from .kl import DiagonalGaussian
    from .layout import TokenLayout

@dataclass(frozen=True)
class CodebookSpec:
    """One discrete vocabulary of a tokenizer: `size` codes of `dim` channels, `depth` residual levels
    per position; `shared` when all depths index the same codebook."""

    size: int
    depth: int = 1
    dim: int = 0
    shared: bool = False


@dataclass
class TokenizerEncoding:
    """What `encode` returns; fields a family does not define stay None."""

    grid: tuple[int, int]
    ids: Optional[dict[str, torch.Tensor]] = None  # name -> (B, h, w, depth) int64
    quantized: Optional[dict[str, torch.Tensor]] = None  # name -> (B, h*w, C), summed over depth
    features: Optional[torch.Tensor] = None  # (B, h*w, width) continuous features for understanding
    pooled: Optional[torch.Tensor] = None  # (B, E) CLIP-space embedding
    latent_dist: Optional["DiagonalGaussian"] = None  # KL family: unscaled posterior
    latents: Optional[torch.Tensor] = None  # KL family: scaled latents (B, C, h, w)


def _jsonable(value: Any) -> Any:
    if isinstance(value, PreprocessConfig):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


class VisualTokenizer(nn.Module):
    """Base class of every vistok tokenizer.

    Subclasses take keyword-only constructor arguments with defaults; the base class records them
    (after defaults) as `self.config`, which is what `save_pretrained` writes and `load_tokenizer`
    rebuilds from. Input pixels are (B, 3, H, W) float in [-1, 1].
    """

    family: ClassVar[str] = ""
    default_preprocess: ClassVar[dict] = {}
    # constructor arguments naming files read once at construction (e.g. third-party weights): a saved
    # release holds those weights itself, so its config records None for them
    load_time_args: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            try:
                bound = signature.bind(self, *args, **kw)
            except TypeError as exc:
                valid = [p for p in signature.parameters if p != "self"]
                raise TypeError(f"{cls.__name__}: {exc}; valid arguments: {valid}") from None
            bound.apply_defaults()
            init(self, *args, **kw)
            # the most derived __init__ records its arguments (and a subclass without one inherits these)
            if type(self) is cls or "_config_args" not in self.__dict__:
                args_ = {k: _jsonable(v) for k, v in bound.arguments.items() if k != "self"}
                self._config_args = args_

        cls.__init__ = recording_init
        for name, contract in (("encode", _encode_contract), ("decode", _decode_contract), ("embed", _embed_contract)):
            fn = cls.__dict__.get(name)
            if fn is not None and not getattr(fn, "_vistok_contract", False):
                setattr(cls, name, contract(fn))

    # ----------------------------------------------------------------------------- config
    @property
    def config(self) -> dict:
        """Constructor arguments (JSON types) that rebuild this tokenizer."""
        return json.loads(json.dumps(self._config_args))

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_any(self.config.get("preprocess"), **self.default_preprocess)

    @property
    def stride(self) -> int:
        """Pixels per token along each side."""
        raise NotImplementedError

    @property
    def codebooks(self) -> dict[str, CodebookSpec]:
        return {}

    @property
    def scaling_factor(self) -> Optional[float]:
        return None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's first floating parameter: what inputs are cast to."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    # ----------------------------------------------------------------------------- the input contract
    def prepare_pixels(self, pixels: Any) -> Any:
        """Floating pixel tensors are moved to the model's device and cast to its dtype; anything else is
        left for `validate_pixels` to refuse by name."""
        if isinstance(pixels, torch.Tensor) and pixels.is_floating_point():
            return pixels.to(device=self.device, dtype=self.dtype)
        return pixels

    def prepare_latents(self, latents: Any) -> Any:
        """Floating latents: refused if NaN/Inf (they would decode to black images), else moved and cast."""
        if isinstance(latents, torch.Tensor) and latents.is_floating_point():
            if latents.numel() and not torch.isfinite(latents).all():
                bad = int((~torch.isfinite(latents)).sum())
                raise ValueError(f"latents contain NaN or Inf ({bad} of {latents.numel()} values)")
            return latents.to(device=self.device, dtype=self.dtype)
        return latents

    def prepare_ids(self, ids: Any) -> Any:
        """Ids of any integer dtype (uint8 ... int64, tensors, arrays or lists) -> int64 on the model's device,
        range-checked against each named codebook; bool, float or complex ids raise ValueError."""
        if not isinstance(ids, dict):
            return ids
        books = self.codebooks
        out = {}
        for name, value in ids.items():
            try:
                x = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(f"ids[{name!r}] is not a tensor of integers: {exc}") from None
            if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
                raise ValueError(f"ids[{name!r}] must be an integer tensor, got {x.dtype} (bool, float and complex "
                                 "ids are refused: cast integer-valued ids with .long())")
            x = x.to(device=self.device, dtype=torch.int64)
            if name in books and x.numel():
                lo, hi = int(x.min()), int(x.max())
                if lo < 0 or hi >= books[name].size:
                    raise ValueError(f"ids[{name!r}] out of range [0, {books[name].size}): min {lo}, max {hi}")
            out[name] = x
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        return height // self.stride, width // self.stride

    # ----------------------------------------------------------------------------- input
    def check_image_size(self, h: int, w: int) -> None:
        """Raise ValueError unless an h x w input fits the model (default: multiples of the stride)."""
        s = self.stride
        if h < s or w < s or h % s or w % s:
            raise ValueError(f"image size {h}x{w} does not fit the model's stride {s}: height and width must be "
                             f"positive multiples of {s} (e.g. {self.preprocess_config.image_size})")

    def validate_pixels(self, pixels: Any) -> torch.Tensor:
        """Check the (B, 3, H, W) [-1, 1] float contract; raise ValueError saying what was expected."""
        if not isinstance(pixels, torch.Tensor):
            raise ValueError(f"expected pixels as a torch.Tensor (B, 3, H, W), got {type(pixels).__name__}; "
                             "use tok.preprocess(images) for PIL images or paths")
        if pixels.ndim != 4:
            raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)} ({pixels.ndim}-D)")
        if pixels.shape[1] != 3:
            raise ValueError(f"expected 3 RGB channels in dim 1, got shape {tuple(pixels.shape)}")
        if not pixels.is_floating_point():
            raise ValueError(f"expected float pixels in [-1, 1], got dtype {pixels.dtype}; "
                             "convert uint8 with x / 127.5 - 1 or use tok.preprocess")
        self.check_image_size(*pixels.shape[-2:])
        if pixels.numel():
            if not torch.isfinite(pixels).all():
                raise ValueError("pixels contain NaN or Inf")
            lo, hi = pixels.min().item(), pixels.max().item()
            if lo < -1.001 or hi > 1.001:
                raise ValueError(f"expected pixel values in [-1, 1], got range [{lo:.3g}, {hi:.3g}]")
        return pixels

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """PIL images, HxWx3 uint8 arrays, files or directories -> (B, 3, H, W) in [-1, 1],
        using the preprocessing stored in this tokenizer's config."""
        if isinstance(images, torch.Tensor):
            raise ValueError("preprocess takes PIL images, arrays or paths; a pixel tensor in [-1, 1] goes "
                             "straight to tok.encode")
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
            images = [images]
        cfg = self.preprocess_config
        items: list = []
        for img in images:
            if isinstance(img, (str, os.PathLike)):
                items.extend(list_image_files([img]))
            else:
                items.append(img)
        if not items:
            raise ValueError("no images given")
        tensors = []
        for i, item in enumerate(items):
            name = str(item) if isinstance(item, (str, os.PathLike)) else f"image {i}"
            pil = preprocess_image(load_image(item), cfg, name=name)
            tensors.append(pil_to_pixels(pil))
        sizes = {tuple(t.shape) for t in tensors}
        if len(sizes) > 1:
            raise ValueError(f"images have different sizes after preprocessing ({sorted(sizes)}); "
                             "set preprocess.crop to 'center' or 'adm' to batch them")
        return self.validate_pixels(torch.stack(tensors))

    # ----------------------------------------------------------------------------- API
    def encode(self, pixels: torch.Tensor, **kwargs) -> TokenizerEncoding:
        raise NotImplementedError

    def decode(self, *, ids: Optional[dict] = None, latents: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no discrete ids to embed")

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    def token_layout(self, text_vocab_size: int, **kwargs) -> "TokenLayout":
        from .layout import TokenLayout

        if not self.codebooks:
            raise NotImplementedError(f"{type(self).__name__} produces continuous tokens: there is no vocabulary "
                                      "to lay out; feed enc.latents (or tok.patchify) to the LLM instead")
        return TokenLayout.from_codebooks(self.codebooks, text_vocab_size, **kwargs)

    # ----------------------------------------------------------------------------- release format
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters an optimiser should update (frozen towers, teachers and VQs excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def release_config(self) -> dict:
        return {
            "_class_name": type(self).__name__,
            "family": self.family,
            "vistok_version": __version__,
            "model_args": {**self.config, **{name: None for name in self.load_time_args}},
            "preprocess": self.preprocess_config.to_dict(),
            "codebooks": {k: asdict(v) for k, v in self.codebooks.items()},
            "scaling_factor": self.scaling_factor,
        }

    def check_release_config(self, config: dict, source: str = "config.json") -> None:
        """The descriptive copies in a release config (preprocess, scaling factor, codebooks) must agree
        with what `model_args` builds: editing only the copy would otherwise be silently ignored."""
        built = self.release_config()
        for key in ("preprocess", "scaling_factor", "codebooks"):
            if key in config and config[key] != built[key]:
                raise ValueError(f"{source}: {key} {config[key]!r} disagrees with the model built from model_args "
                                 f"({built[key]!r}); edit model_args, which is what loading uses")

    def save_pretrained(self, directory: str | os.PathLike, *, extra: Optional[dict] = None) -> Path:
        """Write `config.json` + `model.safetensors`; each file is replaced atomically, weights first,
        so an interrupted save never leaves a config pointing at partial weights."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.release_config()
        if extra:
            config.update(extra)
        # both files are complete on disk before either replaces its predecessor; the inner context
        # exits first, so the weights are swapped in before the config that describes them
        remove_stale_temps(directory, (CONFIG_NAME, WEIGHTS_NAME))  # left by a writer killed mid-save
        try:
            with atomic_path(directory / CONFIG_NAME) as c_tmp, atomic_path(directory / WEIGHTS_NAME) as w_tmp:
                save_model(self, str(w_tmp), metadata={"format": "pt", "vistok_version": __version__})
                c_tmp.write_text(json.dumps(config, indent=2) + "\n")
        except Exception as exc:  # disk full: safetensors raises its own error type
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OSError(f"could not write the release to {directory} ({cause}); nothing was lost: the files "
                          "that were there are unchanged") from exc
        return directory

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "VisualTokenizer":
        from .registry import load_tokenizer

        tok = load_tokenizer(path, **kwargs)
        if not isinstance(tok, cls):
            raise ValueError(f"{path} holds a {type(tok).__name__}, not a {cls.__name__}")
        return tok


def _empty_batch(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 0 for v in value.values())
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == 0


def _one(value: Any) -> Any:
    """A batch of one zero item shaped like the (empty) batch `value`."""
    if isinstance(value, dict):
        return {k: _one(v) for k, v in value.items()}
    return value.new_zeros((1, *value.shape[1:]))


def _take_none(value: Any) -> Any:
    """Every tensor in `value` (tensor, dict, dataclass such as an encoding or posterior) cut to batch 0."""
    if isinstance(value, torch.Tensor):
        return value[:0]
    if isinstance(value, dict):
        return {k: _take_none(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _take_none(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


def _run_contract(value, call):
    """Run `call(value)`; an empty batch runs as a batch of one zero item whose outputs are cut to 0 rows, so
    every family handles B = 0 with the right shapes and dtypes (and the same validation)."""
    if _empty_batch(value):
        return _take_none(call(_one(value)))
    return call(value)


def _encode_contract(fn):
    @functools.wraps(fn)
    def encode(self, pixels, *args, **kwargs):
        pixels = self.prepare_pixels(pixels)
        return _run_contract(pixels, lambda x: fn(self, x, *args, **kwargs))

    encode._vistok_contract = True
    return encode


def _decode_contract(fn):
    @functools.wraps(fn)
    def decode(self, *args, ids=None, latents=None, **kwargs):
        if args:
            raise TypeError(f"{type(self).__name__}.decode takes keyword arguments only: decode(ids=...) or "
                            "decode(latents=...)")
        ids, latents = self.prepare_ids(ids), self.prepare_latents(latents)
        if latents is not None:
            return _run_contract(latents, lambda z: fn(self, ids=ids, latents=z, **kwargs))
        return _run_contract(ids, lambda i: fn(self, ids=i, latents=latents, **kwargs))

    decode._vistok_contract = True
    return decode


def _embed_contract(fn):
    @functools.wraps(fn)
    def embed(self, ids, *args, **kwargs):
        return _run_contract(self.prepare_ids(ids), lambda i: fn(self, i, *args, **kwargs))

    embed._vistok_contract = True
    return embed


def build_checked(cls: type["VisualTokenizer"], args: dict, source: str) -> "VisualTokenizer":
    """`cls(**args)` after `check_model_args`; a value the constructor still rejects (a range, a combination)
    is a ValueError naming `source` rather than whatever the layer code raised."""
    try:
        return cls(**args)
    except (TypeError, ValueError, ArithmeticError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"{source}: model_args do not build a {cls.__name__}: {type(exc).__name__}: {exc}") from None
