"""Optimizer groups, step trainers and AP files of the detection trainer (mae_det.engine.det_trainer)."""
import json
import math
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from detectron2.solver.build import get_default_optimizer_params
from detectron2.structures import BitMasks, Instances
from detectron2.engine.train_loop import TrainerBase
from detectron2.utils.events import EventStorage
from PIL import Image
from torch import nn

from mae_det.config.detection import get_det_cfg
from mae_det.data.detection import SKIPPED_IMAGES_KEY, DatasetError
from mae_det.checkpoint import CheckpointError
from mae_det.config.pretrain import ConfigError
from mae_det.solver.schedule import configured_settings, keep_configured_settings
from mae_det.engine.det_trainer import (
    AutocastTrainer,
    SkippedImagesHook,
    Trainer,
    build_checkpointer,
    build_step_trainer,
    det_param_groups,
    load_trained,
    norm_param_names,
    write_ap_results,
)
from mae_det.modeling import MaskedAutoencoderViT

DEPTH = 4
BASE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "Base-MaskRCNN-ViT.yaml"
R50_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "COCO" / "mask_rcnn_R_50_FPN_supervised.yaml"


def tiny_cfg(**solver):
    cfg = get_det_cfg()
    cfg.merge_from_file(str(BASE_CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    v = cfg.MODEL.VIT
    v.SIZE, v.EMBED_DIM, v.DEPTH, v.NUM_HEADS = "custom", 64, DEPTH, 2
    v.PRETRAIN_IMG_SIZE, v.INPUT_SIZE, v.WINDOW_SIZE, v.GLOBAL_ATTN_INDEXES, v.OUT_CHANNELS = 64, 64, 2, [1, 3], 32
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 50
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 1, 64
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV, cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 1, 32
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY = 1e-3, 0.1
    for k, val in solver.items():
        cfg.SOLVER[k] = val
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def _expected_layer_id(name):
    if ".net.pos_embed" in name or ".net.patch_embed." in name:
        return 0
    if ".net.blocks." in name:
        return int(name.split(".net.blocks.")[1].split(".")[0]) + 1
    return DEPTH + 1


def test_layer_decay_groups_have_vitdet_lr_scales(model):
    cfg = tiny_cfg(LAYER_DECAY=0.7)
    groups = det_param_groups(cfg, model)
    seen = set()
    for g in groups:
        for name in g["param_names"]:
            scale = 0.7 ** (DEPTH + 1 - _expected_layer_id(name))
            assert g["lr_scale"] == pytest.approx(scale), name
            assert g["lr"] == pytest.approx(1e-3 * scale), name
            seen.add(name)
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}
    scales = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scales["backbone.net.patch_embed.proj.weight"] == pytest.approx(0.7 ** 5)
    assert scales["backbone.net.blocks.0.attn.qkv.weight"] == pytest.approx(0.7 ** 4)
    assert scales["backbone.net.blocks.3.mlp.fc2.weight"] == pytest.approx(0.7)
    assert scales["roi_heads.box_predictor.cls_score.weight"] == 1.0
    assert scales["backbone.pyramid.p2.lateral.weight"] == 1.0


def test_lr_scheduler_keeps_the_layer_ratios(model):
    cfg = tiny_cfg(LAYER_DECAY=0.7, MAX_ITER=10, WARMUP_ITERS=2, STEPS=(5,))
    opt = Trainer.build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    for _ in range(6):
        opt.step()
        sched.step()
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * 0.1 * g["lr_scale"])  # after the step at 5


@pytest.mark.filterwarnings("ignore:Detected call of .lr_scheduler.step")
def test_a_resume_keeps_the_configs_lr_and_weight_decay(model):
    # what Trainer.resume_or_load does around Detectron2's: the checkpoint's optimizer and scheduler states
    # brought back its own lr and weight decay, so a resume with a changed SOLVER.BASE_LR trained at the old one
    def built(**solver):
        cfg = tiny_cfg(LAYER_DECAY=0.7, MAX_ITER=10, WARMUP_ITERS=2, STEPS=(5,), **solver)
        opt = Trainer.build_optimizer(cfg, model)
        return opt, build_lr_scheduler(cfg, opt)

    old_opt, old_sched = built()
    for _ in range(6):
        old_opt.step()
        old_sched.step()
    new_opt, new_sched = built(BASE_LR=4e-3, WEIGHT_DECAY=0.3)
    configured = configured_settings(new_opt)
    new_opt.load_state_dict(old_opt.state_dict())
    new_sched.load_state_dict(old_sched.state_dict())
    keep_configured_settings(new_opt, new_sched, configured)
    fresh_opt, fresh_sched = built(BASE_LR=4e-3, WEIGHT_DECAY=0.3)
    for _ in range(6):
        fresh_sched.step()
    assert new_sched.last_epoch == 6
    assert [g["lr"] for g in new_opt.param_groups] == [g["lr"] for g in fresh_opt.param_groups]
    assert {g["weight_decay"] for g in new_opt.param_groups} == {0.0, 0.3}
    same_opt, same_sched = built()  # unchanged settings: the checkpoint's numbers exactly
    configured = configured_settings(same_opt)
    same_opt.load_state_dict(old_opt.state_dict())
    same_sched.load_state_dict(old_sched.state_dict())
    keep_configured_settings(same_opt, same_sched, configured)
    assert [g["lr"] for g in same_opt.param_groups] == [g["lr"] for g in old_opt.param_groups]


