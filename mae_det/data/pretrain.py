"""Pretraining data: image sources, the MAE augmentation, and a process-count-independent sampler.

Sources: a flat folder (every image below it, recursively), an ImageFolder tree (one sub-folder per class) and the
images listed in a COCO json (annotations only give the per-image multi-hot labels of the supervised mode).

Reproducibility: every random draw of a sample (crop, flip, mask noise) comes from a ``torch.Generator`` seeded with
(seed, epoch, sample index), and :class:`GlobalBatchSampler` cuts a (seed, epoch) permutation into global batches
that the processes split by rank. The images of a global batch and their augmentations are therefore the same for
any number of processes or loader workers.

Robustness: an image that fails to decode is replaced by the next readable one (so batch shapes and the per-rank
split are unchanged), and reported back in the batch (``"bad"``) to be logged and counted by the training loop;
more failures than ``max_bad_fraction`` of the dataset end the run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import InterpolationMode

from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, DecodedImageCache, ImageLoadError, load_image
from .seeding import sample_seed

logger = logging.getLogger(__name__)



class DataError(ValueError):
    """A dataset cannot be used (empty, malformed index, too many unreadable images); one line naming the path."""


# ---- sources ---------------------------------------------------------------------------------------------
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(root: str | os.PathLike, unlisted: list[str] | None = None) -> list[Path]:
    """All image files below ``root`` (recursive, following links once, hidden entries skipped), sorted.

    A folder that cannot be listed (no permission, an I/O error) is left out with a warning naming it, and
    appended to ``unlisted`` when given.
    """
    found: list[Path] = []
    seen: set[str] = set()

    def skip(e: OSError) -> None:
        logger.warning("cannot list folder %s (%s): its images are left out", e.filename, e.strerror or e)
        if unlisted is not None:
            unlisted.append(str(e.filename))

    for dirpath, dirnames, filenames in os.walk(root, onerror=skip, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if _is_image(f)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def detect_source(path: str | os.PathLike) -> str:
    """"coco" for a .json file, "imagefolder" for a folder that holds only sub-folders, else "folder"."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise DataError(f"{path}: a file must be a COCO .json; give a folder for plain images")
        return "coco"
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    try:
        entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    except OSError as e:
        raise DataError(f"{path}: cannot list the folder ({e.strerror or e})") from e
    subdirs = [e for e in entries if e.is_dir()]
    if subdirs and not any(e.is_file() and _is_image(e.name) for e in entries):
        return "imagefolder"
    return "folder"


# The count target of a class that a crowd region marks: above any MAX_COUNT, so the loss clamps it to the top bin.
CROWD_COUNT = 1e6


class ImageSource:
    """Image paths with optional per-image labels.

    Attributes:
        paths: readable-looking image files, in a fixed order.
        labels: per image, the sorted tuple of its class indexes, one entry per instance (a COCO image with two
            circles lists the circle twice; ``None`` for unlabeled sources).
        crowds: per image, the sorted tuple of the classes that a COCO crowd region (``iscrowd``) marks: a group of
            an unknown number of instances, listed once in ``labels`` too (empty for other sources).
        class_names: names of the contiguous class indexes.
        missing: files listed by the index that do not exist (they count as unreadable images).
        root: the path the source was built from (for messages).
        base: the folder the paths are named relative to (:meth:`relative_names`): ``root``, or a COCO json's
            image root.
        unlisted: folders below ``root`` that could not be listed, so their images are not in ``paths``.
    """

    def __init__(
        self, paths: list[Path], root: str, labels: list[tuple[int, ...]] | None = None,
        class_names: Sequence[str] = (), missing: Sequence[str] = (), crowds: list[tuple[int, ...]] | None = None,
        base: str | os.PathLike | None = None, unlisted: Sequence[str] = (),
    ) -> None:
        self.paths, self.root, self.labels = paths, root, labels
        self.crowds = crowds if crowds is not None else [()] * len(paths)
        self.class_names, self.missing = list(class_names), list(missing)
        self.base, self.unlisted = str(Path(root if base is None else base)), list(unlisted)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def relative_names(self, indices: Iterable[int] | None = None) -> list[str]:
        """The paths of the images ``indices`` (default all, in index order) relative to ``base``: names that stay
        the same when the folder moves."""
        prefix = os.path.join(self.base, "")
        paths = self.paths if indices is None else [self.paths[i] for i in indices]
        return [s[len(prefix):] if s.startswith(prefix) else s for s in map(os.fspath, paths)]

    def listing_hash(self) -> str:
        """A hash of :meth:`relative_names`, in index order: it changes when an image is added, removed, renamed or
        moved to another index (a checkpoint's sample indices then name other files)."""
        names = "\0".join(self.relative_names()).encode("utf-8", "surrogateescape")
        return hashlib.blake2b(names, digest_size=16).hexdigest()


