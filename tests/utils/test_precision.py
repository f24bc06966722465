"""The one rule behind every "auto" precision (mae_det.utils.precision)."""
import pytest
import torch

from mae_det.utils.precision import auto_precision, bf16_native


@pytest.mark.parametrize("onednn, avx512_bf16, amx, native", [
    (True, False, False, False),  # oneDNN's check alone passes on AVX-512 CPUs that only emulate bf16
    (True, True, False, True),
    (True, False, True, True),
    (False, True, True, False),
])
def test_cpu_auto_follows_native_bf16(monkeypatch, onednn, avx512_bf16, amx, native):
    # the CPU's answers replaced: every combination is checked on whatever CPU runs the test
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert bf16_native("cpu") is native
    assert auto_precision("cpu") == ("bf16" if native else "fp32")


def test_cuda_without_a_gpu_is_not_bf16_and_falls_back_to_fp16():
    if torch.cuda.is_available():
        native = torch.cuda.is_bf16_supported(including_emulation=False)  # Volta / Turing only emulate it
        assert auto_precision("cuda") == ("bf16" if native else "fp16")
    else:
        assert not bf16_native("cuda") and auto_precision("cuda") == "fp16"
