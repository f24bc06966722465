"""Pictures of a detection dataset's ground truth, raw or as the trainer sees it, to check data before a long run.

Two sources, as Detectron2's ``tools/visualize_data.py``:

- ``annotation``: the registered dataset's records drawn on the original images;
- ``dataloader``: samples of the training data loader of the config (the trainer's own mapper: LSJ or resize,
  flips, masks rasterized or cropped), drawn on the augmented images.

Pictures are drawn as ``tools/predict.py`` draws detections (:func:`~mae_det.engine.predictor.draw_instances`):
enlarged by an integer factor to at least ``MIN_SIDE`` pixels on the shorter side, one fixed colour per class. Only
the drawn dataset is registered and checked: another set of the config may be missing.

Either way every image that could not be drawn is named in the summary: those the dataset's load check skipped
(missing, unreadable header, not the declared size) and those that failed to decode when drawn. A dataset none of
whose images can be drawn is a :class:`DatasetError`, as is an output folder among the dataset's images; an output
path that is a file is a :class:`ConfigError`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.data.detection_utils import convert_image_to_rgb
from detectron2.structures import BitMasks, BoxMode, Instances, PolygonMasks
from PIL import Image

from ..data.detection import (
    SKIPPED_IMAGES_KEY, DatasetError, check_dataset_files, first_files, image_file_problem, load_report,
    register_datasets,
)
from ..data.images import ImageLoadError, load_image
from ..engine.det_trainer import Trainer
from ..engine.predictor import check_output_dir, draw_instances, segmentation_masks, unique_png_names

logger = logging.getLogger(__name__)

SOURCES = ("annotation", "dataloader")
MIN_SIDE = 256  # pictures' shorter side at least (integer enlargement): at 64 px the labels would hide the objects


@dataclass
class DataVisSummary:
    """Files written by :func:`visualize_dataset` and the images that could not be drawn (path, reason): skipped
    by the dataset's load check, then those that failed to decode, each file once."""

    written: list[Path] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def add_failure(self, line: str) -> None:
        """Records a "path: problem" line (the form of the load report and the mapper's notes) once."""
        path, _, problem = line.partition(": ")
        if (path, problem) not in self.failures:
            self.failures.append((path, problem))


def _dataset_name(cfg: CfgNode, dataset: str | None) -> str:
    if dataset:
        return dataset
    if not cfg.DATASETS.TRAIN:
        raise DatasetError("DATASETS.TRAIN is empty: name a dataset with --dataset")
    return cfg.DATASETS.TRAIN[0]


def _save(image: np.ndarray, path: Path, summary: DataVisSummary) -> None:
    Image.fromarray(image).save(path)
    summary.written.append(path)


def _draw(image: np.ndarray, metadata: Metadata, classes: list[int], boxes: np.ndarray,
          masks: np.ndarray | None) -> np.ndarray:
    """Ground truth drawn as predictions are: enlarged to ``MIN_SIDE``, each class in its own fixed colour (named
    ``k`` when the dataset's loader records no class names)."""
    names = metadata.get("thing_classes") or [str(k) for k in range(max(classes, default=-1) + 1)]
    return draw_instances(image, Metadata(thing_classes=list(names)), classes, boxes, masks, min_side=MIN_SIDE)


def _record_instances(record: dict, height: int, width: int) -> tuple[list[int], np.ndarray, np.ndarray | None]:
    """(classes, (N, 4) XYXY boxes, (N, H, W) masks or None) of a dataset record's annotations."""
    anns = record.get("annotations", [])
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
    masks = segmentation_masks([a.get("segmentation") for a in anns], height, width)
    return [a["category_id"] for a in anns], np.array(boxes, dtype=np.float64).reshape(-1, 4), masks


def _sample_instances(target: Instances) -> tuple[list[int], np.ndarray | None, np.ndarray | None]:
    """(classes, boxes, masks) of a training sample's ``instances`` (polygon masks rasterized)."""
    masks = target.get("gt_masks") if target.has("gt_masks") else None
    if isinstance(masks, PolygonMasks):
        masks = BitMasks.from_polygon_masks(masks, *target.image_size)
    return target.gt_classes.tolist(), target.gt_boxes.tensor.numpy(), None if masks is None else masks.tensor.numpy()


def _check_output(out: Path, name: str, image_files: Iterable[str] = ()) -> None:
    """Refuses an output folder in the dataset's image folder or holding one of its images: a picture
    ``<stem>.png`` would replace the image ``<stem>.png``, and an image folder listed recursively (pretraining
    sources) would take the pictures for data."""
    root = MetadataCatalog.get(name).get("image_root", None)
    resolved = out.resolve()
    if root and resolved.is_relative_to(Path(root).resolve()):
        raise DatasetError(f"--output {out} is in the image folder {root} of dataset '{name}': the pictures would "
                           "be written among (and over) its images; choose another --output")
    folders = {os.path.dirname(f): f for f in image_files}  # resolved once per folder: datasets are large
    clash = next((f for folder, f in folders.items() if Path(folder or ".").resolve() == resolved), None)
    if clash is not None:
        raise DatasetError(f"--output {out} holds images of dataset '{name}' (e.g. {clash}): the pictures would be "
                           "written among (and over) them; choose another --output")


