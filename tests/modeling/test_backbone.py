"""The ViT-FPN backbone: pyramid geometry in both modes, padding, registry, and equality with Detectron2's ViTDet."""
import math
import time
from functools import partial

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid, ViT
from detectron2.structures import ImageList
from torch import nn

from mae_det.checkpoint.convert import convert_to_detectron2
from mae_det.config.vit_backbone import add_vit_config, quarter_indexes, vit_levels
from mae_det.modeling.backbone import ViTFPN, ViTSimplePyramid, build_vit_fpn_backbone, build_vit_multitap_backbone
from mae_det.modeling.vit import VisionTransformer


def tiny_cfg(pyramid: str = "simple", **vit):
    cfg = add_vit_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = "build_vit_fpn_backbone"
    v = cfg.MODEL.VIT
    v.SIZE, v.EMBED_DIM, v.DEPTH, v.NUM_HEADS = "custom", 64, 4, 2
    v.PRETRAIN_IMG_SIZE, v.INPUT_SIZE, v.WINDOW_SIZE, v.OUT_CHANNELS = 64, 128, 4, 32
    v.DROP_PATH_RATE = 0.0
    v.PYRAMID = pyramid
    v.NORM = "LN" if pyramid == "simple" else "BN"
    for k, val in vit.items():
        v[k] = val
    return cfg


def build(cfg) -> nn.Module:
    torch.manual_seed(0)
    return build_vit_fpn_backbone(cfg, ShapeSpec(channels=3))


@pytest.mark.parametrize("pyramid", ["simple", "multi_tap"])
@pytest.mark.parametrize("hw", [(128, 128), (96, 160)])  # 96x160: 6x10 grid, 4x4 windows padded
def test_pyramid_shapes_strides_channels(pyramid, hw):
    backbone = build(tiny_cfg(pyramid)).eval()
    spec = backbone.output_shape()
    assert {k: (s.stride, s.channels) for k, s in spec.items()} == {
        "p2": (4, 32), "p3": (8, 32), "p4": (16, 32), "p5": (32, 32), "p6": (64, 32)
    }
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, *hw))
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for name, t in out.items():
        s = spec[name].stride
        assert t.shape == (2, 32, math.ceil(hw[0] / s), math.ceil(hw[1] / s)), name


@pytest.mark.parametrize("pyramid", ["simple", "multi_tap"])
def test_levels_are_named_by_stride_for_other_patch_sizes(pyramid):
    backbone = build(tiny_cfg(pyramid, PATCH_SIZE=8, PRETRAIN_IMG_SIZE=32, INPUT_SIZE=64)).eval()
    assert {k: s.stride for k, s in backbone.output_shape().items()} == {"p1": 2, "p2": 4, "p3": 8, "p4": 16, "p5": 32}
    assert backbone.size_divisibility == 16
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 32, 48))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        "p1": (16, 24), "p2": (8, 12), "p3": (4, 6), "p4": (2, 3), "p5": (1, 2)
    }


def test_multi_tap_levels_come_from_the_tapped_blocks():
    cfg = tiny_cfg("multi_tap", TAP_INDEXES=[0, 1, 2, 3])
    backbone = build(cfg).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        taps = backbone.bottom_up(x)
        blocks = backbone.net.forward_spatial(x, [0, 1, 2, 3])
    assert {k: tuple(v.shape[-2:]) for k, v in taps.items()} == {
        "tap2": (16, 24), "tap3": (8, 12), "tap4": (4, 6), "tap5": (2, 3)
    }
    torch.testing.assert_close(taps["tap4"], blocks[2], rtol=0, atol=0)  # stride 16: identity
    torch.testing.assert_close(taps["tap5"], nn.functional.max_pool2d(blocks[3], 2), rtol=0, atol=0)
    assert taps["tap2"].shape[1] == taps["tap3"].shape[1] == 64  # MAE App. A.3 keeps the width
    assert isinstance(backbone.bottom_up.resample["tap2"][1], nn.GroupNorm)


