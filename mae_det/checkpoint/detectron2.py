"""Detectron2 checkpointers: one-line errors, safe loading, atomic saves, the keys a load left untrained, no saves of
non-finite weights; for the ViT-FPN model also explicit conversion and a load report."""
from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _IncompatibleKeys
from torch import nn

from .convert import FORMAT_NAMES, LoadReport, build_load_report, convert_to_detectron2, read_checkpoint
from .io import (
    CheckpointError, atomic_save, atomic_write_text, folder_instead_of_checkpoint, load_checkpoint,
    remove_partial_writes,
)

_OTHER_CHECKPOINTS_NAMED = 3  # earlier checkpoints suggested when the last one cannot be resumed from
LAST_CHECKPOINT = "last_checkpoint"
FINAL_CHECKPOINT = "model_final.pth"
PERIODIC_CHECKPOINT = re.compile(r"model_(\d+)\.pth")  # Detectron2's periodic checkpoints (not model_final.pth)


def newest_checkpoint(folder: str) -> str | None:
    """The newest checkpoint file name of a Detectron2 run's ``folder``: ``model_final.pth``, else the periodic
    ``model_<iteration>.pth`` of the highest iteration; None when there is none.

    ``--resume`` falls back to it when ``last_checkpoint`` is missing (deleted by hand, or a kill between a run's
    first checkpoint and its pointer): starting from scratch instead would overwrite the run's checkpoints.
    """
    names = os.listdir(folder) if os.path.isdir(folder) else []
    if FINAL_CHECKPOINT in names:
        return FINAL_CHECKPOINT
    periodic = [(int(m.group(1)), n) for n in names if (m := PERIODIC_CHECKPOINT.fullmatch(n))]
    return max(periodic)[1] if periodic else None


class NonFiniteWeightsError(FloatingPointError):
    """A save refused because parameters of the model are no longer finite (a diverged update)."""


class CheckedDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose unusable paths are one-line :class:`CheckpointError` s, not assertions.

    A missing file (``MODEL.WEIGHTS``, or what ``last_checkpoint`` names) is an error naming the path and where it
    came from; a checkpoint that cannot be resumed from also lists the folder's other checkpoints and how to
    resume from one of them, so that a broken last checkpoint never leads to starting over by accident. The keys
    that the last load left at their initial values are kept in ``last_incompatible`` (``missing_keys``,
    ``incorrect_shapes``). A save of non-finite parameters is a :class:`NonFiniteWeightsError` and writes nothing.

    Files are read with :func:`~mae_det.checkpoint.io.load_checkpoint` (no code runs on unpickling; an unreadable
    file is a one-line error), then Detectron2's model-zoo post-processing of ``.pkl`` files applies. Saves are
    atomic: a crash mid-write leaves the previous checkpoint and ``last_checkpoint`` valid; resuming removes the
    temporaries such a crash left. Without ``last_checkpoint``, resuming continues from the folder's newest
    checkpoint (see :func:`newest_checkpoint`) with a warning.

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``; ``save_to_disk`` False makes
            a checkpointer that only loads (and, resuming, leaves the folder's files alone).
    """

    _named_by = "MODEL.WEIGHTS"

    def __init__(self, model: nn.Module, save_dir: str = "", *, save_to_disk: bool | None = None,
                 **checkpointables: Any) -> None:
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.last_incompatible: _IncompatibleKeys | None = None
        self._last_path = ""

    def describe_last_load(self) -> str:
        """The file the last load read, as errors name it."""
        return self._last_path

    def has_checkpoint(self) -> bool:
        return super().has_checkpoint() or newest_checkpoint(self.save_dir) is not None

    def get_checkpoint_file(self) -> str:
        if super().has_checkpoint():
            return super().get_checkpoint_file()
        newest = newest_checkpoint(self.save_dir)
        return os.path.join(self.save_dir, newest) if newest else ""

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        if resume and self.save_dir and self.save_to_disk and os.path.isdir(self.save_dir):
            # Only a resumed training run owns its folder: an --eval-only run (a checkpointer with save_to_disk
            # False) pointed at a folder whose training is still running must not delete that run's checkpoint in
            # flight.
            remove_partial_writes(self.save_dir)
        if not (resume and self.has_checkpoint()):
            return super().resume_or_load(path, resume=resume)
        pointer = os.path.join(self.save_dir, LAST_CHECKPOINT)
        last = os.path.basename(self.get_checkpoint_file())
        named_by = f"named by {pointer}"
        if not os.path.isfile(pointer):
            self.logger.warning("%s is missing: resuming from the newest checkpoint file, %s", pointer, last)
            named_by = f"the newest checkpoint of {self.save_dir}, without {LAST_CHECKPOINT}"
        if not last:
            raise CheckpointError(f"cannot resume: {pointer} is empty; {self._resume_hint(pointer, last)}")
        self._named_by = named_by
        try:
            return super().resume_or_load(path, resume=resume)
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume: {e}; {self._resume_hint(pointer, last)}") from e
        finally:
            del self._named_by

    def _resume_hint(self, pointer: str, last: str) -> str:
        """How to resume from one of the folder's other checkpoints (newest first)."""
        others = sorted((f for f in os.listdir(self.save_dir)
                         if f.startswith("model_") and f.endswith(".pth") and f != last), reverse=True)
        if not others:
            return f"no other checkpoint in {self.save_dir}"
        more = ", ..." if len(others) > _OTHER_CHECKPOINTS_NAMED else ""
        return (f"to resume from an earlier checkpoint write its name into {pointer} (there: "
                f"{', '.join(others[:_OTHER_CHECKPOINTS_NAMED])}{more})")

    def load(self, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if path and not os.path.isfile(path):
            try:
                local = self.path_manager.get_local_path(path)  # downloads URLs such as detectron2://...
            except Exception as e:
                raise CheckpointError(f"cannot fetch checkpoint {path} ({self._named_by}): {e}") from e
            if not os.path.isfile(local):
                what = folder_instead_of_checkpoint(local) if os.path.isdir(local) else "not found"
                raise CheckpointError(f"checkpoint {path} ({self._named_by}): {what}")
        self._last_path = path
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> dict[str, Any]:
        if not filename.endswith(".pkl"):
            return super()._load_file(filename)  # reads through _torch_load
        data = load_checkpoint(filename)
        # Detectron2's model-zoo post-processing of .pkl files, unchanged.
        if "model" in data and "__author__" in data:
            self.logger.info("Reading a file from '{}'".format(data["__author__"]))
            return data
        if "blobs" in data:  # detection models of Caffe2 / Detectron1 have "blobs", ImageNet models don't
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _torch_load(self, f: str) -> dict[str, Any]:
        return load_checkpoint(f)

    def _load_model(self, checkpoint: dict[str, Any]) -> _IncompatibleKeys:
        self.last_incompatible = super()._load_model(checkpoint)
        return self.last_incompatible

    def save(self, name: str, **kwargs: Any) -> None:
        self.check_finite(name, kwargs.get("iteration"))
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_save(data, path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, LAST_CHECKPOINT), last_filename_basename)

    def check_finite(self, name: str, iteration: int | None) -> None:
        """Refuses to save parameters that a diverged update made non-finite, so that every checkpoint a run names
        as its last good one can be resumed from. Every process checks, so that all of them stop alike.

        Raises:
            NonFiniteWeightsError: naming the iteration, the first such parameter and the file not written.
        """
        broken = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if broken:
            after = f" after iteration {iteration}" if iteration is not None else ""
            raise NonFiniteWeightsError(
                f"non-finite weights{after}: {len(broken)} parameters (first: {broken[0]}); "
                f"{os.path.join(self.save_dir, name + '.pth')} was not written"
            )


class ViTDetCheckpointer(CheckedDetectionCheckpointer):
    """``DetectionCheckpointer`` for models with a :class:`~mae_det.modeling.vit.VisionTransformer` backbone.

    * Loading reads files with :func:`~mae_det.checkpoint.io.load_checkpoint` (no code runs on unpickling),
      converts any format of :mod:`mae_det.checkpoint.convert` (MAE, official, timm, HF, ViTDet, our own) by
      explicit key mapping, never with Detectron2's suffix-matching heuristics, refuses an encoder of another
      width or depth, and logs a :class:`~mae_det.checkpoint.convert.LoadReport` (kept in ``last_report``).
    * Resuming reads this run's own checkpoints whatever ``weights_format`` says; optimizer, scheduler and
      iteration come back as Detectron2 saved them.

    Args:
        model, save_dir, checkpointables: as ``DetectionCheckpointer``.
        weights_format: "auto" (detect from content) or a format name of ``convert.FORMATS``
            (``MODEL.WEIGHTS_FORMAT``).
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        weights_format: str = "auto",
        save_to_disk: bool | None = None,
        **checkpointables: Any,
    ) -> None:
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.weights_format = weights_format
        self.last_report: LoadReport | None = None
        self._info: dict[str, Any] | None = None

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        forced = self.weights_format
        if resume and self.has_checkpoint():
            self.weights_format = "auto"  # this run's last checkpoint is always in our Detectron2 format
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self.weights_format = forced

    def _load_file(self, filename: str) -> dict[str, Any]:
        ckpt = read_checkpoint(filename)
        state, self._info = convert_to_detectron2(ckpt, self.model, self.weights_format, source=filename)
        extra = {}
        if self._info["format"] == "d2":
            extra = {k: v for k, v in ckpt.items() if k not in ("model", "__author__", "matching_heuristics", "source_format")}
        # No "matching_heuristics": the parent's loader then maps nothing by suffix.
        return {**extra, "model": state}

    def _load_model(self, checkpoint: dict[str, Any]) -> _IncompatibleKeys:
        keys = set(checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        skipped = {k for k, _, _ in incompatible.incorrect_shapes}
        model_keys = set(self.model.state_dict())
        self.last_report = build_load_report(
            loaded=(keys & model_keys) - skipped,
            missing=incompatible.missing_keys,
            unexpected=incompatible.unexpected_keys,
            info=self._info,
            incorrect_shapes=incompatible.incorrect_shapes,
        )
        return incompatible

    def describe_last_load(self) -> str:
        report = self.last_report
        return f"{report.source} ({FORMAT_NAMES.get(report.origin, report.origin)})"

    def _log_incompatible_keys(self, incompatible: _IncompatibleKeys) -> None:
        report = self.last_report
        level = logging.WARNING if report.missing or report.skipped else logging.INFO
        self.logger.log(level, "\n%s", report)
