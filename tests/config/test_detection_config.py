"""Detection config keys, the COCO recipes and validation (mae_det.config.detection)."""
import argparse
import glob
import os
import re

import pytest
import yaml
from detectron2.engine import DefaultTrainer

from mae_det.config.detection import ConfigError, get_det_cfg, load_det_cfg, setup_det_cfg
from mae_det.utils.precision import bf16_native

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COCO = os.path.join(ROOT, "configs", "COCO")
LEAVES = sorted(p for p in glob.glob(os.path.join(COCO, "*.yaml")) if not os.path.basename(p).startswith("Base-"))
WEIGHTS = ["MODEL.WEIGHTS", "/some/init.pth"]


def _load(name, *opts, training=False):
    return load_det_cfg(os.path.join(COCO, name), list(opts), training=training)


def test_defaults_of_the_added_keys():
    cfg = get_det_cfg()
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.LAYER_DECAY == 0.0 and cfg.SOLVER.PRECISION == "fp32"
    assert tuple(cfg.SOLVER.BETAS) == (0.9, 0.999) and cfg.SOLVER.NO_DECAY_NAMES == ["pos_embed"]
    assert cfg.SOLVER.NORM_NO_DECAY and not cfg.SOLVER.BIAS_NO_DECAY
    assert (cfg.INPUT.LSJ.ENABLED, cfg.INPUT.LSJ.IMAGE_SIZE, cfg.INPUT.LSJ.MIN_SCALE, cfg.INPUT.LSJ.MAX_SCALE) == (False, 1024, 0.1, 2.0)
    assert cfg.DATASETS.REGISTER == [] and cfg.MODEL.INIT_TYPE == "scratch" and cfg.LOG_PERIOD == 20
    assert cfg.MODEL.VIT.SIZE == "base"  # the ViT keys come along


def test_every_coco_leaf_config_loads_and_states_published_ap():
    assert len(LEAVES) == 19  # 12 Mask R-CNN ViT + 1 ResNet-50 + 6 Cascade
    for path in LEAVES:
        cfg = load_det_cfg(path, [], training=False)
        assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)
        text = open(path).read()
        # Published Cascade rows exist for MAE init only; the other Cascade configs say so.
        assert "Published (not measured here)" in text or (
            "cascade" in path and "No published Cascade row" in text), path
        assert cfg.OUTPUT_DIR.endswith(os.path.basename(path)[:-5])


# ViTDet Table 11 (lr, wd, drop path, epochs per init and size); layer decay only with MAE pre-training (App. A.2).
@pytest.mark.parametrize("name, size, dp, ld, lr, wd, globals_, epochs", [
    ("mask_rcnn_vit_b_mae.yaml", "base", 0.1, 0.7, 1e-4, 0.1, [2, 5, 8, 11], 100),
    ("mask_rcnn_vit_l_mae.yaml", "large", 0.4, 0.8, 1e-4, 0.1, [5, 11, 17, 23], 100),
    ("mask_rcnn_vit_b_scratch.yaml", "base", 0.1, 0.0, 1.6e-4, 0.2, [2, 5, 8, 11], 300),
    ("mask_rcnn_vit_l_scratch.yaml", "large", 0.4, 0.0, 1.6e-4, 0.2, [5, 11, 17, 23], 200),
    ("mask_rcnn_vit_b_supervised.yaml", "base", 0.1, 0.0, 8e-5, 0.1, [2, 5, 8, 11], 50),
    ("mask_rcnn_vit_l_supervised.yaml", "large", 0.4, 0.0, 8e-5, 0.1, [5, 11, 17, 23], 50),
    ("cascade_mask_rcnn_vit_b_supervised.yaml", "base", 0.1, 0.0, 8e-5, 0.1, [2, 5, 8, 11], 50),
    ("cascade_mask_rcnn_vit_l_supervised.yaml", "large", 0.4, 0.0, 8e-5, 0.1, [5, 11, 17, 23], 50),
])
def test_vitdet_recipe(name, size, dp, ld, lr, wd, globals_, epochs):
    cfg = _load(name)
    v, S = cfg.MODEL.VIT, cfg.SOLVER
    assert (v.SIZE, v.PYRAMID, v.NORM, v.DROP_PATH_RATE, list(v.GLOBAL_ATTN_INDEXES)) == (size, "simple", "LN", dp, globals_)
    assert (v.WINDOW_SIZE, v.USE_REL_POS, v.INPUT_SIZE, v.SQUARE_PAD) == (14, True, 1024, 1024)
    assert (S.LAYER_DECAY, S.BASE_LR, S.WEIGHT_DECAY, S.OPTIMIZER, S.PRECISION) == (ld, lr, wd, "ADAMW", "fp16")
    assert (S.IMS_PER_BATCH, S.REFERENCE_WORLD_SIZE, S.WARMUP_ITERS, S.WARMUP_FACTOR) == (64, 64, 250, 0.001)
    assert round(S.MAX_ITER * S.IMS_PER_BATCH / 118000) == epochs  # ViTDet: 100 epochs = 184375 iterations
    if "mae" in name:
        assert (S.MAX_ITER, tuple(S.STEPS)) == (184375, (163889, 177546))
    assert cfg.INPUT.LSJ.ENABLED and cfg.INPUT.LSJ.IMAGE_SIZE == 1024 and cfg.INPUT.MAX_SIZE_TEST == 1024
    # ViTDet heads and input
    assert list(cfg.MODEL.RPN.CONV_DIMS) == [-1, -1]
    box = cfg.MODEL.ROI_BOX_HEAD
    assert (box.NUM_CONV, box.NUM_FC, box.FC_DIM, box.NORM, cfg.MODEL.ROI_MASK_HEAD.NORM) == (4, 1, 1024, "LN", "LN")
    assert cfg.INPUT.FORMAT == "RGB" and list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]