def semantic_cfg(**vit):
    cfg = tiny_cfg("multi_tap", **vit)
    cfg.MODEL.BACKBONE.NAME = "build_vit_multitap_backbone"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = vit_levels(cfg)
    return cfg


@pytest.mark.parametrize("depth", [2, 3])
def test_shallow_encoders_run_with_their_repeated_default_taps(depth):
    taps = quarter_indexes(depth)
    assert len(set(taps)) < 4  # [0, 0, 0, 1] / [0, 0, 1, 2]: a block feeds several levels
    x = torch.randn(1, 3, 64, 96)
    fpn = build(tiny_cfg("multi_tap", DEPTH=depth)).eval()
    torch.manual_seed(0)
    semantic = build_vit_multitap_backbone(semantic_cfg(DEPTH=depth), ShapeSpec(channels=3)).eval()
    with torch.no_grad():
        out = fpn(x)
        levels = semantic(x)
        blocks = semantic.net.forward_spatial(x, list(range(depth)))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        "p2": (16, 24), "p3": (8, 12), "p4": (4, 6), "p5": (2, 3), "p6": (1, 2)
    }
    assert {k: tuple(v.shape) for k, v in levels.items()} == {
        "tap2": (1, 64, 16, 24), "tap3": (1, 64, 8, 12), "tap4": (1, 64, 4, 6), "tap5": (1, 64, 2, 3)
    }
    torch.testing.assert_close(levels["tap4"], blocks[taps[2]], rtol=0, atol=0)  # stride 16: identity
    torch.testing.assert_close(levels["tap5"], nn.functional.max_pool2d(blocks[taps[3]], 2), rtol=0, atol=0)


@pytest.mark.parametrize("pyramid, key, branch", [
    ("simple", "NORM", "pyramid.p2.resample"), ("multi_tap", "UPSAMPLE_NORM", "bottom_up.resample.tap2"),
])
def test_stride_4_branch_without_norm_runs_and_keeps_the_deconv_names(pyramid, key, branch):
    normed = build(tiny_cfg(pyramid, **{key: "LN" if pyramid == "simple" else "GN"})).eval()
    plain = build(tiny_cfg(pyramid, **{key: ""})).eval()
    seq = plain.get_submodule(branch)
    assert [type(m) for m in seq] == [nn.ConvTranspose2d, nn.Identity, nn.GELU, nn.ConvTranspose2d]
    assert [type(m).__name__ for m in normed.get_submodule(branch)] == [
        "ConvTranspose2d", "LayerNorm" if pyramid == "simple" else "GroupNorm", "GELU", "ConvTranspose2d"]
    keys = {k for k in normed.state_dict() if k.startswith(branch + ".")}
    assert keys == {f"{branch}.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    plain_keys = {k for k in plain.state_dict() if k.startswith(branch + ".")}
    assert plain_keys == keys - {f"{branch}.1.weight", f"{branch}.1.bias"}
    with torch.no_grad():
        out = plain(torch.randn(1, 3, 64, 96))
    assert out["p2"].shape == (1, 32, 16, 24) and all(torch.isfinite(v).all() for v in out.values())


def test_group_norm_in_the_simple_pyramid_needs_half_the_width_divisible_by_32():
    with pytest.raises(ValueError, match=r"^MODEL.VIT.NORM = 'GN': .* embed dim / 2 = 48 channels") as e:
        build(tiny_cfg("simple", EMBED_DIM=96, NORM="GN"))
    assert "\n" not in str(e.value)
    backbone = build(tiny_cfg("simple", EMBED_DIM=128, NORM="GN")).eval()
    assert isinstance(backbone.pyramid["p2"].resample[1], nn.GroupNorm)
    assert backbone.pyramid["p2"].resample[1].num_channels == 64
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 64, 64))["p2"].shape == (1, 32, 16, 16)


def test_width_not_divisible_by_4_needs_vitdet_init():
    with pytest.raises(ValueError, match=r"^MODEL.VIT.EMBED_DIM = 66: must be a multiple of 4 with MODEL.VIT.INIT"):
        build(tiny_cfg("simple", EMBED_DIM=66, INIT="mae"))
    backbone = build(tiny_cfg("simple", EMBED_DIM=66, INIT="vitdet")).eval()  # no sin-cos table: valid
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 64, 64))["p6"].shape == (1, 32, 1, 1)


