"""Detection data: checked registration of COCO-format datasets and the Large Scale Jitter (LSJ) mapper.

Any COCO-format json + image root listed in ``DATASETS.REGISTER`` becomes a Detectron2 dataset without code
changes. The json is parsed by :func:`parse_coco_instances`, which turns hostile content into counted, logged
skips (annotations of unknown images, polygons with < 3 points, zero/negative-size boxes, RLEs that do not fit
their image, ...) or one-line :class:`DatasetError` messages (missing file, invalid json, missing sections).
Detectron2's builtin names (``coco_2017_train`` ...) are checked for their files under ``DETECTRON2_DATASETS``.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pycocotools.mask as mask_util
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset cannot be used; the one-line message names the file and the key or variable to fix."""


@dataclass
class CocoLoadReport:
    """What :func:`parse_coco_instances` kept and what it skipped (reason -> count)."""

    json_file: str
    images: int = 0
    annotations: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        line = f"{self.json_file}: {self.images} images, {self.annotations} annotations"
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
            line += f"; skipped {sum(self.skipped.values())}: {reasons}"
        return line


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


def _clean_segmentation(segm: Any, height: int, width: int, skipped: Counter) -> Any:
    """Valid polygons or a compressed RLE for one annotation, or None (reason counted in ``skipped``)."""
    if isinstance(segm, list):
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
        try:
            rle = mask_util.frPyObjects(segm, height, width) if isinstance(segm.get("counts"), list) else dict(segm)
            mask_util.area(rle)
        except Exception:
            skipped["malformed RLE masks"] += 1
            return None
        return rle
    skipped["malformed segmentations"] += 1
    return None


def parse_coco_instances(
    json_file: str, image_root: str, key_hint: str = "set the path in DATASETS.REGISTER"
) -> tuple[list[dict], list[str], dict[int, int], CocoLoadReport]:
    """Reads a COCO instances json into Detectron2 dataset dicts, skipping what cannot be trained on.

    Category ids may be any distinct integers: they are mapped to ``0..K-1`` in id order (as Detectron2 does);
    images without annotations are kept (training filters them per ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``);
    crowd annotations (RLE, compressed or not) are kept for evaluation.

    Args:
        json_file: path of the COCO-format json.
        image_root: folder that ``file_name`` entries are relative to.
        key_hint: what to change when the paths are wrong, appended to the error message.

    Returns:
        (records, thing_classes, dataset_id_to_contiguous_id, report).

    Raises:
        DatasetError: missing/unreadable/invalid json, missing image root, missing sections, bad categories.
    """
    data = _read_coco_json(json_file, key_hint)
    if not os.path.isdir(image_root):
        raise DatasetError(f"image root not found: {image_root} ({key_hint})")
    cats = _categories(data, json_file)
    id_map = {cid: i for i, cid in enumerate(sorted(cats))}
    thing_classes = [cats[cid] for cid in sorted(cats)]
    report = CocoLoadReport(json_file)
    skipped = report.skipped

    images: dict[int, dict] = {}
    for img in data["images"]:
        ok = isinstance(img, dict) and _is_int(img.get("id")) and isinstance(img.get("file_name"), str)
        ok = ok and all(_is_int(img.get(k)) and img[k] > 0 for k in ("height", "width"))
        if not ok:
            skipped["malformed image entries"] += 1
        elif img["id"] in images:
            skipped["duplicate image ids"] += 1
        elif not os.path.isfile(os.path.join(image_root, img["file_name"])):
            skipped["images whose file is missing"] += 1
        else:
            images[img["id"]] = img

    anns = [a for a in data.get("annotations", []) if isinstance(a, dict)]
    if len(anns) < len(data.get("annotations", [])):
        skipped["malformed annotations"] += len(data.get("annotations", [])) - len(anns)
    # A dataset with masks needs one for every instance (Detectron2 batches them together).
    with_masks = any(a.get("segmentation") for a in anns)
    per_image: dict[int, list[dict]] = {i: [] for i in images}
    for a in anns:
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
        bbox = a.get("bbox")
        if not _finite_numbers(bbox, 4):
            skipped["malformed boxes"] += 1
            continue
        if bbox[2] <= 0 or bbox[3] <= 0:
            skipped["zero/negative-size boxes"] += 1
            continue
        obj = {
            "bbox": [float(v) for v in bbox],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": id_map[a["category_id"]],
            "iscrowd": int(bool(a.get("iscrowd", 0))),
        }
        if with_masks:
            if not a.get("segmentation"):
                skipped["annotations without a mask in a dataset with masks"] += 1
                continue
            segm = _clean_segmentation(a["segmentation"], img["height"], img["width"], skipped)
            if segm is None:
                continue
            obj["segmentation"] = segm
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
    report.images = len(records)
    report.annotations = sum(len(r["annotations"]) for r in records)
    return records, thing_classes, id_map, report


