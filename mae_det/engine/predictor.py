"""Inference with a trained detector or semantic segmenter: predictions, pictures, COCO-format results / label maps.

Detectron2's ``DefaultPredictor`` loads weights with the plain ``DetectionCheckpointer`` (which knows none of the
formats :class:`~mae_det.checkpoint.detectron2.ViTDetCheckpointer` converts and maps keys by suffix guesswork),
takes one BGR image at a time and leaves outputs on the model's device. :class:`Predictor` keeps its
preprocessing - ``INPUT.FORMAT`` and the evaluation mapper's test resize - but loads weights with the trainer's
checkpointer, takes a batch of RGB arrays (what :func:`~mae_det.data.images.load_image` decodes) and returns
CPU ``Instances`` - or, for a semantic-segmentation config, (H, W) class maps.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import Visualizer
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_util
from tqdm import tqdm

from ..config.detection import load_det_cfg
from ..config.pretrain import ConfigError
from ..data.detection import DatasetError, register_datasets
from ..data.semantic import build_mapper, is_semantic, register_sem_seg_dataset
from ..data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageLoadError, load_image, load_image_and_file_size
from .det_trainer import load_trained

logger = logging.getLogger(__name__)

UNNAMED = "__unnamed__"  # the metadata name when no dataset names the model's classes


def load_predict_cfg(
    config_file: str, opts: Sequence[str] = (), confidence_threshold: float | None = None
) -> CfgNode:
    """The detection config for inference, frozen.

    Args:
        config_file: a detection yaml (``_BASE_`` allowed) or a training run's ``config.yaml``.
        opts: ``KEY VALUE`` overrides, e.g. ``["MODEL.WEIGHTS", "output/model_final.pth"]``.
        confidence_threshold: if given, the model's test score threshold (what is drawn and written), as
            Detectron2's demo does.
    """
    cfg = load_det_cfg(config_file, list(opts), training=False)
    if confidence_threshold is not None:
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence threshold must be in [0, 1], got {confidence_threshold}")
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = confidence_threshold
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = confidence_threshold
        cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = confidence_threshold
    cfg.freeze()
    return cfg


def dataset_metadata(cfg: CfgNode) -> Metadata:
    """Class names and dataset category ids for the model's ``MODEL.ROI_HEADS.NUM_CLASSES`` outputs.

    Taken from the first of ``DATASETS.TEST`` / ``DATASETS.TRAIN`` that is registered (``DATASETS.REGISTER`` entries
    are registered here; their json is parsed once if the names are not known yet). Model classes beyond the
    dataset's are named ``"class k"`` and get the next unused category ids; without a dataset, class ``k`` is
    ``"class k"`` with category id ``k``.

    Returns:
        A new ``Metadata`` whose ``thing_classes`` has one name per model class and whose
        ``thing_dataset_id_to_contiguous_id`` covers every class.
    """
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    names: list[str] = []
    id_map: dict[int, int] = {}
    source = ""
    try:
        register_datasets(cfg)
    except DatasetError as e:  # the class names are optional for inference; the images are not
        logger.warning(f"{e}; class names may be unavailable")
    for name in [*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN]:
        if name not in DatasetCatalog.list():
            continue
        meta = MetadataCatalog.get(name)
        if meta.get("thing_classes") is None:
            try:
                DatasetCatalog.get(name)  # our loader records thing_classes while parsing
            except (DatasetError, OSError) as e:
                logger.warning(f"class names of dataset '{name}' unavailable: {e}")
                continue
        if meta.get("thing_classes") is not None:
            names = list(meta.thing_classes)
            id_map = dict(meta.get("thing_dataset_id_to_contiguous_id") or {i: i for i in range(len(names))})
            source = name
            break
    if len(names) > num_classes:
        logger.warning(
            f"dataset '{source}' has {len(names)} classes but MODEL.ROI_HEADS.NUM_CLASSES is {num_classes}: "
            "labelling outputs 'class k'"
        )
        names, id_map = [], {}
    elif not source:
        logger.warning("no registered dataset in DATASETS.TEST/TRAIN: labelling outputs 'class k'")
    next_id = max(id_map, default=-1) + 1
    for k in range(len(names), num_classes):
        names.append(f"class {k}")
        id_map[next_id] = k
        next_id += 1
    return Metadata(name=source or UNNAMED, thing_classes=names, thing_dataset_id_to_contiguous_id=id_map)


def sem_seg_metadata(cfg: CfgNode) -> Metadata:
    """``stuff_classes`` for the model's ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` outputs: the first registered
    TEST / TRAIN dataset's names (``DATASETS.REGISTER_SEM_SEG`` entries are registered here, their label maps not
    read), else "class k"."""
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    for name, image_root, label_root, classes_file in cfg.DATASETS.REGISTER_SEM_SEG:
        try:
            register_sem_seg_dataset(name, image_root, label_root, classes_file, cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE)
        except DatasetError as e:
            logger.warning(f"{e}; class names may be unavailable")
    for name in [*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN]:
        classes = MetadataCatalog.get(name).get("stuff_classes") if name in DatasetCatalog.list() else None
        if classes is not None and len(classes) == num_classes:
            return Metadata(name=name, stuff_classes=list(classes))
    logger.warning(f"no registered dataset in DATASETS.TEST/TRAIN with {num_classes} classes: labelling 'class k'")
    return Metadata(name=UNNAMED, stuff_classes=[f"class {k}" for k in range(num_classes)])


def draw_sem_seg(image: np.ndarray, labels: torch.Tensor, metadata: Metadata) -> np.ndarray:
    """(H, W, 3) uint8 RGB with each predicted class region tinted and named by Detectron2's Visualizer."""
    return Visualizer(image, metadata).draw_sem_seg(labels).get_image()


