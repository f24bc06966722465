#!/usr/bin/env python
"""Convert ADE20K's raw labels to Detectron2's semantic format (what ade20k_sem_seg_{train,val} read).

    python tools/convert_ade20k.py $DETECTRON2_DATASETS/ADEChallengeData2016

Reads annotations/{training,validation}/*.png (0 = "other", 1..150) and writes
annotations_detectron2/{training,validation}/*.png with 0 -> 255 (ignored) and k -> k - 1. Existing outputs are
kept unless --overwrite. Exit codes: 0 done, 2 missing folder or labels that are not raw ADE20K (one error line).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()

from mae_det.data.detection import DatasetError  # noqa: E402
from mae_det.data.semantic import convert_ade20k  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="the ADEChallengeData2016 folder")
    parser.add_argument("--overwrite", action="store_true", help="rewrite already converted files")
    args = parser.parse_args(argv)
    try:
        counts = convert_ade20k(args.root, overwrite=args.overwrite)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[convert_ade20k] wrote {counts} label maps to {Path(args.root) / 'annotations_detectron2'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
