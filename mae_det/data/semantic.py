"""Semantic-segmentation data: checked registration of label-PNG datasets, ADE20K's label conversion, the mapper.

A dataset in Detectron2's semantic format (an image folder and a folder of single-channel label PNGs with the
image's stem, values ``0..K-1`` or the ignore value) listed in ``DATASETS.REGISTER_SEM_SEG`` becomes a Detectron2
dataset without code, with ``evaluator_type`` "sem_seg". Label maps are checked when a dataset is first loaded -
for our entries and for Detectron2's builtin semantic datasets (``ade20k_sem_seg_*``) named in DATASETS.TRAIN /
TEST - because ``SemSegEvaluator`` reads them itself: a label map that is not mode "L" (a palette PNG would be
read as luminance by the mapper and as palette indices by the evaluator), whose size differs from its image with
its EXIF orientation applied, or that holds values >= K other than the ignore value, is a
one-line :class:`DatasetError` naming the file; so is an image file PIL cannot identify. Test sets are decoded
in full before a run (``decode_test_sets``), because SemSegEvaluator would only meet a truncated image after
training. A training image whose data fails to decode is skipped by the mapper and counted, within
``DATASETS.MAX_BAD_FRACTION``, as for detection.

ADE20K's raw labels are 0 = "other" and 1..150; Detectron2 trains on ``annotations_detectron2/`` where 0 became
255 (ignored) and the rest moved down by one (:func:`convert_ade20k`, ``tools/convert_ade20k.py``). Raw labels would
train a 151st class and shift every other one: they are refused.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from PIL import Image

from ..config.semantic import SEM_SEG_KEY
from .detection import (
    DatasetError, DetectionDatasetMapper, build_detection_mapper, first_files, flip_augmentations,
    image_file_problem, record_checked_images,
)
from .images import IMAGE_EXTENSIONS, ImageLoadError, _first_line, image_size

logger = logging.getLogger(__name__)

ADE20K_SPLITS = ("training", "validation")
ADE20K_NUM_CLASSES = 150
_CONVERT_HINT = "convert ADE20K-style labels (0 = other, 1..K) with tools/convert_ade20k.py"


# ---- label maps ----------------------------------------------------------------------------------------------
def check_label_map(label_file: str, image_file: str, num_classes: int, ignore_value: int) -> None:
    """Raises a one-line :class:`DatasetError` naming ``label_file`` unless it is a mode-"L" PNG of the image's
    size (EXIF orientation applied, as the mappers read images) whose values are in
    ``0..num_classes-1`` or equal ``ignore_value``."""
    try:
        with Image.open(label_file) as lab:
            mode, size = lab.mode, lab.size
            values = np.unique(np.asarray(lab)) if mode == "L" else None
        # The mapper reads the image rotated by its EXIF orientation and needs the label map in that frame.
        shown = image_size(image_file)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's errors for damaged files
        raise DatasetError(f"{label_file}: cannot read the label map or its image {image_file} "
                           f"({type(e).__name__}: {_first_line(e)})") from e
    if mode != "L":
        raise DatasetError(
            f"{label_file}: label maps must be single-channel 8-bit PNGs (mode 'L'), got mode {mode!r} "
            "(a palette PNG is read as luminance by the mapper but as indices by SemSegEvaluator)"
        )
    if size != shown:
        raise DatasetError(f"{label_file}: size {size[0]}x{size[1]} differs from its image {image_file} "
                           f"({shown[0]}x{shown[1]} with its EXIF orientation applied)")
    bad = [int(v) for v in values if v >= num_classes and v != ignore_value]
    if bad:
        hint = f"; {_CONVERT_HINT}" if max(bad) == num_classes and ignore_value not in values else ""
        raise DatasetError(f"{label_file}: label values {bad[:5]} are >= the {num_classes} classes and not the "
                           f"ignore value {ignore_value}{hint}")


def load_label_map(filename: str, dtype: type = int) -> np.ndarray:
    """(H, W) label map as SemSegEvaluator reads it (its own reader asks NumPy 2 for a no-copy array and fails)."""
    with Image.open(filename) as im:
        return np.asarray(im, dtype=dtype)


def validate_records(records: list[dict], num_classes: int, ignore_value: int, name: str) -> None:
    """Checks every record's label map (:func:`check_label_map`; several files read at once) and logs the time."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda r: check_label_map(r["sem_seg_file_name"], r["file_name"], num_classes, ignore_value),
                      records))
    logger.info(f"dataset '{name}': {len(records)} label maps checked ({num_classes} classes, ignore "
                f"{ignore_value}) in {time.perf_counter() - t0:.1f}s")


