"""UperNet head, the multi-tap semantic backbone, sliding-window inference, the Cascade / UperNet configs, and the
registrations of ``import mae_det``."""
import glob
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import mae_det  # noqa: F401  (registers the builders)
from mae_det.config.detection import load_det_cfg
from mae_det.config.pretrain import ConfigError
from mae_det.engine.det_trainer import Trainer
from mae_det.modeling.semantic_seg import window_starts
from mae_det.modeling.upernet import UperNetHead

ROOT = Path(__file__).resolve().parents[2]
# Tiny encoders: width shrinks, depth and tap/global indexes stay those of the config (ViT-B 12, ViT-L 24 blocks).
def tiny_vit(path: str) -> list:
    depth = 24 if "_vit_l_" in path else 12
    return ["MODEL.VIT.SIZE", "custom", "MODEL.VIT.EMBED_DIM", 64, "MODEL.VIT.DEPTH", depth, "MODEL.VIT.NUM_HEADS", 2,
            "SOLVER.PRECISION", "fp32", "MODEL.DEVICE", "cpu"]


def _levels(channels: int = 16, strides=(4, 8, 16, 32)) -> dict[str, ShapeSpec]:
    return {f"tap{int(math.log2(s))}": ShapeSpec(channels=channels, stride=s) for s in strides}


def _head(**kw) -> UperNetHead:
    args = dict(num_classes=5, channels=32, norm="GN", aux_in_feature="tap4", aux_channels=32, aux_loss_weight=0.4)
    args.update(kw)
    return UperNetHead(_levels(), **args)


def _features(n: int = 2, h: int = 64, w: int = 96, channels: int = 16) -> dict[str, torch.Tensor]:
    return {f"tap{int(math.log2(s))}": torch.randn(n, channels, h // s, w // s) for s in (4, 8, 16, 32)}


# ---- head contract ---------------------------------------------------------------------------------------
def test_upernet_inference_returns_logits_at_the_padded_input_size():
    head = _head().eval()
    logits, losses = head(_features(h=64, w=96))
    assert logits.shape == (2, 5, 64, 96) and losses == {}
    assert head.common_stride == 4 and head.ignore_value == 255


def test_upernet_training_returns_main_and_auxiliary_losses():
    head = _head().train()
    targets = torch.randint(0, 5, (2, 64, 96))
    targets[:, :8] = 255
    results, losses = head(_features(h=64, w=96), targets)
    assert results is None and set(losses) == {"loss_sem_seg", "loss_sem_seg_aux"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert head.aux_head[0].weight.grad is not None and head.ppm.bottleneck.weight.grad is not None


def test_upernet_without_auxiliary_head_and_with_only_ignored_pixels():
    head = _head(aux_loss_weight=0.0).train()
    assert not hasattr(head, "aux_head")
    _, losses = head(_features(), torch.full((2, 64, 96), 255))
    assert set(losses) == {"loss_sem_seg"} and losses["loss_sem_seg"].item() == 0.0


def test_upernet_loss_is_cross_entropy_over_labelled_pixels():
    head = _head(aux_loss_weight=0.0, dropout=0.0).train()
    feats = _features()
    targets = torch.randint(0, 5, (2, 64, 96))
    targets[0, :32] = 255
    _, losses = head(feats, targets)
    logits = head.upsample(head.fuse_levels(feats), 4)
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=255)
    torch.testing.assert_close(losses["loss_sem_seg"], expected)


# ---- backbone + sliding window ----------------------------------------------------------------------------
def _shapes_cfg(*opts):
    return load_det_cfg(str(ROOT / "configs/shapes/sem_seg_vit_scratch.yaml"), list(opts), training=False)


def test_multitap_backbone_levels_and_padding():
    model = build_model(_shapes_cfg("MODEL.SEM_SEG_HEAD.IN_FEATURES", ["tap1", "tap2", "tap3", "tap4"]))
    shapes = model.backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "tap1": (192, 2), "tap2": (192, 4), "tap3": (192, 8), "tap4": (192, 16)}
    assert model.backbone.size_divisibility == 16 and model.backbone.net.depth == 6
    out = model.backbone(torch.zeros(1, 3, 48, 80))
    assert out["tap1"].shape == (1, 192, 24, 40) and out["tap4"].shape == (1, 192, 3, 5)


def test_multitap_backbone_builds_only_the_levels_the_head_reads():
    model = build_model(_shapes_cfg()).train()  # the config's head reads tap2-tap4
    assert list(model.backbone.resample) == ["tap2", "tap3", "tap4"] and model.backbone.tap_indexes == [2, 3, 5]
    image = torch.randint(0, 256, (3, 64, 64)).float()
    losses = model([{"image": image, "sem_seg": torch.randint(0, 7, (64, 64))}] * 2)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ConfigError) as e:  # refused with the config, before any model is built
        _shapes_cfg("MODEL.SEM_SEG_HEAD.IN_FEATURES", ["tap3", "tap5"])
    assert str(e.value) == ("MODEL.SEM_SEG_HEAD.IN_FEATURES: ['tap5'] are not levels of build_vit_multitap_backbone at "
                            "MODEL.VIT.PATCH_SIZE 8; expected names among ['tap1', 'tap2', 'tap3', 'tap4']")


