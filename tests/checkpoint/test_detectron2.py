"""CheckedDetectionCheckpointer (the non-ViT backbones' checkpointer): safe loading, atomic saves, resume fallback."""
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from mae_det.checkpoint import CheckpointError
from mae_det.checkpoint.detectron2 import CheckedDetectionCheckpointer, newest_checkpoint


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)


def _checkpointer(folder="", save_to_disk=None):
    torch.manual_seed(0)
    return CheckedDetectionCheckpointer(_Net(), str(folder), save_to_disk=save_to_disk)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pkl_weights_are_read_without_running_code_then_post_processed(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {}, "__author__": "x", "evil": _RunsCode(marker)}))
    with pytest.raises(CheckpointError, match=rf"^refused to load {evil}: "):
        _checkpointer().load(str(evil))
    assert not marker.exists()
    weight = np.full((2, 2), 3.0, np.float32)
    zoo = tmp_path / "zoo.pkl"  # Detectron2 model zoo format: used as it is
    zoo.write_bytes(pickle.dumps({"model": {"fc.weight": weight}, "__author__": "d2"}))
    c = _checkpointer()
    c.load(str(zoo))
    assert torch.equal(c.model.fc.weight, torch.full((2, 2), 3.0))
    caffe2 = tmp_path / "caffe2.pkl"  # Caffe2 format: "blobs", momenta dropped, names matched by suffix
    caffe2.write_bytes(pickle.dumps({"blobs": {"fc.weight": weight * 2, "fc.weight_momentum": weight}}))
    assert c._load_file(str(caffe2)) == {"model": {"fc.weight": pytest.approx(weight * 2)}, "__author__": "Caffe2",
                                         "matching_heuristics": True}


def test_saves_are_atomic_and_a_truncated_checkpoint_is_a_one_line_error(tmp_path, monkeypatch):
    c = _checkpointer(tmp_path)
    c.save("model_0000003", iteration=3)
    saved = (tmp_path / "model_0000003.pth").read_bytes()

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(CheckpointError, match=r"failed to write .*model_0000003.pth: No space left on device"):
        c.save("model_0000003", iteration=3)
    monkeypatch.undo()
    assert (tmp_path / "model_0000003.pth").read_bytes() == saved  # the previous checkpoint, untouched
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000003.pth"]
    (tmp_path / "model_0000003.pth").write_bytes(saved[:1000])  # what a kill during a non-atomic write leaves
    with pytest.raises(CheckpointError) as e:
        _checkpointer(tmp_path).resume_or_load("", resume=True)
    assert str(e.value) == (
        f"cannot resume: checkpoint {tmp_path / 'model_0000003.pth'} is not a readable torch file (truncated or "
        f"corrupt?): PytorchStreamReader failed reading zip archive: failed finding central directory; no other "
        f"checkpoint in {tmp_path}")


def test_resume_without_a_pointer_continues_from_the_newest_checkpoint(tmp_path, caplog):
    c = _checkpointer(tmp_path)
    for it in (3, 11, 7):
        c.save(f"model_{it:07d}", iteration=it)
    (tmp_path / "last_checkpoint").unlink()  # deleted by hand, or a kill before the first pointer's write
    assert newest_checkpoint(str(tmp_path)) == "model_0000011.pth"
    with caplog.at_level("WARNING"):
        assert _checkpointer(tmp_path).resume_or_load("", resume=True) == {"iteration": 11}
    assert f"{tmp_path / 'last_checkpoint'} is missing: resuming from the newest checkpoint file, model_0000011.pth" \
        in caplog.text
    c.save("model_final", iteration=12)
    (tmp_path / "last_checkpoint").unlink()
    assert _checkpointer(tmp_path).resume_or_load("", resume=True) == {"iteration": 12}
    assert newest_checkpoint(str(tmp_path / "none")) is None
