#!/usr/bin/env python
"""MAE pretraining speed on this machine: images/s per precision, visible-only vs all-tokens encoding, FLOPs, MFU.

Prints a table, then one JSON line with every figure. Example:
    python tools/benchmark_pretrain.py --batch-size 8 --iters 3
    python tools/benchmark_pretrain.py --device cuda --batch-size 64 --iters 20 --warmup 5

Side by side with the official code (your clone of facebookresearch/mae; see mae_det/bench/official.py):
    python tools/benchmark_pretrain.py --against-official ~/mae --batch-size 8 --rounds 5
    python tools/benchmark_pretrain.py --against-official ~/mae --device cuda --batch-size 64 --compile \
        --jpeg-folder /tmp/jpegs --workers 16
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a clone without `pip install -e`

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402

from mae_det.bench import stop_on_sigterm  # noqa: E402
from mae_det.bench.official import format_against_official, jpeg_imagefolder, run_against_official  # noqa: E402
from mae_det.bench.pretrain import format_report, mae_arch, run_benchmark  # noqa: E402
from mae_det.data.pretrain import DataError  # noqa: E402
from mae_det.modeling import MAE_FACTORIES  # noqa: E402

# --quick: a tiny MAE and small matmuls, for smoke tests (seconds, figures not meaningful).
QUICK = dict(model_name="mae_vit_tiny_patch16", img_size=64, batch_size=2, iters=2, warmup=1,
             matmul_sizes=(128, 256), matmul_seconds=0.1,
             model_kwargs=dict(depth=2, decoder_depth=1, decoder_embed_dim=128))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MAE_FACTORIES), default="mae_vit_base_patch16",
                        help="also the architecture of both sides with --against-official (not with --quick)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3, help="timed training steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each row")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke test of the script")
    parser.add_argument("--against-official", metavar="PATH", default="",
                        help="a facebookresearch/mae checkout: time its model and loop against ours instead")
    parser.add_argument("--rounds", type=int, default=5, help="--against-official: interleaved rounds (median)")
    parser.add_argument("--compile", action="store_true",
                        help="--against-official: add our compiled variant (= --compile-modes default)")
    parser.add_argument("--compile-modes", default="",
                        help="--against-official: comma-separated torch.compile modes, one compiled row of ours each "
                        "(default, reduce-overhead = CUDA graphs); the end-to-end rows use the last. Without "
                        "--against-official: one mode, both variants compiled in it")
    parser.add_argument("--precisions", default="fp32,bf16,fp16",
                        help="without --against-official: the precisions timed (those the device supports)")
    parser.add_argument("--jpeg-folder", default="", help="--against-official: also time end to end through each "
                        "side's loader on this ImageFolder (root/<class>/<image>), used as it is; a missing or empty "
                        "folder gets --jpeg-images synthetic JPEGs")
    parser.add_argument("--jpeg-images", type=int, default=2000, help="synthetic JPEGs generated into --jpeg-folder")
    parser.add_argument("--workers", type=int, default=4, help="--against-official: loader workers per side")
    parser.add_argument("--max-seconds", type=float, default=0.0,
                        help="--against-official: start no round after this many seconds (0 = no limit)")
    args = parser.parse_args(argv)
    # Checked here: a zero batch or step count would fail with a division by zero after the timings ran.
    for option, value, least in (("--batch-size", args.batch_size, 1), ("--iters", args.iters, 1),
                                 ("--warmup", args.warmup, 0), ("--rounds", args.rounds, 1)):
        if value < least:
            parser.error(f"{option}: expected >= {least}, got {value}")
    if not 0.0 <= args.mask_ratio < 1.0:  # the model would reject it only after the matmul peaks were measured
        parser.error(f"--mask-ratio: expected a value in [0, 1), got {args.mask_ratio}")
    if args.warmup == 0 and compile_modes(args):  # the compilation would land in the first timed step
        parser.error("--warmup 0 with --compile / --compile-modes: expected >= 1 warm-up step to compile in")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    kwargs = dict(model_name=args.model, batch_size=args.batch_size, iters=args.iters, warmup=args.warmup,
                  device=args.device, img_size=args.img_size, mask_ratio=args.mask_ratio)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.against_official:
        return against_official(args, log)
    modes = compile_modes(args)
    if len(modes) > 1:
        sys.exit(f"--compile-modes: one mode without --against-official, got {args.compile_modes}")
    kwargs.update(compile_mode=modes[0] if modes else "",
                  precisions=tuple(p for p in args.precisions.split(",") if p))
    if args.quick:
        kwargs.update(QUICK)
    stop_on_sigterm()  # as below: a time limit still prints the rows measured
    try:
        result = run_benchmark(**kwargs, log=log)
    except ValueError as e:  # an unknown precision or compile mode, or no requested precision runs here
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_report(result))
    print(json.dumps(result))


def compile_modes(args: argparse.Namespace) -> tuple[str, ...]:
    modes = tuple(m for m in args.compile_modes.split(",") if m)
    return modes or (("default",) if args.compile else ())


def against_official(args: argparse.Namespace, log) -> None:
    arch = mae_arch(args.model)  # both sides at --model's sizes
    kwargs = dict(img_size=args.img_size, batch_size=args.batch_size, rounds=args.rounds, steps=args.iters,
                  warmup=args.warmup, device=args.device, mask_ratio=args.mask_ratio, compile_modes=compile_modes(args),
                  workers=args.workers, max_seconds=args.max_seconds)
    if args.quick:
        arch.update(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
        kwargs.update(img_size=32, batch_size=2, steps=1, matmul_sizes=(128,), matmul_seconds=0.05)
    if args.jpeg_folder:
        n = 8 if args.quick else args.jpeg_images
        size = (48, 40) if args.quick else (500, 375)
        try:
            count, kb, synthetic = jpeg_imagefolder(args.jpeg_folder, n, size, workers=args.workers)
        except DataError as e:  # a file, or a folder that is no ImageFolder
            print(f"error: --jpeg-folder {e}", file=sys.stderr)
            sys.exit(2)
        log(f"{args.jpeg_folder}: {count} images, mean {kb:.0f} KB ("
            + ("synthetic JPEGs)" if synthetic else "an existing ImageFolder, read as it is, nothing written into it)"))
        kwargs["jpeg_root"] = args.jpeg_folder
    # `timeout` (scripts/gpu_benchmark.sh) sends SIGTERM: the rounds measured so far are still printed
    stop_on_sigterm()
    try:
        result = run_against_official(args.against_official, arch=arch, log=log, **kwargs)
    except (FileNotFoundError, ValueError) as e:  # no checkout file; an unknown compile mode
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_against_official(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
