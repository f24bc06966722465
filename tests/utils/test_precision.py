"""The one rule behind every "auto" precision (mae_det.utils.precision)."""
import torch

from mae_det.utils.precision import auto_precision, bf16_native


def test_cpu_auto_follows_native_bf16():
    # oneDNN's check alone passes on AVX-512 CPUs that only emulate bf16: the instructions must be there too.
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert bf16_native("cpu") is native
    assert auto_precision("cpu") == ("bf16" if native else "fp32")


def test_cuda_without_a_gpu_is_not_bf16_and_falls_back_to_fp16():
    if torch.cuda.is_available():
        native = torch.cuda.is_bf16_supported(including_emulation=False)  # Volta / Turing only emulate it
        assert auto_precision("cuda") == ("bf16" if native else "fp16")
    else:
        assert not bf16_native("cuda") and auto_precision("cuda") == "fp16"
