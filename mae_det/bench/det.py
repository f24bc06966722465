"""Side-by-side speed and memory of our ViT-FPN Mask R-CNN and Detectron2's own ViTDet at the same size.

Both detectors share everything but the backbone: ours is ``build_vit_fpn_backbone`` (``simple`` pyramid, the
shared encoder with fused SDPA attention), theirs is ``detectron2.modeling.backbone.vit.ViT`` +
``SimpleFeaturePyramid`` from the installed Detectron2, with the same width, depth, windows, global blocks,
relative position and square padding. Measurements alternate between the two models each iteration (so load
changes on a shared machine hit both alike) and report medians.

``compile``: a third model, ours with the backbone compiled in place (``MODEL.VIT.COMPILE``; the heads have
data-dependent shapes and stay eager), gives the "ours compiled" rows against Detectron2's eager model, and the
time of its first iteration in each phase, labelled "incl. compile" only where Dynamo compiled during it.
``real_data``: a training iteration through Detectron2's data loader with our LSJ mapper at ``img_size`` on
generated shapes images (loading included; each model draws its own batches).
ViTDet's published 0.314 s/img is printed for orientation only: 64 A100s with one image each under DDP.

:func:`roi_align_backward_times` times torchvision's CPU RoIAlign backward against
:func:`~mae_det.modeling.roi_align.roi_align_backward` on the same call, interleaved, and checks the two gradients
are equal bit for bit.
"""
from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.vit import SimpleFeaturePyramid, ViT
from detectron2.structures import BitMasks, Instances
from detectron2.utils.events import EventStorage
from torch import nn
from torch._dynamo.utils import counters

from . import error_line
from ..config.detection import get_det_cfg
from ..data.detection import build_detection_mapper, register_coco_dataset
from ..data.shapes import ShapesConfig, generate_shapes
from ..engine.compile import compile_in_place
from ..config.vit_backbone import global_attn_indexes, vit_dims
from ..modeling import backbone as _backbone  # noqa: F401  (registers build_vit_fpn_backbone)
from ..modeling.roi_align import roi_align_backward

BASE_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "Base-MaskRCNN-ViT.yaml")
PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
VITDET_PUBLISHED = "ViTDet's published ViT-B training: 0.314 s/img (64 A100s x 1 image, DDP) - not comparable"


@dataclass
class BenchmarkSettings:
    size: str = "base"
    img_size: int = 1024
    batch: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    iters: int = 3
    quick: bool = False  # a 96-d 4-block ViT, light heads: checks the script runs, not a measurement
    compile: bool = False  # add "ours compiled" rows (backbone compiled in place)
    real_data: str = ""  # folder of the generated images (made if missing): adds the real-data training rows
    workers: int = 4  # data-loader workers of the real-data rows


def benchmark_cfg(s: BenchmarkSettings) -> CfgNode:
    """The ViTDet Mask R-CNN config of the benchmark (ours); ``quick`` shrinks encoder and heads."""
    cfg = get_det_cfg()
    cfg.merge_from_file(os.path.normpath(BASE_CONFIG))
    cfg.MODEL.DEVICE = s.device
    v = cfg.MODEL.VIT
    v.SIZE, v.INPUT_SIZE, v.SQUARE_PAD, v.DROP_PATH_RATE, v.WINDOW_SIZE, v.USE_REL_POS = s.size, s.img_size, s.img_size, 0.0, 14, True
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    if s.quick:
        v.SIZE, v.EMBED_DIM, v.DEPTH, v.NUM_HEADS, v.WINDOW_SIZE = "custom", 96, 4, 3, 4
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
        v.OUT_CHANNELS = 64
        cfg.MODEL.ROI_BOX_HEAD.NUM_CONV, cfg.MODEL.ROI_BOX_HEAD.CONV_DIM, cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 1, 64, 128
        cfg.MODEL.ROI_MASK_HEAD.NUM_CONV, cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 1, 64
    return cfg


