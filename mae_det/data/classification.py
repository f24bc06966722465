"""Labeled ImageFolder-style data for classification evaluation (kNN, linear probe, fine-tuning).

Layout: ``root/<class_name>/**/<image>``, hidden files and folders (names starting with ".") skipped as in
pretraining; class indexes follow the sorted folder names, as torchvision's ``ImageFolder`` and the official MAE
fine-tuning code do, so label ids agree across tools and runs. Images are decoded with
:func:`mae_det.data.images.load_image`; an unreadable image never stops a run: it is skipped, logged and counted
(see :func:`collate_skipping`), and only a class left without any readable image is an error.

Training augmentation is reproducible across loader worker counts: with a ``seed``, every sample's transform runs
with python's, numpy's and torch's global generators seeded from (seed, epoch, index) (:func:`seeded_global_rngs`),
so its crop, flip, RandAugment and erasing draws do not depend on which worker (or how many) loaded it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import Dataset
from torchvision import transforms
from tqdm import tqdm

from .images import IMAGE_EXTENSIONS, DecodedImageCache, ImageLoadError, load_image
from .pretrain import list_images
from .seeding import sample_seed, seeded_global_rngs

logger = logging.getLogger(__name__)


class ClassificationDataError(ValueError):
    """A classification folder cannot be used; the one-line message names the folder and what was expected."""


class ImageFolderDataset(Dataset):
    """Images in class sub-folders; an item is ``(image, label, path)``, or ``(None, label, error)`` when unreadable.

    Args:
        root: folder with one sub-folder per class.
        transform: applied to the decoded RGB ``PIL.Image``.
        verify: run :meth:`verify` now. Without it, unreadable files are found while loading.
        classes: the label set of another split (its ``classes``); this folder's class sub-folders must be
            among them and take their indexes, so a validation split may hold a subset of the classes.
        progress: show the verification progress bar.
        seed: draw each sample's transform randomness from (seed, epoch, index) (see :meth:`set_epoch`) instead
            of the loading process's global generators (``None``: those, as torchvision's folders do).
        max_bad_fraction: with ``verify``, the largest fraction of unreadable images tolerated.
        cache: keeps decoded images in memory (filled by :meth:`verify` too); None decodes on every read.

    Attributes:
        classes: sorted class folder names; ``classes[label]`` names a label.
        samples: ``(path, label)`` pairs.
        present_classes: the class folders of this split (all of ``classes`` unless a label set was passed).
        skipped: paths found unreadable during verification.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        *,
        verify: bool = False,
        classes: Sequence[str] | None = None,
        progress: bool = True,
        seed: int | None = None,
        max_bad_fraction: float = 1.0,
        cache: DecodedImageCache | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.load = cache.load if cache is not None else load_image
        self.seed = seed
        self.epoch = 0
        if not self.root.is_dir():
            raise ClassificationDataError(f"classification folder not found: {self.root}")
        present = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not present:
            raise ClassificationDataError(
                f"no labels: {self.root} has no class sub-folders (expected {self.root}/<class_name>/<image files>)"
            )
        self.classes = list(classes) if classes is not None else present
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        unknown = [c for c in present if c not in self.class_to_idx]
        if unknown:
            raise ClassificationDataError(
                f"{self.root} has class folder(s) {unknown} that are not among the training classes {self.classes}"
            )
        self.present_classes = present
        self.samples: list[tuple[str, int]] = []
        for c in present:
            # Hidden entries are skipped as in pretraining: a tree copied from macOS has an AppleDouble "._"
            # sibling, with an image suffix but no image, next to every image.
            files = [str(p) for p in list_images(self.root / c)]
            if not files:
                raise ClassificationDataError(
                    f"class folder {self.root / c} has no image files (extensions: {', '.join(IMAGE_EXTENSIONS)})"
                )
            self.samples += [(f, self.class_to_idx[c]) for f in files]
        self.skipped: list[str] = []
        if verify:
            self.verify(progress, max_bad_fraction)

    def verify(self, progress: bool = True, max_bad_fraction: float = 1.0) -> None:
        """Decodes every image once (with a progress bar) and drops the unreadable ones, logged and counted in
        :attr:`skipped`.

        Raises:
            ClassificationDataError: a class folder is left without a readable image, or more than
                ``max_bad_fraction`` of the images are unreadable (the budget a run without verification
                applies while loading).
        """
        good = []
        skips = SkipCounter(str(self.root), max_bad_fraction)
        bar = tqdm(self.samples, desc=f"checking {self.root.name}", unit="img", leave=False, disable=not progress)
        for path, label in bar:
            try:
                self.load(path)
            except ImageLoadError as e:
                skips.update(0, [str(e)])  # logged as found: a verification of a big set takes a while
                self.skipped.append(path)
                continue
            skips.update(1, [])
            good.append((path, label))
        self.samples = good
        self.check_classes_covered(torch.tensor([lbl for _, lbl in good], dtype=torch.long))
        skips.check()

    def check_classes_covered(self, labels: torch.Tensor) -> None:
        """Raises naming the first class folder of this split without a readable image among ``labels``
        (the labels of the samples actually loaded)."""
        counts = torch.bincount(labels.cpu(), minlength=len(self.classes))
        for c in self.present_classes:
            if counts[self.class_to_idx[c]] == 0:
                raise ClassificationDataError(f"class folder {self.root / c} has no readable images")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch of the per-sample seeds; call it before the epoch's loader starts its workers."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[object | None, int, str]:
        path, label = self.samples[index]
        try:
            img = self.load(path)
        except ImageLoadError as e:
            return None, label, str(e)
        if self.transform is None:
            return img, label, path
        if self.seed is None:
            return self.transform(img), label, path
        with seeded_global_rngs(sample_seed(self.seed, self.epoch, index)):
            return self.transform(img), label, path


