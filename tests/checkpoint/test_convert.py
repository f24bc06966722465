"""Checkpoint conversion into the encoder and the Detectron2 ViT-FPN model, and the ViTDetCheckpointer."""
import argparse
import copy
import logging
import os
import pickle
from functools import partial

import numpy as np
import pytest
import timm
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid, ViT
from detectron2.solver.lr_scheduler import LRMultiplier
from fvcore.common.param_scheduler import CosineParamScheduler
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from mae_det.checkpoint import CheckpointError
from mae_det.checkpoint.convert import (
    FORMAT_NAMES,
    convert_to_detectron2,
    detect_format,
    load_decoder_state,
    load_encoder_weights,
    load_encoder_state,
    read_checkpoint,
    target_of,
    to_detectron2,
)
from mae_det.checkpoint.detectron2 import CheckedDetectionCheckpointer, NonFiniteWeightsError, ViTDetCheckpointer
from mae_det.checkpoint.hf import mae_to_hf
from mae_det.config.vit_backbone import add_vit_config
from mae_det.modeling import MaskedAutoencoderViT, VisionTransformer, mae_vit_base_patch16
from mae_det.modeling.backbone import build_vit_fpn_backbone

DECODER = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def tiny_mae(dim: int = 64, depth: int = 4, img: int = 64, seed: int = 0) -> MaskedAutoencoderViT:
    torch.manual_seed(seed)
    return MaskedAutoencoderViT(
        img_size=img, patch_size=16, embed_dim=dim, depth=depth, num_heads=2, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        **DECODER,
    )


def encoder_only(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}


def vit_cfg(size: str = "custom", pyramid: str = "simple", pretrain: int = 64, heads: bool = False):
    cfg = add_vit_config(get_cfg())
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_vit_fpn_backbone"
    v = cfg.MODEL.VIT
    v.SIZE, v.PYRAMID, v.PRETRAIN_IMG_SIZE = size, pyramid, pretrain
    if size == "custom":
        v.EMBED_DIM, v.DEPTH, v.NUM_HEADS, v.WINDOW_SIZE, v.INPUT_SIZE, v.OUT_CHANNELS = 64, 4, 2, 4, 128, 32
    if pyramid == "multi_tap":
        v.NORM = "BN"
    if heads:  # Mask R-CNN with the standard FPN heads on p2-p6
        m = cfg.MODEL
        m.MASK_ON = True
        m.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        m.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
        m.ROI_HEADS.NAME, m.ROI_HEADS.IN_FEATURES = "StandardROIHeads", ["p2", "p3", "p4", "p5"]
        m.ROI_BOX_HEAD.NAME, m.ROI_BOX_HEAD.NUM_FC, m.ROI_BOX_HEAD.POOLER_RESOLUTION = "FastRCNNConvFCHead", 2, 7
        m.ROI_MASK_HEAD.NAME, m.ROI_MASK_HEAD.NUM_CONV = "MaskRCNNConvUpsampleHead", 4
    return cfg


def backbone_model(cfg, seed: int = 0) -> nn.Module:
    """A module holding the backbone under ``backbone``, as in a Detectron2 meta-architecture."""
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.backbone = build_vit_fpn_backbone(cfg, ShapeSpec(channels=3))
    return holder


