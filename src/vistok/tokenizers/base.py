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
from .frozen_config import FrozenConfig

if TYPE_CHECKING:
    from .kl import DiagonalGaussian
    from .layout import TokenLayout


def _refuse_foreign_release(directory: Path) -> None:
    """ValueError when `directory` holds config.json / model.safetensors that a vistok release did not write
    (a diffusers or transformers model folder, say): saving would replace them."""
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not (config.is_file() or weights.is_file()):
        return
    try:
        name = json.loads(config.read_text()).get("_class_name")
        tokenizer_class(name)
        return
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    held = ", ".join(p.name for p in (config, weights) if p.is_file())
    raise ValueError(f"{directory} holds {held} that are not a vistok release's (config.json has no known "
                     "'_class_name'); saving would replace them: choose a new directory, nothing was written")


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
    #: Parts that never train, as attribute paths of submodules or parameters ("teacher", "siglip.text",
    #: "siglip.logit_bias"): after construction their gradients are off, and `train()` keeps the modules
    #: among them in eval mode. Paths a particular configuration lacks (no teacher, no text tower) are skipped.
    frozen_modules: ClassVar[tuple[str, ...]] = ()

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
            self._freeze()  # idempotent: each __init__ of a subclass chain re-applies it to what exists by then
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
        """The resolved `PreprocessConfig` (image size, crop, interpolation, mean/std): the config's
        `preprocess` over the family's `default_preprocess`. What `preprocess` applies."""
        return PreprocessConfig.from_any(self.config.get("preprocess"), **self.default_preprocess)

    @property
    def stride(self) -> int:
        """Pixels per token along each side."""
        raise NotImplementedError

    @property
    def codebooks(self) -> dict[str, CodebookSpec]:
        """name -> `CodebookSpec(size, depth, dim, shared)` of each discrete vocabulary, in the order
        `enc.ids`, `embed` and `token_layout` use; `{}` for continuous families (KL, MAR)."""
        return {}

    @property
    def scaling_factor(self) -> Optional[float]:
        """The latent scale: `enc.latents = scaling_factor * z` and `decode` divides by it (LDM's
        convention); None for families without latents."""
        return None

    @property
    def device(self) -> torch.device:
        """The device of the parameters: where `encode`, `decode` and `embed` move their inputs."""
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

    # ----------------------------------------------------------------------------- frozen parts
    def _frozen_parts(self) -> list[nn.Module | nn.Parameter]:
        parts = []
        for path in self.frozen_modules:
            part: Any = self
            for name in path.split("."):
                part = getattr(part, name, None)
            if part is not None:
                parts.append(part)
        return parts

    def _freeze(self) -> None:
        for part in self._frozen_parts():
            part.requires_grad_(False)
            if isinstance(part, nn.Module):
                part.eval()

    def train(self, mode: bool = True) -> "VisualTokenizer":
        """`nn.Module.train`, except that the parts in `frozen_modules` stay in eval mode (a frozen teacher,
        text tower or VQ never runs dropout or updates running statistics)."""
        super().train(mode)
        for part in self._frozen_parts():
            if isinstance(part, nn.Module):
                part.eval()
        return self

    def require_teacher(self) -> nn.Module:
        """The frozen teacher tower that training distils from. Raises ValueError for a tokenizer built
        with `with_teacher=False` (an inference release), naming the fix."""
        teacher = getattr(self, "teacher", None)
        if teacher is None:
            raise ValueError(f"this {type(self).__name__} was built with with_teacher=False; training needs the "
                             "teacher (build it from the SigLIP weights instead of an inference release)")
        return teacher

    def num_parameters(self) -> int:
        """The number of parameter elements, frozen parts (teacher, text tower) included."""
        return sum(p.numel() for p in self.parameters())

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """The token grid (h, w) of an H x W input: (H // stride, W // stride) unless the family fixes it."""
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
        """PIL images, HxWx3 uint8 arrays, image files or directories (searched recursively, sorted) ->
        (B, 3, H, W) float32 in [-1, 1], resized and cropped as this tokenizer's `preprocess_config` says.

        Raises ValueError for a pixel tensor (those go straight to `encode`), no images, an unreadable or
        too-small image, or images of different sizes after preprocessing (crop "none");
        FileNotFoundError for a missing path."""
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
    def encode(self, pixels: torch.Tensor, **options) -> TokenizerEncoding:
        """Pixels -> tokens.

        pixels: (B, 3, H, W) float in [-1, 1] (see `preprocess`); H and W fit `check_image_size` (positive
        multiples of `stride`; a SigLIP tower takes exactly its own size). Other float dtypes and devices are
        moved to the model's; B = 0 gives 0-row outputs of the right shapes. `options`: the family's keyword
        options (`encode_options`; the KL and MAR families take `sample` and `generator`).

        Returns a `TokenizerEncoding` (fields a family does not define stay None): `grid` (h, w); `ids`
        {name: int64 (B, h, w, depth)} in [0, codebooks[name].size); `quantized` {name: (B, h*w, dim)} code
        vectors summed over depth; `features` (B, h*w, width) continuous features for understanding (MAR:
        (B, buffer_size + h*w, width), buffer first); `pooled` (B, E) CLIP-space embedding; `latent_dist` the
        unscaled diagonal Gaussian posterior and `latents` (B, C, h, w) = scaling_factor * (its mean, or a
        sample). Does not switch off autograd and never updates codebooks.

        Raises ValueError naming the problem for anything but such pixels (not a tensor, rank, channels,
        integer dtype, size, NaN/Inf, values outside [-1, 1])."""
        raise NotImplementedError

    def decode(self, *, ids: Optional[dict] = None, latents: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """Tokens -> images: `decode(ids=enc.ids)` for discrete families, `decode(latents=enc.latents)`
        for continuous ones (keyword arguments only).

        ids: {name: integer (B, h, w, depth)} of any integer dtype (tensor, array or list), checked against
        each codebook's size; latents: float (B, C, h, w) scaled latents. Family options: `clamp` (default
        True). Returns (B, 3, H, W) in [-1, 1] (unclamped with clamp=False), in the model's dtype.

        Raises ValueError for the wrong kind of tokens, a missing codebook, ids out of range, bool / float /
        complex ids, wrong shapes, and NaN/Inf latents; TypeError for positional arguments."""
        raise NotImplementedError

    def reconstruct(self, pixels: torch.Tensor, **encode_options) -> torch.Tensor:
        """decode(encode(pixels)): (B, 3, H, W) float pixels in [-1, 1] -> images of the same shape in [-1, 1],
        in the model's dtype. Through the latents where the encoding has them (KL, MAR), else through the ids.
        `encode_options` go to the family's `encode` (see `encode_options`, e.g. the KL family's
        `sample=True, generator=g`). Raises what `encode` and `decode` raise for bad input."""
        enc = self.encode(pixels, **encode_options)
        if enc.latents is not None:
            return self.decode(latents=enc.latents)
        if enc.ids is None:
            raise ValueError(f"{type(self).__name__}.encode returned neither latents nor ids: nothing to decode")
        return self.decode(ids=enc.ids)

    @property
    def encode_options(self) -> tuple[str, ...]:
        """The keyword options this family's `encode` takes besides the pixels (the KL and MAR families:
        `("sample", "generator")`; none elsewhere)."""
        params = inspect.signature(type(self).encode).parameters.values()
        return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY)

    def embed(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """Discrete ids -> LLM-input embeddings per position, (B, h*w, D) float: DualToken the depth-summed
        pixel and semantic code vectors concatenated (D = 2 * code_dim), VQGAN the unit code vectors
        (D = codebook dim), TokLIP the token encoder's features (D = width). ids as `decode` takes them.

        Raises NotImplementedError for continuous families (no ids) and ValueError for bad ids."""
        raise NotImplementedError(f"{type(self).__name__} has no discrete ids to embed")

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts (strings, or int64 token ids (B, context_length)) -> L2-normalised text embeddings (B, E) in
        the CLIP space of `enc.pooled`, where the family has a text tower (DualToken, TokLIP).

        Raises NotImplementedError without a text tower, and ValueError when strings need a tokenizer
        that is not configured (`text_tokenizer`)."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    def token_layout(self, text_vocab_size: int, **kwargs) -> "TokenLayout":
        """Place this tokenizer's codebooks in an LLM vocabulary after `text_vocab_size` text ids and the
        special tokens (`TokenLayout.from_codebooks`; kwargs: `specials`). Raises NotImplementedError for
        continuous families and ValueError for a negative vocabulary size."""
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
        """What `save_pretrained` writes as config.json: class name, family, vistok version, `model_args`
        (load-time file arguments set to None: the release holds those weights), preprocessing, codebook
        specs and scaling factor."""
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
        """Write a release directory: `config.json` (`release_config()` updated with `extra`) +
        `model.safetensors` (+ a `README.md` model card), creating the directory. Each file is replaced
        atomically, weights first, so an interrupted save never leaves a config pointing at partial weights;
        `load_tokenizer` reloads it exactly.

        `extra` adds top-level keys to config.json; the model card shows `preset`, `trained_steps`,
        `training` (dict), `metrics` (held-out, dict) and `source` from them. A README.md that vistok did not
        write is never replaced (`model_card=False` writes none). Returns the directory; raises OSError (the
        old files unchanged) when a file cannot be written, and ValueError (nothing written) when the directory
        holds a config.json or model.safetensors that are not a vistok release's (another library's model)."""
        directory = Path(directory)
        _refuse_foreign_release(directory)
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
        """`load_tokenizer(path, **kwargs)` (a release directory or `hf-hub:org/name[@revision]`; `revision=`,
        `device=`, `dtype=`; loaded strictly, in eval mode) that also checks the class: ValueError when `path`
        holds another tokenizer class, besides what `load_tokenizer` raises (FileNotFoundError, ValueError,
        CheckpointMismatchError)."""
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
