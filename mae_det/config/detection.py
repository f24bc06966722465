"""Detection configuration: Detectron2's yacs defaults + the ViT backbone keys + the training keys added here.

Keys added by :func:`add_det_train_config` (defaults in brackets)::

    MODEL.INIT_TYPE ["scratch"]      how the backbone starts, recorded in run_info.json and grouped by the comparison
                                     tables: "mae", "supervised", "scratch" or another lower-case label. "scratch"
                                     must have an empty MODEL.WEIGHTS, any other label a non-empty one (training).
    MODEL.ROI_HEADS.CANONICAL_BOX_SIZE [224]  FPN level rule of the RoI poolers: a RoI of size s = sqrt(area) pools
    MODEL.ROI_HEADS.CANONICAL_LEVEL [4]       from level floor(LEVEL + log2(s / BOX_SIZE)), clamped to the
                                     ROI_HEADS.IN_FEATURES levels. Detectron2's constants are the defaults; other
                                     values need ROI_HEADS.NAME "LevelMappedROIHeads" (the only heads that read them)
    SOLVER.OPTIMIZER ["ADAMW"]       "ADAMW" (param groups below) or "SGD" (Detectron2's own builder, unchanged)
    SOLVER.BETAS [(0.9, 0.999)]      AdamW betas
    SOLVER.LAYER_DECAY [0.0]         ViT layer-wise lr decay: group lr = BASE_LR * rate ** (depth + 1 - layer_id);
                                     0 = off. Needs a ViT backbone (encoder at ``backbone.net``).
    SOLVER.NORM_NO_DECAY [True]      no weight decay on any norm layer, including Detectron2's channels-first
                                     LayerNorm in the pyramid and heads (ViTDet's intent; its builder misses those)
    SOLVER.BIAS_NO_DECAY [False]     no weight decay on any 1-D parameter (biases too: MAE/timm fine-tuning style);
                                     False decays biases, as ViTDet does
    SOLVER.NO_DECAY_NAMES [["pos_embed"]]  parameter-name substrings without weight decay (ViTDet: pos_embed)
    SOLVER.PRECISION ["fp32"]        "fp32"; "bf16" (autocast trainer, CPU or GPU); "fp16" (Detectron2's AMPTrainer,
                                     CUDA only); "auto": bf16 where MODEL.DEVICE runs it natively (AVX512-bf16/AMX
                                     CPUs, Ampere+ GPUs), else fp16 on GPU, fp32 on CPU. SOLVER.AMP.ENABLED True with
                                     "fp32" means "fp16", as in Detectron2.
    SOLVER.CHECKPOINT_KEEP [0]       keep only the newest N model_<iteration>.pth of OUTPUT_DIR (0 = keep all, as
                                     Detectron2); older ones, an earlier process's included, are deleted after each
                                     periodic save; model_final.pth is never deleted
    INPUT.LSJ.ENABLED [False]        Large Scale Jitter for training (replaces MIN_SIZE_TRAIN resizing)
    INPUT.LSJ.IMAGE_SIZE [1024]      output side; images are resized to IMAGE_SIZE * U(MIN_SCALE, MAX_SCALE)
    INPUT.LSJ.MIN_SCALE [0.1]        and cropped to at most IMAGE_SIZE x IMAGE_SIZE
    INPUT.LSJ.MAX_SCALE [2.0]
    LOG_PERIOD [20]                  iterations between metrics.json / TensorBoard / console records
    SEEDED_DRAWS [True]              every training image's augmentation drawn from (SEED, rank, its position in
                                     the rank's sample stream) and every step's drop path / RoI sampling from
                                     (SEED, rank, iteration) (mae_det.data.seeded_loader): DATALOADER.NUM_WORKERS
                                     changes the speed, not the result, and --resume continues the uninterrupted
                                     run exactly. False: Detectron2's loader (per-worker generators; a resumed
                                     run continues exactly in one process with 0 workers, mae_det.engine.
                                     loader_state, else replays image order and augmentations from the start)
    DATASETS.REGISTER [[]]           COCO-format datasets to register: a list of [name, json_file, image_root]
                                     (``~`` and ``$VARS`` are expanded; relative paths are relative to the working
                                     directory). Name them in DATASETS.TRAIN / DATASETS.TEST.
    DATASETS.MAX_BAD_FRACTION [0.01] images of a registered training set whose json entry is malformed (or shares
                                     its id) or whose file is missing, unreadable or not the json's height x width
                                     (header check at load) are skipped and counted; above this fraction loading
                                     fails. Test sets allow none (every image is decoded before training starts).

Existing Detectron2 keys keep their meaning; notably ``TEST.DETECTIONS_PER_IMAGE`` is also the COCOeval
max-detections limit, and ``SOLVER.WEIGHT_DECAY_NORM`` only applies to the "SGD" optimizer.
"""
from __future__ import annotations

