"""Distributed helpers outside a process group (the multi-process paths run in tests/tools/test_pretrain_tool.py)."""
import torch

from mae_det.utils import dist as du


def test_single_process_defaults(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert (du.get_world_size(), du.get_rank(), du.get_local_rank(), du.is_main_process()) == (1, 0, 0, True)
    assert not du.launched_by_torchrun()
    t = torch.tensor([1.0, 2.0])
    assert du.all_reduce_mean(t) is t
    assert du.all_gather_object({"a": 1}) == [{"a": 1}]
    du.barrier()
    du.init_from_env("cpu")  # WORLD_SIZE unset: stays a single process
    assert not du.is_dist()


def test_backend_and_torchrun_detection(monkeypatch):
    assert du.backend_for("cpu") == "gloo" and du.backend_for(torch.device("cuda", 0)) == "nccl"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert du.launched_by_torchrun() and du.get_local_rank() == 1
