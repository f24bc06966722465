"""Detection data: checked registration of COCO-format datasets and the Large Scale Jitter (LSJ) mapper.

Any COCO-format json + image root listed in ``DATASETS.REGISTER`` becomes a Detectron2 dataset without code
changes. The json is parsed by :func:`parse_coco_instances`, which turns hostile content into counted, logged
skips (annotations of unknown images, polygons with < 3 points, zero/negative-size boxes, boxes entirely outside
their image, RLEs that do not fit their image, ...) or one-line :class:`DatasetError` messages (missing file,
invalid json, missing sections). Boxes crossing the image border are clipped to it. An image entry that is
malformed (an ``id`` that is not an integer, a missing or non-integral size; 128.0 reads as 128) or whose ``id``
another entry repeats is skipped with its annotations and counted as a bad image, like a bad file below.
Detectron2's builtin names (``coco_2017_train`` ...) are checked for their files under ``DETECTRON2_DATASETS``.

Image files are checked against the json when a dataset is loaded (ours, and Detectron2's builtin COCO sets),
from their headers (~0.1 ms per file): missing, not an image, or not the declared height x width as the mapper
will see it (EXIF orientation applied). Such images are skipped and named in the load report;
more of them than ``DATASETS.MAX_BAD_FRACTION`` is a one-line :class:`DatasetError`. Test sets are stricter,
because skipping an image would change the AP: every image is decoded up front, as the mapper decodes it, and any
bad one (or bad image entry) is an error. A training image whose header is fine but whose data is not (truncated,
beyond the image loader's pixel limit) is skipped by :class:`DetectionDatasetMapper` when it fails to decode; the
trainer counts it.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, PolygonMasks

from .images import DEFAULT_MAX_PIXELS, ImageLoadError, image_size, load_image, load_image_and_file_size

logger = logging.getLogger(__name__)

MISSING_IMAGE = "images whose file is missing"
MALFORMED_IMAGE_ENTRY = "malformed image entries"
DUPLICATE_IMAGE_ID = "image entries with a repeated id"
UNREADABLE_IMAGE = "unreadable images"
WRONG_SIZE_IMAGE = "images whose size differs from the json"
# Key of a mapped training dict that carries the files the mapper skipped since its previous output.
SKIPPED_IMAGES_KEY = "skipped_images"
_NAMED_FILES = 3  # bad files named in a log line or an error


class DatasetError(ValueError):
    """A dataset cannot be used; the one-line message names the file and the key or variable to fix."""


@dataclass
class CocoLoadReport:
    """What :func:`parse_coco_instances` kept and what it skipped (reason -> count).

    ``bad_files`` holds one "path: problem" line per image skipped: for its json entry (malformed, or its id
    repeated; the path is the json's), in json order, then for its file (missing, unreadable, wrong size), in image
    id order. ``masks``: whether the json has segmentations (None: not parsed here, e.g. a Detectron2 builtin set);
    ``rle_instances``: kept non-crowd instances whose mask is an RLE; ``clipped_boxes``: kept boxes that crossed
    the image border, clipped to it.
    """

    json_file: str
    images: int = 0
    annotations: int = 0
    skipped: Counter = field(default_factory=Counter)
    bad_files: list[str] = field(default_factory=list)
    masks: bool | None = None
    rle_instances: int = 0
    clipped_boxes: int = 0

    def summary(self) -> str:
        line = f"{self.json_file}: {self.images} images, {self.annotations} annotations"
        if self.clipped_boxes:
            line += f" ({self.clipped_boxes} boxes clipped to their image)"
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
            line += f"; skipped {sum(self.skipped.values())}: {reasons}"
        if self.bad_files:
            line += f"; first bad files: {first_files(self.bad_files)}"
        return line


def first_files(problems: list[str]) -> str:
    """The first few "path: problem" lines, joined for a one-line message."""
    more = len(problems) - _NAMED_FILES
    return " | ".join(problems[:_NAMED_FILES]) + (f" | and {more} more" if more > 0 else "")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite_numbers(xs: Any, length: int | None = None) -> bool:
    return (
        isinstance(xs, (list, tuple))
        and (length is None or len(xs) == length)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in xs)
    )


def _read_coco_json(json_file: str, key_hint: str) -> dict:
    if not os.path.isfile(json_file):
        raise DatasetError(f"COCO json not found: {json_file} ({key_hint})")
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{json_file} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read COCO json {json_file}: {e}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{json_file}: top level must be an object with 'images' and 'categories'")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{json_file}: '{key}' must be a list (COCO instances format)")
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{json_file}: 'annotations' must be a list")
    return data


def _categories(data: dict, json_file: str) -> dict[int, str]:
    cats: dict[int, str] = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise DatasetError(f"{json_file}: every category needs an integer 'id' and a string 'name', got {c!r:.80}")
        if c["id"] in cats:
            raise DatasetError(f"{json_file}: category id {c['id']} appears twice")
        cats[c["id"]] = c["name"]
    if not cats:
        raise DatasetError(f"{json_file}: 'categories' is empty")
    return cats


def _class_lists(cats: dict[int, str]) -> tuple[list[str], dict[int, int]]:
    """(thing_classes, dataset_id_to_contiguous_id) of a json's categories: ids mapped to 0..K-1 in id order."""
    return [cats[cid] for cid in sorted(cats)], {cid: i for i, cid in enumerate(sorted(cats))}


def _rle_run_lengths(counts: Any) -> list[int] | None:
    """The run lengths of an RLE's ``counts``: a list of integers, or COCO's compressed string, in which each
    length is written 5 bits a character (ASCII 48 + bits, 0x20 marks that more characters follow, 0x10 in the last
    one is the sign) and every length after the first three as its difference to the one two places before. None
    when ``counts`` is neither.
    """
    if isinstance(counts, list):
        return counts if all(_is_int(c) for c in counts) else None
    if isinstance(counts, str):
        counts = counts.encode("ascii", "replace")
    if not isinstance(counts, bytes):
        return None
    lengths: list[int] = []
    value = shift = 0
    for byte in counts:
        bits = byte - 48
        if not 0 <= bits < 64:
            return None
        value |= (bits & 0x1F) << shift
        shift += 5
        if bits & 0x20:
            continue
        if bits & 0x10:
            value -= 1 << shift
        lengths.append(value + lengths[-2] if len(lengths) > 2 else value)
        value = shift = 0
    return None if shift else lengths


def _clean_segmentation(segm: Any, height: int, width: int, skipped: Counter) -> Any:
    """Valid polygons or a compressed RLE for one annotation, or None (reason counted in ``skipped``)."""
    if isinstance(segm, list):
        if segm and _finite_numbers(segm):
            skipped["segmentation is a flat list, expected a list of polygons"] += 1
            return None
        polys = [p for p in segm if _finite_numbers(p) and len(p) % 2 == 0 and len(p) >= 6]
        if not polys:
            skipped["polygons with < 3 points"] += 1
            return None
        if len(polys) < len(segm):
            skipped["polygon parts with < 3 points dropped (instance kept)"] += 1
        return [[float(v) for v in p] for p in polys]
    if isinstance(segm, dict):
        size = segm.get("size")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and list(size) == [height, width]):
            skipped["RLE masks whose size differs from the image"] += 1
            return None
        # pycocotools decodes runs that cover less than the image into uninitialized memory (a different mask on
        # every read) and fails mid-training on runs that cover more: the runs must tile the image exactly.
        runs = _rle_run_lengths(segm.get("counts"))
        if runs is None or any(r < 0 for r in runs) or sum(runs) != height * width:
            skipped["malformed RLE masks"] += 1
            return None
        try:
            rle = mask_util.frPyObjects(segm, height, width) if isinstance(segm.get("counts"), list) else dict(segm)
            mask_util.area(rle)
        except Exception:
            skipped["malformed RLE masks"] += 1
            return None
        return rle
    skipped["malformed segmentations"] += 1
    return None


