"""Provenance of a run: ``run_info.json`` in its output directory."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import atomic_write_text

_PACKAGES = ("torch", "torchvision", "timm", "detectron2", "mae_det")


def config_sha256(cfg: Any) -> str:
    """sha256 of the resolved config's YAML dump (``cfg.dump()``), or of ``str(cfg)`` for other objects."""
    text = cfg.dump() if hasattr(cfg, "dump") else str(cfg)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # not installed, broken, or without __version__: recorded as null
        return None


def git_state(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git work tree holding ``path`` (the mae_det sources); nulls outside git."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(status.strip())}


def write_run_info(
    output_dir: str | os.PathLike,
    cfg: Any,
    *,
    seed: int,
    init_type: str | None = None,
    init_checkpoint: str | os.PathLike | None = None,
    argv: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes ``output_dir/run_info.json`` (atomically) and returns its content.

    Args:
        output_dir: the run's output directory (created if needed).
        cfg: the resolved config (a CfgNode; hashed through its YAML dump).
        seed: the run's seed.
        init_type: how the weights were initialized (e.g. "mae", "supervised", "random").
        init_checkpoint: the checkpoint the weights came from; its sha256 is recorded when it exists.
        argv: the command line (default ``sys.argv``).
        extra: more JSON-serializable fields, merged at the top level.
    """
    from ..checkpoint import sha256_file

    init_sha = None
    if init_checkpoint and Path(init_checkpoint).is_file():
        init_sha = sha256_file(init_checkpoint)
    info: dict[str, Any] = {
        "config_sha256": config_sha256(cfg),
        "seed": seed,
        "git": git_state(),
        "versions": {name: _version(name) for name in _PACKAGES} | {"python": sys.version.split()[0]},
        "init_type": init_type,
        "init_checkpoint": str(init_checkpoint) if init_checkpoint else None,
        "init_checkpoint_sha256": init_sha,
        "command": list(sys.argv if argv is None else argv),
        "hostname": socket.gethostname(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    info.update(extra or {})
    atomic_write_text(Path(output_dir) / "run_info.json", json.dumps(info, indent=2, default=str) + "\n")
    return info
