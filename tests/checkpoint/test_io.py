"""Atomic writes, the clean-up of what a killed writer leaves behind, and safe loading of numpy-only pickles."""
from __future__ import annotations

import codecs
import collections
import logging
import os
import pickle
import re

import numpy as np
import pytest
import torch
from numpy._core.numeric import _frombuffer

from mae_det.checkpoint import (
    CheckpointError, atomic_save, atomic_write_text, load_checkpoint, prune_checkpoints, remove_partial_writes,
)
from mae_det.checkpoint.io import set_aside_earlier_run


def test_remove_partial_writes_takes_only_the_temporaries_of_atomic_writes(tmp_path, caplog):
    atomic_write_text(tmp_path / "last_checkpoint", "checkpoint_0001.pth\n")
    for name in (".last_checkpoint.a1b2.tmp", ".checkpoint_0002.pth.zz9.tmp", "notes.tmp", ".hidden", "run.log"):
        (tmp_path / name).write_text("x")
    with caplog.at_level(logging.INFO, logger="mae_det"):
        removed = remove_partial_writes(tmp_path)
    assert [p.name for p in removed] == [".checkpoint_0002.pth.zz9.tmp", ".last_checkpoint.a1b2.tmp"]
    assert [r.getMessage() for r in caplog.records] == [
        f"removed 2 partial writes of a killed run in {tmp_path}: "
        "['.checkpoint_0002.pth.zz9.tmp', '.last_checkpoint.a1b2.tmp']"]
    assert sorted(os.listdir(tmp_path)) == [".hidden", "last_checkpoint", "notes.tmp", "run.log"]
    assert (tmp_path / "last_checkpoint").read_text() == "checkpoint_0001.pth\n"
    assert remove_partial_writes(tmp_path) == []


def test_failed_text_write_names_the_path_and_leaves_no_temporary(tmp_path):
    (tmp_path / "taken").mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(CheckpointError, match="taken"):
        atomic_write_text(tmp_path / "taken", "x")
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_a_folder_that_cannot_be_created_is_a_checkpoint_error_naming_the_path(tmp_path):
    (tmp_path / "file").write_text("x")  # where the output folder should be
    with pytest.raises(CheckpointError) as e:
        atomic_save({"model": {}}, tmp_path / "file" / "out.pth")
    assert str(e.value).startswith(f"cannot write checkpoint {tmp_path / 'file' / 'out.pth'}: ")
    assert str(e.value).endswith(f"({tmp_path / 'file'})")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_prune_checkpoints_orders_by_the_numbers_and_keeps_the_protected_and_other_files(tmp_path, caplog):
    names = ["ckpt_9_0.pth", "ckpt_10_0.pth", "ckpt_10_5.pth", "ckpt_2_7.pth", "ckpt_final.pth", "notes.txt"]
    for n in names:
        (tmp_path / n).write_text(n)
    pattern = re.compile(r"ckpt_(\d+)_(\d+)\.pth")
    assert prune_checkpoints(tmp_path, pattern, 0) == []  # 0 keeps all
    with caplog.at_level(logging.INFO, logger="mae_det.checkpoint.io"):
        removed = prune_checkpoints(tmp_path, pattern, 2, protect=("ckpt_2_7.pth",))
    assert [p.name for p in removed] == ["ckpt_9_0.pth"]  # 10 > 9 as numbers, not as strings
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names) - {"ckpt_9_0.pth"})
    assert "removed 1 older checkpoints" in caplog.text and "keeping the newest 2" in caplog.text
    assert [p.name for p in prune_checkpoints(tmp_path, pattern, 1)] == ["ckpt_2_7.pth", "ckpt_10_0.pth"]


