"""Pretraining configuration: defaults, loading (``_BASE_`` inheritance, ``KEY VALUE`` overrides) and validation.

Every key, its default and meaning (``get_pretrain_cfg`` builds exactly this tree)::

    VERSION: 2                      Detectron2 config version (lets CfgNode.merge_from_file accept our files)
    MODEL.MODE: "mae"               "mae" (masked autoencoder) or "supervised" (classifier on the same encoder,
                                    multi-label BCE on per-image labels; the baseline of the demo)
    MODEL.ARCH: "mae_vit_base_patch16"   a name in mae_det.modeling.MAE_FACTORIES; sets all sizes below
    MODEL.EMBED_DIM / DEPTH / NUM_HEADS / PATCH_SIZE: 0     override the encoder sizes of ARCH (0 = ARCH's)
    MODEL.MLP_RATIO: 0.0            override the MLP ratio (0 = ARCH's, 4.0)
    MODEL.DECODER_EMBED_DIM / DECODER_DEPTH / DECODER_NUM_HEADS: 0   override the MAE decoder (0 = 512 / 8 / 16)
                                    (both embed dims: multiples of 4, for the 2-D sin-cos position tables)
    MODEL.IMG_SIZE: 224             square training crop side; a multiple of the patch size
    MODEL.IN_CHANS: 3               1 (images converted to grayscale) or 3
    MODEL.MASK_RATIO: 0.75          fraction of patches removed, in [0, 1) (mae mode: at least one patch masked
                                    and one kept)
    MODEL.NORM_PIX_LOSS: False      per-patch normalized pixel targets (mae mode)
    MODEL.DROP_PATH: 0.0            stochastic depth rate of the encoder
    MODEL.INIT: "mae"               random initialization of the encoder before pretraining: "mae" (the official
                                    code's: xavier-uniform Linear weights) or "vitdet" (trunc-normal std 0.02, the
                                    detection scratch arm's; the fixed sin-cos position table stays), so that a
                                    comparison against that arm differs only by the pretraining
    MODEL.WEIGHTS: ""               start from a checkpoint instead of MODEL.INIT (continued pretraining, e.g. the
                                    official ImageNet MAE on your own images): its encoder (any format
                                    tools/convert_checkpoint.py reads) and, for MAE, its decoder when it has one;
                                    the fixed position tables stay exact for MODEL.IMG_SIZE; --resume of a run
                                    that has a checkpoint continues that run instead
    MODEL.ACT_CHECKPOINT: False     recompute block activations in backward (less memory, ~30 % slower)
    MODEL.NUM_CLASSES: 0            supervised mode: number of labels (0 = taken from the dataset)
    MODEL.POOL: "mean"              supervised mode: head input, "mean" of patch tokens or the "cls" token
    MODEL.MAX_COUNT: 0              supervised mode: 0 = multi-label BCE on which classes are present; N > 0 =
                                    per-class instance counts, each a softmax over 0..N (N = "N or more"), from a
                                    COCO json's annotations (a stronger image-level signal than presence)
    DATA.SOURCE: "auto"             "folder" (all images below PATH, recursive), "imagefolder" (class
                                    sub-folders), "coco" (images listed in a COCO json), or "auto": a .json file
                                    is coco, a folder holding only sub-folders is imagefolder, else folder
    DATA.PATH: ""                   the folder or the COCO json file (required)
    DATA.IMAGE_ROOT: ""             coco: folder the json's file_name entries are relative to ("" = json's folder)
    DATA.NUM_WORKERS: 4             data-loader worker processes per training process (0 = in the main process)
    DATA.SCALE: (0.2, 1.0)          RandomResizedCrop area range
    DATA.RATIO: (0.75, 1.3333)      RandomResizedCrop aspect-ratio range
    DATA.HFLIP: True                random horizontal flip (p = 0.5)
    DATA.ROT90: False               random rotation by 0, 90, 180 or 270 degrees (with HFLIP: the 8 symmetries of
                                    the square), for data without an up direction (aerial, microscopy, shapes)
    DATA.CHANNEL_SHUFFLE: False     random order of the RGB channels, for data whose classes do not depend on color
    DATA.MEAN / DATA.STD            normalization, ImageNet's RGB values; one entry per input channel
    DATA.MAX_BAD_FRACTION: 0.01     unreadable images are skipped and counted; above this fraction of the
                                    dataset the run fails
    DATA.MAX_PIXELS: 134217728      decode budget per image (see mae_det.data.images.load_image)
    DATA.DECODE_DEVICE: "cpu"       "cpu": loader workers decode and augment (PIL; on a GPU they pass uint8
                                    images, normalized on the GPU); "cuda": workers read the
                                    bytes, the main process decodes JPEGs on the GPU (nvjpeg) and crops, resizes,
                                    flips and normalizes there, with the same crops and flips as "cpu"
                                    (mae_det.data.gpu_decode); other files are decoded on CPU as before
    DATA.CACHE_DECODED_MB: 0        > 0: keep up to this many MiB of decoded images in each loading process's
                                    memory, so small datasets are decoded once instead of every epoch (the same
                                    pixels; mae_det.data.images.DecodedImageCache); 0 = off. CPU decoding only
    SOLVER.EPOCHS: 800              training epochs
    SOLVER.BATCH_SIZE: 64           images per process per iteration
    SOLVER.ACCUM_ITER: 1            iterations accumulated per optimizer step
    SOLVER.EFFECTIVE_BATCH_SIZE: 0  if > 0: the images per optimizer step; ACCUM_ITER is derived from it and the
                                    number of processes (must divide evenly), so a recipe holds on any GPU count
    SOLVER.BASE_LR: 1.5e-4          lr = BASE_LR * effective batch / 256 (the paper's rule)
    SOLVER.LR: 0.0                  if > 0: absolute lr, BASE_LR is ignored
    SOLVER.MIN_LR: 0.0              floor of the cosine decay
    SOLVER.WARMUP_EPOCHS: 40        linear warmup from 0, then half-cosine; both updated every optimizer step
    SOLVER.WEIGHT_DECAY: 0.05       AdamW decay; none on norms and biases; fixed position embeddings are frozen
    SOLVER.BETAS: (0.9, 0.95)       AdamW betas
    SOLVER.DECAY_TOKENS: True       decay cls/mask tokens, as the official code does
    SOLVER.CLIP_GRAD: 0.0           max gradient norm (0 = no clipping)
    SOLVER.CHECKPOINT_ITER_PERIOD: 0   also checkpoint every N optimizer steps inside an epoch (0 = off); only
                                    the newest of these is kept
    SOLVER.COMPILE: "auto"          torch.compile the model in place for the training step: "on", "off", or
                                    "auto" = on for CUDA only (on CPU the compile time is not repaid; see
                                    mae_det.engine.compile); quote on/off in YAML files
    CHECKPOINT_PERIOD: 20           checkpoint every N epochs (and always after the last one)
    CHECKPOINT_KEEP: 0              keep only the newest N of those epoch checkpoints (0 = keep all); older ones
                                    are deleted after each new one is written, including an earlier process's
    LOG_PERIOD: 20                  optimizer steps between metrics.jsonl / TensorBoard records; also the
                                    period of the host sync that checks the loss (a non-finite loss skips the
                                    update on the device at once and stops the run at the next such check)
    PRECISION: "auto"               "fp32", "bf16" (autocast), "fp16" (autocast + GradScaler, GPU only) or
                                    "auto": bf16 where the device runs it natively, else fp16 on GPU, fp32 on CPU
    DEVICE: "auto"                  "cpu", "cuda" or "auto" (cuda when available)
    SEED: 0                         all randomness (data order, crops, flips, masks, drop path) derives from it;
                                    0 to 2**63 - 1
    OUTPUT_DIR: "output/pretrain"   checkpoints, metrics.jsonl, TensorBoard events, config.yaml, run_info.json
    MONITOR.KNN.ENABLED: False      kNN top-1 of the encoder on a labeled ImageFolder pair, logged as knn_top1
    MONITOR.KNN.PERIOD: 10          every N epochs (and after the last one)
    MONITOR.KNN.TRAIN_ROOT / VAL_ROOT: ""   ImageFolder trees (class sub-folders) used as memory bank / queries
    MONITOR.KNN.K: 20               neighbours
    MONITOR.KNN.TEMPERATURE: 0.07   similarity temperature of the weighted vote
    MONITOR.KNN.POOL: "cls"         feature: "cls" token or "mean" of patch tokens
"""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from detectron2.config import CfgNode as CN

