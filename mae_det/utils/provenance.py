"""Provenance of a run: ``run_info.json`` in its output directory."""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..checkpoint import atomic_write_text

_PACKAGES = ("torch", "torchvision", "timm", "detectron2", "mae_det")


def config_sha256(cfg: Any) -> str:
    """sha256 of the resolved config's YAML dump (``cfg.dump()``), or of ``str(cfg)`` for other objects."""
    text = cfg.dump() if hasattr(cfg, "dump") else str(cfg)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flat(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
    return out


def read_config_text(output_dir: str | os.PathLike) -> str | None:
    """The ``config.yaml`` an earlier launch wrote into ``output_dir``; None when there is none (or unreadable)."""
    try:
        return (Path(output_dir) / "config.yaml").read_text(encoding="utf-8")
    except OSError:
        return None


def config_changes(previous: str | None, cfg: Any) -> list[str]:
    """The settings a resumed run changes: ``"KEY: old -> new"`` per key that differs between the YAML of an
    earlier launch's config (``previous``) and ``cfg`` (a CfgNode), in key order; [] without a readable
    ``previous``, as there is nothing to compare."""
    try:
        old = yaml.safe_load(previous) if previous is not None else None
    except yaml.YAMLError:
        return []
    if not isinstance(old, dict):
        return []
    before, after = _flat(old), _flat(yaml.safe_load(cfg.dump()))
    missing = "(not set)"
    return [f"{k}: {before.get(k, missing)} -> {after.get(k, missing)}"
            for k in sorted(before.keys() | after.keys()) if before.get(k, missing) != after.get(k, missing)]


def warn_resumed_config_changes(output_dir: str | os.PathLike, cfg: Any, logger: logging.Logger,
                                previous: str | None = None) -> list[str]:
    """For a resumed run about to rewrite its ``config.yaml``: logs one warning listing the settings that differ
    from the earlier launch's (``previous``, default: that file's text), since the result then follows no single
    config and the file will show only the new one.

    Returns:
        The :func:`config_changes`.
    """
    changes = config_changes(read_config_text(output_dir) if previous is None else previous, cfg)
    if changes:
        what = f"{len(changes)} setting{'s' if len(changes) > 1 else ''}"
        logger.warning("resuming %s with %s changed since its last launch (its config.yaml will show the new "
                       "values): %s", output_dir, what, "; ".join(changes))
    return changes


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # not installed, broken, or without __version__: recorded as null
        return None


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True).stdout


def git_state(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"commit", "dirty", "untracked"}`` of the git work tree whose index tracks ``path`` (a file or folder of the
    sources; default: this module, i.e. the mae_det sources). ``dirty``: tracked files differ from the commit;
    ``untracked``: how many files git neither tracks nor ignores (a new module or config beside the commit that the
    run may have used, which ``dirty`` misses).

    All null outside git, and where git does not track ``path``: mae_det installed into a virtual environment
    inside another project's work tree would otherwise record that project's commit. A field git fails to read
    (``git status`` timing out on a large untracked tree; no commit yet) is null on its own.
    """
    target = Path(path).resolve() if path else Path(__file__).resolve()
    cwd = target if target.is_dir() else target.parent
    state: dict[str, Any] = {"commit": None, "dirty": None, "untracked": None}
    try:
        _git(cwd, "ls-files", "--error-unmatch", "--", str(target))
    except (OSError, subprocess.SubprocessError):
        return state
    try:
        state["commit"] = _git(cwd, "rev-parse", "--verify", "HEAD").strip() or None
    except (OSError, subprocess.SubprocessError):
        pass  # a repository without a commit: its work tree's state below is still known
    try:
        lines = _git(cwd, "status", "--porcelain", "--untracked-files=all").splitlines()
    except (OSError, subprocess.SubprocessError):
        return state
    state["untracked"] = sum(line.startswith("??") for line in lines)
    state["dirty"] = len(lines) > state["untracked"]
    return state


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name from Linux's ``cpuinfo``, else what :mod:`platform` knows (e.g. ``x86_64``)."""
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:  # not Linux, or /proc not mounted: the fallback below still names the architecture
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The hardware a run's numbers came from: bf16 kernels round differently on each CPU kind (AMX vs
    AVX512-bf16 moved the demo's AP by up to 1.8), so a number is only reproducible on the machine it names."""
    import torch

    from .precision import bf16_native

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_native": bf16_native("cpu"),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }


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
        "machine": machine_info(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    info.update(extra or {})
    atomic_write_text(Path(output_dir) / "run_info.json", json.dumps(info, indent=2, default=str) + "\n")
    return info
