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