def coco_categories(metadata: Metadata) -> list[dict]:
    """COCO ``categories`` entries (dataset ids and names) for a :func:`dataset_metadata` result."""
    return [
        {"id": dataset_id, "name": metadata.thing_classes[k]}
        for dataset_id, k in sorted(metadata.thing_dataset_id_to_contiguous_id.items(), key=lambda kv: kv[1])
    ]


def instances_to_coco_results(instances: Instances, image_id: int, metadata: Metadata) -> list[dict]:
    """COCO results of one image: ``bbox`` xywh, ``score``, dataset ``category_id``, ``segmentation`` RLE (str)."""
    to_dataset_id = {k: dataset_id for dataset_id, k in metadata.thing_dataset_id_to_contiguous_id.items()}
    return [{**r, "category_id": to_dataset_id[r["category_id"]]} for r in instances_to_coco_json(instances, image_id)]


def coco_results_in_file_frame(
    instances: Instances, image_id: int, metadata: Metadata, file_size: tuple[int, int]
) -> list[dict]:
    """:func:`instances_to_coco_results` of an image that was decoded smaller than its file (a JPEG beyond the pixel
    limit), in the file's frame: boxes scaled, each mask resized (nearest) and encoded one at a time, so memory
    holds at most one full-size mask.

    Args:
        instances: detections in the decoded image's frame (``image_size`` is its (H, W)).
        image_id: the COCO image id.
        metadata: as for :func:`instances_to_coco_results`.
        file_size: (width, height) of the file.
    """
    (h, w), (w0, h0) = instances.image_size, file_size
    fields = {k: v for k, v in instances.get_fields().items() if k != "pred_masks"}
    results = instances_to_coco_results(Instances((h, w), **fields), image_id, metadata)
    for k, r in enumerate(results):
        x, y, bw, bh = r["bbox"]
        r["bbox"] = [x * w0 / w, y * h0 / h, bw * w0 / w, bh * h0 / h]
        if instances.has("pred_masks"):
            mask = Image.fromarray(instances.pred_masks[k].numpy()).resize((w0, h0), Image.NEAREST)
            rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
            r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("utf-8")}
    return results


def class_color(k: int) -> np.ndarray:
    """RGB in [0, 1] of contiguous class ``k``: the same in every panel and picture (Detectron2's palette)."""
    palette = colormap(rgb=True, maximum=1)
    return palette[k % len(palette)]


