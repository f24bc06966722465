"""Detectron2 training of Mask / Cascade R-CNN and UperNet with the ViT backbone (the yacs path of ``tools/train_net.py``).

:class:`Trainer` is Detectron2's ``DefaultTrainer`` with: AdamW + layer-wise lr decay + ViTDet's weight-decay
exemptions; a step trainer per ``SOLVER.PRECISION`` (fp32 / bf16 autocast on CPU or GPU / fp16 AMPTrainer);
``device_ids=None`` DDP for multi-process CPU training; COCO evaluation of boxes and masks written to
``OUTPUT_DIR/ap_results.json``; on CPU, a vectorized RoIAlign backward (:mod:`mae_det.modeling.roi_align`, bit
for bit torchvision's); a clean stop on a non-finite loss, or before a checkpoint of weights that became non-finite,
that leaves the last (finite) checkpoint untouched;
training images skipped by the mapper (they failed to decode) logged once each and counted as
``data/skipped_images`` in metrics.json; only the newest ``SOLVER.CHECKPOINT_KEEP`` periodic checkpoints kept.
A fresh start moves an earlier run's checkpoints aside (:func:`~mae_det.checkpoint.io.set_aside_earlier_run`), so
that a later ``--resume`` never continues that run; metrics.json and TensorBoard keep only the records up to where
the run starts.
With ``SEEDED_DRAWS`` (the default) the train loader is :mod:`mae_det.data.seeded_loader`'s and every step seeds
the global generators from (SEED, rank, iteration) (:class:`SeededStepsHook`): the worker count changes the speed
only, and ``--resume`` continues the uninterrupted run exactly; without it, Detectron2's loader resumes exactly
where :mod:`mae_det.engine.loader_state` can (one process, 0 workers).

Semantic segmentation (a ``SemanticSegmentor`` meta-architecture) uses the semantic mapper, a test dataset of
``evaluator_type`` "sem_seg" is scored by Detectron2's SemSegEvaluator into ``sem_seg_results.json``, and
``SOLVER.LR_SCHEDULER_NAME`` "WarmupPolyLR" gives mmsegmentation's poly decay.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import weakref
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, create_ddp_model, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, SemSegEvaluator
from detectron2.layers.batch_norm import LayerNorm as ChannelsFirstLayerNorm
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver import build_lr_scheduler as build_d2_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, EventWriter, JSONWriter, TensorboardXWriter
from detectron2.utils.logger import setup_logger
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler
from torch import nn

from ..checkpoint import CheckpointError, atomic_write_text, prune_checkpoints
from ..checkpoint.io import set_aside_earlier_run
from ..checkpoint.detectron2 import (
    FINAL_CHECKPOINT, LAST_CHECKPOINT, PERIODIC_CHECKPOINT, CheckedDetectionCheckpointer, NonFiniteWeightsError,
    ViTDetCheckpointer,
)
from ..config.detection import effective_precision
from ..config.pretrain import ConfigError
from ..data.detection import (
    SKIPPED_IMAGES_KEY, DatasetError, check_num_classes, check_training_sets, first_files, remaining_bad_images,
)
from ..config.vit_backbone import VIT_BACKBONES
from ..data.seeded_loader import SeededBatches, seeded_train_loader_from_config
from ..data.seeding import kept_global_rngs, sample_seed, seed_global_rngs
from ..data.semantic import build_mapper, check_sem_seg_classes, is_semantic, load_label_map
from ..modeling import backbone as _backbone  # noqa: F401  (registers the ViT backbones)
from ..modeling import semantic_seg as _semantic_seg  # noqa: F401  (registers SlidingWindowSegmentor)
from ..modeling import upernet as _upernet  # noqa: F401  (registers UperNetHead)
from ..modeling.roi_align import use_vectorized_roi_align
from ..utils.provenance import write_run_info
from ..solver.optim import adamw, build_param_groups
from ..solver.schedule import configured_settings, keep_configured_settings
from .launch import requeue, stop_requested
from .loader_state import LoaderStateHook
from .compile import compile_in_place, fall_back_to_eager, is_compile_error, rng_snapshot
from .pretrain import truncate_metrics

logger = logging.getLogger(__name__)

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_REL_POS_TABLES = ("attn.rel_pos_h", "attn.rel_pos_w")
RESULT_FILES = ("ap_results.json", "sem_seg_results.json")  # what an evaluation of the first test set writes
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, ChannelsFirstLayerNorm)


class TrainingStopped(RuntimeError):
    """Training cannot go on (a non-finite loss or weights); the one-line message says where and what was kept."""


# ---- optimizer ---------------------------------------------------------------------------------------------
def norm_param_names(model: nn.Module) -> list[str]:
    """Full names of the parameters of every norm layer, channels-first LayerNorm (Detectron2's) included."""
    return [
        f"{mod_name}.{p_name}" if mod_name else p_name
        for mod_name, mod in model.named_modules()
        if isinstance(mod, _NORM_TYPES)
        for p_name, _ in mod.named_parameters(recurse=False)
    ]


def vit_depth(model: nn.Module) -> int:
    """Number of blocks of the ViT encoder at ``backbone.net`` (needed for layer decay)."""
    net = getattr(getattr(model, "backbone", None), "net", None)
    if net is None or not hasattr(net, "depth"):
        raise ValueError("SOLVER.LAYER_DECAY needs a ViT backbone with its encoder at model.backbone.net")
    return int(net.depth)


def det_param_groups(cfg: CfgNode, model: nn.Module) -> list[dict]:
    """AdamW groups from the config: weight-decay exemptions and, with ``SOLVER.LAYER_DECAY``, lr scales.

    Each group's ``lr`` is ``BASE_LR * lr_scale`` so that Detectron2's LRMultiplier, which multiplies every
    group's initial lr by the schedule, keeps the layer-wise ratios.
    """
    S = cfg.SOLVER
    no_decay = list(S.NO_DECAY_NAMES) + (norm_param_names(model) if S.NORM_NO_DECAY else [])
    layer_decay = S.LAYER_DECAY if S.LAYER_DECAY > 0 else None
    groups = build_param_groups(
        model, S.WEIGHT_DECAY, no_decay_names=no_decay, decay_1d=not S.BIAS_NO_DECAY, layer_decay=layer_decay,
        depth=vit_depth(model) if layer_decay else None,
    )
    for g in groups:
        g["lr"] = S.BASE_LR * g["lr_scale"]
    return groups


# ---- step trainers -----------------------------------------------------------------------------------------
class AutocastTrainer(SimpleTrainer):
    """Detectron2's SimpleTrainer step, optionally under ``torch.autocast(device_type, dtype)`` (bf16 on CPU or
    GPU; Detectron2's AMPTrainer asserts CUDA), stopping on a non-finite loss before the backward pass.

    Args:
        dtype: autocast dtype, or None for plain fp32.
        device_type: "cpu" or "cuda".
        compiled: a submodule compiled in place (the backbone): a compile error in the first step makes it eager
            and redoes the step (see :mod:`mae_det.engine.compile`).
    """

    def __init__(self, model: nn.Module, data_loader: Any, optimizer: torch.optim.Optimizer, *,
                 dtype: torch.dtype | None = None, device_type: str = "cpu", compiled: nn.Module | None = None) -> None:
        super().__init__(model, data_loader, optimizer)
        self.dtype = dtype
        self.device_type = device_type
        self.unproven_compiled = compiled

    def run_step(self) -> None:
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        restore_rng = rng_snapshot() if self.unproven_compiled is not None else None
        try:
            loss_dict = self._forward_backward(data)
        except Exception as e:
            if restore_rng is None or not is_compile_error(e):
                raise
            fall_back_to_eager(self.unproven_compiled, e, logger)
            restore_rng()
            loss_dict = self._forward_backward(data)
        self.unproven_compiled = None
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()

    def _forward_backward(self, data: list[dict]) -> dict[str, torch.Tensor]:
        ctx = torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        try:
            with ctx:
                loss_dict = self.model(data)
        except FloatingPointError as e:  # Detectron2's RPN raises it on non-finite proposals
            raise FloatingPointError(f"iteration {self.iter}: {e}") from e
        losses = sum(loss_dict.values())
        if not torch.isfinite(losses):
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in loss_dict.items())
            raise FloatingPointError(f"non-finite loss at iteration {self.iter}: {terms}")
        self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        return loss_dict


