"""The embedded dataset: seeded, COCO-format instance segmentation of simple shapes on textured backgrounds.

Layout written under ``root`` (other tools rely on it)::

    images/{pool,train,val}/NNNNNN.png          detection images (file name = image id, 6 digits)
    annotations/instances_{pool,train,val}.json COCO json, RLE masks (exact, rings have holes)
    classification/{train,val}/<class>/NNNNNN.png  one shape per image, ImageFolder layout
    dataset_info.json                          counts, seed, sizes, generator version

Every image is drawn from its own random generator seeded by ``(seed, split, index)``, so the output depends only
on the config - not on the number of worker processes or on the order in which images are written. Later shapes
occlude earlier ones; the stored mask of an instance is exactly its visible pixels, instances left with too few
visible pixels are removed from both the image and the annotations, so every painted shape pixel is annotated.
Masks are RLE, so Detectron2 configs need ``INPUT.MASK_FORMAT bitmask``.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from ..checkpoint import atomic_write_text
from ..engine.predictor import check_output_dir

GENERATOR_VERSION = "1.0"
CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
DETECTION_SPLITS: tuple[str, ...] = ("pool", "train", "val")
CLASSIFICATION_SPLITS: tuple[str, ...] = ("train", "val")
# Stream ids that make every (split, index) draw from its own seed sequence.
_STREAM = {"pool": 0, "train": 1, "val": 2, "cls_train": 3, "cls_val": 4}


@dataclass(frozen=True)
class ShapesConfig:
    """What to generate. Sizes are fractions of ``image_size``; object size is the shape's outer radius.

    Attributes:
        image_size: Side of the square images in pixels.
        num_pool: Images of the large pretraining pool (annotated too; MAE ignores the labels).
        num_train: Images of the label-scarce detection training split.
        num_val: Images of the detection validation split.
        num_cls_train: Single-object classification training images (balanced over classes).
        num_cls_val: Single-object classification validation images.
        min_objects: Fewest shapes placed per detection image (before occlusion removes any).
        max_objects: Most shapes placed per detection image.
        min_size: Smallest shape radius as a fraction of ``image_size``.
        max_size: Largest shape radius as a fraction of ``image_size``.
        cls_min_size: Smallest radius in the classification split.
        cls_max_size: Largest radius in the classification split.
        min_visible_fraction: An instance whose visible area falls below this fraction of its full area is removed.
        min_visible_pixels: An instance with fewer visible pixels is removed.
        background_contrast: Scales each background's deviation from its mean color (1: the full textures,
            0: a flat color). Textures that compete with the shapes make every encoder's features mostly about
            the background.
        cls_background_contrast: The same for the classification split (None: ``background_contrast``). The
            demo flattens these backgrounds (0): with 100 textured images per class every encoder, a small CNN
            from scratch too, mostly memorizes backgrounds, and the check is meant to measure shape recognition.
        seed: Seed of every random draw.
        workers: Processes used for drawing (0: one per CPU core, at most 8). Does not change the output.
    """

    image_size: int = 96
    num_pool: int = 2000
    num_train: int = 200
    num_val: int = 200
    num_cls_train: int = 600
    num_cls_val: int = 300
    min_objects: int = 1
    max_objects: int = 6
    min_size: float = 0.08
    max_size: float = 0.25
    cls_min_size: float = 0.18
    cls_max_size: float = 0.4
    min_visible_fraction: float = 0.25
    min_visible_pixels: int = 16
    background_contrast: float = 1.0
    cls_background_contrast: float | None = None
    seed: int = 0
    workers: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"ShapesConfig.image_size must be >= 16, got {self.image_size}")
        for name in ("num_pool", "num_train", "num_val", "num_cls_train", "num_cls_val", "seed"):  # numpy: no seed < 0
            if getattr(self, name) < 0:
                raise ValueError(f"ShapesConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"ShapesConfig needs 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        for lo, hi in (("min_size", "max_size"), ("cls_min_size", "cls_max_size")):
            if not 0 < getattr(self, lo) <= getattr(self, hi) <= 0.5:
                raise ValueError(f"ShapesConfig needs 0 < {lo} <= {hi} <= 0.5, got {getattr(self, lo)}, "
                                 f"{getattr(self, hi)}")
        if self.min_visible_pixels < 1 or not 0.0 <= self.min_visible_fraction <= 1.0:
            raise ValueError(f"ShapesConfig needs min_visible_pixels >= 1 (an instance without pixels has no box) and "
                             f"min_visible_fraction in [0, 1], got {self.min_visible_pixels}, "
                             f"{self.min_visible_fraction}")
        if self.cls_min_size * self.image_size < 2:
            raise ValueError(f"ShapesConfig.cls_min_size: {self.cls_min_size} of {self.image_size} px is a radius under "
                             f"2 px, which can draw no pixel; a classification image must show its shape")
        for name in ("background_contrast", "cls_background_contrast"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"ShapesConfig.{name} must be in [0, 1], got {value}")


# ----------------------------------------------------------------------------------------------------- drawing
def _background(rng: np.random.Generator, size: int, contrast: float = 1.0) -> np.ndarray:
    """A textured background in [0, 1]: smooth noise, stripes, a gradient or a checkerboard, plus grain; its
    deviation from its mean color scaled by ``contrast``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size  # (S, S) each
    c0, c1 = rng.uniform(0.1, 0.9, size=(2, 3)).astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:  # smooth value noise: a coarse random grid, bicubically upsampled
        g = int(rng.integers(3, 9))
        coarse = rng.uniform(0.05, 0.95, size=(g, g, 3)).astype(np.float32)
        img = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    else:
        theta = rng.uniform(0, math.pi)
        along = xx * math.cos(theta) + yy * math.sin(theta)  # (S, S)
        if kind == 1:  # stripes
            t = 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(2, 8) * along + rng.uniform(0, 2 * math.pi))
        elif kind == 2:  # linear gradient
            t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
        else:  # checkerboard in rotated coordinates
            across = -xx * math.sin(theta) + yy * math.cos(theta)
            f = rng.uniform(2, 6)
            t = ((np.floor(along * f) + np.floor(across * f)) % 2).astype(np.float32)
            t = 0.25 + 0.5 * t
        img = c0 + (c1 - c0) * t[..., None]  # (S, S, 3)
    grain = rng.normal(0.0, rng.uniform(0.01, 0.05), size=(size, size, 3)).astype(np.float32)
    img = img + grain
    if contrast != 1.0:
        mean = img.reshape(-1, 3).mean(0)
        img = mean + contrast * (img - mean)
    return np.clip(img, 0.0, 1.0)


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Inside test for shape ``kind`` with outer radius ``radius``, at shape-frame coordinates (u, v)."""
    if kind == "circle":
        return u * u + v * v <= radius * radius
    if kind == "ring":
        r2 = u * u + v * v
        return (r2 <= radius * radius) & (r2 >= (0.55 * radius) ** 2)
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78 * radius
    if kind == "cross":
        au, av, arm, half = np.abs(u), np.abs(v), 0.3 * radius, 0.95 * radius
        return ((au <= half) & (av <= arm)) | ((au <= arm) & (av <= half))
    if kind == "triangle":
        normals = np.pi / 3 + 2 * np.pi / 3 * np.arange(3)  # edge normals of a regular triangle
        proj = u[..., None] * np.cos(normals) + v[..., None] * np.sin(normals)  # (..., 3)
        return (proj <= radius * 0.5).all(-1)
    if kind == "star":
        # Fold the angle into the half-sector [0, pi/5] between an outer tip (angle 0) and an inner vertex.
        sector = 2 * np.pi / 5
        theta = np.mod(np.arctan2(v, u), sector)
        theta = np.minimum(theta, sector - theta)
        r = np.hypot(u, v)
        px, py = r * np.cos(theta), r * np.sin(theta)
        tip = np.array([radius, 0.0])
        inner = 0.45 * radius * np.array([math.cos(np.pi / 5), math.sin(np.pi / 5)])
        normal = np.array([inner[1] - tip[1], tip[0] - inner[0]])  # points away from the origin
        return px * normal[0] + py * normal[1] <= float(normal @ tip)
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {CLASS_NAMES}")


class ShapeSpec(NamedTuple):
    """One shape to draw: 0-based class index into ``CLASS_NAMES``, center (pixels), outer radius, rotation."""

    kind: int
    cy: float
    cx: float
    radius: float
    angle: float


def shape_mask(spec: ShapeSpec, size: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """Rasterize ``spec`` (pixel centers inside the shape) in its bounding window of a ``size`` x ``size`` image.

    Returns:
        The (rows, cols) slices of the window, clipped to the image, and the bool mask inside it.
    """
    r = spec.radius
    y0, y1 = max(int(spec.cy - r) - 1, 0), min(int(spec.cy + r) + 2, size)
    x0, x1 = max(int(spec.cx - r) - 1, 0), min(int(spec.cx + r) + 2, size)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy + 0.5 - spec.cy, xx + 0.5 - spec.cx
    c, s = math.cos(spec.angle), math.sin(spec.angle)
    u, v = dx * c + dy * s, -dx * s + dy * c  # shape-frame coordinates
    return (slice(y0, y1), slice(x0, x1)), _shape_mask(CLASS_NAMES[spec.kind], u, v, r)


def random_specs(rng: np.random.Generator, size: int, kinds: list[int], radii: list[float]) -> list[ShapeSpec]:
    """Random centers and rotations; centers may sit half a radius from the border, so shapes can be cut by it."""
    specs = []
    for kind, radius in zip(kinds, radii):
        cy, cx = rng.uniform(0.5 * radius, size - 0.5 * radius, size=2)
        specs.append(ShapeSpec(int(kind), float(cy), float(cx), float(radius), float(rng.uniform(0, 2 * math.pi))))
    return specs


def shape_area(kind: str, radius: float) -> float:
    """Analytic area of a shape (before occlusion and border clipping)."""
    if kind == "circle":
        return math.pi * radius**2
    if kind == "ring":
        return math.pi * radius**2 * (1 - 0.55**2)
    if kind == "square":
        return (1.56 * radius) ** 2
    if kind == "cross":
        return 2 * (1.9 * radius) * (0.6 * radius) - (0.6 * radius) ** 2
    if kind == "triangle":
        return 3 * math.sqrt(3) / 4 * radius**2
    if kind == "star":  # 10 triangles (origin, tip, inner vertex)
        return 10 * 0.5 * radius * 0.45 * radius * math.sin(math.pi / 5)
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {CLASS_NAMES}")


def _shape_color(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A color that stands out from the background under the shape (best of a few draws)."""
    ref = background.reshape(-1, 3).mean(0)
    best, best_dist = None, -1.0
    for _ in range(8):
        color = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
        dist = float(np.abs(color - ref).sum())
        if dist > best_dist:
            best, best_dist = color, dist
        if dist > 0.6:
            break
    return best


