"""The training loop: one process on CPU or one per GPU under torchrun (DDP), any family.

bf16 autocast (the quantizers switch it off for themselves), gradient accumulation, clipping,
AdamW with warmup + cosine, a discriminator optimiser from the GAN start step, optional weight
EMA, atomic checkpoints with exact resume, JSONL + TensorBoard logs (timestamped records, held-out
evaluations, the resolved config), reconstruction grids of varied held-out images.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..fileio import atomic_path, remove_stale_temps
from ..bench.codebook import CodeCounter
from ..bench.metrics import SSIM_WINDOW, psnr_uint8, ssim_uint8
from ..images import pixels_to_pil, to_uint8
from ..progress import progress_bar
from ..tokenizers.registry import create_tokenizer
from ..tokenizers.siglip_hf import is_hf_siglip_folder, siglip_init_args
from ..weights import load_state_dict_strict, read_release, read_release_config, tokenizer_class
from .checkpoint import (UnreadableCheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                         newest_readable, read_tensors, remove_partial_checkpoints, rng_state, save_checkpoint)
from .config import RunConfig
from .data import (Augment, ImageDataset, ResumableBatchSampler, collate, collate_stream, is_webdataset,
                   check_data, item_group, next_position, read_items, spread_indices, WebDatasetStream)
from . import speed
from .objectives import Objective, objective_class
from .runlock import RunFolderBusy, RunLock

CONFIG_NAME = "config.json"
GRID_IMAGES = 8  # held-out images per reconstruction grid
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- setup
@dataclass
class Dist:
    """This process's place in the run: global rank, number of processes, local device index, device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0


def setup_distributed() -> Dist:
    """From torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK): join the process group (NCCL on GPUs,
    gloo on CPU) and pick this rank's device; without WORLD_SIZE > 1, one process on CUDA if available, else the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device)


def build_model(cfg: RunConfig, overrides: Optional[dict] = None, *, load_init: bool = True) -> nn.Module:
    """The preset (random weights) or the `model.init` release directory, with the config's overrides;
    an init release's weights are loaded strictly (skipped with load_init=False, e.g. for export)."""
    args = {**cfg.model.overrides, **(overrides or {})}
    if cfg.train.grad_checkpointing:
        args["grad_checkpointing"] = True
    # an HF SigLIP / SigLIP2 folder (model.init, or siglip_weights on a preset) brings its own tower geometry
    init_is_hf = bool(cfg.model.init) and is_hf_siglip_folder(cfg.model.init)
    hf_folder = cfg.model.init if init_is_hf else None if cfg.model.init else cfg.model.overrides.get("siglip_weights")
    if hf_folder and is_hf_siglip_folder(hf_folder) and "clip_config" not in cfg.model.overrides:
        size = (args.get("preprocess") or {}).get("image_size")  # NaFlex SigLIP2 is built at this size
        args = {**siglip_init_args(hf_folder, image_size=size, preset=cfg.model.preset), **args}
    if not cfg.model.init or init_is_hf:
        return create_tokenizer(cfg.model.preset, **args)
    if load_init:
        config, weights = read_release(Path(cfg.model.init))
    else:  # export rebuilds the architecture only: the run's own weights replace the init's
        config = read_release_config(Path(cfg.model.init))
    try:
        model = tokenizer_class(config["_class_name"])(**{**config["model_args"], **args})
    except TypeError as exc:
        raise ValueError(f"model.overrides for {cfg.model.init}: {exc}") from None
    if load_init:
        load_state_dict_strict(model, weights, target=f"model.init {cfg.model.init}")
    return model


