#!/usr/bin/env python
"""Time of the image checks a detection dataset gets at registration (header reads for training sets, full
decoding for test sets) on a generated COCO-format folder, extrapolated to COCO 2017. Prints a report, then one
JSON line with every figure. Example:
    python tools/benchmark_data.py --header-check 10000 --decode-check 300
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()

from mae_det.bench.data import format_report, run  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--header-check", type=int, default=10000, metavar="N", help="small images to generate")
    parser.add_argument("--decode-check", type=int, default=300, metavar="N", help="COCO-sized images to decode")
    parser.add_argument("--decode-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--root", default="", help="folder for the generated data (default: a temporary one)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(args.root or tmp), args.header_check, args.decode_check, tuple(args.decode_size))
    print(format_report(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