def detectron2_vitdet_backbone(cfg: CfgNode) -> SimpleFeaturePyramid:
    """Detectron2's ViT + SimpleFeaturePyramid with the sizes of ``cfg.MODEL.VIT`` (as its LazyConfig builds it)."""
    v = cfg.MODEL.VIT
    dim, depth, heads = vit_dims(cfg)
    global_blocks = set(global_attn_indexes(cfg))
    net = ViT(
        img_size=v.INPUT_SIZE, patch_size=v.PATCH_SIZE, embed_dim=dim, depth=depth, num_heads=heads,
        drop_path_rate=v.DROP_PATH_RATE, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=v.USE_REL_POS,
        window_size=v.WINDOW_SIZE, window_block_indexes=[i for i in range(depth) if i not in global_blocks],
        pretrain_img_size=v.PRETRAIN_IMG_SIZE, out_feature="last_feat",
    )
    return SimpleFeaturePyramid(
        net, in_feature="last_feat", out_channels=v.OUT_CHANNELS, scale_factors=(4.0, 2.0, 1.0, 0.5),
        top_block=LastLevelMaxPool(), norm=v.NORM, square_pad=v.SQUARE_PAD,
    )


def build_pair(cfg: CfgNode) -> tuple[nn.Module, nn.Module]:
    """(ours, theirs): two Mask R-CNNs from ``cfg`` that differ only in the backbone."""
    torch.manual_seed(0)
    ours = build_model(cfg)
    torch.manual_seed(0)
    theirs = build_model(cfg)
    theirs.backbone = detectron2_vitdet_backbone(cfg).to(theirs.device)
    return ours, theirs