# ---- pretraining formats ----------------------------------------------------------------------------
def test_official_vit_b_encoder_loads_into_mask_rcnn(tmp_path):
    torch.manual_seed(0)
    enc = encoder_only(mae_vit_base_patch16().state_dict())
    path = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": enc}, path)
    model = build_model(vit_cfg("base", pretrain=224, heads=True))
    ck = ViTDetCheckpointer(model)
    ck.load(str(path))
    report = ck.last_report
    assert report.format == "official" and report.missing == [] and report.skipped == []
    vit_keys = [k for k in model.state_dict() if k.startswith("backbone.net.") and "rel_pos" not in k]
    assert sorted(vit_keys) == report.loaded and len(vit_keys) == len(enc) - 3
    assert sorted(report.unused) == ["cls_token", "norm.bias", "norm.weight"]  # never matched onto other norms
    new = set(report.new)
    assert {f"backbone.net.blocks.{i}.attn.rel_pos_{a}" for i in range(12) for a in "hw"} <= new
    assert any(k.startswith("backbone.pyramid.") for k in new) and any(k.startswith("roi_heads.mask_head") for k in new)
    assert new | set(report.loaded) == set(model.state_dict()) - {"pixel_mean", "pixel_std"}
    sd = model.state_dict()
    for k in ("pos_embed", "blocks.11.mlp.fc2.weight", "patch_embed.proj.bias"):
        assert torch.equal(sd[f"backbone.net.{k}"], enc[k])
    text = str(report)
    assert "official MAE" in text and "MISSING (initialized, but the checkpoint should have held them): 0" in text
    assert "backbone.net.blocks.*.attn.{rel_pos_h,rel_pos_w} (24)" in text


def test_full_and_training_checkpoints_with_namespace_args(tmp_path):
    mae = tiny_mae()
    full = mae.state_dict()
    path = tmp_path / "checkpoint-3.pth"
    torch.save(
        {"model": full, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "scaler": {},
         "args": argparse.Namespace(model="mae_vit_tiny", blr=1.5e-4, mask_ratio=0.75)},
        path,
    )
    sd, info = load_encoder_state(path)
    assert info["format"] == "official" and (info["embed_dim"], info["depth"], info["patch_size"]) == (64, 4, 16)
    assert sorted(sd) == sorted(encoder_only(full))
    assert "mask_token" in info["dropped"] and "decoder_pred.weight" in info["dropped"]
    bare = VisionTransformer(img_size=64, embed_dim=64, depth=4, num_heads=2)
    bare.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(bare.forward_features(x), mae.forward_features(x), rtol=0, atol=0)


def test_our_pretraining_checkpoint_and_encoder_export():
    mae = tiny_mae()
    meta = {"arch": "mae_vit_tiny", "img_size": 64}
    assert detect_format({"model": mae.state_dict(), "meta": meta, "epoch": 1}) == "ours"
    sd, info = load_encoder_state({"model": encoder_only(mae.state_dict()), "meta": meta})
    assert info["format"] == "ours" and info["dropped"] == []


def test_timm_vit_loads_and_computes_the_same(tmp_path):
    torch.manual_seed(0)
    timm_vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    path = tmp_path / "vit_tiny.pth"
    torch.save(timm_vit.state_dict(), path)
    sd, info = load_encoder_state(path)
    assert info["format"] == "timm" and sorted(info["dropped"]) == ["head.bias", "head.weight"]
    ours = VisionTransformer(img_size=224, embed_dim=192, depth=12, num_heads=3, learnable_pos_embed=True).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), timm_vit.forward_features(x), rtol=1e-5, atol=1e-5)
    assert detect_format({"state_dict": timm_vit.state_dict()}) == "timm"
    cfg = vit_cfg("tiny", pretrain=224)
    cfg.MODEL.VIT.DEPTH = 12
    state = to_detectron2(str(path), cfg)
    assert torch.equal(state["backbone.net.blocks.3.attn.qkv.weight"], sd["blocks.3.attn.qkv.weight"])


