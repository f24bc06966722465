#!/usr/bin/env python
"""Weighted k-NN top-1 of a frozen ViT encoder (DINO protocol).

    tools/knn_eval.py --config-file configs/classification/<name>.yaml [KEY VALUE ...]

Writes OUTPUT_DIR/cls_results.json, run_info.json, config.yaml and log.txt. See ``mae_det.engine.finetune_cls``
and ``mae_det.config.classification`` for every config key.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before Detectron2 is imported: see mae_det/utils/known_warnings.py

from mae_det.engine.finetune_cls import knn_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(knn_main())