def image_file_problem(path: str, height: int | None, width: int | None, *, decode: bool = False,
                       declared_by: str = "the json declares") -> tuple[str, str] | None:
    """Why :class:`DetectionDatasetMapper` could not use this image as the json declares it, or None when it can.

    Args:
        path: the image file.
        height, width: the declared size (None: not checked).
        decode: decode the image as the mapper does (:func:`~mae_det.data.images.load_image`) instead of reading
            the header only: finds truncated data, damaged EXIF blocks and images beyond the loader's pixel limit.
        declared_by: who declared the size, for the message.

    Returns:
        None, or (reason, one line starting with the path): the file is missing, unreadable (the image
        loader's message) or, after EXIF orientation, not the declared size.
    """
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in the json's file_name
        return MISSING_IMAGE, f"{path}: file not found"
    except OSError as e:
        return UNREADABLE_IMAGE, f"{path}: cannot access file ({e.strerror or e})"
    try:
        if decode:
            image, size = load_image_and_file_size(path)
        else:
            size = image_size(path)
    except ImageLoadError as e:
        return UNREADABLE_IMAGE, str(e)
    if decode and image.size != size:  # a JPEG beyond the pixel limit, decoded downscaled
        return UNREADABLE_IMAGE, (f"{path}: {size[0]}x{size[1]} = {size[0] * size[1]} pixels exceeds the image "
                                  f"loader's limit of {DEFAULT_MAX_PIXELS}; downscale the file")
    if height is not None and width is not None and size != (width, height):
        return WRONG_SIZE_IMAGE, (f"{path}: the file is {size[0]}x{size[1]} (width x height, EXIF orientation "
                                  f"applied) but {declared_by} {width}x{height}")
    return None


def filter_image_files(records: list[dict], report: CocoLoadReport, *, decode: bool = False) -> list[dict]:
    """The dataset dicts whose image file the mapper can read at the declared size; the others are counted in
    ``report`` (by reason, with their annotations) and named in ``report.bad_files``.

    Args:
        records: Detectron2 dataset dicts (``file_name``, and ``height``/``width`` when declared).
        report: the load report to count in.
        decode: decode every image instead of reading its header.
    """
    kept = []
    for r in records:
        problem = image_file_problem(r["file_name"], r.get("height"), r.get("width"), decode=decode)
        if problem is None:
            kept.append(r)
            continue
        report.skipped[problem[0]] += 1
        report.bad_files.append(problem[1])
        if r.get("annotations"):
            report.skipped["annotations of images skipped for their file"] += len(r["annotations"])
    return kept