def synthetic_batch(n: int, size: int, device: str, instances: int = 8, seed: int = 0, *, num_classes: int = 80,
                    min_side: int | None = None, generator: torch.Generator | None = None) -> list[dict]:
    """``n`` random images with ``instances`` rectangle objects each (boxes, classes, bitmasks); sides from
    ``min_side`` (default ``size // 16``) to ``size // 2``. A shared ``generator`` continues one stream across calls."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    min_side = size // 16 if min_side is None else min_side
    batch = []
    for _ in range(n):
        masks = torch.zeros(instances, size, size, dtype=torch.bool)
        for k in range(instances):
            x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            w, h = torch.randint(min_side, size // 2, (2,), generator=g).tolist()
            masks[k, y0:y0 + h, x0:x0 + w] = True
        inst = Instances((size, size), gt_classes=torch.randint(0, num_classes, (instances,), generator=g),
                         gt_masks=BitMasks(masks))
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
        batch.append({"image": image.to(device), "height": size, "width": size, "instances": inst.to(device)})
    return batch


class PeakMemory:
    """Peak memory a block adds on CUDA (``max_memory_allocated`` above what was allocated before); ``mb`` stays None
    on CPU.

    A CPU process keeps the memory its allocator freed, so the growth of its resident size measures the order of
    the variants rather than the variants: the model run first grows the process, the next reuses that memory
    (``--quick`` at 256 px, backbone step: 63.4 MB for whichever model ran first, 2.4-5.6 MB for the other, and
    the same with the order swapped). No such row beats a wrong one.
    """

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.cuda:  # named: without a device these act on the current one (cuda:0), not on cuda:N
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20


def _timed(fn: Callable[[], Any], device: str) -> float:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def run_benchmark(s: BenchmarkSettings, log: Callable[[str], None] = print,
                  results: dict[str, dict[str, float | None]] | None = None) -> dict[str, dict[str, float | None]]:
    """Measures both detectors; returns ``{metric: {"ours", "theirs", "ratio"}}`` (ratio = ours / theirs).

    ``results``: filled in place as each phase is measured, so a caller interrupted midway keeps the rows so far.
    """
    cfg = benchmark_cfg(s)
    ours, theirs = build_pair(cfg)
    dtype = PRECISION_DTYPES[s.precision]
    device_type = torch.device(s.device).type
    autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else contextlib.nullcontext
    batch = synthetic_batch(s.batch, s.img_size, s.device)
    images = ours.preprocess_image(batch).tensor
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (ours, theirs)}

    def backbone_step(m: nn.Module) -> None:
        with autocast():
            out = m.backbone(images)
        sum(v.float().mean() for v in out.values()).backward()
        m.zero_grad(set_to_none=True)

    def train_step(m: nn.Module, data: list[dict] | None = None) -> None:
        with EventStorage(0), autocast():  # the heads log their statistics to an EventStorage
            losses = m(batch if data is None else data)
        sum(losses.values()).backward()
        opts[m].step()
        opts[m].zero_grad(set_to_none=True)

    def infer(m: nn.Module) -> None:
        with torch.no_grad(), autocast():
            m([{"image": b["image"], "height": b["height"], "width": b["width"]} for b in batch])

    results = {} if results is None else results
    models = [ours, theirs]
    compiled = None

    def compile_failed(e: Exception) -> None:
        """A compile error ends the compiled rows only: the eager comparison goes on, the table says why."""
        models.remove(compiled)
        results[f"ours compiled FAILED: {error_line(e, 90)}"] = _pair(None, None)
        log(f"  the compiled backbone failed, its rows are skipped: {type(e).__name__}")

    if s.compile:
        compiled = copy.deepcopy(ours)
        opts[compiled] = torch.optim.AdamW(compiled.parameters(), lr=1e-5)
        models.append(compiled)
        try:
            compile_in_place(compiled.backbone, dynamic=None)
        except Exception as e:  # noqa: BLE001 - e.g. a backend Dynamo does not know
            compile_failed(e)
    phases = [("backbone fwd+bwd (s/iter)", backbone_step, True), ("train iteration (s/img)", train_step, True),
              ("inference (s/img)", infer, False)]
    for name, fn, train in phases:
        times: dict[nn.Module, list[float]] = {m: [] for m in models}
        first: dict[nn.Module, float] = {}
        compiled_first = False  # whether Dynamo compiled in the compiled model's first iteration of this phase
        peaks: dict[nn.Module, float | None] = {}
        for it in range(s.iters + 1):  # iteration 0 warms up (and compiles): memory only, no time
            for m in list(models):
                m.train(train)
                graphs = counters["stats"]["unique_graphs"]
                try:
                    with PeakMemory(s.device) as mem:
                        t = _timed(lambda: fn(m), s.device)
                except Exception as e:  # noqa: BLE001 - only the compiled model's failures are survivable
                    if m is not compiled:
                        raise
                    compile_failed(e)
                    continue
                if it:
                    times[m].append(t)
                else:
                    first[m] = t
                    compiled_first |= m is compiled and counters["stats"]["unique_graphs"] > graphs
                peaks[m] = max((v for v in (peaks.get(m), mem.mb) if v is not None), default=None)
        per = s.batch if "s/img" in name else 1
        results[name] = _pair(statistics.median(times[ours]) / per, statistics.median(times[theirs]) / per)
        results[f"peak memory, {name.split(' (')[0]} (MB)"] = _pair(peaks[ours], peaks[theirs])
        if compiled in models:
            stem = name.split(" (")[0]
            results[f"{stem}, ours compiled ({name.split(' (')[1]}"] = _pair(
                statistics.median(times[compiled]) / per, statistics.median(times[theirs]) / per)
            # a phase whose graphs an earlier phase compiled (the train iteration's backbone: same shapes and
            # grad mode as the backbone step) runs compiled code at once: its first time includes no compile
            label = " incl. compile" if compiled_first else " (no compile: graphs reused)"
            results[f"first {stem}{label}, ours compiled (s)"] = _pair(first[compiled], first[theirs])
        log(f"  measured {name}")
    if s.real_data:
        data = real_data_batches(s, cfg, log)
        times = {m: [] for m in models}
        for it in range(s.iters + 1):
            for m in models:
                m.train()
                t = _timed(lambda: train_step(m, next(data)), s.device)
                if it:
                    times[m].append(t)
        name = f"train iteration, D2 loader + LSJ {s.img_size} (s/img)"
        results[name] = _pair(statistics.median(times[ours]) / s.batch, statistics.median(times[theirs]) / s.batch)
        if compiled in models:
            results[name.replace(" (s/img)", ", ours compiled (s/img)")] = _pair(
                statistics.median(times[compiled]) / s.batch, statistics.median(times[theirs]) / s.batch)
        log(f"  measured {name}")
    results["backbone params (M)"] = _pair(_params(ours.backbone), _params(theirs.backbone))
    results["model params (M)"] = _pair(_params(ours), _params(theirs))
    return results


def real_data_batches(s: BenchmarkSettings, cfg: CfgNode, log: Callable[[str], None]):
    """Batches of ``s.batch`` from Detectron2's train loader with our LSJ mapper, on shapes images generated into
    ``s.real_data`` (640 px, up to 12 objects; LSJ rescales them to ``s.img_size`` x U(0.1, 2) and crops)."""
    root = os.path.abspath(s.real_data)
    if not os.path.exists(os.path.join(root, "dataset_info.json")):
        generate_shapes(root, ShapesConfig(image_size=640, num_pool=0, num_train=max(64, 8 * s.batch), num_val=0,
                                           num_cls_train=0, num_cls_val=0, max_objects=12, min_size=0.04,
                                           max_size=0.2), log=log)
    register_coco_dataset("benchmark_det_shapes_train", os.path.join(root, "annotations", "instances_train.json"),
                          os.path.join(root, "images", "train"))
    c = cfg.clone()
    c.DATASETS.TRAIN = ("benchmark_det_shapes_train",)
    c.INPUT.LSJ.ENABLED, c.INPUT.LSJ.IMAGE_SIZE = True, s.img_size
    c.SOLVER.IMS_PER_BATCH, c.DATALOADER.NUM_WORKERS = s.batch, s.workers
    return iter(build_detection_train_loader(c, mapper=build_detection_mapper(c, is_train=True)))


def _params(m: nn.Module) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


def _pair(ours: float | None, theirs: float | None) -> dict[str, float | None]:
    ratio = ours / theirs if ours is not None and theirs else None
    return {"ours": ours, "theirs": theirs, "ratio": ratio}


def format_results(s: BenchmarkSettings, results: dict[str, dict[str, float | None]], device_name: str) -> str:
    """The side-by-side table printed by ``tools/benchmark_det.py``."""
    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4g}"

    head = (f"Mask R-CNN, ViT-{s.size if not s.quick else 'quick(96d x4)'}, {s.img_size} px, batch {s.batch}, "
            f"{s.precision}, median of {s.iters}, on {device_name}")
    w = max([40, *(len(k) + 2 for k in results)])
    rows = [f"{'metric':<{w}}{'ours':>12}{'detectron2':>12}{'ours/theirs':>13}"]
    rows += [f"{k:<{w}}{f(v['ours']):>12}{f(v['theirs']):>12}{f(v['ratio']):>13}" for k, v in results.items()]
    if any("D2 loader" in k for k in results):
        rows.append(VITDET_PUBLISHED)
    return "\n".join([head, *rows])


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


def roi_align_backward_times(images: int = 4, channels: int = 64, size: int = 64, stride: int = 2, rois: int = 256,
                             sides: tuple[float, float] = (12.0, 48.0), output: int = 7, repeats: int = 15,
                             seed: int = 0) -> dict[str, Any]:
    """Median CPU seconds of one RoIAlign backward by torchvision's kernel and by ours, interleaved.

    The defaults are ``make demo``'s box pooler: 4 images of 64 px, 64-channel features at stride 2, 256 RoIs per
    batch with sides of 12-48 px (the shapes' objects and the proposals around them), 7x7 bins, adaptive sampling,
    aligned.

    Returns:
        ``torchvision`` and ``vectorized`` (median seconds), ``equal`` (the gradients are bit for bit the same) and
        ``samples`` (bilinear samples per channel in the call).
    """
    g = torch.Generator().manual_seed(seed)
    feat = size // stride
    x = torch.randn(images, channels, feat, feat, generator=g, requires_grad=True)
    wh = sides[0] + torch.rand(rois, 2, generator=g) * (sides[1] - sides[0])
    xy = torch.rand(rois, 2, generator=g) * (size - wh)
    index = torch.randint(0, images, (rois, 1), generator=g).float()
    boxes = torch.cat([index, xy, xy + wh], 1)
    out = torch.ops.torchvision.roi_align(x, boxes, 1.0 / stride, output, output, 0, True)
    grad = torch.randn(out.shape, generator=g)
    ours = partial(roi_align_backward, grad, boxes, 1.0 / stride, output, output, tuple(x.shape), 0, True)
    theirs = partial(torch.autograd.grad, out, x, grad, retain_graph=True)
    times: dict[str, list[float]] = {"torchvision": [], "vectorized": []}
    for _ in range(repeats):
        for name, fn in (("torchvision", theirs), ("vectorized", ours)):
            times[name].append(_timed(fn, "cpu"))
    grid = torch.ceil(wh / stride / output)
    return {**{k: statistics.median(v) for k, v in times.items()}, "equal": torch.equal(ours(), theirs()[0]),
            "samples": int(grid.prod(1).sum()) * output * output}