import argparse
import logging
import os
import re

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..utils.precision import auto_precision
from ..utils.provenance import read_config_text, warn_resumed_config_changes
from .pretrain import ConfigError, key_origin, read_config_chain
from .semantic import add_sem_seg_config, validate_sem_seg_config
from .vit_backbone import VIT_BACKBONES, add_vit_config, validate_vit_config, vit_levels

OPTIMIZERS = ("ADAMW", "SGD")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
RANDOM_FLIPS = ("horizontal", "vertical", "none")
MASK_FORMATS = ("polygon", "bitmask")
CROP_TYPES = ("relative_range", "relative", "absolute", "absolute_range")
SIZE_SAMPLINGS = ("choice", "range")
# Detectron2's convert_PIL_to_numpy formats, each with its channel count (what PIXEL_MEAN / PIXEL_STD must match).
INPUT_FORMATS = {"RGB": 3, "BGR": 3, "YUV-BT.601": 3, "L": 1}
# Detectron2's build_lr_scheduler names plus "WarmupPolyLR" (mae_det.engine.det_trainer.build_lr_scheduler).
LR_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR", "WarmupStepWithFixedGammaLR", "WarmupPolyLR")
WARMUP_METHODS = ("linear", "constant")
# Detectron2's ROIPooler constants (canonical box size, level): what every other RoI heads class uses.
_D2_CANONICAL_RULE = (224, 4)
_INIT_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_UNKNOWN_KEY_RE = re.compile(r"Non-existent (?:config )?key: ([\w.]+)")
_KEY_RE = re.compile(r"(?:Non-existent (?:config )?key|for config key): ([\w.]+)")  # the key yacs refused
# The keys naming backbone levels that each Detectron2 detection meta-architecture reads.
_DETECTOR_LEVEL_KEYS = {
    "GeneralizedRCNN": ("RPN", "ROI_HEADS"), "ProposalNetwork": ("RPN",), "RetinaNet": ("RETINANET",),
}
logger = logging.getLogger(__name__)


def add_det_train_config(cfg: CN) -> None:
    """Adds the detection training keys (documented in the module docstring) to a Detectron2 config."""
    cfg.MODEL.INIT_TYPE = "scratch"
    cfg.MODEL.ROI_HEADS.CANONICAL_BOX_SIZE, cfg.MODEL.ROI_HEADS.CANONICAL_LEVEL = _D2_CANONICAL_RULE

    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BETAS = (0.9, 0.999)
    cfg.SOLVER.LAYER_DECAY = 0.0
    cfg.SOLVER.NORM_NO_DECAY = True
    cfg.SOLVER.BIAS_NO_DECAY = False
    cfg.SOLVER.NO_DECAY_NAMES = ["pos_embed"]
    cfg.SOLVER.PRECISION = "fp32"
    cfg.SOLVER.CHECKPOINT_KEEP = 0

    cfg.INPUT.LSJ = CN()
    cfg.INPUT.LSJ.ENABLED = False
    cfg.INPUT.LSJ.IMAGE_SIZE = 1024
    cfg.INPUT.LSJ.MIN_SCALE = 0.1
    cfg.INPUT.LSJ.MAX_SCALE = 2.0

    cfg.DATASETS.REGISTER = []
    cfg.DATASETS.MAX_BAD_FRACTION = 0.01
    cfg.LOG_PERIOD = 20
    cfg.SEEDED_DRAWS = True