def _integral(x: Any) -> int | None:
    """``x`` as an int when it is one or a float with an integral value (exporters through pandas write 128.0)."""
    if _is_int(x):
        return x
    return int(x) if isinstance(x, float) and x.is_integer() else None


def _image_entry_problem(entry: Any) -> str | None:
    """What makes one entry of a COCO json's ``images`` unusable, or None."""
    if not isinstance(entry, dict):
        return f"expected an object with 'id', 'file_name', 'height' and 'width', got {entry!r:.60}"
    for key, ok, expected in (
        ("id", _is_int(entry.get("id")), "an integer"),
        ("file_name", isinstance(entry.get("file_name"), str), "a string"),
        ("height", (_integral(entry.get("height")) or 0) > 0, "a positive integer"),
        ("width", (_integral(entry.get("width")) or 0) > 0, "a positive integer"),
    ):
        if key not in entry:
            return f"'{key}' is missing"
        if not ok:
            return f"'{key}' must be {expected}, got {entry[key]!r:.60}"
    return None


def _image_entries(entries: list, json_file: str, report: CocoLoadReport) -> tuple[dict[int, dict], set[int]]:
    """The usable entries of a COCO json's ``images`` by id (integral float sizes made ints), and the integer ids
    of the skipped ones. A malformed entry, and every entry whose id another one repeats (their annotations could
    belong to any of them), is counted in ``report`` and named in ``report.bad_files`` as
    "<json>: image entry #<1-based position>: <problem>", so that the bad-image budget, and a test set's
    completeness, count it.
    """
    positions: dict[int, list[int]] = {}
    for i, e in enumerate(entries, 1):
        if isinstance(e, dict) and _is_int(e.get("id")):
            positions.setdefault(e["id"], []).append(i)
    images: dict[int, dict] = {}
    skipped_ids: set[int] = set()
    for i, e in enumerate(entries, 1):
        problem, reason = _image_entry_problem(e), MALFORMED_IMAGE_ENTRY
        if problem is None and len(positions[e["id"]]) > 1:
            others = ", ".join(f"#{j}" for j in positions[e["id"]] if j != i)
            problem = f"id {e['id']} is also the id of image entry {others} (all skipped)"
            reason = DUPLICATE_IMAGE_ID
        if problem is None:
            images[e["id"]] = {**e, "height": _integral(e["height"]), "width": _integral(e["width"])}
            continue
        report.skipped[reason] += 1
        report.bad_files.append(f"{json_file}: image entry #{i}: {problem}")
        if isinstance(e, dict) and _is_int(e.get("id")):
            skipped_ids.add(e["id"])
    return images, skipped_ids


