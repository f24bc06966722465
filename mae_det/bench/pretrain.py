"""MAE pretraining speed on the current machine: training-step throughput, FLOPs and MFU, measured side by side.

Formula (stated once, used everywhere): training FLOPs per image = 3 x 2 x forward multiply-adds, counted by
:func:`mae_det.utils.flops.count_forward_macs` (fvcore + fused attention). MFU = achieved training FLOP/s /
the machine's matmul FLOP/s for the same precision, measured in the same run on square matrices.

The "all tokens" baseline is the alternative the MAE paper compares against (Table 1c / Sec. 3, "[M] in the
encoder", as SimMIM does): masked patches are replaced by a learned mask token before the encoder, the encoder
and decoder both see the full sequence, and the loss is the same masked MSE.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from mae_det.config.pretrain import get_pretrain_cfg, resolve_arch
from mae_det.engine.compile import COMPILE_MODES, compile_in_place
from mae_det.solver.optim import adamw
from mae_det.modeling import MAE_FACTORIES, MaskedAutoencoderViT
from mae_det.utils.flops import count_forward_macs
from mae_det.utils.precision import bf16_native

PRECISIONS = ("fp32", "bf16", "fp16")


class AllTokensMAE(nn.Module):
    """MAE with mask tokens in the encoder: every patch position goes through encoder and decoder.

    Shares ``mae``'s weights; adds one encoder mask token (normal(0.02), as MAE's decoder mask token).
    """

    def __init__(self, mae: MaskedAutoencoderViT) -> None:
        super().__init__()
        self.mae = mae
        self.encoder_mask_token = nn.Parameter(torch.randn(1, 1, mae.embed_dim) * 0.02)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mae = self.mae
        tokens = mae.patch_embed(imgs)  # (N, h, w, D), no position yet
        grid = tokens.shape[1:3]
        tokens = tokens.flatten(1, 2)  # (N, L, D)
        _, mask, _ = mae.random_masking(tokens, mask_ratio)  # (N, L), 1 = removed
        m = mask.unsqueeze(-1).to(tokens.dtype)
        x = tokens * (1 - m) + self.encoder_mask_token.to(tokens.dtype) * m
        x = x + mae.pos_embed_for(grid).flatten(1, 2)
        x = mae.forward_tokens(torch.cat([mae.cls_with_pos(x.shape[0]), x], dim=1))  # (N, 1+L, D)
        x = mae.decoder_embed(x) + mae.decoder_pos_embed_for(grid)  # (N, 1+L, Dd)
        for blk in mae.decoder_blocks:
            x = mae.run_block(blk, x)
        pred = mae.decoder_pred(mae.decoder_norm(x))[:, 1:]  # (N, L, p*p*C)
        return mae.forward_loss(imgs, pred, mask), pred, mask


@dataclass
class StepResult:
    variant: str  # "visible-only" (MAE) or "all-tokens"
    precision: str
    images_per_s: float
    ms_per_step: float
    train_gflop_per_image: float
    achieved_gflops: float
    mfu: float  # fraction of the same precision's measured matmul peak


def mae_arch(model_name: str) -> dict[str, int]:
    """The sizes of the MAE ``model_name`` builds (a key of ``MAE_FACTORIES``), as pretraining resolves them from
    ``MODEL.ARCH``: the encoder's (patch_size, embed_dim, depth, num_heads) and the decoder's (decoder_embed_dim,
    decoder_depth, decoder_num_heads), the ``arch`` of :func:`~mae_det.bench.official.run_against_official`.

    Raises:
        ValueError: an unknown model name.
    """
    if model_name not in MAE_FACTORIES:
        raise ValueError(f"unknown model '{model_name}'; choose one of {sorted(MAE_FACTORIES)}")
    cfg = get_pretrain_cfg()
    cfg.MODEL.ARCH = model_name
    arch = resolve_arch(cfg)
    return {k: arch[k] for k in ("patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
                                 "decoder_depth", "decoder_num_heads")}


def machine_info(device: str) -> dict[str, Any]:
    info = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16_native(device),
        "cpu_count": os.cpu_count(),
        "load_avg_1min_start": os.getloadavg()[0],  # other processes on the CPU skew every figure
    }
    if device == "cuda":
        info["card"] = torch.cuda.get_device_name()
        info["fp32_matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


def skip_reason(precision: str, device: str) -> str | None:
    """Why a precision is not measured here, or None."""
    if precision == "fp16" and device != "cuda":
        return "fp16 autocast with a gradient scaler is a GPU recipe"
    if precision == "bf16" and not bf16_native(device):
        cap = torch.backends.cpu.get_cpu_capability() if device == "cpu" else device
        return f"no native bf16 on this {device} ({cap}); emulated bf16 runs far slower than fp32"
    return None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_matmul_peak(
    dtype: torch.dtype, device: str, sizes: tuple[int, ...] = (2048, 4096), min_seconds: float = 1.0
) -> float:
    """Best GFLOP/s (2 n^3 per product) over square matmuls of the given sizes."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up: library init, kernel selection
        reps = 1
        while True:  # double the count until one timed run lasts min_seconds (GPUs need many products)
            _sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
            reps *= 2
        best = max(best, 2 * n**3 * reps / elapsed / 1e9)
    return best


def _autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device, dtype=dtype)


def time_training_step(
    model: nn.Module, imgs: torch.Tensor, precision: str, device: str, iters: int, warmup: int,
    mask_ratio: float = 0.75, cudagraphs: bool = False,
) -> float:
    """Median seconds of ``iters`` training steps (forward, backward, AdamW step) after ``warmup`` untimed ones.

    The median, not the mean: on a shared machine one preempted step should not set the figure. ``cudagraphs``:
    ``model`` was compiled with ``mode="reduce-overhead"``; each step starts a new CUDA-graph iteration.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused: for ViT-B on CPU the default per-tensor AdamW step was ~2.7x slower (a large share of a step).
    optimizer = adamw(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    scaler = torch.amp.GradScaler(device) if precision == "fp16" else None

    def step() -> None:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        with _autocast(precision, device):
            loss = model(imgs, mask_ratio)[0]
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    model.train()
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_benchmark(
    model_name: str = "mae_vit_base_patch16",
    batch_size: int = 8,
    iters: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    img_size: int = 224,
    mask_ratio: float = 0.75,
    matmul_sizes: tuple[int, ...] = (2048, 4096),
    matmul_seconds: float = 1.0,
    model_kwargs: dict | None = None,
    precisions: Sequence[str] = PRECISIONS,
    compile_mode: str = "",
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Measures every (variant, precision) row this device supports among ``precisions``; returns a
    JSON-serializable dict. ``compile_mode`` ("default", "reduce-overhead"; "" = eager) compiles both variants in
    place, after their FLOPs are counted; the first (warm-up) steps of each row then include the compilation."""
    if model_name not in MAE_FACTORIES:
        raise ValueError(f"unknown model '{model_name}'; choose one of {sorted(MAE_FACTORIES)}")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise ValueError(f"precisions: expected some of {PRECISIONS}, got {list(precisions)}")
    if compile_mode and compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile mode: expected one of {COMPILE_MODES}, got {compile_mode!r}")
    torch.manual_seed(0)
    info = machine_info(device)
    wanted = precisions
    precisions = [p for p in PRECISIONS if p in wanted and skip_reason(p, device) is None]
    skipped = {p: skip_reason(p, device) for p in PRECISIONS if p in wanted and p not in precisions}
    if not precisions:  # an empty table, exit 0, would read as a run that measured nothing by accident
        raise ValueError(f"precisions: none of {list(wanted)} runs on {device}: "
                         + "; ".join(f"{p}: {why}" for p, why in skipped.items()))
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    peaks: dict[str, float] = {}
    rows, interrupted = [], False
    try:  # from the first measurement on: a time limit during the peaks or the model build still gets a report
        for p in precisions:
            log(f"measuring {p} matmul peak ...")
            peaks[p] = measure_matmul_peak(dtypes[p], device, matmul_sizes, matmul_seconds)
        mae = MAE_FACTORIES[model_name](img_size=img_size, **(model_kwargs or {})).to(device)
        variants = {"visible-only": mae, "all-tokens": AllTokensMAE(mae).to(device)}
        one = torch.randn(1, mae.in_chans, img_size, img_size, device=device)
        flops = {name: count_forward_macs(m, one, mask_ratio=mask_ratio).training_flops
                 for name, m in variants.items()}
        for m in variants.values() if compile_mode else ():
            compile_in_place(m, mode=compile_mode)
        imgs = torch.randn(batch_size, mae.in_chans, img_size, img_size, device=device)
        for precision in precisions:
            for name, model in variants.items():
                log(f"timing {name} {precision} ...")
                seconds = time_training_step(model, imgs, precision, device, iters, warmup, mask_ratio,
                                             cudagraphs=compile_mode == "reduce-overhead")
                ips = batch_size / seconds
                achieved = flops[name] * ips / 1e9
                rows.append(StepResult(name, precision, ips, seconds * 1e3, flops[name] / 1e9, achieved,
                                       achieved / peaks[precision]))
    except KeyboardInterrupt:  # a time limit (the tool turns SIGTERM into this): keep what was measured
        interrupted = True
        log(f"interrupted after {len(rows)} row(s): reporting those")
    by = {(r.variant, r.precision): r.images_per_s for r in rows}
    speedups = {"visible_vs_all_tokens": {p: by[("visible-only", p)] / by[("all-tokens", p)] for p in precisions
                                          if ("visible-only", p) in by and ("all-tokens", p) in by}}
    for p in precisions:
        if p != "fp32" and ("visible-only", p) in by and ("visible-only", "fp32") in by:
            speedups[f"{p}_vs_fp32"] = by[("visible-only", p)] / by[("visible-only", "fp32")]
    info["load_avg_1min_end"] = os.getloadavg()[0]
    return {
        "machine": info,
        "model": model_name,
        "img_size": img_size,
        "batch_size": batch_size,
        "iters": iters,
        "warmup": warmup,
        "mask_ratio": mask_ratio,
        "compile_mode": compile_mode,
        "formula": "train FLOPs = 3 x 2 x forward multiply-adds (fvcore + analytic SDPA); "
                   "MFU vs same-precision matmul peak",
        "matmul_peak_gflops": peaks,
        "skipped": skipped,
        "rows": [asdict(r) for r in rows],
        "speedups": speedups,
        "interrupted": interrupted,
    }


def format_report(result: dict[str, Any]) -> str:
    """Human-readable table of :func:`run_benchmark`'s result."""
    m = result["machine"]
    lines = [
        f"device: {m['device']}" + (f" ({m['card']}, fp32 matmul TF32 {m['fp32_matmul_tf32']})" if "card" in m else "")
        + f" | torch {m['torch']} | threads {m['threads']}",
        f"CPU capability: {m['cpu_capability']} | bf16 native: {m['bf16_native']} | {m['cpu_count']} CPUs, "
        f"load average {m['load_avg_1min_start']:.1f} at start, {m['load_avg_1min_end']:.1f} at end",
        f"model: {result['model']} {result['img_size']}px | batch {result['batch_size']} | mask "
        f"{result['mask_ratio']} | median of {result['iters']} timed steps after {result['warmup']} warm-up"
        + (f" | torch.compile mode {result['compile_mode']}" if result.get("compile_mode") else " | eager"),
        "matmul peak: " + (", ".join(f"{p} {g:.1f} GFLOP/s" for p, g in result["matmul_peak_gflops"].items())
                           or "not measured"),
    ]
    lines += [f"skipped {p}: {why}" for p, why in result["skipped"].items()]
    if result.get("interrupted"):
        lines.append(f"STOPPED by a signal after {len(result['rows'])} row(s): the rows not listed were not measured")
    lines.append(f"formula: {result['formula']}")
    header = f"{'variant':<14}{'precision':<11}{'img/s':>9}{'ms/step':>11}{'GFLOP/img':>11}{'GFLOP/s':>10}{'MFU':>8}"
    lines += [header, "-" * len(header)]
    for r in result["rows"]:
        lines.append(
            f"{r['variant']:<14}{r['precision']:<11}{r['images_per_s']:>9.2f}{r['ms_per_step']:>11.1f}"
            f"{r['train_gflop_per_image']:>11.2f}{r['achieved_gflops']:>10.1f}{r['mfu']:>8.1%}"
        )
    s = result["speedups"]
    lines.append("speed-up visible-only vs all-tokens: "
                 + ", ".join(f"{p} {v:.2f}x" for p, v in s["visible_vs_all_tokens"].items()))
    for key, v in s.items():
        if key.endswith("_vs_fp32"):
            lines.append(f"speed-up {key.split('_')[0]} vs fp32 (visible-only): {v:.2f}x")
    return "\n".join(lines)
