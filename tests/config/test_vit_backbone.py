"""MODEL.VIT keys: defaults, derived block indexes, and one-line validation errors naming the key."""
import pytest
from detectron2.config import get_cfg

from mae_det.config.vit_backbone import add_vit_config, global_attn_indexes, tap_indexes, validate_vit_config, vit_dims


def cfg_with(**vit):
    cfg = add_vit_config(get_cfg())
    for k, v in vit.items():
        cfg.MODEL.VIT[k] = v
    return cfg


def test_defaults_are_vitdet_base():
    cfg = cfg_with()
    validate_vit_config(cfg)
    assert vit_dims(cfg) == (768, 12, 12)
    assert global_attn_indexes(cfg) == tap_indexes(cfg) == [2, 5, 8, 11]
    assert global_attn_indexes(cfg_with(SIZE="large")) == [5, 11, 17, 23]
    assert global_attn_indexes(cfg_with(SIZE="huge")) == [7, 15, 23, 31]
    assert (cfg.MODEL.VIT.WINDOW_SIZE, cfg.MODEL.VIT.USE_REL_POS, cfg.MODEL.VIT.OUT_CHANNELS) == (14, True, 256)
    assert cfg.MODEL.WEIGHTS_FORMAT == "auto"


def test_yaml_style_overrides_of_optional_lists():
    cfg = cfg_with()
    cfg.merge_from_list(["MODEL.VIT.GLOBAL_ATTN_INDEXES", "[1, 3]", "MODEL.VIT.TAP_INDEXES", "[0, 1, 2, 3]"])
    validate_vit_config(cfg)
    assert global_attn_indexes(cfg) == [1, 3] and tap_indexes(cfg) == [0, 1, 2, 3]


def test_window_that_does_not_divide_the_grid_is_valid():
    validate_vit_config(cfg_with(WINDOW_SIZE=14, INPUT_SIZE=1024 + 32, PRETRAIN_IMG_SIZE=224))  # 66-token grid


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(WINDOW_SIZE=-1), r"MODEL.VIT.WINDOW_SIZE = -1: expected an integer >= 0"),
        (dict(WINDOW_SIZE=0, GLOBAL_ATTN_INDEXES=[2, 5]), r"MODEL.VIT.WINDOW_SIZE = 0: must be > 0 when"),
        (dict(GLOBAL_ATTN_INDEXES=[2, 12]), r"MODEL.VIT.GLOBAL_ATTN_INDEXES = \[2, 12\]: \[12\] out of range for depth 12"),
        (dict(PRETRAIN_IMG_SIZE=200), r"MODEL.VIT.PRETRAIN_IMG_SIZE = 200: expected a positive multiple of PATCH_SIZE = 16"),
        (dict(PATCH_SIZE=14), r"MODEL.VIT.PATCH_SIZE = 14: expected a power of two"),
        (dict(SIZE="gigantic"), r"MODEL.VIT.SIZE must be one of"),
        (dict(SIZE="custom", EMBED_DIM=100, NUM_HEADS=3), r"MODEL.VIT.EMBED_DIM = 100: must be divisible by"),
        (dict(PYRAMID="fpn"), r"MODEL.VIT.PYRAMID = 'fpn': expected one of \['simple', 'multi_tap'\]"),
        (dict(TAP_INDEXES=[5, 2, 8, 11]), r"MODEL.VIT.TAP_INDEXES = \[5, 2, 8, 11\]: expected 4 increasing"),
        (dict(NORM="LayerNorm"), r"MODEL.VIT.NORM = 'LayerNorm': expected a Detectron2 norm name"),
        (dict(SQUARE_PAD=1000), r"MODEL.VIT.SQUARE_PAD = 1000: expected 0 or a positive multiple of 2 \* PATCH_SIZE = 32"),
        (dict(DROP_PATH_RATE=1.0), r"MODEL.VIT.DROP_PATH_RATE = 1.0: expected a value in \[0, 1\)"),
        (dict(INIT="xavier"), r"MODEL.VIT.INIT = 'xavier': expected one of \['vitdet', 'mae'\]"),
        (dict(SIZE="custom", EMBED_DIM=66, NUM_HEADS=3, INIT="mae"),
         r"^MODEL.VIT.EMBED_DIM = 66: must be a multiple of 4 with MODEL.VIT.INIT 'mae' \(its 2-D sin-cos position"),
        (dict(SIZE="custom", EMBED_DIM=96, NUM_HEADS=3, NORM="GN"),
         r"^MODEL.VIT.NORM = 'GN': the simple pyramid's stride PATCH_SIZE/4 branch norms embed dim / 2 = 48 channels"),
    ],
)
def test_invalid_values_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match) as e:
        validate_vit_config(cfg_with(**overrides))
    assert "\n" not in str(e.value)


def test_unknown_weights_format():
    cfg = cfg_with()
    cfg.MODEL.WEIGHTS_FORMAT = "caffe2"
    with pytest.raises(ValueError, match=r"MODEL.WEIGHTS_FORMAT = 'caffe2': expected one of"):
        validate_vit_config(cfg)


def test_widths_that_only_some_settings_constrain():
    # vitdet init draws its position table (no sin-cos); multi_tap norms the full width (96 = 3 x 32) with GN and
    # NORM only on OUT_CHANNELS.
    validate_vit_config(cfg_with(SIZE="custom", EMBED_DIM=66, NUM_HEADS=3, INIT="vitdet"))
    validate_vit_config(cfg_with(SIZE="custom", EMBED_DIM=96, NUM_HEADS=3, NORM="GN", PYRAMID="multi_tap"))
    validate_vit_config(cfg_with(SIZE="custom", EMBED_DIM=128, NUM_HEADS=2, NORM="GN"))


def test_semantic_backbone_checks_its_upsample_norm_whatever_pyramid_and_not_the_unused_pyramid_norm():
    """build_vit_multitap_backbone builds the multi_tap levels (UPSAMPLE_NORM in the stride-4 branch) whatever
    PYRAMID says, and no pyramid convs (NORM, OUT_CHANNELS unused)."""
    def semantic(**vit):
        cfg = cfg_with(SIZE="custom", NUM_HEADS=3, **vit)
        cfg.MODEL.BACKBONE.NAME = "build_vit_multitap_backbone"
        return cfg

    for pyramid in ("simple", "multi_tap"):
        with pytest.raises(ValueError) as e:
            validate_vit_config(semantic(EMBED_DIM=48, UPSAMPLE_NORM="GN", PYRAMID=pyramid))
        assert str(e.value) == "MODEL.VIT.UPSAMPLE_NORM = 'GN': needs an embed dim divisible by 32 (32 groups), got 48"
    validate_vit_config(semantic(EMBED_DIM=48, UPSAMPLE_NORM="BN"))
    validate_vit_config(semantic(EMBED_DIM=96, NORM="GN", OUT_CHANNELS=48))  # both unused: valid
    with pytest.raises(ValueError, match=r"^MODEL.VIT.NORM = 'GN': the simple pyramid's"):  # detection still checked
        validate_vit_config(cfg_with(SIZE="custom", EMBED_DIM=96, NUM_HEADS=3, NORM="GN"))
