"""The pretraining loop behind ``tools/pretrain.py``: MAE (or the supervised baseline) on an image source.

Output directory layout (``cfg.OUTPUT_DIR``)::

    config.yaml                     the resolved config
    run_info.json                   provenance (config hash, seed, git commit, versions, command line)
    log.txt                         the log of rank 0
    metrics.jsonl                   one JSON object per line: {"type": "train"|"epoch", ...}
    events.out.tfevents.*           TensorBoard scalars (train/*, epoch/*, monitor/knn_top1)
    checkpoint_{E:04d}.pth          after E completed epochs, every CHECKPOINT_PERIOD epochs and at the end (all
                                    kept, or the newest CHECKPOINT_KEEP)
    checkpoint_{E:04d}_{S:06d}.pth  E epochs + S optimizer steps (SOLVER.CHECKPOINT_ITER_PERIOD; only the newest kept)
    last_checkpoint                 the file name of the newest complete checkpoint (read by --resume)
    encoder.pth                     the encoder export {"model": encoder state dict, "meta": {...}}

A checkpoint is ``{"model", "optimizer", "scheduler", "scaler", "epoch", "iter", "global_step", "epoch_loss_sum",
"rng", "bad_indices", "bad_files", "config", "meta"}`` holding only tensors, numbers, strings and containers, so it
loads with ``torch.load(weights_only=True)``; ``model`` uses the official MAE key names. The unreadable images are
those of every process, as dataset indices and as paths relative to the data folder; ``meta`` also records the
number of images and a hash of their listing, so a resume on a changed folder is noticed (a warning, or a refusal
when the steps per epoch changed with it) and takes the unreadable files by name (older checkpoints lack these keys
and resume as before).

Non-finite losses: the loss is checked on the host only every LOG_PERIOD steps (and before each checkpoint),
because a check per step would stall an accelerator on every step. In between, a non-finite loss sets a flag on the
device that makes every following AdamW update a no-op (the fused step's ``found_inf``, as with a gradient scaler),
so the weights never take it; the check then stops the run naming the first such step.

Determinism: the data order, crops, flips and mask noise derive from (seed, epoch, sample index) (see
``mae_det.data.pretrain``), and the global torch RNG (drop path) is reseeded from (seed, epoch, iteration, rank)
before every iteration, so a resumed run repeats the uninterrupted one exactly, and a run's result does not depend
on the loader workers, nor, without drop path (``MODEL.DROP_PATH 0``, the MAE recipe's), on the number of processes
(up to float reduction order): drop path draws per (micro-batch, rank) for a whole micro-batch, so another split of
the same global batch draws other masks.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..checkpoint import (
    CheckpointError, atomic_save, atomic_write_text, load_checkpoint, prune_checkpoints, remove_partial_writes,
)
from ..checkpoint.io import set_aside_earlier_run
from ..checkpoint.convert import (
    FORMAT_NAMES, is_mae_decoder_key, load_decoder_state, load_encoder_weights, read_checkpoint,
)
from ..config.pretrain import ConfigError, check_min_lr, load_pretrain_cfg, resolve_arch
from ..data.classification import ClassificationDataError, ImageFolderDataset
from ..data.gpu_decode import EncodedPretrainDataset, collate_encoded, device_batches, workers_normalize
from ..data.images import ImageLoadError, decoded_image_cache
from ..data.pretrain import (
    DataError, GlobalBatchSampler, PretrainDataset, PretrainTransform, build_source, collate_pretrain,
    sample_generator,
)
from ..modeling.mae import MAE_FACTORIES, MaskedAutoencoderViT
from ..modeling.vit import VisionTransformer
from ..solver.optim import adamw, build_param_groups
from ..solver.schedule import build_warmup_cosine_lr, configured_settings, keep_configured_settings
from ..utils import dist as du
from ..utils.precision import auto_precision
from ..utils.provenance import warn_resumed_config_changes, write_run_info
from ..utils.run_log import run_logging
from .compile import compile_in_place, fall_back_to_eager, is_compile_error, resolve_compile
from .launch import (
    check_launch_args, clear_file_store, init_distributed, launched_externally, output_dir_lock, requeue,
    stop_requested, threads_per_process,
)

logger = logging.getLogger("mae_det.pretrain")

ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
LAST_CHECKPOINT = "last_checkpoint"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)(?:_(\d+))?\.pth$")  # checkpoint_EEEE[_SSSSSS].pth
EPOCH_CHECKPOINT = re.compile(r"checkpoint_(\d+)\.pth")  # the epoch checkpoints, which CHECKPOINT_KEEP counts


def newest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest ``checkpoint_EEEE[_SSSSSS].pth`` in ``folder`` by (epoch, step), or None when there is none.

    ``--resume`` falls back to it when the ``last_checkpoint`` pointer is missing (deleted by hand, or a kill
    between a run's first checkpoint and its pointer): starting from scratch instead would overwrite the run's
    checkpoints. Shared with classification fine-tuning, whose checkpoints have the same names.
    """
    found = []
    for p in Path(folder).glob("checkpoint_*.pth"):
        m = _CHECKPOINT_NAME.match(p.name)
        if m and p.is_file():
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return max(found)[1] if found else None


