"""Pictures of a detection dataset's ground truth, raw or as the trainer sees it, to check data before a long run.

Two sources, as Detectron2's ``tools/visualize_data.py``:

- ``annotation``: the registered dataset's records drawn on the original images;
- ``dataloader``: samples of the training data loader of the config (the trainer's own mapper: LSJ or resize,
  flips, masks rasterized or cropped), drawn on the augmented images.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from ..data.detection import DatasetError, load_report, register_datasets
from ..data.images import ImageLoadError, load_image
from ..engine.det_trainer import Trainer
from ..engine.predictor import unique_png_names

logger = logging.getLogger(__name__)

SOURCES = ("annotation", "dataloader")


@dataclass
class DataVisSummary:
    """Files written by :func:`visualize_dataset` and the images skipped as unreadable (path, reason)."""

    written: list[Path] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)


def _dataset_name(cfg: CfgNode, dataset: str | None) -> str:
    if dataset:
        return dataset
    if not cfg.DATASETS.TRAIN:
        raise DatasetError("DATASETS.TRAIN is empty: name a dataset with --dataset")
    return cfg.DATASETS.TRAIN[0]


def _save(image: np.ndarray, path: Path, summary: DataVisSummary) -> None:
    Image.fromarray(image).save(path)
    summary.written.append(path)


def _from_annotations(name: str, num_images: int, out: Path, summary: DataVisSummary) -> None:
    records = DatasetCatalog.get(name)
    metadata = MetadataCatalog.get(name)
    report = load_report(name)
    for line in report.bad_files if report else ():  # skipped at load by the header check: named, not drawn
        path, _, problem = line.partition(": ")
        summary.failures.append((path, problem))
    used: set[str] = set()
    for record in records:
        if len(summary.written) >= num_images:
            break
        try:
            image = np.asarray(load_image(record["file_name"]))
        except ImageLoadError as e:
            logger.warning(f"skipped unreadable image: {e}")
            summary.failures.append((record["file_name"], str(e).removeprefix(f"{record['file_name']}: ")))
            continue
        png = unique_png_names(record["file_name"], used)[0]
        _save(Visualizer(image, metadata).draw_dataset_dict(record).get_image(), out / png, summary)


def _from_dataloader(cfg: CfgNode, name: str, num_images: int, out: Path, summary: DataVisSummary) -> None:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TRAIN = (name,)
    cfg.SOLVER.IMS_PER_BATCH = 1  # the batch size changes no sample; one image per step reads no more than drawn
    metadata = MetadataCatalog.get(name)
    for batch in Trainer.build_train_loader(cfg):
        for sample in batch:
            image = convert_image_to_rgb(sample["image"].permute(1, 2, 0), cfg.INPUT.FORMAT)
            target = sample["instances"]
            names = metadata.get("thing_classes")
            labels = [names[c] if names else str(c) for c in target.gt_classes.tolist()]
            vis = Visualizer(image, metadata).overlay_instances(
                labels=labels,
                boxes=target.get("gt_boxes") if target.has("gt_boxes") else None,
                masks=target.get("gt_masks") if target.has("gt_masks") else None,
            )
            png = f"{len(summary.written):04d}_{Path(sample['file_name']).stem}.png"
            _save(vis.get_image(), out / png, summary)
            if len(summary.written) >= num_images:
                return


def visualize_dataset(
    cfg: CfgNode,
    output_dir: str | os.PathLike,
    source: str = "annotation",
    dataset: str | None = None,
    num_images: int = 10,
) -> DataVisSummary:
    """Draws the ground truth of ``num_images`` images of a dataset into ``output_dir`` as PNGs.

    Args:
        cfg: a detection config; its ``DATASETS.REGISTER`` entries are registered here.
        output_dir: created if needed.
        source: ``"annotation"`` (original images, the first ``num_images`` records, ``<stem>.png``) or
            ``"dataloader"`` (training samples after augmentation, in loader order, ``NNNN_<stem>.png``; an image
            may appear twice with different augmentations).
        dataset: a registered dataset name; default ``DATASETS.TRAIN[0]``.
        num_images: how many pictures to write (fewer if the dataset has fewer readable images).

    Raises:
        DatasetError: unknown source, no dataset, or missing dataset files.
    """
    if source not in SOURCES:
        raise DatasetError(f"source must be one of {SOURCES}, got {source!r}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.MAX_BAD_FRACTION = 1.0  # a data check shows what it can and names every bad file instead of stopping
    register_datasets(cfg)
    name = _dataset_name(cfg, dataset)
    if name not in DatasetCatalog.list():
        raise DatasetError(f"dataset '{name}' is not registered: add it to DATASETS.REGISTER or use a builtin name")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = DataVisSummary()
    if source == "annotation":
        _from_annotations(name, num_images, out, summary)
    else:
        _from_dataloader(cfg, name, num_images, out, summary)
    return summary
