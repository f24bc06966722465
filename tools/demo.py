#!/usr/bin/env python
"""The embedded demo: shapes dataset -> MAE and supervised pretraining -> Mask R-CNN from MAE, supervised and random
init -> AP tables and REPORT.md. Resumable: re-running skips finished stages and continues interrupted ones.

    python tools/demo.py --profile full                 # make demo        (output/demo/)
    python tools/demo.py --profile quick                # make demo-quick  (output/demo_quick/)
    python tools/demo.py --profile experiment --seeds 3 --label-fractions 0.25,0.5,1 --semantic \
        --output output/experiment                      # make experiment (the full profile, 2x pretraining)
    ... the same --reference-pyramid simple             # make experiment-pyramid (+ every init, simple pyramid)
    ... the same --pretrain-seeds 2                     # make experiment-pretrain-seeds (+ pretraining seed 1)
"""

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before Detectron2 is imported: see mae_det/utils/known_warnings.py

from mae_det.config.vit_backbone import PYRAMIDS  # noqa: E402
from mae_det.demo import PRECISIONS, PROFILES, DemoError, run_demo  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per initialization (mean ± std)")
    parser.add_argument("--output", default=None,
                        help="report directory, relative to the working directory (default output/demo[_<profile>] "
                        "in the checkout)")
    parser.add_argument("--data-root", default=None,
                        help="dataset directory, relative to the working directory (default datasets/shapes/<profile> "
                        "in the checkout); a folder holding other files is refused, never overwritten")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="training runs at once, each with cpu_count/jobs threads (default: 2)")
    parser.add_argument("--label-fractions", default="1", help="comma-separated fractions of the labeled train "
                        "split to fine-tune on, nested subsets (default: 1; make experiment: 0.25,0.5,1)")
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the nested subsets (not of training)")
    parser.add_argument("--semantic", action="store_true", help="also UperNet on the semantic split from each init, "
                        "--seeds seeds each (make experiment)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="training precision of every stage: auto = bf16 where the CPU has it natively, else fp32 "
                        "(default); fp32 reproduces a CPU without native bf16 (numbers, not time)")
    parser.add_argument("--reference-pyramid", choices=PYRAMIDS, default=None,
                        help="also fine-tune every init with this pyramid instead of the configs' one (every label "
                        "fraction, --seeds seeds each) and report MAE's margin with each init at its best pyramid")
    parser.add_argument("--pretrain-seeds", type=int, default=1,
                        help="pretrain each arm this many times (SEED 0, 1, ...) and fine-tune every encoder on all "
                        "labels, --seeds seeds each; the report adds the spread over pretraining seeds (default: 1)")
    args = parser.parse_args(argv)
    try:
        fractions = [float(f) for f in args.label_fractions.split(",")]
    except ValueError:
        fractions = []
    if not fractions or not all(0 < f <= 1 for f in fractions):
        parser.error(f"--label-fractions: expected comma-separated numbers in (0, 1], got {args.label_fractions!r}")
    try:
        run_demo(args.profile, seeds=args.seeds, output=args.output, data_root=args.data_root, jobs=args.jobs,
                 argv=argv, fractions=fractions, subset_seed=args.subset_seed, semantic=args.semantic,
                 precision=args.precision, reference_pyramid=args.reference_pyramid,
                 pretrain_seeds=args.pretrain_seeds)
    except DemoError as e:
        sys.exit(f"demo: {e}")
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (Interrupted): the running stages were stopped
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"demo: stopped by {signal.Signals(signum).name}; running it again resumes the unfinished stages",
              file=sys.stderr)
        sys.exit(128 + signum)  # the shell's code for a process that a signal ended


if __name__ == "__main__":
    main()
