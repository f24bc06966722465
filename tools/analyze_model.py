#!/usr/bin/env python
"""Parameters per module, FLOPs and activations per image of the detection model or the MAE pretraining model.

    python tools/analyze_model.py --config-file configs/COCO/mask_rcnn_vit_b_mae.yaml
    python tools/analyze_model.py --config-file configs/pretrain/mae_vit_base_in1k.yaml --model-type mae \\
        --tasks parameter flop
    python tools/analyze_model.py --config-file configs/COCO/mask_rcnn_vit_b_mae.yaml --input-size 800 1216 \\
        MODEL.DEVICE cpu

FLOPs: forward pass, one multiply-add = one flop (fvcore's unit), fused attention included. The detection model
(or a semantic segmenter's config) is measured on one image of the configured test size with score threshold 0;
the report says how many RoIs its heads measured and warns when fewer than configured (see
``mae_det.analysis.model``). Exit code 2 with one ``error:`` line on a bad config.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before Detectron2 is imported: see mae_det/utils/known_warnings.py

from mae_det.engine.det_trainer import run_with_exit_codes  # noqa: E402
from mae_det.analysis.model import MODEL_TYPES, TASKS, analyze, build_target  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", required=True, help="detection config, or pretraining config with --model-type mae")
    p.add_argument("--model-type", choices=MODEL_TYPES, default="detection")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--max-depth", type=int, default=3, help="module depth of the parameter table")
    p.add_argument("--input-size", type=int, nargs="+", metavar="PX",
                   help="detection: image size after the test resize, H [W] (default: a square of INPUT.MIN_SIZE_TEST)")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    if args.input_size is not None and len(args.input_size) not in (1, 2):
        p.error("--input-size takes H or H W")
    if args.input_size is not None and min(args.input_size) < 1:
        p.error(f"--input-size: expected sizes of at least 1 pixel, got {' '.join(map(str, args.input_size))}")
    return args


def main(args: argparse.Namespace) -> None:
    size = None if args.input_size is None else (args.input_size * 2)[:2]
    target = build_target(args.model_type, args.config_file, args.opts, size)
    print(analyze(target, args.tasks, args.max_depth))


if __name__ == "__main__":
    run_with_exit_codes(main, parse_args())
