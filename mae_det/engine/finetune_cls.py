"""Classification with the shared ViT encoder: end-to-end fine-tuning (the MAE recipe), and the config-driven
kNN and linear-probe runs behind ``tools/{finetune_cls,linear_probe,knn_eval}.py``.

Fine-tuning follows the MAE paper's recipe with timm's implementations of the pieces: layer-wise lr decay,
drop path, RandAugment, mixup/cutmix, label smoothing, a global-average-pooling head (mean of the patch tokens,
``fc_norm``, ``head``; the encoder's final norm is dropped as in the official code), AdamW with linear warmup +
half-cosine decay per step. Every run writes ``OUTPUT_DIR/cls_results.json`` and ``run_info.json``.

Resuming is exact at epoch boundaries: all randomness of an epoch (data order, mixup, drop path) is reseeded from
``(SEED, epoch)`` and each sample's augmentation from ``(SEED, epoch, index)``, so a resumed run continues as the
uninterrupted one would have, and ``DATA.NUM_WORKERS`` changes the speed, never the result.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from tqdm import tqdm

from ..checkpoint import (
    CheckpointError, atomic_save, atomic_write_text, load_checkpoint, prune_checkpoints, remove_partial_writes,
)
from ..checkpoint.convert import load_encoder_weights
from ..checkpoint.io import set_aside_earlier_run
from ..config.classification import ConfigError, load_cls_cfg, resolve_vit_arch
from ..data.classification import (
    ClassificationDataError,
    ImageFolderDataset,
    SkipCounter,
    eval_transform,
    train_transform,
)
from ..data.images import ImageLoadError, decoded_image_cache
from ..evaluation.knn import autocast, autocast_dtype, folder_loader, knn_eval_folders, topk_accuracy
from ..evaluation.linear_probe import linear_probe_folders, warmup_cosine_schedule
from ..modeling.vit import LayerNorm6, VisionTransformer
from ..utils.provenance import warn_resumed_config_changes, write_run_info
from ..utils.run_log import run_logging
from ..solver.optim import adamw, build_param_groups
from ..solver.schedule import configured_settings, keep_configured_settings
from .launch import output_dir_lock, requeue, stop_requested
from .compile import compile_in_place, fall_back_to_eager, is_compile_error, is_compiled, resolve_compile, rng_snapshot
from .pretrain import (
    EPOCH_CHECKPOINT, EXIT_BAD_INPUT, EXIT_NON_FINITE, load_error_detail, newest_checkpoint,
    prepare_output_dir, resolve_device, truncate_metrics,
)

logger = logging.getLogger(__name__)

RESULTS_FILE = "cls_results.json"
LAST_CHECKPOINT_FILE = "last_checkpoint"
# What --resume may load (newest_checkpoint's names): a fresh start sets them aside.
RESUMABLE_CHECKPOINT = re.compile(r"checkpoint_\d+(?:_\d+)?\.pth")


class ViTClassifier(VisionTransformer):
    """The shared encoder with a classification head; parameter names are those of official MAE fine-tuned
    checkpoints (encoder keys, ``fc_norm``, ``head``; no ``norm`` with global pooling).

    Args:
        num_classes: head outputs.
        global_pool: mean of the patch tokens -> ``fc_norm`` -> head; otherwise the normalized cls token.
        **vit_kwargs: :class:`VisionTransformer` arguments.
    """

    def __init__(self, num_classes: int, global_pool: bool = True, **vit_kwargs: Any) -> None:
        super().__init__(**vit_kwargs)
        self.global_pool = global_pool
        if global_pool:
            self.norm = nn.Identity()  # fc_norm after pooling takes its place
            self.fc_norm = LayerNorm6(self.embed_dim)
        self.head = nn.Linear(self.embed_dim, num_classes)
        # Near-zero head as in the MAE recipe: the first updates do not wreck the pretrained features.
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_classes) logits."""
        x = self.forward_features(imgs)  # (N, 1+L, D)
        x = self.fc_norm(x[:, 1:].mean(dim=1)) if self.global_pool else x[:, 0]  # (N, D)
        return self.head(x)


# ---- building from a config ------------------------------------------------------------------------------
def vit_kwargs(cfg: CfgNode) -> dict[str, Any]:
    """``VisionTransformer`` keywords for MODEL.* (sizes, image size and input channels)."""
    return resolve_vit_arch(cfg) | {"img_size": cfg.MODEL.IMG_SIZE, "in_chans": input_norm(cfg)[0]}