def build_step_trainer(cfg: CfgNode, model: nn.Module, data_loader: Any, optimizer: torch.optim.Optimizer) -> SimpleTrainer:
    """AMPTrainer for fp16 (CUDA), else :class:`AutocastTrainer` (fp32, or bf16 autocast); compiles the backbone
    in place first when :func:`backbone_compile_enabled` (with the eager fallback under AutocastTrainer only)."""
    precision = effective_precision(cfg)
    backbone = getattr(model, "module", model).backbone
    compiled = compile_in_place(backbone, dynamic=None) if backbone_compile_enabled(cfg) else None
    if precision == "fp16":
        return AMPTrainer(model, data_loader, optimizer)
    return AutocastTrainer(
        model, data_loader, optimizer, dtype=torch.bfloat16 if precision == "bf16" else None,
        device_type=torch.device(cfg.MODEL.DEVICE).type, compiled=compiled,
    )


def backbone_compile_enabled(cfg: CfgNode) -> bool:
    """``MODEL.VIT.COMPILE``: on, off, or auto = on for CUDA when ``SQUARE_PAD`` fixes the input size."""
    vit = cfg.MODEL.get("VIT")
    if vit is None:
        return False
    if vit.COMPILE == "auto":
        return torch.device(cfg.MODEL.DEVICE).type == "cuda" and vit.SQUARE_PAD > 0
    return vit.COMPILE == "on"