def load_error_detail(e: Exception, limit: int = 200) -> str:
    """The informative line of a ``load_state_dict`` error, shortened: torch's message starts with a header line
    ("Error(s) in loading state_dict for X:") and lists every missing key on the next."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    line = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    return line if len(line) <= limit else line[:limit] + " ..."


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Creates OUTPUT_DIR and writes a file in it, so that an unusable folder fails before any data is read.

    Raises:
        ConfigError: one line naming the folder, when it is a file, lies under a file, or cannot be created or
            written (permissions, a read-only file system).
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUTPUT_DIR: {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"OUTPUT_DIR: cannot create or write files in {out} ({e.strerror or e})") from e
    return out


def truncate_metrics(path: str | os.PathLike, last: float, key: str = "step") -> None:
    """Rewrites a ``metrics.jsonl`` atomically with only its complete records whose ``key`` is at most ``last``.

    A run calls it once it knows where it starts: the records past its checkpoint are about to be redone (a resume)
    or belong to an earlier run in the folder (a fresh start, ``last`` 0), and a line cut short by a kill would
    otherwise have the next record appended onto it. Shared with classification fine-tuning.

    Args:
        path: the metrics file; nothing happens when it does not exist.
        last: the checkpoint's position, in the unit of ``key``.
        key: the field that orders the records ("step", or "epoch" in completed epochs).
    """
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            position = json.loads(line)[key]
        except (json.JSONDecodeError, TypeError, KeyError):
            continue  # a line cut short by a kill, or no record of a run
        if isinstance(position, (int, float)) and position <= last:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class PretrainError(RuntimeError):
    """Pretraining stopped; the message says why (one line)."""


class NonFiniteLossError(PretrainError):
    """The loss (or a parameter) became NaN or infinite; nothing non-finite was applied or saved."""


# ---- model -----------------------------------------------------------------------------------------------
class SupervisedViT(VisionTransformer):
    """The supervised-pretraining baseline: the MAE encoder plus a linear head on image-level labels - which
    classes are present (multi-label BCE) or, with ``max_count > 0``, how many instances of each (a softmax over
    0..max_count per class, the last bin meaning "max_count or more").

    Its encoder keys (and fixed sin-cos position embedding) are exactly those of the MAE model, so both encoder
    exports load into the detection backbone the same way; the head is ``head.*``.
    """

    def __init__(self, num_classes: int, pool: str = "mean", max_count: int = 0, **vit_kwargs: Any) -> None:
        super().__init__(**vit_kwargs)
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool, self.num_classes, self.max_count = pool, num_classes, max_count
        self.head = nn.Linear(self.embed_dim, num_classes * (max_count + 1 if max_count else 1))
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, logits): BCE and (N, K) for presence targets; for count targets (N, K) the cross-entropy
        averaged over samples and classes and (N, K, max_count + 1)."""
        logits = self.head(self.pooled_features(imgs, self.pool)).float()  # (N, K) or (N, K * (C + 1))
        if not self.max_count:
            return F.binary_cross_entropy_with_logits(logits, targets.float()), logits
        logits = logits.view(len(imgs), self.num_classes, self.max_count + 1)  # (N, K, C + 1)
        bins = targets.round().long().clamp_(0, self.max_count)  # (N, K)
        return F.cross_entropy(logits.flatten(0, 1), bins.flatten()), logits


def build_pretrain_model(cfg, num_classes: int = 0) -> nn.Module:
    """MAE model of ``MODEL.ARCH`` (with the MODEL.* size overrides), or :class:`SupervisedViT` of the same encoder."""
    arch = resolve_arch(cfg)
    common = dict(
        img_size=cfg.MODEL.IMG_SIZE, in_chans=cfg.MODEL.IN_CHANS, drop_path_rate=cfg.MODEL.DROP_PATH,
        use_act_checkpoint=cfg.MODEL.ACT_CHECKPOINT, patch_size=arch["patch_size"], embed_dim=arch["embed_dim"],
        depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"], init=cfg.MODEL.INIT,
    )
    if cfg.MODEL.MODE == "mae":
        return MAE_FACTORIES[cfg.MODEL.ARCH](
            norm_pix_loss=cfg.MODEL.NORM_PIX_LOSS, decoder_embed_dim=arch["decoder_embed_dim"],
            decoder_depth=arch["decoder_depth"], decoder_num_heads=arch["decoder_num_heads"], **common,
        )
    if num_classes < 1:
        raise ConfigError("MODEL.MODE supervised needs at least one class (MODEL.NUM_CLASSES or labeled data)")
    return SupervisedViT(num_classes, cfg.MODEL.POOL, cfg.MODEL.MAX_COUNT, **common)


def model_meta(cfg, num_classes: int = 0) -> dict[str, Any]:
    """What a consumer needs to rebuild the encoder of a checkpoint or export."""
    arch = resolve_arch(cfg)
    return {
        "model": cfg.MODEL.ARCH, "mode": cfg.MODEL.MODE, "img_size": cfg.MODEL.IMG_SIZE,
        "in_chans": cfg.MODEL.IN_CHANS, "norm_pix_loss": cfg.MODEL.NORM_PIX_LOSS, "num_classes": num_classes,
        **{k: arch[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "decoder_embed_dim",
                                "decoder_depth", "decoder_num_heads")},
        "pixel_mean": list(cfg.DATA.MEAN), "pixel_std": list(cfg.DATA.STD),
    }


def encoder_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder entries (``cls_token``, ``pos_embed``, ``patch_embed.*``, ``blocks.*``, ``norm.*``) of a
    full MAE or supervised state dict, as a new dict."""
    return {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}


def export_encoder(state: dict[str, torch.Tensor], meta: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes ``{"model": encoder state dict, "meta": meta}`` atomically (what detection fine-tuning loads)."""
    atomic_save({"model": {k: v.detach().cpu().clone() for k, v in encoder_state_dict(state).items()},
                 "meta": dict(meta)}, path)