def draw_instances(
    image: np.ndarray, metadata: Metadata, classes: Sequence[int], boxes: np.ndarray, masks: np.ndarray | None = None,
    scores: Sequence[float] | None = None, min_side: int = 0,
) -> np.ndarray:
    """(H', W', 3) uint8 RGB with boxes, masks and "name score%" labels, one fixed color per class.

    Args:
        image: (H, W, 3) uint8 RGB.
        metadata: ``thing_classes`` names the contiguous class ids.
        classes: contiguous class id per instance.
        boxes: (N, 4) XYXY in image pixels.
        masks: (N, H, W) bool, or None.
        scores: per instance, or None (ground truth: the name alone).
        min_side: the image is first enlarged by the smallest integer factor (nearest neighbour, so pixels stay
            exact) that makes its shorter side at least this long; Detectron2's Visualizer sizes lines and text to
            the image, so a 64 px image drawn as is gets labels taller than its objects.
    """
    k = max(1, -(-min_side // min(image.shape[:2])))
    image = image.repeat(k, 0).repeat(k, 1)
    masks = None if masks is None or not len(masks) else np.asarray(masks).repeat(k, 1).repeat(k, 2)
    names = [metadata.thing_classes[c] for c in classes]
    labels = names if scores is None else [f"{n} {s:.0%}" for n, s in zip(names, scores)]
    vis = Visualizer(image, metadata)
    return vis.overlay_instances(
        boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * k, masks=masks, labels=labels,
        assigned_colors=[class_color(c) for c in classes], alpha=0.35,
    ).get_image()


def draw_detections(image: np.ndarray, instances: Instances, metadata: Metadata, min_side: int = 0) -> np.ndarray:
    """:func:`draw_instances` of a model's output ``Instances`` (boxes, classes, scores, masks if predicted)."""
    return draw_instances(
        image, metadata, instances.pred_classes.tolist(), instances.pred_boxes.tensor.numpy(),
        instances.pred_masks.numpy() if instances.has("pred_masks") else None, instances.scores.tolist(), min_side,
    )


def segmentation_masks(segms: Sequence, height: int, width: int) -> np.ndarray | None:
    """(N, H, W) bool masks of COCO segmentations (polygons, RLE, uncompressed RLE); None when there are none or one
    instance has no segmentation."""
    if not segms or not all(segms):
        return None
    rles = [mask_util.merge(mask_util.frPyObjects(s, height, width)) if isinstance(s, list)  # polygons
            else mask_util.frPyObjects(s, height, width) if isinstance(s["counts"], list) else s for s in segms]
    return np.stack([mask_util.decode(r).astype(bool) for r in rles])


def ground_truth_instances(coco_json: str | os.PathLike, metadata: Metadata) -> dict[str, tuple]:
    """Per image file name of a COCO json: (contiguous classes, (N, 4) XYXY boxes, (N, H, W) bool masks, None when
    an instance has no segmentation).

    Classes are numbered as Detectron2's loader numbers them, by the json's own categories in id order (not through
    ``metadata``, whose map is a stand-in when no dataset of the config could be read).

    Raises:
        DatasetError: the json has more categories than ``metadata`` (the model) has classes, or, when ``metadata``
            comes from a dataset, other names in id order.
    """
    data = json.loads(Path(coco_json).read_text(encoding="utf-8"))
    categories = sorted(data["categories"], key=lambda c: c["id"])
    names, known = [c["name"] for c in categories], list(metadata.thing_classes)
    if len(names) > len(known) or (metadata.name != UNNAMED and names != known[: len(names)]):
        raise DatasetError(f"{coco_json}: its categories {names!r:.200} in id order are not the model's classes "
                           f"{known!r:.200} (dataset '{metadata.name}'): the ground truth would be drawn as other "
                           "classes")
    to_contiguous = {c["id"]: k for k, c in enumerate(categories)}
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in data["images"]}
    for a in data["annotations"]:
        by_image[a["image_id"]].append(a)
    out = {}
    for img in data["images"]:
        anns = by_image[img["id"]]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=np.float64)
        masks = segmentation_masks([a.get("segmentation") for a in anns], img["height"], img["width"])
        out[img["file_name"]] = ([to_contiguous[a["category_id"]] for a in anns], boxes.reshape(-1, 4), masks)
    return out