def build_checkpointer(cfg: CfgNode, model: nn.Module, *, save_to_disk: bool | None = None,
                       **checkpointables: Any) -> CheckedDetectionCheckpointer:
    """Checkpointer of OUTPUT_DIR: mae_det's ViTDetCheckpointer (explicit conversion of ``MODEL.WEIGHTS_FORMAT``)
    for the ViT backbone, Detectron2's loading of other backbones' weights (with both: safe loading, atomic saves,
    an unreadable or missing file is a one-line CheckpointError and non-finite weights are never saved).

    Args:
        save_to_disk: None: the main process saves; False: a checkpointer that only loads, which also leaves
            OUTPUT_DIR's partial writes (another process's checkpoint in flight) alone when it resumes.
    """
    if cfg.MODEL.BACKBONE.NAME in VIT_BACKBONES:
        return ViTDetCheckpointer(model, cfg.OUTPUT_DIR, weights_format=cfg.MODEL.WEIGHTS_FORMAT,
                                  save_to_disk=save_to_disk, **checkpointables)
    return CheckedDetectionCheckpointer(model, cfg.OUTPUT_DIR, save_to_disk=save_to_disk, **checkpointables)


def load_trained(cfg: CfgNode, model: nn.Module, purpose: str, *, resume: bool = False, how: str = "") -> dict[str, Any]:
    """Loads the trained weights that ``purpose`` (``--eval-only``, prediction) runs: ``MODEL.WEIGHTS``, or with
    ``resume`` the run's last checkpoint when OUTPUT_DIR has one.

    Weights that were never trained for the task would give a meaningless AP / mIoU file or empty pictures that
    look like a result, so they are refused: no weights at all, or a checkpoint that left parts of the model at their
    initial values (a pretraining checkpoint has no heads; another class count skips them), whatever the
    backbone. Relative-position tables are exempt: they start at zero, which is what a model trained without them
    computes. The loading never removes files of OUTPUT_DIR: a training may still be writing there.

    Args:
        purpose: what the weights are for, named in the errors.
        how: the end of the no-weights error: how this entry point sets them.

    Returns:
        The checkpoint's extra entries (``iteration`` ...).

    Raises:
        ConfigError: no weights to load.
        CheckpointError: the checkpoint cannot be read or does not hold the whole model.
    """
    checkpointer = build_checkpointer(cfg, model, save_to_disk=False)
    if not cfg.MODEL.WEIGHTS and not (resume and checkpointer.has_checkpoint()):
        raise ConfigError(
            f"{purpose} needs trained weights: set MODEL.WEIGHTS (e.g. OUTPUT_DIR/model_final.pth of a training "
            f"run){how}"
        )
    extra = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
    incompatible = checkpointer.last_incompatible
    untrained = sorted({*(k for k in incompatible.missing_keys if not k.endswith(_REL_POS_TABLES)),
                        *(k for k, _, _ in incompatible.incorrect_shapes)})
    if untrained:
        task = "segmentation" if is_semantic(cfg) else "detection"
        raise CheckpointError(
            f"{checkpointer.describe_last_load()} leaves {len(untrained)} tensors of the model untrained (e.g. "
            f"{', '.join(untrained[:3])}): {purpose} needs a trained {task} checkpoint of this config (same MODEL.* "
            "sizes and classes)"
        )
    return extra


