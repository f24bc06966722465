"""The detection / segmentation training loader with ``SEEDED_DRAWS``: batches that depend on the seed only.

Detectron2's train loader lets each loader worker draw augmentations from its own generator, seeded once when the
worker starts, and hands the mapped images to the aspect-ratio grouping in the order the workers deliver them. A
run's batches therefore change with ``DATALOADER.NUM_WORKERS``, and ``--resume`` restarts the image order and the
augmentation draws from the beginning. Here:

- the sampler's index stream (Detectron2's own samplers, one stream per rank) is cut into batches *before* any
  image is read, grouped by the dataset's recorded width > height as Detectron2's grouping does;
- each image is mapped under python's, numpy's and torch's generators seeded from (SEED, rank, its position in the
  rank's stream): flips, LSJ scales and crops belong to the sample, not to the worker that maps it;
- worker w of W maps batches w, w + W, ... and the loader returns them in order.

So the batch at iteration i is a function of (config, SEED, rank, i): the worker count changes the speed only, and
a run resumed at iteration i (:meth:`SeededBatches.start`) reads exactly the batches the uninterrupted run read
from there. An image that fails to decode (the mapper returns None) is replaced by another index drawn from the
sample's own seed, as Detectron2's ``MapDataset`` retries with another index.
"""
from __future__ import annotations

import itertools
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data.build import _train_loader_from_config
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from ..config.pretrain import ConfigError
from .detection import DatasetError
from .seeding import sample_seed, seeded_global_rngs

# Tries per sample before an undecodable replacement chain is an error; the trainer's skipped-image budget
# (DATASETS.MAX_BAD_FRACTION) normally stops a run long before.
MAX_TRIES = 64


class SeededBatches(IterableDataset):
    """One rank's training batches, each sample mapped under generators seeded from (seed, rank, position).

    Args:
        dataset: the training dataset dicts (Detectron2's format, with "width" and "height" when grouping).
        sampler: an index sampler whose every ``iter()`` restarts the same infinite per-rank stream (Detectron2's
            training samplers with a fixed seed).
        mapper: dataset dict -> model input dict, or None for an image that cannot be used.
        batch_size: images per batch of this rank.
        seed: the run's SEED.
        rank: this process's rank.
        group_by_aspect: batch images with width > height apart from the others (``ASPECT_RATIO_GROUPING``).

    Attributes:
        start: the first iteration to produce (set by a resumed trainer before the loader is iterated).
    """

    def __init__(self, dataset: list[dict], sampler: Sampler, mapper: Callable[[dict], dict | None], *,
                 batch_size: int, seed: int, rank: int, group_by_aspect: bool) -> None:
        if group_by_aspect:
            missing = next((d.get("file_name", i) for i, d in enumerate(dataset)
                            if "width" not in d or "height" not in d), None)
            if missing is not None:
                raise DatasetError(f"DATALOADER.ASPECT_RATIO_GROUPING needs every dataset dict's width and height; "
                                   f"{missing} has none")
            self.wide = np.array([d["width"] > d["height"] for d in dataset], dtype=bool)
        else:
            self.wide = np.zeros(len(dataset), dtype=bool)
        self.dataset = DatasetFromList(dataset, copy=False)  # serialized: workers share one buffer
        self.sampler = sampler
        self.mapper = mapper
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.start = 0

    def plan(self) -> Iterator[list[tuple[int, int]]]:
        """Batches of (stream position, dataset index), from iteration 0; reads no image."""
        buckets: tuple[list, list] = ([], [])
        for position, index in enumerate(self.sampler):
            bucket = buckets[int(self.wide[index])]
            bucket.append((position, index))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()

    def map_sample(self, position: int, index: int) -> dict:
        """The mapped sample at this stream position (an undecodable image is replaced, see the module doc)."""
        seed = sample_seed(self.seed, self.rank, position)
        replacements = random.Random(seed)
        for _ in range(MAX_TRIES):
            with seeded_global_rngs(seed):
                out = self.mapper(self.dataset[index])
            if out is not None:
                return out
            index = replacements.randrange(len(self.dataset))
            seed = replacements.getrandbits(63)
        raise RuntimeError(f"{MAX_TRIES} training images in a row could not be used (stream position {position})")

    def __iter__(self) -> Iterator[list[dict]]:
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        mine = itertools.islice(self.plan(), self.start + worker_id, None, num_workers)
        for batch in mine:
            yield [self.map_sample(position, index) for position, index in batch]


def _as_is(batch: Any) -> Any:
    return batch


def build_seeded_train_loader(dataset: list[dict], sampler: Sampler, mapper: Callable[[dict], dict | None], *,
                              batch_size: int, seed: int, rank: int, group_by_aspect: bool,
                              num_workers: int) -> DataLoader:
    """A DataLoader over :class:`SeededBatches` (its ``dataset``), yielding lists of mapped dicts in order."""
    batches = SeededBatches(dataset, sampler, mapper, batch_size=batch_size, seed=seed, rank=rank,
                            group_by_aspect=group_by_aspect)
    # Its own generator: creating the iterator must not draw from the global one (the model's stream).
    return DataLoader(batches, batch_size=None, num_workers=num_workers, collate_fn=_as_is,
                      generator=torch.Generator().manual_seed(sample_seed(seed)), persistent_workers=False)


def seeded_train_loader_from_config(cfg: CfgNode, mapper: Callable[[dict], dict | None]) -> DataLoader:
    """:func:`build_seeded_train_loader` from a detection config: Detectron2's dataset, sampler, per-process batch,
    grouping and worker settings, with ``TrainingSampler`` seeded from SEED (Detectron2 seeds it from numpy's
    state at that moment, which earlier draws would shift).

    Raises:
        ConfigError: SOLVER.IMS_PER_BATCH not divisible by the number of processes.
    """
    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is the total batch: it must be divisible "
                          f"by the {world} processes")
    args = _train_loader_from_config(cfg, mapper=mapper)
    sampler = args["sampler"]
    if type(sampler) is TrainingSampler:
        sampler = TrainingSampler(len(args["dataset"]), seed=sample_seed(cfg.SEED) % 2**31)
    return build_seeded_train_loader(
        args["dataset"], sampler, mapper, batch_size=args["total_batch_size"] // world, seed=cfg.SEED,
        rank=comm.get_rank(), group_by_aspect=args["aspect_ratio_grouping"], num_workers=args["num_workers"],
    )
