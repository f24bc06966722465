"""yacs keys of the ViT-FPN detection backbone (``MODEL.VIT.*``) and their validation.

Every key, its default and meaning (``add_vit_config`` adds exactly these)::

    MODEL.VIT.SIZE: "base"          tiny | small | base | large | huge (embed dim, depth, heads of
                                    mae_det.modeling.VIT_SIZES) or "custom" (EMBED_DIM / DEPTH / NUM_HEADS below)
    MODEL.VIT.EMBED_DIM / DEPTH / NUM_HEADS: 768 / 12 / 12   used only with SIZE "custom"
    MODEL.VIT.PATCH_SIZE: 16        patch side; a power of two >= 4, since the pyramid strides are patch/4 ..
                                    2*patch (16 gives p2-p5; a patch-14 checkpoint is resampled on load)
    MODEL.VIT.PRETRAIN_IMG_SIZE: 224   image size of pretraining: sizes the absolute position table, which is
                                    resampled to each input's grid at run time
    MODEL.VIT.IN_CHANS: 3           input channels
    MODEL.VIT.DROP_PATH_RATE: 0.1   stochastic depth, linear over blocks (ViTDet: 0.1 B, 0.4 L, 0.5 H)
    MODEL.VIT.WINDOW_SIZE: 14       windowed attention side in tokens (0 = global attention in every block); a
                                    size that does not divide the grid is valid (windows are padded)
    MODEL.VIT.GLOBAL_ATTN_INDEXES: None   0-based blocks with global attention when WINDOW_SIZE > 0; None = the
                                    blocks d/4, d/2, 3d/4, d (ViT-B: [2, 5, 8, 11])
    MODEL.VIT.USE_REL_POS: True     decomposed relative position in every block (zero-initialized)
    MODEL.VIT.INPUT_SIZE: 1024      detection input side the global blocks' relative-position tables are sized
                                    for (set it to the LSJ / square-pad size); other sizes interpolate them
    MODEL.VIT.ACT_CHECKPOINT: False recompute block activations in backward (memory for time)
    MODEL.VIT.PYRAMID: "simple"     "simple" (ViTDet: all levels from the last block, no top-down path) or
                                    "multi_tap" (MAE App. A.3: blocks TAP_INDEXES resampled, then a standard FPN)
    MODEL.VIT.TAP_INDEXES: None     multi_tap: the four 0-based blocks tapped for strides 4, 8, 16, 32; None =
                                    d/4, d/2, 3d/4, d (ViT-B: [2, 5, 8, 11])
    MODEL.VIT.OUT_CHANNELS: 256     channels of p2-p6
    MODEL.VIT.NORM: "LN"            norm of the pyramid convs (a Detectron2 get_norm name: "LN" for ViTDet's
                                    simple pyramid, "BN" / "SyncBN" / "GN" for the multi_tap FPN, "" for none)
    MODEL.VIT.UPSAMPLE_NORM: "GN"   multi_tap and build_vit_multitap_backbone: norm between the two deconvs of the
                                    stride-4 branch (simple mode uses NORM there, as ViTDet)
    MODEL.VIT.INIT: "vitdet"        random initialization of the encoder: "vitdet" (Detectron2 ViTDet's rules: trunc-
                                    normal std 0.02 Linear weights and position table, zero biases and relative-
                                    position tables, PyTorch's default patch conv) or "mae" (the MAE model's: xavier-
                                    uniform, sin-cos table: an embed dim divisible by 4). Matters only without
                                    MODEL.WEIGHTS (INIT_TYPE scratch)
    MODEL.VIT.SQUARE_PAD: 0         > 0: pad every batch to this square size (ViTDet: 1024), at least the largest
                                    input side (checked by mae_det.config.detection); 0 = pad only to the
                                    backbone's size divisibility (2 * patch)
    MODEL.VIT.COMPILE: "auto"       torch.compile the backbone (ViT + pyramid) in place for training: "on", "off"
                                    or "auto" = on for CUDA with SQUARE_PAD > 0 (fixed input size; other sizes
                                    recompile); the heads have data-dependent shapes and stay eager
    MODEL.WEIGHTS_FORMAT: "auto"    format of MODEL.WEIGHTS: "auto" (detected from the content), "ours",
                                    "official", "timm", "hf", "d2" (this model's Detectron2 checkpoints) or
                                    "vitdet" (Detectron2's ViTDet model zoo)
"""
from __future__ import annotations