# ---- evaluation results ------------------------------------------------------------------------------------
def _json_number(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def write_ap_results(path: str, results: dict, *, dataset: str, iteration: int | None) -> dict:
    """Writes ``{"bbox": {AP...APl}, "segm": {...}, "dataset", "iteration"}`` atomically; undefined APs -> null.

    ``iteration`` is the number of training iterations behind the evaluated weights (null when unknown).
    """
    out: dict[str, Any] = {
        task: {k: _json_number(results[task][k]) for k in AP_KEYS if k in results[task]}
        for task in ("bbox", "segm") if task in results
    }
    out.update(dataset=dataset, iteration=iteration)
    atomic_write_text(path, json.dumps(out, indent=2))
    return out


class SkippedImagesHook(hooks.HookBase):
    """Logs once and counts the training images that the mapper skipped because they failed to decode.

    :meth:`strip` takes the mapper's notes (``SKIPPED_IMAGES_KEY``) off every batch before the model sees it;
    they arrive in the training process whether the mapper ran there or in a loader worker. Every step puts the
    number of distinct skipped files into the storage as ``data/skipped_images`` (hence metrics.json). With
    several processes the notes are gathered every ``period`` steps, so every rank holds the same set. The set
    is checkpointed, so a resumed run keeps counting. More skipped files than ``budget`` (what
    ``DATASETS.MAX_BAD_FRACTION`` leaves after the load check; None: no limit) stop the run with a DatasetError.

    Args:
        period: steps between gathers across processes (``LOG_PERIOD``).
        max_bad_fraction: ``DATASETS.MAX_BAD_FRACTION``, for the message.
    """

    def __init__(self, period: int, max_bad_fraction: float) -> None:
        self.period = period
        self.max_bad_fraction = max_bad_fraction
        self.budget: int | None = None
        self.files: set[str] = set()
        self._new: list[str] = []

    def strip(self, loader: Iterable[list[dict]]) -> Iterator[list[dict]]:
        for batch in loader:
            for d in batch:
                self._new.extend(d.pop(SKIPPED_IMAGES_KEY, ()))
            yield batch

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if comm.get_world_size() == 1:
            self._record(self._new)
        elif done % self.period == 0 or done == self.trainer.max_iter:
            self._record([line for lines in comm.all_gather(self._new) for line in lines])
        self.trainer.storage.put_scalar("data/skipped_images", len(self.files), smoothing_hint=False)

    def _record(self, lines: list[str]) -> None:
        self._new = []
        for line in lines:
            if line not in self.files:
                self.files.add(line)
                logger.warning("skipped a training image that failed to decode (counted in data/skipped_images): %s",
                               line)
        if self.budget is not None and len(self.files) > self.budget:
            raise DatasetError(
                f"{len(self.files)} training images failed to decode, more than the {self.budget} that "
                f"DATASETS.MAX_BAD_FRACTION={self.max_bad_fraction} leaves after the load check: "
                f"{first_files(sorted(self.files))}"
            )

    def state_dict(self) -> dict:
        return {"files": sorted(self.files)} if self.files else {}

    def load_state_dict(self, state: dict) -> None:
        self.files = set(state["files"])


SEM_SEG_KEYS = ("mIoU", "fwIoU", "mACC", "pACC")


def write_sem_seg_results(path: str, results: dict, *, dataset: str, iteration: int | None) -> dict:
    """Writes ``{"sem_seg": {mIoU, fwIoU, mACC, pACC, "IoU": {class: IoU}}, "dataset", "iteration"}`` atomically
    (values in %; a class absent from both labels and predictions has IoU null)."""
    res = results["sem_seg"]
    out = {
        "sem_seg": {
            **{k: _json_number(res[k]) for k in SEM_SEG_KEYS},
            "IoU": {k[len("IoU-"):]: _json_number(v) for k, v in res.items() if k.startswith("IoU-")},
        },
        "dataset": dataset, "iteration": iteration,
    }
    atomic_write_text(path, json.dumps(out, indent=2))
    return out


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Detectron2's schedules plus "WarmupPolyLR" (mmsegmentation's poly decay: ``(1 - t / T) ** POLY_LR_POWER``
    after Detectron2's warmup of ``WARMUP_ITERS``)."""
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupPolyLR":
        return build_d2_lr_scheduler(cfg, optimizer)
    S = cfg.SOLVER
    sched = WarmupParamScheduler(
        PolynomialDecayParamScheduler(1.0, S.POLY_LR_POWER), S.WARMUP_FACTOR, min(S.WARMUP_ITERS / S.MAX_ITER, 1.0),
        S.WARMUP_METHOD, S.RESCALE_INTERVAL,
    )
    return LRMultiplier(optimizer, multiplier=sched, max_iter=S.MAX_ITER)


class _EvalHook(hooks.EvalHook):
    """EvalHook whose final evaluation runs only when training completed (Detectron2's also runs it after a
    failure in the last iteration), and that redoes a periodic evaluation a kill interrupted: a run resumed from the
    checkpoint of an evaluation's iteration first evaluates it, unless OUTPUT_DIR's result file already holds it."""

    def before_train(self) -> None:
        t = self.trainer
        done = t.start_iter
        if not (self._period > 0 and 0 < done < t.max_iter and done % self._period == 0) or _evaluated(t.cfg, done):
            return
        logger.info("resumed at the evaluation of iteration %d, which the earlier run did not finish: evaluating", done)
        t.iter = t.storage.iter = done - 1  # what the evaluation after that step saw, and where it recorded
        try:
            self._do_eval()
        finally:
            t.iter = t.storage.iter = done

    def after_train(self) -> None:
        if self.trainer.iter >= self.trainer.max_iter:
            super().after_train()


class _PeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """Detectron2's periodic checkpointer, then only the newest ``keep`` ``model_<iteration>.pth`` kept (0 = all).

    fvcore's own ``max_to_keep`` counts only the files its process saved; this lists ``OUTPUT_DIR`` instead, so the
    checkpoints of an earlier process that ``--resume`` continued, or of a requeue, count too.
    """

    def __init__(self, checkpointer: DetectionCheckpointer, period: int, keep: int) -> None:
        super().__init__(checkpointer, period)
        self.keep = keep

    def after_step(self) -> None:
        super().after_step()
        if self.keep and (self.trainer.iter + 1) % self.period == 0:
            prune_checkpoints(self.checkpointer.save_dir, PERIODIC_CHECKPOINT, self.keep,
                              protect=(os.path.basename(self.checkpointer.get_checkpoint_file()),))


class SeededStepsHook(hooks.HookBase):
    """Seeds python's, numpy's and torch's generators (CPU and CUDA) before every step from (seed, rank,
    iteration), so that the step's drop path and RoI sampling draws do not depend on the steps before it: a run
    resumed at iteration i draws what the uninterrupted run drew there, without RNG state in the checkpoint."""

    # A fourth key keeps these seeds apart from the samples' (seed, rank, position) seeds.
    _STEP_KEY = -1

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def before_step(self) -> None:
        seed_global_rngs(sample_seed(self.seed, comm.get_rank(), self.trainer.iter, self._STEP_KEY))


class _RequeueHook(hooks.HookBase):
    """In a submitted job told to stop (preemption or time limit, see ``launch.stop_requested``): a checkpoint
    after this iteration, so that ``resume_or_load`` restarts at the next one, then the requeue. The checkpoint is
    skipped when the periodic checkpointer (``period``, the hook before this one) just wrote this iteration's.
    """

    def __init__(self, period: int) -> None:
        self.period = period

    def after_step(self) -> None:
        it = self.trainer.iter
        if stop_requested(it):
            if (it + 1) % self.period and it + 1 < self.trainer.max_iter:
                self.trainer.checkpointer.save(f"model_{it:07d}", iteration=it)
            requeue()


def _evaluated(cfg: CfgNode, iteration: int) -> bool:
    """Whether OUTPUT_DIR's result file of the first test set holds the evaluation after ``iteration`` steps."""
    for name in RESULT_FILES:
        try:
            with open(os.path.join(cfg.OUTPUT_DIR, name), encoding="utf-8") as f:
                if json.load(f).get("iteration") == iteration:
                    return True
        except (OSError, ValueError, AttributeError):
            continue  # absent, or cut short by a kill: not evaluated
    return False


def _is_detection_checkpoint(name: str) -> bool:
    """Detectron2's periodic and final checkpoints, what ``--resume`` may load."""
    return name == FINAL_CHECKPOINT or PERIODIC_CHECKPOINT.fullmatch(name) is not None


# ---- trainer -----------------------------------------------------------------------------------------------
class Trainer(DefaultTrainer):
    """DefaultTrainer for the ViT Mask R-CNN configs (see the module docstring)."""

    def __init__(self, cfg: CfgNode) -> None:
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        self.skipped_images = SkippedImagesHook(cfg.LOG_PERIOD, cfg.DATASETS.MAX_BAD_FRACTION)
        self.train_loader = self.build_train_loader(cfg)
        self.loader_state = None if cfg.SEEDED_DRAWS else LoaderStateHook(
            self.train_loader, cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(), cfg.DATALOADER.NUM_WORKERS)
        batches = self.train_loader if self.loader_state is None else self.loader_state.wrap(self.train_loader)
        data_loader = self.skipped_images.strip(batches)
        self.skipped_images.budget = remaining_bad_images(cfg.DATASETS.TRAIN, cfg.DATASETS.MAX_BAD_FRACTION)
        # DistributedDataParallel rejects device_ids for a CPU model; Detectron2 always passes them.
        on_cpu = torch.device(cfg.MODEL.DEVICE).type == "cpu"
        model = create_ddp_model(model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {}))
        self._trainer = build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = build_checkpointer(cfg, model, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self._writer_hook: hooks.PeriodicWriter | None = None
        self.register_hooks(self.build_hooks())

    def build_hooks(self) -> list[hooks.HookBase]:
        """Detectron2's hooks, with the evaluation of :class:`_EvalHook`, writers every ``LOG_PERIOD``, the
        :class:`SkippedImagesHook` before anything that checkpoints, and the requeue hook."""
        ret = super().build_hooks()
        for i, h in enumerate(ret):
            if isinstance(h, hooks.EvalHook):
                ret[i] = _EvalHook(self.cfg.TEST.EVAL_PERIOD, self._evaluate)
            elif isinstance(h, hooks.PeriodicWriter):
                # Its writers come in train(), once the run knows where it starts (see build_writers).
                ret[i] = self._writer_hook = hooks.PeriodicWriter([], period=self.cfg.LOG_PERIOD)
            elif isinstance(h, hooks.PeriodicCheckpointer) and self.cfg.SOLVER.CHECKPOINT_KEEP:
                ret[i] = _PeriodicCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD,
                                               self.cfg.SOLVER.CHECKPOINT_KEEP)
        # Right after the periodic checkpointer (main process) or before the evaluation: the scheduler's step is in
        # the checkpoint, and no evaluation eats the signal's grace time; before the writer, which would otherwise
        # log the same iteration twice (Detectron2's metric printer divides by the iterations in between).
        checkpointer = next((i + 1 for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicCheckpointer)), None)
        evaluation = next((i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)), len(ret))
        requeue = _RequeueHook(self.cfg.SOLVER.CHECKPOINT_PERIOD)
        ret.insert(evaluation if checkpointer is None else checkpointer, requeue)
        scheduler = next(i for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler))
        ret.insert(scheduler + 1, self.skipped_images)
        if self.cfg.SEEDED_DRAWS:
            ret.insert(0, SeededStepsHook(self.cfg.SEED))
        else:
            ret.append(self.loader_state)
        return ret

    def resume_or_load(self, resume: bool = True) -> None:
        """Detectron2's, then points the seeded loader at the iteration the run continues from, or restores
        Detectron2's loader where :class:`~mae_det.engine.loader_state.LoaderStateHook` can. The optimizer keeps
        the config's lr, weight decay and betas (see :func:`~mae_det.solver.schedule.keep_configured_settings`).

        A fresh start sets an earlier run's checkpoints aside (:func:`~mae_det.checkpoint.io.set_aside_earlier_run`).
        A resumed run whose checkpoint is the last iteration's writes ``model_final.pth`` when a kill during its write
        left none.

        Raises:
            ConfigError: the checkpoint holds more iterations than ``SOLVER.MAX_ITER``.
        """
        if not resume:
            moved = None
            if comm.is_main_process():
                aside = set_aside_earlier_run(self.cfg.OUTPUT_DIR, _is_detection_checkpoint, LAST_CHECKPOINT)
                name = os.path.basename(self.cfg.MODEL.WEIGHTS)
                if aside is not None and name and not os.path.exists(self.cfg.MODEL.WEIGHTS) \
                        and (aside / name).is_file():  # a new schedule from one of the moved checkpoints
                    moved = str(aside / name)
                    logger.info("MODEL.WEIGHTS: loading %s, where the earlier run's checkpoints were moved", moved)
            moved = comm.all_gather(moved)[0]  # every rank loads the weights from where the main process put them
            if moved is not None:
                self.cfg.defrost()
                self.cfg.MODEL.WEIGHTS = moved
                self.cfg.freeze()
        configured = configured_settings(self.optimizer)
        super().resume_or_load(resume=resume)
        if self.start_iter > self.max_iter:
            raise ConfigError(
                f"cannot resume: {self.checkpointer.get_checkpoint_file()} holds {self.start_iter} iterations, more "
                f"than SOLVER.MAX_ITER {self.max_iter}: set SOLVER.MAX_ITER {self.start_iter} or more to continue it, "
                "or evaluate it with --eval-only"
            )
        if self.start_iter == self.max_iter and not os.path.isfile(os.path.join(self.cfg.OUTPUT_DIR, FINAL_CHECKPOINT)):
            logger.warning("%s holds the last iteration but there is no %s (a kill during its write): writing it",
                           self.checkpointer.get_checkpoint_file(), FINAL_CHECKPOINT)
            self.checkpointer.save(FINAL_CHECKPOINT[:-len(".pth")], iteration=self.max_iter - 1)
        keep_configured_settings(self.optimizer, self.scheduler, configured)
        batches = getattr(self.train_loader, "dataset", None)
        if isinstance(batches, SeededBatches):
            batches.start = self.start_iter
        elif self.start_iter > 0 and not self.loader_state.restore():
            logger.warning(
                "resuming at iteration %d with SEEDED_DRAWS False and no loader state to restore (loader workers, "
                "several processes, an image left in an aspect-ratio bucket, or an older checkpoint): Detectron2's "
                "loader replays its image order and augmentation draws from the beginning, so this run will not end "
                "where an uninterrupted one would (SEEDED_DRAWS True resumes exactly)", self.start_iter)

    def _evaluate(self) -> dict:
        # After a step, self.iter is the finished (0-based) iteration; after the loop it equals max_iter. The test
        # loader draws from the global generators; kept, an evaluation changes no later training draw, so a run
        # resumed from a checkpoint taken just before it continues exactly.
        with kept_global_rngs():
            self._last_eval_results = self.test(self.cfg, self.model, iteration=min(self.iter + 1, self.max_iter))
        return self._last_eval_results

    def build_writers(self) -> list[EventWriter]:
        """None yet: :meth:`train` gives the writer hook :meth:`writers_from_start` once the run knows where it
        starts (Detectron2's writers, built with the hooks, would append to metrics.json whatever it holds)."""
        return []

    def writers_from_start(self) -> list[EventWriter]:
        """Detectron2's writers, for a run that starts at ``start_iter``: the records of metrics.json past it (those
        of the iterations about to be redone, or all of an earlier run on a fresh start) are dropped, and
        TensorBoard hides its events from there (``purge_step``). Main process only."""
        out = self.cfg.OUTPUT_DIR
        os.makedirs(out, exist_ok=True)
        truncate_metrics(os.path.join(out, "metrics.json"), self.start_iter - 1, key="iteration")
        return [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(out, "metrics.json")),
                TensorboardXWriter(out, purge_step=self.start_iter)]

    def train(self) -> dict | None:
        if self._writer_hook is not None:
            self._writer_hook._writers = self.writers_from_start()
        try:
            return super().train()
        except FloatingPointError as e:
            last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else None
            reason = " ".join(str(e).split())
            # A non-finite loss stops before its update; weights that an update made non-finite stop the save.
            kept = "" if isinstance(e, NonFiniteWeightsError) else "no update was made from it; "
            raise TrainingStopped(
                f"training stopped: {reason}; {kept}last good checkpoint: {last or 'none saved yet'}"
            ) from e

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        """Detectron2's, with :class:`~mae_det.modeling.roi_align.ROIAlign` in the RoI poolers of a CPU model: the
        same gradients, bit for bit, in about half the backward time."""
        model = super().build_model(cfg)
        if torch.device(cfg.MODEL.DEVICE).type == "cpu":
            use_vectorized_roi_align(model)
        return model

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        if cfg.SOLVER.OPTIMIZER == "SGD":
            return super().build_optimizer(cfg, model)
        opt = adamw(det_param_groups(cfg, model), lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS),
                    weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        return maybe_add_gradient_clipping(cfg, opt)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        if not cfg.DATASETS.TRAIN:
            raise DatasetError("DATASETS.TRAIN: training needs at least one dataset name, got ()")
        try:
            mapper = build_mapper(cfg, is_train=True)
            if cfg.SEEDED_DRAWS:
                loader = seeded_train_loader_from_config(cfg, mapper)
            else:
                loader = build_detection_train_loader(cfg, mapper=mapper)
        except AssertionError as e:  # Detectron2 asserts when filtering leaves no image to train on
            if "No valid data found" not in str(e):
                raise
            raise DatasetError(
                f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}: no image with a usable annotation to train on "
                "(every image was filtered: no annotations, or all of them skipped as invalid)"
            ) from e
        if is_semantic(cfg):
            check_sem_seg_classes(cfg, cfg.DATASETS.TRAIN)
        else:
            check_training_sets(cfg)
        return loader

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer: torch.optim.Optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(cfg, dataset_name, mapper=build_mapper(cfg, is_train=False))

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str) -> DatasetEvaluator:
        """By the dataset's ``evaluator_type``: "sem_seg" -> Detectron2's SemSegEvaluator (mIoU, pixel accuracy,
        per-class IoU); otherwise COCO AP of boxes (and masks with MASK_ON) with the official pycocotools code, at
        most ``TEST.DETECTIONS_PER_IMAGE`` detections per image."""
        output_dir = os.path.join(cfg.OUTPUT_DIR, "inference")
        if MetadataCatalog.get(dataset_name).get("evaluator_type") == "sem_seg":
            check_sem_seg_classes(cfg, [dataset_name])
            return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_dir, sem_seg_loading_fn=load_label_map)
        check_num_classes(cfg, [dataset_name], evaluated=True)
        return COCOEvaluator(
            dataset_name, tasks=("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",), distributed=True,
            output_dir=os.path.join(cfg.OUTPUT_DIR, "inference"), max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            use_fast_impl=False, allow_cached_coco=False,
        )

    @classmethod
    def test(cls, cfg: CfgNode, model: nn.Module, evaluators=None, iteration: int | None = None) -> dict:
        """Detectron2's evaluation, then (main process) ``ap_results.json`` (COCO) or ``sem_seg_results.json``
        (semantic) for the first test dataset and ``<stem>_<name>.json`` for every further one."""
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and cfg.DATASETS.TEST:
            # Detectron2 keys the results by dataset name, then returns the only entry's results when there is one
            # entry, which a name listed twice also gives.
            names = list(dict.fromkeys(cfg.DATASETS.TEST))
            per_dataset = results if len(names) > 1 else {names[0]: results}
            for i, (name, res) in enumerate(per_dataset.items()):
                if res:
                    stem, write = ("sem_seg_results", write_sem_seg_results) if "sem_seg" in res else ("ap_results", write_ap_results)
                    filename = f"{stem}.json" if i == 0 else f"{stem}_{name}.json"
                    write(os.path.join(cfg.OUTPUT_DIR, filename), res, dataset=name, iteration=iteration)
        return results


