"""Classification configuration (fine-tuning, linear probe, kNN): defaults, loading and validation.

One config serves the three tools (``tools/finetune_cls.py``, ``tools/linear_probe.py``, ``tools/knn_eval.py``),
so a YAML file under ``configs/classification/`` describes the data and the encoder once. Every key::

    VERSION: 2                      Detectron2 config version
    MODEL.ARCH: "vit_base_patch16"  vit_{tiny,small,base,large,huge}_patch{N}; sets the sizes below
    MODEL.EMBED_DIM / DEPTH / NUM_HEADS / PATCH_SIZE: 0     override ARCH's encoder sizes (0 = ARCH's; EMBED_DIM a
                                    multiple of 4, for the 2-D sin-cos position initialization)
    MODEL.MLP_RATIO: 0.0            override the MLP ratio (0 = 4.0)
    MODEL.IMG_SIZE: 224             input side; checkpoints pretrained at another size get their position
                                    embedding resampled
    MODEL.IN_CHANS: 0               1 (images converted to grayscale) or 3; 0 = the pretraining's, as MODEL.WEIGHTS'
                                    meta records it (this project's checkpoints), else len(DATA.MEAN), else 3
    MODEL.WEIGHTS: ""               initial encoder weights: our encoder export or training checkpoint, an
                                    official MAE checkpoint, a timm ViT state dict; "" = random init
    MODEL.INIT_TYPE: ""             label recorded in run_info.json / cls_results.json, e.g. "mae",
                                    "supervised" ("" = "random" without weights, else the checkpoint's
                                    pretraining mode when it records one (mae / supervised), else "pretrained")
    MODEL.DROP_PATH: 0.1            stochastic depth of the fine-tuned encoder
    MODEL.GLOBAL_POOL: True         fine-tuning head on the mean of the patch tokens + fc_norm (MAE recipe);
                                    False: on the cls token after the encoder's final norm
    MODEL.TRAIN_BLOCKS: -1          fine-tuning: -1 = every parameter; k >= 0 = partial fine-tuning (MAE paper
                                    Fig. 9): only the last k blocks, the final norm and the head learn
    DATA.TRAIN_ROOT / VAL_ROOT: ""  ImageFolder trees: <root>/<class_name>/<images>
    DATA.MEAN / DATA.STD: ()        input normalization, one value per input channel; () = the pretraining's, as
                                    MODEL.WEIGHTS' meta records it (pretraining's DATA.MEAN / STD), else ImageNet's
                                    RGB statistics (official MAE and timm checkpoints)
    DATA.CROP_PCT: 0.875            eval transform: resize to IMG_SIZE / CROP_PCT, center crop IMG_SIZE
    DATA.NUM_WORKERS: 4             loader worker processes (0 = in the main process)
    DATA.VERIFY_IMAGES: True        decode every image once before fine-tuning (unreadable ones are skipped
                                    and counted up front; a class left empty fails at once); off for big sets
    DATA.MAX_BAD_FRACTION: 0.01     unreadable images are skipped and counted; above this fraction a run fails
    DATA.CACHE_DECODED_MB: 0        fine-tuning and the (augmented) linear probe: > 0 keeps up to this many MiB of
                                    decoded images in memory, so a small set is decoded once (fine-tuning: by the
                                    verification) instead of every epoch; the same pixels
                                    (mae_det.data.images.DecodedImageCache). Needs NUM_WORKERS 0: the loaders'
                                    workers start anew every epoch. 0 = off
    AUG.SCALE: (0.08, 1.0)          RandomResizedCrop area range (fine-tuning)
    AUG.HFLIP: 0.5                  horizontal flip probability
    AUG.RAND_AUGMENT: "rand-m9-mstd0.5-inc1-mmax9"   timm auto-augment string ("" = off): the paper's
                                    RandAug (9, 0.5) with the noisy magnitude capped at 9 rather than 10, since
                                    at 10 timm asks Pillow (>= 13 refuses it) for a 0-bit posterize
    AUG.REPROB: 0.25                random-erasing probability
    AUG.MIXUP / CUTMIX: 0.8 / 1.0   timm Mixup alphas (both 0 = off)
    AUG.MIXUP_PROB / MIXUP_SWITCH_PROB: 1.0 / 0.5   per-batch probability of mixing / of cutmix over mixup
    AUG.MIXUP_MODE: "batch"         "batch", "pair" or "elem"
    AUG.LABEL_SMOOTHING: 0.1
    SOLVER.EPOCHS: 100
    SOLVER.BATCH_SIZE: 64           images per iteration
    SOLVER.ACCUM_ITER: 1            iterations accumulated per optimizer step
    SOLVER.EFFECTIVE_BATCH_SIZE: 0  if > 0: images per optimizer step; ACCUM_ITER is derived from it
    SOLVER.BASE_LR: 5e-4            lr = BASE_LR * effective batch / 256
    SOLVER.LR: 0.0                  if > 0: absolute lr, BASE_LR ignored
    SOLVER.MIN_LR: 1e-6             floor of the cosine decay
    SOLVER.WARMUP_EPOCHS: 5         linear warmup, then half-cosine, updated every optimizer step
    SOLVER.WEIGHT_DECAY: 0.05       AdamW decay; none on biases, norms, pos_embed and cls_token
    SOLVER.LAYER_DECAY: 0.65        lr scale LAYER_DECAY ** (depth + 1 - layer id); 1.0 = off
    SOLVER.BETAS: (0.9, 0.999)
    SOLVER.CLIP_GRAD: 0.0           max gradient norm (0 = off)
    SOLVER.COMPILE: "auto"          fine-tuning: torch.compile the classifier in place for the training step
                                    ("on", "off", "auto" = on for CUDA only; evaluation stays eager)
    TEST.BATCH_SIZE: 128            evaluation / feature-extraction batch; the augmented probe reads and encodes its
                                    optimizer batch in chunks of this size
    TEST.EVAL_PERIOD: 1             fine-tuning: evaluate every N epochs and after the last (0 = after the last only)
    LINPROBE.EPOCHS: 90
    LINPROBE.BATCH_SIZE: 16384      capped at the number of training images
    LINPROBE.BASE_LR: 0.1           lr = BASE_LR * batch / 256
    LINPROBE.MIN_LR: 0.0
    LINPROBE.OPTIMIZER: "lars"      "lars" (timm's Lars) or "sgd", both with momentum
    LINPROBE.MOMENTUM: 0.9
    LINPROBE.WEIGHT_DECAY: 0.0
    LINPROBE.WARMUP_EPOCHS: 10
    LINPROBE.POOL: "cls"            "cls" token or "mean" of patch tokens
    LINPROBE.AUGMENT: False         True: RandomResizedCrop + flip through the frozen encoder every epoch (the
                                    official recipe); False: features extracted once (fast)
    KNN.K: 20
    KNN.TEMPERATURE: 0.07
    KNN.POOL: "cls"
    REFERENCE.PUBLISHED_TOP1: 0.0   a published top-1 for this recipe (0 = none); reported as published
    REFERENCE.SOURCE: ""            where that number was published
    CHECKPOINT_PERIOD: 1            fine-tuning checkpoint every N epochs (and after the last)
    CHECKPOINT_KEEP: 0              keep only the newest N of them (0 = keep all)
    LOG_PERIOD: 20                  optimizer steps between metrics.jsonl records
    PRECISION: "auto"               "fp32", "bf16", "fp16" (GPU only) or "auto" (bf16 where native, else fp32)
    DEVICE: "auto"                  "cpu", "cuda" or "auto"
    SEED: 0
    OUTPUT_DIR: "output/classification"   config.yaml, run_info.json, cls_results.json, checkpoints, metrics
"""
from __future__ import annotations