def get_det_cfg() -> CN:
    """Detectron2's ``get_cfg()`` plus :func:`add_vit_config`, :func:`add_det_train_config` and
    :func:`~mae_det.config.semantic.add_sem_seg_config`."""
    cfg = get_cfg()
    add_vit_config(cfg)
    add_det_train_config(cfg)
    add_sem_seg_config(cfg)
    return cfg


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def effective_precision(cfg: CN) -> str:
    """``SOLVER.PRECISION`` with "auto" resolved for MODEL.DEVICE, and Detectron2's ``SOLVER.AMP.ENABLED`` read as
    "fp16" when PRECISION is "fp32"."""
    if cfg.SOLVER.PRECISION == "fp32" and cfg.SOLVER.AMP.ENABLED:
        return "fp16"
    if cfg.SOLVER.PRECISION == "auto":
        return auto_precision(torch.device(cfg.MODEL.DEVICE).type)
    return cfg.SOLVER.PRECISION


def _check_device(cfg: CN) -> None:
    """MODEL.DEVICE must be a torch device of type cpu or cuda, or meta (a model's structure without its weights,
    e.g. to count parameters); torch's own error is a traceback deep in the build."""
    try:
        kind = torch.device(cfg.MODEL.DEVICE).type
    except (RuntimeError, TypeError):
        kind = None
    _check(kind in ("cpu", "cuda", "meta"), f"MODEL.DEVICE: expected cpu or cuda[:N], got {cfg.MODEL.DEVICE!r}")


def _check_registered(cfg: CN) -> None:
    """MODEL.META_ARCHITECTURE and MODEL.BACKBONE.NAME must name registered builders: a typo would otherwise skip the
    checks keyed on them here and fail only when the model is built."""
    from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY

    from ..modeling import backbone, roi_heads, semantic_seg, upernet  # noqa: F401  (register the project's builders)

    M = cfg.MODEL
    for key, name, registry in (("META_ARCHITECTURE", M.META_ARCHITECTURE, META_ARCH_REGISTRY),
                                ("BACKBONE.NAME", M.BACKBONE.NAME, BACKBONE_REGISTRY)):
        _check(name in registry,
               f"MODEL.{key}: {name!r} is not registered; expected one of {sorted(n for n, _ in registry)}")


def _check_input(cfg: CN) -> None:
    """Detectron2's input keys that would fail in the mapper or the model, without naming the key."""
    I, M = cfg.INPUT, cfg.MODEL
    _check(I.RANDOM_FLIP in RANDOM_FLIPS, f"INPUT.RANDOM_FLIP: expected one of {RANDOM_FLIPS}, got {I.RANDOM_FLIP!r}")
    _check(I.MASK_FORMAT in MASK_FORMATS, f"INPUT.MASK_FORMAT: expected one of {MASK_FORMATS}, got {I.MASK_FORMAT!r}")
    _check(I.FORMAT in INPUT_FORMATS, f"INPUT.FORMAT: expected one of {list(INPUT_FORMATS)}, got {I.FORMAT!r}")
    channels = INPUT_FORMATS[I.FORMAT]
    _check(len(M.PIXEL_MEAN) == len(M.PIXEL_STD) == channels,
           f"MODEL.PIXEL_MEAN / PIXEL_STD: expected {channels} values each (INPUT.FORMAT {I.FORMAT}), got "
           f"{len(M.PIXEL_MEAN)} and {len(M.PIXEL_STD)}")
    _check(all(s > 0 for s in M.PIXEL_STD), f"MODEL.PIXEL_STD: expected positive values, got {list(M.PIXEL_STD)}")
    _check(I.MIN_SIZE_TRAIN_SAMPLING in SIZE_SAMPLINGS,
           f"INPUT.MIN_SIZE_TRAIN_SAMPLING: expected one of {SIZE_SAMPLINGS}, got {I.MIN_SIZE_TRAIN_SAMPLING!r}")
    _check(I.MIN_SIZE_TRAIN_SAMPLING != "range" or len(I.MIN_SIZE_TRAIN) == 2,
           f"INPUT.MIN_SIZE_TRAIN: MIN_SIZE_TRAIN_SAMPLING range expects (min, max), got {tuple(I.MIN_SIZE_TRAIN)}")
    _check(not I.CROP.ENABLED or I.CROP.TYPE in CROP_TYPES,
           f"INPUT.CROP.TYPE: expected one of {CROP_TYPES}, got {I.CROP.TYPE!r}")


