"""mae_det.analysis.model: the counts are the shared counter's, split by the model's top-level parts."""
import pytest
import torch

from mae_det.config.pretrain import ConfigError
from mae_det.analysis.model import (
    activation_report, analyze, build_target, flop_report, load_pretrain_model_cfg, parameter_report,
)
from mae_det.utils.flops import count_forward_macs
from tests.tools.inference_data import ROOT, make_tiny_coco, write_tiny_config, write_tiny_pretrain_config


def test_mae_counts_match_the_shared_counter_and_closed_forms(tmp_path):
    target = build_target("mae", str(write_tiny_pretrain_config(tmp_path)))
    model, (imgs,) = target.model, target.inputs
    assert imgs.shape == (1, 3, 64, 64)
    rep = flop_report(target)
    torch.manual_seed(0)
    direct = count_forward_macs(model, imgs, mask_ratio=0.75)
    assert rep.total_macs == direct.total_macs and rep.attention_macs == direct.attention_macs > 0
    L, p, D, Dd = 64, 8, 64, 32  # 8x8 patches of 8 px, encoder 64-d, decoder 32-d
    assert rep.by_module["patch_embed"] == L * D * p * p * 3  # conv over all patches (masking comes after)
    assert rep.by_module["decoder_pred"] == (1 + L) * Dd * p * p * 3  # cls + all patches
    # MAE's own forward (masking, the loss) multiplies nothing: its patchify of the loss target is an einsum
    # that only reorders pixels, which fvcore alone priced at half a multiply-add per pixel
    assert rep.total_macs == sum(rep.by_module.values()) and rep.by_operator.get("einsum", 0) == 0
    assert "(top level)" not in analyze(target, ["flop"])

    total, trainable, table = parameter_report(model, max_depth=1)
    assert total == sum(p.numel() for p in model.parameters())
    # The fixed sin-cos tables are parameters without gradient.
    assert total - trainable == model.pos_embed.numel() + model.decoder_pos_embed.numel()
    assert "decoder_blocks" in table

    acts, by_module = activation_report(target)
    assert acts >= sum(by_module.values()) > 0
    assert by_module["patch_embed"] == L * D


def test_detection_target_size_and_report(tmp_path):
    json_path, image_dir = make_tiny_coco(tmp_path, num_images=1)
    config = str(write_tiny_config(tmp_path, json_path, image_dir))
    target = build_target("detection", config, ["INPUT.MIN_SIZE_TEST", "96"])
    assert target.inputs[0].shape == (3, 96, 96)  # min(MIN_SIZE_TEST, MAX_SIZE_TEST) square
    target = build_target("detection", config, input_size=(64, 128))
    assert target.inputs[0].shape == (3, 64, 128)
    text = analyze(target, ["parameter"])
    assert "## parameters" in text and "## FLOPs" not in text and "## activations" not in text
    rep = flop_report(target)
    assert set(rep.by_module) >= {"backbone", "proposal_generator", "roi_heads"}
    assert rep.by_module["roi_heads"] > 0 and rep.attention_macs > 0
    with pytest.raises(ValueError, match="unknown task"):
        analyze(target, ["flops"])


def test_pretrain_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_pretrain_model_cfg(tmp_path / "nope.yaml")
    config = write_tiny_pretrain_config(tmp_path)
    with pytest.raises(ConfigError, match="MODEL.NO_SUCH"):
        load_pretrain_model_cfg(config, ["MODEL.NO_SUCH", "1"])
    with pytest.raises(ConfigError, match="MODEL.ARCH"):
        load_pretrain_model_cfg(config, ["MODEL.ARCH", "resnet50"])


def test_pretrain_config_is_loaded_as_pretraining_loads_it(tmp_path):
    # make demo's config: an integer for the float DATA.CACHE_DECODED_MB, which pretraining accepts
    cfg = load_pretrain_model_cfg(ROOT / "configs" / "shapes" / "pretrain_mae.yaml")
    assert cfg.DATA.CACHE_DECODED_MB == 64.0 and cfg.MODEL.MASK_RATIO == 0.5
    cfg = load_pretrain_model_cfg(write_tiny_pretrain_config(tmp_path), ["MODEL.DROP_PATH", "0"])  # int for a float
    assert cfg.MODEL.DROP_PATH == 0.0


def test_pretrain_config_errors_name_where_they_come_from(tmp_path):
    config = write_tiny_pretrain_config(tmp_path)
    with pytest.raises(ConfigError) as e:  # an override is not the file's fault
        load_pretrain_model_cfg(config, ["MODEL.MASK_RATIO", "high"])
    assert str(e.value).startswith("command line: config key MODEL.MASK_RATIO: expected float") and str(config) \
        not in str(e.value)
    (tmp_path / "bad.yaml").write_text("MODEL:\n  MASK_RATIO: high\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'bad.yaml'}: config key MODEL.MASK_RATIO: expected float"):
        load_pretrain_model_cfg(tmp_path / "bad.yaml")