@pytest.mark.parametrize("layout", ["bare", "module.", "state_dict"])
def test_a_full_mae_state_dict_saved_without_model_wrapper_keeps_its_decoder(tmp_path, caplog, layout):
    from mae_det.engine.pretrain import load_initial_weights

    mae = tiny_mae(seed=1)
    full = mae.state_dict()
    ckpt = {"bare": full, "module.": {f"module.{k}": v for k, v in full.items()}, "state_dict": {"state_dict": full}}
    path = tmp_path / "full_mae.pth"
    torch.save(ckpt[layout], path)
    decoder = load_decoder_state(path)
    expected = {k: v for k, v in full.items() if k.startswith(("decoder_", "mask_token"))}
    assert sorted(decoder) == sorted(expected) and "decoder_pred.weight" in decoder
    assert all(torch.equal(decoder[k], v) for k, v in expected.items())
    model = tiny_mae(seed=2)
    with caplog.at_level(logging.INFO, logger="mae_det"):
        assert load_initial_weights(model, path)["decoder"] == "loaded"
    assert "has no MAE decoder" not in caplog.text
    for k, v in model.state_dict().items():
        if k.startswith(("decoder_", "mask_token")) and k != "decoder_pos_embed":  # frozen sin-cos: the model's own
            assert torch.equal(v, full[k]), k
    # A timm ViT in the same layout has no decoder, and a detection checkpoint cannot hold one.
    assert load_decoder_state(encoder_only(full)) == {}
    assert load_decoder_state({"model": {f"backbone.net.{k}": v for k, v in encoder_only(full).items()}}) == {}


def test_hf_errors_name_the_file(tmp_path):
    hf = mae_to_hf(tiny_mae().state_dict(), legacy_names=True)
    extra, lacking = tmp_path / "with_classifier.bin", tmp_path / "lacking.bin"
    torch.save({**hf, "classifier.weight": torch.zeros(10, 64)}, extra)
    torch.save({k: v for k, v in hf.items() if k != "vit.encoder.layer.1.output.dense.bias"}, lacking)
    readers = (lambda p: convert_to_detectron2(p, None), load_encoder_state, load_decoder_state)
    for read in readers:
        with pytest.raises(CheckpointError) as e:
            read(extra)
        assert str(e.value) == f"{extra}: HF ViTMAE state dict has keys with no MAE counterpart: ['classifier.weight']"
        with pytest.raises(CheckpointError) as e:
            read(lacking)
        assert str(e.value) == (f"{lacking}: HF ViTMAE state dict has no 'vit.encoder.layer.1.output.dense.bias' "
                                "(layout 'legacy')")


def test_a_folder_given_as_checkpoint_says_which_file_to_pass(tmp_path):
    from tools.convert_checkpoint import main

    hf_folder = tmp_path / "vit-mae-base"
    hf_folder.mkdir()
    (hf_folder / "config.json").write_text("{}")
    save_file(mae_to_hf(tiny_mae().state_dict(), legacy_names=True), str(hf_folder / "model.safetensors"))
    msg = (f"checkpoint {hf_folder}: is a folder, not a checkpoint file; pass the weights file inside it "
           "(there: model.safetensors)")
    for read in (read_checkpoint, lambda p: convert_to_detectron2(p, None), load_decoder_state):
        with pytest.raises(CheckpointError) as e:
            read(hf_folder)
        assert str(e.value) == msg
    with pytest.raises(SystemExit) as e:
        main(["--input", str(hf_folder), "--output", str(tmp_path / "out.pth")])
    assert str(e.value) == f"convert_checkpoint: {msg}"
    assert not (tmp_path / "out.pth").exists()
    named_like_a_file = tmp_path / "weights.safetensors"
    named_like_a_file.mkdir()
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(named_like_a_file)
    assert str(e.value) == (f"checkpoint {named_like_a_file}: is a folder, not a checkpoint file, and holds none "
                            "(.pth, .pt, .bin, .pkl, .safetensors); pass the weights file itself")


def test_hf_vitmae_weights_convert():
    mae = tiny_mae()
    hf = mae_to_hf(mae.state_dict(), legacy_names=True)
    assert detect_format(hf) == "hf"
    sd, info = load_encoder_state(hf)
    assert info["format"] == "hf"
    for k, v in encoder_only(mae.state_dict()).items():
        assert torch.equal(sd[k], v), k