def validate_det_cfg(cfg: CN, *, training: bool = True) -> None:
    """Checks the keys of this module (and the ViT keys when the ViT backbone is used).

    Args:
        cfg: a config from :func:`get_det_cfg` after merging.
        training: also check what only training needs (INIT_TYPE vs MODEL.WEIGHTS).

    Raises:
        ConfigError: one line naming the key and what was expected.
    """
    S, L = cfg.SOLVER, cfg.INPUT.LSJ
    _check_device(cfg)
    _check_registered(cfg)
    _check(S.OPTIMIZER in OPTIMIZERS, f"SOLVER.OPTIMIZER: expected one of {OPTIMIZERS}, got {S.OPTIMIZER!r}")
    _check(S.PRECISION in PRECISIONS, f"SOLVER.PRECISION: expected one of {PRECISIONS}, got {S.PRECISION!r}")
    _check(S.CHECKPOINT_KEEP >= 0, f"SOLVER.CHECKPOINT_KEEP: expected >= 0 (0 = keep all), got {S.CHECKPOINT_KEEP}")
    _check(len(S.BETAS) == 2 and all(0.0 <= b < 1.0 for b in S.BETAS),
           f"SOLVER.BETAS: expected two values in [0, 1), got {S.BETAS}")
    _check(0.0 <= S.LAYER_DECAY <= 1.0, f"SOLVER.LAYER_DECAY: expected 0 (off) or a rate in (0, 1], got {S.LAYER_DECAY}")
    _check(S.LAYER_DECAY == 0.0 or S.OPTIMIZER == "ADAMW", "SOLVER.LAYER_DECAY: only supported with SOLVER.OPTIMIZER ADAMW")
    _check(S.LAYER_DECAY == 0.0 or cfg.MODEL.BACKBONE.NAME in VIT_BACKBONES,
           f"SOLVER.LAYER_DECAY: {S.LAYER_DECAY} needs a ViT backbone (its blocks give the layer ids), but "
           f"MODEL.BACKBONE.NAME is {cfg.MODEL.BACKBONE.NAME!r}: set SOLVER.LAYER_DECAY 0")
    # Detectron2 would hang (batch 0), divide by zero (period 0) or fail inside fvcore / the optimizer instead.
    _check(S.IMS_PER_BATCH > 0, f"SOLVER.IMS_PER_BATCH: expected > 0, got {S.IMS_PER_BATCH}")
    _check(S.MAX_ITER > 0, f"SOLVER.MAX_ITER: expected > 0, got {S.MAX_ITER}")
    _check(S.CHECKPOINT_PERIOD > 0, f"SOLVER.CHECKPOINT_PERIOD: expected > 0, got {S.CHECKPOINT_PERIOD}")
    _check(S.BASE_LR > 0, f"SOLVER.BASE_LR: expected > 0, got {S.BASE_LR}")
    _check(S.LR_SCHEDULER_NAME in LR_SCHEDULERS,
           f"SOLVER.LR_SCHEDULER_NAME: expected one of {LR_SCHEDULERS}, got {S.LR_SCHEDULER_NAME!r}")
    _check(S.WARMUP_METHOD in WARMUP_METHODS,
           f"SOLVER.WARMUP_METHOD: expected one of {WARMUP_METHODS}, got {S.WARMUP_METHOD!r}")
    _check(cfg.DATALOADER.NUM_WORKERS >= 0, f"DATALOADER.NUM_WORKERS: expected >= 0, got {cfg.DATALOADER.NUM_WORKERS}")
    _check(all(isinstance(n, str) and n for n in S.NO_DECAY_NAMES),
           f"SOLVER.NO_DECAY_NAMES: expected non-empty strings, got {S.NO_DECAY_NAMES}")
    R = cfg.MODEL.ROI_HEADS
    _check(R.CANONICAL_BOX_SIZE > 0, f"MODEL.ROI_HEADS.CANONICAL_BOX_SIZE: expected > 0, got {R.CANONICAL_BOX_SIZE}")
    _check((R.CANONICAL_BOX_SIZE, R.CANONICAL_LEVEL) == _D2_CANONICAL_RULE or R.NAME == "LevelMappedROIHeads",
           f"MODEL.ROI_HEADS.CANONICAL_BOX_SIZE / CANONICAL_LEVEL ({R.CANONICAL_BOX_SIZE}, {R.CANONICAL_LEVEL}) are "
           f"only read by MODEL.ROI_HEADS.NAME LevelMappedROIHeads, got {R.NAME!r}")
    _check(cfg.LOG_PERIOD > 0, f"LOG_PERIOD: expected > 0, got {cfg.LOG_PERIOD}")
    _check(isinstance(cfg.SEEDED_DRAWS, bool), f"SEEDED_DRAWS: expected True or False, got {cfg.SEEDED_DRAWS!r}")
    _check(L.IMAGE_SIZE > 0, f"INPUT.LSJ.IMAGE_SIZE: expected > 0, got {L.IMAGE_SIZE}")
    _check(0.0 < L.MIN_SCALE <= L.MAX_SCALE,
           f"INPUT.LSJ: expected 0 < MIN_SCALE <= MAX_SCALE, got {L.MIN_SCALE}, {L.MAX_SCALE}")
    _check_input(cfg)

    names = set()
    for entry in cfg.DATASETS.REGISTER:
        _check(isinstance(entry, (list, tuple)) and len(entry) == 3 and all(isinstance(x, str) and x for x in entry),
               f"DATASETS.REGISTER: each entry must be [name, json_file, image_root] (non-empty strings), got {entry!r}")
        _check(entry[0] not in names, f"DATASETS.REGISTER: dataset name {entry[0]!r} appears twice")
        names.add(entry[0])
    _check(0.0 <= cfg.DATASETS.MAX_BAD_FRACTION <= 1.0,
           f"DATASETS.MAX_BAD_FRACTION: expected a value in [0, 1], got {cfg.DATASETS.MAX_BAD_FRACTION}")
    for key in ("TRAIN", "TEST"):
        _check(all(isinstance(n, str) and n for n in cfg.DATASETS.get(key)),
               f"DATASETS.{key}: expected dataset names, got {cfg.DATASETS.get(key)}")
        repeated = sorted({n for n in cfg.DATASETS.get(key) if cfg.DATASETS.get(key).count(n) > 1})
        _check(not repeated, f"DATASETS.{key}: {repeated} named more than once")

    init = cfg.MODEL.INIT_TYPE
    _check(bool(_INIT_TYPE_RE.match(init)), f"MODEL.INIT_TYPE: expected a lower-case label like mae/supervised/scratch, got {init!r}")
    if training:
        # Detectron2's warmup ramps toward the schedule's value at its end: the lr would never reach BASE_LR
        # (cosine: 0.001x of it all run), and RESCALE_INTERVAL divides by zero
        _check(cfg.SOLVER.WARMUP_ITERS < cfg.SOLVER.MAX_ITER,
               f"SOLVER.WARMUP_ITERS: expected fewer than SOLVER.MAX_ITER ({cfg.SOLVER.MAX_ITER}), got "
               f"{cfg.SOLVER.WARMUP_ITERS}")
        _check(effective_precision(cfg) != "fp16" or cfg.MODEL.DEVICE.startswith("cuda"),
               f"SOLVER.PRECISION fp16 (Detectron2's AMPTrainer) needs CUDA but MODEL.DEVICE is {cfg.MODEL.DEVICE}: "
               "use SOLVER.PRECISION bf16 or fp32")
        _check(init != "scratch" or not cfg.MODEL.WEIGHTS,
               f"MODEL.INIT_TYPE is 'scratch' but MODEL.WEIGHTS is set ({cfg.MODEL.WEIGHTS}): clear one of them")
        _check(init == "scratch" or bool(cfg.MODEL.WEIGHTS),
               f"MODEL.INIT_TYPE is {init!r} but MODEL.WEIGHTS is empty: give the initialization checkpoint")
    try:
        validate_sem_seg_config(cfg)
        if cfg.MODEL.BACKBONE.NAME in VIT_BACKBONES:
            validate_vit_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.MODEL.BACKBONE.NAME in VIT_BACKBONES:
        _check_vit_levels(cfg)
        _check_square_pad(cfg)
    clash = names & {entry[0] for entry in cfg.DATASETS.REGISTER_SEM_SEG}
    _check(not clash, f"DATASETS.REGISTER and DATASETS.REGISTER_SEM_SEG both name {sorted(clash)}")


