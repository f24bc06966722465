"""mae_det: masked-autoencoder pretraining of Vision Transformers, transferred to Detectron2 Mask R-CNN."""

__version__ = "0.1.0"

try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only in broken environments
    raise ImportError(
        "mae_det needs Detectron2, which has no PyPI release: run `make setup` (installs the pure-Python "
        "`sal-detectron2==0.7.2`) or install your own build, see https://detectron2.readthedocs.io"
    ) from e
