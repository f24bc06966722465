#!/usr/bin/env python
"""Compare runs of tools/train_net.py (AP and mIoU; and classification results): Markdown + CSV table and a chart.

    python tools/compare_ap.py output/ft_mae_s* output/ft_scratch_s* --baseline scratch --output output/compare
    python tools/compare_ap.py runA runB --label runA=mae_800ep --label runB=mae_1600ep --baseline none

Each run directory holds run_info.json (init_type, seed) and ap_results.json, sem_seg_results.json (mIoU, pixel
accuracy, per-class IoU) and/or cls_results.json.
Runs are grouped by init_type (or --label), with mean ± sample std over seeds and deltas against --baseline.
Runs of one init_type that started from different checkpoints (run_info.json) are split into a group per
checkpoint; --label groups runs explicitly. A directory given twice counts once. A group whose runs were evaluated
on different test sets or at different iterations (ap_results.json) is refused; a run whose model predicted nothing
counts as AP 0 and is flagged.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before Detectron2 is imported: see mae_det/utils/known_warnings.py

from mae_det.evaluation.compare import ResultError, compare, resolve_labels  # noqa: E402


def _label(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--label expects DIR=NAME, got {text!r}")
    d, name = text.rsplit("=", 1)
    if not d or not name:
        raise argparse.ArgumentTypeError(f"--label expects DIR=NAME, got {text!r}")
    return d, name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--output", default="output/compare", help="where the table, CSV and chart go")
    parser.add_argument("--label", action="append", type=_label, default=[], metavar="DIR=NAME",
                        help="group DIR under NAME instead of its init_type (repeatable)")
    parser.add_argument("--baseline", default="scratch", help="group the deltas are taken against ('none': no deltas)")
    parser.add_argument("--published", action="store_true", help="append the published reference rows (labelled)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="list runs with missing/malformed results in the report instead of failing")
    parser.add_argument("--name", default="ap_table", help="file stem of the outputs (no folder: see --output)")
    parser.add_argument("--title", default="AP comparison")
    args = parser.parse_args(argv)
    logging.basicConfig(format="compare_ap: %(message)s")
    try:
        # resolved: two spellings of one folder with different names are an error, not the last one silently
        paths = compare(args.runs, args.output, labels=resolve_labels(args.label),
                        baseline=None if args.baseline.lower() == "none" else args.baseline,
                        published=args.published, skip_invalid=args.skip_invalid, name=args.name, title=args.title)
    except (ResultError, OSError) as e:  # OSError: the output cannot be written (permissions, a full disk)
        sys.exit(f"compare_ap: {e}")
    print(paths["markdown"].read_text(encoding="utf-8"))
    for kind, path in paths.items():
        print(f"[compare_ap] {kind}: {path}")


if __name__ == "__main__":
    main()
