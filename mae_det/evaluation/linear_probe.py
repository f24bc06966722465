"""Linear probing of a frozen encoder, as in the MAE paper: BatchNorm without affine, then a linear head.

The BatchNorm normalizes the feature scale, which differs a lot between pretraining methods, so one learning
rate fits all encoders. Two ways to feed the head:

- cached (default): features of the eval-transformed images are extracted once and the head trains on them for
  many epochs - the fast protocol for monitoring and CPU runs;
- augmented (``augment=True``): every epoch streams RandomResizedCrop + flip crops through the frozen encoder,
  as the official ``main_linprobe.py`` recipe does (90 epochs of ImageNet through the encoder: a GPU job).

The encoder never receives gradients, runs in eval mode, and its weights stay bit-identical.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.optim import Lars
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler
from tqdm import tqdm

from ..data.classification import (
    ClassificationDataError, ImageFolderDataset, SkipCounter, collate_skipping, eval_transform, grayscale_first,
)
from ..config.pretrain import check_min_lr
from ..data.images import DecodedImageCache
from ..solver.schedule import build_warmup_cosine_lr
from .knn import autocast, autocast_dtype, eval_mode, extract_folder_features, topk_accuracy

logger = logging.getLogger(__name__)


class LinearProbeHead(nn.Sequential):
    """``BatchNorm1d(D, affine=False)`` then ``Linear(D, num_classes)`` (weights trunc-normal std 0.01)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