from ..data.images import DEFAULT_MAX_PIXELS
from ..modeling.mae import MAE_FACTORIES
from ..modeling.vit import VIT_SIZES
from .vit_backbone import INITS

MODES = ("mae", "supervised")
SOURCES = ("auto", "folder", "imagefolder", "coco")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DECODE_DEVICES = ("cpu", "cuda")
COMPILE_CHOICES = ("auto", "on", "off")
POOLS = ("cls", "mean")
_ARCH_RE = re.compile(r"^(?:mae_)?vit_([a-z]+)_patch(\d+)$")


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the key (or file) and what was expected."""


def get_pretrain_cfg() -> CN:
    """Returns a new CfgNode with every pretraining key at its default (documented in the module docstring)."""
    _C = CN()
    _C.VERSION = 2

    _C.MODEL = CN()
    _C.MODEL.MODE = "mae"
    _C.MODEL.ARCH = "mae_vit_base_patch16"
    _C.MODEL.EMBED_DIM = 0
    _C.MODEL.DEPTH = 0
    _C.MODEL.NUM_HEADS = 0
    _C.MODEL.PATCH_SIZE = 0
    _C.MODEL.MLP_RATIO = 0.0
    _C.MODEL.DECODER_EMBED_DIM = 0
    _C.MODEL.DECODER_DEPTH = 0
    _C.MODEL.DECODER_NUM_HEADS = 0
    _C.MODEL.IMG_SIZE = 224
    _C.MODEL.IN_CHANS = 3
    _C.MODEL.MASK_RATIO = 0.75
    _C.MODEL.NORM_PIX_LOSS = False
    _C.MODEL.DROP_PATH = 0.0
    _C.MODEL.INIT = "mae"
    _C.MODEL.WEIGHTS = ""
    _C.MODEL.ACT_CHECKPOINT = False
    _C.MODEL.NUM_CLASSES = 0
    _C.MODEL.POOL = "mean"
    _C.MODEL.MAX_COUNT = 0

    _C.DATA = CN()
    _C.DATA.SOURCE = "auto"
    _C.DATA.PATH = ""
    _C.DATA.IMAGE_ROOT = ""
    _C.DATA.NUM_WORKERS = 4
    _C.DATA.SCALE = (0.2, 1.0)
    _C.DATA.RATIO = (3.0 / 4.0, 4.0 / 3.0)
    _C.DATA.HFLIP = True
    _C.DATA.ROT90 = False
    _C.DATA.CHANNEL_SHUFFLE = False
    _C.DATA.MEAN = (0.485, 0.456, 0.406)
    _C.DATA.STD = (0.229, 0.224, 0.225)
    _C.DATA.MAX_BAD_FRACTION = 0.01
    _C.DATA.MAX_PIXELS = DEFAULT_MAX_PIXELS
    _C.DATA.DECODE_DEVICE = "cpu"
    _C.DATA.CACHE_DECODED_MB = 0.0

    _C.SOLVER = CN()
    _C.SOLVER.EPOCHS = 800
    _C.SOLVER.BATCH_SIZE = 64
    _C.SOLVER.ACCUM_ITER = 1
    _C.SOLVER.EFFECTIVE_BATCH_SIZE = 0
    _C.SOLVER.BASE_LR = 1.5e-4
    _C.SOLVER.LR = 0.0
    _C.SOLVER.MIN_LR = 0.0
    _C.SOLVER.WARMUP_EPOCHS = 40
    _C.SOLVER.WEIGHT_DECAY = 0.05
    _C.SOLVER.BETAS = (0.9, 0.95)
    _C.SOLVER.DECAY_TOKENS = True
    _C.SOLVER.CLIP_GRAD = 0.0
    _C.SOLVER.CHECKPOINT_ITER_PERIOD = 0
    _C.SOLVER.COMPILE = "auto"

    _C.CHECKPOINT_PERIOD = 20
    _C.CHECKPOINT_KEEP = 0
    _C.LOG_PERIOD = 20
    _C.PRECISION = "auto"
    _C.DEVICE = "auto"
    _C.SEED = 0
    _C.OUTPUT_DIR = "output/pretrain"

    _C.MONITOR = CN()
    _C.MONITOR.KNN = CN()
    _C.MONITOR.KNN.ENABLED = False
    _C.MONITOR.KNN.PERIOD = 10
    _C.MONITOR.KNN.TRAIN_ROOT = ""
    _C.MONITOR.KNN.VAL_ROOT = ""
    _C.MONITOR.KNN.K = 20
    _C.MONITOR.KNN.TEMPERATURE = 0.07
    _C.MONITOR.KNN.POOL = "cls"
    return _C


# ---- loading ---------------------------------------------------------------------------------------------
def _coerce_ints_to_floats(new: Any, default: Any) -> Any:
    """YAML ``1`` / command-line ``1`` for a float key would fail yacs' strict type check; accept it as 1.0."""
    if isinstance(default, float) and isinstance(new, int) and not isinstance(new, bool):
        return float(new)
    if isinstance(default, CN) and isinstance(new, dict):
        return {k: _coerce_ints_to_floats(v, default[k]) if k in default else v for k, v in new.items()}
    if isinstance(default, (tuple, list)) and isinstance(new, (tuple, list)) and default:
        if all(isinstance(d, float) for d in default):
            return type(new)(_coerce_ints_to_floats(v, 0.0) for v in new)
    return new