def test_pos_embed_and_patch_kernel_resampled_to_the_model():
    torch.manual_seed(0)
    small = VisionTransformer(img_size=32, embed_dim=64, depth=4, num_heads=2)  # grid 2x2
    state, info = convert_to_detectron2({"model": small.state_dict()}, backbone_model(vit_cfg()))
    expected = resample_abs_pos_embed(small.pos_embed.detach(), new_size=[4, 4], old_size=[2, 2], num_prefix_tokens=1)
    torch.testing.assert_close(state["backbone.net.pos_embed"], expected)
    assert info["notes"] == ["pos_embed resampled 2x2 -> 4x4"]

    patch8 = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)  # grid 4x4
    state, info = convert_to_detectron2({"model": patch8.state_dict()}, vit_cfg())
    assert state["backbone.net.patch_embed.proj.weight"].shape == (64, 3, 16, 16)
    assert info["notes"] == ["patch_embed kernel resampled 8x8 -> 16x16"]


def test_a_recorded_non_square_grid_is_resampled_from_that_grid():
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(img_size=(32, 128), patch_size=16, embed_dim=64, depth=4, num_heads=2, **DECODER)
    ckpt = {"model": mae.state_dict(), "meta": {"img_size": [32, 128], "patch_size": 16}}  # 2x8 grid: 17 positions
    pos = mae.pos_embed.detach()

    def resampled(new):
        return resample_abs_pos_embed(pos, new_size=new, old_size=[2, 8], num_prefix_tokens=1, antialias=True)

    square = VisionTransformer(img_size=64, embed_dim=64, depth=4, num_heads=2)  # 4x4: also 17 positions
    info = load_encoder_weights(square, ckpt)  # was taken unchanged, no note: the 2x8 table read as 4x4
    assert info["notes"] == ["pos_embed resampled 2x8 -> 4x4"]
    torch.testing.assert_close(square.pos_embed.detach(), resampled([4, 4]))
    large = VisionTransformer(img_size=128, embed_dim=64, depth=4, num_heads=2)
    assert load_encoder_weights(large, ckpt)["notes"] == ["pos_embed resampled 2x8 -> 8x8"]  # was "4x4 -> 8x8"
    torch.testing.assert_close(large.pos_embed.detach(), resampled([8, 8]))
    same = VisionTransformer(img_size=(32, 128), embed_dim=64, depth=4, num_heads=2)
    assert load_encoder_weights(same, ckpt)["notes"] == [] and torch.equal(same.pos_embed, mae.pos_embed)

    # Converted without a target, the grid travels with the file (pos_grid) to the model it is loaded into.
    state, info = convert_to_detectron2(ckpt, None)
    assert info["grid"] == (2, 8)
    state, info = convert_to_detectron2({"model": state, "pos_grid": [2, 8]}, backbone_model(vit_cfg()))
    assert info["notes"] == ["pos_embed resampled 2x8 -> 4x4"] and info["grid"] == (4, 4)
    torch.testing.assert_close(state["backbone.net.pos_embed"], resampled([4, 4]))

    with pytest.raises(CheckpointError) as e:
        load_encoder_state({**ckpt, "meta": {"img_size": 96}}, grid=(4, 4), source="x.pth")
    assert str(e.value) == "x.pth: pos_embed has 17 positions but the checkpoint's meta img_size 96 gives a 6x6 grid"
    with pytest.raises(CheckpointError) as e:
        load_encoder_state({"model": ckpt["model"], "args": argparse.Namespace(input_size=224)}, grid=(4, 4),
                           source="x.pth")
    assert str(e.value) == ("x.pth: pos_embed has 17 positions but the checkpoint's args.input_size 224 gives a 14x14 "
                            "grid")