def load_initial_weights(model: VisionTransformer, path: str | os.PathLike) -> dict[str, Any]:
    """``MODEL.WEIGHTS``: starts a pretraining run from a checkpoint instead of random init, e.g. continued MAE
    pretraining of the official ImageNet weights on a user's own images, or a supervised run from an MAE encoder.

    The encoder comes from any format :func:`~mae_det.checkpoint.convert.load_encoder_weights` reads; an MAE model
    also takes the checkpoint's decoder and mask token when it has them (else they keep their random init, which
    is logged). Frozen parameters (the fixed sin-cos position tables) keep the model's own values: they are exact
    for its grid, where a checkpoint's would be resampled. A supervised model's head stays random.

    Returns:
        The encoder loader's info plus ``decoder``: "loaded", "random" or "-" (not an MAE model).

    Raises:
        CheckpointError: naming the file and key, when the encoder or a present decoder does not fit the model.
    """
    ckpt = read_checkpoint(path)
    fixed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    info = load_encoder_weights(model, ckpt, source=str(path))
    decoder = "-"
    if isinstance(model, MaskedAutoencoderViT):
        state = model.state_dict()
        theirs = {k: v for k, v in load_decoder_state(ckpt, source=str(path)).items() if k not in fixed}
        ours = {k for k in state if is_mae_decoder_key(k)} - fixed.keys()
        if not theirs:
            logger.info("%s has no MAE decoder: the decoder starts from random init", path)
            decoder = "random"
        else:
            if theirs.keys() != ours:
                odd = sorted(theirs.keys() ^ ours)
                raise CheckpointError(f"{path}: its MAE decoder does not match the model's ({len(odd)} keys differ, "
                                      f"e.g. '{odd[0]}'; set MODEL.DECODER_DEPTH / DECODER_EMBED_DIM to its size)")
            for k, v in theirs.items():
                if v.shape != state[k].shape:
                    raise CheckpointError(f"{path}: decoder key '{k}' has shape {tuple(v.shape)}, the model's is "
                                          f"{tuple(state[k].shape)} (set MODEL.DECODER_EMBED_DIM / DECODER_NUM_HEADS)")
            model.load_state_dict(theirs, strict=False)
            decoder = "loaded"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in fixed:
                p.copy_(fixed[n])
    logger.info("initial weights: %s (%s; encoder %d blocks, decoder %s)", path, FORMAT_NAMES[info["format"]],
                info["depth"], decoder)
    return info | {"decoder": decoder}


# ---- runtime choices -------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``DEVICE`` ("auto", "cpu", "cuda") as this process's device: its local rank's GPU, or the CPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("DEVICE: cuda requested but no GPU is available")
        return torch.device("cuda", du.get_local_rank())
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the device runs it natively, else fp16 on GPU and fp32 on CPU."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("PRECISION: fp16 needs a GPU (its gradient scaler is CUDA-only); use bf16 or fp32 on CPU")
    return auto_precision(device.type) if precision == "auto" else precision


