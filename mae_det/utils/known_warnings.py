"""Silences the third-party warnings known to be harmless here, so that what still reaches the console matters.

Every ``tools/*.py`` entry point calls :func:`filter_known_warnings` before it imports Detectron2 (the demo's stages
are subprocesses, so a filter set in one process does not reach the others), and so does ``mae_det/__init__.py``,
because importing the package registers its Detectron2 builders, which imports the warning modules. Each entry
names where the warning comes from and why it is harmless; a warning raised at one of this project's own call sites
is fixed there instead.
"""

from __future__ import annotations

import logging
import warnings

# (category, message regex, module regex of the code that warns ("": any), why it is harmless)
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str, str], ...] = (
    (FutureWarning, r"`torch\.jit\.script` is deprecated", "",
     "Detectron2 decorates its ops with torch.jit.script_if_tracing at import; nothing here scripts a model"),
    (UserWarning, r"torch\.meshgrid: in an upcoming release, it will be required to pass the indexing argument", "",
     "Detectron2's anchor generator calls meshgrid without indexing=; the default it relies on ('ij') is kept"),
    (UserWarning, r"The given NumPy array is not writable", r"detectron2\.",
     "Detectron2's ResizeTransform returns np.asarray(PIL image) masks (read-only) and detection_utils only "
     "stacks them into a new tensor; nothing writes through the shared memory (mae_det's own code copies)"),
    (UserWarning, r"pkg_resources is deprecated as an API", "",
     "detectron2.model_zoo imports pkg_resources to find its bundled configs; scripts/setup_env.sh pins "
     "setuptools<81, which still ships it"),
    (FutureWarning, r"Importing from timm\.models\.layers is deprecated", "",
     "Detectron2's own ViTDet blocks (built only by tools/benchmark_det.py to compare against) import DropPath and "
     "Mlp from timm's old path, which re-exports timm.layers unchanged"),
)

# (logger, why its WARNING records are noise here): torch's own loggers, not the warnings module.
KNOWN_LOGGERS: tuple[tuple[str, str], ...] = (
    ("torch.utils.cpp_extension", "'No CUDA runtime is found' at import on CPU-only machines, where none is expected"),
    ("torch.fx._symbolic_trace", "is_fx_tracing() deprecation note from Detectron2's wrappers; behaviour unchanged"),
)


def filter_known_warnings() -> None:
    """Installs the filters of :data:`KNOWN_WARNINGS` and raises :data:`KNOWN_LOGGERS` to ERROR (idempotent)."""
    for category, message, module, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, _why in KNOWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
