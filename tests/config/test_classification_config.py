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
