#!/usr/bin/env python
"""Draw the ground truth of a detection dataset, raw or after the configured augmentation, to check it.

    python tools/visualize_data.py --config-file configs/COCO/mask_rcnn_vit_b_mae.yaml --source dataloader \\
        --output output/vis_data --num-images 20
    python tools/visualize_data.py --config-file configs/COCO/mask_rcnn_vit_b_mae.yaml --source annotation \\
        --dataset coco_2017_val --output output/vis_val

``--source annotation`` draws the dataset's records on the original images (``<stem>.png``); ``--source
dataloader`` draws training samples as the trainer's data loader produces them (LSJ or resize, flips;
``NNNN_<stem>.png``), each enlarged to at least 256 px on its shorter side with one colour per class. Only the drawn
dataset needs to be on this machine. The summary names every image that could not be drawn (missing, unreadable or
not the size the json declares). Exit codes: 0 done, 1 nothing written, 2 bad config or dataset, an ``--output``
that is a file or lies among the dataset's images, or no image that can be drawn (one ``error:`` line).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before Detectron2 is imported: see mae_det/utils/known_warnings.py

from detectron2.utils.logger import setup_logger  # noqa: E402

from mae_det.config.detection import load_det_cfg  # noqa: E402
from mae_det.engine.det_trainer import run_with_exit_codes  # noqa: E402
from mae_det.analysis.data import SOURCES, visualize_dataset  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", required=True, help="detection config")
    p.add_argument("--source", choices=SOURCES, default="dataloader")
    p.add_argument("--dataset", default=None, help="registered dataset name (default: DATASETS.TRAIN[0])")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--num-images", type=int, default=10)
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error(f"--num-images: expected at least 1 image, got {args.num_images}")
    return args


def main(args: argparse.Namespace) -> int:
    cfg = load_det_cfg(args.config_file, args.opts, training=False)
    summary = visualize_dataset(cfg, args.output, args.source, args.dataset, args.num_images)
    print(f"{len(summary.written)} images written to {args.output}; {len(summary.failures)} images skipped "
          f"(missing, unreadable or not the declared size){':' if summary.failures else ''}")
    for path, problem in summary.failures:
        print(f"  {path}: {problem}")
    return 0 if summary.written else 1


if __name__ == "__main__":
    for name in ("detectron2", "mae_det"):
        setup_logger(name=name)
    sys.exit(run_with_exit_codes(main, parse_args()))
