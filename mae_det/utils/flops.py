"""Forward multiply-add counting: fvcore's counter plus the fused attention it does not see.

One convention for every figure mae_det reports: one multiply-add = one "flop" (fvcore's unit), forward pass
only; training FLOPs = 3 x 2 x forward multiply-adds (backward ~ 2x forward; 2 flops per multiply-add).

The same corrections hold for fvcore's activation counter (:data:`ACTIVATION_HANDLES`): fused attention produces
the attention matrix and its output as the explicit ``q @ k^T`` ... ``@ v`` would, and an ``einsum`` that only
reorders axes (MAE's patchify, ViTDet's window partition) multiplies nothing.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # fvcore calls the deprecated torch.jit.script at import
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import einsum_flop_jit, generic_activation_jit, get_shape

SDPA_OP = "aten::scaled_dot_product_attention"
EINSUM_OP = "aten::einsum"


def sdpa_macs(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """fvcore handle for fused attention: ``q @ k^T`` plus ``weights @ v``.

    Shapes (..., Nq, E), (..., Nk, E), (..., Nk, Ev) give prod(...) * Nq * Nk * (E + Ev) multiply-adds; the
    softmax, scaling and any additive mask are elementwise and not counted, as fvcore does for other ops.
    """
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def sdpa_activations(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """fvcore activation handle for fused attention: the attention matrix plus the output.

    What fvcore counts for the explicit path (the outputs of ``q @ k^T`` and of ``weights @ v``): prod(...) * Nq *
    Nk + prod(...) * Nq * Ev for shapes (..., Nq, E), (..., Nk, E), (..., Nk, Ev).
    """
    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-2]) * q[-2] * (k[-2] + v[-1])


def is_permutation_einsum(equation: str) -> bool:
    """True when a one-operand ``einsum`` equation only reorders axes (``"nchpwq->nhwpqc"``): no axis is summed
    over, repeated (a diagonal) or added."""
    equation = equation.replace(" ", "")
    operands, arrow, output = equation.partition("->")
    if "," in operands:
        return False
    axes = operands.replace("...", "")
    if len(set(axes)) != len(axes):
        return False
    if not arrow:  # implicit output: every axis that appears once, in alphabetical order
        return True
    return sorted(output.replace("...", "")) == sorted(axes) and ("..." in operands) == ("..." in output)


def _einsum_equation(inputs: Sequence[Any]) -> str:
    return inputs[0].toIValue()


def einsum_macs(inputs: Sequence[Any], outputs: Sequence[Any]) -> float:
    """fvcore's einsum handle, except that a pure permutation is 0 multiply-adds (fvcore's general path asks
    NumPy's contraction planner, which prices copying every element as half a multiply-add)."""
    return 0 if is_permutation_einsum(_einsum_equation(inputs)) else einsum_flop_jit(inputs, outputs)


_einsum_outputs = generic_activation_jit()


def einsum_activations(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """fvcore's einsum activation handle (output elements), except that a pure permutation is 0: it is a copy,
    not a product, and fvcore counts no other reshape or permute."""
    return 0 if is_permutation_einsum(_einsum_equation(inputs)) else _einsum_outputs(inputs, outputs)


# For ``ActivationCountAnalysis(...).set_op_handle(**ACTIVATION_HANDLES)``.
ACTIVATION_HANDLES = {SDPA_OP: sdpa_activations, EINSUM_OP: einsum_activations}


@dataclass(frozen=True)
class FlopReport:
    """Forward multiply-adds of one call.

    Attributes:
        total_macs: everything counted, attention included.
        attention_macs: the part added analytically for ``scaled_dot_product_attention``.
        by_operator: multiply-adds per operator (fvcore's short names, e.g. ``linear``, ``matmul``).
        by_module: multiply-adds per direct child module of the model.
        unsupported_ops: operators fvcore met but does not count, with their call counts.
    """

    total_macs: int
    attention_macs: int
    by_operator: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)
    unsupported_ops: dict[str, int] = field(default_factory=dict)

    @property
    def fvcore_macs(self) -> int:
        """The count without the attention add-on: what fvcore alone reports, less the half multiply-add per
        element it prices an axis-reordering ``einsum`` at."""
        return self.total_macs - self.attention_macs

    @property
    def training_flops(self) -> int:
        """3 x 2 x forward multiply-adds: forward + backward (~2x forward), 2 flops per multiply-add."""
        return 6 * self.total_macs


class _Call(nn.Module):
    """Lets fvcore trace ``model.<method>(*args)`` with non-tensor arguments baked in."""

    def __init__(self, model: nn.Module, method: str, constants: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.constants = constants

    def forward(self, *tensors: torch.Tensor) -> Any:
        return getattr(self.model, self.method)(*tensors, **self.constants)


def count_forward_macs(
    model: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    method: str = "forward",
    **constants: Any,
) -> FlopReport:
    """Counts the forward multiply-adds of ``model.<method>(*inputs, **constants)``.

    Args:
        model: any module; it is traced once in its current mode, so dropout/drop path should be off (eval).
        inputs: the tensor arguments (batch included; divide by the batch size for per-image figures).
        method: the method to count, e.g. ``"forward_features"``.
        **constants: non-tensor keyword arguments, e.g. ``mask_ratio=0.75``.

    Returns:
        A :class:`FlopReport`; attention through ``F.scaled_dot_product_attention`` is included, an ``einsum``
        that only reorders axes counts 0.
    """
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    wrapper = _Call(model, method, constants)
    analysis = FlopCountAnalysis(wrapper, inputs).set_op_handle(SDPA_OP, sdpa_macs, EINSUM_OP, einsum_macs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    # fvcore logs every skipped elementwise op at WARNING; the report carries them instead.
    log = logging.getLogger("fvcore.nn.jit_analysis")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        by_operator = {op: int(n) for op, n in analysis.by_operator().items()}
        by_module = {name.removeprefix("model."): int(n) for name, n in analysis.by_module().items()
                     if name.startswith("model.") and name.count(".") == 1}
        total = int(analysis.total())
        unsupported = dict(analysis.unsupported_ops())
    finally:
        log.setLevel(level)
    attention = int(by_operator.get(SDPA_OP.removeprefix("aten::"), 0))
    return FlopReport(total, attention, by_operator, by_module, unsupported)