def _failed_image_files(summary: DataVisSummary) -> list[str]:
    """The image files among the failures (a bad json image entry is named by the json's path)."""
    return [path for path, problem in summary.failures if not problem.startswith("image entry #")]


def _add_load_failures(name: str, summary: DataVisSummary) -> None:
    """Names the images that the latest load of ``name`` skipped for their file (named, not drawn)."""
    report = load_report(name)
    for line in report.bad_files if report else ():
        summary.add_failure(line)


def _from_annotations(name: str, num_images: int, out: Path, summary: DataVisSummary) -> None:
    records = DatasetCatalog.get(name)
    metadata = MetadataCatalog.get(name)
    _add_load_failures(name, summary)
    _check_output(out, name, [r["file_name"] for r in records] + _failed_image_files(summary))
    out.mkdir(parents=True, exist_ok=True)
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
        _save(_draw(image, metadata, *_record_instances(record, *image.shape[:2])), out / png, summary)


def _undecodable(name: str) -> tuple[list[str], int]:
    """("path: problem" lines of the images of ``name`` that the training mapper cannot use, number of images)."""
    records = DatasetCatalog.get(name)
    problems = (image_file_problem(r["file_name"], r.get("height"), r.get("width"), decode=True) for r in records)
    return [p[1] for p in problems if p is not None], len(records)


def _from_dataloader(cfg: CfgNode, name: str, num_images: int, out: Path, summary: DataVisSummary) -> None:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TRAIN = (name,)
    cfg.SOLVER.IMS_PER_BATCH = 1  # the batch size changes no sample; one image per step reads no more than drawn
    metadata = MetadataCatalog.get(name)
    batches = iter(Trainer.build_train_loader(cfg))
    _add_load_failures(name, summary)
    _check_output(out, name, _failed_image_files(summary))
    out.mkdir(parents=True, exist_ok=True)
    while len(summary.written) < num_images:
        try:
            batch = next(batches)
        except (RuntimeError, ValueError) as e:
            # The loader gives up on a run of undecodable images (the seeded loader after MAX_TRIES in a row,
            # Detectron2's once no index is left): one error line when the images explain it, else the failure.
            bad, total = _undecodable(name)
            if not bad:
                raise
            for line in bad:
                summary.add_failure(line)
            raise DatasetError(f"dataset '{name}': the data loader could not draw a sample, {len(bad)} of its "
                               f"{total} images cannot be decoded: {first_files(bad)}") from e
        for sample in batch:
            for line in sample.pop(SKIPPED_IMAGES_KEY, ()):  # images the mapper skipped before this one
                summary.add_failure(line)
            image = convert_image_to_rgb(sample["image"].permute(1, 2, 0), cfg.INPUT.FORMAT)
            png = f"{len(summary.written):04d}_{Path(sample['file_name']).stem}.png"
            _save(_draw(image, metadata, *_sample_instances(sample["instances"])), out / png, summary)
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
        ConfigError: ``output_dir`` is a file or lies below one (before anything is read).
        DatasetError: unknown source, no dataset, missing files of the drawn dataset, an ``output_dir`` in the
            dataset's image folder or holding its images, or no image that can be drawn.
    """
    if source not in SOURCES:
        raise DatasetError(f"source must be one of {SOURCES}, got {source!r}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    out = check_output_dir(output_dir, ())
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.MAX_BAD_FRACTION = 1.0  # a data check shows what it can and names every bad file instead of stopping
    name = _dataset_name(cfg, dataset)
    # Every DATASETS.REGISTER entry is registered, only the drawn set checked: a data check of one set must not stop
    # at another (a test set not on this machine), nor the loader compare its classes with the test sets'.
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    register_datasets(cfg)
    if name not in DatasetCatalog.list():
        raise DatasetError(f"dataset '{name}' is not registered: add it to DATASETS.REGISTER or use a builtin name")
    check_dataset_files(name, "--dataset", cfg.DATASETS.MAX_BAD_FRACTION)
    _check_output(out, name)  # before the (slow) load: the folder the dataset's metadata names
    summary = DataVisSummary()
    if source == "annotation":
        _from_annotations(name, num_images, out, summary)
    else:
        _from_dataloader(cfg, name, num_images, out, summary)
    if not summary.written and summary.failures:
        raise DatasetError(f"dataset '{name}': none of its images could be drawn, {len(summary.failures)} are "
                           f"missing, unreadable or not the declared size: "
                           f"{first_files([f'{p}: {why}' for p, why in summary.failures])}")
    return summary