def _check_vit_levels(cfg: CN) -> None:
    """The heads' IN_FEATURES must name levels of the ViT backbone, whose names follow MODEL.VIT.PATCH_SIZE."""
    levels = vit_levels(cfg)
    if cfg.MODEL.BACKBONE.NAME == "build_vit_multitap_backbone":
        sections = ("SEM_SEG_HEAD",)
    else:
        sections = _DETECTOR_LEVEL_KEYS.get(cfg.MODEL.META_ARCHITECTURE, ())
    for section in sections:
        features = list(cfg.MODEL[section].IN_FEATURES)
        unknown = [f for f in features if f not in levels]
        _check(not unknown, f"MODEL.{section}.IN_FEATURES: {unknown} are not levels of {cfg.MODEL.BACKBONE.NAME} "
                            f"at MODEL.VIT.PATCH_SIZE {cfg.MODEL.VIT.PATCH_SIZE}; expected names among {levels}")


def _check_square_pad(cfg: CN) -> None:
    """MODEL.VIT.SQUARE_PAD > 0 must hold the largest input side: a smaller pad crops a lone image silently and
    fails on a batch of two."""
    pad, I = cfg.MODEL.VIT.SQUARE_PAD, cfg.INPUT
    if not pad:
        return
    if cfg.MODEL.BACKBONE.NAME == "build_vit_multitap_backbone":
        # Semantic segmentation: training crops (LSJ is detection's) and, with slide inference, the test windows.
        absolute_crop = I.CROP.ENABLED and I.CROP.TYPE in ("absolute", "absolute_range")
        train = ("INPUT.CROP.SIZE", max(I.CROP.SIZE)) if absolute_crop else ("INPUT.MAX_SIZE_TRAIN", I.MAX_SIZE_TRAIN)
        slide = cfg.TEST.SLIDE
        test = ("TEST.SLIDE.CROP_SIZE", slide.CROP_SIZE) if slide.ENABLED else ("INPUT.MAX_SIZE_TEST", I.MAX_SIZE_TEST)
    else:
        lsj = I.LSJ
        train = ("INPUT.LSJ.IMAGE_SIZE", lsj.IMAGE_SIZE) if lsj.ENABLED else ("INPUT.MAX_SIZE_TRAIN", I.MAX_SIZE_TRAIN)
        test = ("INPUT.MAX_SIZE_TEST", I.MAX_SIZE_TEST)
    key, side = max(train, test, key=lambda item: item[1])
    _check(pad >= side, f"MODEL.VIT.SQUARE_PAD: {pad} is smaller than {key} {side}, the largest input side; expected "
                        f"0 (off) or >= {side}")


