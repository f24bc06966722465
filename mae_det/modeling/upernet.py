"""UperNet decode head (Xiao et al. 2018) for Detectron2's ``SemanticSegmentor``, as BEiT and MAE use it on ViT.

The head reads the four levels of :func:`~mae_det.modeling.backbone.build_vit_multitap_backbone` (strides p/4 ..
2p, embed-dim channels), not the detection FPN's fused outputs: it brings its own pyramid pooling module (PPM) on
the coarsest level and its own top-down FPN, fuses all levels at the finest stride and classifies each pixel. An
optional auxiliary FCN head on one level adds a weighted loss during training only (mmsegmentation: weight 0.4).
"""
from __future__ import annotations

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn


def conv_norm_relu(in_channels: int, out_channels: int, kernel: int, norm: str) -> Conv2d:
    """A ``kernel`` x ``kernel`` conv (same padding) -> norm -> ReLU, MSRA-initialized; a bias only without norm."""
    conv = Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=not norm,
                  norm=get_norm(norm, out_channels), activation=F.relu)
    weight_init.c2_msra_fill(conv)
    return conv


def classifier(in_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout then a 1x1 conv to class logits (normal std 0.01 init, zero bias)."""
    conv = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(dropout), conv)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: average-pool to ``b`` x ``b`` bins per scale, 1x1 conv, upsample back, concatenate
    with the input, then a 3x3 bottleneck conv to ``channels``."""

    def __init__(self, in_channels: int, channels: int, pool_scales: tuple[int, ...], norm: str) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_norm_relu(in_channels, channels, 1, norm)) for b in pool_scales
        )
        self.bottleneck = conv_norm_relu(in_channels + len(pool_scales) * channels, channels, 3, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, h, w) -> (N, channels, h, w)."""
        size = x.shape[-2:]
        pooled = [F.interpolate(stage(x), size=size, mode="bilinear", align_corners=False) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


@SEM_SEG_HEADS_REGISTRY.register()
class UperNetHead(nn.Module):
    """UperNet: PPM on the coarsest level, top-down FPN over all levels, fusion at the finest stride.

    Training returns ``(None, {"loss_sem_seg", ["loss_sem_seg_aux"]})``; inference returns ``(logits, {})`` with
    logits (N, num_classes, H, W) at the padded input size (finest stride x its feature size), as Detectron2's
    ``SemanticSegmentor`` expects.

    Args:
        input_shape: backbone outputs to use (channels and stride each).
        num_classes: classes predicted per pixel.
        channels: width of the PPM, FPN and fusion convs (mmsegmentation: 512; 768 for MAE ViT-B).
        pool_scales: PPM bins.
        norm: Detectron2 norm name of every conv ("BN", "naiveSyncBN", "GN", ...; "" for none).
        dropout: dropout before the classifiers.
        ignore_value: target value excluded from the loss (and the padding value of targets).
        loss_weight: weight of the main loss.
        aux_in_feature: level the auxiliary FCN head reads ("" = none).
        aux_channels: width of the auxiliary head's 3x3 conv.
        aux_loss_weight: weight of the auxiliary loss (0 = no auxiliary head).
    """

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        num_classes: int,
        channels: int,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        norm: str = "BN",
        dropout: float = 0.1,
        ignore_value: int = 255,
        loss_weight: float = 1.0,
        aux_in_feature: str = "",
        aux_channels: int = 256,
        aux_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        levels = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [name for name, _ in levels]
        in_channels = [s.channels for _, s in levels]
        self.common_stride = levels[0][1].stride
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.ppm = PyramidPooling(in_channels[-1], channels, tuple(pool_scales), norm)
        self.lateral_convs = nn.ModuleList(conv_norm_relu(c, channels, 1, norm) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_norm_relu(channels, channels, 3, norm) for _ in in_channels[:-1])
        self.fuse = conv_norm_relu(len(levels) * channels, channels, 3, norm)
        self.predictor = classifier(channels, num_classes, dropout)
        self.aux_in_feature = aux_in_feature if aux_loss_weight > 0 else ""
        self.aux_loss_weight = aux_loss_weight
        if self.aux_in_feature:
            if aux_in_feature not in input_shape:
                raise ValueError(f"auxiliary head input {aux_in_feature!r} is not among the levels {self.in_features}")
            self.aux_head = nn.Sequential(
                conv_norm_relu(input_shape[aux_in_feature].channels, aux_channels, 3, norm),
                classifier(aux_channels, num_classes, dropout),
            )

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict:
        h = cfg.MODEL.SEM_SEG_HEAD
        missing = [f for f in h.IN_FEATURES if f not in input_shape]
        if missing:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.IN_FEATURES {list(h.IN_FEATURES)}: the backbone has no {missing} "
                             f"(it gives {sorted(input_shape)})")
        return {
            "input_shape": {f: input_shape[f] for f in h.IN_FEATURES},
            "num_classes": h.NUM_CLASSES,
            "channels": h.CONVS_DIM,
            "pool_scales": tuple(h.POOL_SCALES),
            "norm": h.NORM,
            "dropout": h.DROPOUT,
            "ignore_value": h.IGNORE_VALUE,
            "loss_weight": h.LOSS_WEIGHT,
            "aux_in_feature": h.AUX_IN_FEATURE or h.IN_FEATURES[min(2, len(h.IN_FEATURES) - 1)],
            "aux_channels": h.AUX_CONVS_DIM,
            "aux_loss_weight": h.AUX_LOSS_WEIGHT,
        }

    def fuse_levels(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Levels finest..coarsest -> logits (N, num_classes, H/s, W/s) at the finest stride s."""
        xs = [features[f] for f in self.in_features]
        tops = [self.ppm(xs[-1])]  # top-down: coarsest first
        for x, lateral in zip(reversed(xs[:-1]), reversed(self.lateral_convs)):
            lat = lateral(x)
            tops.append(lat + F.interpolate(tops[-1], size=lat.shape[-2:], mode="bilinear", align_corners=False))
        tops = tops[::-1]  # finest first
        size = tops[0].shape[-2:]
        outs = [conv(t) for conv, t in zip(self.fpn_convs, tops[:-1])] + [tops[-1]]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.predictor(self.fuse(torch.cat(outs, dim=1)))

    def forward(
        self, features: dict[str, torch.Tensor], targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """``features``: the backbone's levels; ``targets``: (N, H, W) int64 at the padded input size (training)."""
        logits = self.fuse_levels(features)
        if not self.training:
            return self.upsample(logits, self.common_stride), {}
        losses = {"loss_sem_seg": self.pixel_loss(logits, targets) * self.loss_weight}
        if self.aux_in_feature:
            aux = self.aux_head(features[self.aux_in_feature])
            losses["loss_sem_seg_aux"] = self.pixel_loss(aux, targets) * self.aux_loss_weight
        return None, losses

    @staticmethod
    def upsample(logits: torch.Tensor, factor: int) -> torch.Tensor:
        return F.interpolate(logits, scale_factor=factor, mode="bilinear", align_corners=False)

    def pixel_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the non-ignored pixels of ``targets`` after upsampling ``logits`` to their size.

        A batch without any labelled pixel gives 0 (not the 0/0 of a plain mean), so a crop of only ignored
        pixels cannot stop training.
        """
        logits = F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
        total = F.cross_entropy(logits, targets, ignore_index=self.ignore_value, reduction="sum")
        return total / (targets != self.ignore_value).sum().clamp(min=1)