# ---- tool helpers ------------------------------------------------------------------------------------------
EXIT_BAD_INPUT = 2
EXIT_TRAINING_STOPPED = 3


# Set by the process that spawns the ranks: a folder where each failing rank leaves its error line, which the
# spawner prints once (every rank raises the same config error: N ranks printed it N times).
RANK_ERRORS_ENV = "MAE_DET_RANK_ERRORS"


def run_with_exit_codes(fn: Callable[..., Any], *args: Any) -> Any:
    """Calls ``fn(*args)``; a bad config / dataset / checkpoint exits with code 2 and a non-finite loss with
    code 3, each after one ``error:`` line on stderr instead of a traceback (left in ``$MAE_DET_RANK_ERRORS``
    by a spawned rank, for :func:`rank_errors`)."""
    try:
        return fn(*args)
    except (ConfigError, DatasetError, CheckpointError) as e:
        _exit_with_error(e, EXIT_BAD_INPUT)
    except TrainingStopped as e:
        _exit_with_error(e, EXIT_TRAINING_STOPPED)


def _exit_with_error(e: Exception, code: int) -> None:
    folder = os.environ.get(RANK_ERRORS_ENV)
    if folder and comm.get_world_size() > 1:
        atomic_write_text(os.path.join(folder, f"rank{comm.get_rank():05d}"), f"{e}\n")
    else:
        print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(code)