import math

from detectron2.config import CfgNode as CN

from ..modeling.vit import VIT_SIZES

PYRAMIDS = ("simple", "multi_tap")
# Backbone builders reading MODEL.VIT: detection (p2-p6 after a pyramid) and semantic segmentation (four raw taps).
VIT_BACKBONES = ("build_vit_fpn_backbone", "build_vit_multitap_backbone")
INITS = ("vitdet", "mae")
WEIGHTS_FORMATS = ("auto", "ours", "official", "timm", "hf", "d2", "vitdet")
NORMS = ("", "BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")
COMPILE_CHOICES = ("auto", "on", "off")


def add_vit_config(cfg: CN) -> CN:
    """Adds ``MODEL.VIT.*`` and ``MODEL.WEIGHTS_FORMAT`` (see the module docstring) to a Detectron2 config."""
    cfg.MODEL.VIT = CN()
    v = cfg.MODEL.VIT
    v.SIZE = "base"
    v.EMBED_DIM = 768
    v.DEPTH = 12
    v.NUM_HEADS = 12
    v.PATCH_SIZE = 16
    v.PRETRAIN_IMG_SIZE = 224
    v.IN_CHANS = 3
    v.DROP_PATH_RATE = 0.1
    v.WINDOW_SIZE = 14
    v.GLOBAL_ATTN_INDEXES = None
    v.USE_REL_POS = True
    v.INPUT_SIZE = 1024
    v.ACT_CHECKPOINT = False
    v.PYRAMID = "simple"
    v.TAP_INDEXES = None
    v.OUT_CHANNELS = 256
    v.NORM = "LN"
    v.UPSAMPLE_NORM = "GN"
    v.COMPILE = "auto"
    v.SQUARE_PAD = 0
    v.INIT = "vitdet"
    cfg.MODEL.WEIGHTS_FORMAT = "auto"
    return cfg


def vit_dims(cfg: CN) -> tuple[int, int, int]:
    """(embed_dim, depth, num_heads) of ``MODEL.VIT``."""
    v = cfg.MODEL.VIT
    if v.SIZE == "custom":
        return v.EMBED_DIM, v.DEPTH, v.NUM_HEADS
    if v.SIZE not in VIT_SIZES:
        raise ValueError(f"MODEL.VIT.SIZE must be one of {[*VIT_SIZES, 'custom']}, got {v.SIZE!r}")
    dim, depth, heads, _ = VIT_SIZES[v.SIZE]
    return dim, depth, heads


