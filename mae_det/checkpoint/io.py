"""Checkpoint files: atomic writes and safe loading (no arbitrary code on unpickling)."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import torch


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, written or interpreted; the message names the file."""


logger = logging.getLogger(__name__)

def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[BinaryIO], None], what: str) -> None:
    """Writes through ``write`` to a temporary file in the same folder, fsyncs, then renames over ``path``.

    A crash or an exception (e.g. ENOSPC) while writing leaves any previous file at ``path`` untouched.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # no such folder, read-only or full file system, a file where the folder should be
        raise CheckpointError(f"cannot write {what} {path}: {e.strerror or e} ({path.parent})") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give them the permissions a plain open() would (shared clusters).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise CheckpointError(f"failed to write {what} {path}: {e}") from e


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically (see :func:`atomic_write_text`)."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f), "checkpoint")


# The safetensors metadata entry that holds a checkpoint's entries besides "model" (json), for convert.read_checkpoint.
SAFETENSORS_EXTRA = "mae_det"


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """Writes ``{"model": state dict, **entries}`` atomically: a ``.safetensors`` path gets the tensors of "model"
    with the other entries json-encoded in the metadata string :data:`SAFETENSORS_EXTRA`, any other a torch file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return atomic_save(obj, path)
    from safetensors.torch import save

    metadata = {"format": "pt", SAFETENSORS_EXTRA: json.dumps({k: v for k, v in obj.items() if k != "model"})}
    tensors = {k: v.contiguous() for k, v in obj["model"].items()}
    _atomic_write(path, lambda f: f.write(save(tensors, metadata)), "checkpoint")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replaces ``path`` with ``text`` atomically: temporary file in the same folder, fsync, rename.

    A crash or an exception (e.g. ENOSPC) while writing leaves any previous file at ``path`` untouched; an error
    is a :class:`CheckpointError` naming the path.
    """
    _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")), "file")


def remove_partial_writes(folder: str | os.PathLike) -> list[Path]:
    """Deletes (and logs) the temporary files a kill in the middle of an atomic write left in ``folder``; returns
    them.

    Only for the single writer of ``folder``, before it writes again: another writer's file in flight would go too.
    """
    stale = sorted(Path(folder).glob(".*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("removed %d partial writes of a killed run in %s: %s", len(stale), folder, [p.name for p in stale])
    return stale


def prune_checkpoints(folder: str | os.PathLike, name: re.Pattern[str], keep: int,
                      protect: Iterable[str] = ()) -> list[Path]:
    """Deletes all but the newest ``keep`` checkpoints of ``folder`` (0 = keep all); returns the deleted paths.

    Args:
        folder: the run's output folder, listed each time, so that the files of an earlier (resumed) process count.
        name: a file name pattern whose groups are the numbers that order the checkpoints (epoch, iteration).
        keep: how many of the newest to keep.
        protect: file names never deleted (the one the run's pointer file names).
    """
    if keep <= 0:
        return []
    found = []
    for p in Path(folder).iterdir():
        m = name.fullmatch(p.name)
        if m and p.is_file():
            found.append((tuple(int(g or 0) for g in m.groups()), p))
    old = [p for _, p in sorted(found)[:-keep] if p.name not in set(protect)]
    for p in old:
        p.unlink(missing_ok=True)
    if old:
        logger.info("removed %d older checkpoints of %s (keeping the newest %d): %s", len(old), folder, keep,
                    [p.name for p in old])
    return old


def set_aside_earlier_run(folder: str | os.PathLike, is_checkpoint: Callable[[str], bool],
                          pointer: str) -> Path | None:
    """Moves an earlier run's checkpoints (the file names ``is_checkpoint`` accepts) and its ``pointer`` file out of
    ``folder`` into a new subfolder ``earlier_run_<n>`` (a fresh start, before it writes anything): left in place,
    a later ``--resume`` (which a requeued job adds) of a run killed before its first checkpoint would silently
    continue the earlier run.

    Returns:
        The subfolder, or None when there was nothing to move.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    names = [p.name for p in folder.iterdir() if p.name == pointer or is_checkpoint(p.name)]
    if not names:
        return None
    n = 1
    while (folder / f"earlier_run_{n}").exists():
        n += 1
    aside = folder / f"earlier_run_{n}"
    aside.mkdir()
    # The pointer last: a kill in between leaves it naming a moved file (a resume error), never a silent resume
    # from a checkpoint left behind.
    for name in sorted(names, key=lambda n: n == pointer):
        os.replace(folder / name, aside / name)
    logger.warning("%s holds checkpoints of an earlier run: starting from scratch (--resume continues instead); "
                   "moved them to %s", folder, aside)
    return aside


# The weight files mae_det reads (load_checkpoint, and safetensors through convert.read_checkpoint).
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".pkl", ".safetensors")

# Globals that official MAE training checkpoints pickle next to tensors; nothing that can run code.
_TORCH_SAFE_GLOBALS = [argparse.Namespace]

