"""Classification config: the data folders must be set (an empty path would be the current folder)."""
from pathlib import Path

import pytest

from mae_det.config.classification import load_cls_cfg
from mae_det.config.pretrain import ConfigError

SHAPES = Path(__file__).resolve().parents[2] / "configs" / "classification" / "shapes_finetune.yaml"


@pytest.mark.parametrize("key", ["TRAIN_ROOT", "VAL_ROOT"])
def test_empty_data_folder_is_a_config_error_naming_the_key(key):
    assert load_cls_cfg(SHAPES).DATA[key]  # the shipped profile sets both
    with pytest.raises(ConfigError) as info:
        load_cls_cfg(SHAPES, [f"DATA.{key}", ""])
    assert str(info.value) == (f"DATA.{key} is empty: set it to a labeled ImageFolder tree "
                               f"(<root>/<class>/<images>)")


def test_embed_width_must_suit_the_sin_cos_position_initialization():
    from mae_det.engine.finetune_cls import build_classifier

    with pytest.raises(ConfigError) as info:
        load_cls_cfg(SHAPES, ["MODEL.EMBED_DIM", "66", "MODEL.NUM_HEADS", "3"])
    assert str(info.value) == ("MODEL.EMBED_DIM: 66 is not a multiple of 4, which the encoder's 2-D sin-cos position "
                               "initialization needs")
    cfg = load_cls_cfg(SHAPES, ["MODEL.EMBED_DIM", "68", "MODEL.NUM_HEADS", "2", "MODEL.DEPTH", "1"])
    assert build_classifier(cfg, 6).pos_embed.shape == (1, 1 + 8 * 8, 68)


def test_an_odd_batch_is_refused_only_while_mixup_or_cutmix_pairs_its_images():
    # timm's Mixup needs pairs: an odd batch lost one image every step while the lr was scaled for all of them
    with pytest.raises(ConfigError) as info:
        load_cls_cfg(SHAPES, ["SOLVER.BATCH_SIZE", "3", "AUG.MIXUP", "0", "AUG.CUTMIX", "1.0"])
    assert str(info.value).startswith("SOLVER.BATCH_SIZE: expected an even value with AUG.MIXUP / AUG.CUTMIX on")
    assert load_cls_cfg(SHAPES, ["SOLVER.BATCH_SIZE", "3", "AUG.MIXUP", "0", "AUG.CUTMIX", "0"]).SOLVER.BATCH_SIZE == 3


def _error(*opts) -> str:
    with pytest.raises(ConfigError) as info:
        load_cls_cfg(SHAPES, list(opts))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_malformed_rand_augment_is_a_config_error_naming_the_key():
    # timm's parser raised a bare AssertionError from inside the validator
    assert _error("AUG.RAND_AUGMENT", "rand_m9") == (
        "AUG.RAND_AUGMENT: 'rand_m9' is not a timm auto-augment string (malformed section); expected e.g. "
        "'rand-m9-mstd0.5-inc1-mmax9'")
    assert _error("AUG.RAND_AUGMENT", "rand-M9") == (
        "AUG.RAND_AUGMENT: 'rand-M9' is not a timm auto-augment string (Unknown RandAugment config section); "
        "expected e.g. 'rand-m9-mstd0.5-inc1-mmax9'")


def test_negative_mlp_ratio_is_refused():
    assert _error("MODEL.MLP_RATIO", "-1.0") == "MODEL.MLP_RATIO: expected >= 0 (0 = ARCH's), got -1.0"


def test_min_lr_above_the_peak_lr_is_refused():
    cfg = load_cls_cfg(SHAPES)
    eff = cfg.SOLVER.BATCH_SIZE * cfg.SOLVER.ACCUM_ITER
    peak = cfg.SOLVER.BASE_LR * eff / 256
    assert _error("SOLVER.MIN_LR", "1.0") == (
        f"SOLVER.MIN_LR 1 exceeds the peak lr {peak:.3g} (SOLVER.BASE_LR x batch {eff}/256)")
    assert _error("SOLVER.LR", "1e-4", "SOLVER.MIN_LR", "1e-3") == (
        "SOLVER.MIN_LR 0.001 exceeds the peak lr 0.0001 (SOLVER.LR)")
    assert _error("LINPROBE.BASE_LR", "0.1", "LINPROBE.BATCH_SIZE", "256", "LINPROBE.MIN_LR", "0.2") == (
        "LINPROBE.MIN_LR 0.2 exceeds the peak lr 0.1 (LINPROBE.BASE_LR x batch 256/256)")


def test_input_channels_and_statistics_are_checked_against_each_other():
    cfg = load_cls_cfg(SHAPES)
    assert (cfg.MODEL.IN_CHANS, cfg.DATA.MEAN, cfg.DATA.STD) == (0, (), ())  # the pretraining's (ImageNet's)
    cfg = load_cls_cfg(SHAPES, ["MODEL.IN_CHANS", "1", "DATA.MEAN", "(0.5,)", "DATA.STD", "(0.25,)"])
    assert (cfg.MODEL.IN_CHANS, cfg.DATA.MEAN, cfg.DATA.STD) == (1, (0.5,), (0.25,))
    assert _error("MODEL.IN_CHANS", "2") == (
        "MODEL.IN_CHANS: expected 1 (grayscale), 3 (RGB) or 0 (the pretraining's), got 2")
    assert _error("DATA.MEAN", "(0.5,)") == (
        "DATA.MEAN / DATA.STD: expected 1 or 3 values each, or both () for the pretraining's, got 1 and 0")
    assert _error("MODEL.IN_CHANS", "1", "DATA.MEAN", "(0.5, 0.5, 0.5)", "DATA.STD", "(1, 1, 1)") == (
        "DATA.MEAN / DATA.STD: expected 1 values each (MODEL.IN_CHANS), or both () for the pretraining's, got 3 and 3")
    assert _error("DATA.MEAN", "(0.5,)", "DATA.STD", "(0.0,)") == "DATA.STD: expected positive values, got (0.0,)"