def parse_coco_instances(
    json_file: str, image_root: str, key_hint: str = "set the path in DATASETS.REGISTER", *, decode: bool = False,
    mask_on: bool = True,
) -> tuple[list[dict], list[str], dict[int, int], CocoLoadReport]:
    """Reads a COCO instances json into Detectron2 dataset dicts, skipping what cannot be trained on.

    Category ids may be any distinct integers: they are mapped to ``0..K-1`` in id order (as Detectron2 does);
    images without annotations are kept (training filters them per ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``);
    crowd annotations (RLE, compressed or not) are kept for evaluation. Boxes that cross the image border are
    clipped to it (as training clips them), so that evaluation's ground truth is what a detection can match. Image
    entries that are malformed or whose id another entry repeats, and images whose file is missing, unreadable or
    not the declared size (see :func:`image_file_problem`) are skipped and named in the report;
    :func:`check_bad_images` decides whether that many is acceptable.

    Args:
        json_file: path of the COCO-format json.
        image_root: folder that ``file_name`` entries are relative to.
        key_hint: what to change when the paths are wrong, appended to the error message.
        decode: decode every image instead of reading headers (slow: for test sets).
        mask_on: the model predicts masks (``MODEL.MASK_ON``); False drops the segmentations and keeps the
            annotations that have none.

    Returns:
        (records, thing_classes, dataset_id_to_contiguous_id, report).

    Raises:
        DatasetError: missing/unreadable/invalid json, missing image root, missing sections, bad categories.
    """
    data = _read_coco_json(json_file, key_hint)
    if not os.path.isdir(image_root):
        raise DatasetError(f"image root not found: {image_root} ({key_hint})")
    thing_classes, id_map = _class_lists(_categories(data, json_file))
    report = CocoLoadReport(json_file)
    skipped = report.skipped

    images, skipped_ids = _image_entries(data["images"], json_file, report)

    anns = [a for a in data.get("annotations", []) if isinstance(a, dict)]
    if len(anns) < len(data.get("annotations", [])):
        skipped["malformed annotations"] += len(data.get("annotations", [])) - len(anns)
    report.masks = any(a.get("segmentation") for a in anns)
    # A dataset with masks needs one for every instance (Detectron2 batches them together).
    with_masks = mask_on and report.masks
    per_image: dict[int, list[dict]] = {i: [] for i in images}
    for a in anns:
        if _is_int(a.get("image_id")) and a["image_id"] in skipped_ids:
            skipped["annotations of skipped image entries"] += 1
            continue
        img = images.get(a.get("image_id")) if _is_int(a.get("image_id")) else None
        if img is None:
            skipped["annotations whose image_id is not among the images"] += 1
            continue
        if not _is_int(a.get("category_id")) or a["category_id"] not in id_map:
            skipped["annotations whose category_id is not among the categories"] += 1
            continue
        if a.get("ignore", 0):
            skipped["annotations marked ignore"] += 1
            continue
        iscrowd = a.get("iscrowd", 0)
        if not (isinstance(iscrowd, int) and iscrowd in (0, 1)):  # "0" would read as crowd, silently
            skipped["malformed iscrowd (expected 0, 1, true or false)"] += 1
            continue
        bbox = a.get("bbox")
        if not _finite_numbers(bbox, 4):
            skipped["malformed boxes"] += 1
            continue
        if bbox[2] <= 0 or bbox[3] <= 0:
            skipped["zero/negative-size boxes"] += 1
            continue
        # Training clips such a box to nothing and drops it, but evaluation would count it as an object that no
        # detection can match, lowering recall and AP. Boxes that only cross the border are kept, clipped: training
        # clips them too, and evaluation would match the clipped detections against the unclipped box.
        if bbox[0] >= img["width"] or bbox[1] >= img["height"] or bbox[0] + bbox[2] <= 0 or bbox[1] + bbox[3] <= 0:
            skipped["boxes entirely outside their image"] += 1
            continue
        x0, y0 = max(bbox[0], 0), max(bbox[1], 0)
        x1, y1 = min(bbox[0] + bbox[2], img["width"]), min(bbox[1] + bbox[3], img["height"])
        box = [float(v) for v in (x0, y0, x1 - x0, y1 - y0)]
        report.clipped_boxes += box != [float(v) for v in bbox]
        obj = {
            "bbox": box,
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": id_map[a["category_id"]],
            "iscrowd": int(iscrowd),
        }
        if with_masks:
            if not a.get("segmentation"):
                skipped["annotations without a mask in a dataset with masks"] += 1
                continue
            segm = _clean_segmentation(a["segmentation"], img["height"], img["width"], skipped)
            if segm is None:
                continue
            obj["segmentation"] = segm
            report.rle_instances += isinstance(segm, dict) and not obj["iscrowd"]
        per_image[img["id"]].append(obj)

    records = []
    for image_id in sorted(images):
        img = images[image_id]
        records.append({
            "file_name": os.path.join(image_root, img["file_name"]),
            "height": img["height"],
            "width": img["width"],
            "image_id": image_id,
            "annotations": per_image[image_id],
        })
    records = filter_image_files(records, report, decode=decode)
    report.images = len(records)
    report.annotations = sum(len(r["annotations"]) for r in records)
    return records, thing_classes, id_map, report


def allowed_bad_images(max_bad_fraction: float, total: int) -> int:
    """How many of ``total`` images ``max_bad_fraction`` allows to be bad: its product with ``total``, rounded
    down, after rounding off the binary float error (0.29 * 100 is 28.999999999999996, which allows 29)."""
    return math.floor(round(max_bad_fraction * total, 6))


def check_bad_images(report: CocoLoadReport, name: str, max_bad_fraction: float, *, test: bool = False) -> None:
    """Raises when more images were bad (their json entry or their file) than ``max_bad_fraction`` of the checked
    ones (any, for a test set).

    Args:
        report: the load report of the dataset.
        name: the dataset name, for the message.
        max_bad_fraction: ``DATASETS.MAX_BAD_FRACTION`` (ignored for a test set, which allows none).
        test: the dataset is evaluated.

    Raises:
        DatasetError: one line naming the dataset, the json and the first bad files.
    """
    bad = len(report.bad_files)
    total = report.images + bad
    if not bad:
        return
    files = "missing, unreadable or not the size the json declares"
    entries = report.skipped[MALFORMED_IMAGE_ENTRY] + report.skipped[DUPLICATE_IMAGE_ID]
    what = f"{bad} of {total} images in {report.json_file} " + (
        f"have a malformed or repeated-id json entry or a file that is {files}" if entries else f"are {files}")
    if test:
        raise DatasetError(
            f"dataset '{name}' (DATASETS.TEST): {what}; a test set must be complete, skipping images would change "
            f"the AP: {first_files(report.bad_files)}"
        )
    allowed = allowed_bad_images(max_bad_fraction, total)
    if bad > allowed:
        raise DatasetError(
            f"dataset '{name}': {what}, more than DATASETS.MAX_BAD_FRACTION={max_bad_fraction} allows ({allowed}): "
            f"{first_files(report.bad_files)}"
        )


def load_coco_dataset(name: str, json_file: str, image_root: str, max_bad_fraction: float = 1.0,
                      mask_on: bool = True) -> list[dict]:
    """DatasetCatalog loader: parses (checking image headers; ``mask_on`` as :func:`parse_coco_instances`), logs
    the load report, fails past ``max_bad_fraction`` bad images and records class names in the metadata."""
    records, thing_classes, id_map, report = parse_coco_instances(
        json_file, image_root, key_hint=f"set the paths of '{name}' in DATASETS.REGISTER", mask_on=mask_on
    )
    _report_load(name, report, max_bad_fraction)
    MetadataCatalog.get(name).set(thing_classes=thing_classes, thing_dataset_id_to_contiguous_id=id_map)
    return records


