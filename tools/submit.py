#!/usr/bin/env python
"""Submit a trainer as a SLURM job with submitit, requeued on preemption and time limits.

    tools/submit.py [--nodes N --gpus-per-node G --partition P --timeout MIN ...] \\
        {pretrain,train_net,finetune_cls} [trainer args] [KEY VALUE ...]

The trainer's arguments and overrides are those of tools/<trainer>.py, unchanged. See ``mae_det.engine.submit``
and the README section "Running on a cluster". Exit codes: 0 submitted (with --wait: finished), 1 the job failed
(--wait) or sbatch refused the job, 2 bad arguments, config or data (one ``error:`` line; nothing was submitted).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()

from mae_det.engine.submit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