def param_groups(model: nn.Module, extra: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """No weight decay on 1-D parameters, norms, biases and logit scalars (DualToken / open_clip)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(s in name for s in ("bn", "ln", "norm", "bias", "logit_scale"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay + list(extra), "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int, schedule: str, floor: float):
    """Linear warmup to 1, then cosine to `floor` (a fraction of the base lr) or constant."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class WeightEMA(nn.Module):
    """Exponential moving average of the trainable parameters (buffers are taken from the model)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        for n in self.names:
            self.register_buffer(n.replace(".", "__"), params[n].detach().clone().float())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- decay x ema + (1 - decay) x parameter, in fp32, for the parameters recorded at creation."""
        params = dict(model.named_parameters())
        for n in self.names:
            getattr(self, n.replace(".", "__")).lerp_(params[n].detach().float(), 1 - self.decay)

    def averaged(self) -> dict[str, torch.Tensor]:
        """Parameter name -> its fp32 average (the buffers themselves, not copies)."""
        return {n: getattr(self, n.replace(".", "__")) for n in self.names}


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Trains one tokenizer of any family on one process or one per device under torchrun (DDP).

    cfg: a `RunConfig` (train/config.py); its `family` picks the `Objective` (train/objectives.py), the
    one object the trainer talks to for everything loss-side. out_dir: the run folder, locked for the
    run's life; it receives `config.json`, `step_<N>/` checkpoints (model, EMA, `loss.safetensors` when
    the loss holds tensors, optimiser/scheduler states, RNG streams), `metrics.jsonl`, TensorBoard
    events, image grids and the `export/` release. resume: continue bit for bit from the newest
    readable checkpoint (the `family`, `model` and `loss` sections must equal the saved config's; the
    `optim` settings may change). quiet: no logs or progress bar on stderr.

    Raises (before any training): ValueError for a config that cannot train (e.g. a full-size model
    without real initial weights, unusable data settings), for checkpoints in `out_dir` without
    `resume`, for a differing saved config or no readable checkpoint on resume; FileNotFoundError for
    missing data shards or `resume` without checkpoints; RunFolderBusy (a ValueError) when another live
    process holds `out_dir`. During `fit`: FloatingPointError naming the step and the non-finite terms.

    One step (`train_step`): generator forward + backward under bf16 autocast over the accumulated
    batches, the discriminator's backward once its GAN is active, the objective's gradient sync of the
    loss's own parameters, clipping, the optimisers' steps, the EMA update.
    """

    def __init__(self, cfg: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False, quiet: bool = False):
        self.cfg, self.out = cfg, Path(out_dir)
        self.dist = setup_distributed()
        self.quiet = quiet
        objective_class(cfg.family).check_run(cfg)  # before building a large model
        check_data(cfg, self.dist.world)
        self.lock = RunLock(self.out, self.log)
        self._hold_run_folder()
        try:
            self._setup(resume)
        except BaseException:
            self.close()
            raise

    def _hold_run_folder(self) -> None:
        """Rank 0 locks the run folder; every rank learns whether it did, so none goes on alone."""
        ok, error = 1, None
        if self.dist.main:
            try:
                self.lock.acquire()
            except RunFolderBusy as exc:
                ok, error = 0, exc
        if self.dist.world > 1:
            flag = torch.tensor(ok, device=self.dist.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = int(flag.item())
        if not ok:
            raise error or RunFolderBusy(f"run folder {self.out} is in use by another process")

    def close(self) -> None:
        """Release the run folder (done by `fit` at its end)."""
        self.lock.release()

    def _setup(self, resume: bool) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = build_model(cfg).to(self.dist.device).train()
        self.objective: Objective = objective_class(cfg.family)(cfg.loss).to(self.dist.device)
        if cfg.train.channels_last:
            speed.channels_last(self.model, self.objective.discriminator, device=self.dist.device)
        self._build_optimizers()
        self.ema = WeightEMA(self.model, cfg.train.ema_decay).to(self.dist.device) if cfg.train.ema_decay else None
        self.step, self.position, self.skipped_total = 0, (0, 0), 0
        self.checkpoint_loaded = None
        torch.manual_seed(cfg.train.seed + 1 + self.dist.rank)  # per-rank stream; a resume restores the saved one
        if self.dist.main:
            for stale in remove_partial_checkpoints(self.out):
                self.log(f"removed a partial checkpoint left by an interrupted write: {stale}")
            for folder in (self.out, self.out / "images", self.out / "export"):
                for stale in remove_stale_temps(folder):
                    self.log(f"removed a temporary file left by an interrupted write: {stale}")
        if resume:
            self._resume()
        elif latest_checkpoint(self.out) is not None:  # every rank: none may go on into DDP's collectives
            raise ValueError(f"{self.out} already holds checkpoints: pass --resume to continue, or another --out")
        self.ddp = self.model
        if self.dist.world > 1:
            kwargs = {"device_ids": [self.dist.device.index]} if self.dist.device.type == "cuda" else {}
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, broadcast_buffers=False, find_unused_parameters=self.objective.find_unused_parameters(),
                **kwargs)
        self.forward_model = speed.compile_module(self.ddp) if cfg.train.compile else self.ddp

    # ------------------------------------------------------------------ optimisers and state
    def _build_optimizers(self) -> None:
        o, t = self.cfg.optim, self.cfg.train
        groups = param_groups(self.model, self.objective.extra_parameters(), o.weight_decay)
        self.opt = speed.make_adamw(groups, lr=o.lr, betas=o.betas, device=self.dist.device, fused=t.fused_optimizer)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(o.warmup_steps, t.steps, o.schedule, o.min_lr / o.lr if o.lr else 0.0))
        self.d_opt = self.d_sched = None
        disc = self.objective.discriminator
        if disc is not None:
            d_lr = o.disc_lr or o.lr
            self.d_opt = torch.optim.Adam(disc.parameters(), lr=d_lr, betas=tuple(o.disc_betas), weight_decay=0.0)
            warmup = o.warmup_steps if o.disc_warmup_steps is None else o.disc_warmup_steps
            self.d_sched = torch.optim.lr_scheduler.LambdaLR(
                self.d_opt, lr_lambda(warmup, t.steps, o.schedule, min(1.0, o.disc_min_lr / d_lr)))

    def _state_parts(self) -> tuple[dict, dict]:
        modules = {"model": self.model}
        if self.ema is not None:
            modules["ema"] = self.ema
        if self.objective.has_state():  # discriminator, log-variance: loss.safetensors
            modules["loss"] = self.objective
        states = {"optimizer": self.opt, "scheduler": self.sched}
        if self.d_opt is not None:
            states.update(d_optimizer=self.d_opt, d_scheduler=self.d_sched)
        return modules, states

    def _resume(self) -> None:
        found = list_checkpoints(self.out)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.out}")
        saved = json.loads((self.out / CONFIG_NAME).read_text()) if (self.out / CONFIG_NAME).is_file() else None
        if saved is not None:
            ours = self.cfg.to_dict()
            for section in ("family", "model", "loss"):
                if saved.get(section) != ours.get(section):
                    raise ValueError(f"--resume: the {section!r} section differs from the run's saved config "
                                     f"({self.out / CONFIG_NAME}); resume with the same config")
        modules, states = self._state_parts()
        fresh = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                 for opt, _ in self._optimizers()]
        path, meta = newest_readable(  # an unreadable one (e.g. truncated) falls back to the one before
            [p for _, p in reversed(found)],
            lambda p: load_checkpoint(p, modules=modules, states=states, rank=self.dist.rank),
            log=self.log, context="--resume")
        if path != found[-1][1]:
            self.log(f"--resume: continuing from {path.name}, the latest readable checkpoint")
        self._apply_optim_config(fresh)
        if saved is not None and saved.get("optim") != self.cfg.to_dict()["optim"]:
            changed = {k: (saved.get("optim", {}).get(k), v) for k, v in self.cfg.to_dict()["optim"].items()
                       if saved.get("optim", {}).get(k) != v}
            self.log("--resume: the config's optim settings apply from here: "
                     + ", ".join(f"optim.{k} {a} -> {b}" for k, (a, b) in changed.items()))
        self.step, self.position = int(meta["step"]), tuple(meta["data_position"])
        self.skipped_total = int(meta.get("skipped_images", 0))
        self.checkpoint_loaded = path

    def _optimizers(self) -> list[tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]]:
        return [(self.opt, self.sched)] + ([(self.d_opt, self.d_sched)] if self.d_opt is not None else [])

    def _apply_optim_config(self, fresh: list[list[dict]]) -> None:
        """After loading optimizer/scheduler states, the config's hyperparameters win (lr, betas, weight decay,
        schedule): a checkpoint restores moments and the step, not settings the user has since changed."""
        for (opt, sched), groups in zip(self._optimizers(), fresh):
            for group, settings in zip(opt.param_groups, groups):
                group.update(settings)
            sched.base_lrs = [group["initial_lr"] for group in opt.param_groups]
            for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * factor(sched.last_epoch)
            sched._last_lr = [group["lr"] for group in opt.param_groups]

    def save(self) -> Optional[Path]:
        """Called on every rank (the RNG streams are gathered); rank 0 writes, the others wait."""
        rngs = [rng_state()]
        if self.dist.world > 1:
            rngs = [None] * self.dist.world
            dist.all_gather_object(rngs, rng_state())
        path = None
        if self.dist.main:
            modules, states = self._state_parts()
            state = {"data_position": list(self.position), "skipped_images": self.skipped_total,
                     "world_size": self.dist.world, "family": self.cfg.family}
            path = save_checkpoint(self.out, self.step, modules=modules, states=states, trainer_state=state,
                                   keep_last=self.cfg.train.keep_last, rng_states=rngs)
        if self.dist.world > 1:
            dist.barrier()
        return path

    # ------------------------------------------------------------------ data
    def _loader(self):
        d, t = self.cfg.data, self.cfg.train
        augment = Augment(self.model.preprocess_config, d.crop_scale, d.hflip)
        if is_webdataset(d.source):
            consumed = self.position[1]
            stream = WebDatasetStream(d.source, augment, seed=t.seed, shuffle_buffer=d.shuffle_buffer,
                                      shard_shuffle=d.shard_shuffle, skip=consumed)
            self.per_rank = None
            return torch.utils.data.DataLoader(stream, batch_size=t.batch_size, num_workers=d.workers,
                                               collate_fn=collate_stream, generator=torch.Generator())
        items = read_items(d.source)
        sampler = ResumableBatchSampler(len(items), t.batch_size, seed=t.seed, rank=self.dist.rank,
                                        world=self.dist.world, start=self.position)
        self.per_rank = sampler.per_rank
        # its own generator: creating a DataLoader iterator draws a base seed, which must not consume the
        # global RNG (a resumed run creates its iterator at a different step); augmentation is seeded per sample
        return torch.utils.data.DataLoader(ImageDataset(items, augment, t.seed), batch_sampler=sampler,
                                           num_workers=d.workers, collate_fn=collate,
                                           persistent_workers=d.workers > 0, generator=torch.Generator())

    def _advance(self, batch: dict) -> None:
        if self.per_rank is None:  # webdataset: count samples seen by this rank
            self.position = (0, self.position[1] + len(batch["keys"]) + len(batch["skipped"]))
        else:
            self.position = next_position(batch, self.per_rank)

    def _eval_pixels(self) -> Optional[torch.Tensor]:
        d = self.cfg.data
        if not d.eval_source:
            return None
        items = read_items(d.eval_source)
        if len(items) > d.eval_limit:  # spread over the photos / folders: the first N may all be one photo
            items = [items[i] for i in spread_indices([item_group(it) for it in items], d.eval_limit)]
        return self.model.preprocess([it.image for it in items]).to(self.dist.device)

    def _grid_pixels(self) -> Optional[torch.Tensor]:
        """GRID_IMAGES held-out images spread over eval_source's photos (built-in) or folders, not only its
        first ones (the built-in held-out set begins with 17 crops of one photo)."""
        d = self.cfg.data
        if not d.eval_source or not self.dist.main:
            return None
        items = read_items(d.eval_source)
        picks = spread_indices([item_group(it) for it in items], GRID_IMAGES)
        return self.model.preprocess([items[i].image for i in picks]).to(self.dist.device)

    # ------------------------------------------------------------------ the loop
    def _autocast(self):
        enabled = self.cfg.train.precision == "bf16"
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _check_finite(self, loss, step: int) -> None:
        finite = torch.tensor(float(torch.isfinite(loss.total)), device=self.dist.device)
        if self.dist.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            loss.check_finite(step)
            raise FloatingPointError(f"non-finite loss on another rank at step {step}")

    def train_step(self, batches) -> dict:
        """One optimiser step over `train.accumulation` batches drawn from the iterator `batches` (dicts with
        `pixels` (B, 3, H, W) in [-1, 1] or None, `captions`, `keys`, `skipped`). Returns the step's logs:
        name -> float (loss, the loss's terms, d_loss and grad norms where they apply, lr)."""
        t = self.cfg.train
        step = self.step
        disc = self.objective.discriminator
        logs: dict[str, float] = {}
        for micro in range(t.accumulation):
            batch = next(batches)
            while batch["pixels"] is None:  # a webdataset batch with only corrupt samples
                self._note_skipped(batch)
                batch = next(batches)
            self._note_skipped(batch)
            x = batch["pixels"].to(self.dist.device, non_blocking=True)
            last = micro == t.accumulation - 1
            sync = contextlib.nullcontext() if last or self.ddp is self.model else self.ddp.no_sync()
            with sync:
                with self._autocast():
                    loss, out = self.objective.generator_step(self.forward_model, self.model, x, step,
                                                              batch["captions"])
                self._check_finite(loss, step)
                (loss.total / t.accumulation).backward()
            if disc is not None and self.objective.gan_active(step):
                with self._autocast():
                    d_loss = self.objective.discriminator_loss(out, x, step)
                (d_loss / t.accumulation).backward()
                logs["d_loss"] = logs.get("d_loss", 0.0) + d_loss.item() / t.accumulation
            for k, v in {"loss": loss.total.detach(), **loss.terms}.items():
                logs[k] = logs.get(k, 0.0) + float(v) / t.accumulation
            self._advance(batch)
        self.objective.sync_gradients(self.dist.world)  # the loss's parameters live outside the DDP model
        if self.cfg.optim.grad_clip:
            logs["grad_norm"] = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip))
        self.opt.step()
        self.objective.after_step(self.model)
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if disc is not None and self.objective.gan_active(step):
            if self.cfg.optim.grad_clip:
                logs["d_grad_norm"] = float(nn.utils.clip_grad_norm_(disc.parameters(), self.cfg.optim.grad_clip))
            self.d_opt.step()
            self.d_opt.zero_grad(set_to_none=True)
        if self.d_sched is not None:
            # on the global step: warmup and cosine follow the run, also before the GAN starts (when torch
            # warns that the scheduler steps without its optimizer)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                self.d_sched.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        logs["lr"] = self.sched.get_last_lr()[0]
        return logs

    def _note_skipped(self, batch: dict) -> None:
        if batch["skipped"]:
            self.skipped_total += len(batch["skipped"])
            for name in batch["skipped"]:
                self.log(f"skipped unreadable image {name}")

    def log(self, message: str) -> None:
        """Rank 0's messages, through the "vistok.train.trainer" logger (the CLI prints them above the bar)."""
        if self.dist.main and not self.quiet:
            logger.info(message)

    def _codebook_stats(self) -> dict:
        out = {}
        for name, module in self.model.named_modules():
            if hasattr(module, "usage") and hasattr(module, "codebook_size") and module.training:  # LlamaGen's window
                out[f"codebook/{name}/usage"] = module.usage()
            if hasattr(module, "stats") and hasattr(module, "codebook_size"):
                s = module.stats()
                key = name.replace("_quantizer", "")
                out[f"codebook/{key}/usage"] = sum(s.usage) / len(s.usage)
                out[f"codebook/{key}/perplexity"] = sum(s.perplexity) / len(s.perplexity)
                out[f"codebook/{key}/restarts"] = s.restarts_last_step
        return out

    def evaluate(self, pixels: Optional[torch.Tensor]) -> Optional[dict]:
        """Held-out scores of the current weights (eval mode): {"psnr": dB, "ssim": [0, 1] (None below 11 px),
        "codebook/<name>/usage": fraction of the codes used, mean over depths, "codebook/<name>/perplexity"}
        (codebook keys for discrete families only), means over the images; None without eval images."""
        if pixels is None:
            return None
        counter = CodeCounter(self.model.codebooks) if getattr(self.model, "codebooks", None) else None
        psnr, ssim = [], []
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for chunk in pixels.split(16):
                    reference, recon = to_uint8(chunk), to_uint8(self.model.reconstruct(chunk))
                    psnr.append(psnr_uint8(reference, recon))
                    if min(chunk.shape[-2:]) >= SSIM_WINDOW:
                        ssim.append(ssim_uint8(reference, recon))
                    if counter is not None:  # the family's own reconstruct may not go through these ids
                        counter.update(self.model.encode(chunk).ids)
        finally:
            self.model.train(was)
        scores = {"psnr": float(torch.cat(psnr).mean()), "ssim": float(torch.cat(ssim).mean()) if ssim else None}
        rows = counter.results() if counter is not None else []
        for name in dict.fromkeys(r.codebook for r in rows):
            depths = [r for r in rows if r.codebook == name and r.depth != "all"]
            scores[f"codebook/{name}/usage"] = sum(r.usage for r in depths) / len(depths)
            scores[f"codebook/{name}/perplexity"] = sum(r.perplexity for r in depths) / len(depths)
        return scores

    def save_images(self, pixels: Optional[torch.Tensor], writer=None) -> None:
        """images/step_<N>.png (and the TensorBoard image "reconstructions"): originals above, reconstructions
        below."""
        if pixels is None or not self.dist.main:
            return
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                grid = torch.cat([pixels, self.model.reconstruct(pixels)], dim=0)
        finally:
            self.model.train(was)
        from torchvision.utils import make_grid

        grid = make_grid(grid.float().clamp(-1, 1), nrow=len(pixels), padding=2, pad_value=1.0)
        (self.out / "images").mkdir(parents=True, exist_ok=True)
        with atomic_path(self.out / "images" / f"step_{self.step}.png") as tmp:
            pixels_to_pil(grid[None])[0].save(tmp, format="PNG")
        if writer is not None:
            writer.add_image("reconstructions", to_uint8(grid), self.step)

    def _write_record(self, writer, record: dict, started: float, *, not_scalars=("step", "time")) -> None:
        """One metrics.jsonl line (with `time`, unix seconds, and `elapsed_s`, seconds since this process began
        training) and its TensorBoard scalars; rank 0 only."""
        now = time.time()
        record = {**record, "time": round(now, 3), "elapsed_s": round(now - started, 2)}
        if not self.dist.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k not in not_scalars and isinstance(v, (int, float)):
                writer.add_scalar(k, v, self.step)

    def _log_eval(self, writer, pixels, started: float) -> Optional[dict]:
        """Evaluate (every rank) and log the scores as `eval/...` keys at this step."""
        scores = self.evaluate(pixels)
        if scores is not None:
            self._write_record(writer, {"step": self.step, **{f"eval/{k}": v for k, v in scores.items()}}, started,
                               not_scalars=("step", "time", "elapsed_s"))
        return scores

    def _log_config(self, writer) -> None:
        """The resolved config as TensorBoard text and hparams (flattened section.key; lists and None as text)."""
        from torch.utils.tensorboard.summary import hparams

        config = self.cfg.to_dict()
        writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", self.step)
        flat = {}
        for section, values in config.items():
            for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
                name = f"{section}.{key}" if key else section
                flat[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        for summary in hparams(flat, {"eval/psnr": 0.0, "eval/ssim": 0.0}):
            writer.file_writer.add_summary(summary)

    def fit(self) -> dict:
        """Train to `train.steps` (and export); the run folder is released at the end, whatever happens."""
        try:
            return self._fit()
        except FloatingPointError as exc:
            latest = latest_checkpoint(self.out)
            raise FloatingPointError(
                f"{exc}. The latest checkpoint is {latest.name if latest else 'none'}: lower optim.lr (or set "
                "optim.grad_clip) and --resume, the new optim settings apply; if that checkpoint's weights are "
                "already damaged, remove it to resume from the one before") from None
        finally:
            self.close()

    def _truncate_logs(self) -> None:
        """A resumed run re-runs the steps after its checkpoint: drop their earlier log lines."""
        metrics = self.out / "metrics.jsonl"
        if not metrics.is_file():
            return
        keep = []
        for line in metrics.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except ValueError:  # a line cut off by a kill
                continue
        with atomic_path(metrics) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))

    def _fit(self) -> dict:
        t = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.main:
            with atomic_path(self.out / CONFIG_NAME) as tmp:
                tmp.write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        eval_pixels, grid_pixels = self._eval_pixels(), self._grid_pixels()
        summary = {"start_step": self.step}
        started = time.time()
        writer = None
        if self.dist.main:
            from torch.utils.tensorboard import SummaryWriter

            if self.step > 0:
                self._truncate_logs()
            # purge_step: TensorBoard drops the events a resumed run is about to write again
            writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step + 1 if self.step else None)
            self._log_config(writer)
        progress = self.progress = None
        last_eval = None
        try:
            if self.step == 0:
                scores = self._log_eval(writer, eval_pixels, started)
                summary["psnr_before"] = scores["psnr"] if scores else None
            batches = iter(self._loader())
            if self.dist.main and not self.quiet:
                progress = self.progress = progress_bar(total=t.steps, initial=self.step, desc="train",
                                                        dynamic_ncols=True)
            while self.step < t.steps:
                logs = self.train_step(batches)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{logs['loss']:.4f}")
                last = self.step == t.steps
                if self.step % t.log_every == 0 or last:
                    logs.update(self._codebook_stats(), step=self.step, skipped_images=self.skipped_total)
                    self._write_record(writer, logs, started)
                if self.step % t.eval_every == 0 or last:
                    last_eval = (self.step, self._log_eval(writer, eval_pixels, started))
                if self.step % t.image_every == 0 or last:
                    self.save_images(grid_pixels, writer)
                if self.step % t.save_every == 0 or last:
                    self.save()
        finally:
            if progress is not None:
                progress.close()
            if writer is not None:
                writer.close()
        scores = last_eval[1] if last_eval and last_eval[0] == self.step else self.evaluate(eval_pixels)
        summary.update(steps=self.step, seconds=round(time.time() - started, 1), skipped_images=self.skipped_total,
                       psnr_after=scores["psnr"] if scores else None)
        if t.export and self.dist.main:
            # psnr_after scores the trained weights, not their EMA: recorded only for what it measured
            held_out = self._held_out_metrics(scores, eval_pixels) if self.ema is None else None
            summary["export"] = str(export_run(self.out, self.out / "export", ema=self.ema is not None,
                                               log=self.log, metrics=held_out))
        return summary


    def _held_out_metrics(self, scores: Optional[dict], pixels: Optional[torch.Tensor]) -> Optional[dict]:
        """The model card's held-out metrics: what was scored (source, image count), PSNR (dB) and SSIM."""
        if not scores:
            return None
        metrics = {"heldout_data": f"{self.cfg.data.eval_source} ({len(pixels)} images)",
                   "heldout_psnr": scores["psnr"]}
        if scores.get("ssim") is not None:
            metrics["heldout_ssim"] = scores["ssim"]
        return metrics


