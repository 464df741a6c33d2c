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
from safetensors.torch import load_file, save_model
from torch import nn

from .. import __version__
from ..fileio import atomic_path, remove_stale_temps
from ..images import ImageLike, PreprocessConfig, list_image_files, load_image, pil_to_pixels, preprocess_image
from .frozen_config import FrozenConfig

if TYPE_CHECKING:
    from .kl import DiagonalGaussian
    from .layout import TokenLayout

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

_TOKENIZER_CLASSES: dict[str, type["VisualTokenizer"]] = {}


def register_tokenizer(cls):
    """Class decorator: make a tokenizer class constructible from a config's `_class_name`."""
    _TOKENIZER_CLASSES[cls.__name__] = cls
    return cls


def tokenizer_class(name: str) -> type["VisualTokenizer"]:
    try:
        return _TOKENIZER_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown tokenizer class {name!r}; known: {sorted(_TOKENIZER_CLASSES)}") from None


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


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the model: lists every missing, unexpected and mis-shaped key."""

    def __init__(self, target: str, missing=(), unexpected=(), mismatched=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s): {_clip(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s): {_clip(self.unexpected)}")
        if self.mismatched:
            shapes = [f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})" for k, a, b in self.mismatched]
            parts.append(f"{len(shapes)} shape mismatch(es): {_clip(shapes)}")
        super().__init__(f"weights do not match {target}: " + "; ".join(parts))


def _clip(items: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], target: str = "") -> None:
    """Strict load that names every problem. Keys that alias one tensor in the module (a shared
    codebook) may appear once in `state_dict`, as safetensors' `save_model` stores them."""
    expected = module.state_dict()
    state_dict = dict(state_dict)
    by_storage: dict[tuple, list[str]] = {}
    for k, v in expected.items():
        by_storage.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)), []).append(k)
    for names in by_storage.values():
        present = [n for n in names if n in state_dict]
        for n in names:
            if present and n not in state_dict:
                state_dict[n] = state_dict[present[0]]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        (k, state_dict[k].shape, expected[k].shape)
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(target or type(module).__name__, missing, unexpected, mismatched)
    module.load_state_dict(state_dict, strict=True)


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
    def config(self) -> FrozenConfig:
        """Constructor arguments (JSON types) that rebuild this tokenizer: a read-only dict that also reads as
        attributes (`tok.config.scaling_factor`), equal to the plain dict and JSON-serialisable. Each access
        is a fresh copy, so nothing done to it reaches the model."""
        return FrozenConfig(json.loads(json.dumps(self._config_args)))

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

    def save_pretrained(self, directory: str | os.PathLike, *, extra: Optional[dict] = None,
                        model_card: bool = True) -> Path:
        """Write `config.json` + `model.safetensors` (+ a `README.md` model card); each file is replaced
        atomically, weights first, so an interrupted save never leaves a config pointing at partial weights.

        `extra` adds top-level keys to config.json; the model card shows `preset`, `trained_steps`,
        `training` (dict), `metrics` (held-out, dict) and `source` from them. A README.md that vistok did not
        write is never replaced (`model_card=False` writes none). Raises OSError if the disk refuses a write."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.release_config()
        if getattr(self, "preset_name", None):
            config["preset"] = self.preset_name
        if extra:
            config.update(extra)
        # both files are complete on disk before either replaces its predecessor; the inner context
        # exits first, so the weights are swapped in before the config that describes them
        remove_stale_temps(directory, (CONFIG_NAME, WEIGHTS_NAME, "README.md"))  # left by a writer killed mid-save
        try:
            with atomic_path(directory / CONFIG_NAME) as c_tmp, atomic_path(directory / WEIGHTS_NAME) as w_tmp:
                save_model(self, str(w_tmp), metadata={"format": "pt", "vistok_version": __version__})
                c_tmp.write_text(json.dumps(config, indent=2) + "\n")
            if model_card:
                self._write_model_card(directory, config)
        except Exception as exc:  # disk full: safetensors raises its own error type
            cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OSError(f"could not write the release to {directory} ({cause}); nothing was lost: the files "
                          "that were there are unchanged") from exc
        return directory

    @staticmethod
    def _write_model_card(directory: Path, config: dict, repo_id: Optional[str] = None) -> None:
        from .model_card import README_NAME, is_ours, model_card

        readme = directory / README_NAME
        if is_ours(readme):
            with atomic_path(readme) as tmp:
                tmp.write_text(model_card(config, repo_id))

    def push_to_hub(self, repo_id: str, *, revision: Optional[str] = None, private: Optional[bool] = None,
                    token: Optional[str] = None, commit_message: str = "Upload vistok tokenizer",
                    create_pr: bool = False, extra: Optional[dict] = None):
        """Save this tokenizer (config.json, model.safetensors, README.md model card) to a temporary folder and
        upload it to the Hugging Face Hub repository `repo_id` ("org/name"), creating the repository if needed
        (huggingface_hub's `HfApi.create_repo` + `HfApi.upload_folder`; `token` defaults to the logged-in one).
        Load it back with `load_tokenizer("hf-hub:org/name")` once `hf download` has put it in the cache.
        Returns huggingface_hub's CommitInfo; network and permission errors are huggingface_hub's."""
        import tempfile

        from huggingface_hub import HfApi

        if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="vistok-push-") as tmp:
            self.save_pretrained(tmp, extra=extra, model_card=False)
            config = json.loads((Path(tmp) / CONFIG_NAME).read_text())
            self._write_model_card(Path(tmp), config, repo_id=repo_id)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision,
                                     commit_message=commit_message, create_pr=create_pr)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "VisualTokenizer":
        """`load_tokenizer(path, **kwargs)` (revision=, device=, dtype=), checked to be a `cls`."""
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


def _network_flags(value: Any, key: str) -> list[str]:
    """Keys under `value` that would make a library download weights (timm / open_clip `*pretrained*`)."""
    if isinstance(value, dict):
        return [k for name, v in value.items() for k in _network_flags(v, f"{key}.{name}")] + \
            [f"{key}.{name}" for name, v in value.items() if "pretrained" in str(name).lower() and v not in (None, False, "")]
    if isinstance(value, list):
        return [k for i, v in enumerate(value) for k in _network_flags(v, f"{key}[{i}]")]
    return []


def build_checked(cls: type["VisualTokenizer"], args: dict, source: str) -> "VisualTokenizer":
    """`cls(**args)` after `check_model_args`; a value the constructor still rejects (a range, a combination)
    is a ValueError naming `source` rather than whatever the layer code raised."""
    try:
        return cls(**args)
    except (TypeError, ValueError, ArithmeticError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"{source}: model_args do not build a {cls.__name__}: {type(exc).__name__}: {exc}") from None


def check_model_args(cls: type["VisualTokenizer"], args: Any, source: str, *, release: bool) -> dict:
    """Constructor arguments from JSON, checked before anything is built: keys `cls` takes, each of its
    annotated type, no flag that would download weights, and (release=True) no load-time file argument,
    since a release holds its weights. Raises ValueError naming `source` and the key."""
    from ..schema import check_kwargs

    try:
        args = check_kwargs(cls.__init__, args, "model_args", what=cls.__name__)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    flags = _network_flags(args, "model_args")
    if flags:
        raise ValueError(f"{source}: {', '.join(flags)} would download pretrained weights; vistok never reaches the "
                         "network when building a model (a release holds its weights): set them to false")
    if release:
        files = [f"model_args.{k}" for k in cls.load_time_args if args.get(k) is not None]
        if files:
            raise ValueError(f"{source}: {', '.join(files)} names a file read at construction, but a release holds its "
                             "own weights: set it to null")
    return args


def read_release_config(directory: Path) -> dict:
    """A release directory's config.json, checked: a JSON object with a known `_class_name` and `model_args`
    that fit that class (see `check_model_args`). Raises FileNotFoundError / ValueError naming the file."""
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{directory} is not a vistok release directory: missing {CONFIG_NAME}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object with '_class_name' and 'model_args', got "
                         f"{type(config).__name__} {str(config)[:60]!r}: not a vistok config")
    if "_class_name" not in config or "model_args" not in config:
        raise ValueError(f"{cfg_path} lacks '_class_name' / 'model_args': not a vistok config")
    if not isinstance(config["_class_name"], str):
        raise ValueError(f"{cfg_path}: _class_name must be a string naming the tokenizer class, got "
                         f"{config['_class_name']!r}")
    try:
        cls = tokenizer_class(config["_class_name"])
    except ValueError as exc:
        raise ValueError(f"{cfg_path}: _class_name: {exc}") from None
    config["model_args"] = check_model_args(cls, config["model_args"], str(cfg_path), release=True)
    return config


def read_release(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a release directory's config (checked, see `read_release_config`) and weights (no model built)."""
    config = read_release_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{directory} is not a vistok release directory: missing {weights_path.name}")
    try:
        weights = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise ValueError(f"cannot read {weights_path}: {exc}") from exc
    return config, weights
