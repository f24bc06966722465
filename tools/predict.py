#!/usr/bin/env python
"""Run a trained detector on images: a PNG with the detections drawn per image, plus COCO-format json.

    python tools/predict.py --config-file output/coco/vit_b_mae/config.yaml \\
        --input photos/ "more/**/*.jpg" one.png --output output/predictions \\
        --confidence-threshold 0.5 --opts MODEL.WEIGHTS output/coco/vit_b_mae/model_final.pth

Writes into --output: ``<image stem>.png`` per image, ``results.json`` (COCO results: bbox xywh, score,
category_id, segmentation RLE) and ``images.json`` (the COCO images/categories they refer to, for
``COCO("images.json").loadRes("results.json")``). Unreadable inputs are reported by path and skipped; an
--output that is a file or holds one of the inputs is refused (pictures would replace inputs).
A semantic-segmentation config (UperNet) draws the predicted class regions instead and also writes
``<image stem>_labels.png`` (mode "L" class map); results.json then maps image_id to that file.
Exit codes: 0 done (some inputs may have been skipped), 1 no input could be read, 2 bad config, weights or --output.
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before Detectron2 is imported: see mae_det/utils/known_warnings.py

from detectron2.utils.logger import setup_logger  # noqa: E402

from mae_det.engine.det_trainer import run_with_exit_codes  # noqa: E402
from mae_det.engine.predictor import (  # noqa: E402
    Predictor, check_output_dir, expand_inputs, load_predict_cfg, predict_to_dir,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", required=True, help="detection config (a run's config.yaml works)")
    p.add_argument("--input", nargs="+", required=True, help="image files, folders or glob patterns (quote them)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score of a detection")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images read per step; only those of one size share a forward pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="KEY VALUE config overrides, e.g. MODEL.WEIGHTS path (last on the command line)")
    args = p.parse_args(argv)
    # Checked here, before the model is built, so that a typo is argparse's one-line usage error (exit 2).
    if not 0.0 <= args.confidence_threshold <= 1.0:
        p.error(f"--confidence-threshold: expected a score in [0, 1], got {args.confidence_threshold}")
    if args.batch_size < 1:
        p.error(f"--batch-size: expected at least 1 image, got {args.batch_size}")
    return args


def main(args: argparse.Namespace) -> int:
    cfg = load_predict_cfg(args.config_file, args.opts, args.confidence_threshold)
    check_output_dir(args.output, expand_inputs(args.input)[0])  # before the model is built and loaded
    predictor = Predictor(cfg)
    summary = predict_to_dir(predictor, args.input, args.output, args.batch_size, progress=not args.no_progress)
    log = logging.getLogger("mae_det.predict")
    log.info(
        f"{len(summary.images)} images, {summary.num_detections} "
        f"{'class maps' if predictor.semantic else 'detections'} -> {args.output} "
        f"(results.json, images.json); {len(summary.failures)} inputs skipped (reported above)"
    )
    return 0 if summary.images else 1


if __name__ == "__main__":
    for name in ("detectron2", "fvcore", "mae_det"):
        setup_logger(name=name)
    sys.exit(run_with_exit_codes(main, parse_args()))
