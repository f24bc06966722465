"""ViT-to-FPN adapters: the shared MAE encoder as a Detectron2 backbone producing ``p2``-``p6``.

Two pyramids (``MODEL.VIT.PYRAMID``):

* ``simple`` (ViTDet, Li et al. 2022): the last block's stride-16 map feeds four parallel branches (two
  deconvs, one deconv, identity, max-pool), each followed by a 1x1 and a 3x3 conv with norm; ``p6`` is a
  stride-2 subsample of ``p5``; no top-down path. :class:`ViTSimplePyramid`.
* ``multi_tap`` (MAE App. A.3, Li et al. 2021): blocks d/4, d/2, 3d/4, d are resampled to strides 4, 8, 16, 32
  (:class:`ViTMultiTap`) and feed Detectron2's own FPN with a top-down path and ``LastLevelMaxPool``
  (:class:`ViTFPN`).

The encoder is :class:`~mae_det.modeling.vit.VisionTransformer`, always the attribute ``net`` of the returned
backbone (``backbone.net.blocks.0...`` as in ViTDet for ``simple``; ``backbone.bottom_up.net...`` for
``multi_tap``, reachable as ``backbone.net`` too).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from detectron2.config import CfgNode
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from torch import nn

from ..config.vit_backbone import global_attn_indexes, tap_indexes, validate_vit_config, vit_dims
from .vit import VisionTransformer


def build_vit_encoder(cfg: CfgNode) -> VisionTransformer:
    """The spatial-mode encoder of ``MODEL.VIT``.

    Its ``cls_token`` and final ``norm`` are removed: detection reads block outputs on the token grid only (as
    ViTDet), and parameters that never receive a gradient break DistributedDataParallel. The position table
    keeps its cls slot so pretrained tables load unchanged, and is trained (``learnable_pos_embed``).
    """
    v = cfg.MODEL.VIT
    dim, depth, heads = vit_dims(cfg)
    net = VisionTransformer(
        img_size=v.PRETRAIN_IMG_SIZE,
        patch_size=v.PATCH_SIZE,
        in_chans=v.IN_CHANS,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        drop_path_rate=v.DROP_PATH_RATE,
        window_size=v.WINDOW_SIZE,
        global_attn_indexes=global_attn_indexes(cfg) if v.WINDOW_SIZE > 0 else (),
        use_rel_pos=v.USE_REL_POS,
        rel_pos_grid=v.INPUT_SIZE // v.PATCH_SIZE,
        use_act_checkpoint=v.ACT_CHECKPOINT,
        learnable_pos_embed=True,
        init=v.INIT,
    )
    del net.cls_token, net.norm
    return net


def _conv_pair(in_channels: int, out_channels: int, norm: str) -> tuple[Conv2d, Conv2d]:
    """The 1x1 lateral and 3x3 output convs of one pyramid level; biases only without a norm."""
    use_bias = norm == ""
    lateral = Conv2d(in_channels, out_channels, 1, bias=use_bias, norm=get_norm(norm, out_channels))
    output = Conv2d(out_channels, out_channels, 3, padding=1, bias=use_bias, norm=get_norm(norm, out_channels))
    return lateral, output


def _resampler(stride: int, dim: int, patch: int, norm: str, halve_channels: bool) -> tuple[nn.Module, int]:
    """Resamples a stride-``patch`` map with ``dim`` channels to ``stride`` -> (module, output channels).

    ``halve_channels``: each 2x2 stride-2 deconv halves the channels (ViTDet) instead of keeping them (MAE
    App. A.3).
    """
    if stride == patch:
        return nn.Identity(), dim
    if stride == patch * 2:
        return nn.MaxPool2d(kernel_size=2, stride=2), dim
    c1 = dim // 2 if halve_channels else dim
    if stride * 2 == patch:
        return nn.ConvTranspose2d(dim, c1, 2, stride=2), c1
    if stride * 4 == patch:
        c2 = c1 // 2 if halve_channels else dim
        norm_layer = get_norm(norm, c1)
        # Without a norm (""), an Identity holds its place: the second deconv stays at index 3, where ViTDet's
        # checkpoints (and those of every normed config) have it.
        return nn.Sequential(
            nn.ConvTranspose2d(dim, c1, 2, stride=2), nn.Identity() if norm_layer is None else norm_layer, nn.GELU(),
            nn.ConvTranspose2d(c1, c2, 2, stride=2),
        ), c2
    raise ValueError(f"no resampler from stride {patch} to stride {stride}")


class SimpleLevel(nn.Module):
    """One level of the simple pyramid: resample, then 1x1 ``lateral`` and 3x3 ``output`` convs with norm."""

    def __init__(self, stride: int, dim: int, patch: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.resample, channels = _resampler(stride, dim, patch, norm, halve_channels=True)
        self.lateral, self.output = _conv_pair(channels, out_channels, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.lateral(self.resample(x)))


class _PaddingMixin:
    """``size_divisibility`` / ``padding_constraints`` with the correctly spelled key."""

    _size_divisibility: int
    _square_pad: int

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> dict[str, int]:
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}


class ViTSimplePyramid(_PaddingMixin, Backbone):
    """ViTDet's simple feature pyramid on the last block of ``net``: ``p2``-``p5`` in parallel, ``p6`` by max-pool.

    Inputs are padded to a multiple of ``2 * patch`` (every level then has exactly ``H / stride`` rows) or to
    ``square_pad``; another multiple of the patch still runs (``p5`` and ``p6`` round down), a size that is not a
    multiple of the patch is refused by the encoder's patch embedding.

    Args:
        net: the spatial-mode encoder.
        out_channels: channels of every level.
        norm: Detectron2 norm name of the convs (ViTDet: "LN").
        square_pad: pad batches to this square side (0 = off).
    """

    def __init__(self, net: VisionTransformer, out_channels: int = 256, norm: str = "LN", square_pad: int = 0) -> None:
        super().__init__()
        self.net = net
        p, dim = net.patch_size, net.embed_dim
        strides = {f"p{int(math.log2(s))}": s for s in (p // 4, p // 2, p, 2 * p)}
        self.pyramid = nn.ModuleDict(
            {name: SimpleLevel(s, dim, p, out_channels, norm) for name, s in strides.items()}
        )
        self.top_block = LastLevelMaxPool()
        self.top_block.in_feature = list(strides)[-1]
        self._out_feature_strides = {**strides, f"p{int(math.log2(4 * p))}": 4 * p}
        self._out_features = list(self._out_feature_strides)
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        self._size_divisibility = 2 * p
        self._square_pad = square_pad

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C, H, W), H and W multiples of the patch size -> {"p2": (N, out, H/4, W/4), ..., "p6"}."""
        (last,) = self.net.forward_spatial(x, [self.net.depth - 1])  # (N, D, H/p, W/p)
        out = {name: level(last) for name, level in self.pyramid.items()}
        out[self._out_features[-1]] = self.top_block(out[self.top_block.in_feature])[0]
        return out