@pytest.mark.parametrize("patch", [4, 8, 16, 32])
def test_configured_level_names_are_the_built_ones(patch):
    """mae_det.config validates the heads' IN_FEATURES against vit_levels: it must name what the builders build."""
    sizes = dict(PATCH_SIZE=patch, PRETRAIN_IMG_SIZE=2 * patch, INPUT_SIZE=4 * patch)
    for pyramid in ("simple", "multi_tap"):
        cfg = tiny_cfg(pyramid, **sizes)
        assert vit_levels(cfg) == list(build(cfg).output_shape()), pyramid
    cfg = semantic_cfg(**sizes)
    assert vit_levels(cfg) == list(build_vit_multitap_backbone(cfg, ShapeSpec(channels=3)).output_shape())
    assert vit_levels(cfg)[2] == f"tap{int(math.log2(patch))}"


@pytest.mark.parametrize("pyramid", ["simple", "multi_tap"])
def test_padding_constraints_any_input_size(pyramid):
    backbone = build(tiny_cfg(pyramid)).eval()
    assert backbone.size_divisibility == 32
    assert backbone.padding_constraints == {"size_divisibility": 32, "square_size": 0}
    images = ImageList.from_tensors(
        [torch.randn(3, 70, 111), torch.randn(3, 50, 90)], backbone.size_divisibility,
        padding_constraints=backbone.padding_constraints,
    )
    assert images.tensor.shape[-2:] == (96, 128)
    with torch.no_grad():
        out = backbone(images.tensor)
    assert out["p5"].shape[-2:] == (3, 4) and out["p2"].shape[-2:] == (24, 32)

    square = build(tiny_cfg(pyramid, SQUARE_PAD=160))
    assert square.padding_constraints == {"size_divisibility": 32, "square_size": 160}
    padded = ImageList.from_tensors(
        [torch.randn(3, 70, 111)], square.size_divisibility, padding_constraints=square.padding_constraints
    )
    assert padded.tensor.shape[-2:] == (160, 160)