class Predictor:
    """A detection or semantic-segmentation model built from a yacs config, ``MODEL.WEIGHTS`` loaded, in eval mode.

    Raises ``ConfigError`` without weights and ``CheckpointError`` for weights that do not hold the whole trained
    model (e.g. a pretrained encoder), as ``train_net.py --eval-only`` does.

    Attributes:
        cfg: the (cloned) config.
        model: the Detectron2 model on ``MODEL.DEVICE``.
        semantic: the model is a ``SemanticSegmentor`` (it returns class maps, not ``Instances``).
        metadata: :func:`sem_seg_metadata` or :func:`dataset_metadata` of the config.
    """

    def __init__(self, cfg: CfgNode) -> None:
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        # A pretrained encoder (or another class count) would leave heads random: empty pictures, no error.
        load_trained(self.cfg, self.model, "prediction", how=" (tools/predict.py: --opts MODEL.WEIGHTS <file>)")
        # The evaluation mapper's augmentations, so predictions here equal those of `train_net --eval-only`.
        self.augmentations = build_mapper(self.cfg, is_train=False).augmentations
        self.input_format = cfg.INPUT.FORMAT
        self.semantic = is_semantic(self.cfg)
        self.metadata = sem_seg_metadata(self.cfg) if self.semantic else dataset_metadata(self.cfg)

    def preprocess(self, image: np.ndarray) -> dict:
        """(H, W, 3) uint8 RGB -> the model's input dict (``INPUT.FORMAT`` channels, test resize).

        Raises:
            ValueError: not an (H, W, 3) uint8 array, or an image so thin that the test resize leaves a side of 0 px.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        x = d2_utils.convert_PIL_to_numpy(Image.fromarray(image), self.input_format)
        aug_input = T.AugInput(x)
        for aug in self.augmentations.augs:  # one at a time: PIL's error for a 0 px resize names neither size
            tfm = aug.get_transform(aug_input.image)
            if isinstance(tfm, T.ResizeTransform) and min(tfm.new_h, tfm.new_w) < 1:
                raise ValueError(f"resized to 0 px ({width}x{height} -> {tfm.new_w}x{tfm.new_h} by the test resize)")
            aug_input.transform(tfm)
        x = aug_input.image if aug_input.image.ndim == 3 else aug_input.image[:, :, None]  # "L" gives (H, W)
        # A copy: the test resize returns a read-only view of a PIL image, which torch must not wrap.
        return {"image": torch.from_numpy(np.array(x.transpose(2, 0, 1), order="C")), "height": height, "width": width}

    @torch.no_grad()
    def run(self, inputs: Sequence[dict]) -> list[Instances] | list[torch.Tensor]:
        """:meth:`__call__` of :meth:`preprocess` outputs.

        Only inputs of one size share a forward pass (unless the backbone pads every input to one square): a batch is
        padded to its largest input, which moves the position table's grid and what global attention sees, so
        batching any other way would change the results from those of one image at a time (``train_net
        --eval-only``).
        """
        square = getattr(self.model.backbone, "padding_constraints", {}).get("square_size", 0)
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(() if square else tuple(x["image"].shape[-2:]), []).append(i)
        outputs: list = [None] * len(inputs)
        for indexes in groups.values():
            for i, out in zip(indexes, self.model([inputs[i] for i in indexes])):
                outputs[i] = out["sem_seg"].argmax(dim=0).cpu() if self.semantic else out["instances"].to("cpu")
        return outputs

    def __call__(self, images: Sequence[np.ndarray]) -> list[Instances] | list[torch.Tensor]:
        """Detections (or, when :attr:`semantic`, (H, W) int64 class maps) of a batch of (H, W, 3) uint8 RGB
        images, in input-image coordinates, on the CPU; the same as predicting each image alone (see :meth:`run`)."""
        return self.run([self.preprocess(im) for im in images])


# ---- many images -> files ---------------------------------------------------------------------------------
def expand_inputs(inputs: Iterable[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files named by paths, folders (their image files, not recursive) and glob patterns (``**`` recurses).

    Explicit paths are kept even if missing or not images, so that reading them reports them; an existing file is
    taken as named even if its name holds glob characters (``img[1].png``).

    Returns:
        (files in order, duplicates removed - the first spelling of each resolved path is kept; [(input, reason)]
        for folders and patterns that gave no file).
    """
    files: dict[Path, Path] = {}
    empty: list[tuple[str, str]] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p for p in Path(item).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                empty.append((item, "folder holds no image files"))
        elif not os.path.isfile(item) and glob.has_magic(item):
            found = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if os.path.isfile(p)]
            if not found:
                empty.append((item, "pattern matched no files"))
        else:
            found = [Path(item)]
        for path in found:
            files.setdefault(path.resolve(), path)
    return list(files.values()), empty