def _merge(cfg: CN, config_file: str, opts: list[str]) -> None:
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file not found: {config_file}")
        chain = read_config_chain(config_file)
        try:
            cfg.merge_from_file(config_file)
        except Exception as e:
            key = _KEY_RE.search(str(e))
            raise ConfigError(f"{key_origin(chain, key.group(1)) if key else config_file}: {_first_line(e)}") from e
    if len(opts) % 2:
        raise ConfigError(f"command-line overrides must be KEY VALUE pairs, got an odd list: {opts}")
    try:
        cfg.merge_from_list(opts)
    except Exception as e:
        raise ConfigError(f"command line: {_first_line(e)}") from e


def _first_line(e: Exception) -> str:
    text = str(e).strip().strip('"')
    line = text.splitlines()[0] if text else type(e).__name__
    unknown = _UNKNOWN_KEY_RE.search(line)  # yacs words it differently for files and for KEY VALUE lists
    return f"unknown config key {unknown.group(1)}" if unknown else line


def load_det_cfg(config_file: str = "", opts: list[str] | None = None, *, training: bool = True,
                 gpu_elsewhere: bool = False) -> CN:
    """Defaults, then ``config_file`` (``_BASE_`` inheritance), then ``KEY VALUE`` overrides; validated.

    ``MODEL.DEVICE`` "cuda" falls back to "cpu" (with a warning) when no GPU is visible, so the COCO configs
    written for GPUs run unchanged on a CPU machine; not with ``gpu_elsewhere`` (a job submitted to GPU nodes).

    Raises:
        ConfigError: missing file, unknown key, wrong type or invalid value, in one line.
    """
    cfg = get_det_cfg()
    _merge(cfg, config_file, list(opts or []))
    _check_device(cfg)  # before the fallback, which would hide a malformed "cuda..." on a CPU machine
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available() and not gpu_elsewhere:
        logger.warning(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but no GPU is visible: running on cpu")
        cfg.MODEL.DEVICE = "cpu"
    validate_det_cfg(cfg, training=training)
    return cfg


def recorded_seed(output_dir: str) -> int | None:
    """The non-negative SEED of ``output_dir``/config.yaml (what an earlier run of that folder used), else None."""
    try:
        with open(os.path.join(output_dir, "config.yaml")) as f:
            seed = yaml.safe_load(f).get("SEED")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return seed if isinstance(seed, int) and seed >= 0 else None


def setup_det_cfg(args: argparse.Namespace) -> CN:
    """For tools: load + validate the config from Detectron2's standard arguments, fix the seed, freeze, and run
    Detectron2's ``default_setup`` (loggers, config.yaml in OUTPUT_DIR, seeding); mae_det's log joins log.txt.
    ``--eval-only`` into a folder that holds a config.yaml (the training run's) keeps it and writes
    config_eval.yaml.

    A negative ``SEED`` is replaced by a random one shared by all processes before anything is seeded, so
    config.yaml and run_info.json record the seed actually used; ``--resume`` takes the one that OUTPUT_DIR's
    config.yaml recorded, so that a resumed run keeps its draws (``SEEDED_DRAWS``).
    """
    cfg = load_det_cfg(args.config_file, args.opts, training=not args.eval_only)
    if cfg.SEED < 0:
        recorded = comm.all_gather(recorded_seed(cfg.OUTPUT_DIR) if args.resume else None)[0]
        cfg.SEED = comm.shared_random_seed() if recorded is None else recorded
    cfg.freeze()
    resumed = args.resume and not args.eval_only and comm.is_main_process()
    # Read before default_setup rewrites it. An evaluation keeps the training run's config.yaml (a later --resume
    # takes its SEED), as write_det_run_info keeps its run_info.json, and records its own as config_eval.yaml.
    previous = read_config_text(cfg.OUTPUT_DIR) if resumed or (args.eval_only and comm.is_main_process()) else None
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="mae_det", abbrev_name="mae_det")
    if previous is not None and args.eval_only:
        config_file = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
        os.replace(config_file, os.path.join(cfg.OUTPUT_DIR, "config_eval.yaml"))
        with open(config_file, "w", encoding="utf-8") as f:
            f.write(previous)
        logger.info("evaluation only: kept the existing config.yaml of %s; this run's is config_eval.yaml",
                    cfg.OUTPUT_DIR)
    elif previous is not None:
        warn_resumed_config_changes(cfg.OUTPUT_DIR, cfg, logger, previous)
    return cfg