class ViTMultiTap(_PaddingMixin, Backbone):
    """Bottom-up half of the ``multi_tap`` pyramid: four block outputs resampled to strides p/4, p/2, p, 2p.

    Outputs are named ``tap2``..``tap5`` (by log2 stride, at patch 16) and keep the embed width; the stride-4
    branch is deconv -> ``upsample_norm`` -> GELU -> deconv. Used alone it is the semantic-segmentation backbone
    (BEiT / mmsegmentation's ViT + Feature2Pyramid), padded as :class:`ViTSimplePyramid` (another multiple of the
    patch runs too: ``tap5`` rounds down and UperNet resamples every level to the next one's size).
    """

    def __init__(
        self, net: VisionTransformer, tap_indexes: list[int], upsample_norm: str = "GN", square_pad: int = 0,
        out_features: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if len(tap_indexes) != 4:
            raise ValueError(f"multi_tap needs 4 tap blocks, got {tap_indexes}")
        self.net = net
        p, dim = net.patch_size, net.embed_dim
        levels = {f"tap{int(math.log2(s))}": (s, i) for s, i in zip((p // 4, p // 2, p, 2 * p), tap_indexes)}
        wanted = list(levels) if out_features is None else list(out_features)
        unknown = [f for f in wanted if f not in levels]
        if unknown:
            raise ValueError(f"multi_tap levels at patch {p} are {list(levels)}; {unknown} requested")
        # Only the levels a head reads are built and run: an unused branch costs compute and, having no gradient,
        # would make multi-process DDP fail without find_unused_parameters.
        self.tap_indexes = [i for f, (_, i) in levels.items() if f in wanted]
        strides = {f: s for f, (s, _) in levels.items() if f in wanted}
        self.resample = nn.ModuleDict(
            {name: _resampler(s, dim, p, upsample_norm, halve_channels=False)[0] for name, s in strides.items()}
        )
        self._out_feature_strides = strides
        self._out_features = list(strides)
        self._out_feature_channels = {k: dim for k in strides}
        self._size_divisibility = 2 * p
        self._square_pad = square_pad

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        taps = self.net.forward_spatial(x, self.tap_indexes)  # 4 x (N, D, H/p, W/p)
        return {name: op(t) for (name, op), t in zip(self.resample.items(), taps)}


class ViTFPN(_PaddingMixin, FPN):
    """Detectron2's FPN over :class:`ViTMultiTap`; ``net`` is the encoder.

    Inputs must be a multiple of ``size_divisibility`` = ``2 * patch`` (or ``square_pad``), as Detectron2's
    ``ImageList.from_tensors`` pads them: the top-down path adds each level to the 2x upsampled next coarser one,
    so every level must be exactly half the size of the one below.
    """

    def __init__(self, bottom_up: ViTMultiTap, out_channels: int = 256, norm: str = "BN", square_pad: int = 0) -> None:
        top_block = LastLevelMaxPool()
        top_block.in_feature = f"p{bottom_up._out_features[-1][len('tap'):]}"  # "p5" at patch 16
        super().__init__(
            bottom_up, bottom_up._out_features, out_channels, norm=norm, top_block=top_block, square_pad=square_pad
        )

    @property
    def net(self) -> VisionTransformer:
        return self.bottom_up.net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C, H, W), H and W multiples of ``2 * patch`` -> {"p2": (N, out, H/4, W/4), ..., "p6"}.

        Raises:
            ValueError: H or W is not a multiple of ``size_divisibility``.
        """
        h, w = x.shape[-2:]
        d = self._size_divisibility
        if h % d or w % d:
            # Else the top-down sum fails on mismatched sizes (an odd token grid halves to a rounded-down level).
            raise ValueError(f"input {h}x{w}: pad to a multiple of size_divisibility={d} (ImageList.from_tensors)")
        return super().forward(x)


def encoder_prefix(cfg: CfgNode) -> str:
    """State-dict prefix of the encoder inside a Detectron2 model built from ``cfg``."""
    if cfg.MODEL.BACKBONE.NAME == "build_vit_multitap_backbone" or cfg.MODEL.VIT.PYRAMID == "simple":
        return "backbone.net."
    return "backbone.bottom_up.net."


@BACKBONE_REGISTRY.register()
def build_vit_multitap_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ViTMultiTap:
    """Builds the four pre-FPN levels of ``MODEL.VIT`` for semantic segmentation
    (``MODEL.BACKBONE.NAME: "build_vit_multitap_backbone"``): blocks ``MODEL.VIT.TAP_INDEXES`` resampled to
    strides p/4 .. 2p with ``UPSAMPLE_NORM`` in the stride-4 branch; ``PYRAMID``, ``NORM`` and ``OUT_CHANNELS``
    are unused (the head brings its own FPN).

    Returns:
        A backbone with the levels of ``MODEL.SEM_SEG_HEAD.IN_FEATURES`` among ``tap2``-``tap5`` (names at patch 16),
        of embed-dim channels; the levels the head does not read are not built.
    """
    validate_vit_config(cfg)
    return ViTMultiTap(build_vit_encoder(cfg), tap_indexes(cfg), cfg.MODEL.VIT.UPSAMPLE_NORM, cfg.MODEL.VIT.SQUARE_PAD,
                       out_features=cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)


@BACKBONE_REGISTRY.register()
def build_vit_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """Builds the ViT-FPN backbone of ``MODEL.VIT`` (``MODEL.BACKBONE.NAME: "build_vit_fpn_backbone"``).

    Args:
        cfg: a config with :func:`~mae_det.config.vit_backbone.add_vit_config` keys.
        input_shape: unused: the input channels are len(MODEL.PIXEL_MEAN), checked against ``MODEL.VIT.IN_CHANS``
            by :func:`~mae_det.config.vit_backbone.validate_vit_config`.

    Returns:
        A backbone with outputs ``p2``-``p6`` of ``MODEL.VIT.OUT_CHANNELS`` channels (at patch 16).
    """
    validate_vit_config(cfg)
    v = cfg.MODEL.VIT
    net = build_vit_encoder(cfg)
    if v.PYRAMID == "simple":
        return ViTSimplePyramid(net, v.OUT_CHANNELS, v.NORM, v.SQUARE_PAD)
    return ViTFPN(ViTMultiTap(net, tap_indexes(cfg), v.UPSAMPLE_NORM), v.OUT_CHANNELS, v.NORM, v.SQUARE_PAD)