def test_weight_decay_exemptions_cover_channels_first_layernorm(model):
    wd = {n: g["weight_decay"] for g in det_param_groups(tiny_cfg(), model) for n in g["param_names"]}
    cf_ln = [n for n in norm_param_names(model) if ".norm." in n and not n.startswith("backbone.net.")]
    assert any(n.startswith("backbone.pyramid.") for n in cf_ln) and any(n.startswith("roi_heads.") for n in cf_ln)
    for n in cf_ln + ["backbone.net.blocks.0.norm1.weight", "backbone.net.blocks.2.norm2.bias", "backbone.net.pos_embed"]:
        assert wd[n] == 0.0, n
    for n in ["backbone.net.blocks.0.attn.qkv.weight", "backbone.net.blocks.0.attn.qkv.bias",
              "backbone.net.blocks.0.attn.rel_pos_h", "roi_heads.box_predictor.cls_score.bias"]:
        assert wd[n] == 0.1, n  # ViTDet decays biases and relative-position tables
    # Detectron2's own builder misses the channels-first LayerNorms (the defect fixed here).
    d2 = {id(p): g["weight_decay"] for g in get_default_optimizer_params(model, weight_decay=0.1, weight_decay_norm=0.0)
          for p in g["params"]}
    params = dict(model.named_parameters())
    assert all(d2[id(params[n])] == 0.1 for n in cf_ln)
    mae_style = {n: g["weight_decay"] for g in det_param_groups(tiny_cfg(BIAS_NO_DECAY=True), model) for n in g["param_names"]}
    assert all(mae_style[n] == 0.0 for n, p in params.items() if p.ndim <= 1)


def _batch(n=2, size=64):
    batch = []
    for i in range(n):
        img = torch.full((3, size, size), 40, dtype=torch.uint8)
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        masks[0, 8:30, 10:40] = True
        masks[1, 36:60, 30:56] = True
        img[:, masks[0]] = 220
        img[1, masks[1]] = 200
        inst = Instances((size, size), gt_classes=torch.tensor([0, 1]), gt_masks=BitMasks(masks))
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        batch.append({"image": img, "height": size, "width": size, "instances": inst})
    return batch


def _loader(batch):
    while True:
        yield batch


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_autocast_trainer_step_updates_weights(precision):
    torch.manual_seed(0)
    cfg = tiny_cfg(PRECISION=precision)
    m = build_model(cfg)
    opt = Trainer.build_optimizer(cfg, m)
    trainer = build_step_trainer(cfg, m, _loader(_batch()), opt)
    assert isinstance(trainer, AutocastTrainer) and trainer.dtype == (torch.bfloat16 if precision == "bf16" else None)
    dtypes = []
    m.backbone.net.blocks[0].attn.qkv.register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype))
    before = m.backbone.net.blocks[0].attn.qkv.weight.detach().clone()
    trainer.iter = 0
    with EventStorage(0) as storage:
        trainer.run_step()
        loss = storage.history("total_loss").latest()
    assert math.isfinite(loss) and loss > 0
    assert dtypes == [torch.bfloat16 if precision == "bf16" else torch.float32]
    assert m.backbone.net.blocks[0].attn.qkv.weight.dtype == torch.float32  # master weights stay fp32
    assert not torch.equal(before, m.backbone.net.blocks[0].attn.qkv.weight)


class _NaNLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, data):
        return {"loss_ok": self.w.sum(), "loss_bad": self.w.sum() * float("nan")}


def test_non_finite_loss_stops_before_any_update():
    m = _NaNLoss()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    trainer = AutocastTrainer(m, _loader([{}]), opt)
    trainer.iter = 7
    with pytest.raises(FloatingPointError, match=r"non-finite loss at iteration 7: loss_ok=3, loss_bad=nan"):
        trainer.run_step()
    assert torch.equal(m.w.detach(), torch.ones(3)) and m.w.grad is None