import os
from typing import Any, Iterable

from detectron2.config import CfgNode as CN

from ..data.classification import auto_augment_problem
from ..modeling.vit import VIT_SIZES
from .pretrain import (
    COMPILE_CHOICES, ConfigError, _check, _check_types, check_min_lr, encoder_arch, merge_config,
)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
POOLS = ("cls", "mean")

__all__ = ["ConfigError", "get_cls_cfg", "load_cls_cfg", "resolve_vit_arch", "validate_cls_cfg"]


def get_cls_cfg() -> CN:
    """Returns a new CfgNode with every classification key at its default (see the module docstring)."""
    _C = CN()
    _C.VERSION = 2

    _C.MODEL = CN()
    _C.MODEL.ARCH = "vit_base_patch16"
    _C.MODEL.EMBED_DIM = 0
    _C.MODEL.DEPTH = 0
    _C.MODEL.NUM_HEADS = 0
    _C.MODEL.PATCH_SIZE = 0
    _C.MODEL.MLP_RATIO = 0.0
    _C.MODEL.IMG_SIZE = 224
    _C.MODEL.IN_CHANS = 0
    _C.MODEL.WEIGHTS = ""
    _C.MODEL.INIT_TYPE = ""
    _C.MODEL.DROP_PATH = 0.1
    _C.MODEL.GLOBAL_POOL = True
    _C.MODEL.TRAIN_BLOCKS = -1

    _C.DATA = CN()
    _C.DATA.TRAIN_ROOT = ""
    _C.DATA.VAL_ROOT = ""
    _C.DATA.MEAN = ()
    _C.DATA.STD = ()
    _C.DATA.CROP_PCT = 0.875
    _C.DATA.NUM_WORKERS = 4
    _C.DATA.VERIFY_IMAGES = True
    _C.DATA.MAX_BAD_FRACTION = 0.01
    _C.DATA.CACHE_DECODED_MB = 0.0

    _C.AUG = CN()
    _C.AUG.SCALE = (0.08, 1.0)
    _C.AUG.HFLIP = 0.5
    _C.AUG.RAND_AUGMENT = "rand-m9-mstd0.5-inc1-mmax9"
    _C.AUG.REPROB = 0.25
    _C.AUG.MIXUP = 0.8
    _C.AUG.CUTMIX = 1.0
    _C.AUG.MIXUP_PROB = 1.0
    _C.AUG.MIXUP_SWITCH_PROB = 0.5
    _C.AUG.MIXUP_MODE = "batch"
    _C.AUG.LABEL_SMOOTHING = 0.1

    _C.SOLVER = CN()
    _C.SOLVER.EPOCHS = 100
    _C.SOLVER.BATCH_SIZE = 64
    _C.SOLVER.ACCUM_ITER = 1
    _C.SOLVER.EFFECTIVE_BATCH_SIZE = 0
    _C.SOLVER.BASE_LR = 5e-4
    _C.SOLVER.LR = 0.0
    _C.SOLVER.MIN_LR = 1e-6
    _C.SOLVER.WARMUP_EPOCHS = 5.0
    _C.SOLVER.WEIGHT_DECAY = 0.05
    _C.SOLVER.LAYER_DECAY = 0.65
    _C.SOLVER.BETAS = (0.9, 0.999)
    _C.SOLVER.CLIP_GRAD = 0.0
    _C.SOLVER.COMPILE = "auto"

    _C.TEST = CN()
    _C.TEST.BATCH_SIZE = 128
    _C.TEST.EVAL_PERIOD = 1

    _C.LINPROBE = CN()
    _C.LINPROBE.EPOCHS = 90
    _C.LINPROBE.BATCH_SIZE = 16384
    _C.LINPROBE.BASE_LR = 0.1
    _C.LINPROBE.MIN_LR = 0.0
    _C.LINPROBE.OPTIMIZER = "lars"
    _C.LINPROBE.MOMENTUM = 0.9
    _C.LINPROBE.WEIGHT_DECAY = 0.0
    _C.LINPROBE.WARMUP_EPOCHS = 10.0
    _C.LINPROBE.POOL = "cls"
    _C.LINPROBE.AUGMENT = False

    _C.KNN = CN()
    _C.KNN.K = 20
    _C.KNN.TEMPERATURE = 0.07
    _C.KNN.POOL = "cls"

    _C.REFERENCE = CN()
    _C.REFERENCE.PUBLISHED_TOP1 = 0.0
    _C.REFERENCE.SOURCE = ""

    _C.CHECKPOINT_PERIOD = 1
    _C.CHECKPOINT_KEEP = 0
    _C.LOG_PERIOD = 20
    _C.PRECISION = "auto"
    _C.DEVICE = "auto"
    _C.SEED = 0
    _C.OUTPUT_DIR = "output/classification"
    return _C