def input_norm(cfg: CfgNode, log: logging.Logger | None = None) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(in_chans, mean, std)`` of the encoder's input: MODEL.IN_CHANS and DATA.MEAN / STD where set, else what
    MODEL.WEIGHTS' meta records of its pretraining (``in_chans``, ``pixel_mean`` / ``pixel_std``: this project's
    checkpoints and encoder exports), else 3 channels with ImageNet's statistics (official MAE, timm, no weights).

    ``log``: warns there when DATA.MEAN / STD override other statistics the checkpoint records.

    Raises:
        ConfigError: the channel count and the statistics disagree.
    """
    M, D = cfg.MODEL, cfg.DATA
    meta = _weights_meta(cfg)
    recorded = None
    if "pixel_mean" in meta and "pixel_std" in meta:
        recorded = tuple(map(float, meta["pixel_mean"])), tuple(map(float, meta["pixel_std"]))
    if D.MEAN:
        mean, std = tuple(map(float, D.MEAN)), tuple(map(float, D.STD))
        if log is not None and recorded is not None and recorded != (mean, std):
            log.warning("DATA.MEAN / DATA.STD %s / %s differ from the normalization %s was pretrained with, %s / %s",
                        list(mean), list(std), M.WEIGHTS, list(recorded[0]), list(recorded[1]))
    elif recorded is not None:
        mean, std = recorded
    else:
        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    in_chans = M.IN_CHANS or int(meta.get("in_chans") or 0) or len(mean)
    if len(mean) != in_chans or len(std) != in_chans:
        stats = "DATA.MEAN / DATA.STD" if D.MEAN else (f"{M.WEIGHTS}'s meta pixel_mean / pixel_std"
                                                        if recorded is not None else "ImageNet's statistics")
        channels = "MODEL.IN_CHANS" if M.IN_CHANS else f"{M.WEIGHTS}'s meta in_chans"
        raise ConfigError(f"{stats} {list(mean)} / {list(std)}: expected one value per input channel, the encoder "
                          f"takes {in_chans} ({channels}); set DATA.MEAN and DATA.STD to {in_chans} values each")
    return in_chans, mean, std


def init_label(cfg: CfgNode) -> tuple[str, str]:
    """``(init_type, init)`` recorded with the results: the label and the checkpoint path (or "random").

    The label is ``MODEL.INIT_TYPE`` when set; else "random" without weights; else how the checkpoint says its
    encoder was trained (``meta["mode"]`` of this project's encoder exports and pretraining checkpoints: "mae",
    "supervised", the detection configs' names), and "pretrained" for a checkpoint that does not say (official
    MAE, timm). One shared label would put the runs of an MAE and a supervised encoder into one group of
    ``tools/compare_ap.py``.
    """
    if not cfg.MODEL.WEIGHTS:
        return cfg.MODEL.INIT_TYPE or "random", "random"
    if cfg.MODEL.INIT_TYPE:
        return cfg.MODEL.INIT_TYPE, cfg.MODEL.WEIGHTS
    mode = _weights_meta(cfg).get("mode")
    return mode if isinstance(mode, str) and mode else "pretrained", cfg.MODEL.WEIGHTS


def _weights_meta(cfg: CfgNode) -> dict[str, Any]:
    """The ``meta`` dict of MODEL.WEIGHTS (read-only); {} without weights or meta, and for a file that cannot be
    read: loading the encoder reports what is wrong with it."""
    if not cfg.MODEL.WEIGHTS:
        return {}
    try:
        stat = os.stat(cfg.MODEL.WEIGHTS)
    except OSError:
        return {}
    return _checkpoint_meta(cfg.MODEL.WEIGHTS, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _checkpoint_meta(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """Cached per file version: a run reads the label and the input normalization of its results, run_info.json and
    model from the same file (a ViT-L checkpoint takes seconds to read)."""
    try:
        meta = load_checkpoint(path).get("meta")
    except CheckpointError:
        meta = None
    return meta if isinstance(meta, dict) else {}


def build_encoder(cfg: CfgNode, device: torch.device) -> VisionTransformer:
    """The encoder for kNN / linear probing: MODEL sizes, MODEL.WEIGHTS loaded (random init without)."""
    encoder = VisionTransformer(**vit_kwargs(cfg))
    if cfg.MODEL.WEIGHTS:
        load_encoder_weights(encoder, cfg.MODEL.WEIGHTS)
    return encoder.to(device)


def build_classifier(cfg: CfgNode, num_classes: int) -> ViTClassifier:
    """The fine-tuning model: learnable position embedding, drop path, pooling as configured."""
    model = ViTClassifier(
        num_classes, global_pool=cfg.MODEL.GLOBAL_POOL, drop_path_rate=cfg.MODEL.DROP_PATH,
        learnable_pos_embed=True, **vit_kwargs(cfg),
    )
    if cfg.MODEL.WEIGHTS:
        load_encoder_weights(model, cfg.MODEL.WEIGHTS)
    if cfg.MODEL.TRAIN_BLOCKS >= 0:
        freeze_all_but_last_blocks(model, cfg.MODEL.TRAIN_BLOCKS)
    return model


def freeze_all_but_last_blocks(model: ViTClassifier, k: int) -> None:
    """Partial fine-tuning: only the last ``k`` blocks, the final norms (``norm``, ``fc_norm``) and the head keep
    ``requires_grad``; patch and position embeddings, cls token and the earlier blocks are frozen."""
    first = len(model.blocks) - k
    for name, p in model.named_parameters():
        block = int(name.split(".")[1]) if name.startswith("blocks.") else None
        p.requires_grad = block >= first if block is not None else name.startswith(("norm.", "fc_norm.", "head."))


# ---- results --------------------------------------------------------------------------------------------
def write_results(output_dir: str | os.PathLike, results: dict[str, Any], task: str) -> dict[str, Any]:
    """Merges the results of ``task`` ("knn", "linear" or "finetune", the prefix of its keys) into
    ``output_dir/cls_results.json`` and returns the file's content.

    The task's earlier keys (and its published reference) go first, so none of an earlier run survives that this
    one does not write (a top-5 of a run with more classes); results of another initialization in the same folder
    are replaced, never mixed.
    """
    path = Path(output_dir) / RESULTS_FILE
    merged: dict[str, Any] = {}
    if path.is_file():
        try:
            merged = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            logger.warning("%s is unreadable; it is replaced", path)
        if not isinstance(merged, dict) or merged.get("init") != results.get("init"):
            merged = {}
    prefix = f"{task}_"
    merged = {k: v for k, v in merged.items() if not k.startswith(prefix)}
    earlier = merged.get("published", {})
    published = {**{k: v for k, v in earlier.items() if not k.startswith(prefix)}, **results.get("published", {})}
    merged.pop("published", None)
    merged.update(results)
    if published:
        merged["published"] = published
    atomic_write_text(path, json.dumps(merged, indent=2) + "\n")
    return merged


def _start_run(cfg: CfgNode, argv: Sequence[str] | None, extra: dict[str, Any] | None = None) -> Path:
    out = Path(cfg.OUTPUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    _record_run(out, cfg, argv, extra)
    return out


def _record_run(out: Path, cfg: CfgNode, argv: Sequence[str] | None, extra: dict[str, Any] | None) -> None:
    """``config.yaml`` and ``run_info.json`` of this launch (of a resume: once its checkpoint was accepted)."""
    (out / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
    init_type, _ = init_label(cfg)
    write_run_info(out, cfg, seed=cfg.SEED, init_type=init_type, init_checkpoint=cfg.MODEL.WEIGHTS or None,
                   argv=argv, extra=extra)


def _published(cfg: CfgNode, task: str) -> dict[str, Any]:
    """REFERENCE.* under ``"published"``, never as a top-level ``*_top1`` key: tables read those as measured."""
    if not cfg.REFERENCE.PUBLISHED_TOP1:
        return {}
    return {"published": {f"{task}_top1": {"value": cfg.REFERENCE.PUBLISHED_TOP1,
                                           "source": cfg.REFERENCE.SOURCE or "unspecified",
                                           "note": "published for this recipe, not measured by this run"}}}


def _device(cfg: CfgNode) -> torch.device:
    """DEVICE as this process's device; PRECISION fp16 without CUDA is refused before anything runs or is written."""
    device = resolve_device(cfg.DEVICE)
    if cfg.PRECISION == "fp16" and device.type != "cuda":
        raise ConfigError(f"PRECISION fp16 needs a CUDA device, but DEVICE {cfg.DEVICE} runs on {device.type}; use "
                          "PRECISION bf16 or fp32")
    return device