def render_scene(
    rng: np.random.Generator, size: int, specs: list[ShapeSpec], min_visible_fraction: float,
    min_visible_pixels: int, background_contrast: float = 1.0,
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw shapes in order on a textured background, later ones on top.

    Args:
        rng: The image's own generator for background and colors (consumed in a fixed order).
        size: Image side in pixels.
        specs: The shapes, in drawing order.
        min_visible_fraction: Instances with less visible area than this fraction of their full area are dropped.
        min_visible_pixels: Instances with fewer visible pixels are dropped.
        background_contrast: See :class:`ShapesConfig`.

    Returns:
        The uint8 image (S, S, 3) in RGB and, for each kept instance in drawing order, its 0-based class index and
        its exact visible mask (S, S) bool.
    """
    image = _background(rng, size, background_contrast)
    owner = np.zeros((size, size), dtype=np.int32)  # 0 = background, i + 1 = shape i
    placed = []
    for i, spec in enumerate(specs):
        window, mask = shape_mask(spec, size)
        owner[window][mask] = i + 1
        color = _shape_color(rng, image[window][mask] if mask.any() else image)
        shade = rng.uniform(-0.15, 0.15, size=2)  # a mild linear shading across the shape
        placed.append((spec.kind, spec.radius, window, color, shade))
    instances = []
    for i, (kind, radius, window, color, shade) in enumerate(placed):
        visible = owner[window] == i + 1
        area = int(visible.sum())
        if area < min_visible_pixels or area < min_visible_fraction * shape_area(CLASS_NAMES[kind], radius):
            continue
        h, w = visible.shape
        ramp = shade[0] * np.linspace(-1, 1, h)[:, None] + shade[1] * np.linspace(-1, 1, w)[None, :]  # (h, w)
        patch = np.clip(color[None, None, :] * (1 + ramp[..., None]), 0, 1).astype(np.float32)  # (h, w, 3)
        image[window][visible] = patch[visible]
        full = np.zeros((size, size), dtype=bool)
        full[window] = visible
        instances.append((kind, full))
    # Grain on top of the shapes too, so a flat color is never a shortcut; masks stay exact.
    image = image + rng.normal(0.0, 0.015, size=image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), instances


def detection_sample(cfg: ShapesConfig, split: str, index: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """The detection image number ``index`` of ``split`` and its visible instances (0-based class, mask)."""
    rng = np.random.default_rng([cfg.seed, _STREAM[split], index])
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    kinds = rng.integers(len(CLASS_NAMES), size=n).tolist()
    radii = (rng.uniform(cfg.min_size, cfg.max_size, size=n) * cfg.image_size).tolist()
    specs = random_specs(rng, cfg.image_size, kinds, radii)
    return render_scene(rng, cfg.image_size, specs, cfg.min_visible_fraction, cfg.min_visible_pixels,
                        cfg.background_contrast)


def classification_sample(cfg: ShapesConfig, split: str, index: int) -> tuple[np.ndarray, int]:
    """The single-object image number ``index`` of classification ``split``; classes cycle so splits are balanced."""
    rng = np.random.default_rng([cfg.seed, _STREAM[f"cls_{split}"], index])
    kind = index % len(CLASS_NAMES)
    radius = float(rng.uniform(cfg.cls_min_size, cfg.cls_max_size)) * cfg.image_size
    # At least a quarter of the shape lies inside the image (centers >= radius / 2 from the border), so it is kept.
    contrast = cfg.background_contrast if cfg.cls_background_contrast is None else cfg.cls_background_contrast
    image, shown = render_scene(rng, cfg.image_size, random_specs(rng, cfg.image_size, [kind], [radius]), 0.0, 1,
                                contrast)
    if not shown:
        raise ValueError(f"classification {split} image {index}: its {CLASS_NAMES[kind]} of radius {radius:.2f} px "
                         f"has no visible pixel; raise ShapesConfig.cls_min_size")
    return image, kind


# -------------------------------------------------------------------------------------------------- encoding
def encode_instance(mask: np.ndarray) -> dict[str, Any]:
    """COCO fields of one instance from its exact mask: compressed RLE, mask area and tight XYWH box."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return {
        "segmentation": {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")},
        "area": int(mask.sum()),
        "bbox": [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)],
        "iscrowd": 0,
    }