def test_set_aside_earlier_run_moves_only_what_a_resume_could_load_into_a_new_subfolder(tmp_path, caplog):
    names = ["checkpoint_0001.pth", "checkpoint_0002_000040.pth", "last_checkpoint", "metrics.jsonl", "config.yaml",
             "checkpoint_final.txt"]
    for n in names:
        (tmp_path / n).write_text(n)
    (tmp_path / "earlier_run_1").mkdir()  # a set-aside of a run before: the next number
    ckpt = re.compile(r"checkpoint_\d+(?:_\d+)?\.pth").fullmatch
    with caplog.at_level(logging.WARNING, logger="mae_det"):
        aside = set_aside_earlier_run(tmp_path, ckpt, "last_checkpoint")
    assert aside == tmp_path / "earlier_run_2"
    assert sorted(os.listdir(aside)) == ["checkpoint_0001.pth", "checkpoint_0002_000040.pth", "last_checkpoint"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_final.txt", "config.yaml", "earlier_run_1", "earlier_run_2",
                                            "metrics.jsonl"]
    assert (aside / "last_checkpoint").read_text() == "last_checkpoint"
    assert caplog.messages == [f"{tmp_path} holds checkpoints of an earlier run: starting from scratch (--resume "
                               f"continues instead); moved them to {aside}"]
    assert set_aside_earlier_run(tmp_path, ckpt, "last_checkpoint") is None  # nothing left to move
    assert set_aside_earlier_run(tmp_path / "absent", ckpt, "last_checkpoint") is None


# ---- numpy-only .pkl files (Detectron2 model zoo) ------------------------------------------------------------
def _zoo_pickle() -> dict:
    return {
        "model": collections.OrderedDict([
            ("backbone.net.pos_embed", np.arange(20, dtype=np.float32).reshape(1, 5, 4)),
            ("backbone.net.norm.weight", np.asfortranarray(np.ones((2, 3), np.float64))),
            ("backbone.net.empty", np.zeros((0,), np.float32)),
        ]),
        "__author__": "Detectron2 Model Zoo",
        "matching_heuristics": True,
    }


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_pickle_loads_in_every_protocol(tmp_path, protocol):
    path = tmp_path / f"zoo_p{protocol}.pkl"
    path.write_bytes(pickle.dumps(_zoo_pickle(), protocol=protocol))
    loaded = load_checkpoint(path)
    expected = _zoo_pickle()
    assert loaded.keys() == expected.keys() and list(loaded["model"]) == list(expected["model"])
    for k, v in expected["model"].items():
        assert loaded["model"][k].dtype == v.dtype and np.array_equal(loaded["model"][k], v), k
    assert loaded["__author__"] == "Detectron2 Model Zoo" and loaded["matching_heuristics"] is True


class _Calls:
    """Pickles as a call of ``fn(*args)``: what a hostile file does."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload,refused", [
    (_Calls(os.mkdir, "x"), "global 'posix.mkdir' is not allowed"),
    (_Calls(codecs.encode, "x", "rot13"), "global '_codecs.encode' with encoding 'rot13' is not allowed"),
], ids=["os.mkdir", "codec"])
def test_numpy_pickle_refuses_globals_that_do_more_than_build_bytes_and_arrays(tmp_path, payload, refused):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"a": np.zeros(2)}, "x": payload}, protocol=2))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == f"refused to load {path}: {refused} (only numpy arrays and dicts are accepted)"


def test_numpy_pickle_builds_no_object_arrays_from_buffers(tmp_path):
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps({"a": _Calls(_frombuffer, bytearray(16), np.dtype(object), (2,), "C")}, protocol=5))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == (f"checkpoint {path} is not a readable pickle (truncated or corrupt?): cannot create an "
                            "OBJECT array from memory buffer")


@pytest.mark.parametrize("content,reason", [
    (pickle.dumps(_zoo_pickle(), protocol=4)[:60], "pickle data was truncated"),
    (b"<html>404 Not Found</html>\n", "invalid load key, '<'."),
], ids=["truncated", "html"])
def test_a_pkl_that_is_no_pickle_is_called_so_not_refused(tmp_path, content, reason):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == f"checkpoint {path} is not a readable pickle (truncated or corrupt?): {reason}"


def test_a_torchscript_archive_is_named_as_such(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError) as e:  # was "not a readable torch file (truncated or corrupt?)"
        load_checkpoint(path)
    assert str(e.value) == (f"checkpoint {path} is a TorchScript archive, not a checkpoint (state dict): save the "
                            "model's state_dict() with torch.save instead")