def test_one_image_a_step_with_batch_norm_and_a_1x1_pooling_bin_is_refused_by_the_config():
    """The shapes config norms with naiveSyncBN (plain BatchNorm in one process): one image a step would
    batch-normalize the single value per channel of the 1x1 bin at the first step."""
    with pytest.raises(ConfigError) as e:
        _shapes_cfg("SOLVER.IMS_PER_BATCH", 1)
    assert str(e.value) == (
        "SOLVER.IMS_PER_BATCH 1 with MODEL.SEM_SEG_HEAD.NORM 'naiveSyncBN' and 1 in MODEL.SEM_SEG_HEAD.POOL_SCALES: "
        "the 1x1 pooling bin batch-normalizes one value per channel, which fails at the first training step; train "
        "with 2 or more images a step, NORM 'GN', or POOL_SCALES without 1")
    for fix in (["MODEL.SEM_SEG_HEAD.NORM", "GN"], ["MODEL.SEM_SEG_HEAD.POOL_SCALES", (2, 3)],
                ["SOLVER.IMS_PER_BATCH", 2]):
        _shapes_cfg("SOLVER.IMS_PER_BATCH", 1, *fix)
    cfg = _shapes_cfg("SOLVER.IMS_PER_BATCH", 1, "MODEL.SEM_SEG_HEAD.POOL_SCALES", (2, 3))
    image = torch.randint(0, 256, (3, 64, 64)).float()
    losses = build_model(cfg).train()([{"image": image, "sem_seg": torch.randint(0, 7, (64, 64))}])
    assert all(math.isfinite(v.item()) for v in losses.values())  # one image a step trains without the 1x1 bin


def test_window_starts_cover_the_image_and_end_at_the_border():
    assert window_starts(64, 64, 43) == [0]
    assert window_starts(40, 64, 43) == [0]
    assert window_starts(100, 64, 43) == [0, 36]
    assert window_starts(200, 64, 43) == [0, 43, 86, 129, 136]


def test_slide_inference_averages_overlapping_windows():
    cfg = _shapes_cfg("TEST.SLIDE.ENABLED", True, "TEST.SLIDE.CROP_SIZE", 32, "TEST.SLIDE.STRIDE", 16)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 32, 48)).float()
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 32, "width": 48}])
        norm = (image - model.pixel_mean) / model.pixel_std
        crops = [model.sem_seg_head(model.backbone(norm[None, :, :, x:x + 32]))[0][0] for x in (0, 16)]
    expected = torch.zeros(7, 32, 48)
    expected[:, :, :16], expected[:, :, 32:] = crops[0][:, :, :16], crops[1][:, :, 16:]
    expected[:, :, 16:32] = (crops[0][:, :, 16:] + crops[1][:, :, :16]) / 2
    torch.testing.assert_close(out["sem_seg"], expected, rtol=1e-4, atol=1e-5)


def test_slide_inference_with_one_window_equals_whole_image_inference():
    torch.manual_seed(0)
    whole = build_model(_shapes_cfg()).eval()
    slide = build_model(_shapes_cfg("TEST.SLIDE.ENABLED", True, "TEST.SLIDE.CROP_SIZE", 64, "TEST.SLIDE.STRIDE", 32)).eval()
    slide.load_state_dict(whole.state_dict())
    batch = [{"image": torch.randint(0, 256, (3, 48, 64)).float(), "height": 96, "width": 128}]
    with torch.no_grad():
        a, b = whole(batch)[0]["sem_seg"], slide(batch)[0]["sem_seg"]
    assert a.shape == (7, 96, 128)
    torch.testing.assert_close(a, b)


# ---- every new config builds and trains one step -------------------------------------------------------------
SEM_CONFIGS = sorted(glob.glob(str(ROOT / "configs/ADE20K/upernet_*.yaml"))) + sorted(
    glob.glob(str(ROOT / "configs/shapes/sem_seg_vit_*.yaml")))