def test_a_timm_vit_without_qkv_bias_gets_zero_biases_and_computes_the_same():
    torch.manual_seed(0)
    timm_vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, qkv_bias=False, num_classes=0).eval()
    sd, info = load_encoder_state(timm_vit.state_dict())  # was "block 0 has no 'attn.qkv.bias'"
    bias = sd["blocks.1.attn.qkv.bias"]
    assert info["format"] == "timm" and bias.shape == (192,) and not bias.any()
    ours = VisionTransformer(img_size=32, embed_dim=64, depth=2, num_heads=2, learnable_pos_embed=True).eval()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), timm_vit.forward_features(x), rtol=1e-5, atol=1e-5)


# ---- hostile and mismatched inputs --------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_pickle_that_executes_code_is_refused(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    payload = {"model": {"patch_embed.proj.weight": torch.zeros(1)}, "x": _RunsCode(str(marker))}
    if suffix == ".pth":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="refused to load") as e:
        load_encoder_state(path)
    assert str(path) in str(e.value) and not marker.exists()
    if suffix == ".pth":  # names what it refused, on one line, without torch's paragraphs of advice
        assert "mkdir" in str(e.value) and "\n" not in str(e.value) and "2.6" not in str(e.value)
    with pytest.raises(CheckpointError, match="refused"):
        ViTDetCheckpointer(backbone_model(vit_cfg())).load(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b"hello world\n", bytes(range(256))])
def test_file_that_is_no_pickle_is_called_so(tmp_path, content):
    path = tmp_path / "encoder.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a torch checkpoint") as e:
        load_encoder_state(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value) and "refused" not in str(e.value)


def test_truncated_file_is_a_clear_error(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": tiny_mae().state_dict()}, good)
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        to_detectron2(str(bad), vit_cfg())
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("dim,depth,what", [(96, 4, "96-d with 4 blocks"), (64, 6, "64-d with 6 blocks")])
def test_width_or_depth_mismatch_is_an_error_not_a_partial_load(tmp_path, dim, depth, what):
    path = tmp_path / "other_size.pth"
    torch.save({"model": tiny_mae(dim=dim, depth=depth).state_dict()}, path)
    model = backbone_model(vit_cfg())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        ViTDetCheckpointer(model).load(str(path))
    msg = str(e.value)
    assert str(path) in msg and what in msg and "the model's is 64-d with 4 blocks" in msg and "\n" not in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, key", [({"mlp_ratio": 2.0}, "blocks.0.mlp.fc1.weight"),
                                         ({"in_chans": 1}, "patch_embed.proj.weight")])
def test_another_mlp_width_or_input_channel_count_is_one_line_naming_the_key(tmp_path, kwargs, key):
    torch.manual_seed(0)
    other = MaskedAutoencoderViT(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2, **kwargs, **DECODER)
    torch.save({"model": other.state_dict()}, tmp_path / "other.pth")
    model = MaskedAutoencoderViT(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=2, **DECODER)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:  # load_state_dict raised a many-line RuntimeError here
        load_encoder_weights(model, tmp_path / "other.pth")
    assert str(e.value).startswith(f"{tmp_path / 'other.pth'}: {key} has shape ") and "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unsupported_architecture_and_wrong_forced_format():
    sd = encoder_only(tiny_mae().state_dict())
    with pytest.raises(CheckpointError, match=r"unsupported key 'blocks.0.ls1.gamma'"):
        load_encoder_state({**sd, "blocks.0.ls1.gamma": torch.ones(64)})
    with pytest.raises(CheckpointError, match="without a ViT encoder"):
        load_encoder_state({"model": sd}, fmt="d2")
    with pytest.raises(CheckpointError, match="not a ViT checkpoint"):
        detect_format({"model": {"conv1.weight": torch.zeros(1)}})


