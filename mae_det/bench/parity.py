"""Training parity with Detectron2's own ViTDet: the same Mask R-CNN, built two ways, trained side by side.

*Ours* is the yacs model of ``tools/train_net.py`` (``build_vit_fpn_backbone``, ``simple`` pyramid) with its
optimizer, schedule and step trainer (:class:`~mae_det.engine.det_trainer.Trainer`). *Theirs* is Detectron2's
LazyConfig ViTDet (``common/models/mask_rcnn_vitdet.py`` of the installed package) with the encoder, pyramid and
heads set to the sizes of our config by :func:`vitdet_model_config`, ViTDet's optimizer recipe (``common/optim.py``
AdamW, ``get_vit_lr_decay_rate``, no decay on ``pos_embed``), its warmup + multi-step schedule and Detectron2's
``SimpleTrainer``.

:func:`run_parity` copies their initial weights into ours through the checkpoint converter, feeds both the same
batches for ``k`` iterations (same RNG state before every step: drop path and RoI sampling draw alike) and
compares losses, gradients, the updated weights, every parameter's lr and weight decay, and the lr schedule over
the whole run. :data:`DELIBERATE_DEVIATIONS` lists what we do differently on purpose; anything else is a failure.

:func:`run_side_by_side` trains both for the config's full schedule on its datasets with several seeds and
evaluates both with Detectron2's ``COCOEvaluator``.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from detectron2 import model_zoo
from detectron2.config import CfgNode, instantiate
from detectron2.data import (
    DatasetMapper, build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.engine import SimpleTrainer, hooks
from detectron2.engine.train_loop import HookBase
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.layers import ShapeSpec
from detectron2.layers.batch_norm import LayerNorm as ChannelsFirstLayerNorm
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from fvcore.common.param_scheduler import MultiStepParamScheduler
from torch import nn

from ..checkpoint.convert import convert_to_detectron2
from ..config.detection import _merge, get_det_cfg, load_det_cfg
from ..config.pretrain import ConfigError
from ..config.vit_backbone import global_attn_indexes, vit_dims
from ..data.detection import build_detection_mapper, register_datasets
from ..engine.det_trainer import AP_KEYS, Trainer, build_step_trainer
from ..utils.precision import bf16_native
from .det import synthetic_batch


# What we do differently from Detectron2's ViTDet on purpose (README, "Parity with ViTDet"). Keys are the kinds
# of difference :func:`compare_param_groups` reports.
DELIBERATE_DEVIATIONS = {
    "weight_decay of channels-first LayerNorm": (
        "Detectron2's get_default_optimizer_params exempts only torch.nn norm types from weight decay, so the "
        "channels-first LayerNorms of the pyramid and the LN heads are decayed; ours exempts every norm "
        "(SOLVER.NORM_NO_DECAY), which is ViTDet's stated intent (weight_decay_norm=0)"
    ),
}


# ---- the ViTDet side -------------------------------------------------------------------------------------------
def _strides(features: list[str]) -> list[int]:
    return [2 ** int(f[1:]) for f in features]  # "p3" -> 8


def vitdet_model_config(cfg: CfgNode) -> Any:
    """Detectron2's LazyConfig ViTDet Mask R-CNN with the sizes of our yacs ``cfg``.

    Only what our configs choose is set (encoder size, windows, relative position, pyramid width and norm,
    padding, pixel statistics, anchors and feature names, RPN / RoI sampling and NMS limits, head sizes, class
    count, test thresholds); everything else stays at the LazyConfig's values, so a default that differs between
    Detectron2's yacs and LazyConfig paths shows up as a parity failure.
    """
    m = copy.deepcopy(model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model)
    v, rpn, roi = cfg.MODEL.VIT, cfg.MODEL.RPN, cfg.MODEL.ROI_HEADS
    box, mask = cfg.MODEL.ROI_BOX_HEAD, cfg.MODEL.ROI_MASK_HEAD
    dim, depth, heads = vit_dims(cfg)
    global_blocks = set(global_attn_indexes(cfg)) if v.WINDOW_SIZE > 0 else set(range(depth))
    m.pixel_mean, m.pixel_std, m.input_format = list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD), cfg.INPUT.FORMAT
    net = m.backbone.net
    net.update(
        img_size=v.INPUT_SIZE, patch_size=v.PATCH_SIZE, in_chans=v.IN_CHANS, embed_dim=dim, depth=depth,
        num_heads=heads, drop_path_rate=v.DROP_PATH_RATE, window_size=v.WINDOW_SIZE,
        window_block_indexes=[i for i in range(depth) if i not in global_blocks], use_rel_pos=v.USE_REL_POS,
        pretrain_img_size=v.PRETRAIN_IMG_SIZE,
    )
    m.backbone.update(out_channels=v.OUT_CHANNELS, norm=v.NORM, square_pad=v.SQUARE_PAD)

    pg = m.proposal_generator
    anchors = cfg.MODEL.ANCHOR_GENERATOR
    pg.in_features = list(rpn.IN_FEATURES)
    pg.head.update(in_channels=v.OUT_CHANNELS, conv_dims=list(rpn.CONV_DIMS),
                   num_anchors=len(anchors.SIZES[0]) * len(anchors.ASPECT_RATIOS[0]))
    pg.anchor_generator.update(sizes=[list(s) for s in anchors.SIZES], aspect_ratios=[list(a) for a in anchors.ASPECT_RATIOS],
                               strides=_strides(rpn.IN_FEATURES))
    pg.update(batch_size_per_image=rpn.BATCH_SIZE_PER_IMAGE, positive_fraction=rpn.POSITIVE_FRACTION,
              pre_nms_topk=(rpn.PRE_NMS_TOPK_TRAIN, rpn.PRE_NMS_TOPK_TEST),
              post_nms_topk=(rpn.POST_NMS_TOPK_TRAIN, rpn.POST_NMS_TOPK_TEST), nms_thresh=rpn.NMS_THRESH)

    rh = m.roi_heads
    scales = tuple(1.0 / s for s in _strides(roi.IN_FEATURES))
    rh.update(num_classes=roi.NUM_CLASSES, batch_size_per_image=roi.BATCH_SIZE_PER_IMAGE,
              positive_fraction=roi.POSITIVE_FRACTION, box_in_features=list(roi.IN_FEATURES),
              mask_in_features=list(roi.IN_FEATURES))
    rh.proposal_matcher.thresholds = list(roi.IOU_THRESHOLDS)
    rh.box_pooler.update(output_size=box.POOLER_RESOLUTION, scales=scales)
    rh.box_head.update(input_shape=ShapeSpec(channels=v.OUT_CHANNELS, height=box.POOLER_RESOLUTION,
                                             width=box.POOLER_RESOLUTION),
                       conv_dims=[box.CONV_DIM] * box.NUM_CONV, fc_dims=[box.FC_DIM] * box.NUM_FC, conv_norm=box.NORM)
    box_out = box.FC_DIM if box.NUM_FC else box.CONV_DIM * box.POOLER_RESOLUTION ** 2
    rh.box_predictor.update(input_shape=ShapeSpec(channels=box_out), test_score_thresh=roi.SCORE_THRESH_TEST,
                            test_nms_thresh=roi.NMS_THRESH_TEST, test_topk_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
    rh.mask_pooler.update(output_size=mask.POOLER_RESOLUTION, scales=scales)
    rh.mask_head.update(input_shape=ShapeSpec(channels=v.OUT_CHANNELS, width=mask.POOLER_RESOLUTION,
                                              height=mask.POOLER_RESOLUTION),
                        conv_dims=[mask.CONV_DIM] * (mask.NUM_CONV + 1), conv_norm=mask.NORM)
    return m


def build_vitdet_model(cfg: CfgNode) -> nn.Module:
    model = instantiate(vitdet_model_config(cfg))
    # LastLevelMaxPool reads "p5" (an attribute, not an argument); at patch 8 the last pyramid level is p4
    model.backbone.top_block.in_feature = f"p{int(math.log2(2 * cfg.MODEL.VIT.PATCH_SIZE))}"
    return model.to(cfg.MODEL.DEVICE)


def build_vitdet_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """ViTDet's optimizer recipe (``projects/ViTDet/configs``): ``common/optim.py`` AdamW with
    ``get_vit_lr_decay_rate`` layer decay and no weight decay on ``pos_embed``, at our lr / wd / betas."""
    S = cfg.SOLVER
    opt = copy.deepcopy(model_zoo.get_config("common/optim.py").AdamW)
    opt.params.model = model
    opt.update(lr=S.BASE_LR, weight_decay=S.WEIGHT_DECAY, betas=tuple(S.BETAS))
    if S.LAYER_DECAY > 0:
        opt.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=vit_dims(cfg)[1], lr_decay_rate=S.LAYER_DECAY)
    opt.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
    return instantiate(opt)


def build_vitdet_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> LRMultiplier:
    """ViTDet's ``lr_multiplier``: multi-step (x GAMMA at SOLVER.STEPS) after a linear warmup."""
    S = cfg.SOLVER
    steps = [s for s in S.STEPS if s <= S.MAX_ITER]
    multiplier = WarmupParamScheduler(
        MultiStepParamScheduler(values=[S.GAMMA ** k for k in range(len(steps) + 1)], milestones=steps,
                                num_updates=S.MAX_ITER),
        warmup_length=S.WARMUP_ITERS / S.MAX_ITER, warmup_factor=S.WARMUP_FACTOR,
    )
    return LRMultiplier(optimizer, multiplier, max_iter=S.MAX_ITER)