def check_output_dir(output_dir: str | os.PathLike, files: Iterable[Path]) -> Path:
    """Refuses an output folder that cannot be one or that holds an input, before anything is computed.

    Pictures written next to the inputs would replace an input of the same name (``a.png``) and be read as inputs by
    the next run over that folder, so no input may lie in the output folder (also through a symlink named there).

    Returns:
        The folder's path.

    Raises:
        ConfigError: one line naming the path: an existing file, a path below a file, or a folder holding an input.
    """
    out = Path(output_dir)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"output folder {out} is a file, not a folder" if existing == out else
                          f"cannot create output folder {out}: {existing} is a file, not a folder")
    if out.exists():
        target = out.resolve()
        for path in files:
            if target in (Path(os.path.abspath(path)).parent.resolve(), path.resolve().parent):
                raise ConfigError(f"output folder {out} holds the input {path}: its pictures would replace inputs "
                                  "and be read as inputs by the next run; choose another --output")
    return out


def unique_png_names(path: str | os.PathLike, used: set[str], suffixes: Sequence[str] = ("",)) -> list[str]:
    """``<stem><suffix>.png`` for an input path and each suffix, the stem suffixed ``_1``, ``_2``... until none of
    the names is in ``used`` (which they join).

    Every file an input writes is reserved at once: an input named ``a_labels.png`` must not take the label map
    name of ``a.png``, nor ``a.png`` that of ``a_labels.png``'s picture.
    """
    stem, k = Path(path).stem, 1
    names = [f"{stem}{suffix}.png" for suffix in suffixes]
    while used.intersection(names):  # same stem from two folders, a.jpg next to a.png, or a_labels.png next to a.png
        names, k = [f"{stem}_{k}{suffix}.png" for suffix in suffixes], k + 1
    used.update(names)
    return names


@dataclass
class PredictionSummary:
    """What :func:`predict_to_dir` did.

    Attributes:
        images: COCO ``images`` entries of the images processed (``id``, ``file_name`` = input path, ``height``,
            ``width``, ``visualization`` = PNG name in the output folder).
        failures: (input, reason) of every unreadable image, empty folder or pattern without match.
        num_detections: detections written to the results json.
        results_json: COCO results (a list of detections), loadable with ``COCO.loadRes``.
        images_json: COCO dataset json (images, categories, no annotations) the results refer to.
    """

    images: list[dict] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    num_detections: int = 0
    results_json: Path | None = None
    images_json: Path | None = None