def _lookup(cfg: CN, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, CN) or part not in node:
            raise ConfigError(f"unknown config key {dotted!r}")
        node = node[part]
    return node


def _read_yaml_mapping(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from e
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: YAML syntax error{where}: {e.problem or e.context}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML error: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path}: expected a YAML mapping of config keys, got {got}")
    return data


def read_config_chain(config_file: str | os.PathLike) -> list[tuple[str, dict]]:
    """(path, YAML mapping) of ``config_file`` and of its ``_BASE_`` ancestors, child first, the base paths resolved
    as Detectron2's ``load_yaml_with_base`` does. Read before yacs merges them, which names neither the file of a
    YAML error nor its line, fails on an empty file with a TypeError and recurses forever on a loop.

    Raises:
        ConfigError: a file of the chain is unreadable, not YAML, empty or not a mapping, or the chain loops.
    """
    chain: list[tuple[str, dict]] = []
    path = str(config_file)
    while True:
        if chain and not os.path.isfile(path):
            raise ConfigError(f"{chain[-1][0]}: _BASE_ file {path} not found")
        if any(os.path.realpath(p) == os.path.realpath(path) for p, _ in chain):
            raise ConfigError(f"{chain[-1][0]}: _BASE_ {path} is already in the chain {[p for p, _ in chain]}")
        chain.append((path, _read_yaml_mapping(path)))
        base = chain[-1][1].get("_BASE_")
        if not base:
            return chain
        base = os.path.expanduser(str(base))
        path = base if base.startswith(("/", "https://", "http://")) else os.path.join(os.path.dirname(path), base)