def test_inputs_are_never_mutated():
    vitdet = {f"backbone.{k}": v.numpy() for k, v in detectron2_vitdet().state_dict().items()}
    ours_d2 = backbone_model(vit_cfg()).state_dict()
    inputs = [
        {"model": tiny_mae().state_dict(), "args": argparse.Namespace(lr=1.0)},
        {"model": vitdet, "__author__": "Detectron2 Model Zoo"},
        {"model": ours_d2, "iteration": 3},
        {"module." + k: v for k, v in encoder_only(tiny_mae().state_dict()).items()},
    ]
    target = backbone_model(vit_cfg())
    for ckpt in inputs:
        snapshot = copy.deepcopy(ckpt)
        ids = {k: id(v) for k, v in ckpt["model"].items()} if "model" in ckpt else {k: id(v) for k, v in ckpt.items()}
        load_encoder_state(ckpt)
        convert_to_detectron2(ckpt, target)
        assert list(ckpt) == list(snapshot)
        sd, before = (ckpt["model"], snapshot["model"]) if "model" in ckpt else (ckpt, snapshot)
        assert {k: id(v) for k, v in sd.items()} == ids
        for k, v in sd.items():
            assert (np.array_equal(v, before[k]) if isinstance(v, np.ndarray) else torch.equal(v, before[k])), k


# ---- Detectron2 formats -------------------------------------------------------------------------------
def detectron2_vitdet() -> nn.Module:
    torch.manual_seed(3)
    net = ViT(
        img_size=128, patch_size=16, embed_dim=64, depth=4, num_heads=2, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        window_size=4, window_block_indexes=[0, 1, 2], use_rel_pos=True, pretrain_img_size=64,
    )
    return SimpleFeaturePyramid(net, "last_feat", 32, (4.0, 2.0, 1.0, 0.5), top_block=LastLevelMaxPool(), norm="LN")


def test_vitdet_model_zoo_pkl_through_the_checkpointer(tmp_path):
    theirs = detectron2_vitdet()
    path = tmp_path / "model_final_vitdet.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {f"backbone.{k}": v.numpy() for k, v in theirs.state_dict().items()},
                     "__author__": "Detectron2 Model Zoo"}, f)
    cfg = vit_cfg()
    cfg.MODEL.VIT.GLOBAL_ATTN_INDEXES = [3]
    model = backbone_model(cfg)
    ck = ViTDetCheckpointer(model)
    ck.load(str(path))
    r = ck.last_report
    assert r.format == "vitdet" and r.missing == r.new == r.unused == [] and len(r.loaded) == len(theirs.state_dict())
    mapped = model.state_dict()
    assert torch.equal(mapped["backbone.pyramid.p2.resample.3.weight"], theirs.simfp_2[3].weight)
    assert torch.equal(mapped["backbone.pyramid.p5.output.norm.bias"], theirs.simfp_5[2].norm.bias)
    assert torch.equal(mapped["backbone.net.blocks.3.attn.rel_pos_h"], theirs.net.blocks[3].attn.rel_pos_h)


def test_detectron2_checkpoint_resume_round_trip(tmp_path):
    def trainable(seed):
        model = backbone_model(vit_cfg("custom", "multi_tap"), seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = LRMultiplier(opt, CosineParamScheduler(1.0, 0.0), max_iter=10)
        return model, opt, sched

    model, opt, sched = trainable(0)
    for _ in range(2):
        out = model.backbone(torch.randn(2, 3, 64, 64))
        sum(v.mean() for v in out.values()).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    ViTDetCheckpointer(model, str(tmp_path), weights_format="official", optimizer=opt, scheduler=sched).save(
        "model_0000001", iteration=1
    )
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # no temporaries left

    model2, opt2, sched2 = trainable(1)
    ck = ViTDetCheckpointer(model2, str(tmp_path), weights_format="official", optimizer=opt2, scheduler=sched2)
    extra = ck.resume_or_load("unused_initial_weights.pth", resume=True)
    assert extra == {"iteration": 1}
    assert ck.last_report.format == "d2" and ck.last_report.missing == ck.last_report.new == []
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
    torch.testing.assert_close(opt2.state_dict(), opt.state_dict(), rtol=0, atol=0)
    assert sched2.state_dict() == sched.state_dict() and sched2.last_epoch == 2


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = backbone_model(vit_cfg())
    ck = ViTDetCheckpointer(model, str(tmp_path))
    ck.save("model_0000000")
    good = (tmp_path / "model_0000000.pth").read_bytes()

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="model_0000001.pth"):
        ck.save("model_0000001")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    assert (tmp_path / "model_0000000.pth").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000000.pth"]