# Benchmarking 2.2 (synchronized BN in FPN, box and mask heads), 4.2 (lr, wd, dp; ViT-B from scratch peaks at 200 epochs).
@pytest.mark.parametrize("name, dp, lr, wd, max_iter", [  # 184375 iterations = 100 epochs at batch 64
    ("mask_rcnn_vit_b_mae_fpn.yaml", 0.1, 8e-5, 0.1, 184375), ("mask_rcnn_vit_l_mae_fpn.yaml", 0.3, 8e-5, 0.1, 184375),
    ("mask_rcnn_vit_b_supervised_fpn.yaml", 0.1, 8e-5, 0.1, 92188),
    ("mask_rcnn_vit_b_scratch_fpn.yaml", 0.1, 1.6e-4, 0.2, 368750),
    ("mask_rcnn_vit_l_scratch_fpn.yaml", 0.3, 1.6e-4, 0.2, 737500),
])
def test_benchmarking_recipe(name, dp, lr, wd, max_iter):
    cfg = _load(name)
    assert (cfg.MODEL.VIT.PYRAMID, cfg.MODEL.VIT.NORM, cfg.MODEL.VIT.DROP_PATH_RATE) == ("multi_tap", "SyncBN", dp)
    # NaiveSyncBatchNorm with stats_mode "N" in the heads, as Detectron2's new_baselines: a GPU may have no RoIs.
    assert (cfg.MODEL.ROI_BOX_HEAD.NORM, cfg.MODEL.ROI_MASK_HEAD.NORM) == ("naiveSyncBN_N", "naiveSyncBN_N")
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.LAYER_DECAY) == (lr, wd, 0.0)
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupCosineLR" and cfg.SOLVER.WARMUP_ITERS == 462
    assert cfg.SOLVER.MAX_ITER == max_iter


def test_benchmarking_heads_build_synchronized_batchnorm():
    from detectron2.layers import NaiveSyncBatchNorm
    from detectron2.modeling import build_model

    tiny = ["MODEL.VIT.SIZE", "custom", "MODEL.VIT.EMBED_DIM", 64, "MODEL.VIT.DEPTH", 4, "MODEL.VIT.NUM_HEADS", 2,
            "MODEL.VIT.GLOBAL_ATTN_INDEXES", [3], "MODEL.VIT.WINDOW_SIZE", 2, "MODEL.VIT.PRETRAIN_IMG_SIZE", 64,
            "MODEL.VIT.INPUT_SIZE", 64, "MODEL.VIT.SQUARE_PAD", 64, "INPUT.LSJ.IMAGE_SIZE", 64, "INPUT.MAX_SIZE_TEST", 64,
            "MODEL.VIT.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.CONV_DIM", 16, "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
            "MODEL.ROI_MASK_HEAD.CONV_DIM", 16, "MODEL.DEVICE", "cpu"]
    heads = build_model(_load("mask_rcnn_vit_b_mae_fpn.yaml", *tiny)).roi_heads
    norms = [m for h in (heads.box_head, heads.mask_head) for m in h.modules() if isinstance(m, NaiveSyncBatchNorm)]
    assert len(norms) == 8 and {m._stats_mode for m in norms} == {"N"}  # 4 convs in each head