def load_cls_cfg(config_file: str | os.PathLike | None = None, opts: Iterable[str] = (), *,
                 check_paths: bool = True) -> CN:
    """Defaults, then ``config_file`` (``_BASE_`` inheritance), then ``KEY VALUE`` overrides; validated
    (``check_paths=False``: all but the existence of MODEL.WEIGHTS, e.g. on a filesystem of the compute nodes).

    Raises:
        ConfigError: missing file, unknown key, wrong type or invalid value, in one line.
    """
    cfg = merge_config(get_cls_cfg(), config_file, opts)
    validate_cls_cfg(cfg, check_paths=check_paths)
    return cfg


def resolve_vit_arch(cfg: CN) -> dict[str, Any]:
    """``VisionTransformer`` size keywords after applying the MODEL.* overrides to MODEL.ARCH."""
    return encoder_arch(cfg.MODEL, [f"vit_{k}_patch{v[3]}" for k, v in VIT_SIZES.items()])


def validate_cls_cfg(cfg: CN, *, check_paths: bool = True) -> None:
    """Checks types, ranges, that the data folders are set and (with ``check_paths``) that MODEL.WEIGHTS exists;
    the data folders' content is checked by the datasets, which name the folder.

    Raises:
        ConfigError: one line naming the offending key and what was expected.
    """
    _check_types(cfg, get_cls_cfg())
    M, D, A, S, L = cfg.MODEL, cfg.DATA, cfg.AUG, cfg.SOLVER, cfg.LINPROBE
    for key in ("EMBED_DIM", "DEPTH", "NUM_HEADS", "PATCH_SIZE"):
        _check(M[key] >= 0, f"MODEL.{key}: expected >= 0 (0 = ARCH's), got {M[key]}")
    _check(M.MLP_RATIO >= 0, f"MODEL.MLP_RATIO: expected >= 0 (0 = ARCH's), got {M.MLP_RATIO}")
    arch = resolve_vit_arch(cfg)
    _check(M.IMG_SIZE > 0 and M.IMG_SIZE % arch["patch_size"] == 0,
           f"MODEL.IMG_SIZE: {M.IMG_SIZE} is not a positive multiple of the patch size {arch['patch_size']}")
    _check(arch["embed_dim"] % arch["num_heads"] == 0,
           f"MODEL.EMBED_DIM: {arch['embed_dim']} is not divisible by MODEL.NUM_HEADS {arch['num_heads']}")
    _check(arch["embed_dim"] % 4 == 0, f"MODEL.EMBED_DIM: {arch['embed_dim']} is not a multiple of 4, which the "
                                       f"encoder's 2-D sin-cos position initialization needs")
    _check(0.0 <= M.DROP_PATH < 1.0, f"MODEL.DROP_PATH: expected a value in [0, 1), got {M.DROP_PATH}")
    _check(-1 <= M.TRAIN_BLOCKS <= arch["depth"],
           f"MODEL.TRAIN_BLOCKS: expected -1 (all) or 0..{arch['depth']} (the depth), got {M.TRAIN_BLOCKS}")
    if M.WEIGHTS and check_paths:
        _check(os.path.isfile(M.WEIGHTS), f"MODEL.WEIGHTS: checkpoint {M.WEIGHTS} not found")
    _check(M.IN_CHANS in (0, 1, 3),
           f"MODEL.IN_CHANS: expected 1 (grayscale), 3 (RGB) or 0 (the pretraining's), got {M.IN_CHANS}")
    if D.MEAN or D.STD:
        channels = f"{M.IN_CHANS} values each (MODEL.IN_CHANS)" if M.IN_CHANS else "1 or 3 values each"
        _check(len(D.MEAN) == len(D.STD) and len(D.MEAN) in ((M.IN_CHANS,) if M.IN_CHANS else (1, 3)),
               f"DATA.MEAN / DATA.STD: expected {channels}, or both () for the pretraining's, got {len(D.MEAN)} "
               f"and {len(D.STD)}")
        _check(all(v > 0 for v in D.STD), f"DATA.STD: expected positive values, got {tuple(D.STD)}")

    _check(0.0 < D.CROP_PCT <= 1.0, f"DATA.CROP_PCT: expected a value in (0, 1], got {D.CROP_PCT}")
    _check(D.NUM_WORKERS >= 0, f"DATA.NUM_WORKERS: expected >= 0, got {D.NUM_WORKERS}")
    _check(D.CACHE_DECODED_MB >= 0, f"DATA.CACHE_DECODED_MB: expected >= 0 MiB (0 = off), got {D.CACHE_DECODED_MB}")
    _check(D.CACHE_DECODED_MB == 0 or D.NUM_WORKERS == 0,
           f"DATA.CACHE_DECODED_MB: the cache lives in the decoding process and the loader's workers start anew "
           f"every epoch; set DATA.NUM_WORKERS 0 to use it (got {D.NUM_WORKERS})")
    _check(0.0 <= D.MAX_BAD_FRACTION <= 1.0,
           f"DATA.MAX_BAD_FRACTION: expected a value in [0, 1], got {D.MAX_BAD_FRACTION}")

    _check(len(A.SCALE) == 2 and 0 < A.SCALE[0] <= A.SCALE[1] <= 1,
           f"AUG.SCALE: expected (min, max) with 0 < min <= max <= 1, got {tuple(A.SCALE)}")
    for key in ("HFLIP", "REPROB", "MIXUP_PROB", "MIXUP_SWITCH_PROB", "LABEL_SMOOTHING"):
        _check(0.0 <= A[key] <= 1.0, f"AUG.{key}: expected a probability in [0, 1], got {A[key]}")
    _check(A.MIXUP >= 0 and A.CUTMIX >= 0, f"AUG.MIXUP / AUG.CUTMIX: expected >= 0, got {A.MIXUP} / {A.CUTMIX}")
    _check(A.MIXUP_MODE in ("batch", "pair", "elem"),
           f"AUG.MIXUP_MODE: expected 'batch', 'pair' or 'elem', got {A.MIXUP_MODE!r}")
    _check(not A.RAND_AUGMENT or A.RAND_AUGMENT.startswith(("rand", "augmix", "original", "v0", "3a")),
           f"AUG.RAND_AUGMENT: expected a timm auto-augment string such as 'rand-m9-mstd0.5-inc1-mmax9', "
           f"got {A.RAND_AUGMENT!r}")
    problem = auto_augment_problem(A.RAND_AUGMENT)
    _check(problem is None, f"AUG.RAND_AUGMENT: {problem}")

    for key in ("EPOCHS", "BATCH_SIZE", "ACCUM_ITER"):
        _check(S[key] >= 1, f"SOLVER.{key}: expected >= 1, got {S[key]}")
    _check(S.EFFECTIVE_BATCH_SIZE >= 0, f"SOLVER.EFFECTIVE_BATCH_SIZE: expected >= 0 (0 = off), got {S.EFFECTIVE_BATCH_SIZE}")
    if S.EFFECTIVE_BATCH_SIZE:
        _check(S.EFFECTIVE_BATCH_SIZE % S.BATCH_SIZE == 0,
               f"SOLVER.EFFECTIVE_BATCH_SIZE: {S.EFFECTIVE_BATCH_SIZE} is not a multiple of SOLVER.BATCH_SIZE "
               f"{S.BATCH_SIZE}")
    # timm's Mixup pairs each image with another of its batch; an odd batch would lose one image every step
    _check(S.BATCH_SIZE % 2 == 0 or (A.MIXUP == 0 and A.CUTMIX == 0),
           f"SOLVER.BATCH_SIZE: expected an even value with AUG.MIXUP / AUG.CUTMIX on (mixing pairs the images of a "
           f"batch), got {S.BATCH_SIZE}; or set AUG.MIXUP 0 AUG.CUTMIX 0")
    _check(S.BASE_LR > 0 or S.LR > 0, f"SOLVER.BASE_LR / SOLVER.LR: one must be > 0, got {S.BASE_LR} / {S.LR}")
    _check(S.MIN_LR >= 0, f"SOLVER.MIN_LR: expected >= 0, got {S.MIN_LR}")
    eff_batch = S.EFFECTIVE_BATCH_SIZE or S.BATCH_SIZE * S.ACCUM_ITER  # fine-tuning runs in one process
    check_min_lr("SOLVER.MIN_LR", S.MIN_LR, S.LR or S.BASE_LR * eff_batch / 256,
                 "SOLVER.LR" if S.LR else f"SOLVER.BASE_LR x batch {eff_batch}/256")
    _check(0 <= S.WARMUP_EPOCHS <= S.EPOCHS,
           f"SOLVER.WARMUP_EPOCHS: expected 0 <= value <= SOLVER.EPOCHS ({S.EPOCHS}), got {S.WARMUP_EPOCHS}")
    _check(S.WEIGHT_DECAY >= 0, f"SOLVER.WEIGHT_DECAY: expected >= 0, got {S.WEIGHT_DECAY}")
    _check(0 < S.LAYER_DECAY <= 1, f"SOLVER.LAYER_DECAY: expected a value in (0, 1] (1 = off), got {S.LAYER_DECAY}")
    _check(len(S.BETAS) == 2 and all(0 <= b < 1 for b in S.BETAS),
           f"SOLVER.BETAS: expected two values in [0, 1), got {tuple(S.BETAS)}")
    _check(S.CLIP_GRAD >= 0, f"SOLVER.CLIP_GRAD: expected >= 0 (0 = off), got {S.CLIP_GRAD}")
    _check(S.COMPILE in COMPILE_CHOICES, f"SOLVER.COMPILE: expected one of {COMPILE_CHOICES}, got {S.COMPILE!r}")

    _check(cfg.TEST.BATCH_SIZE >= 1, f"TEST.BATCH_SIZE: expected >= 1, got {cfg.TEST.BATCH_SIZE}")
    _check(cfg.TEST.EVAL_PERIOD >= 0,
           f"TEST.EVAL_PERIOD: expected >= 0 epochs (0 = after the last only), got {cfg.TEST.EVAL_PERIOD}")

    for key in ("EPOCHS", "BATCH_SIZE"):
        _check(L[key] >= 1, f"LINPROBE.{key}: expected >= 1, got {L[key]}")
    _check(L.BASE_LR > 0, f"LINPROBE.BASE_LR: expected > 0, got {L.BASE_LR}")
    _check(L.MIN_LR >= 0, f"LINPROBE.MIN_LR: expected >= 0, got {L.MIN_LR}")
    # The largest peak: a training set smaller than the batch lowers it (checked again by the probe).
    check_min_lr("LINPROBE.MIN_LR", L.MIN_LR, L.BASE_LR * L.BATCH_SIZE / 256,
                 f"LINPROBE.BASE_LR x batch {L.BATCH_SIZE}/256")
    _check(L.OPTIMIZER in ("lars", "sgd"), f"LINPROBE.OPTIMIZER: expected 'lars' or 'sgd', got {L.OPTIMIZER!r}")
    _check(0 <= L.MOMENTUM < 1, f"LINPROBE.MOMENTUM: expected a value in [0, 1), got {L.MOMENTUM}")
    _check(L.WEIGHT_DECAY >= 0, f"LINPROBE.WEIGHT_DECAY: expected >= 0, got {L.WEIGHT_DECAY}")
    _check(0 <= L.WARMUP_EPOCHS <= L.EPOCHS,
           f"LINPROBE.WARMUP_EPOCHS: expected 0 <= value <= LINPROBE.EPOCHS ({L.EPOCHS}), got {L.WARMUP_EPOCHS}")
    _check(L.POOL in POOLS, f"LINPROBE.POOL: expected one of {POOLS}, got {L.POOL!r}")

    _check(cfg.KNN.K >= 1, f"KNN.K: expected >= 1, got {cfg.KNN.K}")
    _check(cfg.KNN.TEMPERATURE > 0, f"KNN.TEMPERATURE: expected > 0, got {cfg.KNN.TEMPERATURE}")
    _check(cfg.KNN.POOL in POOLS, f"KNN.POOL: expected one of {POOLS}, got {cfg.KNN.POOL!r}")
    _check(cfg.REFERENCE.PUBLISHED_TOP1 >= 0, f"REFERENCE.PUBLISHED_TOP1: expected >= 0, got {cfg.REFERENCE.PUBLISHED_TOP1}")

    _check(cfg.CHECKPOINT_PERIOD >= 1, f"CHECKPOINT_PERIOD: expected >= 1 epoch, got {cfg.CHECKPOINT_PERIOD}")
    _check(cfg.CHECKPOINT_KEEP >= 0, f"CHECKPOINT_KEEP: expected >= 0 (0 = keep all), got {cfg.CHECKPOINT_KEEP}")
    _check(cfg.LOG_PERIOD >= 1, f"LOG_PERIOD: expected >= 1, got {cfg.LOG_PERIOD}")
    _check(cfg.PRECISION in PRECISIONS, f"PRECISION: expected one of {PRECISIONS}, got {cfg.PRECISION!r}")
    _check(cfg.DEVICE in DEVICES, f"DEVICE: expected one of {DEVICES}, got {cfg.DEVICE!r}")
    _check(not (cfg.PRECISION == "fp16" and cfg.DEVICE == "cpu"),
           "PRECISION: fp16 needs a GPU (its gradient scaler is CUDA-only); use bf16 or fp32 on CPU")
    _check(cfg.SEED >= 0, f"SEED: expected >= 0, got {cfg.SEED}")
    _check(bool(cfg.OUTPUT_DIR), "OUTPUT_DIR is empty")
    for key in ("TRAIN_ROOT", "VAL_ROOT"):  # "" would be the current folder, read as a class tree
        _check(bool(D[key]), f"DATA.{key} is empty: set it to a labeled ImageFolder tree (<root>/<class>/<images>)")
