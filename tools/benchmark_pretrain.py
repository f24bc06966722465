#!/usr/bin/env python
"""MAE pretraining speed on this machine: images/s per precision, visible-only vs all-tokens encoding, FLOPs, MFU.

Prints a table, then one JSON line with every figure. Example:
    python tools/benchmark_pretrain.py --batch-size 8 --iters 3
    python tools/benchmark_pretrain.py --device cuda --batch-size 64 --iters 20 --warmup 5
"""
import argparse
import json
import sys

import torch

from mae_det.modeling import MAE_FACTORIES
from mae_det.utils.benchmark import format_report, run_benchmark
from mae_det.utils.known_warnings import filter_known_warnings

filter_known_warnings()

# --quick: a tiny MAE and small matmuls, for smoke tests (seconds, figures not meaningful).
QUICK = dict(model_name="mae_vit_tiny_patch16", img_size=64, batch_size=2, iters=2, warmup=1,
             matmul_sizes=(128, 256), matmul_seconds=0.1,
             model_kwargs=dict(depth=2, decoder_depth=1, decoder_embed_dim=128))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MAE_FACTORIES), default="mae_vit_base_patch16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3, help="timed training steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each row")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke test of the script")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    kwargs = dict(model_name=args.model, batch_size=args.batch_size, iters=args.iters, warmup=args.warmup,
                  device=args.device, img_size=args.img_size, mask_ratio=args.mask_ratio)
    if args.quick:
        kwargs.update(QUICK)
    result = run_benchmark(**kwargs, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_report(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