def key_origin(chain: list[tuple[str, dict]], dotted: str) -> str:
    """The file of ``chain`` (from :func:`read_config_chain`) that sets ``dotted`` last (the child wins)."""
    for path, data in chain:
        node: Any = data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return path
    return chain[0][0]


def _yacs_error(e: Exception, where: str, chain: list[tuple[str, dict]] | None = None) -> ConfigError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    unknown = re.search(r"Non-existent (?:config )?key:? '?([\w.]+)'?", msg)
    if unknown:
        key = unknown.group(1)
        return ConfigError(f"{key_origin(chain, key) if chain else where}: unknown config key {key!r}")
    mismatch = re.search(
        r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with values \(.* vs\. (.*)\) "
        r"for config key: ([\w.]+)", msg
    )
    if mismatch:
        expected, got, value, key = mismatch.groups()
        where = key_origin(chain, key) if chain else where
        return ConfigError(f"{where}: config key {key}: expected {expected}, got {got} {value}")
    return ConfigError(f"{where}: {msg}")


def merge_config(cfg: CN, config_file: str | os.PathLike | None = None, opts: Iterable[str] = ()) -> CN:
    """Merges ``config_file`` (with ``_BASE_`` inheritance), then ``KEY VALUE`` overrides, into ``cfg``.

    Integers given for float keys are accepted (``SOLVER.LR 1``). Shared by the pretraining and classification
    configs.

    Raises:
        ConfigError: missing, empty or malformed file (YAML errors with their line and column), unknown key or wrong
            type (naming the file of the ``_BASE_`` chain that sets it), in one line.
    """
    if config_file:
        if not Path(config_file).is_file():
            raise ConfigError(f"config file not found: {config_file}")
        chain = read_config_chain(config_file)
        try:
            loaded = CN.load_yaml_with_base(str(config_file), allow_unsafe=False)
            cfg.merge_from_other_cfg(CN(_coerce_ints_to_floats(loaded, cfg)))
        except ConfigError:
            raise
        except Exception as e:
            raise _yacs_error(e, str(config_file), chain) from e
    opts = list(opts)
    # argparse hands everything after the first KEY to the overrides, so an option placed after them would
    # otherwise read as a key or make the list odd.
    misplaced = [o for o in opts[0::2] if o.startswith("--")]
    if misplaced:
        raise ConfigError(f"command line: {misplaced[0]} is an option; options go before the KEY VALUE overrides")
    if len(opts) % 2:
        raise ConfigError(f"command-line overrides must be KEY VALUE pairs, got an odd list: {opts}")
    pairs = []
    for key, value in zip(opts[0::2], opts[1::2]):
        default = _lookup(cfg, key)
        if isinstance(default, float):
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = None
            if isinstance(parsed, int) and not isinstance(parsed, bool):
                value = repr(float(parsed))
        pairs += [key, value]
    try:
        cfg.merge_from_list(pairs)
    except Exception as e:
        raise _yacs_error(e, "command line") from e
    return cfg