# ---- weights, names and optimizer groups -------------------------------------------------------------------
def copy_vitdet_weights(theirs: nn.Module, ours: nn.Module) -> dict[str, str]:
    """Loads ``theirs``' state into ``ours`` through the checkpoint converter (``vitdet`` format), strictly.

    Returns:
        {our parameter name: their parameter name}.
    """
    state = theirs.state_dict(keep_vars=True)
    converted, info = convert_to_detectron2({"model": state}, ours, fmt="vitdet", source="ViTDet model")
    if info["dropped"] or info["notes"]:
        raise RuntimeError(f"ViTDet -> ours conversion was not one to one: dropped {info['dropped']}, {info['notes']}")
    ours.load_state_dict({k: t.detach() for k, t in converted.items()}, strict=True)
    by_id = {id(t): k for k, t in state.items()}
    names = {k: by_id[id(t)] for k, t in converted.items() if id(t) in by_id}
    missing = [k for k, _ in ours.named_parameters() if k not in names]
    if missing:
        raise RuntimeError(f"parameters of ours without a ViTDet counterpart: {missing[:4]}")
    return names


def param_hparams(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, tuple[float, float]]:
    """{parameter name: (lr, weight_decay)} as the optimizer's groups hold them now."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def channels_first_norm_params(model: nn.Module) -> set[str]:
    return {f"{mn}.{pn}" for mn, mod in model.named_modules() if isinstance(mod, ChannelsFirstLayerNorm)
            for pn, _ in mod.named_parameters(recurse=False)}


@dataclass
class Difference:
    kind: str
    name: str
    ours: Any
    theirs: Any

    def __str__(self) -> str:
        return f"{self.kind}: {self.name}: ours {self.ours} vs ViTDet {self.theirs}"


def compare_param_groups(ours: nn.Module, ours_opt: torch.optim.Optimizer, theirs: nn.Module,
                         theirs_opt: torch.optim.Optimizer, names: dict[str, str]) -> list[Difference]:
    """Every parameter's lr and weight decay, ours vs ViTDet's; differences are classified by kind."""
    mine, other = param_hparams(ours, ours_opt), param_hparams(theirs, theirs_opt)
    cf_norms = channels_first_norm_params(ours)
    diffs = []
    for name, (lr, wd) in mine.items():
        t_name = names[name]
        if t_name not in other:
            diffs.append(Difference("parameter not optimized by ViTDet", name, (lr, wd), None))
            continue
        t_lr, t_wd = other[t_name]
        if not math.isclose(lr, t_lr, rel_tol=1e-9):
            diffs.append(Difference("lr", name, lr, t_lr))
        if not math.isclose(wd, t_wd, rel_tol=1e-9):
            kind = "weight_decay of channels-first LayerNorm" if name in cf_norms else "weight_decay"
            diffs.append(Difference(kind, name, wd, t_wd))
    optimized = set(names[n] for n in mine)
    diffs += [Difference("parameter not optimized by ours", t, None, other[t]) for t in other if t not in optimized]
    return diffs


def regroup_like(theirs: nn.Module, theirs_opt: torch.optim.Optimizer, hparams: dict[str, tuple[float, float]]
                 ) -> torch.optim.Optimizer:
    """A fresh optimizer of ``theirs_opt``'s class and defaults, with the per-parameter (lr, wd) of ``hparams``."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in theirs.named_parameters():
        if name in hparams:
            groups.setdefault(hparams[name], []).append(p)
    accepted = inspect.signature(type(theirs_opt)).parameters
    kwargs = {k: v for k, v in theirs_opt.defaults.items() if k in accepted and k not in ("lr", "weight_decay")}
    return type(theirs_opt)([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()], **kwargs)


# ---- the k-iteration comparison ----------------------------------------------------------------------------
def synthetic_batches(n_iters: int, batch: int, size: int, num_classes: int, device: str, seed: int = 0,
                      instances: int = 4) -> list[list[dict]]:
    """``n_iters`` batches of :func:`synthetic_batch` images drawn from one generator."""
    g = torch.Generator().manual_seed(seed)
    return [synthetic_batch(batch, size, device, instances, num_classes=num_classes, min_side=size // 8, generator=g)
            for _ in range(n_iters)]


class _Recorder(HookBase):
    """Seeds torch's RNG before every step (drop path, RoI sampling) and records losses, gradients and lrs."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.losses: list[dict[str, float]] = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.lrs: list[list[float]] = []

    def before_step(self) -> None:
        torch.manual_seed(self.seed + self.trainer.iter)
        self.lrs.append([g["lr"] for g in self.trainer.optimizer.param_groups])  # the lrs this step runs at

    def after_backward(self) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in self.trainer.model.named_parameters()
                           if p.grad is not None})

    def after_step(self) -> None:
        s = self.trainer.storage
        self.losses.append({k: v[0] for k, v in s.latest().items() if k.startswith("loss_")})


@dataclass
class ParityReport:
    iterations: int
    init_max_diff: float  # same seed, before copying: how far ViTDet's and our initial weights are apart
    param_group_differences: list[Difference]
    loss_rows: list[dict[str, tuple[float, float]]]  # per iteration: {loss: (ours, theirs)}
    grad_max_rel_diff: list[tuple[float, str]]  # per iteration: worst max|dg| / max|g| and its parameter
    weight_max_diff: tuple[float, str]  # after the k updates: max |diff| and its parameter
    schedule_max_diff: float  # over MAX_ITER iterations, relative
    inference_max_diff: float | None  # after the k updates: boxes (px) and scores; None = other detections
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def parity_cfg(config_file: str = "", opts: list[str] | None = None) -> CfgNode:
    """Our config for the comparison (``config_file`` or :func:`tiny_parity_cfg`, then ``opts``), in fp32
    (Detectron2's trainers have no CPU bf16), from scratch."""
    if config_file:
        cfg = load_det_cfg(config_file, list(opts or []), training=True)
    else:
        cfg = tiny_parity_cfg()
        # The detection config's merge: a bad override is a one-line ConfigError, as it is with a config file.
        _merge(cfg, "", list(opts or []))
    cfg.SOLVER.PRECISION, cfg.SOLVER.AMP.ENABLED = "fp32", False
    cfg.MODEL.WEIGHTS, cfg.MODEL.INIT_TYPE = "", "scratch"
    return _require_simple_pyramid(cfg, config_file)


def _require_simple_pyramid(cfg: CfgNode, config_file: str) -> CfgNode:
    """ViTDet has only the simple pyramid: another one would compare two different detectors."""
    if cfg.MODEL.VIT.PYRAMID != "simple":
        raise ConfigError(f"{config_file or 'parity config'}: MODEL.VIT.PYRAMID is {cfg.MODEL.VIT.PYRAMID!r}; the "
                         f"comparison with ViTDet needs 'simple' (e.g. configs/shapes/mask_rcnn_vit_parity.yaml)")
    return cfg


def tiny_parity_cfg() -> CfgNode:
    """A CPU-second-sized ViTDet: 64-d 3-block ViT (windows, relative position, drop path), ViTDet's heads
    shrunk (4conv1fc LN box head, 2-conv RPN, LN mask head), layer decay, warmup + steps."""
    cfg = get_det_cfg()
    cfg.merge_from_file(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "Base-MaskRCNN-ViT.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.VIT.SIZE", "custom", "MODEL.VIT.EMBED_DIM", 64, "MODEL.VIT.DEPTH", 3,
        "MODEL.VIT.NUM_HEADS", 2, "MODEL.VIT.PRETRAIN_IMG_SIZE", 64, "MODEL.VIT.INPUT_SIZE", 64,
        "MODEL.VIT.WINDOW_SIZE", 2, "MODEL.VIT.GLOBAL_ATTN_INDEXES", [1], "MODEL.VIT.DROP_PATH_RATE", 0.1,
        "MODEL.VIT.OUT_CHANNELS", 32, "MODEL.VIT.SQUARE_PAD", 64,
        "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16,
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 32, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64, "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200,
        "MODEL.ROI_BOX_HEAD.CONV_DIM", 16, "MODEL.ROI_BOX_HEAD.FC_DIM", 32, "MODEL.ROI_MASK_HEAD.CONV_DIM", 16,
        "MODEL.ROI_MASK_HEAD.NUM_CONV", 2,
        "SOLVER.BASE_LR", 1e-3, "SOLVER.WEIGHT_DECAY", 0.1, "SOLVER.LAYER_DECAY", 0.7, "SOLVER.MAX_ITER", 20,
        "SOLVER.WARMUP_ITERS", 2, "SOLVER.STEPS", (3, 18), "SOLVER.IMS_PER_BATCH", 2,
    ])
    return cfg


def run_parity(cfg: CfgNode, iters: int = 3, seed: int = 0, batch: int = 2, size: int | None = None,
               rtol: float = 1e-4) -> ParityReport:
    """Builds both models from one seed, copies ViTDet's initial weights into ours, trains both ``iters`` steps
    on the same synthetic batches with their own optimizers and trainers, and compares.

    ViTDet's optimizer gets the lr / weight decay of ours where :data:`DELIBERATE_DEVIATIONS` says we differ on
    purpose (the differences are still reported), so that the loss and gradient comparison checks the rest.

    Args:
        rtol: tolerance relative to each quantity's scale (losses; a gradient tensor's max |g|; weights).

    Raises:
        ValueError: ``iters`` < 1 (there would be nothing to compare).
    """
    if iters < 1:
        raise ValueError(f"iters: expected >= 1 training step to compare, got {iters}")
    size = size or (cfg.MODEL.VIT.SQUARE_PAD or cfg.MODEL.VIT.INPUT_SIZE)
    seed_all_rng(seed)
    theirs = build_vitdet_model(cfg)
    seed_all_rng(seed)
    ours = Trainer.build_model(cfg)
    ours_init = {k: v.clone() for k, v in ours.state_dict().items()}
    names = copy_vitdet_weights(theirs, ours)
    t_state = theirs.state_dict()
    init_diff = max(float((ours_init[k] - t_state[names[k]]).abs().max()) for k in names)

    ours_opt = Trainer.build_optimizer(cfg, ours)
    theirs_opt = build_vitdet_optimizer(cfg, theirs)
    diffs = compare_param_groups(ours, ours_opt, theirs, theirs_opt, names)
    deliberate = {d.name for d in diffs if d.kind in DELIBERATE_DEVIATIONS}
    if deliberate:
        mine, other = param_hparams(ours, ours_opt), param_hparams(theirs, theirs_opt)
        other.update({names[n]: mine[n] for n in deliberate})
        theirs_opt = regroup_like(theirs, theirs_opt, other)

    batches = synthetic_batches(iters, batch, size, cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.DEVICE, seed)
    recorders = []
    for model, opt, sched_fn, step_trainer in (
        (ours, ours_opt, Trainer.build_lr_scheduler, lambda m, d, o: build_step_trainer(cfg, m, d, o)),
        (theirs, theirs_opt, build_vitdet_lr_scheduler, SimpleTrainer),
    ):
        trainer = step_trainer(model.train(), batches, opt)
        rec = _Recorder(seed)
        trainer.register_hooks([hooks.LRScheduler(opt, sched_fn(cfg, opt)), rec])
        trainer.train(0, iters)
        recorders.append(rec)
    mine, other = recorders

    failures = [str(d) for d in diffs if d.kind not in DELIBERATE_DEVIATIONS]
    loss_rows, grad_rows = [], []
    for i in range(iters):
        row = {k: (mine.losses[i][k], other.losses[i].get(k, math.nan)) for k in mine.losses[i]}
        loss_rows.append(row)
        if set(mine.losses[i]) != set(other.losses[i]):
            failures.append(f"iteration {i}: loss terms {sorted(mine.losses[i])} vs {sorted(other.losses[i])}")
        for k, (a, b) in row.items():
            if not abs(a - b) <= rtol * max(abs(b), 1e-3):
                failures.append(f"iteration {i}: {k} ours {a:.7g} vs ViTDet {b:.7g}")
        worst, worst_name = 0.0, ""
        for name, g in mine.grads[i].items():
            tg = other.grads[i].get(names[name])
            if tg is None:
                failures.append(f"iteration {i}: {name} has a gradient in ours only")
                continue
            rel = float((g - tg).abs().max() / tg.abs().max().clamp_min(1e-12))
            if rel > worst:
                worst, worst_name = rel, name
        grad_rows.append((worst, worst_name))
        if worst > rtol:
            failures.append(f"iteration {i}: gradient of {worst_name} differs by {worst:.2e} of its scale")
    t_params = dict(theirs.named_parameters())
    weight_diff, weight_name = max((float((p.detach() - t_params[names[n]].detach()).abs().max()), n)
                                   for n, p in ours.named_parameters())
    # Adam scales every element's step to ~lr, also for gradients near zero whose last digits differ: compare
    # against 1 % of the largest total step rather than against the weights' scale. That step is the sum of the lrs
    # the steps ran at: in a warmup from WARMUP_FACTOR it is far below BASE_LR x iters, a bound that an optimizer
    # which never moved a weight would meet.
    tolerance = 0.01 * sum(max(*a, *b) for a, b in zip(mine.lrs, other.lrs))
    if weight_diff > tolerance:
        failures.append(f"weights after {iters} updates differ by {weight_diff:.2e} ({weight_name}; tolerance "
                        f"{tolerance:.2e}: 1 % of the summed lr)")
    inference_diff = compare_inference(ours, theirs, batches[0])
    if inference_diff is None:
        failures.append("inference after training: different numbers of detections or classes")
    elif inference_diff > rtol * size:
        failures.append(f"inference after training: boxes / scores differ by {inference_diff:.2e}")
    sched_diff = compare_schedules(cfg)
    if sched_diff > 1e-9:
        failures.append(f"lr schedules differ by {sched_diff:.2e} (relative) over SOLVER.MAX_ITER")
    return ParityReport(iters, init_diff, diffs, loss_rows, grad_rows, (weight_diff, weight_name),
                        sched_diff, inference_diff, failures)


def compare_inference(ours: nn.Module, theirs: nn.Module, batch: list[dict]) -> float | None:
    """Largest difference of the detections (box coordinates in pixels, scores; mask pixels count as 1) of the
    two models in eval mode on ``batch``; None when the number of detections or their classes differ."""
    inputs = [{k: x[k] for k in ("image", "height", "width")} for x in batch]
    with torch.no_grad():
        mine, other = ours.eval()(inputs), theirs.eval()(inputs)
    ours.train(), theirs.train()
    worst = 0.0
    for a, b in zip(mine, other):
        a, b = a["instances"], b["instances"]
        if len(a) != len(b) or not torch.equal(a.pred_classes, b.pred_classes):
            return None
        if len(a):
            worst = max(worst, float((a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max()),
                        float((a.scores - b.scores).abs().max()), float((a.pred_masks != b.pred_masks).float().max()))
    return worst


def compare_schedules(cfg: CfgNode) -> float:
    """Largest relative difference of our and ViTDet's lr multiplier over ``SOLVER.MAX_ITER`` iterations."""
    def multipliers(build: Callable) -> list[float]:
        sched = build(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))
        return [sched._multiplier(i / cfg.SOLVER.MAX_ITER) for i in range(cfg.SOLVER.MAX_ITER)]

    return max(abs(a - b) / b for a, b in zip(multipliers(Trainer.build_lr_scheduler), multipliers(build_vitdet_lr_scheduler)))


def format_parity(report: ParityReport) -> str:
    """The report printed by ``tools/benchmark_det.py --parity``."""
    lines = [f"initial weights from the same seed (before copying ViTDet's into ours): max |diff| {report.init_max_diff:.3g}"]
    lines.append("optimizer, per parameter (lr, weight decay) vs ViTDet's recipe:")
    if not report.param_group_differences:
        lines.append("  identical")
    by_kind: dict[str, list[Difference]] = {}
    for d in report.param_group_differences:
        by_kind.setdefault(d.kind, []).append(d)
    for kind, ds in by_kind.items():
        if kind in DELIBERATE_DEVIATIONS:
            names = ", ".join(d.name for d in ds[:3]) + (", ..." if len(ds) > 3 else "")
            lines.append(f"  [deliberate] {kind}: {len(ds)} parameters ({names}): ours {ds[0].ours} vs ViTDet "
                         f"{ds[0].theirs}; {DELIBERATE_DEVIATIONS[kind]}")
        else:
            lines += [f"  [DIFFERENCE] {d}" for d in ds]
    lines.append(f"lr schedule over SOLVER.MAX_ITER: max relative difference {report.schedule_max_diff:.3g}")
    for i, (row, (g, gname)) in enumerate(zip(report.loss_rows, report.grad_max_rel_diff)):
        terms = ", ".join(f"{k} {a:.6f}/{b:.6f}" for k, (a, b) in row.items())
        lines.append(f"iteration {i}: losses ours/ViTDet {terms}; worst gradient difference {g:.2e} of scale ({gname})")
    inference = "different detections" if report.inference_max_diff is None else f"max |diff| {report.inference_max_diff:.3g}"
    lines.append(f"inference after the updates (boxes in px, scores, mask pixels): {inference}")
    lines.append(f"weights after {report.iterations} updates: max |diff| {report.weight_max_diff[0]:.3g} "
                 f"({report.weight_max_diff[1]})")
    lines.append("PARITY OK" if report.ok else "PARITY FAILED:\n  " + "\n  ".join(report.failures))
    return "\n".join(lines)


# ---- the side-by-side training run ---------------------------------------------------------------------------
# "ours_bf16": our trainer with SOLVER.PRECISION bf16 (CPU autocast; Detectron2's trainers have no CPU bf16).
SIDES = ("ours", "vitdet", "ours_bf16")
SIDE_LABELS = {
    "ours": "ours (tools/train_net.py trainer), fp32",
    "vitdet": "Detectron2 ViTDet (LazyConfig, SimpleTrainer), fp32",
    "ours_bf16": "ours, bf16 autocast (SOLVER.PRECISION bf16)",
}


def default_sides() -> tuple[str, ...]:
    """Both fp32 sides, plus our bf16 trainer where the CPU has native bf16 (elsewhere it is ~65x slower)."""
    return SIDES if bf16_native("cpu") else SIDES[:2]


def side_by_side_cfg(config_file: str, opts: list[str] | None = None) -> CfgNode:
    """Our config for a side-by-side run: fp32 on both sides (Detectron2's own trainers have no CPU bf16), and,
    with LSJ, batches square-padded to the LSJ size on both sides as ViTDet does (``square_pad`` = LSJ size;
    without it ViTDet's misspelled ``padding_constraints`` key leaves its inputs unpadded to the patch)."""
    cfg = load_det_cfg(config_file, list(opts or []), training=True)
    cfg.SOLVER.PRECISION, cfg.SOLVER.AMP.ENABLED = "fp32", False
    if cfg.INPUT.LSJ.ENABLED and not cfg.MODEL.VIT.SQUARE_PAD:
        cfg.MODEL.VIT.SQUARE_PAD = cfg.INPUT.LSJ.IMAGE_SIZE
    return _require_simple_pyramid(cfg, config_file)


@dataclass
class RunResult:
    side: str
    seed: int
    bbox: dict[str, float]
    segm: dict[str, float]
    s_per_iter: float  # median over the iterations after the first 3 (Detectron2's IterationTimer)
    final_loss: float  # mean total loss over the last 20 iterations
    wall_s: float


def _timing(storage: Any, last: int = 20) -> tuple[float, float]:
    times = storage.history("time").values()
    losses = storage.history("total_loss").values()[-last:]
    return statistics.median(v for v, _ in times), statistics.fmean(v for v, _ in losses)


def _ap(results: dict) -> tuple[dict[str, float], dict[str, float]]:
    return tuple({k: float(results.get(task, {}).get(k, math.nan)) for k in AP_KEYS} for task in ("bbox", "segm"))


def train_ours(cfg: CfgNode, seed: int, output_dir: str, precision: str = "fp32") -> RunResult:
    """``tools/train_net.py``'s trainer (model, AdamW groups, schedule, step trainer, hooks, COCO evaluation)."""
    cfg = cfg.clone()
    cfg.SEED, cfg.OUTPUT_DIR, cfg.SOLVER.PRECISION = seed, output_dir, precision
    cfg.SOLVER.CHECKPOINT_PERIOD = cfg.SOLVER.MAX_ITER + 1  # only model_final
    cfg.freeze()
    seed_all_rng(seed)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    s_iter, loss = _timing(trainer.storage)
    bbox, segm = _ap(trainer._last_eval_results)
    side = "ours" if precision == "fp32" else f"ours_{precision}"
    return RunResult(side, seed, bbox, segm, s_iter, loss, time.perf_counter() - start)


def train_vitdet(cfg: CfgNode, seed: int, output_dir: str) -> RunResult:
    """Detectron2's ViTDet as its LazyConfig recipe trains it: the LazyConfig model at our sizes, ViTDet's AdamW
    groups and schedule, ``SimpleTrainer`` with ``IterationTimer`` and ``LRScheduler`` hooks, the same training
    data and LSJ mapper, ViTDet's test resize (shortest edge = LSJ size) and ``COCOEvaluator``."""
    seed_all_rng(seed)
    start = time.perf_counter()
    model = build_vitdet_model(cfg)
    optimizer = build_vitdet_optimizer(cfg, model)
    loader = build_detection_train_loader(
        dataset=get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS),
        mapper=build_detection_mapper(cfg, is_train=True), total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    trainer = SimpleTrainer(model, loader, optimizer)
    trainer.register_hooks([hooks.IterationTimer(), hooks.LRScheduler(optimizer, build_vitdet_lr_scheduler(cfg, optimizer))])
    trainer.train(0, cfg.SOLVER.MAX_ITER)
    s_iter, loss = _timing(trainer.storage)
    name = cfg.DATASETS.TEST[0]
    size = cfg.INPUT.LSJ.IMAGE_SIZE if cfg.INPUT.LSJ.ENABLED else cfg.INPUT.MIN_SIZE_TEST
    test_loader = build_detection_test_loader(
        dataset=get_detection_dataset_dicts(name, filter_empty=False),
        mapper=DatasetMapper(is_train=False, augmentations=[T.ResizeShortestEdge(size, max_size=size)],
                             image_format=cfg.INPUT.FORMAT),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False, output_dir=output_dir,
                              max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE, use_fast_impl=False,
                              allow_cached_coco=False)
    bbox, segm = _ap(inference_on_dataset(model, test_loader, evaluator))
    return RunResult("vitdet", seed, bbox, segm, s_iter, loss, time.perf_counter() - start)


def single_thread_worker() -> None:
    """Initializer of the worker processes of a parallel side-by-side run: one torch thread each."""
    torch.set_num_threads(1)


def run_one(config_file: str, opts: list[str], side: str, seed: int, output_dir: str) -> RunResult:
    """One (side, seed) training run into ``output_dir/<side>_seed<seed>_<config hash>``; its result is kept as
    result.json there and reused when present (an interrupted comparison resumes run by run; another config or
    override gets other folders)."""
    cfg = side_by_side_cfg(config_file, opts)
    digest = hashlib.sha256(cfg.dump().encode()).hexdigest()[:10]
    out = os.path.join(output_dir, f"{side}_seed{seed}_{digest}")
    path = os.path.join(out, "result.json")
    if os.path.isfile(path):
        with open(path) as f:
            return RunResult(**json.load(f))
    os.makedirs(out, exist_ok=True)
    register_datasets(cfg)
    if side == "vitdet":
        result = train_vitdet(cfg, seed, out)
    else:
        result = train_ours(cfg, seed, out, "bf16" if side == "ours_bf16" else "fp32")
    with open(path + ".tmp", "w") as f:
        json.dump(result.__dict__, f, indent=2)
    os.replace(path + ".tmp", path)
    return result


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def format_side_by_side(results: list[RunResult]) -> str:
    """Mean ± sample std over seeds per side: box / mask AP (and AP50 / AP75), s/iter, final loss; per-seed rows."""
    by_side = {s: [r for r in results if r.side == s] for s in SIDES}
    head = "| | seeds | box AP | box AP50 | box AP75 | mask AP | mask AP50 | mask AP75 | s/iter (median) | final loss |"
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for side, rs in by_side.items():
        if not rs:
            continue
        cols = [_mean_std([r.bbox[k] for r in rs]) for k in ("AP", "AP50", "AP75")]
        cols += [_mean_std([r.segm[k] for r in rs]) for k in ("AP", "AP50", "AP75")]
        s_iter = statistics.fmean(r.s_per_iter for r in rs)
        loss = statistics.fmean(r.final_loss for r in rs)
        rows.append(f"| {SIDE_LABELS[side]} | {len(rs)} | " + " | ".join(cols) + f" | {s_iter:.3f} | {loss:.3f} |")
    theirs = by_side["vitdet"]
    for side in ("ours", "ours_bf16"):
        if by_side[side] and theirs:
            ratio = statistics.fmean(r.s_per_iter for r in by_side[side]) / statistics.fmean(r.s_per_iter for r in theirs)
            rows.append(f"time per iteration, {side} / ViTDet: {ratio:.2f}")
    rows.append("per run: " + "; ".join(
        f"{r.side} seed {r.seed}: box {r.bbox['AP']:.1f} mask {r.segm['AP']:.1f} {r.s_per_iter:.3f} s/iter"
        for r in sorted(results, key=lambda r: (r.seed, r.side))))
    return "\n".join(rows)


def interleaved_step_times(config_file: str, opts: list[str], sides: tuple[str, ...], iters: int = 30,
                           warmup: int = 3) -> dict[str, float]:
    """Median seconds per training step of each side, measured by alternating one step of each (each with its
    own model, optimizer and data loader from seed 0), so that load changes on a shared machine hit all alike."""
    cfg = side_by_side_cfg(config_file, opts)
    register_datasets(cfg)
    trainers = {}
    for side in sides:
        seed_all_rng(0)
        if side == "vitdet":
            model = build_vitdet_model(cfg)
            opt = build_vitdet_optimizer(cfg, model)
            loader = build_detection_train_loader(
                dataset=get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS),
                mapper=build_detection_mapper(cfg, is_train=True), total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
                num_workers=cfg.DATALOADER.NUM_WORKERS)
            trainers[side] = SimpleTrainer(model, loader, opt)
        else:
            c = cfg.clone()
            c.SOLVER.PRECISION = "bf16" if side == "ours_bf16" else "fp32"
            model = Trainer.build_model(c)
            opt = Trainer.build_optimizer(c, model)
            trainers[side] = build_step_trainer(c, model, Trainer.build_train_loader(c), opt)
    times: dict[str, list[float]] = {s: [] for s in sides}
    with EventStorage(0) as storage:
        for i in range(warmup + iters):
            storage.iter = i
            for side, trainer in trainers.items():
                trainer.iter, trainer.storage = i, storage
                start = time.perf_counter()
                trainer.run_step()
                if i >= warmup:
                    times[side].append(time.perf_counter() - start)
    return {s: statistics.median(t) for s, t in times.items()}