def refuse_raw_ade20k(label_root: str, key: str) -> None:
    """Raises when ``label_root`` is ADE20K's raw ``annotations/`` folder rather than ``annotations_detectron2/``."""
    parts = Path(label_root).resolve().parts
    if "ADEChallengeData2016" in parts and "annotations_detectron2" not in parts:
        raise DatasetError(f"{key}: {label_root} holds ADE20K's raw labels; {_CONVERT_HINT} and point at "
                           "annotations_detectron2/ instead")


# ---- registration ----------------------------------------------------------------------------------------
def read_class_names(classes_file: str, key: str = SEM_SEG_KEY) -> list[str]:
    """Class names, one per non-empty line of ``classes_file``."""
    if not os.path.isfile(classes_file):
        raise DatasetError(f"{key}: classes file not found: {classes_file} (one class name per line)")
    names = [line.strip() for line in Path(classes_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"{key}: classes file {classes_file} lists no class")
    if len(set(names)) != len(names):
        raise DatasetError(f"{key}: classes file {classes_file} repeats a class name")
    return names


def list_sem_seg_files(image_root: str, label_root: str, key: str = SEM_SEG_KEY) -> list[dict]:
    """Records ``{file_name, sem_seg_file_name, height, width}`` for every image (hidden files aside) with its
    ``<stem>.png`` label."""
    for what, folder in (("image", image_root), ("label", label_root)):
        if not os.path.isdir(folder):
            raise DatasetError(f"{key}: {what} folder not found: {folder}")
    # Hidden names are not images: macOS copies leave "._<name>" metadata twins beside every file.
    images = sorted(p for p in Path(image_root).iterdir()
                    if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not images:
        raise DatasetError(f"{key}: no image files in {image_root}")
    records = []
    for p in images:
        label = Path(label_root) / f"{p.stem}.png"
        if not label.is_file():
            raise DatasetError(f"{label}: label map of image {p} not found")
        try:
            # The size the mappers check the record against: they apply the EXIF orientation.
            width, height = image_size(p)
        except ImageLoadError as e:  # not an image despite its name, unreadable
            raise DatasetError(f"{e}; {key} lists every image file of {image_root}") from e
        records.append({"file_name": str(p), "sem_seg_file_name": str(label), "height": height, "width": width})
    return records


# name -> checked records, so the label maps are read once per process.
_CHECKED: dict[str, list[dict]] = {}
_REGISTERED: dict[str, tuple[str, str, str]] = {}


def load_sem_seg_dataset(name: str, image_root: str, label_root: str, num_classes: int, ignore_value: int) -> list[dict]:
    """DatasetCatalog loader of a ``DATASETS.REGISTER_SEM_SEG`` entry: lists and checks the files (once)."""
    if name not in _CHECKED:
        records = list_sem_seg_files(image_root, label_root, key=f"dataset '{name}' in {SEM_SEG_KEY}")
        validate_records(records, num_classes, ignore_value, name)
        _CHECKED[name] = records
    record_checked_images(name, image_root, len(_CHECKED[name]))
    return [dict(r) for r in _CHECKED[name]]


def register_sem_seg_dataset(name: str, image_root: str, label_root: str, classes_file: str,
                             ignore_value: int = 255) -> None:
    """Registers a semantic dataset (re-registering our own name with new paths is allowed)."""
    image_root, label_root, classes_file = (os.path.expanduser(os.path.expandvars(p))
                                            for p in (image_root, label_root, classes_file))
    key = f"dataset '{name}' in {SEM_SEG_KEY}"
    refuse_raw_ade20k(label_root, key)
    classes = read_class_names(classes_file, key)
    paths = (image_root, label_root, classes_file)
    if name in DatasetCatalog.list():
        if name not in _REGISTERED:
            raise DatasetError(f"{SEM_SEG_KEY} name '{name}' is already a Detectron2 dataset (builtin?): choose another")
        if _REGISTERED[name] == paths:
            return
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        _CHECKED.pop(name, None)
    DatasetCatalog.register(name, partial(load_sem_seg_dataset, name, image_root, label_root, len(classes), ignore_value))
    MetadataCatalog.get(name).set(stuff_classes=classes, image_root=image_root, sem_seg_root=label_root,
                                  evaluator_type="sem_seg", ignore_label=ignore_value)
    _REGISTERED[name] = paths


def check_sem_seg_test_images(name: str, records: list[dict]) -> None:
    """Decodes every image of a semantic test set (several at once) as the mapper does, and raises a one-line
    :class:`DatasetError` naming the first that fail or differ from the record's size (which its label map was
    checked against): SemSegEvaluator scores every image, and would meet a bad one after training."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        found = pool.map(lambda r: image_file_problem(r["file_name"], r.get("height"), r.get("width"), decode=True,
                                                      declared_by="its label map is"), records)
        problems = [p[1] for p in found if p is not None]
    if problems:
        raise DatasetError(f"dataset '{name}' (DATASETS.TEST): {len(problems)} of {len(records)} images cannot be "
                           f"decoded or are not the size of their label map; a test set must be complete: "
                           f"{first_files(problems)}")


def check_sem_seg_dataset(name: str, key: str, *, decode_images: bool = False) -> None:
    """Loads a registered semantic dataset once and checks its label maps (builtin ones too); raw ADE20K is
    refused with the conversion to run. ``decode_images``: also decode every image (a test set,
    :func:`check_sem_seg_test_images`)."""
    meta = MetadataCatalog.get(name)
    if meta.get("evaluator_type") != "sem_seg":
        return
    if name not in _CHECKED:
        _load_checked(name, key, meta)
    if decode_images:
        check_sem_seg_test_images(name, _CHECKED[name])


def _load_checked(name: str, key: str, meta: Any) -> None:
    """Loads a semantic dataset into ``_CHECKED`` (its label maps checked), or raises naming what is wrong."""
    label_root = meta.get("sem_seg_root")
    if label_root and not os.path.isdir(label_root):
        raw = Path(label_root).parent.parent / "annotations"
        hint = f"; {_CONVERT_HINT}" if "annotations_detectron2" in label_root and raw.is_dir() else ""
        raise DatasetError(f"dataset '{name}' in {key}: label folder not found: {label_root}{hint}")
    if label_root:
        refuse_raw_ade20k(label_root, f"dataset '{name}' in {key}")
    try:
        records = DatasetCatalog.get(name)
    except (AssertionError, FileNotFoundError) as e:  # Detectron2's load_sem_seg asserts on unmatched files
        raise DatasetError(f"dataset '{name}' in {key}: {' '.join(str(e).split()) or type(e).__name__}") from e
    if name not in _CHECKED:  # a builtin loader: check its records here
        validate_records(records, len(meta.stuff_classes), meta.get("ignore_label", 255), name)
        _CHECKED[name] = records
        record_checked_images(name, meta.get("image_root", name), len(records))


def register_sem_seg_datasets(cfg: CfgNode, *, decode_test_sets: bool = False, training: bool = True) -> None:
    """Registers every ``DATASETS.REGISTER_SEM_SEG`` entry and checks the semantic datasets of TRAIN / TEST;
    ``decode_test_sets``: also decode every image of the TEST sets (before a training or evaluation run);
    ``training`` False (``--eval-only``): the TRAIN sets are not checked."""
    for name, image_root, label_root, classes_file in cfg.DATASETS.REGISTER_SEM_SEG:
        register_sem_seg_dataset(name, image_root, label_root, classes_file, cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
    for key in ("TRAIN", "TEST") if training else ("TEST",):
        for name in cfg.DATASETS.get(key):
            if name in DatasetCatalog.list():
                check_sem_seg_dataset(name, f"DATASETS.{key}", decode_images=decode_test_sets and key == "TEST")


def check_sem_seg_classes(cfg: CfgNode, dataset_names: list[str] | tuple[str, ...]) -> None:
    """Raises unless a semantic dataset's class count equals ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` (SemSegEvaluator
    counts the dataset's classes; a larger model would predict ids it cannot score)."""
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("stuff_classes")
        if classes is not None and len(classes) != cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES:
            raise DatasetError(f"dataset '{name}' has {len(classes)} classes but MODEL.SEM_SEG_HEAD.NUM_CLASSES is "
                               f"{cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}: set it to {len(classes)}")


def check_task_datasets(cfg: CfgNode) -> None:
    """Checks, before any training, what would otherwise fail only at evaluation: every
    ``DATASETS.TEST`` set is scored by the model's task (a semantic set by a ``SemanticSegmentor``, any other by a
    detector), and a semantic test set has ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` classes (one image per step with a
    batch-normed 1x1 pooling bin is refused at config load, :func:`~mae_det.config.semantic.validate_sem_seg_config`).

    Raises:
        DatasetError: one line naming the dataset or the keys to change.
    """
    semantic = is_semantic(cfg)
    for name in cfg.DATASETS.TEST:
        kind = MetadataCatalog.get(name).get("evaluator_type")
        if (kind == "sem_seg") != semantic:
            model = "a semantic segmentation model" if semantic else "a detector"
            raise DatasetError(f"dataset '{name}' (DATASETS.TEST) is a {'semantic' if kind == 'sem_seg' else kind} "
                               f"dataset but MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE} is {model}: "
                               "test on a dataset of the model's task")
    if not semantic:
        return
    check_sem_seg_classes(cfg, cfg.DATASETS.TEST)


# ---- ADE20K ------------------------------------------------------------------------------------------------
def convert_ade20k_label(label: np.ndarray) -> np.ndarray:
    """Raw ADE20K labels (0 = other, 1..150) -> Detectron2's (0 -> 255 ignored, k -> k - 1), uint8."""
    return (label.astype(np.int16) - 1).astype(np.uint8)  # 0 - 1 wraps to 255


def convert_ade20k(root: str | os.PathLike, overwrite: bool = False) -> dict[str, int]:
    """Writes ``root/annotations_detectron2/{training,validation}/*.png`` from ``root/annotations/...``.

    Args:
        root: the ``ADEChallengeData2016`` folder.
        overwrite: replace existing converted files.

    Returns:
        Files written per split.

    Raises:
        DatasetError: a missing split folder, a label file that cannot be read, or a raw label outside 0..150
            (already converted?).
    """
    root = Path(root)
    counts = {}
    for split in ADE20K_SPLITS:
        src, dst = root / "annotations" / split, root / "annotations_detectron2" / split
        if not src.is_dir():
            raise DatasetError(f"ADE20K raw label folder not found: {src} (expected ADEChallengeData2016/annotations/{split})")
        dst.mkdir(parents=True, exist_ok=True)
        n = 0
        for f in sorted(src.glob("*.png")):
            out = dst / f.name
            if out.exists() and not overwrite:
                continue
            try:
                with Image.open(f) as im:
                    label = np.asarray(im)
            except Image.UnidentifiedImageError as e:
                raise DatasetError(f"{f}: cannot read the raw ADE20K label map: not a recognized image format") from e
            except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a truncated or damaged file
                raise DatasetError(f"{f}: cannot read the raw ADE20K label map ({type(e).__name__}: "
                                   f"{_first_line(e)})") from e
            if label.ndim != 2 or label.max() > ADE20K_NUM_CLASSES:
                raise DatasetError(f"{f}: expected a raw ADE20K label map (one channel, values 0..150), got shape "
                                   f"{label.shape} max {label.max()} - already converted?")
            # Written under another name first: an interrupted run must not leave a partial file that a rerun keeps.
            part = out.with_name(f".{out.name}.part")
            Image.fromarray(convert_ade20k_label(label), mode="L").save(part, format="PNG")
            os.replace(part, out)
            n += 1
        counts[split] = n
    return counts


# ---- mapper ---------------------------------------------------------------------------------------------
def is_semantic(cfg: CfgNode) -> bool:
    """True when ``MODEL.META_ARCHITECTURE`` is a ``SemanticSegmentor`` (or a subclass)."""
    arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    return isinstance(arch, type) and issubclass(arch, SemanticSegmentor)


def build_sem_seg_mapper(cfg: CfgNode, is_train: bool) -> DatasetMapper:
    """The detection mapper (its image decoding) with semantic augmentations: training resizes the short side to one
    of ``INPUT.MIN_SIZE_TRAIN`` (long side at most ``MAX_SIZE_TRAIN``), crops ``INPUT.CROP.SIZE`` with no class over
    ``CROP.SINGLE_CATEGORY_MAX_AREA`` of it (when ``CROP.ENABLED``), and flips; testing resizes as
    ``MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``."""
    if not is_train:
        resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
        return DetectionDatasetMapper(cfg, False, augmentations=[resize])
    augs: list[T.Augmentation] = [T.ResizeShortestEdge(
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    )]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop_CategoryAreaConstraint(
            cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
            cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        ))
    augs += flip_augmentations(cfg)
    # The detection mapper's training path: an image that fails to decode is skipped and counted, not a crash.
    return DetectionDatasetMapper(cfg, True, augmentations=augs)


def build_mapper(cfg: CfgNode, is_train: bool) -> DatasetMapper:
    """The semantic mapper for a ``SemanticSegmentor`` config, the detection mapper otherwise."""
    return build_sem_seg_mapper(cfg, is_train) if is_semantic(cfg) else build_detection_mapper(cfg, is_train)