def test_ap_results_file_writes_null_for_undefined_ap(tmp_path):
    res = {"bbox": {"AP": 12.5, "AP50": 30.0, "AP75": 10.0, "APs": float("nan"), "APm": 5.0, "APl": 1.0, "AP-cat": 3.0},
           "segm": {"AP": 11.0, "AP50": 28.0, "AP75": 9.0, "APs": 0.0, "APm": float("nan"), "APl": 2.0}}
    path = tmp_path / "ap_results.json"
    write_ap_results(str(path), res, dataset="val", iteration=40)
    text = path.read_text()
    assert "NaN" not in text
    out = json.loads(text)
    assert out == {"bbox": {"AP": 12.5, "AP50": 30.0, "AP75": 10.0, "APs": None, "APm": 5.0, "APl": 1.0},
                   "segm": {"AP": 11.0, "AP50": 28.0, "AP75": 9.0, "APs": 0.0, "APm": None, "APl": 2.0},
                   "dataset": "val", "iteration": 40}


class _StripLoop(TrainerBase):
    """Detectron2's training loop with the SkippedImagesHook and a step that only draws a batch."""

    def __init__(self, batches, hook):
        super().__init__()
        self.batches = hook.strip(batches)
        self.drawn = []
        self.register_hooks([hook])

    def run_step(self):
        self.drawn.append(next(self.batches))


def test_skipped_images_are_counted_once_checkpointed_and_bounded():
    notes = [[], ["x.jpg: cannot decode image"], [], ["x.jpg: cannot decode image", "y.jpg: file not found"]]
    batches = [[{"image_id": i, **({SKIPPED_IMAGES_KEY: list(n)} if n else {})}] for i, n in enumerate(notes)]
    hook = SkippedImagesHook(period=20, max_bad_fraction=0.1)
    loop = _StripLoop(batches, hook)
    loop.train(0, 4)
    assert all(SKIPPED_IMAGES_KEY not in d for batch in loop.drawn for d in batch)  # the model never sees them
    assert [v for v, _ in loop.storage.history("data/skipped_images").values()] == [0, 1, 1, 2]
    assert hook.state_dict() == {"files": ["x.jpg: cannot decode image", "y.jpg: file not found"]}
    resumed = SkippedImagesHook(period=20, max_bad_fraction=0.1)
    resumed.load_state_dict(hook.state_dict())
    resumed.budget = 2
    _StripLoop([[{SKIPPED_IMAGES_KEY: ["y.jpg: file not found"]}]], resumed).train(0, 1)  # known file: still 2
    resumed.budget = 1
    with pytest.raises(DatasetError, match=r"^2 training images failed to decode, more than the 1 that "
                                           r"DATASETS.MAX_BAD_FRACTION=0.1 leaves after the load check: x.jpg: "):
        _StripLoop([[{}]], resumed).train(0, 1)
    assert SkippedImagesHook(period=20, max_bad_fraction=0.1).state_dict() == {}


def test_evaluation_refuses_weights_that_were_not_trained_for_the_task(tmp_path):
    cfg = tiny_cfg()
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    torch.manual_seed(0)
    trained = build_model(cfg)
    build_checkpointer(cfg, trained).save("model_final", iteration=9)

    def evaluate(resume=False, **model_keys):
        c = cfg.clone()
        for k, v in model_keys.items():
            c.merge_from_list([f"MODEL.{k}", v])
        torch.manual_seed(1)
        return load_trained(c, build_model(c), "--eval-only", resume=resume)

    with pytest.raises(ConfigError, match=r"^--eval-only needs trained weights: set MODEL.WEIGHTS"):
        evaluate()  # would write the AP of a random model
    mae = tmp_path / "mae.pth"
    torch.save({"model": MaskedAutoencoderViT(img_size=64, patch_size=16, embed_dim=64, depth=DEPTH, num_heads=2,
                                              decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2).state_dict(),
                "meta": {}}, mae)
    with pytest.raises(CheckpointError) as e:
        evaluate(WEIGHTS=str(mae))  # pyramid and heads would stay random
    assert str(e.value).startswith(f"{mae} (mae_det pretraining checkpoint / encoder export) leaves ")
    assert "untrained (e.g. backbone.pyramid." in str(e.value)
    assert "--eval-only needs a trained detection checkpoint" in str(e.value)
    final = str(tmp_path / "run" / "model_final.pth")
    with pytest.raises(CheckpointError, match=r"leaves 6 tensors of the model untrained \(e.g. roi_heads.box_pre"):
        evaluate(WEIGHTS=final, **{"ROI_HEADS.NUM_CLASSES": 3})  # class layers skipped for their shapes
    assert evaluate(WEIGHTS=final) == {"iteration": 9}
    assert evaluate(resume=True) == {"iteration": 9}  # the run's last checkpoint


