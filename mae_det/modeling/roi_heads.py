"""RoI heads whose RoI-to-pyramid-level rule follows the config instead of Detectron2's constants.

Detectron2 assigns a RoI of size ``s = sqrt(area)`` to level ``floor(4 + log2(s / 224))`` (Eqn. 1 of the FPN
paper, sized for ImageNet-scale objects) and builds its poolers with those two numbers fixed. On small inputs the
rule sends every object to the finest level: on the 64 px shapes (objects of 8-40 px, strides 2-16) all RoIs pool
from ``p1`` and the coarser levels only feed the RPN. :class:`LevelMappedROIHeads` is Detectron2's
``StandardROIHeads`` with ``MODEL.ROI_HEADS.CANONICAL_BOX_SIZE`` and ``MODEL.ROI_HEADS.CANONICAL_LEVEL`` applied to
its box, mask and keypoint poolers; at the defaults (224, 4) it computes exactly what ``StandardROIHeads`` does, and
its state-dict keys are the same.
"""
from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads

_POOLERS = ("box_pooler", "mask_pooler", "keypoint_pooler")


@ROI_HEADS_REGISTRY.register()
class LevelMappedROIHeads(StandardROIHeads):
    """``StandardROIHeads`` with the FPN level assignment set by ``MODEL.ROI_HEADS.CANONICAL_*``."""

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: dict[str, ShapeSpec]) -> dict:
        ret = super().from_config(cfg, input_shape)
        for name in _POOLERS:
            if ret.get(name) is not None:
                # ROIPooler reads both attributes at every forward (assign_boxes_to_levels), nothing is cached.
                ret[name].canonical_box_size = cfg.MODEL.ROI_HEADS.CANONICAL_BOX_SIZE
                ret[name].canonical_level = cfg.MODEL.ROI_HEADS.CANONICAL_LEVEL
        return ret
