"""Feature extraction from the shared ViT encoder and weighted k-NN classification (DINO's protocol).

k-NN top-1 on a small labeled set is the cheap quality signal of a pretraining run: no training, one pass of
the encoder over the images. Features are L2-normalized; each test image takes its ``k`` most cosine-similar
training images, which vote for their class with weight ``exp(similarity / T)``.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.classification import (
    ClassificationDataError, ImageFolderDataset, SkipCounter, collate_skipping, eval_transform,
)
from ..utils.precision import bf16_native

logger = logging.getLogger(__name__)


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; ``None`` means plain fp32.

    ``"auto"`` picks bf16 only where the hardware runs it natively (on CPUs without AVX512-bf16/AMX, bf16
    matmuls are emulated and far slower than fp32). ``"fp16"`` is for CUDA only.
    """
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if bf16_native(device.type) else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError(f"precision 'fp16' needs a CUDA device, got {device}; use 'bf16' or 'fp32'")
        return torch.float16
    raise ValueError(f"precision must be one of 'auto', 'fp32', 'bf16', 'fp16', got {precision!r}")


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration; the module's previous train/eval mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def extract_features(
    encoder: nn.Module,
    loader: DataLoader,
    *,
    pool: str = "cls",
    device: torch.device | str = "cpu",
    precision: str = "auto",
    desc: str = "features",
    progress: bool = True,
    skips: SkipCounter | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the unmasked encoder over a loader of :func:`collate_skipping` batches.

    Args:
        encoder: a :class:`~mae_det.modeling.vit.VisionTransformer` (or subclass, e.g. the MAE model).
        loader: yields ``(images, labels, load_errors)``.
        pool: ``"cls"`` token or ``"mean"`` of the patch tokens.
        precision: see :func:`autocast_dtype`.
        skips: counts the images that could not be read.

    Returns:
        ``(features, labels)``: (N, D) float32 and (N,) int64 on the CPU, for the readable images in loader order.

    Raises:
        ClassificationDataError: no image of the loader was readable (named by ``skips``, else by ``desc``).
    """
    dtype = autocast_dtype(device, precision)
    feats, labels = [], []
    with eval_mode(encoder), torch.no_grad():
        for imgs, y, errors in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            if skips is not None:
                skips.update(len(y), errors)
            if not len(y):
                continue
            with autocast(device, dtype):
                f = encoder.pooled_features(imgs.to(device, non_blocking=True), pool=pool)  # (B, D)
            feats.append(f.float().cpu())
            labels.append(y)
    if not feats:
        where = skips.name if skips is not None else desc
        raise ClassificationDataError(f"{where}: no readable images to extract features from")
    return torch.cat(feats), torch.cat(labels)


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-NN on cosine similarity.

    Args:
        train_feats: (M, D) bank features (normalized here).
        train_labels: (M,) int labels in ``[0, num_classes)``.
        test_feats: (N, D) query features.
        k: neighbours per query (capped at M).
        temperature: T in the vote weight ``exp(sim / T)``.
        num_classes: number of classes (default: ``max(train_labels) + 1``).
        chunk_size: queries per similarity matrix, bounding memory to (chunk_size, M).

    Returns:
        ``(predictions, scores)``: (N,) top-1 classes and (N, num_classes) summed vote weights, each scaled by
        ``exp(-s / T)`` for the query's highest similarity ``s`` (the nearest neighbour's vote is 1), ``-inf`` for a
        class no neighbour voted for (so a top-5 over fewer than 5 voted classes does not count unvoted ones).
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_feats.shape[0]} train features but {train_labels.shape[0]} labels")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, train_feats.shape[0])
    bank = F.normalize(train_feats.float(), dim=1)  # (M, D)
    labels = train_labels.to(bank.device).long()
    scores = []
    for q in F.normalize(test_feats.float(), dim=1).to(bank.device).split(chunk_size):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (B, k)
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device)
        # exp((sim - the nearest's sim) / T): a common factor per query, which leaves every vote finite (<= 1); the
        # plain exp(sim / T) overflows float32 to inf for T below ~0.0113, and a row of infs ranks no class first.
        votes.scatter_add_(1, labels[idx], ((sim - sim[:, :1]) / temperature).exp())  # (B, C)
        voted = torch.zeros_like(votes, dtype=torch.bool).scatter_(1, labels[idx], True)
        scores.append(votes.masked_fill(~voted, float("-inf")))
    scores_t = torch.cat(scores)
    return scores_t.argmax(dim=1), scores_t


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Percent of rows whose true label is among the ``k`` highest scores, per ``k`` (capped at the class count);
    a score of ``-inf`` ranks nowhere."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (N, kmax)
    hit = (top == labels.to(top.device)[:, None]) & (scores.gather(1, top) > float("-inf"))
    return {k: 100.0 * hit[:, :k].any(dim=1).float().mean().item() for k in ks}


def folder_loader(dataset: ImageFolderDataset, batch_size: int, num_workers: int, device: torch.device | str,
                  shuffle: bool = False, drop_last: bool = False, generator: torch.Generator | None = None,
                  ) -> DataLoader:
    """A loader over an :class:`ImageFolderDataset` that skips unreadable images (:func:`collate_skipping`)."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
        collate_fn=collate_skipping, pin_memory=torch.device(device).type == "cuda",
        persistent_workers=False, generator=generator,
    )


