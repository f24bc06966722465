#!/usr/bin/env python
"""Time of the image checks a detection dataset gets at registration (header reads for training sets, full
decoding for test sets) on a generated COCO-format folder, extrapolated to COCO 2017; with ``--train-loader N``
also the seconds per training batch of Detectron2's loader and of the SEEDED_DRAWS one, side by side; with
``--decoded-cache N`` the seconds per pretraining batch of small images decoded every read and from the decoded-image
cache (DATA.CACHE_DECODED_MB). Prints a report, then one JSON line with every figure. Examples:
    python tools/benchmark_data.py --header-check 10000 --decode-check 300 --train-loader 30
    OMP_NUM_THREADS=1 python tools/benchmark_data.py --header-check 100 --decode-check 10 --decoded-cache 50
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()

from mae_det.bench.data import (  # noqa: E402
    format_cache_report, format_loader_report, format_report, make_dataset, run, time_decoded_cache, time_train_loaders,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--header-check", type=int, default=10000, metavar="N",
                        help="small images to generate and header-check (0: skip)")
    parser.add_argument("--decode-check", type=int, default=300, metavar="N",
                        help="COCO-sized images to generate and decode (0: skip)")
    parser.add_argument("--decode-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--train-loader", type=int, default=0, metavar="N",
                        help="timed batches per loader variant and round, on the decode-check images (0: skip)")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 2], metavar="W")
    parser.add_argument("--decoded-cache", type=int, default=0, metavar="N",
                        help="timed pretraining batches per round without and with the decoded-image cache, on "
                             "--cache-images generated images of --cache-size px (0: skip)")
    parser.add_argument("--cache-images", type=int, default=800, metavar="N")
    parser.add_argument("--cache-size", type=int, default=64, metavar="PX")
    parser.add_argument("--root", default="", help="folder for the generated data (default: a temporary one)")
    args = parser.parse_args(argv)
    # Checked here: a bad count would otherwise fail after every other timing ran (a division by zero images).
    for option in ("header_check", "decode_check", "train_loader", "decoded_cache"):
        if getattr(args, option) < 0:
            parser.error(f"--{option.replace('_', '-')}: expected >= 0 (0: skip), got {getattr(args, option)}")
    for option, values in (("decode-size", args.decode_size), ("cache-images", [args.cache_images]),
                           ("cache-size", [args.cache_size])):
        if min(values) < 1:
            parser.error(f"--{option}: expected at least 1, got {' '.join(map(str, values))}")
    if min(args.loader_workers) < 0:
        parser.error(f"--loader-workers: expected >= 0, got {' '.join(map(str, args.loader_workers))}")
    if args.train_loader and not args.decode_check:
        parser.error("--train-loader: times batches of the --decode-check images, but --decode-check is 0")
    if not (args.header_check or args.decode_check or args.decoded_cache):
        parser.error("nothing to time: --header-check, --decode-check and --decoded-cache are all 0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        result = run(root, args.header_check, args.decode_check, tuple(args.decode_size))
        if args.train_loader:
            result["train_loader"] = time_train_loaders(root / "decode" / "ann.json", root / "decode" / "images",
                                                        batches=args.train_loader, workers=tuple(args.loader_workers))
        if args.decoded_cache:
            ann = make_dataset(root / "cache", args.cache_images, (args.cache_size, args.cache_size))
            result["decoded_cache"] = time_decoded_cache(ann, root / "cache" / "images", batches=args.decoded_cache)
    if args.header_check or args.decode_check:
        print(format_report(result))
    if args.train_loader:
        print(format_loader_report(result["train_loader"]))
    if args.decoded_cache:
        print(format_cache_report(result["decoded_cache"]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