# name -> the report of the latest load of a dataset whose image files this module checked.
_LOAD_REPORTS: dict[str, CocoLoadReport] = {}


def _report_load(name: str, report: CocoLoadReport, max_bad_fraction: float) -> None:
    (logger.warning if report.skipped else logger.info)(f"dataset '{name}': {report.summary()}")
    check_bad_images(report, name, max_bad_fraction)
    _LOAD_REPORTS[name] = report


def record_checked_images(name: str, source: str, images: int) -> None:
    """Records a dataset whose image files were all checked elsewhere (a semantic set: a bad one is an error), so
    that :func:`remaining_bad_images` bounds the images that training may skip from it too.

    Args:
        name: the dataset name.
        source: its image folder (for messages).
        images: the number of images.
    """
    _LOAD_REPORTS[name] = CocoLoadReport(source, images=images)


def load_report(name: str) -> CocoLoadReport | None:
    """The report of the latest load of ``name`` by this module (None if it was not loaded through it)."""
    return _LOAD_REPORTS.get(name)


def remaining_bad_images(names: list[str] | tuple[str, ...], max_bad_fraction: float) -> int | None:
    """How many images of these (loaded) training sets may still fail to decode in training before the bad
    ones exceed ``max_bad_fraction`` of all of them; None when one of them was not loaded through this module."""
    reports = [_LOAD_REPORTS.get(n) for n in names]
    if not reports or None in reports:
        return None
    bad = sum(len(r.bad_files) for r in reports)
    return allowed_bad_images(max_bad_fraction, sum(r.images for r in reports) + bad) - bad


def check_test_images(name: str) -> None:
    """Decodes every image of a test set (registered here, or a Detectron2 builtin COCO set) and fails on any
    missing, unreadable or wrongly sized one: a test set is evaluated in full, so this runs before training.
    Records the class names of a set registered here, for :func:`check_num_classes` before training."""
    if name in _REGISTERED:
        json_file, image_root, _, mask_on = _REGISTERED[name]
        _, thing_classes, id_map, report = parse_coco_instances(
            json_file, image_root, key_hint=f"set the paths of '{name}' in DATASETS.REGISTER", decode=True,
            mask_on=mask_on,
        )
        MetadataCatalog.get(name).set(thing_classes=thing_classes, thing_dataset_id_to_contiguous_id=id_map)
    else:
        report = _check_builtin_records(name, _BUILTIN_LOADERS[name](), decode=True)[1]
    check_bad_images(report, name, 0.0, test=True)


# name -> (json_file, image_root, max_bad_fraction, mask_on) of the datasets this module registered in this process.
_REGISTERED: dict[str, tuple[str, str, float, bool]] = {}
# name -> Detectron2's own loader of a builtin COCO dataset that this module put the image checks in front of.
_BUILTIN_LOADERS: dict[str, Callable[[], list[dict]]] = {}


def _check_builtin_records(name: str, records: list[dict], decode: bool) -> tuple[list[dict], CocoLoadReport]:
    report = CocoLoadReport(MetadataCatalog.get(name).json_file)
    records = filter_image_files(records, report, decode=decode)
    report.images = len(records)
    report.annotations = sum(len(r.get("annotations", ())) for r in records)
    return records, report


def _load_builtin_checked(name: str, max_bad_fraction: float) -> list[dict]:
    records, report = _check_builtin_records(name, _BUILTIN_LOADERS[name](), decode=False)
    _report_load(name, report, max_bad_fraction)
    return records


def check_builtin_images(name: str, max_bad_fraction: float) -> None:
    """Puts the header check of :func:`filter_image_files` and the ``max_bad_fraction`` budget in front of the
    loader of a Detectron2 builtin COCO dataset (``coco_2017_train`` ...), as for the sets registered here."""
    _BUILTIN_LOADERS.setdefault(name, DatasetCatalog[name])
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, partial(_load_builtin_checked, name, max_bad_fraction))


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


def register_coco_dataset(name: str, json_file: str, image_root: str, max_bad_fraction: float = 1.0,
                          mask_on: bool = True) -> None:
    """Registers a COCO-format dataset under ``name`` (re-registering our own name with new paths is allowed).

    The metadata has no ``json_file``: COCOEvaluator then evaluates against the checked records (converted to
    COCO format in its output folder) rather than against the raw json, whose skipped entries would break it.
    Loading fails when more than ``max_bad_fraction`` of the images are bad (1.0: never). ``mask_on`` False (a
    box-only model, ``MODEL.MASK_ON``): annotations without a mask are kept, segmentations dropped.
    """
    json_file, image_root = _expand(json_file), _expand(image_root)
    if name in DatasetCatalog.list():
        if name not in _REGISTERED:
            raise DatasetError(
                f"DATASETS.REGISTER name '{name}' is already a Detectron2 dataset (builtin?): choose another name"
            )
        if _REGISTERED[name] == (json_file, image_root, max_bad_fraction, mask_on):
            return
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, partial(load_coco_dataset, name, json_file, image_root, max_bad_fraction, mask_on))
    MetadataCatalog.get(name).set(image_root=image_root, source_json=json_file, evaluator_type="coco")
    _REGISTERED[name] = (json_file, image_root, max_bad_fraction, mask_on)


