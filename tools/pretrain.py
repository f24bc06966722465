#!/usr/bin/env python
"""MAE (or supervised-baseline) pretraining of a ViT encoder.

    tools/pretrain.py --config-file configs/pretrain/<name>.yaml [--resume] [--num-gpus N]
                      [--num-machines M --machine-rank R --dist-url URL] [KEY VALUE ...]

Also runs under ``torchrun --nproc-per-node N tools/pretrain.py ...``; options go before the KEY VALUE pairs.
See ``mae_det.engine.pretrain`` for the output directory layout and ``mae_det.config.pretrain`` for every config
key. Exit codes: 0 done, 1 failed (e.g. a rank died), 2 bad config / data / checkpoint (one ``error:`` line),
3 stopped on a non-finite loss (the last good checkpoint is kept).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before Detectron2 is imported: see mae_det/utils/known_warnings.py

from mae_det.engine.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
