"""``torch.compile`` for the training loops: resolved from a config value, applied in place, with an eager fallback.

In place (``nn.Module.compile()``): the module keeps its class and its state-dict keys (no ``_orig_mod.`` prefix),
so checkpoints written with compile on and off load into each other. Only the module's ``__call__`` is compiled:
code that calls its methods or submodules directly (the kNN monitor, reconstructions, evaluation) runs eagerly and
cannot trigger recompiles of the training graph.

Compilation is lazy: Dynamo and Inductor compile the forward graph at the first call and the backward graph at the
first backward, so a compile error can surface anywhere inside the first optimizer step. The loops therefore run
that step under :func:`is_compile_error` and, on such an error, :func:`fall_back_to_eager` and redo the whole step
from the global generators' states it started with (:func:`rng_snapshot`), so that the run goes on as an eager run.

``auto`` compiles on CUDA only. On CPU it pays little: 10 % of the shapes MAE pretraining's wall on a 2-core Intel
AMX VM, nothing in the supervised pretraining, a 10 % loss in short fine-tuning (README section 5, p124).
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch
from torch import nn

# Plain Inductor: max-autotune would multiply the compile time (minutes per model) for a few percent.
# MAE_DET_COMPILE_BACKEND=aot_eager keeps Dynamo's capture and guards without Inductor's code generation (seconds
# instead of minutes on a CPU): to check plumbing, e.g. scripts/gpu_benchmark.sh --dry-run.
BACKEND = os.environ.get("MAE_DET_COMPILE_BACKEND", "inductor")


def resolve_compile(value: str, device: torch.device) -> bool:
    """Whether to compile: ``on``/``off`` as given, ``auto`` = on for CUDA devices only."""
    if value == "auto":
        return device.type == "cuda"
    return value == "on"


# torch.compile's modes the tools offer; max-autotune is left out (see BACKEND)
COMPILE_MODES = ("default", "reduce-overhead")


def compile_in_place(module: nn.Module, dynamic: bool | None = False, mode: str = "default") -> nn.Module:
    """Compiles ``module``'s ``__call__`` in place; ``dynamic=False`` (static shapes) suits a pretraining step,
    whose shapes are fixed; None lets Dynamo mark sizes dynamic after a first change (detection inputs).

    ``mode="reduce-overhead"`` replays the compiled forward and backward as CUDA graphs (Inductor only; on a CPU
    Inductor skips the graphs and the mode compiles as the default): one launch per graph instead of one per
    kernel, for steps whose time goes to the host thread launching kernels. Its outputs live in the graphs' memory
    pool and are overwritten by the next replay: a caller that keeps a step's loss must clone it.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode: expected one of {COMPILE_MODES}, got {mode!r}")
    if BACKEND == "inductor":
        module.compile(backend=BACKEND, dynamic=dynamic, mode=mode)
    else:  # other backends take no Inductor mode (and warn about it)
        module.compile(backend=BACKEND, dynamic=dynamic)
    return module


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def is_compile_error(e: BaseException) -> bool:
    """A Dynamo/Inductor failure (tracing, lowering, C++/Triton compilation), as opposed to an error of the model."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler, OperatorIssue

    return isinstance(e, (TorchDynamoException, CppCompileError, InvalidCxxCompiler, OperatorIssue))


def rng_snapshot() -> Callable[[], None]:
    """The global torch generators' states now (CPU, and CUDA once initialized); the returned function restores them.

    Taken before a compiled first step: the failed attempt may have drawn from them (drop path in a forward that
    ran before the backward failed to compile, Inductor's per-call seeds), and the eager redo must draw what an
    eager run draws there (before 2026-12-08 every later draw of a fine-tuning was shifted).
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    return restore


def fall_back_to_eager(module: nn.Module, error: BaseException, logger: logging.Logger) -> None:
    """Undoes :func:`compile_in_place` and says so in one warning line."""
    module._compiled_call_impl = None  # the attribute nn.Module.compile() sets; None is eager __call__
    root = error
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
        root = inner  # Dynamo wraps the backend's own error
    lines = [ln for ln in str(root).strip().splitlines() if ln.strip()]
    why = f"{type(root).__name__}: {lines[0] if lines else 'no details'}"
    if root is not error:
        why = f"{type(error).__name__} <- {why}"
    logger.warning("torch.compile failed in the first optimizer step (%s); redoing that step eagerly and training "
                   "without compile", why)