# What Detectron2's model-zoo .pkl files (pickled dicts of numpy arrays) need to unpickle, in every pickle protocol
# and numpy 1 / 2 module name. numpy's _frombuffer (protocol 5 arrays) only reinterprets a byte buffer and refuses
# object dtypes.
_PICKLE_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global outside the allowlist (what a file that runs code on loading does)."""


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """Stands in for ``_codecs.encode``: protocols 0-2 pickle bytes as ``encode(text, "latin1")``.

    Only latin1: another codec name makes the codec registry look up (and import) codec modules, more than building
    bytes needs.
    """
    if encoding != "latin1":
        raise _RefusedGlobal(f"global '_codecs.encode' with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    """Stands in for ``bytes``: protocols 0-2 pickle ``b""`` (an empty array's data) as the call ``bytes()``."""
    return b""


# Globals of protocols 0-2 replaced by functions that accept only what pickle itself writes.
_PICKLE_REPLACED: dict[tuple[str, str], Callable[..., bytes]] = {
    ("_codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_REPLACED:
            return _PICKLE_REPLACED[module, name]
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"global '{module}.{name}' is not allowed")


def _weights_only_refusal(path: Path, e: pickle.UnpicklingError) -> str:
    """One line for a file ``torch.load(weights_only=True)`` would not unpickle. Torch's message opens with paragraphs
    of advice about its 2.6 default; what follows names a blocked global (a pickled class or function) or, for a
    file that is no pickle at all, the opcode it could not read."""
    msg = " ".join(str(e).split())
    refused_global = re.search(r"GLOBAL ([\w.]+)", msg)
    if refused_global:
        return (f"refused to load {path}: it pickles {refused_global.group(1)}, not only tensors and containers "
                f"(unpickling it could run code)")
    detail = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", msg)
    reason = detail.group(1).strip() if detail else msg[:200]
    return f"checkpoint {path} is not a torch checkpoint (a text file, a truncated download or another format?): {reason}"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def folder_instead_of_checkpoint(folder: str | os.PathLike) -> str:
    """Why a folder given where a checkpoint file belongs is refused, and which of its files to pass instead.

    The text follows the folder's name in a message (``f"checkpoint {folder}: {reason}"``); it lists the weight files
    inside (a Hugging Face model folder holds ``model.safetensors`` or ``pytorch_model.bin``).
    """
    try:
        inside = sorted(p.name for p in Path(folder).iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    except OSError:
        inside = []
    if not inside:
        return (f"is a folder, not a checkpoint file, and holds none ({', '.join(CHECKPOINT_SUFFIXES)}); pass the "
                "weights file itself")
    more = ", ..." if len(inside) > 3 else ""
    return f"is a folder, not a checkpoint file; pass the weights file inside it (there: {', '.join(inside[:3])}{more})"


def require_checkpoint_file(path: str | os.PathLike) -> None:
    """Raises :class:`CheckpointError` naming ``path`` unless it is a file (a folder gets its own message)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: {folder_instead_of_checkpoint(path)}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")


def _is_torchscript(path: Path) -> bool:
    """A ``torch.jit.save`` zip: its code and constants sit next to the pickle (which needs them to unpickle)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Loads a ``.pth``/``.pt`` (torch zip or legacy) or Detectron2 ``.pkl`` file without executing code.

    Torch files go through ``torch.load(weights_only=True)`` with ``argparse.Namespace`` allowlisted (official
    MAE training checkpoints pickle their arguments); ``.pkl`` files through an unpickler that only builds numpy
    arrays and dicts. Anything else is refused with :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    require_checkpoint_file(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == ".pkl":
        try:
            with open(path, "rb") as f:
                obj = _RestrictedUnpickler(io.BufferedReader(f), encoding="latin1").load()
        except _RefusedGlobal as e:
            raise CheckpointError(f"refused to load {path}: {e} (only numpy arrays and dicts are accepted)") from e
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {path} is not a readable pickle (truncated or corrupt?): {_one_line(e)}"
            ) from e
    else:
        if _is_torchscript(path):
            raise CheckpointError(f"checkpoint {path} is a TorchScript archive, not a checkpoint (state dict): save "
                                  "the model's state_dict() with torch.save instead")
        try:
            with torch.serialization.safe_globals(_TORCH_SAFE_GLOBALS):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(_weights_only_refusal(path, e)) from e
        except Exception as e:
            # torch's zip reader appends several sentences of advice: its first one says what failed.
            detail = " ".join(str(e).split()).split(". ")[0] or type(e).__name__
            with open(path, "rb") as f:
                head = f.read(4)
            if not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch's zip nor its legacy pickle format:
                # some text (a leading "h" reads as a pickle opcode) fails with a KeyError, not an UnpicklingError
                raise CheckpointError(f"checkpoint {path} is not a torch checkpoint (a text file, a truncated "
                                      f"download or another format?): {type(e).__name__}: {detail}") from e
            raise CheckpointError(
                f"checkpoint {path} is not a readable torch file (truncated or corrupt?): {detail}"
            ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj
