#!/usr/bin/env python
"""Our ViT-FPN Mask R-CNN vs Detectron2's own ViTDet (ViT + SimpleFeaturePyramid) at the same size and input.

    python tools/benchmark_det.py --size base --img-size 1024 --device cuda --precision fp16 --iters 10
    python tools/benchmark_det.py --quick          # a tiny run that only checks the script
    python tools/benchmark_det.py --device cuda --precision bf16 --batch 4 --compile --real-data /tmp/shapes_det
    python tools/benchmark_det.py --parity [--config-file C.yaml] [--iters 3]     # training parity, see below
    python tools/benchmark_det.py --side-by-side --config-file configs/shapes/mask_rcnn_vit_parity.yaml \
        --seeds 3 --output output/parity [--jobs 2] [--sides ours,vitdet,ours_bf16] [KEY VALUE ...]
    python tools/benchmark_det.py --roi-align      # CPU RoIAlign backward: torchvision's vs ours, bit for bit

Prints backbone forward+backward time (median, per iteration), full training iteration and inference time
(medians, per image), peak memory (CUDA: max_memory_allocated; on CPU not measured: a process keeps freed memory,
so its growth follows the order the models ran in), parameter counts, and ours/theirs ratios.
--compile adds rows of ours with the backbone compiled in place, and the time of its first iteration in each phase
("incl. compile" where Dynamo compiled in it; the training iteration reuses the backbone step's graphs);
--real-data DIR adds a training iteration through Detectron2's loader with LSJ at --img-size on shapes images
generated into DIR (mae_det/bench/det.py).

--parity builds our Mask R-CNN and Detectron2's LazyConfig ViTDet at the config's sizes (default: a tiny one),
copies ViTDet's initial weights into ours, trains both --iters steps on the same batches and compares losses,
gradients, weights, every parameter's lr / weight decay and the lr schedule (exit 1 on any difference that is
not a listed deliberate one). --side-by-side trains both for the config's schedule on its datasets, --seeds
seeds each, and prints box / mask AP mean +- std and s/iter (mae_det/bench/parity.py).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before Detectron2 is imported: see mae_det/utils/known_warnings.py

import torch  # noqa: E402

from mae_det.modeling.vit import VIT_SIZES  # noqa: E402
from mae_det.bench.det import (  # noqa: E402
    PRECISION_DTYPES, BenchmarkSettings, device_name, format_results, roi_align_backward_times, run_benchmark,
)
from mae_det.bench import error_line, parity, stop_on_sigterm  # noqa: E402
from mae_det.config.pretrain import ConfigError  # noqa: E402


def run_parity(a) -> int:
    cfg = parity.parity_cfg(a.config_file, a.opts)
    report = parity.run_parity(cfg, iters=a.iters)
    print(parity.format_parity(report))
    return 0 if report.ok else 1


def run_side_by_side(a) -> int:
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    sides = a.sides.split(",") if a.sides else parity.default_sides()
    bad = [s for s in sides if s not in parity.SIDES]
    if bad:
        print(f"error: --sides: unknown side(s) {bad}; expected some of {list(parity.SIDES)}", file=sys.stderr)
        return 2
    if a.step_times:
        medians = parity.interleaved_step_times(a.config_file, a.opts, tuple(sides), iters=a.step_times)
        print(f"{a.config_file} {' '.join(a.opts)}, {device_name('cpu')}: median s per training step, "
              f"{a.step_times} steps of each side, interleaved")
        for side, t in medians.items():
            ratio = f" ({t / medians['vitdet']:.2f} x ViTDet)" if "vitdet" in medians else ""
            print(f"  {parity.SIDE_LABELS[side]}: {t:.3f}{ratio}")
        return 0
    runs = [(side, seed) for seed in range(a.seeds) for side in sides]
    args = [(a.config_file, a.opts, side, seed, a.output) for side, seed in runs]
    if a.jobs > 1:  # both sides at once: load changes on a shared machine hit them alike
        with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=parity.single_thread_worker) as pool:
            results = list(pool.map(parity.run_one, *zip(*args)))
    else:
        results = [parity.run_one(*x) for x in args]
    print(f"{a.config_file} {' '.join(a.opts)}, {device_name('cpu')}")
    print(parity.format_side_by_side(results))
    return 0


def run_roi_align() -> int:
    print(f"RoIAlign backward on {device_name('cpu')}, make demo's poolers (64 px images x 4, 64 channels at "
          "stride 2, 7x7 bins, adaptive sampling), median of 15 interleaved calls:")
    equal = True
    for name, rois in (("box head, 256 RoIs", 256), ("mask head, 64 RoIs", 64)):
        r = roi_align_backward_times(rois=rois)
        equal &= r["equal"]
        print(f"  {name} ({r['samples']} samples): torchvision {r['torchvision'] * 1e3:.1f} ms, ours "
              f"{r['vectorized'] * 1e3:.1f} ms ({r['vectorized'] / r['torchvision']:.2f} x); gradients "
              f"{'bit for bit equal' if r['equal'] else 'DIFFERENT'}")
    return 0 if equal else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base", choices=sorted(VIT_SIZES))
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISION_DTYPES))
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny encoder and heads at 128 px, 1 iteration")
    p.add_argument("--compile", action="store_true", help="also time ours with the backbone compiled")
    p.add_argument("--real-data", default="", metavar="DIR", help="also time training through the D2 loader + LSJ "
                   "on images generated into DIR")
    p.add_argument("--workers", type=int, default=4, help="--real-data: data-loader workers")
    p.add_argument("--parity", action="store_true", help="training parity with Detectron2's ViTDet (--iters steps)")
    p.add_argument("--side-by-side", action="store_true", help="train ours and ViTDet on the config's data")
    p.add_argument("--config-file", default="", help="--parity / --side-by-side: our yacs detection config")
    p.add_argument("--seeds", type=int, default=3, help="--side-by-side: seeds 0..N-1 per side")
    p.add_argument("--sides", default="", help="--side-by-side: comma-separated, of ours, vitdet, ours_bf16 (default: "
                   "ours,vitdet, plus ours_bf16 where the CPU has native bf16)")
    p.add_argument("--step-times", type=int, default=0, metavar="N", help="--side-by-side: instead of training, "
                   "time N steps of each side, interleaved (fair on a shared machine)")
    p.add_argument("--jobs", type=int, default=1, help="--side-by-side: runs at a time (one thread each when > 1)")
    p.add_argument("--output", default="output/parity", help="--side-by-side: run folders (finished runs are reused)")
    p.add_argument("--roi-align", action="store_true", help="time torchvision's CPU RoIAlign backward against ours "
                   "(mae_det.modeling.roi_align) on make demo's box and mask pooler calls; exit 1 if they differ")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="--parity / --side-by-side: KEY VALUE config overrides")
    a = p.parse_args(argv)
    if a.iters < 1 and not a.quick:  # --parity: nothing to compare; the benchmark: no step to take the median of
        p.error(f"--iters: expected >= 1, got {a.iters}")
    # Checked here: --batch 0 failed only after both models were built, with an AssertionError and no message
    for option, value, least in (("--batch", a.batch, 1), ("--img-size", a.img_size, 1), ("--workers", a.workers, 0)):
        if value < least:
            p.error(f"{option}: expected >= {least}, got {value}")
    try:
        if a.roi_align:
            sys.exit(run_roi_align())
        if a.parity:
            sys.exit(run_parity(a))
        if a.side_by_side:
            if not a.config_file:
                p.error("--side-by-side needs --config-file")
            sys.exit(run_side_by_side(a))
    except ConfigError as e:  # a config the comparison cannot run: one line, not a traceback
        print(f"benchmark_det: {e}", file=sys.stderr)
        sys.exit(2)
    if a.device.split(":")[0] == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {a.device}: no CUDA device is available")
    s = BenchmarkSettings(a.size, 128 if a.quick else a.img_size, a.batch, a.device, a.precision,
                          1 if a.quick else a.iters, a.quick, a.compile, a.real_data, a.workers)
    results: dict = {}
    stop_on_sigterm()
    try:
        run_benchmark(s, log=lambda msg: print(msg, file=sys.stderr, flush=True), results=results)
    except KeyboardInterrupt:  # a time limit (scripts/gpu_benchmark.sh): the rows measured so far are printed
        print("STOPPED by a signal: the rows measured before it")
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: the rows measured before it are still printed
        print(format_results(s, results, s.device))  # not device_name(): a broken CUDA would raise there again
        sys.exit(f"benchmark_det: FAILED after the rows above: {error_line(e)}")
    print(format_results(s, results, device_name(s.device)))


if __name__ == "__main__":
    main()