def extract_folder_features(
    encoder: nn.Module,
    dataset: ImageFolderDataset,
    *,
    pool: str,
    batch_size: int,
    device: torch.device | str,
    num_workers: int,
    precision: str = "auto",
    progress: bool = True,
    max_bad_fraction: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every readable image in a class folder tree; fails for a class left without any,
    or when more than ``max_bad_fraction`` of the images are unreadable."""
    skips = SkipCounter(str(dataset.root), max_bad_fraction)
    feats, labels = extract_features(
        encoder, folder_loader(dataset, batch_size, num_workers, device), pool=pool, device=device,
        precision=precision, desc=f"features {dataset.root.name}", progress=progress, skips=skips,
    )
    dataset.check_classes_covered(labels)
    skips.check()
    return feats, labels


def knn_eval_folders(
    encoder: nn.Module,
    train_root: str | os.PathLike,
    val_root: str | os.PathLike,
    *,
    img_size: int,
    k: int = 20,
    temperature: float = 0.07,
    pool: str = "cls",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    precision: str = "auto",
    progress: bool = True,
    max_bad_fraction: float = 0.1,
) -> dict:
    """k-NN accuracy of an encoder on a labeled train/val pair of class folder trees.

    The encoder must already be on ``device``; it runs in eval mode without gradients and is put back in its
    previous train/eval mode, so the pretraining monitor can call this on the live model between epochs.
    ``mean`` / ``std``: the normalization the encoder was trained with (one value each: grayscale input).

    Returns:
        ``{"knn_top1": %, "knn_top5": % (only with >= 10 classes), "num_train", "num_val", "num_classes",
        "k", "temperature", "pool"}``.
    """
    tf = eval_transform(img_size, crop_pct, mean=mean, std=std)
    train_set = ImageFolderDataset(train_root, tf)
    val_set = ImageFolderDataset(val_root, tf, classes=train_set.classes)
    opts = dict(pool=pool, batch_size=batch_size, device=device, num_workers=num_workers, precision=precision,
                progress=progress, max_bad_fraction=max_bad_fraction)
    train_feats, train_labels = extract_folder_features(encoder, train_set, **opts)
    val_feats, val_labels = extract_folder_features(encoder, val_set, **opts)
    _, scores = knn_classify(train_feats, train_labels, val_feats, k, temperature, train_set.num_classes)
    acc = topk_accuracy(scores, val_labels)
    out = {"knn_top1": acc[1]}
    if train_set.num_classes >= 10:
        out["knn_top5"] = acc[5]
    out.update(num_train=len(train_labels), num_val=len(val_labels), num_classes=train_set.num_classes,
               k=min(k, len(train_labels)), temperature=temperature, pool=pool)
    return out