def collate_skipping(batch: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stacks the readable samples of a batch; returns ``(images, labels, load_errors)``.

    ``images`` is empty (``(0,)``) when nothing in the batch could be read. The error messages come back to
    the main process so skips are counted there even with loader workers.
    """
    good = [(x, y) for x, y, _ in batch if x is not None]
    errors = [msg for x, _, msg in batch if x is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), errors
    imgs = torch.stack([x for x, _ in good])  # (B, C, H, W)
    return imgs, torch.tensor([y for _, y in good], dtype=torch.long), errors


class SkipCounter:
    """Logs each load error once and raises when the skipped fraction exceeds ``max_fraction``."""

    def __init__(self, name: str, max_fraction: float = 0.1) -> None:
        self.name = name
        self.max_fraction = max_fraction
        self.skipped = 0
        self.seen = 0

    def update(self, num_loaded: int, errors: Sequence[str]) -> None:
        for msg in errors:
            logger.warning("skipping unreadable image: %s", msg)
        self.skipped += len(errors)
        self.seen += num_loaded + len(errors)

    def check(self) -> None:
        if self.seen and self.skipped / self.seen > self.max_fraction:
            raise ClassificationDataError(
                f"{self.name}: {self.skipped} of {self.seen} images are unreadable "
                f"(more than {self.max_fraction:.0%}); fix the data or raise the limit"
            )
        if self.skipped:
            logger.warning("%s: skipped %d unreadable image(s) of %d", self.name, self.skipped, self.seen)


def eval_transform(img_size: int, crop_pct: float = 0.875, interpolation: str = "bicubic",
                   mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                   ) -> Callable:
    """Resize to ``img_size / crop_pct`` + center crop + normalization (timm's eval pipeline); ImageNet's RGB
    statistics unless given. One ``mean`` value converts to grayscale first, as pretraining does."""
    tf = create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                          mean=tuple(mean), std=tuple(std))
    return grayscale_first(tf, mean)


def grayscale_first(tf: Callable, mean: Sequence[float]) -> Callable:
    """``tf`` for RGB statistics (3 ``mean`` values); behind a conversion to one grayscale channel for one value,
    as pretraining with MODEL.IN_CHANS 1 reads its images."""
    return tf if len(mean) == 3 else transforms.Compose([transforms.Grayscale(1), tf])


def auto_augment_problem(spec: str) -> str | None:
    """Why timm's auto-augment ``spec`` would fail (cannot be parsed, or mid-epoch), or None if it cannot.

    timm maps a posterize magnitude of 10 (increasing variant) or below 2.5 (plain variant) to 0 bits, which
    Pillow >= 13 rejects with a ValueError; with a noisy magnitude (``mstd``) that happens on a few images per
    epoch, so a run dies minutes in. The reachable magnitudes are checked here, before anything trains.
    """
    if not spec:
        return None
    try:
        built = create_transform(32, is_training=True, auto_augment=spec)
    except (AssertionError, ValueError, KeyError) as e:  # timm's parser asserts, often without a message
        return (f"{spec!r} is not a timm auto-augment string ({str(e).strip() or 'malformed section'}); expected "
                f"e.g. 'rand-m9-mstd0.5-inc1-mmax9'")
    ops = [op for t in getattr(built, "transforms", [built])
           for op in _augment_ops(t) if op.name.startswith("Posterize")]
    for op in ops:
        upper = op.magnitude_max or 10.0  # timm clips every drawn magnitude to [0, mmax or 10]
        if op.magnitude_std == float("inf"):
            reach = (0.0, op.magnitude)
        elif op.magnitude_std > 0:  # Gaussian draws: beyond 6 std is one draw in 10^9
            reach = (op.magnitude - 6 * op.magnitude_std, op.magnitude + 6 * op.magnitude_std)
        else:
            reach = (op.magnitude, op.magnitude)
        for magnitude in reach:
            magnitude = max(0.0, min(magnitude, upper))
            bits = op.level_fn(magnitude, op.hparams)[0]
            if bits < 1:
                return (f"{spec!r} can draw {op.name} at magnitude {magnitude:g}, which keeps {bits} bits and "
                        f"makes Pillow >= 13 raise mid-epoch; use magnitudes whose posterize keeps >= 1 bit, "
                        f"e.g. 'rand-m9-mstd0.5-inc1-mmax9' (the paper's RandAugment capped at 9)")
    return None


def _augment_ops(transform: object) -> list:
    """The timm ``AugmentOp``s of a RandAugment / AutoAugment / AugMix transform (none for other transforms)."""
    if hasattr(transform, "policy"):  # AutoAugment: a list of sub-policies, each a list of ops
        return [op for sub in transform.policy for op in sub]
    return list(getattr(transform, "ops", []))


def train_transform(
    img_size: int,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    rand_augment: str | None = "rand-m9-mstd0.5-inc1-mmax9",
    reprob: float = 0.25,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Callable:
    """Fine-tuning augmentation of the MAE recipe, all from timm: RandomResizedCrop + flip + RandAugment
    (a timm ``auto_augment`` string, ``None``/``""`` for none) + normalization (ImageNet's RGB statistics unless
    given; one ``mean`` value converts to grayscale first) + random erasing.

    The default caps RandAugment's noisy magnitude at 9 (``mmax9``): at magnitude 10 timm's increasing
    posterize keeps 0 bits, which Pillow >= 13 rejects with a ValueError.
    """
    tf = create_transform(
        img_size, is_training=True, scale=scale, hflip=hflip, color_jitter=None,
        auto_augment=rand_augment or None, interpolation=interpolation,
        re_prob=reprob, re_mode="pixel", re_count=1, mean=tuple(mean), std=tuple(std),
    )
    return grayscale_first(tf, mean)