def _write_png(path: Path, image: np.ndarray) -> None:
    # Compression 1: files ~1.5x larger than the default, written several times faster.
    if not cv2.imwrite(str(path), image[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"could not write image {path}")


def _detection_job(args: tuple[ShapesConfig, str, int, str]) -> list[tuple[int, dict[str, Any]]]:
    cfg, split, index, out_dir = args
    image, instances = detection_sample(cfg, split, index)
    _write_png(Path(out_dir) / f"{index + 1:06d}.png", image)
    return [(kind + 1, encode_instance(mask)) for kind, mask in instances]


def _classification_job(args: tuple[ShapesConfig, str, int, str]) -> None:
    cfg, split, index, out_dir = args
    image, kind = classification_sample(cfg, split, index)
    _write_png(Path(out_dir) / CLASS_NAMES[kind] / f"{index:06d}.png", image)


def coco_categories() -> list[dict[str, Any]]:
    """COCO categories with contiguous ids 1..K in ``CLASS_NAMES`` order."""
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)]


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, separators=(",", ":")))


def generate_shapes(
    root: str | os.PathLike, cfg: ShapesConfig, overwrite: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Generate the whole dataset under ``root`` and return the content of ``dataset_info.json``.

    Args:
        root: Output directory (created).
        cfg: What to generate.
        overwrite: Replace an existing dataset in ``root``; without it an existing one is an error.
        log: Receives one progress line per split (with its wall time; timings are not stored, so that the same
            config always writes the same bytes).

    Raises:
        FileExistsError: ``root`` already holds a dataset and ``overwrite`` is False.
        ConfigError: ``root`` is a file or lies below one (before anything is written).
    """
    root = check_output_dir(root, ())
    info_path = root / "dataset_info.json"
    # semantic/ is derived from annotations/ (write_semantic_split): a new dataset must not keep stale label maps.
    owned = [root / "images", root / "annotations", root / "classification", root / "semantic", info_path]
    if any(p.exists() for p in owned):
        if not overwrite:
            raise FileExistsError(f"{root} already holds a shapes dataset (found {info_path.name} or its folders); "
                                  f"pass overwrite=True / --overwrite to replace it")
        for p in owned:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    workers = cfg.workers or min(os.cpu_count() or 1, 8)
    pool = mp.get_context().Pool(workers) if workers > 1 else None
    imap = pool.imap if pool is not None else map
    counts: dict[str, int] = {}
    instances: dict[str, int] = {}
    try:
        for split in DETECTION_SPLITS:
            t0 = time.perf_counter()
            n = getattr(cfg, f"num_{split}")
            out_dir = root / "images" / split
            out_dir.mkdir(parents=True, exist_ok=True)
            images, annotations = [], []
            jobs = [(cfg, split, i, str(out_dir)) for i in range(n)]
            for i, encoded in enumerate(imap(_detection_job, jobs, **({"chunksize": 16} if pool else {}))):
                images.append({"id": i + 1, "file_name": f"{i + 1:06d}.png", "width": cfg.image_size,
                               "height": cfg.image_size})
                for category_id, fields in encoded:
                    annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category_id,
                                        **fields})
            coco = {
                "info": {"description": f"mae_det shapes, split {split}", "version": GENERATOR_VERSION,
                         "seed": cfg.seed},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": coco_categories(),
            }
            _write_json(root / "annotations" / f"instances_{split}.json", coco)
            counts[split], instances[split] = n, len(annotations)
            log(f"[shapes] {split}: {n} images, {len(annotations)} instances in {time.perf_counter() - t0:.1f}s")
        for split in CLASSIFICATION_SPLITS:
            t0 = time.perf_counter()
            n = getattr(cfg, f"num_cls_{split}")
            out_dir = root / "classification" / split
            for name in CLASS_NAMES[:n]:  # classes cycle: a split of fewer images than classes leaves some out,
                (out_dir / name).mkdir(parents=True, exist_ok=True)  # and an empty class folder is unusable
            jobs = [(cfg, split, i, str(out_dir)) for i in range(n)]
            for _ in imap(_classification_job, jobs, **({"chunksize": 16} if pool else {})):
                pass
            counts[f"cls_{split}"] = n
            log(f"[shapes] classification {split}: {n} images in {time.perf_counter() - t0:.1f}s")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    config = asdict(cfg)
    config.pop("workers")
    info = {
        "generator": "mae_det.data.shapes",
        "version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "classes": list(CLASS_NAMES),
        "counts": counts,
        "instances": instances,
        "mask_format": "rle",
        "config": config,
    }
    _write_json(info_path, info)
    return info


# ------------------------------------------------------------------------------------------ semantic split
SEMANTIC_SPLITS: tuple[str, ...] = ("train", "val")


def semantic_label_map(annotations: list[dict[str, Any]], rank: dict[int, int], height: int, width: int) -> np.ndarray:
    """(H, W) uint8 label map of one image from its COCO annotations: 0 = background, ``rank[category_id]`` on
    every instance pixel (the stored masks are the visible pixels, so instances do not overlap)."""
    label = np.zeros((height, width), dtype=np.uint8)
    for a in annotations:
        label[mask_utils.decode(a["segmentation"]).astype(bool)] = rank[a["category_id"]]
    return label


def write_semantic_split(root: str | os.PathLike, splits: tuple[str, ...] = SEMANTIC_SPLITS,
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes the semantic-segmentation view of a generated dataset: one label PNG per detection image.

    The labels come from the instance masks of ``annotations/instances_<split>.json`` (exactly the shapes drawn),
    so the images stay those of ``images/<split>/``. Background is a class (value 0, "background"), so every
    pixel is labelled and mIoU includes it; shape classes follow the json's categories in id order (values
    1..K). Layout (rewritten on every call)::

        semantic/<split>/NNNNNN.png   mode "L" label maps, same file names as images/<split>/
        semantic/classes.txt          one class name per line, line k = value k

    Returns:
        ``{"classes": [...], "counts": {split: images}}``.
    """
    root = Path(root)
    out_root = root / "semantic"
    if out_root.exists():
        shutil.rmtree(out_root)
    classes: list[str] = []
    counts = {}
    for split in splits:
        t0 = time.perf_counter()
        coco = json.loads((root / "annotations" / f"instances_{split}.json").read_text(encoding="utf-8"))
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        rank = {c["id"]: i + 1 for i, c in enumerate(cats)}
        split_classes = ["background", *(c["name"] for c in cats)]
        if classes and split_classes != classes:
            raise ValueError(f"instances_{split}.json has categories {split_classes[1:]}, other splits {classes[1:]}")
        classes = split_classes
        per_image: dict[int, list[dict[str, Any]]] = {}
        for a in coco["annotations"]:
            per_image.setdefault(a["image_id"], []).append(a)
        out_dir = out_root / split
        out_dir.mkdir(parents=True)
        for img in coco["images"]:
            label = semantic_label_map(per_image.get(img["id"], []), rank, img["height"], img["width"])
            path = out_dir / f"{Path(img['file_name']).stem}.png"
            if not cv2.imwrite(str(path), label, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
                raise OSError(f"could not write label map {path}")
        counts[split] = len(coco["images"])
        log(f"[shapes] semantic {split}: {counts[split]} label maps in {time.perf_counter() - t0:.1f}s")
    atomic_write_text(out_root / "classes.txt", "\n".join(classes) + "\n")
    return {"classes": classes, "counts": counts}