def predict_to_dir(
    predictor: Predictor,
    inputs: Iterable[str],
    output_dir: str | os.PathLike,
    batch_size: int = 1,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 256,
) -> PredictionSummary:
    """Runs the predictor over images and writes a picture per image plus COCO-format json files.

    Writes ``<output_dir>/<image stem>.png`` (detections drawn), ``results.json`` (COCO results of all images:
    ``image_id``, ``category_id`` (dataset ids), ``bbox`` xywh, ``score``, ``segmentation`` RLE) and
    ``images.json`` (``images`` with ids 1..N and their paths, ``categories``, empty ``annotations``), so that
    ``COCO("images.json").loadRes("results.json")`` works. Unreadable images, and images the test resize would
    shrink to 0 px, are logged by path and skipped; the json files hold the images done even if the run stops.
    A semantic model writes instead, per image, the class regions drawn (``<stem>.png``) and its class map
    (``<stem>_labels.png``, mode "L", values = class index); ``results.json`` then lists ``image_id`` ->
    ``label_map`` and ``images.json`` the class names as ``categories`` (id = class index). An image whose names
    are taken (the same stem in two folders; an input named ``a_labels.png`` next to ``a.png``) writes
    ``<stem>_1.png`` (and ``<stem>_1_labels.png``), ``_2``...

    A JPEG larger than ``max_pixels`` is decoded downscaled (see :func:`~mae_det.data.images.load_image`); its
    results, label map and ``images.json`` entry are still in the file's own frame (the picture is drawn smaller),
    so that they match annotations of the file. That frame is the file's size as the decode oriented it
    (:func:`~mae_det.data.images.load_image_and_file_size`), so no other image is ever rescaled.

    Args:
        predictor: the model.
        inputs: image paths, folders, glob patterns (see :func:`expand_inputs`).
        output_dir: created if needed; it must not hold an input (see :func:`check_output_dir`).
        batch_size: images read per step; those of one size share a forward pass (see :meth:`Predictor.run`).
        progress: show a progress bar over the images.
        max_pixels: the decoding limit of :func:`~mae_det.data.images.load_image`.
        min_side: a detection picture is enlarged by the smallest integer factor giving its shorter side at least
            this many pixels (see :func:`draw_instances`): at its own size a small image's labels hide its objects.

    Raises:
        ConfigError: the output folder holds an input or cannot be created.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files, failures = expand_inputs(inputs)
    out = check_output_dir(output_dir, files)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output folder {out}: {e.strerror or e}") from e
    summary = PredictionSummary(failures=list(failures))
    for item, reason in failures:
        logger.warning(f"{item}: {reason}")
    results: list[dict] = []
    used: set[str] = set()
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress)
    try:  # the json files of the images done are written whatever stops the run
        for start in range(0, len(files), batch_size):
            batch: list[tuple[Path, np.ndarray, tuple[int, int], dict]] = []
            for path in files[start : start + batch_size]:
                try:
                    image, file_size = load_image_and_file_size(path, max_pixels)
                    image = np.asarray(image)
                    batch.append((path, image, file_size, predictor.preprocess(image)))
                except ImageLoadError as e:
                    logger.warning(f"skipped unreadable image: {e}")
                    summary.failures.append((str(path), str(e).removeprefix(f"{path}: ")))
                except ValueError as e:  # preprocessing: too thin for the test resize
                    logger.warning(f"skipped {path}: {e}")
                    summary.failures.append((str(path), str(e)))
            for (path, image, file_size, _), instances in zip(batch, predictor.run([x for *_, x in batch])):
                image_id = len(summary.images) + 1
                names = unique_png_names(path, used, ("", "_labels") if predictor.semantic else ("",))
                png = names[0]
                decoded = (image.shape[1], image.shape[0])
                if file_size != decoded:
                    logger.warning(f"{path}: {file_size[0]}x{file_size[1]} was decoded at {decoded[0]}x{decoded[1]} "
                                   f"(pixel limit {max_pixels}); its results are written in the file's frame")
                if predictor.semantic:
                    Image.fromarray(draw_sem_seg(image, instances, predictor.metadata)).save(out / png)
                    labels = Image.fromarray(instances.numpy().astype(np.uint8), mode="L")
                    labels.resize(file_size, Image.NEAREST).save(out / names[1])
                    results.append({"image_id": image_id, "label_map": names[1]})
                else:
                    Image.fromarray(draw_detections(image, instances, predictor.metadata, min_side)).save(out / png)
                    results += (instances_to_coco_results(instances, image_id, predictor.metadata)
                                if file_size == decoded
                                else coco_results_in_file_frame(instances, image_id, predictor.metadata, file_size))
                summary.images.append({
                    "id": image_id, "file_name": str(path.resolve()), "height": file_size[1], "width": file_size[0],
                    "visualization": png,
                })
            bar.update(min(batch_size, len(files) - start))
    finally:
        bar.close()
        summary.num_detections = len(results)
        summary.results_json = out / "results.json"
        summary.images_json = out / "images.json"
        summary.results_json.write_text(json.dumps(results))
        summary.images_json.write_text(json.dumps({
            "info": {"description": "images of mae_det predict", "weights": predictor.cfg.MODEL.WEIGHTS},
            "images": summary.images,
            "categories": ([{"id": k, "name": n} for k, n in enumerate(predictor.metadata.stuff_classes)]
                           if predictor.semantic else coco_categories(predictor.metadata)),
            "annotations": [],
        }, indent=1))
    return summary


# ---- the demo report's picture ---------------------------------------------------------------------------
def _fit(image: np.ndarray, size: int) -> Image.Image:
    im = Image.fromarray(image)
    scale = size / max(im.size)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)


def side_by_side_detections(
    runs: Sequence[tuple[str, str, str]],
    image_paths: Sequence[str | os.PathLike],
    output_png: str | os.PathLike,
    confidence_threshold: float = 0.5,
    panel_size: int = 320,
    opts: Sequence[str] = (),
    ground_truth: str | os.PathLike | None = None,
    title: str = "",
) -> Path:
    """One PNG comparing initializations: a row per image, a column per run, the run's label on top.

    Every panel is drawn at ``panel_size`` (small images are enlarged first, so text and lines are sized to the
    panel) with one color per class, the same in every column.

    Args:
        runs: (label, config_path, weights_path) per column, e.g. ``("MAE", "out/mae/config.yaml",
            "out/mae/model_final.pth")``.
        image_paths: the images (e.g. a few validation images); each must be readable.
        output_png: written (parent folders created).
        confidence_threshold: detections drawn from this score.
        panel_size: the longer side of each panel in pixels.
        opts: ``KEY VALUE`` overrides applied to every run's config (e.g. ``MODEL.DEVICE cpu``).
        ground_truth: a COCO json holding the images (by file name): adds a first "ground truth" column.
        title: a line above the column labels (e.g. the score threshold).

    Raises:
        ImageLoadError: an image cannot be read.
        KeyError: an image is not in ``ground_truth``.
        DatasetError: ``ground_truth``'s categories are not the model's classes (:func:`ground_truth_instances`).
    """
    if not runs or not image_paths:
        raise ValueError("side_by_side_detections needs at least one run and one image")
    images = [np.asarray(load_image(p)) for p in image_paths]
    labels, columns = [], []
    for label, config_path, weights in runs:
        cfg = load_predict_cfg(config_path, [*opts, "MODEL.WEIGHTS", weights], confidence_threshold)
        predictor = Predictor(cfg)
        if ground_truth is not None and not columns:
            gt = ground_truth_instances(ground_truth, predictor.metadata)
            labels.append("ground truth")
            columns.append([_fit(draw_instances(im, predictor.metadata, *gt[Path(p).name], min_side=panel_size),
                                 panel_size) for im, p in zip(images, image_paths)])
        labels.append(label)
        columns.append([_fit(draw_detections(im, predictor([im])[0], predictor.metadata, panel_size), panel_size)
                        for im in images])
        del predictor
    font = ImageFont.load_default(size=max(12, panel_size // 16))
    title_h = font.size + 8 if title else 0
    header = title_h + font.size + 12
    pad = 6
    row_heights = [max(col[r].height for col in columns) for r in range(len(images))]
    width = len(columns) * (panel_size + pad) + pad
    canvas = Image.new("RGB", (width, header + sum(h + pad for h in row_heights)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((width // 2, title_h // 2 + 2), title, fill="black", font=font, anchor="mm")
    for c, (label, col) in enumerate(zip(labels, columns)):
        x = pad + c * (panel_size + pad)
        draw.text((x + panel_size // 2, title_h + (header - title_h) // 2), label, fill="black", font=font,
                  anchor="mm")
        y = header
        for panel, h in zip(col, row_heights):
            canvas.paste(panel, (x + (panel_size - panel.width) // 2, y))
            y += h + pad
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(output_png)
    return output_png