def test_resnet_baseline_is_detectron2s_3x_recipe():
    cfg = _load("mask_rcnn_R_50_FPN_supervised.yaml", training=True)
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone" and cfg.MODEL.RESNETS.DEPTH == 50
    assert (cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH) == ("SGD", 0.02, 270000, 16)
    assert cfg.INPUT.FORMAT == "BGR" and cfg.MODEL.INIT_TYPE == "supervised"


def test_recipes_scale_with_the_gpu_count():
    cfg = DefaultTrainer.auto_scale_workers(_load("mask_rcnn_vit_b_mae.yaml"), 8)
    assert cfg.SOLVER.IMS_PER_BATCH == 8 and cfg.SOLVER.BASE_LR == pytest.approx(1.25e-5)
    assert cfg.SOLVER.MAX_ITER == 184375 * 8 and cfg.SOLVER.WARMUP_ITERS == 2000
    assert tuple(cfg.SOLVER.STEPS) == (163889 * 8, 177546 * 8)


@pytest.mark.parametrize("opts, message", [
    (["SOLVER.OPTIMIZER", "LAMB"], "SOLVER.OPTIMIZER: expected one of"),
    (["SOLVER.PRECISION", "fp8"], "SOLVER.PRECISION: expected one of"),
    (["SOLVER.LAYER_DECAY", "1.5"], "SOLVER.LAYER_DECAY"),
    (["SOLVER.OPTIMIZER", "SGD", "SOLVER.LAYER_DECAY", "0.7"], "only supported with SOLVER.OPTIMIZER ADAMW"),
    (["SOLVER.BETAS", "(0.9,)"], "SOLVER.BETAS"),
    (["SOLVER.CHECKPOINT_KEEP", "-1"], "SOLVER.CHECKPOINT_KEEP: expected >= 0 (0 = keep all), got -1"),
    (["SOLVER.OPTIMIZER", "ADAMW", "SOLVER.LAYER_DECAY", "0.75"],
     "SOLVER.LAYER_DECAY: 0.75 needs a ViT backbone (its blocks give the layer ids), but MODEL.BACKBONE.NAME is "
     "'build_resnet_backbone': set SOLVER.LAYER_DECAY 0"),
    (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH: expected > 0, got 0"),  # the train loader never yielded
    (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER: expected > 0, got 0"),
    # Detectron2's default warmup is 1000 iterations: its lr would peak at 0.1x BASE_LR and never reach it
    (["SOLVER.MAX_ITER", "500"], "SOLVER.WARMUP_ITERS: expected fewer than SOLVER.MAX_ITER (500), got 1000"),
    (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD: expected > 0, got 0"),  # fvcore: modulo by zero
    (["SOLVER.BASE_LR", "-1.0"], "SOLVER.BASE_LR: expected > 0, got -1.0"),
    (["DATALOADER.NUM_WORKERS", "-1"], "DATALOADER.NUM_WORKERS: expected >= 0, got -1"),
    (["DATASETS.TEST", "('a', 'b', 'a')"], "DATASETS.TEST: ['a'] named more than once"),
    (["INPUT.LSJ.MIN_SCALE", "3.0"], "MIN_SCALE <= MAX_SCALE"),
    (["INPUT.LSJ.IMAGE_SIZE", "0"], "INPUT.LSJ.IMAGE_SIZE"),
    # Detectron2 fails building the mapper, or on the first training sample, without naming the key.
    (["INPUT.RANDOM_FLIP", "horizonal"],
     "INPUT.RANDOM_FLIP: expected one of ('horizontal', 'vertical', 'none'), got 'horizonal'"),
    (["INPUT.MASK_FORMAT", "bitmasks"], "INPUT.MASK_FORMAT: expected one of ('polygon', 'bitmask'), got 'bitmasks'"),
    # Each of these failed only in the mapper, the scheduler or the model build, in a traceback.
    (["MODEL.DEVICE", "gpu"], "MODEL.DEVICE: expected cpu or cuda[:N], got 'gpu'"),
    (["MODEL.DEVICE", "CUDA"], "MODEL.DEVICE: expected cpu or cuda[:N], got 'CUDA'"),
    (["INPUT.CROP.ENABLED", "True", "INPUT.CROP.TYPE", "absolut"],
     "INPUT.CROP.TYPE: expected one of ('relative_range', 'relative', 'absolute', 'absolute_range'), got 'absolut'"),
    (["INPUT.MIN_SIZE_TRAIN_SAMPLING", "choise"],
     "INPUT.MIN_SIZE_TRAIN_SAMPLING: expected one of ('choice', 'range'), got 'choise'"),
    (["INPUT.MIN_SIZE_TRAIN_SAMPLING", "range", "INPUT.MIN_SIZE_TRAIN", "(640, 672, 704)"],
     "INPUT.MIN_SIZE_TRAIN: MIN_SIZE_TRAIN_SAMPLING range expects (min, max), got (640, 672, 704)"),
    (["INPUT.FORMAT", "rgb"], "INPUT.FORMAT: expected one of ['RGB', 'BGR', 'YUV-BT.601', 'L'], got 'rgb'"),
    (["INPUT.FORMAT", "L"], "MODEL.PIXEL_MEAN / PIXEL_STD: expected 1 values each (INPUT.FORMAT L), got 3 and 3"),
    (["MODEL.PIXEL_STD", "[0.0, 1.0, 1.0]"], "MODEL.PIXEL_STD: expected positive values, got [0.0, 1.0, 1.0]"),
    (["MODEL.SEM_SEG_HEAD.NORM", "LayerNorm"], "MODEL.SEM_SEG_HEAD.NORM = 'LayerNorm': expected a Detectron2 norm name"),
    (["SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLr"],
     "SOLVER.LR_SCHEDULER_NAME: expected one of ('WarmupMultiStepLR', 'WarmupCosineLR', 'WarmupStepWithFixedGammaLR', "
     "'WarmupPolyLR'), got 'WarmupCosineLr'"),
    (["SOLVER.WARMUP_METHOD", "lin"], "SOLVER.WARMUP_METHOD: expected one of ('linear', 'constant'), got 'lin'"),
    (["MODEL.META_ARCHITECTURE", "GeneralizedRCNNN"],
     "MODEL.META_ARCHITECTURE: 'GeneralizedRCNNN' is not registered; expected one of ['GeneralizedRCNN', "),
    (["MODEL.BACKBONE.NAME", "build_vit_fpn_backbon"],
     "MODEL.BACKBONE.NAME: 'build_vit_fpn_backbon' is not registered; expected one of ["),
    (["MODEL.SEM_SEG_HEAD.CONVS_DIM", "0"], "MODEL.SEM_SEG_HEAD.CONVS_DIM = 0: expected a positive channel count"),
    (["MODEL.SEM_SEG_HEAD.AUX_CONVS_DIM", "0"],
     "MODEL.SEM_SEG_HEAD.AUX_CONVS_DIM = 0: expected a positive channel count; for no auxiliary head set "
     "MODEL.SEM_SEG_HEAD.AUX_LOSS_WEIGHT 0"),
    (["DATASETS.REGISTER", "[['a', 'b.json']]"], "each entry must be [name, json_file, image_root]"),
    (["DATASETS.REGISTER", "[['a', 'b.json', 'c'], ['a', 'd.json', 'e']]"], "'a' appears twice"),
    (["DATASETS.MAX_BAD_FRACTION", "1.5"], "DATASETS.MAX_BAD_FRACTION: expected a value in [0, 1], got 1.5"),
    (["MODEL.INIT_TYPE", "MAE!"], "MODEL.INIT_TYPE: expected a lower-case label"),
    (["MODEL.INIT_TYPE", "mae"], "MODEL.WEIGHTS is empty"),
    (["MODEL.WEIGHTS", "x.pth"], "MODEL.INIT_TYPE is 'scratch' but MODEL.WEIGHTS is set"),
    (["SOLVER.PRECISION", "fp16", "MODEL.DEVICE", "cpu"], "fp16 (Detectron2's AMPTrainer) needs CUDA"),
    (["SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cpu"], "fp16 (Detectron2's AMPTrainer) needs CUDA"),
    (["MODEL.BACKBONE.NAME", "build_vit_fpn_backbone", "MODEL.VIT.WINDOW_SIZE", "-1"], "MODEL.VIT.WINDOW_SIZE"),
    (["SOLVER.NOT_A_KEY", "1"], "command line: unknown config key SOLVER.NOT_A_KEY"),
    (["SOLVER.BASE_LR", "'high'"], "command line: Type mismatch (<class 'float'> vs. <class 'str'>) with values "
                                   "(0.001 vs. high) for config key: SOLVER.BASE_LR"),
    (["SOLVER.BASE_LR"], "KEY VALUE pairs"),
])
def test_invalid_values_are_one_line_errors_naming_the_key(opts, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_det_cfg("", opts)
    assert "\n" not in str(e.value)


def _config(relative, *opts):
    return load_det_cfg(os.path.join(ROOT, "configs", relative), list(opts), training=False)


def test_every_shipped_detection_and_semantic_config_validates():
    paths = [p for p in sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
             if os.path.basename(os.path.dirname(p)) not in ("pretrain", "classification")
             and not os.path.basename(p).startswith("pretrain_")]
    assert {os.path.basename(os.path.dirname(p)) for p in paths} == {"configs", "COCO", "ADE20K", "shapes"}
    for path in paths:
        load_det_cfg(path, [], training=False)


@pytest.mark.parametrize("config, opts, bound", [
    ("shapes/mask_rcnn_vit_scratch.yaml", ["MODEL.VIT.SQUARE_PAD", "32"], "INPUT.LSJ.IMAGE_SIZE 64"),
    ("shapes/mask_rcnn_vit_scratch.yaml", ["MODEL.VIT.SQUARE_PAD", "64", "INPUT.LSJ.ENABLED", "False"],
     "INPUT.MAX_SIZE_TRAIN 1333"),
    ("shapes/mask_rcnn_vit_scratch.yaml", ["MODEL.VIT.SQUARE_PAD", "64", "INPUT.MAX_SIZE_TEST", "80"],
     "INPUT.MAX_SIZE_TEST 80"),
    ("COCO/mask_rcnn_vit_b_mae.yaml", ["MODEL.VIT.SQUARE_PAD", "512"], "INPUT.LSJ.IMAGE_SIZE 1024"),
    # Semantic segmentation pads its training crops and, with slide inference, its test windows.
    ("shapes/sem_seg_vit_scratch.yaml", ["MODEL.VIT.SQUARE_PAD", "64", "INPUT.CROP.ENABLED", "False"],
     "INPUT.MAX_SIZE_TRAIN 256"),
    ("ADE20K/upernet_vit_b_mae.yaml", ["MODEL.VIT.SQUARE_PAD", "256"], "INPUT.CROP.SIZE 512"),
    ("ADE20K/upernet_vit_b_mae.yaml", ["MODEL.VIT.SQUARE_PAD", "512", "TEST.SLIDE.ENABLED", "False"],
     "INPUT.MAX_SIZE_TEST 2048"),
])
def test_square_pad_must_hold_the_largest_input_side(config, opts, bound):
    pad = opts[1]
    with pytest.raises(ConfigError) as e:
        _config(config, *opts)
    side = bound.split()[-1]
    assert str(e.value) == (f"MODEL.VIT.SQUARE_PAD: {pad} is smaller than {bound}, the largest input side; "
                            f"expected 0 (off) or >= {side}")


def test_square_pad_holding_the_largest_input_side_is_valid():
    assert _config("shapes/mask_rcnn_vit_scratch.yaml", "MODEL.VIT.SQUARE_PAD", "64").MODEL.VIT.SQUARE_PAD == 64
    assert _config("shapes/sem_seg_vit_scratch.yaml", "MODEL.VIT.SQUARE_PAD", "64").MODEL.VIT.SQUARE_PAD == 64
    ade = _config("ADE20K/upernet_vit_b_mae.yaml", "MODEL.VIT.SQUARE_PAD", "512")  # 512 crops and windows
    assert ade.MODEL.VIT.SQUARE_PAD == 512 and ade.INPUT.MAX_SIZE_TEST == 2048


@pytest.mark.parametrize("config, opts, message", [
    ("Base-MaskRCNN-ViT.yaml", ["MODEL.VIT.PATCH_SIZE", "8"],
     "MODEL.RPN.IN_FEATURES: ['p6'] are not levels of build_vit_fpn_backbone at MODEL.VIT.PATCH_SIZE 8; expected "
     "names among ['p1', 'p2', 'p3', 'p4', 'p5']"),
    ("Base-MaskRCNN-ViT.yaml", ["MODEL.VIT.PATCH_SIZE", "32", "MODEL.VIT.PYRAMID", "multi_tap"],
     "MODEL.RPN.IN_FEATURES: ['p2'] are not levels of build_vit_fpn_backbone at MODEL.VIT.PATCH_SIZE 32; expected "
     "names among ['p3', 'p4', 'p5', 'p6', 'p7']"),
    ("Base-MaskRCNN-ViT.yaml", ["MODEL.VIT.PATCH_SIZE", "32", "MODEL.RPN.IN_FEATURES", "['p3', 'p4', 'p5', 'p6', 'p7']"],
     "MODEL.ROI_HEADS.IN_FEATURES: ['p2'] are not levels of build_vit_fpn_backbone at MODEL.VIT.PATCH_SIZE 32; "
     "expected names among ['p3', 'p4', 'p5', 'p6', 'p7']"),
    ("shapes/sem_seg_vit_scratch.yaml", ["MODEL.SEM_SEG_HEAD.IN_FEATURES", "['tap2', 'tap3', 'tap4', 'tap5']"],
     "MODEL.SEM_SEG_HEAD.IN_FEATURES: ['tap5'] are not levels of build_vit_multitap_backbone at MODEL.VIT.PATCH_SIZE "
     "8; expected names among ['tap1', 'tap2', 'tap3', 'tap4']"),
])
def test_head_in_features_must_be_levels_of_the_vit_backbone(config, opts, message):
    with pytest.raises(ConfigError) as e:
        _config(config, *opts)
    assert str(e.value) == message


def test_head_in_features_follow_the_patch_size():
    cfg = _config("Base-MaskRCNN-ViT.yaml", "MODEL.VIT.PATCH_SIZE", "8", "MODEL.RPN.IN_FEATURES",
                  "['p1', 'p2', 'p3', 'p4', 'p5']", "MODEL.ROI_HEADS.IN_FEATURES", "['p1', 'p2', 'p3', 'p4']")
    assert list(cfg.MODEL.RPN.IN_FEATURES) == ["p1", "p2", "p3", "p4", "p5"]
    # A ResNet backbone keeps Detectron2's own names: nothing here applies.
    assert _config("COCO/mask_rcnn_R_50_FPN_supervised.yaml").MODEL.RPN.IN_FEATURES == ["p2", "p3", "p4", "p5", "p6"]


def test_evaluation_only_skips_training_checks():
    cfg = load_det_cfg("", ["SOLVER.PRECISION", "fp16", "MODEL.DEVICE", "cpu", "MODEL.INIT_TYPE", "mae"], training=False)
    assert cfg.SOLVER.PRECISION == "fp16"


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_det_cfg(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"SOLVER": {"LAYER_DECAYY": 0.7}}))
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key SOLVER.LAYER_DECAYY"):
        load_det_cfg(str(bad))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"SOLVER": {"LSJ": 1}, "INPUT": {"LSJ": {"ENABLED": "yes"}}}))
    with pytest.raises(ConfigError, match="wrong.yaml"):
        load_det_cfg(str(wrong))


def test_base_file_errors_name_the_base_file_and_yaml_errors_their_line(tmp_path):
    (tmp_path / "base.yaml").write_text("MODEL:\n  VIT:\n    WINDOW_SIZ: 4\n")
    (tmp_path / "child.yaml").write_text("_BASE_: base.yaml\nSOLVER:\n  MAX_ITER: 10\n")
    with pytest.raises(ConfigError, match=r"^\S*/base.yaml: unknown config key MODEL.VIT.WINDOW_SIZ$"):
        load_det_cfg(str(tmp_path / "child.yaml"))
    (tmp_path / "base.yaml").write_text("SOLVER:\n  MAX_ITER: 3\n   BASE_LR: 4\n")
    with pytest.raises(ConfigError, match=r"^\S*/base.yaml: YAML syntax error at line 3, column 11: mapping values are "
                                          r"not allowed here$"):
        load_det_cfg(str(tmp_path / "child.yaml"))
    (tmp_path / "base.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"^\S*/base.yaml: expected a YAML mapping of config keys, got an empty "
                                          r"file$"):
        load_det_cfg(str(tmp_path / "child.yaml"))


def test_malformed_vit_index_lists_and_in_chans_are_config_errors():
    vit = ["MODEL.BACKBONE.NAME", "build_vit_fpn_backbone", "MODEL.RPN.IN_FEATURES", "['p4']",
           "MODEL.ROI_HEADS.IN_FEATURES", "['p4']"]
    for key, expected in (("GLOBAL_ATTN_INDEXES", "expected a list of 0-based block indexes or None"),
                          ("TAP_INDEXES", "expected a list of 4 increasing 0-based block indexes < depth 12 or None")):
        with pytest.raises(ConfigError, match=re.escape(f"MODEL.VIT.{key} = 11: {expected}")):
            load_det_cfg("", [*vit, f"MODEL.VIT.{key}", "11"])
    with pytest.raises(ConfigError, match=re.escape("MODEL.VIT.IN_CHANS = 1: the model feeds len(MODEL.PIXEL_MEAN) = 3 "
                                                    "channels")):
        load_det_cfg("", [*vit, "MODEL.VIT.IN_CHANS", "1"])


