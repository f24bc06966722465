#!/usr/bin/env python
"""End-to-end classification fine-tuning of a ViT encoder from any checkpoint (MAE recipe).

    tools/finetune_cls.py --config-file configs/classification/<name>.yaml [--resume] [KEY VALUE ...]

Writes OUTPUT_DIR/cls_results.json, run_info.json, config.yaml and log.txt. See ``mae_det.engine.finetune_cls``
and ``mae_det.config.classification`` for every config key.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before Detectron2 is imported: see mae_det/utils/known_warnings.py

from mae_det.engine.finetune_cls import finetune_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(finetune_main())