def check_dataset_files(name: str, key: str, max_bad_fraction: float = 1.0, *, decode_test_set: bool = False) -> None:
    """Fails fast, naming the path and what to set, when a dataset's json or image folder is missing. Images
    are checked against the json when the dataset is loaded (a Detectron2 builtin COCO set gets that check
    here, see :func:`check_builtin_images`).

    Args:
        name: a registered dataset name.
        key: the config key that named it (for the message), e.g. ``"DATASETS.TRAIN"``.
        max_bad_fraction: ``DATASETS.MAX_BAD_FRACTION``, for a builtin COCO set.
        decode_test_set: for ``DATASETS.TEST``, also decode every image now (:func:`check_test_images`).
    """
    if name not in DatasetCatalog.list():
        raise DatasetError(
            f"dataset '{name}' in {key} is not registered: add [name, json, image_root] to DATASETS.REGISTER "
            f"or use a Detectron2 builtin name such as coco_2017_train"
        )
    meta = MetadataCatalog.get(name)
    if name in _REGISTERED:
        json_file, image_root, *_ = _REGISTERED[name]
        hint = f"set the paths of '{name}' in DATASETS.REGISTER"
    elif hasattr(meta, "json_file") and hasattr(meta, "image_root"):
        json_file, image_root = meta.json_file, meta.image_root
        root = os.environ.get("DETECTRON2_DATASETS")
        hint = (
            "set DETECTRON2_DATASETS to the folder holding Detectron2's dataset layout (e.g. coco/annotations), "
            + (f"now '{root}'" if root else "unset so ./datasets is used")
        )
    else:
        return  # registered by other code with its own loader: nothing to check up front
    if not os.path.isfile(json_file):
        raise DatasetError(f"dataset '{name}': annotation file not found: {json_file} ({hint})")
    if not os.path.isdir(image_root):
        raise DatasetError(f"dataset '{name}': image folder not found: {image_root} ({hint})")
    if name not in _REGISTERED and meta.get("evaluator_type") != "coco":
        return  # LVIS and others: Detectron2's loader as it is
    if name not in _REGISTERED:
        check_builtin_images(name, max_bad_fraction)
    if key == "DATASETS.TEST" and decode_test_set:
        check_test_images(name)


def register_datasets(cfg: CfgNode, *, decode_test_sets: bool = False, training: bool = True) -> None:
    """Registers every ``DATASETS.REGISTER`` entry and checks the files of all train/test datasets.

    Args:
        cfg: the config.
        decode_test_sets: decode every image of the ``DATASETS.TEST`` sets and fail on any bad one (before a
            training or evaluation run: skipping a test image would change the AP); inference and data
            pictures, which only need the class names, leave it off.
        training: False (``--eval-only``): the ``DATASETS.TRAIN`` files are not needed and not checked; otherwise
            the training sets must name the same categories (:func:`check_training_classes`).
    """
    for name, json_file, image_root in cfg.DATASETS.REGISTER:
        register_coco_dataset(name, json_file, image_root, cfg.DATASETS.MAX_BAD_FRACTION, cfg.MODEL.MASK_ON)
    for key in ("TRAIN", "TEST") if training else ("TEST",):
        for name in cfg.DATASETS.get(key):
            check_dataset_files(name, f"DATASETS.{key}", cfg.DATASETS.MAX_BAD_FRACTION,
                                decode_test_set=decode_test_sets and key == "TEST")
    if training:
        check_training_classes(cfg.DATASETS.TRAIN)
    if decode_test_sets:  # the test sets' classes are known now: a mismatch would otherwise stop the run at evaluation
        check_num_classes(cfg, [n for n in cfg.DATASETS.TEST if MetadataCatalog.get(n).get("evaluator_type") == "coco"],
                          evaluated=True)


def _json_thing_classes(name: str) -> list[str] | None:
    """A dataset's class names: from its metadata, or, for a set registered here and not loaded yet, from the
    categories of its json, which are recorded in the metadata then (as loading does), so the json is read once."""
    meta = MetadataCatalog.get(name)
    if meta.get("thing_classes") is None and name in _REGISTERED:
        json_file = _REGISTERED[name][0]
        data = _read_coco_json(json_file, f"set the paths of '{name}' in DATASETS.REGISTER")
        thing_classes, id_map = _class_lists(_categories(data, json_file))
        meta.set(thing_classes=thing_classes, thing_dataset_id_to_contiguous_id=id_map)
    classes = meta.get("thing_classes")
    return None if classes is None else list(classes)


def check_training_classes(names: list[str] | tuple[str, ...]) -> None:
    """Raises unless every ``DATASETS.TRAIN`` set names the categories of the first in the same id order: Detectron2
    trains them as one class list, and would stop building the loader with a multi-line ValueError.

    Raises:
        DatasetError: one line naming both datasets and their categories.
    """
    if len(names) < 2:
        return  # one set: its own classes, read when it is loaded
    known = [(name, classes) for name in names if (classes := _json_thing_classes(name)) is not None]
    for name, classes in known[1:]:
        if classes != known[0][1]:
            raise DatasetError(
                f"dataset '{name}' (DATASETS.TRAIN) has the categories {classes!r:.200} in id order but "
                f"'{known[0][0]}' has {known[0][1]!r:.200}: Detectron2 trains all DATASETS.TRAIN sets as one class "
                "list; give their jsons the same category ids and names"
            )