# ---- kNN and linear probe from a config ------------------------------------------------------------------
def run_knn(cfg: CfgNode, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """kNN evaluation of MODEL.WEIGHTS on DATA.TRAIN_ROOT (memory bank) / DATA.VAL_ROOT (queries)."""
    device = _device(cfg)
    _, mean, std = input_norm(cfg, logger)
    out = _start_run(cfg, argv, {"task": "knn"})
    torch.manual_seed(cfg.SEED)
    encoder = build_encoder(cfg, device)
    res = knn_eval_folders(
        encoder, cfg.DATA.TRAIN_ROOT, cfg.DATA.VAL_ROOT, img_size=cfg.MODEL.IMG_SIZE, k=cfg.KNN.K,
        temperature=cfg.KNN.TEMPERATURE, pool=cfg.KNN.POOL, batch_size=cfg.TEST.BATCH_SIZE, device=device,
        num_workers=cfg.DATA.NUM_WORKERS, crop_pct=cfg.DATA.CROP_PCT, mean=mean, std=std, precision=cfg.PRECISION,
        max_bad_fraction=cfg.DATA.MAX_BAD_FRACTION,
    )
    init_type, init = init_label(cfg)
    logger.info("kNN of %s (k %d, T %g, %s pooling): top-1 %.2f %% on %d val images, %d in the bank", init,
                res["k"], res["temperature"], res["pool"], res["knn_top1"], res["num_val"], res["num_train"])
    res = {k if k.startswith("knn_") else f"knn_{k}": v for k, v in res.items()}
    return write_results(out, res | {"init": init, "init_type": init_type}, "knn")


def run_linear_probe(cfg: CfgNode, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Linear probe of the frozen MODEL.WEIGHTS encoder with the LINPROBE recipe."""
    device = _device(cfg)
    _, mean, std = input_norm(cfg, logger)
    out = _start_run(cfg, argv, {"task": "linear_probe"})
    torch.manual_seed(cfg.SEED)
    encoder = build_encoder(cfg, device)
    L = cfg.LINPROBE
    res = linear_probe_folders(
        encoder, cfg.DATA.TRAIN_ROOT, cfg.DATA.VAL_ROOT, img_size=cfg.MODEL.IMG_SIZE, pool=L.POOL,
        augment=L.AUGMENT, epochs=L.EPOCHS, batch_size=L.BATCH_SIZE, base_lr=L.BASE_LR, optimizer=L.OPTIMIZER,
        weight_decay=L.WEIGHT_DECAY, momentum=L.MOMENTUM, warmup_epochs=L.WARMUP_EPOCHS, min_lr=L.MIN_LR,
        crop_pct=cfg.DATA.CROP_PCT, mean=mean, std=std, feature_batch_size=cfg.TEST.BATCH_SIZE, device=device,
        num_workers=cfg.DATA.NUM_WORKERS, precision=cfg.PRECISION, seed=cfg.SEED,
        max_bad_fraction=cfg.DATA.MAX_BAD_FRACTION, cache=decoded_image_cache(cfg.DATA.CACHE_DECODED_MB),
    )
    init_type, init = init_label(cfg)
    logger.info("linear probe of %s (%s pooling, %s, batch %d, lr %.3g, %d epochs): top-1 %.2f %% on %d val images",
                init, res["pool"], res["optimizer"], res["batch_size"], res["lr"], res["epochs"], res["linear_top1"],
                res["num_val"])
    res = {k if k.startswith("linear_") else f"linear_{k}": v for k, v in res.items()}
    return write_results(out, res | {"init": init, "init_type": init_type} | _published(cfg, "linear"), "linear")


# ---- fine-tuning -----------------------------------------------------------------------------------------
def seed_epoch(seed: int, epoch: int) -> int:
    """Reseeds torch, numpy and random for ``epoch``; returns the epoch seed (also the data-order seed)."""
    s = (seed * 1_000_003 + epoch) % (2**31)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    return s


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, dtype: torch.dtype | None, num_classes: int,
             skips: SkipCounter | None = None, progress: bool = True) -> dict[str, float]:
    """Top-1 (and top-5 with >= 10 classes) in percent and the mean cross-entropy over a loader.

    Eager even for a compiled model: eval mode, no-grad and the eval batch size would each recompile it.
    """
    was_training = model.training
    model.eval()
    scores, labels = [], []
    for imgs, y, errors in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        if skips is not None:
            skips.update(len(y), errors)
        if len(y):
            with autocast(device, dtype), _eager(model):
                logits = model(imgs.to(device, non_blocking=True))  # (B, C)
            scores.append(logits.float().cpu())
            labels.append(y)
    model.train(was_training)
    if not labels:
        where = skips.name if skips is not None else "evaluation"
        raise ClassificationDataError(f"{where}: none of the validation images is readable")
    s, y = torch.cat(scores), torch.cat(labels)
    acc = topk_accuracy(s, y)
    out = {"top1": acc[1], "loss": F.cross_entropy(s, y).item()}
    if num_classes >= 10:
        out["top5"] = acc[5]
    return out


def _eager(model: nn.Module) -> contextlib.AbstractContextManager:
    """Runs a compiled model eagerly; torch < 2.6 has no ``set_stance`` and runs it compiled (recompiling it for
    eval mode and the eval batch size)."""
    if is_compiled(model) and hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def _accum_iter(cfg: CfgNode) -> int:
    S = cfg.SOLVER
    return S.EFFECTIVE_BATCH_SIZE // S.BATCH_SIZE if S.EFFECTIVE_BATCH_SIZE else S.ACCUM_ITER


def _last_checkpoint(out: Path) -> Path | None:
    """The checkpoint ``last_checkpoint`` names; without that pointer the newest checkpoint file (see
    :func:`~mae_det.engine.pretrain.newest_checkpoint`); None for a folder without checkpoints."""
    pointer = out / LAST_CHECKPOINT_FILE
    named = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
    if not named:
        newest = newest_checkpoint(out)
        if newest is not None:
            logger.warning("%s is %s: resuming from the newest checkpoint file, %s", pointer,
                           "empty" if pointer.is_file() else "missing", newest.name)
        return newest
    path = out / named
    if not path.is_file():
        raise CheckpointError(f"{pointer} names {path}, which does not exist")
    return path


def _check_resumable(ckpt: dict[str, Any], path: Path, classes: Sequence[str], steps_per_epoch: int) -> None:
    """Refuses a checkpoint whose classes or optimizer steps per epoch differ from this run's: its head would
    not fit, or its lr schedule would continue at another point than the epoch it resumes (an exact resume is
    what --resume promises).

    Raises:
        CheckpointError: one line naming the checkpoint and both values.
    """
    if list(ckpt.get("classes", classes)) != list(classes):
        raise CheckpointError(f"cannot resume from {path}: it was trained on the classes {list(ckpt['classes'])}, "
                              f"DATA.TRAIN_ROOT now has {list(classes)}")
    saved = ckpt.get("steps_per_epoch")  # absent from checkpoints written before it was recorded
    if saved is not None and int(saved) != steps_per_epoch:
        raise CheckpointError(f"cannot resume from {path}: it was trained with {int(saved)} optimizer steps per epoch, "
                              f"the config and data now give {steps_per_epoch} (SOLVER.BATCH_SIZE, accumulation or "
                              f"the number of readable training images changed)")


def _check_epochs(path: Path, epoch: int, history: Sequence[dict[str, Any]], epochs: int,
                  planned: int | None = None) -> None:
    """Refuses a checkpoint that SOLVER.EPOCHS would end without the final evaluation of its own epoch: one past
    SOLVER.EPOCHS, or one at it from inside a longer run (its ``planned`` epochs, recorded since 2026-12-08, else
    known only when the epoch was not evaluated): its results would report SOLVER.EPOCHS for weights trained
    longer, on a schedule that never annealed, or for no evaluation at all.

    Raises:
        ConfigError: one line naming the checkpoint, its epochs, SOLVER.EPOCHS and the value that continues it.
    """
    evaluated = bool(history) and "val_top1" in history[-1]
    if epoch < epochs or (epoch == epochs and evaluated and (planned is None or planned <= epochs)):
        return
    need = max(epoch + (not evaluated), planned or 0)
    raise ConfigError(f"cannot resume from {path}: it holds {epoch} epochs of a longer run than SOLVER.EPOCHS "
                      f"{epochs}; set SOLVER.EPOCHS {need} or more (that run's own, to finish its schedule) to "
                      "continue it")


def _save_checkpoint(out: Path, state: dict[str, Any], epoch: int, keep: int) -> Path:
    path = out / f"checkpoint_{epoch:04d}.pth"
    atomic_save(state, path)
    atomic_write_text(out / LAST_CHECKPOINT_FILE, path.name)
    prune_checkpoints(out, EPOCH_CHECKPOINT, keep, protect=(path.name,))
    return path


def _train_one_epoch(
    model: nn.Module,
    loader,
    opt: torch.optim.Optimizer,
    sched,
    scaler: torch.amp.GradScaler | None,
    mixup: Mixup | None,
    criterion: nn.Module,
    *,
    epoch: int,
    steps: int,
    accum: int,
    device: torch.device,
    dtype: torch.dtype | None,
    clip_grad: float,
    log_period: int,
    metrics_path: Path,
    skips: SkipCounter,
    bar: tqdm,
    compile_unproven: bool = False,
) -> dict[str, float]:
    """``steps`` optimizer steps of ``accum`` iterations each; returns the epoch's record for metrics.jsonl.

    ``compile_unproven``: the model is compiled and has not yet run an optimizer step; a compile error in this
    epoch's first step makes it eager and redoes that step (see :mod:`mae_det.engine.compile`).
    """
    model.train()
    t0, seen, loss_sum = time.perf_counter(), 0, 0.0
    first_step: list[tuple[torch.Tensor, torch.Tensor]] = []  # a compiled first step's inputs, to redo it eagerly

    def forward_backward(imgs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype):
            loss = criterion(model(imgs), targets)
        (scaler.scale(loss / accum) if scaler is not None else loss / accum).backward()
        return loss

    for i, (imgs, labels, errors) in enumerate(loader):
        if i >= steps * accum:
            break
        skips.update(len(labels), errors)
        if mixup is not None and len(labels) % 2:
            imgs, labels = imgs[:-1], labels[:-1]  # mixup pairs samples; a skipped image left an odd batch
        if len(labels):
            imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            targets = labels
            if mixup is not None:
                imgs, targets = mixup(imgs, labels)
            if compile_unproven:
                if not first_step:
                    restore_rng = rng_snapshot()
                first_step.append((imgs, targets))
            try:
                loss = forward_backward(imgs, targets)
            except Exception as e:
                if not (compile_unproven and is_compile_error(e)):
                    raise
                fall_back_to_eager(model, e, logger)
                compile_unproven = False
                opt.zero_grad(set_to_none=True)
                restore_rng()
                loss = [forward_backward(*inputs) for inputs in first_step][-1]
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"fine-tuning loss is {loss.item()} at epoch {epoch + 1}, iteration {i}; the last good "
                    f"checkpoint is intact (lower SOLVER.BASE_LR or use PRECISION fp32)"
                )
            loss_sum += loss.item()
            seen += len(labels)
        if (i + 1) % accum:
            continue
        compile_unproven = False
        first_step.clear()
        if scaler is not None:
            scaler.unscale_(opt)
        if clip_grad > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        lr = max(g["lr"] for g in opt.param_groups)  # the head's; layer decay scales the blocks below it
        sched.step()
        step = epoch * steps + (i + 1) // accum
        bar.set_postfix(loss=f"{loss_sum / (i + 1):.4f}", lr=f"{lr:.3g}", ips=f"{seen / (time.perf_counter() - t0):.1f}")
        bar.update()
        if step % log_period == 0:
            _append_jsonl(metrics_path, {"step": step, "epoch": epoch + (i + 1) / (steps * accum),
                                         "loss": loss_sum / (i + 1), "lr": lr})
        # A submitted job told to stop: its resubmission resumes from the last epoch checkpoint, exactly, since
        # every epoch's randomness comes from (SEED, epoch).
        if stop_requested(step):
            requeue()
    return {"epoch": epoch + 1, "train_loss": loss_sum / (steps * accum),
            "images_per_s": seen / (time.perf_counter() - t0)}


def finetune(cfg: CfgNode, *, resume: bool = False, argv: Sequence[str] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """End-to-end fine-tuning of MODEL.WEIGHTS (or a random init) on DATA.TRAIN_ROOT, evaluated on VAL_ROOT.

    Args:
        cfg: a validated classification config.
        resume: continue from ``OUTPUT_DIR/last_checkpoint`` (a fresh start when there is none).
        argv: command line recorded in run_info.json.

    Returns:
        The content of ``OUTPUT_DIR/cls_results.json``: ``finetune_top1`` (and ``finetune_top5``) of the last
        epoch, ``finetune_top1_best``, ``finetune_epochs``, ``init``, ``init_type``, dataset sizes.
    """
    device = _device(cfg)
    dtype = autocast_dtype(device, cfg.PRECISION)
    out = Path(cfg.OUTPUT_DIR)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        warn_resumed_config_changes(out, cfg, logger)
    S, A = cfg.SOLVER, cfg.AUG
    accum = _accum_iter(cfg)
    _, mean, std = input_norm(cfg, logger)
    cache = decoded_image_cache(cfg.DATA.CACHE_DECODED_MB)  # one budget for both splits
    train_set = ImageFolderDataset(
        cfg.DATA.TRAIN_ROOT, seed=cfg.SEED,
        transform=train_transform(cfg.MODEL.IMG_SIZE, scale=tuple(A.SCALE), hflip=A.HFLIP,
                                  rand_augment=A.RAND_AUGMENT, reprob=A.REPROB, mean=mean, std=std), cache=cache,
    )
    val_set = ImageFolderDataset(cfg.DATA.VAL_ROOT, eval_transform(cfg.MODEL.IMG_SIZE, cfg.DATA.CROP_PCT, mean=mean,
                                                                   std=std),
                                 classes=train_set.classes, cache=cache)
    num_classes = train_set.num_classes
    torch.manual_seed(cfg.SEED)
    # Both folders listed and MODEL.WEIGHTS loaded before the images are verified, which takes an hour on
    # ImageNet: a validation folder with other classes or a checkpoint that does not fit fails at once.
    model = build_classifier(cfg, num_classes).to(device)
    if cfg.DATA.VERIFY_IMAGES:
        train_set.verify(progress, cfg.DATA.MAX_BAD_FRACTION)
        val_set.verify(progress, cfg.DATA.MAX_BAD_FRACTION)
    steps_per_epoch = len(train_set) // (S.BATCH_SIZE * accum)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"SOLVER.BATCH_SIZE {S.BATCH_SIZE} x {accum} accumulated iterations is more than the "
            f"{len(train_set)} training images in {cfg.DATA.TRAIN_ROOT}"
        )
    compiled = resolve_compile(S.COMPILE, device)
    if compiled:
        compile_in_place(model)
    eff_batch = S.BATCH_SIZE * accum
    lr = S.LR or S.BASE_LR * eff_batch / 256
    groups = build_param_groups(model, S.WEIGHT_DECAY, no_decay_names=("pos_embed", "cls_token"),
                                layer_decay=S.LAYER_DECAY if S.LAYER_DECAY < 1 else None, depth=model.depth)
    opt = adamw(groups, lr=lr, betas=tuple(S.BETAS))
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    sched = warmup_cosine_schedule(opt, S.EPOCHS * steps_per_epoch, S.WARMUP_EPOCHS * steps_per_epoch, lr, S.MIN_LR)
    mixup = None
    if A.MIXUP > 0 or A.CUTMIX > 0:
        mixup = Mixup(mixup_alpha=A.MIXUP, cutmix_alpha=A.CUTMIX, prob=A.MIXUP_PROB, switch_prob=A.MIXUP_SWITCH_PROB,
                      mode=A.MIXUP_MODE, label_smoothing=A.LABEL_SMOOTHING, num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif A.LABEL_SMOOTHING > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=A.LABEL_SMOOTHING)
    else:
        criterion = nn.CrossEntropyLoss()

    start_epoch, history = 0, []
    remove_partial_writes(out)
    last = _last_checkpoint(out) if resume else None
    if not resume:
        set_aside_earlier_run(out, lambda name: RESUMABLE_CHECKPOINT.fullmatch(name) is not None, LAST_CHECKPOINT_FILE)
    if last is not None:
        ckpt = load_checkpoint(last)
        _check_resumable(ckpt, last, train_set.classes, steps_per_epoch)
        configured = configured_settings(opt)
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot resume from {last}: it does not match the configured model "
                                  f"({load_error_detail(e)})") from e
        sched.load_state_dict(ckpt["scheduler"])
        keep_configured_settings(opt, sched, configured)
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history = int(ckpt["epoch"]), list(ckpt.get("history", []))
        _check_epochs(last, start_epoch, history, S.EPOCHS, ckpt.get("epochs"))
        logger.info("resumed from %s at epoch %d", last, start_epoch)
    elif resume:
        logger.info("--resume: no checkpoint in %s, starting from scratch", out)
    _record_run(out, cfg, argv, {"task": "finetune"})  # after the checks: a refused resume leaves the old record
    logger.info("fine-tuning %d classes, %d train / %d val images, %d steps/epoch, batch %d x %d, lr %.3g, %s, "
                "compile %s", num_classes, len(train_set), len(val_set), steps_per_epoch, S.BATCH_SIZE, accum, lr,
                f"autocast {dtype}" if dtype else "fp32", compiled)

    val_loader = folder_loader(val_set, cfg.TEST.BATCH_SIZE, cfg.DATA.NUM_WORKERS, device)
    metrics_path = out / "metrics.jsonl"
    # Train records count completed epochs in fractions and epoch records in whole ones: "epoch" orders both.
    truncate_metrics(metrics_path, start_epoch, key="epoch")
    for epoch in range(start_epoch, S.EPOCHS):
        gen = torch.Generator().manual_seed(seed_epoch(cfg.SEED, epoch))
        train_set.set_epoch(epoch)
        loader = folder_loader(train_set, S.BATCH_SIZE, cfg.DATA.NUM_WORKERS, device, shuffle=True, drop_last=True,
                               generator=gen)
        skips = SkipCounter(f"{cfg.DATA.TRAIN_ROOT} (epoch {epoch + 1})", cfg.DATA.MAX_BAD_FRACTION)
        # Closed also when the epoch raises: the tool's error line would otherwise be glued to the bar's.
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{S.EPOCHS}", unit="step",
                  disable=not progress) as bar:
            record = _train_one_epoch(
                model, loader, opt, sched, scaler, mixup, criterion, epoch=epoch, steps=steps_per_epoch,
                accum=accum, device=device, dtype=dtype, clip_grad=S.CLIP_GRAD, log_period=cfg.LOG_PERIOD,
                metrics_path=metrics_path, skips=skips, bar=bar, compile_unproven=compiled and epoch == start_epoch,
            )
        skips.check()
        period = cfg.TEST.EVAL_PERIOD
        if (period and (epoch + 1) % period == 0) or epoch + 1 == S.EPOCHS:
            val_skips = SkipCounter(str(cfg.DATA.VAL_ROOT), cfg.DATA.MAX_BAD_FRACTION)
            ev = evaluate(model, val_loader, device, dtype, num_classes, val_skips, progress)
            val_skips.check()
            if not math.isfinite(ev["loss"]):  # the weights broke in the epoch's last steps: not checkpointed
                raise FloatingPointError(
                    f"validation loss is {ev['loss']} after epoch {epoch + 1}; the last good checkpoint is intact "
                    f"(lower SOLVER.BASE_LR or use PRECISION fp32)"
                )
            record |= {f"val_{k}": v for k, v in ev.items()}
            logger.info("epoch %d: val top-1 %.2f%%%s", epoch + 1, ev["top1"],
                        f", top-5 {ev['top5']:.2f}%" if "top5" in ev else "")
        history.append(record)
        _append_jsonl(metrics_path, record)
        if (epoch + 1) % cfg.CHECKPOINT_PERIOD == 0 or epoch + 1 == S.EPOCHS:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "epoch": epoch + 1, "history": history, "classes": list(train_set.classes),
                     "steps_per_epoch": steps_per_epoch, "epochs": S.EPOCHS}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            _save_checkpoint(out, state, epoch + 1, cfg.CHECKPOINT_KEEP)

    evaluated = [r for r in history if "val_top1" in r]  # the last epoch is always evaluated
    final = evaluated[-1]
    init_type, init = init_label(cfg)
    res = {"finetune_top1": final["val_top1"],
           "finetune_top1_best": max(r["val_top1"] for r in evaluated),
           "finetune_epochs": S.EPOCHS, "init": init, "init_type": init_type, "num_classes": num_classes,
           "num_train": len(train_set), "num_val": len(val_set)}
    if "val_top5" in final:
        res["finetune_top5"] = final["val_top5"]
    return write_results(out, res | _published(cfg, "finetune"), "finetune")


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ---- command-line entry points ---------------------------------------------------------------------------
def _argument_parser(description: str, resume: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config-file", default="", metavar="FILE", help="YAML under configs/classification/")
    if resume:
        parser.add_argument("--resume", action="store_true",
                            help="continue from OUTPUT_DIR/last_checkpoint (fresh start when there is none)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides, e.g. MODEL.WEIGHTS path/to/encoder.pth SOLVER.EPOCHS 10")
    return parser


def _main(task: str, argv: Sequence[str] | None) -> int:
    """Shared body of the three tools; returns the exit code, as ``tools/pretrain.py`` does: 0 ok, 1 another
    failure, 2 bad config, data or checkpoint, 3 a non-finite fine-tuning loss."""
    descriptions = {
        "finetune": "End-to-end classification fine-tuning of a ViT encoder (MAE recipe).",
        "linear_probe": "Linear probe (BatchNorm + linear head) on a frozen ViT encoder.",
        "knn": "Weighted k-NN classification (DINO protocol) with a frozen ViT encoder.",
    }
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _argument_parser(descriptions[task], resume=task == "finetune").parse_args(argv)
    command = [sys.argv[0], *argv]
    try:
        cfg = load_cls_cfg(args.config_file or None, args.opts)
        prepare_output_dir(cfg.OUTPUT_DIR)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        with output_dir_lock(cfg.OUTPUT_DIR, command), run_logging(cfg.OUTPUT_DIR):
            if task == "finetune":
                res = finetune(cfg, resume=args.resume, argv=command)
            elif task == "linear_probe":
                res = run_linear_probe(cfg, argv=command)
            else:
                res = run_knn(cfg, argv=command)
    except (ClassificationDataError, CheckpointError, ConfigError, ImageLoadError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE if isinstance(e, FloatingPointError) else EXIT_BAD_INPUT
    print(json.dumps(res, indent=2))
    print(f"results: {Path(cfg.OUTPUT_DIR) / RESULTS_FILE}")
    return 0


def finetune_main(argv: Sequence[str] | None = None) -> int:
    """``tools/finetune_cls.py --config-file FILE [--resume] [KEY VALUE ...]``."""
    return _main("finetune", argv)


def linear_probe_main(argv: Sequence[str] | None = None) -> int:
    """``tools/linear_probe.py --config-file FILE [KEY VALUE ...]``."""
    return _main("linear_probe", argv)


def knn_main(argv: Sequence[str] | None = None) -> int:
    """``tools/knn_eval.py --config-file FILE [KEY VALUE ...]``."""
    return _main("knn", argv)