def folder_source(root: str | os.PathLike) -> ImageSource:
    unlisted: list[str] = []
    return ImageSource(list_images(root, unlisted), str(root), unlisted=unlisted)


def imagefolder_source(root: str | os.PathLike) -> ImageSource:
    """Class sub-folders of ``root`` in sorted order, as torchvision's ImageFolder indexes them."""
    root = Path(root)
    try:
        classes = sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"{root}: cannot list the folder ({e.strerror or e})") from e
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected an ImageFolder tree root/<class>/<image>)")
    paths, labels, unlisted = [], [], []
    for idx, name in enumerate(classes):
        files = list_images(root / name, unlisted)
        if not files:
            logger.warning("class folder %s has no images", root / name)
        paths += files
        labels += [(idx,)] * len(files)
    return ImageSource(paths, str(root), labels, classes, unlisted=unlisted)


def coco_source(json_path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> ImageSource:
    """The images of a COCO json; category ids (any, e.g. non-contiguous) map to sorted contiguous indexes.

    Images without annotations get no labels (a valid all-negative sample); annotations that name an unknown
    image or category are skipped with a warning; files that do not exist are returned in ``missing``. Ids written
    as strings of digits ("7") are read as the integers they spell, for annotations as for images. A crowd
    annotation marks its class present and is recorded in ``crowds`` (how many instances it covers is unknown).
    """
    json_path = Path(json_path)
    root = Path(image_root) if image_root else json_path.parent
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise DataError(f"{json_path}: COCO json not found") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{json_path}: invalid json ({e.msg} at line {e.lineno} column {e.colno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{json_path}: cannot read ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{json_path}: not a COCO json (no 'images' list)")
    cats = data.get("categories") or []
    try:
        cat_ids = sorted({int(c["id"]) for c in cats})
        cat_names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
        images = [(int(im["id"]), str(im["file_name"])) for im in data["images"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{json_path}: malformed 'images' or 'categories' entry ({type(e).__name__}: {e})") from e
    cat_index = {cid: i for i, cid in enumerate(cat_ids)}
    image_labels: dict[int, list[int]] = {img_id: [] for img_id, _ in images}
    image_crowds: dict[int, set[int]] = {img_id: set() for img_id, _ in images}
    skipped = Counter()
    for ann in data.get("annotations") or []:
        if not isinstance(ann, dict):
            skipped["malformed entry"] += 1
            continue
        img_id, cat_id = _int_id(ann.get("image_id")), _int_id(ann.get("category_id"))
        if img_id not in image_labels:
            skipped["unknown image_id"] += 1
        elif cat_id not in cat_index:
            skipped["unknown category_id"] += 1
        elif ann.get("iscrowd"):
            if cat_index[cat_id] not in image_crowds[img_id]:
                image_labels[img_id].append(cat_index[cat_id])
            image_crowds[img_id].add(cat_index[cat_id])
        else:
            image_labels[img_id].append(cat_index[cat_id])
    for reason, n in skipped.items():
        logger.warning("%s: skipped %d annotations (%s)", json_path, n, reason)
    paths, labels, crowds, missing, seen = [], [], [], [], set()
    for img_id, file_name in images:
        if img_id in seen:
            logger.warning("%s: duplicate image id %d (%s) ignored", json_path, img_id, file_name)
            continue
        seen.add(img_id)
        p = root / file_name
        if not p.is_file():
            missing.append(str(p))
            continue
        paths.append(p)
        labels.append(tuple(sorted(image_labels[img_id])))
        crowds.append(tuple(sorted(image_crowds[img_id])))
    return ImageSource(paths, str(json_path), labels, [cat_names[c] for c in cat_ids], missing, crowds, base=root)


def _int_id(value: Any) -> Any:
    """An annotation's COCO id as the integer it spells ("7" -> 7), else as it is (then unknown if not an int)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def build_source(source: str, path: str, image_root: str = "") -> ImageSource:
    """Builds the named source (``auto`` detects it), raising :class:`DataError` when it holds no image."""
    kind = detect_source(path) if source == "auto" else source
    if kind == "coco":
        src = coco_source(path, image_root or None)
    elif not Path(path).is_dir():
        raise DataError(f"{path}: DATA.SOURCE {kind} needs a folder")
    else:
        src = imagefolder_source(path) if kind == "imagefolder" else folder_source(path)
    if not src.paths:
        hint = f" ({len(src.missing)} listed files do not exist, first: {src.missing[0]})" if src.missing else ""
        raise DataError(f"{path}: no images found (source {kind}){hint}")
    return src


# ---- augmentation ----------------------------------------------------------------------------------------
def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded with :func:`sample_seed`."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(torch.empty(()).uniform_(lo, hi, generator=g))


class CropFlip(NamedTuple):
    """One sample's augmentation parameters: the crop box in the (EXIF-oriented) image, the flip, then the
    counter-clockwise quarter turns and the order of the RGB channels (None: as stored)."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    quarter_turns: int = 0
    channels: tuple[int, ...] | None = None


class PretrainTransform:
    """RandomResizedCrop (bicubic) + optional horizontal flip + normalization, with an explicit generator.

    The crop sampling follows torchvision's RandomResizedCrop (10 tries of area and log-uniform aspect ratio,
    then a centre crop clamped to the ratio range). :meth:`sample` is the one sampling of the parameters: the
    PIL path here and the GPU tensor path (:mod:`mae_det.data.gpu_decode`) both apply what it draws.

    ``rot90`` (a random number of quarter turns; with ``hflip`` the 8 symmetries of the square) and
    ``channel_shuffle`` (a random order of the RGB channels) preserve what an image contains, so they suit
    image-level labels such as instance counts on data without a canonical orientation or class colors.
    """

    def __init__(
        self, img_size: int, scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True, mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
        rot90: bool = False, channel_shuffle: bool = False,
    ) -> None:
        if channel_shuffle and len(mean) != 3:
            raise ValueError(f"channel_shuffle needs 3 channels, got mean {tuple(mean)}")
        self.img_size, self.scale, self.ratio, self.hflip = img_size, tuple(scale), tuple(ratio), hflip
        self.rot90, self.channel_shuffle = rot90, channel_shuffle
        self.mean, self.std = list(mean), list(std)

    def crop_params(self, width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w) of the crop."""
        area = width * height
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(g, *self.scale)
            aspect = math.exp(_uniform(g, *log_r))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=g))
                left = int(torch.randint(0, width - w + 1, (), generator=g))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def sample(self, width: int, height: int, g: torch.Generator) -> CropFlip:
        """The crop of a ``width`` x ``height`` image, the flip, the quarter turns and the channel order, drawn
        from ``g`` in this order (nothing is drawn for a disabled option, so the defaults keep their draws)."""
        top, left, h, w = self.crop_params(width, height, g)
        flip = self.hflip and float(torch.rand((), generator=g)) < 0.5
        turns = int(torch.randint(0, 4, (), generator=g)) if self.rot90 else 0
        channels = tuple(torch.randperm(3, generator=g).tolist()) if self.channel_shuffle else None
        return CropFlip(top, left, h, w, flip, turns, channels)

    def __call__(self, img: Image.Image, g: torch.Generator, normalize: bool = True) -> torch.Tensor:
        """RGB PIL image -> (C, img_size, img_size) float tensor; C = len(mean) (1 converts to grayscale).
        ``normalize=False``: the uint8 pixels before :meth:`normalize`."""
        return self.apply(img, self.sample(img.width, img.height, g), normalize)

    def apply(self, img: Image.Image, p: CropFlip, normalize: bool = True) -> torch.Tensor:
        """The crop, resize, flip, rotation, channel order and normalization of :meth:`__call__` with given
        parameters."""
        if len(self.mean) == 1:
            img = img.convert("L")
        img = TF.resized_crop(img, p.top, p.left, p.height, p.width, [self.img_size, self.img_size],
                              InterpolationMode.BICUBIC)
        if p.flip:
            img = TF.hflip(img)
        x = turn_and_shuffle(TF.pil_to_tensor(img), p)  # (C, S, S) uint8
        return self.normalize(x) if normalize else x

    def mean_std(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and std as (C, 1, 1) tensors on ``device`` (made once by GPU callers: a tensor built from host
        data makes the host wait for the device)."""
        return tuple(torch.tensor(v, device=device).view(-1, 1, 1) for v in (self.mean, self.std))

    def normalize(self, x: torch.Tensor, mean_std: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """uint8 pixels (..., C, S, S) -> the float images, on ``x``'s device: the last step of :meth:`apply`, which
        a loader on a GPU leaves to the GPU (4x fewer bytes through the workers' shared memory, the pinned copy and
        the host-to-device copy). ``mean_std``: :meth:`mean_std` on that device."""
        return normalize_pixels(x, *(mean_std if mean_std is not None else self.mean_std(x.device)))


def normalize_pixels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Pixel values in [0, 255] (uint8, or float and then in place) -> scaled to [0, 1], minus ``mean``, over
    ``std``: the one normalization of every pretraining data path."""
    return x.float().div_(255.0).sub_(mean).div_(std)


def turn_and_shuffle(x: torch.Tensor, p: CropFlip) -> torch.Tensor:
    """(C, S, S) -> the same turned by ``p.quarter_turns`` (counter-clockwise) with channels in ``p.channels``."""
    if p.quarter_turns:
        x = torch.rot90(x, p.quarter_turns, dims=(1, 2))
    return x[list(p.channels)] if p.channels is not None else x


# ---- dataset ---------------------------------------------------------------------------------------------
class PretrainDataset(Dataset):
    """Indexed by ``(epoch, index)``; returns ``{"image", "noise", "target", "bad"}``.

    Args:
        source: the images (and labels).
        transform: the augmentation.
        seed: global seed of the per-sample generators.
        num_patches: length of the per-sample mask noise (0 = none, e.g. supervised mode).
        num_classes: length of the ``target`` (0 = no labels): multi-hot, or per-class instance counts.
        counts: the target counts each class's instances instead of marking it present.
        max_bad: largest number of unreadable images tolerated; after ``max_bad + 1`` consecutive failures the
            sample is a zero image and its ``bad`` list alone proves the limit exceeded.
        max_pixels: decode budget per image.
        normalize: False: ``image`` is the uint8 pixels, for the GPU to normalize (:class:`DeviceNormalize`).
        cache: keeps decoded images in memory (the same pixels, decoded once); None decodes on every read.
    """

    def __init__(
        self, source: ImageSource, transform: PretrainTransform, *, seed: int, num_patches: int = 0,
        num_classes: int = 0, max_bad: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, counts: bool = False,
        normalize: bool = True, cache: DecodedImageCache | None = None,
    ) -> None:
        if num_classes and source.labels is None:
            raise DataError(f"{source.root}: this source has no labels")
        self.source, self.transform, self.seed = source, transform, seed
        self.num_patches, self.num_classes, self.counts = num_patches, num_classes, counts
        self.max_bad, self.max_pixels, self.normalize, self.cache = max_bad, max_pixels, normalize, cache
        self.load = cache.load if cache is not None else load_image

    def __len__(self) -> int:
        return len(self.source.paths)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        n = len(self)
        bad: list[tuple[int, str]] = []
        for attempt in range(min(self.max_bad + 1, n)):
            j = (index + attempt) % n
            try:
                img = self.read(j)
                break
            except ImageLoadError as e:
                bad.append((j, str(e)))
        else:
            # Every try failed: the caller's count of ``bad`` now exceeds ``max_bad`` (or covers the whole
            # dataset) and it stops the run with a clean message, which an exception raised in a loader
            # worker would bury in a traceback.
            img = None
        g = sample_generator(self.seed, epoch, index)
        sample = self.augment(img, g)
        noise = torch.rand(self.num_patches, generator=g)  # (L,)
        target = torch.zeros(self.num_classes)
        if self.num_classes and self.counts:
            target += torch.bincount(torch.tensor(self.source.labels[j], dtype=torch.long), minlength=self.num_classes)
            # A crowd region is a group of many: the top count bin ("max_count or more"), whatever the cap.
            target[list(self.source.crowds[j])] = CROWD_COUNT
        elif self.num_classes:
            target[list(self.source.labels[j])] = 1.0
        return {**sample, "noise": noise, "target": target, "bad": bad}

    def read(self, index: int) -> Any:
        """File ``index``, decoded (a PIL image); raises :class:`ImageLoadError`."""
        return self.load(self.source.paths[index], self.max_pixels)

    def augment(self, item: Any, g: torch.Generator) -> dict:
        """``{"image": (C, S, S)}`` of what :meth:`read` returned (None: no readable image, a zero image)."""
        if item is None:
            t = self.transform
            return {"image": torch.zeros(len(t.mean), t.img_size, t.img_size,
                                         dtype=torch.float32 if self.normalize else torch.uint8)}
        return {"image": self.transform(item, g, self.normalize)}


def collate_pretrain(samples: list[dict]) -> dict:
    """Stacks tensors; concatenates the lists of unreadable images."""
    return {
        "image": torch.stack([s["image"] for s in samples]),  # (B, C, S, S)
        "noise": torch.stack([s["noise"] for s in samples]),  # (B, L)
        "target": torch.stack([s["target"] for s in samples]),  # (B, K)
        "bad": [b for s in samples for b in s["bad"]],
    }


class GlobalBatchSampler(Sampler):
    """Yields this rank's share of each global batch as lists of ``(epoch, index)`` keys.

    The epoch's order is ``randperm(N)`` from (seed, epoch); global batch ``b`` is the slice
    ``[b * G, (b + 1) * G)`` of it with ``G = batch_size * world_size``, and rank ``r`` takes its ``r``-th
    sub-slice of ``batch_size``. An incomplete last global batch is dropped.

    Args:
        num_samples: dataset size N.
        batch_size: per-rank batch.
        world_size, rank: the process group.
        seed: order seed.
        num_batches: batches per epoch (default ``N // G``; fewer to end epochs on whole optimizer steps).
    """

    def __init__(
        self, num_samples: int, batch_size: int, *, world_size: int = 1, rank: int = 0, seed: int = 0,
        num_batches: int | None = None,
    ) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.world_size, self.rank, self.seed = world_size, rank, seed
        full = num_samples // (batch_size * world_size)
        self.num_batches = full if num_batches is None else min(num_batches, full)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Selects the epoch's permutation and skips its first ``start_batch`` batches (mid-epoch resume)."""
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return max(self.num_batches - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(self.num_samples, generator=sample_generator(self.seed, self.epoch, -1))
        G = self.batch_size * self.world_size
        for b in range(self.start, self.num_batches):
            lo = b * G + self.rank * self.batch_size
            yield [(self.epoch, int(i)) for i in order[lo : lo + self.batch_size]]
