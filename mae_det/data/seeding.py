"""Seeds derived from keys, so that a random draw depends on *what* is drawn, not on who draws it or when.

Every trainer draws its samples' augmentations from seeds of (seed, epoch or rank, sample index or stream
position), and detection also each step's drop path and RoI sampling from (seed, rank, iteration): the results
do not depend on the number of loader workers, and a resumed run continues the uninterrupted one exactly.
"""
from __future__ import annotations

import hashlib
import random
import struct
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def sample_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends on ``seed`` and ``keys`` only: the same in any process or worker."""
    digest = hashlib.blake2b(struct.pack(f"<{1 + len(keys)}q", seed, *keys), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def seed_global_rngs(seed: int, cuda: bool = True) -> None:
    """Seeds python's, numpy's and torch's CPU generator with ``seed``, and with ``cuda`` every CUDA device's."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)  # torch.manual_seed would reseed CUDA's generators too


@contextmanager
def kept_global_rngs(cuda: bool = True) -> Iterator[None]:
    """Restores python's, numpy's and torch's CPU generator (and, with ``cuda``, every initialized CUDA device's) on
    exit, so that what runs inside (an evaluation, one sample's augmentation) leaves the caller's streams as they
    were."""
    cuda = cuda and torch.cuda.is_available() and torch.cuda.is_initialized()
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if cuda else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seeds python's, numpy's and torch's CPU generator with ``seed`` and restores all three on exit.

    timm's, torchvision's and Detectron2's transforms draw from these global generators. Restoring them keeps the
    caller's streams (drop path, mixup) as they were when a loader with ``num_workers=0`` transforms in the main
    process.
    """
    with kept_global_rngs(cuda=False):
        seed_global_rngs(seed, cuda=False)
        yield
