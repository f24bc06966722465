"""Which reduced precision a device runs natively: the one rule behind every ``"auto"`` precision setting."""
from __future__ import annotations

import torch


def bf16_native(device_type: str) -> bool:
    """bf16 matmuls in hardware: Ampere+ GPUs, or CPUs with AVX512-bf16/AMX (elsewhere they are emulated and
    far slower than fp32)."""
    if device_type == "cuda":
        # By default torch also answers True where bf16 is only emulated (Volta, Turing: compute capability < 8).
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    # oneDNN's own check passes on any AVX-512 CPU; without the bf16 instructions (Skylake to Ice Lake servers) its
    # bf16 matmuls ran ~5x slower than fp32 (1024^2, one thread), so the instructions themselves must be there too.
    return device_type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )


def auto_precision(device_type: str) -> str:
    """``"auto"`` resolved: bf16 where native, else fp16 on CUDA (with a gradient scaler) and fp32 elsewhere."""
    if bf16_native(device_type):
        return "bf16"
    return "fp16" if device_type == "cuda" else "fp32"