def build_probe_optimizer(
    head: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """SGD or LARS (timm's ``Lars``) for the head; biases get neither weight decay nor LARS trust-ratio
    scaling, as in the MAE linear-probe recipe (which runs LARS with weight decay 0, hence ``always_adapt``)."""
    weights = [p for p in head.parameters() if p.ndim > 1]
    biases = [p for p in head.parameters() if p.ndim <= 1]
    if name == "lars":
        return Lars(
            [{"params": weights, "weight_decay": weight_decay, "always_adapt": True},
             {"params": biases, "weight_decay": 0.0, "always_adapt": False}],
            lr=lr, momentum=momentum,
        )
    if name == "sgd":
        return torch.optim.SGD(
            [{"params": weights, "weight_decay": weight_decay}, {"params": biases, "weight_decay": 0.0}],
            lr=lr, momentum=momentum,
        )
    raise ValueError(f"linear-probe optimizer must be 'lars' or 'sgd', got {name!r}")


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: float, lr: float,
                           min_lr: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step linear warmup + half cosine from ``lr`` to ``min_lr`` (each scaled by a group's ``lr_scale``,
    the layer decay); call ``step()`` after every optimizer step.

    Warmup is capped below the total so that a short run (e.g. a few epochs of a smoke test) still decays.
    """
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    warmup = min(round(warmup_steps), max(total_steps - 1, 0))
    return build_warmup_cosine_lr(optimizer, max(total_steps, 1), warmup, min_lr / lr)


def _probe_lr(base_lr: float, batch: int, min_lr: float) -> float:
    """``base_lr * batch / 256`` (the MAE recipe), refused below ``min_lr``: the cosine schedule would climb to it."""
    lr = base_lr * batch / 256
    check_min_lr("LINPROBE.MIN_LR", min_lr, lr, f"LINPROBE.BASE_LR x batch {batch}/256")
    return lr


def train_head(
    head: nn.Module,
    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    *,
    epochs: int,
    iters_per_epoch: int,
    lr: float,
    optimizer: str = "lars",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    warmup_epochs: float = 0.0,
    min_lr: float = 0.0,
    progress: bool = True,
) -> nn.Module:
    """Trains ``head`` with cross-entropy on the ``(features, labels)`` batches ``epoch_batches(epoch)`` yields."""
    opt = build_probe_optimizer(head, optimizer, lr, weight_decay, momentum)
    sched = warmup_cosine_schedule(opt, epochs * iters_per_epoch, warmup_epochs * iters_per_epoch, lr, min_lr)
    device = next(head.parameters()).device
    head.train()
    it = 0
    bar = tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        for feats, labels in epoch_batches(epoch):
            loss = F.cross_entropy(head(feats.to(device)), labels.to(device))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"linear probe: loss is {loss.item()} at epoch {epoch}, iteration {it}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            it += 1
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{opt.param_groups[0]['lr']:.3g}")
    head.eval()
    return head


def linear_probe_features(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 90,
    batch_size: int = 256,
    base_lr: float = 0.1,
    optimizer: str = "lars",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    warmup_epochs: float = 10,
    min_lr: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict:
    """Linear probe on pre-extracted (N, D) features; ``lr = base_lr * batch / 256`` as in the MAE recipe.

    Returns:
        ``{"linear_top1": %, "linear_top5": % (with >= 10 classes), "lr", "batch_size", "epochs"}``.
    """
    n = train_feats.shape[0]
    if n < 2:
        raise ValueError(f"linear probe needs at least 2 training samples (BatchNorm statistics), got {n}")
    batch = min(batch_size, n)
    lr = _probe_lr(base_lr, batch, min_lr)
    gen = torch.Generator().manual_seed(seed)
    head = LinearProbeHead(train_feats.shape[1], num_classes)
    head.load_state_dict(_seeded_head_state(train_feats.shape[1], num_classes, seed))
    head.to(device)

    def epoch_batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(n, generator=gen)
        # Keep a last batch of one sample out: BatchNorm cannot take a batch of one.
        for idx in order.split(batch):
            if len(idx) > 1:
                yield train_feats[idx], train_labels[idx]

    iters = sum(1 for s in range(0, n, batch) if min(batch, n - s) > 1)
    train_head(head, epoch_batches, epochs=epochs, iters_per_epoch=iters, lr=lr, optimizer=optimizer,
               weight_decay=weight_decay, momentum=momentum, warmup_epochs=warmup_epochs, min_lr=min_lr,
               progress=progress)
    with torch.no_grad():
        scores = torch.cat([head(f.to(device)).cpu() for f in val_feats.split(4096)])
    return _results(scores, val_labels, num_classes) | {"lr": lr, "batch_size": batch, "epochs": epochs}


def _seeded_head_state(dim: int, num_classes: int, seed: int) -> dict:
    """Initial head weights drawn from a seeded generator, independent of the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LinearProbeHead(dim, num_classes).state_dict()


def _results(scores: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    acc = topk_accuracy(scores, labels)
    out = {"linear_top1": acc[1]}
    if num_classes >= 10:
        out["linear_top5"] = acc[5]
    return out


def linear_probe_folders(
    encoder: nn.Module,
    train_root: str | os.PathLike,
    val_root: str | os.PathLike,
    *,
    img_size: int,
    pool: str = "cls",
    augment: bool = False,
    epochs: int = 90,
    batch_size: int = 256,
    base_lr: float = 0.1,
    optimizer: str = "lars",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    warmup_epochs: float = 10,
    min_lr: float = 0.0,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    feature_batch_size: int = 64,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    precision: str = "auto",
    seed: int = 0,
    progress: bool = True,
    max_bad_fraction: float = 0.1,
    cache: DecodedImageCache | None = None,
) -> dict:
    """Linear probe of a frozen encoder (already on ``device``) on a train/val pair of class folder trees;
    ``cache`` keeps the decoded images (the augmented probe reads the training images every epoch). ``mean`` /
    ``std``: the normalization the encoder was trained with (one value each: grayscale input).

    Returns:
        The :func:`linear_probe_features` results plus ``num_train``, ``num_val``, ``num_classes``, ``pool``,
        ``augment`` and ``optimizer``.

    Raises:
        ClassificationDataError: unusable folders, too many unreadable images, or fewer than 2 training images.
    """
    tf = eval_transform(img_size, crop_pct, mean=mean, std=std)
    train_set = ImageFolderDataset(train_root, tf, cache=cache)
    val_set = ImageFolderDataset(val_root, tf, classes=train_set.classes, cache=cache)
    _check_two_training_images(len(train_set), train_set.root)
    opts = dict(pool=pool, batch_size=feature_batch_size, device=device, num_workers=num_workers,
                precision=precision, progress=progress, max_bad_fraction=max_bad_fraction)
    val_feats, val_labels = extract_folder_features(encoder, val_set, **opts)
    recipe = dict(epochs=epochs, base_lr=base_lr, optimizer=optimizer, weight_decay=weight_decay,
                  momentum=momentum, warmup_epochs=warmup_epochs, min_lr=min_lr, progress=progress)
    if not augment:
        train_feats, train_labels = extract_folder_features(encoder, train_set, **opts)
        _check_two_training_images(len(train_labels), train_set.root)  # readable ones
        out = linear_probe_features(train_feats, train_labels, val_feats, val_labels, train_set.num_classes,
                                    batch_size=batch_size, seed=seed, device=device, **recipe)
        num_train = len(train_labels)
    else:
        out, num_train = _probe_augmented(encoder, train_set, val_feats, val_labels, img_size=img_size, pool=pool,
                                          mean=mean, std=std, batch_size=batch_size,
                                          feature_batch_size=feature_batch_size, device=device,
                                          num_workers=num_workers, precision=precision, seed=seed,
                                          max_bad_fraction=max_bad_fraction, **recipe)
    return out | {"num_train": num_train, "num_val": len(val_labels), "num_classes": train_set.num_classes,
                  "pool": pool, "augment": augment, "optimizer": optimizer}


def _check_two_training_images(n: int, root: os.PathLike) -> None:
    """The head's BatchNorm needs batch statistics of at least two samples."""
    if n < 2:
        raise ClassificationDataError(f"{root}: the linear probe needs at least 2 training images (BatchNorm "
                                      f"statistics), found {n}")


class _Chunks(Sampler[list[int]]):
    """Each batch of ``batches`` as consecutive lists of at most ``size`` indices."""

    def __init__(self, batches: BatchSampler, size: int):
        self.batches, self.size = batches, size

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.batches:
            yield from (b[i:i + self.size] for i in range(0, len(b), self.size))

    def __len__(self) -> int:
        return len(self.batches) * -(-self.batches.batch_size // self.size)


def _probe_augmented(
    encoder: nn.Module,
    train_set: ImageFolderDataset,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    img_size: int,
    pool: str,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    feature_batch_size: int,
    device: torch.device | str,
    num_workers: int,
    precision: str,
    seed: int,
    max_bad_fraction: float,
    epochs: int,
    base_lr: float,
    progress: bool,
    **recipe,
) -> tuple[dict, int]:
    train_set.transform = grayscale_first(create_transform(img_size, is_training=True, color_jitter=None,
                                                           interpolation="bicubic", mean=tuple(mean), std=tuple(std)),
                                          mean)
    train_set.seed = seed
    batch = min(batch_size, len(train_set))
    lr = _probe_lr(base_lr, batch, recipe.get("min_lr", 0.0))
    # An optimizer batch (the paper's 16384) is read and encoded in chunks of feature_batch_size images, so neither
    # the loader's prefetched batches nor the encoder's activations scale with it; the chunks of one shuffled batch
    # are the images a single loader batch would hold, in the same order.
    chunk = min(feature_batch_size, batch)
    chunks_per_batch = -(-batch // chunk)
    gen = torch.Generator().manual_seed(seed)
    batches = BatchSampler(RandomSampler(train_set, generator=gen), batch, drop_last=True)
    loader = DataLoader(train_set, batch_sampler=_Chunks(batches, chunk), num_workers=num_workers,
                        collate_fn=collate_skipping, pin_memory=torch.device(device).type == "cuda")
    dtype = autocast_dtype(device, precision)
    skips = SkipCounter(str(train_set.root), max_bad_fraction)
    head = LinearProbeHead(encoder.embed_dim, train_set.num_classes)
    head.load_state_dict(_seeded_head_state(encoder.embed_dim, train_set.num_classes, seed))
    head.to(device)

    def epoch_batches(epoch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        train_set.set_epoch(epoch)
        feats: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        for i, (imgs, chunk_labels, errors) in enumerate(loader):
            skips.update(len(chunk_labels), errors)
            if len(chunk_labels):
                # no_grad must not span the yield: grad mode is thread state and would leak into the head step.
                with torch.no_grad(), autocast(device, dtype):
                    feats.append(encoder.pooled_features(imgs.to(device, non_blocking=True), pool=pool).float())
                labels.append(chunk_labels)
            if (i + 1) % chunks_per_batch == 0:
                if sum(len(x) for x in labels) > 1:  # BatchNorm statistics need two samples
                    yield torch.cat(feats), torch.cat(labels)  # (B, D), (B,)
                feats, labels = [], []
        skips.check()

    with eval_mode(encoder):
        train_head(head, epoch_batches, epochs=epochs, iters_per_epoch=len(batches), lr=lr, progress=progress,
                   **recipe)
    with torch.no_grad():
        scores = torch.cat([head(f.to(device)).cpu() for f in val_feats.split(4096)])
    out = _results(scores, val_labels, train_set.num_classes)
    return out | {"lr": lr, "batch_size": batch, "epochs": epochs}, len(train_set)
