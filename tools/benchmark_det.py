#!/usr/bin/env python
"""Our ViT-FPN Mask R-CNN vs Detectron2's own ViTDet (ViT + SimpleFeaturePyramid) at the same size and input.

    python tools/benchmark_det.py --size base --img-size 1024 --device cuda --precision fp16 --iters 10
    python tools/benchmark_det.py --quick          # a tiny run that only checks the script

Prints backbone forward+backward time, full training iteration and inference time (medians, per image),
peak memory (CUDA: max_memory_allocated; CPU: sampled RSS growth), parameter counts, and ours/theirs ratios.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before Detectron2 is imported: see mae_det/utils/known_warnings.py

from mae_det.modeling.vit import VIT_SIZES  # noqa: E402
from mae_det.utils.benchmark_det import (  # noqa: E402
    PRECISION_DTYPES, BenchmarkSettings, device_name, format_results, run_benchmark,
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base", choices=sorted(VIT_SIZES))
    p.add_argument("--img-size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISION_DTYPES))
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny encoder and heads at 128 px, 1 iteration")
    a = p.parse_args(argv)
    s = BenchmarkSettings(a.size, 128 if a.quick else a.img_size, a.batch, a.device, a.precision,
                          1 if a.quick else a.iters, a.quick)
    results = run_benchmark(s, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_results(s, results, device_name(s.device)))


if __name__ == "__main__":
    main()