def test_evaluation_only_keeps_the_training_runs_config_yaml(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"OUTPUT_DIR": str(tmp_path / "out"), "SEED": -1, "MODEL": {"DEVICE": "cpu"}}))

    def setup(eval_only, resume=False):
        return setup_det_cfg(argparse.Namespace(config_file=str(cfg_file), opts=[], eval_only=eval_only, resume=resume))

    trained = setup(False).SEED
    training_yaml = (tmp_path / "out" / "config.yaml").read_text()
    evaluated = setup(True)
    assert (tmp_path / "out" / "config.yaml").read_text() == training_yaml  # --resume takes this SEED
    assert yaml.safe_load((tmp_path / "out" / "config_eval.yaml").read_text())["SEED"] == evaluated.SEED
    assert setup(False, resume=True).SEED == trained


def test_cuda_device_falls_back_to_cpu_without_gpu():
    import torch

    cfg = load_det_cfg("", ["MODEL.DEVICE", "cuda"])
    assert cfg.MODEL.DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")


def test_setup_resolves_a_random_seed_and_records_it(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"OUTPUT_DIR": str(tmp_path / "out"), "SEED": -1, "MODEL": {"DEVICE": "cpu"}}))
    args = argparse.Namespace(config_file=str(cfg_file), opts=[], eval_only=False, resume=False)
    cfg = setup_det_cfg(args)
    assert cfg.SEED >= 0 and cfg.is_frozen()
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["SEED"] == cfg.SEED