def test_model_keys_are_validated_as_pretraining_validates_them(tmp_path):
    config = write_tiny_pretrain_config(tmp_path)
    # what pretraining refuses: 0.99 of 64 patches leaves none visible (the model would run on an empty sequence)
    with pytest.raises(ConfigError, match=r"^MODEL.MASK_RATIO: 0.99 keeps none of the 64 patches"):
        load_pretrain_model_cfg(config, ["MODEL.MASK_RATIO", "0.99"])
    with pytest.raises(ConfigError, match=r"^MODEL.EMBED_DIM: 66 is not divisible by MODEL.NUM_HEADS 4"):
        load_pretrain_model_cfg(config, ["MODEL.EMBED_DIM", "66"])


def test_activations_count_fused_attention_as_its_explicit_products(tmp_path):
    target = build_target("mae", str(write_tiny_pretrain_config(tmp_path)))
    acts, by_module = activation_report(target)
    T, Td, D, Dd, H = 1 + 16, 1 + 64, 64, 32, 4  # mask 0.75 keeps 16 of 64 patches; 2 + 2 blocks of 4 heads
    qkv_proj_mlp = T * (3 * D + D + 4 * D + D)  # per encoder block: qkv, proj, fc1, fc2 outputs
    attention = H * T * (T + D // H)  # attention matrix + output, per block
    assert by_module["blocks"] == 2 * (qkv_proj_mlp + attention)
    dec = Td * (3 * Dd + Dd + 4 * Dd + Dd) + H * Td * (Td + Dd // H)
    assert by_module["decoder_blocks"] == 2 * dec
    # the patchify of the loss target reorders pixels: no activations outside the children but the loss's own
    assert acts == sum(by_module.values())


def test_detection_report_gives_the_measured_head_load_and_warns_below_the_configured_one(tmp_path):
    json_path, image_dir = make_tiny_coco(tmp_path, num_images=1)
    config = str(write_tiny_config(tmp_path, json_path, image_dir))
    opts = ["MODEL.RPN.PRE_NMS_TOPK_TEST", "1000", "MODEL.RPN.POST_NMS_TOPK_TEST", "1000",
            "TEST.DETECTIONS_PER_IMAGE", "100"]
    target = build_target("detection", config, opts, input_size=(64, 64))
    assert "full load" not in target.description and target.rois == {}
    seen = {}  # what the heads themselves receive
    for head in ("box_head", "mask_head"):
        getattr(target.model.roi_heads, head).register_forward_hook(
            lambda _m, inputs, _o, head=head: seen.__setitem__(head, int(inputs[0].shape[0])))
    text = analyze(target, ["flop"])
    box, mask = seen["box_head"], seen["mask_head"]
    assert target.rois == {"box_pooler": box, "mask_pooler": mask} and box < 1000 and mask == 100
    # was "heads at full load (1000 proposals, 100 detections)", taken from the config
    assert text.splitlines()[-2:] == [
        f"heads measured at (score threshold 0): box head {box} RoIs of at most 1000 proposals "
        "(MODEL.RPN.POST_NMS_TOPK_TEST), mask head 100 RoIs of at most 100 detections (TEST.DETECTIONS_PER_IMAGE)",
        f"warning: the heads ran below full load (box head {box} < 1000): on this input the RPN keeps fewer boxes, "
        "so their FLOPs and activations are those of this load, not the configured maximum"]
    full = analyze(build_target("detection", config, input_size=(64, 64)), ["activation"])  # 50 proposals, 10 masks
    assert full.endswith("box head 50 RoIs of at most 50 proposals (MODEL.RPN.POST_NMS_TOPK_TEST), mask head 10 "
                         "RoIs of at most 10 detections (TEST.DETECTIONS_PER_IMAGE)")
    assert "heads measured" not in analyze(target, ["parameter"])  # no forward, no load to report


def test_a_semantic_segmentation_config_is_analyzed(tmp_path):
    config = str(ROOT / "configs" / "shapes" / "sem_seg_vit_scratch.yaml")  # its datasets are not read
    target = build_target("detection", config)
    text = analyze(target, ["flop", "activation"])  # was KeyError 'instances'
    assert target.description == "SlidingWindowSegmentor (build_vit_multitap_backbone), input 3x64x64"
    rep = flop_report(target)
    assert set(rep.by_module) >= {"backbone", "sem_seg_head"} and rep.by_module["sem_seg_head"] > 0
    assert "| sem_seg_head " in text and "heads measured" not in text and target.max_rois == {}
