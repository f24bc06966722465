#!/usr/bin/env python
"""Time of the image checks a detection dataset gets at registration (header reads for training sets, full
decoding for test sets) on a generated COCO-format folder, extrapolated to COCO 2017; with ``--train-loader N``
also the seconds per training batch of Detectron2's loader and of the SEEDED_DRAWS one, side by side. Prints a
report, then one JSON line with every figure. Example:
    python tools/benchmark_data.py --header-check 10000 --decode-check 300 --train-loader 30
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()

from mae_det.bench.data import format_loader_report, format_report, run, time_train_loaders  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--header-check", type=int, default=10000, metavar="N", help="small images to generate")
    parser.add_argument("--decode-check", type=int, default=300, metavar="N", help="COCO-sized images to decode")
    parser.add_argument("--decode-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--train-loader", type=int, default=0, metavar="N",
                        help="timed batches per loader variant and round, on the decode-check images (0: skip)")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2], metavar="W")
    parser.add_argument("--root", default="", help="folder for the generated data (default: a temporary one)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        result = run(root, args.header_check, args.decode_check, tuple(args.decode_size))
        if args.train_loader:
            result["train_loader"] = time_train_loaders(root / "decode" / "ann.json", root / "decode" / "images",
                                                        batches=args.train_loader, workers=tuple(args.loader_workers))
    print(format_report(result))
    if args.train_loader:
        print(format_loader_report(result["train_loader"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