@pytest.mark.parametrize("hw", [(48, 48), (80, 112)])  # multiples of the patch (16), not of 2 * patch
def test_multi_tap_fpn_refuses_inputs_not_padded_to_its_size_divisibility(hw):
    """Detectron2's top-down path adds each level to the 2x upsampled coarser one: an odd token grid max-pools to a
    rounded-down stride-32 level that no longer fits. The simple pyramid and the semantic levels still run."""
    x = torch.randn(1, 3, *hw)
    fpn = build(tiny_cfg("multi_tap")).eval()
    with pytest.raises(ValueError) as e, torch.no_grad():
        fpn(x)
    assert str(e.value) == f"input {hw[0]}x{hw[1]}: pad to a multiple of size_divisibility=32 (ImageList.from_tensors)"
    padded = ImageList.from_tensors([x[0]], fpn.size_divisibility, padding_constraints=fpn.padding_constraints).tensor
    with torch.no_grad():
        assert fpn(padded)["p5"].shape[-2:] == (math.ceil(hw[0] / 32), math.ceil(hw[1] / 32))
        assert build(tiny_cfg("simple")).eval()(x)["p5"].shape[-2:] == (hw[0] // 32, hw[1] // 32)
        semantic = build_vit_multitap_backbone(semantic_cfg(), ShapeSpec(channels=3)).eval()
        assert semantic(x)["tap5"].shape[-2:] == (hw[0] // 32, hw[1] // 32)


def test_registered_builder_builds_from_config():
    simple = build_backbone(tiny_cfg("simple"))
    fpn = build_backbone(tiny_cfg("multi_tap"))
    assert isinstance(simple, ViTSimplePyramid) and isinstance(fpn, ViTFPN)
    assert isinstance(simple.net, VisionTransformer) and fpn.net is fpn.bottom_up.net
    assert "net.blocks.0.attn.qkv.weight" in simple.state_dict()
    assert "bottom_up.net.blocks.0.attn.qkv.weight" in fpn.state_dict()
    assert not hasattr(simple.net, "cls_token") and "net.norm.weight" not in simple.state_dict()
    assert simple.net.pos_embed.requires_grad


@pytest.mark.parametrize("pyramid", ["simple", "multi_tap"])
def test_every_parameter_gets_a_gradient(pyramid):
    """DistributedDataParallel (without find_unused_parameters) needs every parameter used."""
    backbone = build(tiny_cfg(pyramid)).train()
    out = backbone(torch.randn(2, 3, 64, 96))
    sum(t.square().mean() for t in out.values()).backward()
    # rel-pos tables start at zero; they get gradients through the queries
    unused = [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


def test_relative_position_tables_zero_init_and_sized():
    cfg = tiny_cfg(GLOBAL_ATTN_INDEXES=[1, 3])
    net = build(cfg).net
    for i, blk in enumerate(net.blocks):
        rows = 2 * 128 // 16 - 1 if i in (1, 3) else 2 * 4 - 1  # global: input grid; windowed: window
        assert blk.attn.rel_pos_h.shape == blk.attn.rel_pos_w.shape == (rows, 32)
        assert blk.window_size == (0 if i in (1, 3) else 4)
        assert not blk.attn.rel_pos_h.any() and not blk.attn.rel_pos_w.any()


def detectron2_vitdet(window_size: int, window_blocks: list[int]) -> nn.Module:
    """Detectron2's own ViT + SimpleFeaturePyramid at the tiny size of ``tiny_cfg``, with random rel-pos tables."""
    torch.manual_seed(1)
    net = ViT(
        img_size=128, patch_size=16, embed_dim=64, depth=4, num_heads=2, drop_path_rate=0.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), window_size=window_size, window_block_indexes=window_blocks,
        use_rel_pos=True, pretrain_img_size=64, pretrain_use_cls_token=True, out_feature="last_feat",
    )
    model = SimpleFeaturePyramid(
        net, "last_feat", out_channels=32, scale_factors=(4.0, 2.0, 1.0, 0.5), top_block=LastLevelMaxPool(),
        norm="LN", square_pad=0,
    )
    with torch.no_grad():  # zero-initialized tables and unit norms would hide a wrong mapping
        for name, p in model.named_parameters():
            if "rel_pos" in name or "norm" in name:
                p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("hw", [(128, 128), (80, 176)])
def test_simple_mode_equals_detectron2_vitdet(hw):
    theirs = detectron2_vitdet(window_size=3, window_blocks=[0, 2])
    ours = build(tiny_cfg("simple", WINDOW_SIZE=3, GLOBAL_ATTN_INDEXES=[1, 3])).eval()
    holder = nn.Module()
    holder.backbone = ours
    state, info = convert_to_detectron2(
        {"model": {f"backbone.{k}": v for k, v in theirs.state_dict().items()}}, holder
    )
    assert info["format"] == "vitdet" and info["dropped"] == []
    holder.load_state_dict(state, strict=True)  # every key of ours, and nothing else
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow  # ~25-50 s on 2 cores
def test_vit_b_1024_forward_cpu():
    cfg = add_vit_config(get_cfg())  # defaults: ViT-B, 14x14 windows, global 2/5/8/11, rel-pos, simple
    backbone = build(cfg).eval()
    assert sum(p.numel() for p in backbone.net.parameters()) == 85_798_656 - 768 - 2 * 768 + 4 * 2 * 127 * 64 + 8 * 2 * 27 * 64
    start = time.perf_counter()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 1024, 1024))
    elapsed = time.perf_counter() - start
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p2": (1, 256, 256, 256), "p3": (1, 256, 128, 128), "p4": (1, 256, 64, 64), "p5": (1, 256, 32, 32),
        "p6": (1, 256, 16, 16),
    }
    assert all(torch.isfinite(v).all() for v in out.values())
    print(f"ViT-B 1024 px backbone forward, batch 1: {elapsed:.1f} s")