def test_resume_with_changed_settings_is_logged_with_the_keys(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"OUTPUT_DIR": str(tmp_path / "out"), "MODEL": {"DEVICE": "cpu"}}))

    def setup(resume, *opts):
        return setup_det_cfg(argparse.Namespace(config_file=str(cfg_file), opts=list(opts), eval_only=False,
                                                resume=resume))

    log = tmp_path / "out" / "log.txt"
    setup(False)
    setup(True)  # the same settings: nothing to say
    assert "changed since its last launch" not in log.read_text()
    setup(True, "SOLVER.BASE_LR", "0.5", "SOLVER.MAX_ITER", "7000")
    lines = [x for x in log.read_text().splitlines() if "changed since its last launch" in x]
    assert len(lines) == 1 and "2 settings changed since its last launch" in lines[0]
    default = get_det_cfg().SOLVER
    assert f"SOLVER.BASE_LR: {default.BASE_LR} -> 0.5; SOLVER.MAX_ITER: {default.MAX_ITER} -> 7000" in lines[0]
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["SOLVER"]["BASE_LR"] == 0.5
    setup(False, "SOLVER.BASE_LR", "0.25")  # a fresh start may change anything
    assert len([x for x in log.read_text().splitlines() if "changed since its last launch" in x]) == 1


def test_auto_precision_is_bf16_exactly_where_the_device_runs_it_natively():
    import torch

    from mae_det.config.detection import effective_precision

    cfg = load_det_cfg("", ["SOLVER.PRECISION", "auto", "MODEL.DEVICE", "cpu"], training=False)
    assert effective_precision(cfg) == ("bf16" if bf16_native("cpu") else "fp32")
    cfg = load_det_cfg("", ["SOLVER.PRECISION", "bf16", "MODEL.DEVICE", "cpu"], training=False)
    assert effective_precision(cfg) == "bf16"  # explicit settings stay as given