def load_pretrain_cfg(config_file: str | os.PathLike | None = None, opts: Iterable[str] = (), *,
                      check_paths: bool = True) -> CN:
    """Defaults, then ``config_file`` (with ``_BASE_`` inheritance), then ``KEY VALUE`` overrides; validated
    (``check_paths=False``: all but the existence of the data folders, e.g. mounted only on compute nodes).

    Raises:
        ConfigError: missing file, unknown key, wrong type or invalid value, in one line.
    """
    cfg = merge_config(get_pretrain_cfg(), config_file, opts)
    validate_pretrain_cfg(cfg, check_paths=check_paths)
    return cfg


# ---- validation ------------------------------------------------------------------------------------------
def encoder_arch(model: CN, expected: Iterable[str]) -> dict[str, Any]:
    """``VisionTransformer`` size keywords: those of MODEL.ARCH (``[mae_]vit_<size>_patch<p>``) with the non-zero
    MODEL.* overrides applied. Shared by the pretraining and the classification configs.

    Raises:
        ConfigError: MODEL.ARCH names no known size; the message lists ``expected``.
    """
    m = _ARCH_RE.match(model.ARCH)
    if not m or m.group(1) not in VIT_SIZES:
        raise ConfigError(f"MODEL.ARCH: unknown architecture {model.ARCH!r}, expected one of {list(expected)}")
    embed_dim, depth, num_heads, _ = VIT_SIZES[m.group(1)]
    return {
        "patch_size": model.PATCH_SIZE or int(m.group(2)),
        "embed_dim": model.EMBED_DIM or embed_dim,
        "depth": model.DEPTH or depth,
        "num_heads": model.NUM_HEADS or num_heads,
        "mlp_ratio": model.MLP_RATIO or 4.0,
    }


def resolve_arch(cfg: CN) -> dict[str, Any]:
    """Model sizes after applying the MODEL.* overrides to MODEL.ARCH's factory defaults."""
    M, expected = cfg.MODEL, sorted(MAE_FACTORIES)
    if M.ARCH not in MAE_FACTORIES:
        raise ConfigError(f"MODEL.ARCH: unknown architecture {M.ARCH!r}, expected one of {expected}")
    return encoder_arch(M, expected) | {
        "decoder_embed_dim": M.DECODER_EMBED_DIM or 512,
        "decoder_depth": M.DECODER_DEPTH or 8,
        "decoder_num_heads": M.DECODER_NUM_HEADS or 16,
    }