def check_num_classes(cfg: CfgNode, dataset_names: list[str] | tuple[str, ...], *, evaluated: bool = False) -> None:
    """Raises when a dataset has more categories than ``MODEL.ROI_HEADS.NUM_CLASSES`` (after it was loaded), or,
    for a COCO-evaluated dataset, another number: COCOEvaluator stops at a predicted class the dataset lacks, and a
    class the model cannot predict would lower the AP.

    Args:
        cfg: the config.
        dataset_names: datasets whose class names are known (others are not checked).
        evaluated: the datasets are evaluated (DATASETS.TEST): the counts must be equal.
    """
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is None or len(classes) == num_classes or (len(classes) < num_classes and not evaluated):
            continue
        why = " (COCO evaluation needs them equal)" if evaluated and len(classes) < num_classes else ""
        raise DatasetError(
            f"dataset '{name}' has {len(classes)} categories but MODEL.ROI_HEADS.NUM_CLASSES is "
            f"{num_classes}{why}: set it to {len(classes)}"
        )


def check_training_sets(cfg: CfgNode) -> None:
    """Checks the loaded ``DATASETS.TRAIN`` sets against the model and the test sets, before the first step.

    Besides :func:`check_num_classes`: with ``MODEL.MASK_ON`` a training json must have masks, and RLE masks of
    single objects need ``INPUT.MASK_FORMAT bitmask`` (Detectron2 would fail on the first batch that holds one);
    a COCO-evaluated test set must name the same categories in the same id order, or the model's class k would
    be scored as the test set's class k.

    Raises:
        DatasetError: one line naming the dataset, its json and the key to change.
    """
    names = cfg.DATASETS.TRAIN
    check_num_classes(cfg, names)
    for name in names:
        report = _LOAD_REPORTS.get(name)
        if report is None or not cfg.MODEL.MASK_ON:
            continue
        if report.masks is False:
            raise DatasetError(
                f"dataset '{name}' (DATASETS.TRAIN): {report.json_file} has no segmentation masks but "
                "MODEL.MASK_ON is True: set MODEL.MASK_ON False to train boxes only, or add masks"
            )
        if report.rle_instances and cfg.INPUT.MASK_FORMAT == "polygon":
            raise DatasetError(
                f"dataset '{name}' (DATASETS.TRAIN): {report.rle_instances} non-crowd instances in "
                f"{report.json_file} have RLE masks, which INPUT.MASK_FORMAT polygon cannot hold: set "
                "INPUT.MASK_FORMAT bitmask"
            )
    train_classes = next((c for c in (MetadataCatalog.get(n).get("thing_classes") for n in names) if c), None)
    for name in cfg.DATASETS.TEST:
        meta = MetadataCatalog.get(name)
        classes = meta.get("thing_classes")
        if train_classes is None or classes is None or meta.get("evaluator_type") != "coco":
            continue
        if list(classes) != list(train_classes):
            raise DatasetError(
                f"dataset '{name}' (DATASETS.TEST) has the categories {list(classes)!r:.200} in id order but "
                f"DATASETS.TRAIN has {list(train_classes)!r:.200}: the model's class k would be scored as the test "
                "set's class k; give both jsons the same category ids and names"
            )


def _polygons_to_rle(ann: dict, height: int, width: int) -> dict:
    segm = ann.get("segmentation")
    if not isinstance(segm, list):
        return ann
    return {**ann, "segmentation": mask_util.merge(mask_util.frPyObjects(segm, height, width))}