def load_coco_dataset(name: str, json_file: str, image_root: str) -> list[dict]:
    """DatasetCatalog loader: parses, logs the load report and records class names in the metadata."""
    records, thing_classes, id_map, report = parse_coco_instances(
        json_file, image_root, key_hint=f"set the paths of '{name}' in DATASETS.REGISTER"
    )
    (logger.warning if report.skipped else logger.info)(f"dataset '{name}': {report.summary()}")
    MetadataCatalog.get(name).set(thing_classes=thing_classes, thing_dataset_id_to_contiguous_id=id_map)
    return records


# name -> (json_file, image_root) of the datasets this module registered in this process.
_REGISTERED: dict[str, tuple[str, str]] = {}


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


def register_coco_dataset(name: str, json_file: str, image_root: str) -> None:
    """Registers a COCO-format dataset under ``name`` (re-registering our own name with new paths is allowed).

    The metadata has no ``json_file``: COCOEvaluator then evaluates against the checked records (converted to
    COCO format in its output folder) rather than against the raw json, whose skipped entries would break it.
    """
    json_file, image_root = _expand(json_file), _expand(image_root)
    if name in DatasetCatalog.list():
        if name not in _REGISTERED:
            raise DatasetError(
                f"DATASETS.REGISTER name '{name}' is already a Detectron2 dataset (builtin?): choose another name"
            )
        if _REGISTERED[name] == (json_file, image_root):
            return
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, partial(load_coco_dataset, name, json_file, image_root))
    MetadataCatalog.get(name).set(image_root=image_root, source_json=json_file, evaluator_type="coco")
    _REGISTERED[name] = (json_file, image_root)


def check_dataset_files(name: str, key: str) -> None:
    """Fails fast, naming the path and what to set, when a dataset's json or image folder is missing.

    Args:
        name: a registered dataset name.
        key: the config key that named it (for the message), e.g. ``"DATASETS.TRAIN"``.
    """
    if name not in DatasetCatalog.list():
        raise DatasetError(
            f"dataset '{name}' in {key} is not registered: add [name, json, image_root] to DATASETS.REGISTER "
            f"or use a Detectron2 builtin name such as coco_2017_train"
        )
    meta = MetadataCatalog.get(name)
    if name in _REGISTERED:
        json_file, image_root = _REGISTERED[name]
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


def register_datasets(cfg: CfgNode) -> None:
    """Registers every ``DATASETS.REGISTER`` entry and checks the files of all train/test datasets."""
    for name, json_file, image_root in cfg.DATASETS.REGISTER:
        register_coco_dataset(name, json_file, image_root)
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS.get(key):
            check_dataset_files(name, f"DATASETS.{key}")


def check_num_classes(cfg: CfgNode, dataset_names: list[str] | tuple[str, ...]) -> None:
    """Raises when a dataset has more categories than ``MODEL.ROI_HEADS.NUM_CLASSES`` (after it was loaded)."""
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) > cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise DatasetError(
                f"dataset '{name}' has {len(classes)} categories but MODEL.ROI_HEADS.NUM_CLASSES is "
                f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}: set it to {len(classes)}"
            )


def _polygons_to_rle(ann: dict, height: int, width: int) -> dict:
    segm = ann.get("segmentation")
    if not isinstance(segm, list):
        return ann
    return {**ann, "segmentation": mask_util.merge(mask_util.frPyObjects(segm, height, width))}


class DetectionDatasetMapper(DatasetMapper):
    """Detectron2's DatasetMapper that, for ``INPUT.MASK_FORMAT bitmask``, rasterizes polygons *before* the
    augmentations, so crops (LSJ) cut exact pixel masks instead of clipping polygons (which needs shapely)."""

    def __call__(self, dataset_dict: dict) -> dict:
        if self.is_train and self.instance_mask_format == "bitmask" and dataset_dict.get("annotations"):
            h, w = dataset_dict["height"], dataset_dict["width"]
            dataset_dict = {**dataset_dict, "annotations": [_polygons_to_rle(a, h, w) for a in dataset_dict["annotations"]]}
        return super().__call__(dataset_dict)


def build_lsj_augmentations(cfg: CfgNode) -> list[T.Augmentation]:
    """ViTDet's Large Scale Jitter: flip, resize to ``IMAGE_SIZE * U(MIN_SCALE, MAX_SCALE)`` (aspect kept),
    then a random crop of at most ``IMAGE_SIZE`` squared, unpadded (the model pads the batch)."""
    lsj = cfg.INPUT.LSJ
    augs: list[T.Augmentation] = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(
            horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal", vertical=cfg.INPUT.RANDOM_FLIP == "vertical"
        ))
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