def test_resume_removes_partial_writes_and_loading_alone_keeps_them(tmp_path):
    model = backbone_model(vit_cfg())
    ViTDetCheckpointer(model, str(tmp_path)).save("model_0000003", iteration=3)
    stale = tmp_path / ".model_0000007.pth.k9x2z.tmp"  # what a kill in the middle of the next save leaves
    stale.write_bytes(b"PK half a checkpoint")
    # Without resuming (an --eval-only run beside a running training) the folder is not this run's to clean.
    ViTDetCheckpointer(model, str(tmp_path)).resume_or_load(str(tmp_path / "model_0000003.pth"), resume=False)
    assert stale.exists()
    assert ViTDetCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 3
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000003.pth"]



@pytest.mark.parametrize("cls", [ViTDetCheckpointer, CheckedDetectionCheckpointer])
def test_non_finite_weights_are_never_saved(tmp_path, cls):
    model = backbone_model(vit_cfg())
    ck = cls(model, str(tmp_path))
    ck.save("model_0000003", iteration=3)
    good = (tmp_path / "model_0000003.pth").read_bytes()
    with torch.no_grad():
        model.backbone.net.blocks[1].attn.qkv.weight[0, 0] = float("inf")  # what a diverged update leaves
        model.backbone.net.blocks[2].mlp.fc1.bias[3] = float("nan")
    for name, it in (("model_0000007", 7), ("model_final", 7)):
        with pytest.raises(NonFiniteWeightsError) as e:
            ck.save(name, iteration=it)
        assert str(e.value) == (f"non-finite weights after iteration 7: 2 parameters (first: "
                                f"backbone.net.blocks.1.attn.qkv.weight); {tmp_path / name}.pth was not written")
    # Nothing was written: the pointer still names the finite checkpoint, the only one there.
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000003.pth"]
    assert (tmp_path / "model_0000003.pth").read_bytes() == good
    # A process that does not write (another rank) stops alike instead of training on.
    with pytest.raises(NonFiniteWeightsError):
        cls(model, str(tmp_path), save_to_disk=False).save("model_0000007", iteration=7)


@pytest.mark.parametrize("cls", [ViTDetCheckpointer, CheckedDetectionCheckpointer])
def test_a_load_records_the_keys_it_left_untrained(tmp_path, cls):
    saved = backbone_model(vit_cfg())
    sd = saved.state_dict()
    path = tmp_path / "partial.pth"
    torch.save({"model": {**{k: v for k, v in sd.items() if not k.startswith("backbone.pyramid.p2.")},
                          "backbone.pyramid.p3.output.weight": torch.zeros(5, 5)}}, path)
    ck = cls(backbone_model(vit_cfg(), seed=1), str(tmp_path / "run"), save_to_disk=False)
    assert ck.last_incompatible is None
    ck.load(str(path))
    untrained = {*ck.last_incompatible.missing_keys, *(k for k, _, _ in ck.last_incompatible.incorrect_shapes)}
    assert untrained == {k for k in sd if k.startswith("backbone.pyramid.p2.")} | {"backbone.pyramid.p3.output.weight"}
    assert ck.describe_last_load().startswith(str(path))
    full = tmp_path / "full.pth"
    torch.save({"model": sd}, full)
    ck.load(str(full))
    assert ck.last_incompatible.missing_keys == [] and ck.last_incompatible.incorrect_shapes == []


