"""LevelMappedROIHeads: Detectron2's StandardROIHeads at the defaults, the configured level rule otherwise."""
from pathlib import Path

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, Instances

from mae_det.config.detection import load_det_cfg
from mae_det.config.pretrain import ConfigError

SHAPES = str(Path(__file__).resolve().parents[2] / "configs/shapes/mask_rcnn_vit_scratch.yaml")
STRIDES = {"p1": 2, "p2": 4, "p3": 8, "p4": 16}
CHANNELS = 64


def heads(*opts: str):
    cfg = load_det_cfg(SHAPES, list(opts))
    torch.manual_seed(0)
    shapes = {k: ShapeSpec(channels=CHANNELS, stride=s) for k, s in STRIDES.items()}
    return build_roi_heads(cfg, shapes).eval()


def level_features(size: int = 64) -> dict[str, torch.Tensor]:
    """Each level filled with its own index, so a pooled RoI shows which level it came from."""
    return {k: torch.full((1, CHANNELS, size // s, size // s), float(i + 1)) for i, (k, s) in
            enumerate(STRIDES.items())}


def levels_of(pooled: torch.Tensor) -> list[int]:
    return pooled.amax(dim=(1, 2, 3)).round().int().tolist()


def square_boxes(*sides: float) -> Boxes:
    return Boxes(torch.tensor([[4.0, 4.0, 4.0 + s, 4.0 + s] for s in sides]))


def test_defaults_compute_what_standard_roi_heads_compute():
    ours = heads("MODEL.ROI_HEADS.NAME", "LevelMappedROIHeads")
    theirs = heads()
    assert type(theirs).__name__ == "StandardROIHeads"
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    features = {k: torch.randn(1, CHANNELS, 64 // s, 64 // s) for k, s in STRIDES.items()}
    proposals = Instances((64, 64), proposal_boxes=square_boxes(8, 20, 40, 60),
                          objectness_logits=torch.zeros(4))
    with torch.no_grad():
        a, _ = ours(None, features, [proposals])
        b, _ = theirs(None, features, [proposals])
    assert torch.equal(a[0].pred_boxes.tensor, b[0].pred_boxes.tensor)
    assert torch.equal(a[0].scores, b[0].scores)
    assert torch.equal(a[0].pred_masks, b[0].pred_masks)


def test_default_rule_pools_every_small_object_from_the_finest_level():
    # floor(4 + log2(s / 224)) <= 1 up to 56 px: the shapes' 8-40 px objects never reach p2-p4
    pooled = heads().box_pooler(list(level_features().values()), [square_boxes(8, 16, 40, 60)])
    assert levels_of(pooled) == [1, 1, 1, 2]


@pytest.mark.parametrize("pooler", ["box_pooler", "mask_pooler"])
def test_configured_rule_spreads_objects_over_the_levels(pooler):
    roi_heads = heads("MODEL.ROI_HEADS.NAME", "LevelMappedROIHeads", "MODEL.ROI_HEADS.CANONICAL_BOX_SIZE", "64")
    pooled = getattr(roi_heads, pooler)(list(level_features().values()), [square_boxes(8, 16, 32, 60)])
    # floor(4 + log2(s / 64)): 8 px -> p1, 16 -> p2, 32 -> p3, 60 -> p3 (64 px would be p4)
    assert levels_of(pooled) == [1, 2, 3, 3]


def test_canonical_level_moves_every_roi_by_one_level():
    roi_heads = heads("MODEL.ROI_HEADS.NAME", "LevelMappedROIHeads", "MODEL.ROI_HEADS.CANONICAL_BOX_SIZE", "64",
                      "MODEL.ROI_HEADS.CANONICAL_LEVEL", "3")
    pooled = roi_heads.box_pooler(list(level_features().values()), [square_boxes(8, 16, 32, 64)])
    assert levels_of(pooled) == [1, 1, 2, 3]


def test_a_rule_the_heads_would_ignore_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^MODEL.ROI_HEADS.CANONICAL_BOX_SIZE / CANONICAL_LEVEL \(64, 4\) are only "
                                          r"read by MODEL.ROI_HEADS.NAME LevelMappedROIHeads, got 'StandardROIHeads'$"):
        load_det_cfg(SHAPES, ["MODEL.ROI_HEADS.CANONICAL_BOX_SIZE", "64"])
    with pytest.raises(ConfigError, match="CANONICAL_BOX_SIZE: expected > 0, got 0"):
        load_det_cfg(SHAPES, ["MODEL.ROI_HEADS.NAME", "LevelMappedROIHeads", "MODEL.ROI_HEADS.CANONICAL_BOX_SIZE", "0"])
