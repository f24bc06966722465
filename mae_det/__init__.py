"""mae_det: masked-autoencoder pretraining of Vision Transformers, transferred to Detectron2 Mask R-CNN."""

import sys

__version__ = "0.1.0"

# Before anything imports Detectron2 (the registrations below do): its modules warn at import time about things that
# are harmless here. Narrow, documented filters - see mae_det/utils/known_warnings.py.
from .utils.known_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()


def _running_collect_env() -> bool:
    """``python [interpreter options] -m mae_det.collect_env``: the environment report must run in the broken
    environment it describes (no Detectron2, timm or torch), so it skips the imports below."""
    argv = sys.orig_argv
    return any(a == "-mmae_det.collect_env" or (a == "-m" and b == "mae_det.collect_env")
               for a, b in zip(argv, [*argv[1:], ""]))


if not _running_collect_env():
    try:
        import detectron2  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "mae_det needs Detectron2, which has no PyPI release: run `make setup` (installs the pure-Python "
            "`sal-detectron2==0.7.2`) or install your own build, see https://detectron2.readthedocs.io"
        ) from e
    # As in Detectron2 projects, one import makes the builders known to Detectron2's registries (the ViT
    # backbones, the RoI heads with a configurable level rule, the UperNet head, the sliding-window segmentor)
    # and gives the config functions a user's own script needs.
    from .config.detection import add_det_train_config
    from .config.semantic import add_sem_seg_config
    from .config.vit_backbone import add_vit_config
    from .modeling import backbone, roi_heads, semantic_seg, upernet  # noqa: F401

__all__ = ["add_det_train_config", "add_sem_seg_config", "add_vit_config"]
