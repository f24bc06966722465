"""Atomic writes and the clean-up of what a killed writer leaves behind."""
from __future__ import annotations

import logging
import os
import re

import pytest

from mae_det.checkpoint import CheckpointError, atomic_save, atomic_write_text, prune_checkpoints, remove_partial_writes


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