def test_evaluation_refuses_untrained_weights_of_a_non_vit_backbone(tmp_path):
    cfg = get_det_cfg()
    cfg.merge_from_file(str(R50_CONFIG))  # the shipped ResNet config, at depth 18 to stay small
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18",
                         "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.ROI_HEADS.NUM_CLASSES", "2",
                         "OUTPUT_DIR", str(tmp_path / "run")])
    (tmp_path / "run").mkdir()
    torch.manual_seed(0)
    trained = build_model(cfg)
    build_checkpointer(cfg, trained).save("model_final", iteration=9)
    backbone_only = tmp_path / "backbone_only.pth"
    torch.save({"model": {k: v for k, v in trained.state_dict().items() if k.startswith("backbone.")}}, backbone_only)

    def evaluate(weights, classes=2):
        c = cfg.clone()
        c.merge_from_list(["MODEL.WEIGHTS", weights, "MODEL.ROI_HEADS.NUM_CLASSES", classes])
        return load_trained(c, build_model(c), "--eval-only")

    with pytest.raises(CheckpointError) as e:
        evaluate(str(backbone_only))  # RPN and ROI heads would stay random: AP 0.0, exit 0 before
    assert str(e.value).startswith(f"{backbone_only} leaves ") and "\n" not in str(e.value)
    assert "tensors of the model untrained (e.g. proposal_generator." in str(e.value)
    assert str(e.value).endswith("--eval-only needs a trained detection checkpoint of this config (same MODEL.* sizes "
                                 "and classes)")
    final = str(tmp_path / "run" / "model_final.pth")
    with pytest.raises(CheckpointError, match=r"leaves 6 tensors of the model untrained \(e.g. roi_heads.box_pre"):
        evaluate(final, classes=3)  # class layers skipped for their shapes
    assert evaluate(final) == {"iteration": 9}


def test_evaluation_with_resume_leaves_a_running_trainings_partial_writes(tmp_path):
    cfg = tiny_cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    torch.manual_seed(0)
    build_checkpointer(cfg, build_model(cfg)).save("model_0000009", iteration=9)
    in_flight = tmp_path / ".model_0000019.pth.x7k2q.tmp"  # the training's next checkpoint, being written
    in_flight.write_bytes(b"PK the first megabytes")
    assert load_trained(cfg, build_model(cfg), "--eval-only", resume=True) == {"iteration": 9}
    assert in_flight.read_bytes() == b"PK the first megabytes"


class _ImageCounter(DatasetEvaluator):
    """Scores a test set with the number of images it was given, in the shape of COCOEvaluator's results."""

    def reset(self):
        self.images = 0

    def process(self, inputs, outputs):
        self.images += len(inputs)

    def evaluate(self):
        return {"bbox": {"AP": float(self.images), "AP50": 50.0}}


@pytest.fixture
def test_sets(tmp_path):
    """Two registered test sets, "tiny_a" (2 images) and "tiny_b" (3)."""
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    sizes = {"tiny_a": 2, "tiny_b": 3}
    for name, n in sizes.items():
        DatasetCatalog.register(name, lambda n=n: [{"file_name": str(tmp_path / f"{i}.png"), "image_id": i,
                                                    "height": 64, "width": 64} for i in range(n)])
    yield sizes
    for name in sizes:
        DatasetCatalog.remove(name)


@pytest.mark.parametrize("test_names", [("tiny_a",), ("tiny_a", "tiny_a"), ("tiny_a", "tiny_b")])
def test_ap_results_are_written_per_distinct_test_set(tmp_path, test_sets, test_names):
    cfg = tiny_cfg()
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 64, "OUTPUT_DIR", str(tmp_path / "out"),
                         "DATASETS.TEST", test_names, "DATALOADER.NUM_WORKERS", 0])
    torch.manual_seed(0)
    Trainer.test(cfg, build_model(cfg), evaluators=[_ImageCounter() for _ in test_names], iteration=5)
    written = {p.name: json.loads(p.read_text()) for p in (tmp_path / "out").glob("ap_results*.json")}
    # A name listed twice is one test set: Detectron2 then returns its results unkeyed, as for a single name.
    expected = {"ap_results.json": {"bbox": {"AP": 2.0, "AP50": 50.0}, "dataset": "tiny_a", "iteration": 5}}
    if "tiny_b" in test_names:
        expected["ap_results_tiny_b.json"] = {"bbox": {"AP": 3.0, "AP50": 50.0}, "dataset": "tiny_b", "iteration": 5}
    assert written == expected