def test_missing_weights_are_one_line_errors_naming_the_path_and_key(tmp_path):
    model = backbone_model(vit_cfg())
    (tmp_path / "folder").mkdir()
    for cls in (ViTDetCheckpointer, CheckedDetectionCheckpointer):  # the latter: non-ViT backbones (R50)
        for load in (lambda ck, p: ck.resume_or_load(p, resume=False), lambda ck, p: ck.load(p)):
            with pytest.raises(CheckpointError) as e:
                load(cls(model, str(tmp_path / "run")), str(tmp_path / "nope.pth"))
            assert str(e.value) == f"checkpoint {tmp_path / 'nope.pth'} (MODEL.WEIGHTS): not found"
        with pytest.raises(CheckpointError) as e:
            cls(model, str(tmp_path / "run")).load(str(tmp_path / "folder"))
        assert str(e.value) == (f"checkpoint {tmp_path / 'folder'} (MODEL.WEIGHTS): is a folder, not a checkpoint "
                                "file, and holds none (.pth, .pt, .bin, .pkl, .safetensors); pass the weights file itself")


def test_a_last_checkpoint_that_cannot_be_resumed_names_the_earlier_ones(tmp_path):
    model = backbone_model(vit_cfg())
    saver = ViTDetCheckpointer(model, str(tmp_path))
    for it in (1, 3, 5):
        saver.save(f"model_{it:07d}", iteration=it)
    other = backbone_model(vit_cfg(), seed=1)
    snapshot = {k: v.clone() for k, v in other.state_dict().items()}
    last, pointer = tmp_path / "model_0000005.pth", tmp_path / "last_checkpoint"
    hint = (f"; to resume from an earlier checkpoint write its name into {pointer} (there: model_0000003.pth, "
            "model_0000001.pth)")

    def resume_error() -> str:
        with pytest.raises(CheckpointError) as e:
            ViTDetCheckpointer(other, str(tmp_path)).resume_or_load("", resume=True)
        assert all(torch.equal(v, snapshot[k]) for k, v in other.state_dict().items())  # nothing loaded
        return str(e.value)

    last.write_bytes(last.read_bytes()[:1000])  # killed while copied, disk trouble
    msg = resume_error()
    assert msg.startswith(f"cannot resume: checkpoint {last} is not a readable torch file (truncated or corrupt?): ")
    assert msg.endswith(hint) and "\n" not in msg
    last.unlink()
    assert resume_error() == f"cannot resume: checkpoint {last} (named by {pointer}): not found{hint}"
    pointer.write_text("")
    assert resume_error() == f"cannot resume: {pointer} is empty{hint}"
    # Nothing was started over or removed: the earlier checkpoints are still there to resume from.
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth", "model_0000003.pth"]
    pointer.write_text("model_0000003.pth")
    assert ViTDetCheckpointer(other, str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 3


def test_a_forced_format_that_does_not_fit_names_the_file_and_what_it_looks_like(tmp_path):
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": encoder_only(tiny_mae().state_dict())}, path)
    for fmt, why in (("hf", "HF ViTMAE state dict has no"), ("d2", "Detectron2 checkpoint without a ViT encoder")):
        with pytest.raises(CheckpointError) as e:
            convert_to_detectron2(str(path), None, fmt)
        assert str(e.value).startswith(f"{path}: cannot be read as {FORMAT_NAMES[fmt]} (format '{fmt}' was forced), "
                                       "its content looks like official MAE (format 'official'; 'auto' detects it): ")
        assert why in str(e.value)


def test_encoder_moves_between_pyramid_modes():
    simple = backbone_model(vit_cfg("custom", "simple"))
    target = target_of(backbone_model(vit_cfg("custom", "multi_tap")))
    assert target.prefix == "backbone.bottom_up.net." and target.grid == (4, 4)
    state, info = convert_to_detectron2({"model": simple.state_dict()}, target)
    assert info["format"] == "d2"
    enc = {k for k in state if k.startswith("backbone.bottom_up.net.")}
    assert len(enc) == len([k for k in simple.state_dict() if k.startswith("backbone.net.")])