# ---------------------------------------------------------------------------------------------- export
def export_run(run_dir: str | os.PathLike, dst: str | os.PathLike, *, step: Optional[int] = None,
               ema: bool = False, log=None, metrics: Optional[dict] = None) -> Path:
    """A run's checkpoint (latest or `step`) -> a release directory for inference (the family's
    training-only parts, e.g. DualToken's teacher, left out). The release's config.json and model card
    record the steps, the training data and batch size, and `metrics` (held-out scores of these weights).
    Without `step`, an unreadable latest checkpoint (e.g. truncated) falls back to the newest readable one,
    said through `log`."""
    from .config import build_config

    log = log or logger.info
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run directory (no {CONFIG_NAME})")
    _refuse_export_into_run(run_dir, Path(dst))
    cfg = build_config(json.loads((run_dir / CONFIG_NAME).read_text()))
    if step is not None:
        path = run_dir / f"step_{step}"
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint step_{step} under {run_dir}")
        try:
            state = _export_state(path, ema)
        except UnreadableCheckpointError as exc:
            raise ValueError(f"checkpoint step_{step} of {run_dir} cannot be exported: {exc}") from None
    else:
        candidates = [p for _, p in reversed(list_checkpoints(run_dir))]
        if not candidates:
            raise FileNotFoundError(f"no checkpoint under {run_dir}")
        path, state = newest_readable(candidates, lambda p: _export_state(p, ema), log=log, context="export")
        if path != candidates[0]:
            log(f"export: using {path.name}, the latest readable checkpoint")
    objective = objective_class(cfg.family)
    cfg.train.grad_checkpointing = False
    model = build_model(cfg, overrides=objective.export_overrides, load_init=False)
    state = {k: v for k, v in state.items() if not k.startswith(objective.export_drop_prefixes)}
    load_state_dict_strict(model, state, target=f"export of {path}")
    steps = int(path.name.split("_")[1])
    training = {"data": cfg.data.source, "steps": steps, "batch_size": cfg.train.batch_size,
                "weights": "ema" if ema else "model"}
    extra = {"trained_steps": steps, "training": training}
    model.save_pretrained(dst, extra={**extra, **({"metrics": metrics} if metrics else {})})
    return Path(dst)


def _export_state(path: Path, ema: bool) -> dict:
    state = read_tensors(path / "model.safetensors")
    if ema:
        if not (path / "ema.safetensors").is_file():
            raise FileNotFoundError(f"{path} holds no EMA weights (train.ema_decay was not set)")
        state.update({k.replace("__", "."): v for k, v in read_tensors(path / "ema.safetensors").items()})
    return state


def _refuse_export_into_run(run_dir: Path, dst: Path) -> None:
    """DST may be RUN/export or anywhere else, but not the run folder itself or its checkpoints and logs."""
    run, out = run_dir.resolve(), dst.resolve()
    inside = run in out.parents and out.relative_to(run).parts[0]
    if out == run or (inside and (inside.startswith("step_") or inside in ("tensorboard", "images"))):
        raise ValueError(f"DST {dst} is the run folder {run_dir} or one of its checkpoints/logs: exporting there "
                         f"would overwrite the run's files; use {run_dir / 'export'} or another directory")