def quarter_indexes(depth: int) -> list[int]:
    """0-based indexes of blocks d/4, d/2, 3d/4, d: the tap points and global blocks of ViTDet / MAE App. A.3."""
    # max(.., 0): shallow CPU-sized encoders (depth < 4) tap block 0 instead of a negative index, so an index can
    # repeat there (VisionTransformer.forward_spatial returns a repeated block once per request).
    return [max(depth * k // 4 - 1, 0) for k in (1, 2, 3, 4)]


def global_attn_indexes(cfg: CN) -> list[int]:
    """``MODEL.VIT.GLOBAL_ATTN_INDEXES``, or the quarter blocks when it is None."""
    idx = cfg.MODEL.VIT.GLOBAL_ATTN_INDEXES
    return quarter_indexes(vit_dims(cfg)[1]) if idx is None else [int(i) for i in idx]


def tap_indexes(cfg: CN) -> list[int]:
    """``MODEL.VIT.TAP_INDEXES``, or the quarter blocks when it is None."""
    idx = cfg.MODEL.VIT.TAP_INDEXES
    return quarter_indexes(vit_dims(cfg)[1]) if idx is None else [int(i) for i in idx]


def vit_levels(cfg: CN) -> list[str]:
    """Output level names of the ViT backbone ``MODEL.BACKBONE.NAME``, by log2 stride at patch p = PATCH_SIZE.

    ``build_vit_fpn_backbone`` (either PYRAMID): ``p*`` for strides p/4, p/2, p, 2p, 4p (p2-p6 at patch 16);
    ``build_vit_multitap_backbone``: ``tap*`` for strides p/4 .. 2p (tap2-tap5 at patch 16).
    """
    p = cfg.MODEL.VIT.PATCH_SIZE
    if cfg.MODEL.BACKBONE.NAME == "build_vit_multitap_backbone":
        return [f"tap{int(math.log2(s))}" for s in (p // 4, p // 2, p, 2 * p)]
    return [f"p{int(math.log2(s))}" for s in (p // 4, p // 2, p, 2 * p, 4 * p)]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_vit_config(cfg: CN) -> None:
    """Checks ``MODEL.VIT.*`` and ``MODEL.WEIGHTS_FORMAT``.

    Raises:
        ValueError: one line naming the offending key, its value and what is expected.
    """
    v = cfg.MODEL.VIT

    def fail(key: str, value: object, expected: str) -> None:
        raise ValueError(f"MODEL.VIT.{key} = {value!r}: {expected}")

    dim, depth, heads = vit_dims(cfg)
    if v.SIZE == "custom":
        for key, val in (("EMBED_DIM", dim), ("DEPTH", depth), ("NUM_HEADS", heads)):
            if not isinstance(val, int) or val <= 0:
                fail(key, val, "expected a positive integer")
        if dim % heads:
            fail("EMBED_DIM", dim, f"must be divisible by MODEL.VIT.NUM_HEADS = {heads}")
        if v.INIT == "mae" and dim % 4:
            fail("EMBED_DIM", dim, "must be a multiple of 4 with MODEL.VIT.INIT 'mae' (its 2-D sin-cos position table)")
    p = v.PATCH_SIZE
    if not isinstance(p, int) or p < 4 or p & (p - 1):
        fail("PATCH_SIZE", p, "expected a power of two >= 4 (pyramid strides are PATCH_SIZE/4 .. 2*PATCH_SIZE)")
    if v.PRETRAIN_IMG_SIZE <= 0 or v.PRETRAIN_IMG_SIZE % p:
        fail("PRETRAIN_IMG_SIZE", v.PRETRAIN_IMG_SIZE, f"expected a positive multiple of PATCH_SIZE = {p}")
    if v.INPUT_SIZE <= 0 or v.INPUT_SIZE % p:
        fail("INPUT_SIZE", v.INPUT_SIZE, f"expected a positive multiple of PATCH_SIZE = {p}")
    if v.IN_CHANS <= 0:
        fail("IN_CHANS", v.IN_CHANS, "expected a positive integer")
    # Detectron2 feeds the backbone len(MODEL.PIXEL_MEAN) channels.
    if len(cfg.MODEL.PIXEL_MEAN) != v.IN_CHANS:
        fail("IN_CHANS", v.IN_CHANS, f"the model feeds len(MODEL.PIXEL_MEAN) = {len(cfg.MODEL.PIXEL_MEAN)} channels")
    if not 0.0 <= v.DROP_PATH_RATE < 1.0:
        fail("DROP_PATH_RATE", v.DROP_PATH_RATE, "expected a value in [0, 1)")
    if not isinstance(v.WINDOW_SIZE, int) or v.WINDOW_SIZE < 0:
        fail("WINDOW_SIZE", v.WINDOW_SIZE, "expected an integer >= 0 (0 = global attention in every block)")
    if v.GLOBAL_ATTN_INDEXES is not None:
        if not isinstance(v.GLOBAL_ATTN_INDEXES, (list, tuple)):
            fail("GLOBAL_ATTN_INDEXES", v.GLOBAL_ATTN_INDEXES, "expected a list of 0-based block indexes or None")
        if v.GLOBAL_ATTN_INDEXES and v.WINDOW_SIZE == 0:
            fail("WINDOW_SIZE", 0, "must be > 0 when MODEL.VIT.GLOBAL_ATTN_INDEXES selects global blocks")
        bad = [i for i in v.GLOBAL_ATTN_INDEXES if not (_is_int(i) and 0 <= i < depth)]
        if bad:
            fail("GLOBAL_ATTN_INDEXES", list(v.GLOBAL_ATTN_INDEXES), f"{bad} out of range for depth {depth} (0-based)")
    if v.PYRAMID not in PYRAMIDS:
        fail("PYRAMID", v.PYRAMID, f"expected one of {list(PYRAMIDS)}")
    if v.TAP_INDEXES is not None:
        if not isinstance(v.TAP_INDEXES, (list, tuple)):
            fail("TAP_INDEXES", v.TAP_INDEXES, f"expected a list of 4 increasing 0-based block indexes < depth {depth} "
                                               "or None")
        taps = list(v.TAP_INDEXES)
        if len(taps) != 4 or any(not (_is_int(i) and 0 <= i < depth) for i in taps) or sorted(set(taps)) != taps:
            fail("TAP_INDEXES", taps, f"expected 4 increasing 0-based block indexes < depth {depth}")
    for key in ("NORM", "UPSAMPLE_NORM"):
        if v[key] not in NORMS:
            fail(key, v[key], f"expected a Detectron2 norm name, one of {list(NORMS)}")
    if v.OUT_CHANNELS <= 0:
        fail("OUT_CHANNELS", v.OUT_CHANNELS, "expected a positive integer")
    # The semantic builder always builds the multi_tap levels and no pyramid convs: PYRAMID, NORM and
    # OUT_CHANNELS are unused there, UPSAMPLE_NORM is not.
    semantic = cfg.MODEL.BACKBONE.NAME == "build_vit_multitap_backbone"
    multi_tap = semantic or v.PYRAMID == "multi_tap"
    if not semantic and v.NORM == "GN" and v.OUT_CHANNELS % 32:
        fail("OUT_CHANNELS", v.OUT_CHANNELS, "must be a multiple of 32 with NORM 'GN' (32 groups)")
    if not multi_tap and v.NORM == "GN" and (dim // 2) % 32:
        fail("NORM", "GN", f"the simple pyramid's stride PATCH_SIZE/4 branch norms embed dim / 2 = {dim // 2} "
                           "channels, not divisible by 32 groups (needs an embed dim divisible by 64)")
    if multi_tap and v.UPSAMPLE_NORM == "GN" and dim % 32:
        fail("UPSAMPLE_NORM", "GN", f"needs an embed dim divisible by 32 (32 groups), got {dim}")
    if v.COMPILE not in COMPILE_CHOICES:
        fail("COMPILE", v.COMPILE, f"expected one of {list(COMPILE_CHOICES)}")
    if v.SQUARE_PAD < 0 or v.SQUARE_PAD % (2 * p):
        fail("SQUARE_PAD", v.SQUARE_PAD, f"expected 0 or a positive multiple of 2 * PATCH_SIZE = {2 * p}")
    if v.INIT not in INITS:
        fail("INIT", v.INIT, f"expected one of {list(INITS)}")
    if cfg.MODEL.WEIGHTS_FORMAT not in WEIGHTS_FORMATS:
        raise ValueError(f"MODEL.WEIGHTS_FORMAT = {cfg.MODEL.WEIGHTS_FORMAT!r}: expected one of {list(WEIGHTS_FORMATS)}")