def resolve_accumulation(cfg, world_size: int) -> tuple[int, int]:
    """(ACCUM_ITER, effective batch) for this number of processes."""
    per_iter = cfg.SOLVER.BATCH_SIZE * world_size
    eff = cfg.SOLVER.EFFECTIVE_BATCH_SIZE
    if eff <= 0:
        return cfg.SOLVER.ACCUM_ITER, per_iter * cfg.SOLVER.ACCUM_ITER
    if eff % per_iter:
        raise ConfigError(
            f"SOLVER.EFFECTIVE_BATCH_SIZE: {eff} is not a multiple of SOLVER.BATCH_SIZE x processes = {per_iter}"
        )
    if cfg.SOLVER.ACCUM_ITER not in (1, eff // per_iter):
        raise ConfigError(
            f"SOLVER.ACCUM_ITER: {cfg.SOLVER.ACCUM_ITER} contradicts SOLVER.EFFECTIVE_BATCH_SIZE {eff} "
            f"(which gives {eff // per_iter} with {world_size} processes); leave it at 1"
        )
    return eff // per_iter, eff


def step_seed(seed: int, epoch: int, iteration: int, rank: int) -> int:
    """Seed of the global torch RNG for one iteration of one rank."""
    return int(torch.randint(0, 2**62, (), generator=sample_generator(seed, epoch, iteration * 4096 + rank)))


# ---- the trainer -----------------------------------------------------------------------------------------
class Pretrainer:
    """One process's share of a pretraining run (construct inside the process group, then :meth:`train`)."""

    def __init__(self, cfg, *, resume: bool = False) -> None:
        self.cfg, self.resume = cfg, resume
        self._restored: bool | None = None
        self.rank, self.world = du.get_rank(), du.get_world_size()
        self.main = self.rank == 0
        self.out = Path(cfg.OUTPUT_DIR)
        self.device = resolve_device(cfg.DEVICE)
        self.precision = resolve_precision(cfg.PRECISION, self.device)
        self.accum, self.eff_batch = resolve_accumulation(cfg, self.world)
        S = cfg.SOLVER  # the peak lr is known only here when it scales with the number of processes
        check_min_lr("SOLVER.MIN_LR", S.MIN_LR, S.LR if S.LR > 0 else S.BASE_LR * self.eff_batch / 256,
                     "SOLVER.LR" if S.LR > 0 else f"SOLVER.BASE_LR x batch {self.eff_batch}/256")
        self.mode = cfg.MODEL.MODE

        src = build_source(cfg.DATA.SOURCE, cfg.DATA.PATH, cfg.DATA.IMAGE_ROOT)
        self.data_root = src.root
        self.images_hash = src.listing_hash()
        self.unlisted = len(src.unlisted)  # folders that could not be listed (each logged by list_images)
        self.num_classes = 0
        if self.mode == "supervised":
            if src.labels is None:
                raise DataError(f"{cfg.DATA.PATH}: supervised mode needs labels (an ImageFolder tree or a COCO json)")
            self.num_classes = cfg.MODEL.NUM_CLASSES or src.num_classes
            if self.num_classes < src.num_classes:
                raise ConfigError(
                    f"MODEL.NUM_CLASSES: {self.num_classes} is fewer than the {src.num_classes} classes of {src.root}"
                )
        self.total_images = len(src.paths) + len(src.missing)
        self.max_bad = int(cfg.DATA.MAX_BAD_FRACTION * self.total_images)
        self.missing = len(src.missing)
        if src.missing:
            logger.warning("%d images listed in %s do not exist, first: %s", len(src.missing), src.root, src.missing[0])
        self._check_bad_budget(0)
        K = cfg.MONITOR.KNN
        if K.ENABLED:
            # The monitor first runs after MONITOR.KNN.PERIOD epochs: a folder it cannot use (no class folders, an
            # empty class, validation classes unknown to the training folder) must fail now, not hours in.
            ImageFolderDataset(K.VAL_ROOT, classes=ImageFolderDataset(K.TRAIN_ROOT).classes)

        arch = resolve_arch(cfg)
        num_patches = (cfg.MODEL.IMG_SIZE // arch["patch_size"]) ** 2 if self.mode == "mae" else 0
        transform = PretrainTransform(cfg.MODEL.IMG_SIZE, cfg.DATA.SCALE, cfg.DATA.RATIO, cfg.DATA.HFLIP,
                                      cfg.DATA.MEAN, cfg.DATA.STD, cfg.DATA.ROT90, cfg.DATA.CHANNEL_SHUFFLE)
        gpu_decode = cfg.DATA.DECODE_DEVICE == "cuda"
        if gpu_decode and self.device.type != "cuda":
            raise ConfigError("DATA.DECODE_DEVICE: cuda decoding needs a GPU, and DEVICE resolved to cpu")
        if gpu_decode and cfg.MODEL.IN_CHANS != 3:
            raise ConfigError(f"DATA.DECODE_DEVICE: cuda decoding gives RGB images, MODEL.IN_CHANS is "
                              f"{cfg.MODEL.IN_CHANS}")
        self.dataset = (EncodedPretrainDataset if gpu_decode else PretrainDataset)(
            src, transform, seed=cfg.SEED, num_patches=num_patches, num_classes=self.num_classes,
            counts=cfg.MODEL.MAX_COUNT > 0,
            max_bad=max(self.max_bad - self.missing, 0), max_pixels=cfg.DATA.MAX_PIXELS,
            normalize=workers_normalize(self.device, gpu_decode), cache=decoded_image_cache(cfg.DATA.CACHE_DECODED_MB),
        )
        self.steps_per_epoch = len(self.dataset) // (cfg.SOLVER.BATCH_SIZE * self.world * self.accum)
        if self.steps_per_epoch < 1:
            raise DataError(
                f"{src.root}: {len(self.dataset)} images are fewer than one optimizer step of {self.eff_batch} "
                f"(SOLVER.BATCH_SIZE x processes x accumulation); lower the batch size"
            )
        self.sampler = GlobalBatchSampler(
            len(self.dataset), cfg.SOLVER.BATCH_SIZE, world_size=self.world, rank=self.rank, seed=cfg.SEED,
            num_batches=self.steps_per_epoch * self.accum,
        )
        workers = cfg.DATA.NUM_WORKERS
        self.loader = DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=workers,
            collate_fn=collate_encoded if gpu_decode else collate_pretrain,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
        )
        self.batches = device_batches(self.loader, transform, self.device, gpu_decode)
        self.cpu_decoded = 0  # DATA.DECODE_DEVICE cuda: images of this process decoded on the CPU after all

        torch.manual_seed(cfg.SEED)  # the initial weights: the same on every rank and in every run
        self.model = build_pretrain_model(cfg, self.num_classes).to(self.device)
        self.meta = model_meta(cfg, self.num_classes)
        no_decay = () if cfg.SOLVER.DECAY_TOKENS else ("cls_token", "mask_token")
        groups = build_param_groups(self.model, cfg.SOLVER.WEIGHT_DECAY, no_decay_names=no_decay)
        self.lr = cfg.SOLVER.LR if cfg.SOLVER.LR > 0 else cfg.SOLVER.BASE_LR * self.eff_batch / 256
        for g in groups:
            g["lr"] = self.lr * g["lr_scale"]
        self.optimizer = adamw(groups, lr=self.lr, betas=tuple(cfg.SOLVER.BETAS))
        self.total_steps = cfg.SOLVER.EPOCHS * self.steps_per_epoch
        warmup = int(round(cfg.SOLVER.WARMUP_EPOCHS * self.steps_per_epoch))
        self.scheduler = build_warmup_cosine_lr(self.optimizer, self.total_steps, warmup, cfg.SOLVER.MIN_LR / self.lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        # 1 once a non-finite loss was seen: the fused AdamW then skips its updates on the device (fp16: the scaler
        # skips them, the loss of every later step being poisoned). See the module docstring.
        self._found_inf = torch.zeros((), device=self.device)
        if self.precision != "fp16":
            self.optimizer.found_inf = self._found_inf
        self._unchecked: list[tuple[int, int, int, float, list[torch.Tensor]]] = []  # steps since the last check
        self._checked_at = (time.perf_counter(), 0)  # (time, global step) of the last check
        self.compiled = resolve_compile(cfg.SOLVER.COMPILE, self.device)
        if self.compiled:
            compile_in_place(self.model)
        self._compile_unproven = self.compiled  # until one optimizer step has run compiled

        self.epoch = 0  # completed epochs
        self.iter = 0  # optimizer steps completed inside the current epoch
        self.global_step = 0
        self.epoch_loss_sum = 0.0  # of the current epoch's steps, so a mid-epoch resume reports the same mean
        self.bad: set[int] = set()
        self.last_good: Path | None = None
        self._rolling: Path | None = None  # the kept mid-epoch checkpoint, deleted when a newer one exists
        self._writer = None

    # ---- bookkeeping ---------------------------------------------------------------------------------
    def _check_bad_budget(self, runtime_bad: int) -> None:
        """Fails once the unreadable + missing images exceed the budget, or no readable image is left."""
        total, bad = self.total_images, runtime_bad + self.missing
        if runtime_bad and runtime_bad >= total - self.missing:
            raise DataError(f"{self.data_root}: none of the {total} images is readable; see the log for the files")
        if bad > self.max_bad:
            raise DataError(
                f"{self.data_root}: {bad} of {total} images are unreadable or missing, more than "
                f"DATA.MAX_BAD_FRACTION={self.cfg.DATA.MAX_BAD_FRACTION} allows ({self.max_bad}); "
                "see the log for the files"
            )

    def _all_bad(self) -> set[int]:
        """The union of every process's unreadable images: a collective, which every rank calls at the same step
        (their skipped images differ, and an image can fail on two of them)."""
        return set().union(*du.all_gather_object(self.bad))

    def _merge_bad(self) -> None:
        """Takes every process's unreadable images into this one's and checks the budget on them all."""
        self.bad = self._all_bad()
        self._check_bad_budget(len(self.bad))  # the ranks' sum: each can stay within it alone

    def _note_bad(self, bad: list[tuple[int, str]]) -> None:
        for index, msg in bad:
            if index not in self.bad:
                self.bad.add(index)
                logger.warning("skipped unreadable image: %s", msg)
        if bad:
            self._check_bad_budget(len(self.bad))

    def _metrics(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        prefix = record["type"]
        for k, v in record.items():
            if k not in ("type", "epoch", "step", "iter", "time") and isinstance(v, (int, float)):
                self._writer.add_scalar(f"monitor/{k}" if k.startswith("knn_") else f"{prefix}/{k}", v, record["step"])

    # ---- checkpoints ---------------------------------------------------------------------------------
    def _bare_model(self) -> nn.Module:
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def checkpoint_state(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self._bare_model().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "iter": self.iter,
            "global_step": self.global_step,
            "epoch_loss_sum": self.epoch_loss_sum,
            "rng": rng,
            "bad_indices": torch.tensor(sorted(self.bad), dtype=torch.long),
            "bad_files": self.dataset.source.relative_names(sorted(self.bad)),
            "config": self.cfg.dump(),
            "meta": dict(self.meta, effective_batch=self.eff_batch, steps_per_epoch=self.steps_per_epoch,
                         num_images=len(self.dataset), images_hash=self.images_hash),
        }

    def save_checkpoint(self) -> Path:
        """Writes the checkpoint and then the ``last_checkpoint`` pointer, both atomically (rank 0 writes; every rank
        calls it, at the same step)."""
        self._merge_bad()  # rank 0 writes them all: a resume from a mid-epoch checkpoint must know them too
        mid_epoch = self.iter > 0
        name = f"checkpoint_{self.epoch:04d}_{self.iter:06d}.pth" if mid_epoch else f"checkpoint_{self.epoch:04d}.pth"
        path = self.out / name
        self._check_losses()
        broken = [n for n, p in self._bare_model().named_parameters() if not torch.isfinite(p).all()]
        if broken:
            raise NonFiniteLossError(
                f"{len(broken)} parameters became non-finite (first: {broken[0]}) at global step {self.global_step}; "
                f"{path} was not written; last good checkpoint: {self.last_good or 'none written yet'}"
            )
        if self.main:
            atomic_save(self.checkpoint_state(), path)
            atomic_write_text(self.out / LAST_CHECKPOINT, name + "\n")
            if self._rolling is not None and self._rolling != path:
                self._rolling.unlink(missing_ok=True)
            self._rolling = path if mid_epoch else None
            logger.info("saved %s", path)
            if not mid_epoch:
                prune_checkpoints(self.out, EPOCH_CHECKPOINT, self.cfg.CHECKPOINT_KEEP, protect=(name,))
        self.last_good = path
        return path

    def restore(self) -> bool:
        """With ``resume``: the checkpoint's state, loaded once (see :meth:`load_last_checkpoint`); whether one was."""
        if self._restored is None:
            self._restored = self.resume and self.load_last_checkpoint()
        return self._restored

    def load_last_checkpoint(self) -> bool:
        """Restores the state named by ``last_checkpoint`` (without that pointer: the newest checkpoint file, see
        :func:`newest_checkpoint`); False when there is no checkpoint at all (a fresh start)."""
        pointer = self.out / LAST_CHECKPOINT
        named = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
        if named:
            path = self.out / named
        else:
            path = newest_checkpoint(self.out)
            if path is None:
                logger.info("no %s in %s: starting from scratch", LAST_CHECKPOINT, self.out)
                return False
            logger.warning("%s is %s: resuming from the newest checkpoint file, %s", pointer,
                           "empty" if pointer.is_file() else "missing", path.name)
        ckpt = load_checkpoint(path)
        meta = ckpt.get("meta", {})
        # Older checkpoints do not record their images: those are taken to be the folder's as it is.
        other_images = meta.get("images_hash", self.images_hash) != self.images_hash
        then, now = meta.get("num_images"), len(self.dataset)
        if (meta.get("effective_batch"), meta.get("steps_per_epoch")) != (self.eff_batch, self.steps_per_epoch):
            trained = f"effective batch {meta.get('effective_batch')} and {meta.get('steps_per_epoch')} steps per epoch"
            if other_images:
                raise CheckpointError(
                    f"cannot resume from {path}: it was trained on {then} images with {trained}; {self.data_root} now "
                    f"lists {now} images, which give {self.eff_batch} and {self.steps_per_epoch}"
                )
            raise CheckpointError(f"cannot resume from {path}: it was trained with {trained}, the config now gives "
                                  f"{self.eff_batch} and {self.steps_per_epoch}")
        if other_images and self.main:
            logger.warning(
                "resuming from %s on other images: it was trained on %d, %s now lists %d (files added, removed, "
                "renamed or reordered); the data order follows the new listing, so the run does not repeat one "
                "on the old images", path, then, self.data_root, now)
        configured = configured_settings(self.optimizer)
        try:
            self._bare_model().load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot resume from {path}: it does not match the configured model "
                                  f"({load_error_detail(e)})") from e
        self.scheduler.load_state_dict(ckpt["scheduler"])
        keep_configured_settings(self.optimizer, self.scheduler, configured)
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.iter, self.global_step = int(ckpt["epoch"]), int(ckpt["iter"]), int(ckpt["global_step"])
        self.epoch_loss_sum = float(ckpt["epoch_loss_sum"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        if "bad_files" in ckpt:  # by name: the indices of a changed folder point at other files
            index = {name: i for i, name in enumerate(self.dataset.source.relative_names())}
            self.bad = {index[name] for name in ckpt["bad_files"] if name in index}
        else:
            self.bad = set(ckpt["bad_indices"].tolist())
        self.last_good = path
        self._rolling = path if self.iter > 0 else None
        logger.info("resumed from %s (epoch %d, step %d of the epoch)", path, self.epoch, self.iter)
        return True

    # ---- steps ---------------------------------------------------------------------------------------
    def _forward(self, batch: dict) -> torch.Tensor:
        imgs = batch["image"].to(self.device, non_blocking=True)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            if self.mode == "mae":
                noise = batch["noise"].to(self.device, non_blocking=True)
                loss, _, _ = self.model(imgs, mask_ratio=self.cfg.MODEL.MASK_RATIO, noise=noise)
            else:
                loss, _ = self.model(imgs, batch["target"].to(self.device, non_blocking=True))
        return loss

    def _micro_step(self, batch: dict, micro: int, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its loss averaged over processes, on the device."""
        torch.manual_seed(step_seed(self.cfg.SEED, self.epoch, micro, self.rank))
        ddp = isinstance(self.model, DistributedDataParallel)
        with self.model.no_sync() if ddp and not sync else nullcontext():
            loss = self._forward(batch)
            if self.precision == "fp16":  # NaN gradients make the scaler skip every step after a non-finite loss
                loss = loss * torch.where(self._found_inf > 0, float("nan"), 1.0)
            self.scaler.scale(loss / self.accum).backward()
        loss = du.all_reduce_mean(loss.detach().float())
        self._found_inf.copy_(torch.where(torch.isfinite(loss), self._found_inf, 1.0))
        return loss

    def _check_losses(self) -> float | None:
        """The host sync: adds the steps since the last check to the epoch's loss sum, or stops the run at the
        first non-finite loss among them. Returns the loss of the newest step (None when there was none)."""
        if not self._unchecked:
            return None
        values = torch.stack([v for *_, losses in self._unchecked for v in losses]).tolist()  # one copy to the host
        step_loss = None
        for n, (epoch, first_micro, step, _, losses) in enumerate(self._unchecked):
            vals, values = values[: len(losses)], values[len(losses):]
            bad = [j for j, v in enumerate(vals) if not math.isfinite(v)]
            if bad:
                later = len(self._unchecked) - n - 1
                where = self.last_good if self.last_good is not None else "none written yet"
                raise NonFiniteLossError(
                    f"loss_{self.mode} = {vals[bad[0]]} at epoch {epoch + 1}, iteration {first_micro + bad[0] + 1} "
                    f"(global step {step + 1}, as metrics.jsonl counts); the weights were not updated with it"
                    + (f" nor in the {later} steps until this check" if later else "")
                    + f"; last good checkpoint: {where}"
                )
            step_loss = sum(vals) / len(vals)
            self.epoch_loss_sum += step_loss
        self._unchecked.clear()
        return step_loss

    def _optimizer_step(self) -> None:
        if self.cfg.SOLVER.CLIP_GRAD > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self._bare_model().parameters(), self.cfg.SOLVER.CLIP_GRAD)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def _knn_monitor(self) -> dict[str, float]:
        """kNN accuracy (%) of the live encoder on MONITOR.KNN's folders (which restores the train mode)."""
        from ..evaluation.knn import knn_eval_folders  # the evaluation package is only needed when enabled

        K = self.cfg.MONITOR.KNN
        result = knn_eval_folders(
            self._bare_model(), K.TRAIN_ROOT, K.VAL_ROOT, img_size=self.cfg.MODEL.IMG_SIZE, k=K.K,
            temperature=K.TEMPERATURE, pool=K.POOL, mean=self.cfg.DATA.MEAN, std=self.cfg.DATA.STD,
            device=self.device, precision=self.precision, progress=self.main,
        )
        return {k: float(v) for k, v in result.items() if k in ("knn_top1", "knn_top5")}

    def _run_epoch(self, pbar_cls) -> float:
        cfg, accum = self.cfg, self.accum
        start_micro = self.iter * accum
        self.sampler.set_epoch(self.epoch, start_micro)
        with pbar_cls(total=self.steps_per_epoch, initial=self.iter, desc=f"epoch {self.epoch + 1}/{cfg.SOLVER.EPOCHS}",
                      unit="step", dynamic_ncols=True, disable=not self.main) as pbar:
            self._pbar = pbar
            step_losses: list[torch.Tensor] = []
            first_step: list[tuple[dict, int, bool]] = []  # a compiled first step's batches, to redo it eagerly
            micro = start_micro
            for batch in self.batches:
                self._note_bad(batch["bad"])
                self.cpu_decoded += batch.get("cpu_decoded", 0)
                sync = (micro + 1) % accum == 0
                if self._compile_unproven:
                    first_step.append((batch, micro, sync))
                try:
                    loss = self._micro_step(batch, micro, sync)
                except Exception as e:
                    if not (self._compile_unproven and is_compile_error(e)):
                        raise
                    fall_back_to_eager(self._bare_model(), e, logger)
                    self._compile_unproven = False
                    self.optimizer.zero_grad(set_to_none=True)
                    self._found_inf.zero_()
                    step_losses = [self._micro_step(b, m, s) for b, m, s in first_step]
                    loss = step_losses.pop()
                step_losses.append(loss)
                micro += 1
                if not sync:
                    continue
                self._compile_unproven = False
                first_step.clear()
                lr = max(g["lr"] for g in self.optimizer.param_groups)
                self._optimizer_step()
                self._unchecked.append((self.epoch, micro - accum, self.global_step, lr, step_losses))
                step_losses = []
                self.iter += 1
                self.global_step += 1
                pbar.update(1)
                self._after_step()
        self._check_losses()
        return self.epoch_loss_sum / max(self.iter, 1)

    def _after_step(self) -> None:
        """Every LOG_PERIOD steps the loss check and the metrics; a mid-epoch checkpoint every
        SOLVER.CHECKPOINT_ITER_PERIOD steps; a checkpoint and a requeue when a submitted job was told to stop
        (preemption or time limit, see ``launch.stop_requested``)."""
        if self.global_step % self.cfg.LOG_PERIOD == 0:
            lr = self._unchecked[-1][3]
            loss = self._check_losses()
            now = time.perf_counter()
            then, step = self._checked_at
            img_s = self.eff_batch * (self.global_step - step) / max(now - then, 1e-9)
            self._checked_at = (now, self.global_step)
            self._pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}", refresh=False)
            self._metrics({
                "type": "train", "epoch": self.epoch + self.iter / self.steps_per_epoch, "step": self.global_step,
                "iter": self.iter, "loss": loss, "lr": lr, "img_per_s": img_s,
                "bad_images": len(self._all_bad()) + self.missing, "time": time.time(),
                **({"cpu_decoded_images": self.cpu_decoded} if self.cfg.DATA.DECODE_DEVICE == "cuda" else {}),
            })
        period = self.cfg.SOLVER.CHECKPOINT_ITER_PERIOD
        if period and self.iter % period == 0 and self.iter < self.steps_per_epoch:
            self.save_checkpoint()
        if stop_requested(self.global_step):
            self.save_checkpoint()
            requeue()

    # ---- driver --------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Runs (or resumes) training to SOLVER.EPOCHS; returns the last epoch record."""
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        cfg = self.cfg
        resumed = self.restore()
        if cfg.MODEL.WEIGHTS and not resumed:  # a resumed run already holds them, trained further
            load_initial_weights(self._bare_model(), cfg.MODEL.WEIGHTS)
        if not self.resume and self.main:  # after the weights: they may be one of the files it moves
            set_aside_earlier_run(self.out, lambda name: _CHECKPOINT_NAME.fullmatch(name) is not None, LAST_CHECKPOINT)
        if self.main:
            remove_partial_writes(self.out)
            truncate_metrics(self.out / "metrics.jsonl", self.global_step)
            # TensorBoard hides the events at steps >= purge_step: those past the checkpoint, as above.
            self._writer = SummaryWriter(log_dir=str(self.out), purge_step=self.global_step + 1)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)
        logger.info(
            "%s pretraining of %s on %d images (%s%s): %d processes, effective batch %d (accumulation %d), "
            "lr %.3g, %d epochs x %d steps, precision %s, device %s, compile %s",
            self.mode, cfg.MODEL.ARCH, len(self.dataset), self.data_root,
            f"; folders that could not be listed: {self.unlisted}" if self.unlisted else "", self.world, self.eff_batch,
            self.accum, self.lr, cfg.SOLVER.EPOCHS, self.steps_per_epoch, self.precision, self.device, self.compiled,
        )
        record: dict[str, Any] = {}
        self._checked_at = (time.perf_counter(), self.global_step)
        self.model.train()
        try:
            while self.epoch < cfg.SOLVER.EPOCHS:
                t0 = time.perf_counter()
                epoch_loss = self._run_epoch(tqdm)
                self._merge_bad()
                self.epoch, self.iter, self.epoch_loss_sum = self.epoch + 1, 0, 0.0
                last = self.epoch == cfg.SOLVER.EPOCHS
                record = {"type": "epoch", "epoch": self.epoch, "step": self.global_step, "loss": epoch_loss,
                          "bad_images": len(self.bad) + self.missing, "epoch_time": time.perf_counter() - t0,
                          "time": time.time()}
                K = cfg.MONITOR.KNN
                if K.ENABLED and (last or self.epoch % K.PERIOD == 0):
                    if self.main:
                        record.update(self._knn_monitor())
                        logger.info("epoch %d: kNN top-1 %.2f %%", self.epoch, record["knn_top1"])
                    du.barrier()
                # The record goes first: a resume from this checkpoint keeps the records up to its step and
                # would never write this one again; a kill before the checkpoint drops it and redoes the epoch.
                self._metrics(record)
                if last or self.epoch % cfg.CHECKPOINT_PERIOD == 0:
                    self.save_checkpoint()
                logger.info("epoch %d/%d done: loss %.4f", self.epoch, cfg.SOLVER.EPOCHS, epoch_loss)
            if self.main:
                export_encoder(self._bare_model().state_dict(), self.meta, self.out / "encoder.pth")
                logger.info("encoder export: %s", self.out / "encoder.pth")
        finally:
            if self._writer is not None:
                self._writer.close()
        return record


def run_pretrain(cfg, resume: bool = False, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains in this process (which may be one rank of a process group); returns the last epoch record."""
    init_distributed("cuda" if cfg.DEVICE != "cpu" and torch.cuda.is_available() else "cpu")
    out = Path(cfg.OUTPUT_DIR)
    rank = du.get_rank()
    if rank == 0:
        prepare_output_dir(out)
    # Other ranks log warnings only, to the console: one log.txt, written by rank 0.
    with output_dir_lock(out, argv or ()) if rank == 0 else nullcontext(), \
            run_logging(out if rank == 0 else None, level=logging.INFO if rank == 0 else logging.WARNING,
                        propagate=False):
        du.barrier()
        if rank == 0 and resume:
            warn_resumed_config_changes(out, cfg, logger)
        trainer = Pretrainer(cfg, resume=resume)
        trainer.restore()  # a refused resume must leave the run's config.yaml and run_info.json as they were
        if rank == 0:
            (out / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
            write_run_info(out, cfg, seed=cfg.SEED, init_type="pretrained" if cfg.MODEL.WEIGHTS else "random",
                           init_checkpoint=cfg.MODEL.WEIGHTS or None, argv=argv,
                           extra={"mode": cfg.MODEL.MODE, "resume": resume, "world_size": du.get_world_size()})
        record = trainer.train()
        du.leave_process_group()
        return record


# ---- command line ----------------------------------------------------------------------------------------
def pretrain_argument_parser() -> argparse.ArgumentParser:
    """Detectron2-style arguments of ``tools/pretrain.py``."""
    p = argparse.ArgumentParser(
        description="MAE (or supervised-baseline) pretraining of a ViT encoder",
        epilog="Examples:\n"
               "  tools/pretrain.py --config-file configs/pretrain/folder_vit_tiny_cpu.yaml DATA.PATH my_images\n"
               "  tools/pretrain.py --config-file configs/pretrain/mae_vit_base_in1k.yaml --num-gpus 8 --resume\n"
               "  torchrun --nproc-per-node 8 tools/pretrain.py --config-file ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config-file", default="", metavar="FILE", help="YAML config (with optional _BASE_)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/last_checkpoint if it exists")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine (GPUs, or CPU processes with gloo)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0, help="this machine's rank")
    p.add_argument("--dist-url", default="auto", help="init URL of the process group, e.g. tcp://host:port")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def _spawned_main(cfg, resume: bool, argv: list[str], threads: int) -> None:
    torch.set_num_threads(threads)
    run_pretrain(cfg, resume=resume, argv=argv)


# Exit codes of tools/pretrain.py (shared with tools/train_net.py): bad input, and a diverged run.
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NON_FINITE = 1, 2, 3
_INPUT_ERRORS = (ConfigError, DataError, CheckpointError, ImageLoadError, ClassificationDataError)


def _exit_code(e: BaseException | str) -> int:
    name = e if isinstance(e, str) else type(e).__name__
    if "NonFiniteLossError" in name:
        return EXIT_NON_FINITE
    if any(cls.__name__ in name for cls in _INPUT_ERRORS):
        return EXIT_BAD_INPUT
    return EXIT_FAILED


def describe_rank_failure(e: Exception) -> tuple[str, int]:
    """One line and an exit code for a rank that raised (its last traceback line) or died (its signal)."""
    import torch.multiprocessing as mp

    if isinstance(e, mp.ProcessExitedException):
        how = f"was killed by {e.signal_name}" if e.signal_name else f"exited with code {e.exit_code}"
        return f"rank {e.error_index} (pid {e.error_pid}) {how}; the other ranks were stopped", EXIT_FAILED
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(e).__name__
    return f"rank {e.error_index} failed: {last}; the other ranks were stopped", _exit_code(last.split(":")[0])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/pretrain.py``.

    Returns:
        0 done; 1 a failure (e.g. a rank died); 2 bad config, data or checkpoint (including a failed checkpoint
        write); 3 stopped on a non-finite loss (the last good checkpoint is kept). Errors are one ``error:`` line.
    """
    import torch.multiprocessing as mp
    from detectron2.engine import launch

    argv = list(sys.argv[1:] if argv is None else argv)
    args = pretrain_argument_parser().parse_args(argv)
    command = [sys.argv[0], *argv]
    try:
        cfg = load_pretrain_cfg(args.config_file or None, args.opts)
        prepare_output_dir(cfg.OUTPUT_DIR)  # here, before processes start: the error is one line, not a rank's
        check_launch_args(args.num_gpus, args.num_machines, args.machine_rank)
        if args.num_machines > 1 and args.dist_url == "auto":
            raise ConfigError("--num-machines > 1 needs --dist-url tcp://<machine 0's address>:<port> (auto picks a "
                              "free port on one machine only)")
        if launched_externally() or args.num_gpus * args.num_machines == 1:
            run_pretrain(cfg, resume=args.resume, argv=command)
        else:
            threads = threads_per_process(args.num_gpus)
            clear_file_store(args.dist_url, args.num_machines)
            launch(_spawned_main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                   dist_url=args.dist_url, args=(cfg, args.resume, command, threads))
    except (PretrainError, *_INPUT_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return _exit_code(e)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        line, code = describe_rank_failure(e)
        # The ranks share this stderr and were stopped mid-epoch: rank 0's progress bar can be left without its
        # newline, which would glue the error to it.
        print(f"\nerror: {line}", file=sys.stderr)
        return code
    return 0