CASCADE_CONFIGS = sorted(glob.glob(str(ROOT / "configs/COCO/cascade_mask_rcnn_vit_*.yaml")))


def _one_step(cfg, batch) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = Trainer.build_optimizer(cfg, model)
    Trainer.build_lr_scheduler(cfg, optimizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with EventStorage():  # Detectron2's R-CNN heads log training statistics
        losses = model(batch)
    sum(losses.values()).backward()
    optimizer.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert any(n.startswith("backbone.net.blocks.0.") for n in moved) and any("head" in n for n in moved)
    return {k: v.item() for k, v in losses.items()}


@pytest.mark.parametrize("path", SEM_CONFIGS, ids=lambda p: Path(p).stem)
def test_semantic_config_builds_and_trains_one_step(path):
    ade = "ADE20K" in path
    opts = ([*tiny_vit(path), "MODEL.VIT.INPUT_SIZE", 64, "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32] if ade else [])
    cfg = load_det_cfg(path, opts, training=False)
    assert cfg.MODEL.META_ARCHITECTURE == "SlidingWindowSegmentor" and cfg.MODEL.SEM_SEG_HEAD.NAME == "UperNetHead"
    assert cfg.MODEL.BACKBONE.NAME == "build_vit_multitap_backbone"
    if ade:
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150 and cfg.TEST.SLIDE.ENABLED
        assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR" and cfg.SOLVER.WEIGHT_DECAY == 0.05
    k = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    labels = torch.randint(0, k, (2, 64, 64))
    labels[:, :, :4] = 255
    batch = [{"image": torch.randint(0, 256, (3, 64, 64)).float(), "sem_seg": labels[i]} for i in range(2)]
    losses = _one_step(cfg, batch)
    assert set(losses) == {"loss_sem_seg", "loss_sem_seg_aux"} and all(math.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("path", CASCADE_CONFIGS, ids=lambda p: Path(p).stem)
def test_cascade_config_builds_and_trains_one_step(path):
    from detectron2.structures import BitMasks, Boxes, Instances

    opts = [*tiny_vit(path), "MODEL.VIT.INPUT_SIZE", 64, "MODEL.VIT.SQUARE_PAD", 64, "INPUT.LSJ.IMAGE_SIZE", 64,
            "INPUT.MAX_SIZE_TEST", 64, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            16, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 32, "MODEL.ROI_BOX_HEAD.CONV_DIM", 16, "MODEL.ROI_BOX_HEAD.FC_DIM", 32,
            "MODEL.ROI_MASK_HEAD.CONV_DIM", 16, "MODEL.VIT.OUT_CHANNELS", 32]
    cfg = load_det_cfg(path, opts, training=False)
    assert cfg.MODEL.ROI_HEADS.NAME == "CascadeROIHeads" and cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG
    assert tuple(cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS) == (0.5, 0.6, 0.7)
    assert cfg.MODEL.ROI_BOX_HEAD.NUM_CONV == 4 and cfg.MODEL.ROI_BOX_HEAD.NORM == "LN"
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 10:40, 12:50] = True
    inst = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[12.0, 10.0, 50.0, 40.0]])),
                     gt_classes=torch.tensor([3]), gt_masks=BitMasks(mask))
    losses = _one_step(cfg, [{"image": torch.randint(0, 256, (3, 64, 64)).float(), "instances": inst}])
    assert {f"loss_box_reg_stage{s}" for s in range(3)} <= set(losses) and "loss_mask" in losses
    assert all(math.isfinite(v) for v in losses.values())


# ---- import mae_det ----------------------------------------------------------------------------------------
def test_import_mae_det_alone_registers_the_builders_and_exposes_the_config_functions():
    code = (
        "import mae_det\n"
        "from detectron2.config import get_cfg\n"
        "from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY\n"
        "cfg = get_cfg(); mae_det.add_vit_config(cfg); mae_det.add_det_train_config(cfg); mae_det.add_sem_seg_config(cfg)\n"
        "print(sorted(n for n in ('build_vit_fpn_backbone', 'build_vit_multitap_backbone') if n in BACKBONE_REGISTRY),"
        " 'UperNetHead' in SEM_SEG_HEADS_REGISTRY, 'SlidingWindowSegmentor' in META_ARCH_REGISTRY,"
        " cfg.MODEL.VIT.SIZE, cfg.TEST.SLIDE.CROP_SIZE)\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == (
        "['build_vit_fpn_backbone', 'build_vit_multitap_backbone'] True True base 512")