def rank_errors(folder: str) -> list[str]:
    """The distinct error lines the spawned ranks left in ``folder``, in rank order."""
    lines = [open(os.path.join(folder, f), encoding="utf-8").read().strip() for f in sorted(os.listdir(folder))]
    return list(dict.fromkeys(lines))


def completed_iterations(checkpoint_extra: dict) -> int | None:
    """Training iterations behind loaded weights: Detectron2 stores the last finished 0-based ``iteration``."""
    it = checkpoint_extra.get("iteration")
    return int(it) + 1 if it is not None else None


def write_det_run_info(cfg: CfgNode, *, eval_only: bool, argv: Sequence[str] | None = None) -> dict | None:
    """``OUTPUT_DIR/run_info.json`` for a train_net run (main process only).

    An evaluation-only run into a folder that already holds a run_info.json (the training run's) keeps it.
    """
    if os.path.exists(os.path.join(cfg.OUTPUT_DIR, "run_info.json")) and eval_only:
        logger.info("evaluation only: keeping the existing run_info.json of %s", cfg.OUTPUT_DIR)
        return None
    return write_run_info(
        cfg.OUTPUT_DIR, cfg, seed=cfg.SEED, init_type=cfg.MODEL.INIT_TYPE, init_checkpoint=cfg.MODEL.WEIGHTS or None,
        argv=argv, extra={
            "task": "semantic_segmentation" if is_semantic(cfg) else "detection",
            "mode": "eval_only" if eval_only else "train",
            "world_size": comm.get_world_size(),
            "precision": effective_precision(cfg),
            "datasets": {"train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST)},
        },
    )
