"""yacs keys of semantic segmentation with the ViT encoder (UperNet head, sliding-window inference, datasets).

Detectron2's own ``MODEL.SEM_SEG_HEAD`` keys keep their meaning (``NAME``, ``IN_FEATURES``, ``NUM_CLASSES``,
``IGNORE_VALUE``, ``CONVS_DIM`` = UperNet's channel width, ``NORM``, ``LOSS_WEIGHT``). Keys added by
:func:`add_sem_seg_config` (defaults in brackets)::

    MODEL.SEM_SEG_HEAD.POOL_SCALES [(1, 2, 3, 6)]  pyramid pooling bins on the coarsest level
    MODEL.SEM_SEG_HEAD.DROPOUT [0.1]               dropout before each classifier
    MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT [0.4]       weight of the auxiliary FCN head's loss; 0 = no auxiliary head
    MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE [""]         level the auxiliary head reads; "" = the third of IN_FEATURES
                                                   (with the four default levels: the stride-``patch`` map)
    MODEL.SEM_SEG_HEAD.AUX_CONVS_DIM [256]         channels of the auxiliary head's 3x3 conv
    INPUT.CROP.SINGLE_CATEGORY_MAX_AREA [1.0]      training crops are redrawn (up to 10 times) while one class covers more
                                                   than this fraction of the crop; 1.0 = off (mmsegmentation ADE20K: 0.75)
    TEST.SLIDE.ENABLED [False]                     sliding-window inference (mmsegmentation's "slide" mode)
    TEST.SLIDE.CROP_SIZE [512]                     window side in pixels of the (test-resized) image
    TEST.SLIDE.STRIDE [341]                        step between windows; overlapping logits are averaged
    SOLVER.POLY_LR_POWER [1.0]                     LR_SCHEDULER_NAME "WarmupPolyLR": lr * (1 - t / T) ** power
    DATASETS.REGISTER_SEM_SEG [[]]                 semantic datasets to register: [name, image_root, label_root,
                                                   classes_file]; label PNG = image stem + ".png", mode "L", values
                                                   0..K-1 or IGNORE_VALUE; classes_file: one class name per line
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

from .vit_backbone import NORMS

SEM_SEG_KEY = "DATASETS.REGISTER_SEM_SEG"
# Norms that use the statistics of the batch in training; the synchronized ones too, since a total batch of one
# image means a single process with nothing to synchronize with.
BATCH_NORMS = ("BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N")


def add_sem_seg_config(cfg: CN) -> CN:
    """Adds the keys of the module docstring to a Detectron2 config."""
    h = cfg.MODEL.SEM_SEG_HEAD
    h.POOL_SCALES = (1, 2, 3, 6)
    h.DROPOUT = 0.1
    h.AUX_LOSS_WEIGHT = 0.4
    h.AUX_IN_FEATURE = ""
    h.AUX_CONVS_DIM = 256
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    cfg.TEST.SLIDE = CN()
    cfg.TEST.SLIDE.ENABLED = False
    cfg.TEST.SLIDE.CROP_SIZE = 512
    cfg.TEST.SLIDE.STRIDE = 341
    cfg.SOLVER.POLY_LR_POWER = 1.0
    cfg.DATASETS.REGISTER_SEM_SEG = []
    return cfg


def validate_sem_seg_config(cfg: CN) -> None:
    """Checks the keys of this module.

    Raises:
        ValueError: one line naming the key, its value and what is expected.
    """
    h, s = cfg.MODEL.SEM_SEG_HEAD, cfg.TEST.SLIDE
    if not h.POOL_SCALES or any(not isinstance(b, int) or isinstance(b, bool) or b <= 0 for b in h.POOL_SCALES):
        raise ValueError(f"MODEL.SEM_SEG_HEAD.POOL_SCALES = {h.POOL_SCALES!r}: expected positive integers")
    if not 0.0 <= h.DROPOUT < 1.0:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.DROPOUT = {h.DROPOUT}: expected a value in [0, 1)")
    if h.AUX_LOSS_WEIGHT < 0:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT = {h.AUX_LOSS_WEIGHT}: expected >= 0 (0 = no auxiliary head)")
    if h.NORM not in NORMS:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.NORM = {h.NORM!r}: expected a Detectron2 norm name, one of {list(NORMS)}")
    if h.CONVS_DIM <= 0:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.CONVS_DIM = {h.CONVS_DIM}: expected a positive channel count")
    if h.AUX_LOSS_WEIGHT > 0 and h.AUX_CONVS_DIM <= 0:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.AUX_CONVS_DIM = {h.AUX_CONVS_DIM}: expected a positive channel count; "
                         "for no auxiliary head set MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT 0")
    if h.NORM == "GN" and (h.CONVS_DIM % 32 or h.AUX_CONVS_DIM % 32):
        raise ValueError(f"MODEL.SEM_SEG_HEAD.NORM 'GN' (32 groups) needs CONVS_DIM and AUX_CONVS_DIM divisible by 32, "
                         f"got {h.CONVS_DIM}, {h.AUX_CONVS_DIM}")
    if h.NAME == "UperNetHead" and cfg.SOLVER.IMS_PER_BATCH == 1 and h.NORM in BATCH_NORMS and 1 in h.POOL_SCALES:
        raise ValueError(f"SOLVER.IMS_PER_BATCH 1 with MODEL.SEM_SEG_HEAD.NORM {h.NORM!r} and 1 in "
                         "MODEL.SEM_SEG_HEAD.POOL_SCALES: the 1x1 pooling bin batch-normalizes one value per channel, "
                         "which fails at the first training step; train with 2 or more images a step, NORM 'GN', or "
                         "POOL_SCALES without 1")
    if h.AUX_IN_FEATURE and h.AUX_IN_FEATURE not in h.IN_FEATURES:
        raise ValueError(f"MODEL.SEM_SEG_HEAD.AUX_IN_FEATURE = {h.AUX_IN_FEATURE!r}: expected one of "
                         f"MODEL.SEM_SEG_HEAD.IN_FEATURES {list(h.IN_FEATURES)} or ''")
    if not 0.0 < cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA <= 1.0:
        raise ValueError(f"INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = {cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA}: "
                         "expected a value in (0, 1]")
    if s.CROP_SIZE <= 0 or not 0 < s.STRIDE <= s.CROP_SIZE:
        raise ValueError(f"TEST.SLIDE: expected CROP_SIZE > 0 and 0 < STRIDE <= CROP_SIZE, got {s.CROP_SIZE}, {s.STRIDE}")
    if cfg.SOLVER.POLY_LR_POWER <= 0:
        raise ValueError(f"SOLVER.POLY_LR_POWER = {cfg.SOLVER.POLY_LR_POWER}: expected > 0")
    names = set()
    for entry in cfg.DATASETS.REGISTER_SEM_SEG:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 4 and all(isinstance(x, str) and x for x in entry)):
            raise ValueError(f"{SEM_SEG_KEY}: each entry must be [name, image_root, label_root, classes_file] "
                             f"(non-empty strings), got {entry!r}")
        if entry[0] in names:
            raise ValueError(f"{SEM_SEG_KEY}: dataset name {entry[0]!r} appears twice")
        names.add(entry[0])
