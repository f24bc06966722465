"""Small distributed helpers that work the same under ``torchrun``, Detectron2's ``launch`` and one process."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_local_rank() -> int:
    """Rank on this machine: ``LOCAL_RANK`` (torchrun), Detectron2's local group, or 0."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    if is_dist():
        from detectron2.utils import comm

        if comm._LOCAL_PROCESS_GROUP is not None:
            return comm.get_local_rank()
    return 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist() and get_world_size() > 1:
        dist.barrier()


def leave_process_group() -> None:
    """Waits for every rank, then destroys the group.

    A rank that exits while another still holds gloo connections to it can abort in the group's destructor
    ("terminate called without an active exception"), which turns a finished run into a failed one.
    """
    if is_dist():
        barrier()
        dist.destroy_process_group()


def backend_for(device: torch.device | str) -> str:
    """NCCL for CUDA devices, gloo for CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init_from_env(device: torch.device | str, timeout: timedelta = timedelta(minutes=30)) -> None:
    """Joins the process group described by torchrun's environment (no-op for a single process)."""
    if is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    dist.init_process_group(backend=backend_for(device), init_method="env://", timeout=timeout)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all processes (``t`` itself when alone)."""
    if get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """One picklable object per process, in rank order."""
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