class DetectionDatasetMapper(DatasetMapper):
    """Detectron2's DatasetMapper that decodes images with :func:`~mae_det.data.images.load_image` and, for
    ``INPUT.MASK_FORMAT bitmask``, rasterizes polygons *before* the augmentations, so crops (LSJ) cut exact pixel
    masks instead of clipping polygons (which needs shapely).

    Detectron2's ``read_image`` converts with PIL's ``convert``, which clips 16-bit grayscale to white and keeps the
    colour stored under transparent pixels; ``load_image`` scales 16-bit data and composites alpha on black, so
    training, evaluation and ``tools/predict.py`` see the same pixels (8-bit RGB files decode identically either
    way). Label maps (``sem_seg_file_name``) are read as Detectron2 reads them.

    In training, an image that fails to decode or is not its declared size (the header check cannot see
    truncated data) makes the mapper return None, which Detectron2's MapDataset answers with another index. The
    skipped file's "path: problem" line rides on the mapper's next output under ``SKIPPED_IMAGES_KEY``, so it
    reaches the training process from loader workers too (the trainer logs and counts it there). Any failure
    that the image itself does not explain is raised as before.
    """

    @configurable
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._skipped: list[str] = []

    def _map(self, dataset_dict: dict) -> dict:
        """Detectron2's mapping of one dataset dict (image, augmentations, annotations) with the project's decoder."""
        d = copy.deepcopy(dataset_dict)
        image = d2_utils.convert_PIL_to_numpy(load_image(d["file_name"]), self.image_format)
        d2_utils.check_image_size(d, image)
        sem_seg = d.pop("sem_seg_file_name", None)
        if sem_seg is not None:
            sem_seg = d2_utils.read_image(sem_seg, "L").squeeze(2)
        aug_input = T.AugInput(image, sem_seg=sem_seg)
        transforms = self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        # Always a copy: the augmentations return read-only views of PIL images, and for one channel ("L") the
        # transposed view is already contiguous, so ascontiguousarray would hand torch the read-only memory.
        d["image"] = torch.as_tensor(np.array(image.transpose(2, 0, 1), order="C"))
        if sem_seg is not None:
            d["sem_seg"] = torch.as_tensor(sem_seg.astype("long"))
        if self.proposal_topk is not None:
            d2_utils.transform_proposals(d, image_shape, transforms, proposal_topk=self.proposal_topk)
        if not self.is_train:
            d.pop("annotations", None)
        elif "annotations" in d:
            self._transform_annotations(d, transforms, image_shape)
        return d

    def _transform_annotations(self, dataset_dict: dict, transforms: T.TransformList, image_shape: tuple) -> None:
        """Detectron2's, except that an image without (non-crowd) instances gets empty ``gt_masks`` when masks are
        trained: Detectron2 sets the field from the first instance only, and with ``recompute_boxes`` (LSJ) reads
        it for every image (``DATALOADER.FILTER_EMPTY_ANNOTATIONS False`` keeps such images)."""
        if not self.use_instance_mask or any(a.get("iscrowd", 0) == 0 for a in dataset_dict["annotations"]):
            return super()._transform_annotations(dataset_dict, transforms, image_shape)
        dataset_dict.pop("annotations")
        instances = d2_utils.annotations_to_instances([], image_shape, mask_format=self.instance_mask_format)
        instances.gt_masks = (PolygonMasks([]) if self.instance_mask_format == "polygon"
                              else BitMasks(torch.zeros((0, *image_shape), dtype=torch.bool)))
        dataset_dict["instances"] = instances

    def __call__(self, dataset_dict: dict) -> dict | None:
        if not self.is_train:
            return self._map(dataset_dict)
        if self.instance_mask_format == "bitmask" and dataset_dict.get("annotations"):
            h, w = dataset_dict["height"], dataset_dict["width"]
            dataset_dict = {**dataset_dict, "annotations": [_polygons_to_rle(a, h, w) for a in dataset_dict["annotations"]]}
        try:
            out = self._map(dataset_dict)
        except Exception:
            problem = image_file_problem(dataset_dict["file_name"], dataset_dict.get("height"),
                                         dataset_dict.get("width"), decode=True)
            if problem is None:
                raise
            self._skipped.append(problem[1])
            return None
        if self._skipped:
            out[SKIPPED_IMAGES_KEY], self._skipped = self._skipped, []
        return out


def flip_augmentations(cfg: CfgNode) -> list[T.Augmentation]:
    """``INPUT.RANDOM_FLIP`` as an augmentation list: one random flip (p = 0.5), or none for ``"none"``."""
    flip = cfg.INPUT.RANDOM_FLIP
    return [] if flip == "none" else [T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical")]


def build_lsj_augmentations(cfg: CfgNode) -> list[T.Augmentation]:
    """ViTDet's Large Scale Jitter: flip, resize to ``IMAGE_SIZE * U(MIN_SCALE, MAX_SCALE)`` (aspect kept),
    then a random crop of at most ``IMAGE_SIZE`` squared, unpadded (the model pads the batch)."""
    lsj = cfg.INPUT.LSJ
    augs = flip_augmentations(cfg)
    augs.append(T.ResizeScale(lsj.MIN_SCALE, lsj.MAX_SCALE, lsj.IMAGE_SIZE, lsj.IMAGE_SIZE))
    augs.append(T.FixedSizeCrop((lsj.IMAGE_SIZE, lsj.IMAGE_SIZE), pad=False))
    return augs


def _shapely_available() -> bool:
    try:
        import shapely  # noqa: F401
    except ImportError:
        return False
    return True


def build_detection_mapper(cfg: CfgNode, is_train: bool) -> DatasetMapper:
    """The train/test mapper from the config: LSJ when ``INPUT.LSJ.ENABLED``, else Detectron2's resize.

    With LSJ, boxes are recomputed from the (cropped) masks, as ViTDet does. Test-time resizing is always
    Detectron2's ``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST`` (the LSJ configs set both to ``IMAGE_SIZE``).
    """
    if not is_train:
        return DetectionDatasetMapper(cfg, False)
    crops = cfg.INPUT.LSJ.ENABLED or cfg.INPUT.CROP.ENABLED
    if crops and cfg.MODEL.MASK_ON and cfg.INPUT.MASK_FORMAT == "polygon" and not _shapely_available():
        raise DatasetError(
            "cropping polygon masks needs the shapely package: set INPUT.MASK_FORMAT bitmask or install shapely"
        )
    if not cfg.INPUT.LSJ.ENABLED:
        return DetectionDatasetMapper(cfg, True)
    return DetectionDatasetMapper(
        cfg, True, augmentations=build_lsj_augmentations(cfg), recompute_boxes=cfg.MODEL.MASK_ON
    )
