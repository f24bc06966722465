"""Environment report for bug reports: ``python -m mae_det.collect_env``."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys


def _failure(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _version(module: str, dist: str | None = None) -> str:
    """``module``'s version and folder; ``dist``: its distribution name, read when the module has no __version__."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # any import failure is itself worth reporting
        return f"not importable ({_failure(e)})"
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(dist or module)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    return f"{version} @ {os.path.dirname(getattr(mod, '__file__', '') or '')}"


def collect_env() -> list[tuple[str, str]]:
    """Returns (name, value) rows describing the interpreter, libraries and hardware (the libraries that do not import
    say why; without torch there are no hardware rows)."""
    rows = [
        ("sys.platform", sys.platform),
        ("Python", sys.version.replace("\n", " ")),
        ("mae_det", _version("mae_det")),
        ("detectron2", _version("detectron2")),
    ]
    try:
        from detectron2 import _C  # noqa: F401

        compiled = "yes"
    except Exception as e:
        compiled = f"no ({type(e).__name__}; not needed: ROIAlign/NMS come from torchvision, COCO eval from pycocotools)"
    rows += [
        ("detectron2 compiled ops (_C)", compiled),
        ("torch", _version("torch")),
        ("torchvision", _version("torchvision")),
        ("timm", _version("timm")),
        ("fvcore", _version("fvcore")),
        ("pycocotools", _version("pycocotools")),  # no __version__: its distribution's
        ("numpy", _version("numpy")),
        ("Pillow", _version("PIL")),
    ]
    try:
        import torch

        from .utils.provenance import machine_info

        machine = machine_info()
    except Exception as e:  # noqa: BLE001 - the report goes on: what it could not read is part of it
        return rows + [("hardware", f"not read ({_failure(e)})")]
    rows += [
        ("CPU", machine["cpu"]),
        ("CPU capability (torch)", machine["cpu_capability"]),
        ("CPU bf16 native (mkldnn)", str(machine["cpu_bf16_native"])),
        ("CPU threads", str(torch.get_num_threads())),
        ("CUDA available", str(torch.cuda.is_available())),
    ]
    if torch.cuda.is_available():
        rows += [
            ("CUDA (torch build)", str(torch.version.cuda)),
            ("GPUs", ", ".join(machine["gpus"])),
            ("GPU bf16", str(torch.cuda.is_bf16_supported())),
        ]
    return rows


def format_env(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":
    print(format_env(collect_env()))
