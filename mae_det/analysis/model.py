"""What a model costs: parameters per module, forward FLOPs and activations per image.

FLOPs go through :func:`mae_det.utils.flops.count_forward_macs` (the one counter shared with the benchmarks: fvcore
plus fused attention; one multiply-add = one flop); activations are fvcore's with the same corrections. Two models
can be analyzed:

- ``detection``: Mask R-CNN (or a semantic segmenter) from a detection yacs config, on one image of the configured
  test size. The heads' cost depends on how many boxes reach them: the test score threshold is set to 0, so the box
  head sees at most ``MODEL.RPN.POST_NMS_TOPK_TEST`` proposals and the mask head at most
  ``TEST.DETECTIONS_PER_IMAGE`` detections; how many they did see is measured (hooks on the RoI poolers) and
  reported, because on a small image the RPN keeps fewer boxes. Weights are not loaded (they change no count).
- ``mae``: the MAE pretraining forward (encoder on the visible patches, decoder on all) from a pretraining yacs
  config, at ``MODEL.IMG_SIZE`` and ``MODEL.MASK_RATIO``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from fvcore.nn import ActivationCountAnalysis, parameter_count, parameter_count_table
from torch import nn

from ..config.detection import load_det_cfg
from ..config.pretrain import ConfigError, load_pretrain_cfg
from ..engine.pretrain import build_pretrain_model
from ..modeling import backbone as _backbone  # noqa: F401  (registers build_vit_fpn_backbone)
from ..utils.flops import ACTIVATION_HANDLES, FlopReport, count_forward_macs

MODEL_TYPES = ("detection", "mae")
TASKS = ("parameter", "flop", "activation")


class _PartsCall(nn.Module):
    """Runs ``fn(*tensors)`` with the model's top level (children, parameters, buffers) registered on itself.

    fvcore (and :func:`count_forward_macs`) then attribute costs to ``backbone``/``roi_heads`` or
    ``blocks``/``decoder_blocks`` instead of one entry for the whole model; the model itself is kept out of the
    module tree for that reason. Its own parameters must be registered too: the tracer refuses tensors that
    require grad unless they are parameters of the traced module.
    """

    def __init__(self, model: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in model.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        self._fn = fn

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self._fn(*tensors)


@dataclass
class AnalysisTarget:
    """A model and one forward call of it to analyze.

    Attributes:
        model: the full model (parameters are counted on it).
        call: tensor-only module running the analyzed forward (for fvcore's tracer).
        inputs: the tensors ``call`` takes (batch of one image).
        description: one line naming the model and the input, for the report.
        rois: RoIs per pooler (``"box_pooler"``, ``"mask_pooler"``) in the latest forward of ``call``, recorded by
            forward hooks (empty before a forward, and for models without RoI heads).
        max_rois: the most RoIs each pooler can get (the configured full load).
    """

    model: nn.Module
    call: nn.Module
    inputs: tuple[torch.Tensor, ...]
    description: str
    rois: dict[str, int] = field(default_factory=dict)
    max_rois: dict[str, int] = field(default_factory=dict)


def _output_tensors(outputs: list[dict]) -> tuple[torch.Tensor, ...]:
    """The tensors of a detector's ``instances`` or a semantic segmenter's ``sem_seg`` (one image)."""
    if "sem_seg" in outputs[0]:
        return (outputs[0]["sem_seg"],)
    fields = outputs[0]["instances"].get_fields()
    return tuple(v.tensor if isinstance(v, Boxes) else v for v in fields.values())


def _count_rois(target: AnalysisTarget) -> None:
    """Records in ``target.rois`` how many RoIs each RoI pooler pools in a forward of ``target.call`` (cascade
    stages pool the same boxes, refined)."""
    target.call.register_forward_pre_hook(lambda *_: target.rois.clear())
    for name in target.max_rois:
        pooler = getattr(target.model.roi_heads, name)
        pooler.register_forward_hook(lambda _m, _i, out, name=name: target.rois.__setitem__(name, int(out.shape[0])))


def detection_target(cfg: CfgNode, input_size: Sequence[int] | None = None, seed: int = 0) -> AnalysisTarget:
    """Mask R-CNN (or the semantic segmenter) of a detection config on one random image.

    Args:
        cfg: a detection config (:func:`~mae_det.config.detection.load_det_cfg`).
        input_size: (height, width) after the test resize; default: a square of side
            ``min(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST)``, what a square image is resized to.
        seed: the image's pixels.
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = build_model(cfg).eval()
    h, w = input_size or (min(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST),) * 2
    g = torch.Generator().manual_seed(seed)
    image = (torch.rand(3, h, w, generator=g) * 255).to(cfg.MODEL.DEVICE)
    call = _PartsCall(model, lambda img: _output_tensors(model([{"image": img}])))
    desc = f"{cfg.MODEL.META_ARCHITECTURE} ({cfg.MODEL.BACKBONE.NAME}), input 3x{h}x{w}"
    limits = {"box_pooler": cfg.MODEL.RPN.POST_NMS_TOPK_TEST, "mask_pooler": cfg.TEST.DETECTIONS_PER_IMAGE}
    heads = getattr(model, "roi_heads", None)
    target = AnalysisTarget(model, call, (image,), desc,
                            max_rois={k: n for k, n in limits.items() if getattr(heads, k, None) is not None})
    _count_rois(target)
    return target


def load_pretrain_model_cfg(config_file: str | os.PathLike, opts: Sequence[str] = ()) -> CfgNode:
    """A pretraining config merged and validated as ``tools/pretrain.py`` loads it, except that the data folders
    need not exist: analysis reads no data, so ``DATA.PATH`` may be absent from this machine.

    Sharing the loader keeps the two from disagreeing: a config pretraining accepts (e.g. an integer for a float
    key) is analyzed, and one it refuses (e.g. a mask ratio that leaves no visible patch) is refused here too.

    Raises:
        ConfigError: missing file, unknown key, wrong type or invalid value, in one line naming the file, the
            command line or the key.
    """
    return load_pretrain_cfg(config_file, opts, check_paths=False)


def mae_target(cfg: CfgNode, seed: int = 0) -> AnalysisTarget:
    """The MAE pretraining forward of a pretraining config on one random ``MODEL.IMG_SIZE`` image."""
    if cfg.MODEL.MODE != "mae":
        raise ConfigError(f"MODEL.MODE: --model-type mae needs an MAE config, got {cfg.MODEL.MODE!r}")
    model = build_pretrain_model(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    size, ratio = cfg.MODEL.IMG_SIZE, cfg.MODEL.MASK_RATIO
    imgs = torch.randn(1, cfg.MODEL.IN_CHANS, size, size, generator=g)
    call = _PartsCall(model, lambda x: model(x, mask_ratio=ratio))
    desc = f"MAE {cfg.MODEL.ARCH} (pretraining forward, mask ratio {ratio}), input {cfg.MODEL.IN_CHANS}x{size}x{size}"
    return AnalysisTarget(model, call, (imgs,), desc)


def build_target(
    model_type: str, config_file: str, opts: Sequence[str] = (), input_size: Sequence[int] | None = None
) -> AnalysisTarget:
    """The :class:`AnalysisTarget` of a detection (``"detection"``) or pretraining (``"mae"``) config file."""
    if model_type == "detection":
        return detection_target(load_det_cfg(config_file, list(opts), training=False), input_size)
    if model_type == "mae":
        if input_size is not None:
            raise ConfigError("--input-size applies to detection; set MODEL.IMG_SIZE for the MAE model")
        return mae_target(load_pretrain_model_cfg(config_file, opts))
    raise ValueError(f"model type must be one of {MODEL_TYPES}, got {model_type!r}")


# ---- the three analyses --------------------------------------------------------------------------------------
def parameter_report(model: nn.Module, max_depth: int = 3) -> tuple[int, int, str]:
    """(total parameters, trainable parameters, fvcore's per-module table to ``max_depth``)."""
    total = parameter_count(model)[""]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable, parameter_count_table(model, max_depth=max_depth)


def flop_report(target: AnalysisTarget) -> FlopReport:
    """Forward multiply-adds of the target's call (the shared counter; fused attention included)."""
    with torch.no_grad():
        return count_forward_macs(target.call, target.inputs)


def activation_report(target: AnalysisTarget) -> tuple[int, dict[str, int]]:
    """(total activations, activations per top-level part) of the target's call, counted by fvcore with the
    shared counter's corrections (fused attention as its explicit products, axis-reordering ``einsum`` as none)."""
    with torch.no_grad():
        analysis = ActivationCountAnalysis(target.call, target.inputs).set_op_handle(**ACTIVATION_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_module = {name: int(n) for name, n in analysis.by_module().items() if name and "." not in name}
        return int(analysis.total()), by_module


def head_load(target: AnalysisTarget) -> list[str]:
    """Report lines on the RoIs the heads saw in the measured forward, with a warning when fewer than configured
    (what a larger image or a trained RPN would send them costs more)."""
    if not target.rois:
        return []
    what = {"box_pooler": ("box head", "proposals (MODEL.RPN.POST_NMS_TOPK_TEST)"),
            "mask_pooler": ("mask head", "detections (TEST.DETECTIONS_PER_IMAGE)")}
    seen = [(*what[k], n, target.max_rois[k]) for k, n in target.rois.items()]
    lines = ["heads measured at (score threshold 0): " + ", ".join(
        f"{head} {n} RoIs of at most {limit} {source}" for head, source, n, limit in seen)]
    below = [f"{head} {n} < {limit}" for head, _, n, limit in seen if n < limit]
    if below:
        lines.append(f"warning: the heads ran below full load ({', '.join(below)}): on this input the RPN keeps fewer "
                     "boxes, so their FLOPs and activations are those of this load, not the configured maximum")
    return lines


def _table(rows: list[tuple[str, str]], head: tuple[str, str]) -> str:
    w0 = max(len(r[0]) for r in [head, *rows])
    w1 = max(len(r[1]) for r in [head, *rows])
    lines = [f"| {head[0]:<{w0}} | {head[1]:>{w1}} |", f"|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|"]
    return "\n".join(lines + [f"| {name:<{w0}} | {value:>{w1}} |" for name, value in rows])


def _fmt(total: float) -> Callable[[float], str]:
    """Fixed decimals giving the total four significant digits, so the rows line up and sum visibly."""
    decimals = max(0, 3 - math.floor(math.log10(total))) if total > 0 else 0
    return lambda v: f"{v:.{decimals}f}"


def _parts(by_module: dict[str, int], total: int, scale: float) -> list[tuple[str, str]]:
    parts = {name: n for name, n in by_module.items() if name}
    rest = total - sum(parts.values())
    if rest:  # ops of the model's own forward, outside its child modules
        parts["(top level)"] = rest
    fmt = _fmt(total / scale)
    return [*((name, fmt(n / scale)) for name, n in parts.items()), ("total", fmt(total / scale))]


def analyze(target: AnalysisTarget, tasks: Sequence[str] = TASKS, max_depth: int = 3) -> str:
    """The report of ``tasks`` (any of "parameter", "flop", "activation") as text."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}, expected any of {TASKS}")
    out = [f"model: {target.description}"]
    target.rois.clear()  # the heads' load is that of this report's forwards (parameters alone run none)
    if "parameter" in tasks:
        total, trainable, table = parameter_report(target.model, max_depth)
        out += ["", "## parameters", table, f"total parameters: {total:,} (trainable: {trainable:,})"]
    if "flop" in tasks:
        rep = flop_report(target)
        out += [
            "", "## FLOPs per image (forward; one multiply-add = one flop, as fvcore and the MAE/ViTDet papers)",
            _table(_parts(rep.by_module, rep.total_macs, 1e9), ("module", "GFLOPs")),
            f"total GFLOPs: {rep.total_macs / 1e9:.4g} (attention via scaled_dot_product_attention: "
            f"{rep.attention_macs / 1e9:.4g}; fvcore alone would report {rep.fvcore_macs / 1e9:.4g})",
            f"total multiply-adds: {rep.total_macs:,}",
        ]
        if rep.unsupported_ops:
            skipped = ", ".join(f"{op} x{n}" for op, n in sorted(rep.unsupported_ops.items()))
            out.append(f"not counted (elementwise or no fvcore handle): {skipped}")
    if "activation" in tasks:
        total_act, by_module = activation_report(target)
        out += [
            "", "## activations per image (output elements of convolutions and matrix products, fused attention "
            "included; fvcore)",
            _table(_parts(by_module, total_act, 1e6), ("module", "M activations")),
            f"total activations: {total_act:,}",
        ]
    load = head_load(target)  # measured by the forward of the analyses above (none for parameters alone)
    if load:
        out += ["", *load]
    return "\n".join(out)