def _check_types(node: CN, default: CN, prefix: str = "") -> None:
    for key, dval in default.items():
        name = f"{prefix}{key}"
        if key not in node:
            raise ConfigError(f"config key {name} is missing")
        val = node[key]
        if isinstance(dval, CN):
            if not isinstance(val, CN):
                raise ConfigError(f"config key {name}: expected a section, got {type(val).__name__}")
            _check_types(val, dval, name + ".")
            continue
        ok = isinstance(val, type(dval))
        if isinstance(dval, float):
            ok = isinstance(val, (int, float)) and not isinstance(val, bool)
        elif isinstance(dval, int) and not isinstance(dval, bool):
            ok = isinstance(val, int) and not isinstance(val, bool)
        elif isinstance(dval, (tuple, list)):
            ok = isinstance(val, (tuple, list)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in val
            )
        if not ok:
            raise ConfigError(f"config key {name}: expected {type(dval).__name__}, got {type(val).__name__} {val!r}")
    for key in node:
        if key not in default:
            raise ConfigError(f"unknown config key {prefix}{key!r}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_min_lr(key: str, min_lr: float, lr: float, how: str) -> None:
    """Refuses a cosine floor ``min_lr`` above the peak ``lr`` (resolved as ``how`` says): the schedule would climb
    from the peak to it instead of decaying. Shared by pretraining, fine-tuning and the linear probe.

    Raises:
        ConfigError: naming ``key``.
    """
    _check(min_lr <= lr, f"{key} {min_lr:g} exceeds the peak lr {lr:.3g} ({how})")


def validate_pretrain_cfg(cfg: CN, *, check_paths: bool = True) -> None:
    """Checks types, ranges and (with ``check_paths``) that the data folders exist.

    Raises:
        ConfigError: one line naming the offending key and what was expected.
    """
    _check_types(cfg, get_pretrain_cfg())
    M, D, S, K = cfg.MODEL, cfg.DATA, cfg.SOLVER, cfg.MONITOR.KNN
    _check(M.MODE in MODES, f"MODEL.MODE: expected one of {MODES}, got {M.MODE!r}")
    for key in ("EMBED_DIM", "DEPTH", "NUM_HEADS", "PATCH_SIZE", "DECODER_EMBED_DIM", "DECODER_DEPTH",
                "DECODER_NUM_HEADS", "NUM_CLASSES", "MAX_COUNT"):
        _check(M[key] >= 0, f"MODEL.{key}: expected >= 0 (0 = default), got {M[key]}")
    _check(M.MLP_RATIO >= 0, f"MODEL.MLP_RATIO: expected >= 0 (0 = default), got {M.MLP_RATIO}")
    arch = resolve_arch(cfg)
    _check(M.IMG_SIZE > 0 and M.IMG_SIZE % arch["patch_size"] == 0,
           f"MODEL.IMG_SIZE: {M.IMG_SIZE} is not a positive multiple of the patch size {arch['patch_size']}")
    _check(arch["embed_dim"] % arch["num_heads"] == 0,
           f"MODEL.EMBED_DIM: {arch['embed_dim']} is not divisible by MODEL.NUM_HEADS {arch['num_heads']}")
    _check(arch["decoder_embed_dim"] % arch["decoder_num_heads"] == 0,
           f"MODEL.DECODER_EMBED_DIM: {arch['decoder_embed_dim']} is not divisible by MODEL.DECODER_NUM_HEADS "
           f"{arch['decoder_num_heads']}")
    # Both inits give the encoder a fixed 2-D sin-cos position table, and so does the MAE decoder.
    _check(arch["embed_dim"] % 4 == 0, f"MODEL.EMBED_DIM: {arch['embed_dim']} is not a multiple of 4, which the "
                                       f"encoder's 2-D sin-cos position table needs")
    _check(M.MODE != "mae" or arch["decoder_embed_dim"] % 4 == 0,
           f"MODEL.DECODER_EMBED_DIM: {arch['decoder_embed_dim']} is not a multiple of 4, which the decoder's 2-D "
           f"sin-cos position table needs")
    _check(0.0 <= M.MASK_RATIO < 1.0, f"MODEL.MASK_RATIO: expected a value in [0, 1), got {M.MASK_RATIO}")
    if M.MODE == "mae":
        # The MAE loss covers the masked patches only and the encoder sees the visible ones only: a ratio that
        # leaves either set empty would run for days and learn nothing about images. Counted as the model does:
        # int(L * (1 - ratio)) patches kept.
        num_patches = (M.IMG_SIZE // arch["patch_size"]) ** 2
        kept = int(num_patches * (1 - M.MASK_RATIO))
        why = ("masks none of the {} patches, so the MAE loss (on masked patches only) is 0 and nothing trains"
               if kept == num_patches else "keeps none of the {} patches, so the encoder never sees the image")
        _check(0 < kept < num_patches,
               f"MODEL.MASK_RATIO: {M.MASK_RATIO} {why.format(num_patches)}; expected a ratio that masks at least "
               f"one patch and keeps at least one (e.g. 0.75)")
    _check(0.0 <= M.DROP_PATH < 1.0, f"MODEL.DROP_PATH: expected a value in [0, 1), got {M.DROP_PATH}")
    _check(M.IN_CHANS in (1, 3), f"MODEL.IN_CHANS: expected 1 or 3 for image files, got {M.IN_CHANS}")
    _check(M.POOL in POOLS, f"MODEL.POOL: expected one of {POOLS}, got {M.POOL!r}")
    _check(M.INIT in INITS, f"MODEL.INIT: expected one of {INITS}, got {M.INIT!r}")
    if check_paths and M.WEIGHTS:
        if os.path.isdir(M.WEIGHTS):
            from ..checkpoint.io import folder_instead_of_checkpoint

            _check(False, f"MODEL.WEIGHTS: {M.WEIGHTS} {folder_instead_of_checkpoint(M.WEIGHTS)}")
        _check(os.path.isfile(M.WEIGHTS), f"MODEL.WEIGHTS: checkpoint file {M.WEIGHTS!r} not found")

    _check(D.SOURCE in SOURCES, f"DATA.SOURCE: expected one of {SOURCES}, got {D.SOURCE!r}")
    _check(bool(D.PATH), "DATA.PATH is empty: set it to an image folder or a COCO json file")
    _check(not check_paths or os.path.exists(D.PATH), f"DATA.PATH: {D.PATH} does not exist")
    if D.IMAGE_ROOT and check_paths:
        _check(os.path.isdir(D.IMAGE_ROOT), f"DATA.IMAGE_ROOT: {D.IMAGE_ROOT} is not a folder")
    _check(D.NUM_WORKERS >= 0, f"DATA.NUM_WORKERS: expected >= 0, got {D.NUM_WORKERS}")
    _check(len(D.SCALE) == 2 and 0 < D.SCALE[0] <= D.SCALE[1] <= 1,
           f"DATA.SCALE: expected (min, max) with 0 < min <= max <= 1, got {tuple(D.SCALE)}")
    _check(len(D.RATIO) == 2 and 0 < D.RATIO[0] <= D.RATIO[1],
           f"DATA.RATIO: expected (min, max) with 0 < min <= max, got {tuple(D.RATIO)}")
    _check(len(D.MEAN) == M.IN_CHANS and len(D.STD) == M.IN_CHANS,
           f"DATA.MEAN/DATA.STD: expected {M.IN_CHANS} values each (MODEL.IN_CHANS), "
           f"got {len(D.MEAN)} and {len(D.STD)}")
    _check(all(s > 0 for s in D.STD), f"DATA.STD: expected positive values, got {tuple(D.STD)}")
    _check(not D.CHANNEL_SHUFFLE or M.IN_CHANS == 3,
           f"DATA.CHANNEL_SHUFFLE: needs RGB input (MODEL.IN_CHANS 3), got MODEL.IN_CHANS {M.IN_CHANS}")
    _check(0.0 <= D.MAX_BAD_FRACTION <= 1.0,
           f"DATA.MAX_BAD_FRACTION: expected a value in [0, 1], got {D.MAX_BAD_FRACTION}")
    _check(D.MAX_PIXELS > 0, f"DATA.MAX_PIXELS: expected > 0, got {D.MAX_PIXELS}")
    _check(D.DECODE_DEVICE in DECODE_DEVICES,
           f"DATA.DECODE_DEVICE: expected one of {DECODE_DEVICES}, got {D.DECODE_DEVICE!r}")
    _check(not (D.DECODE_DEVICE == "cuda" and cfg.DEVICE == "cpu"),
           "DATA.DECODE_DEVICE: cuda decoding needs DEVICE cuda or auto, got DEVICE cpu")
    _check(D.CACHE_DECODED_MB >= 0, f"DATA.CACHE_DECODED_MB: expected >= 0 MiB (0 = off), got {D.CACHE_DECODED_MB}")
    _check(not (D.CACHE_DECODED_MB > 0 and D.DECODE_DEVICE == "cuda"),
           "DATA.CACHE_DECODED_MB: caches images decoded on the CPU; with DATA.DECODE_DEVICE cuda set it to 0")

    for key in ("EPOCHS", "BATCH_SIZE", "ACCUM_ITER"):
        _check(S[key] >= 1, f"SOLVER.{key}: expected >= 1, got {S[key]}")
    _check(S.EFFECTIVE_BATCH_SIZE >= 0,
           f"SOLVER.EFFECTIVE_BATCH_SIZE: expected >= 0 (0 = off), got {S.EFFECTIVE_BATCH_SIZE}")
    _check(S.BASE_LR > 0 or S.LR > 0, f"SOLVER.BASE_LR / SOLVER.LR: one must be > 0, got {S.BASE_LR} / {S.LR}")
    _check(S.MIN_LR >= 0, f"SOLVER.MIN_LR: expected >= 0, got {S.MIN_LR}")
    if S.LR > 0:
        check_min_lr("SOLVER.MIN_LR", S.MIN_LR, S.LR, "SOLVER.LR")
    elif S.EFFECTIVE_BATCH_SIZE > 0:  # otherwise the batch, and so the peak, depends on the number of processes
        check_min_lr("SOLVER.MIN_LR", S.MIN_LR, S.BASE_LR * S.EFFECTIVE_BATCH_SIZE / 256,
                     f"SOLVER.BASE_LR x batch {S.EFFECTIVE_BATCH_SIZE}/256")
    _check(0 <= S.WARMUP_EPOCHS < S.EPOCHS,
           f"SOLVER.WARMUP_EPOCHS: expected 0 <= value < SOLVER.EPOCHS ({S.EPOCHS}), got {S.WARMUP_EPOCHS}")
    _check(S.WEIGHT_DECAY >= 0, f"SOLVER.WEIGHT_DECAY: expected >= 0, got {S.WEIGHT_DECAY}")
    _check(len(S.BETAS) == 2 and all(0 <= b < 1 for b in S.BETAS),
           f"SOLVER.BETAS: expected two values in [0, 1), got {tuple(S.BETAS)}")
    _check(S.CLIP_GRAD >= 0, f"SOLVER.CLIP_GRAD: expected >= 0 (0 = off), got {S.CLIP_GRAD}")
    _check(S.CHECKPOINT_ITER_PERIOD >= 0,
           f"SOLVER.CHECKPOINT_ITER_PERIOD: expected >= 0 (0 = off), got {S.CHECKPOINT_ITER_PERIOD}")
    _check(S.COMPILE in COMPILE_CHOICES, f"SOLVER.COMPILE: expected one of {COMPILE_CHOICES}, got {S.COMPILE!r}")

    _check(cfg.CHECKPOINT_PERIOD >= 1, f"CHECKPOINT_PERIOD: expected >= 1 epoch, got {cfg.CHECKPOINT_PERIOD}")
    _check(cfg.CHECKPOINT_KEEP >= 0, f"CHECKPOINT_KEEP: expected >= 0 (0 = keep all), got {cfg.CHECKPOINT_KEEP}")
    _check(cfg.LOG_PERIOD >= 1, f"LOG_PERIOD: expected >= 1, got {cfg.LOG_PERIOD}")
    _check(cfg.PRECISION in PRECISIONS, f"PRECISION: expected one of {PRECISIONS}, got {cfg.PRECISION!r}")
    _check(cfg.DEVICE in DEVICES, f"DEVICE: expected one of {DEVICES}, got {cfg.DEVICE!r}")
    _check(not (cfg.PRECISION == "fp16" and cfg.DEVICE == "cpu"),
           "PRECISION: fp16 needs a GPU (its gradient scaler is CUDA-only); use bf16 or fp32 on CPU")
    _check(0 <= cfg.SEED < 2**63, f"SEED: expected an integer in [0, 2**63), got {cfg.SEED}")  # a signed 64-bit key
    _check(bool(cfg.OUTPUT_DIR), "OUTPUT_DIR is empty")

    if K.ENABLED:
        for key in ("TRAIN_ROOT", "VAL_ROOT"):
            _check(bool(K[key]), f"MONITOR.KNN.{key} is empty: set it to a labeled ImageFolder tree")
            _check(not check_paths or os.path.isdir(K[key]), f"MONITOR.KNN.{key}: {K[key]} is not a folder")
        _check(K.PERIOD >= 1, f"MONITOR.KNN.PERIOD: expected >= 1 epoch, got {K.PERIOD}")
        _check(K.K >= 1, f"MONITOR.KNN.K: expected >= 1, got {K.K}")
        _check(K.TEMPERATURE > 0, f"MONITOR.KNN.TEMPERATURE: expected > 0, got {K.TEMPERATURE}")
        _check(K.POOL in POOLS, f"MONITOR.KNN.POOL: expected one of {POOLS}, got {K.POOL!r}")
