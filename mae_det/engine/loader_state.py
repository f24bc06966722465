"""An exact ``--resume`` for Detectron2's own train loader (``SEEDED_DRAWS False``) where one is possible.

Detectron2's loader maps images with the process's global numpy generator and reads its sampler from the start,
and the model draws drop path and RoI samples from torch's global generator; a resumed run therefore replays other
draws. In one process with ``DATALOADER.NUM_WORKERS 0`` everything it draws lives in this process, so
:class:`LoaderStateHook` checkpoints it: the number of samples the loader has read, python's, numpy's and torch's
generator states (and CUDA's), and the retry generator of Detectron2's ``MapDataset``. A resumed run skips the
samples already read, restores the generators and continues with the uninterrupted run's draws.

It is exact while every batch takes exactly its images from the sampler: aspect-ratio grouping with an image
waiting in the other group's bucket at the checkpoint, like loader workers or several processes, makes the state
unsaveable, and the resume then warns that it replays the draws. ``make parity``'s config (square images, one
process, 0 workers) always qualifies.
"""
from __future__ import annotations

import itertools
import logging
import random
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from detectron2.data.common import AspectRatioGroupedDataset, MapDataset, ToIterableDataset
from detectron2.engine import hooks
from detectron2.utils import comm
from torch.utils.data import DataLoader, Sampler

logger = logging.getLogger(__name__)


class _SkipStart(Sampler):
    """A sampler's stream without its first ``skip`` indices."""

    def __init__(self, sampler: Sampler, skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)


def _parts(loader: Any) -> tuple[AspectRatioGroupedDataset | None, DataLoader | None, ToIterableDataset | None]:
    grouped = loader if isinstance(loader, AspectRatioGroupedDataset) else None
    torch_loader = grouped.dataset if grouped is not None else loader
    if not isinstance(torch_loader, DataLoader):
        return grouped, None, None
    to_iterable = torch_loader.dataset
    return grouped, torch_loader, to_iterable if isinstance(to_iterable, ToIterableDataset) else None


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_state(s: dict) -> None:
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))


def _python_state(rng: random.Random | None = None) -> list:
    version, internal, gauss = (rng or random).getstate()
    return [version, list(internal), gauss]


def _set_python_state(s: list, rng: random.Random | None = None) -> None:
    (rng or random).setstate((s[0], tuple(s[1]), s[2]))


class LoaderStateHook(hooks.HookBase):
    """Checkpoints what Detectron2's train loader and the model draw (see the module doc) and restores it on resume.

    Args:
        loader: what :meth:`Trainer.build_train_loader` returned with ``SEEDED_DRAWS False``.
        batch_size: images per batch of this process.
        num_workers: ``DATALOADER.NUM_WORKERS``.
    """

    def __init__(self, loader: Any, batch_size: int, num_workers: int) -> None:
        self.grouped, _, self.to_iterable = _parts(loader)
        self.batch_size = batch_size
        self.savable = num_workers == 0 and comm.get_world_size() == 1 and self.to_iterable is not None
        self.restored: dict | None = None
        self.start_samples = 0  # samples the loader skipped at this process's start
        self._torch_after_first_batch: dict | None = None

    def _map_dataset(self) -> MapDataset | None:
        dataset = self.to_iterable.dataset if self.to_iterable is not None else None
        return dataset if isinstance(dataset, MapDataset) else None

    def state_dict(self) -> dict:
        if not self.savable or (self.grouped is not None and any(self.grouped._buckets)):
            return {}
        state = {
            "samples": self.start_samples + (self.trainer.iter + 1 - self.trainer.start_iter) * self.batch_size,
            "python": _python_state(),
            "numpy": _numpy_state(), "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        mapped = self._map_dataset()
        if mapped is not None:
            state["map_retry"] = _python_state(mapped._rng)
            # its retry candidates start as every index; only images that failed to map leave them
            state["map_failed"] = sorted(set(range(len(mapped))) - mapped._fallback_candidates)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.restored = state

    def restore(self) -> bool:
        """Applies a loaded state to the resuming run; False when there is none to apply."""
        state = self.restored
        if not (self.savable and state):
            return False
        self.start_samples = state["samples"]
        self.to_iterable.sampler = _SkipStart(self.to_iterable.sampler, state["samples"])
        _set_python_state(state["python"])
        _set_numpy_state(state["numpy"])
        mapped = self._map_dataset()
        if mapped is not None and "map_retry" in state:
            _set_python_state(state["map_retry"], mapped._rng)
            mapped._fallback_candidates = set(range(len(mapped))) - set(state["map_failed"])
        # Creating the loader's iterator (at the first batch) draws once from torch's generator, as it did at the
        # uninterrupted run's first step: the saved state is set after that batch, before the model draws.
        self._torch_after_first_batch = {k: state[k] for k in ("torch", "cuda") if k in state}
        logger.info("resuming Detectron2's loader at sample %d with the checkpoint's generator states "
                    "(one process, 0 workers: the draws the run would have made without the interruption)",
                    state["samples"])
        return True

    def wrap(self, batches: Iterable[list[dict]]) -> Iterator[list[dict]]:
        """The training batches, with the restored torch state applied after the first one."""
        it = iter(batches)
        first = next(it)
        if self._torch_after_first_batch:
            torch.set_rng_state(self._torch_after_first_batch["torch"])
            if "cuda" in self._torch_after_first_batch:
                torch.cuda.set_rng_state_all(self._torch_after_first_batch["cuda"])
            self._torch_after_first_batch = None
        yield first
        yield from it
