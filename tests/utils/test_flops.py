"""count_forward_macs: fvcore's multiply-adds plus the analytic count for fused attention."""
import torch
import torch.nn.functional as F
from torch import nn

from mae_det.modeling import MaskedAutoencoderViT
from mae_det.modeling.vit import Attention
from mae_det.utils.flops import count_forward_macs


class _SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_single_linear_is_in_times_out_times_rows():
    report = count_forward_macs(nn.Linear(16, 8), torch.randn(4, 16))
    assert report.total_macs == 4 * 16 * 8 and report.attention_macs == 0
    assert count_forward_macs(nn.Linear(16, 8), torch.randn(2, 5, 16)).total_macs == 2 * 5 * 16 * 8
    assert report.training_flops == 6 * 4 * 16 * 8


def test_fused_attention_gets_the_analytic_count():
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 4)
    report = count_forward_macs(_SDPA(), (q, k, v))
    assert report.attention_macs == report.total_macs == 2 * 3 * 7 * 11 * (8 + 4)
    assert report.fvcore_macs == 0 and report.by_operator == {"scaled_dot_product_attention": 2 * 3 * 7 * 11 * 12}


def test_attention_module_counts_projections_and_attention():
    report = count_forward_macs(Attention(32, 4), torch.randn(2, 5, 32))
    assert report.by_operator["linear"] == 2 * 5 * 32 * 96 + 2 * 5 * 32 * 32
    assert report.attention_macs == 2 * 4 * 5 * 5 * (8 + 8)


def _tiny_mae() -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4).eval()


def test_mae_forward_matches_hand_count_of_visible_and_full_sequences():
    model = _tiny_mae()
    N, D, Dd, L, p = 2, 64, 32, 16, 8
    T, Td = 1 + 4, 1 + L  # mask 0.75 keeps 4 of 16 patches; the decoder sees all
    report = count_forward_macs(model, torch.randn(N, 3, 32, 32), mask_ratio=0.75)
    linear = N * (2 * 12 * T * D * D + T * D * Dd + 12 * Td * Dd * Dd + Td * Dd * p * p * 3)
    assert report.by_operator["linear"] == linear
    assert report.by_operator["conv"] == N * L * D * 3 * p * p
    assert report.attention_macs == N * (2 * 2 * T * T * D + 2 * Td * Td * Dd)
    assert report.total_macs == sum(report.by_operator.values())
    assert sum(report.by_module.values()) <= report.total_macs and "decoder_pred" in report.by_module
    assert report.by_module["blocks"] >= N * 2 * (12 * T * D * D + 2 * T * T * D)  # plus its LayerNorms
    assert "aten::gelu" in report.unsupported_ops


def test_method_and_constants_select_what_is_counted():
    model = _tiny_mae()
    imgs = torch.randn(1, 3, 32, 32)
    features = count_forward_macs(model, imgs, method="forward_features")
    assert features.attention_macs == 2 * 2 * 17 * 17 * 64
    masked = count_forward_macs(model, imgs, method="forward_encoder", mask_ratio=0.5)
    assert masked.attention_macs == 2 * 2 * 9 * 9 * 64


class _Explicit(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def _activations(module, inputs):
    from fvcore.nn import ActivationCountAnalysis

    from mae_det.utils.flops import ACTIVATION_HANDLES

    analysis = ActivationCountAnalysis(module, inputs).set_op_handle(**ACTIVATION_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return int(analysis.total())


def test_fused_attention_has_the_activations_of_the_explicit_products():
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 4)
    explicit = _activations(_Explicit(), (q, k, v))
    assert explicit == 2 * 3 * 7 * 11 + 2 * 3 * 7 * 4  # fvcore's count of q @ k^T and weights @ v
    assert _activations(_SDPA(), (q, k, v)) == explicit  # fvcore alone: 0


class _Einsum(nn.Module):
    def __init__(self, equation):
        super().__init__()
        self.equation = equation

    def forward(self, *xs):
        return torch.einsum(self.equation, *xs)


def test_an_einsum_that_only_reorders_axes_counts_nothing():
    x = torch.randn(2, 3, 4, 5, 6, 7)
    for equation in ("nchpwq->nhwpqc", "...ij->...ji"):
        report = count_forward_macs(_Einsum(equation), x)
        assert report.total_macs == 0, equation  # fvcore alone: half the 5040 elements
        assert _activations(_Einsum(equation), (x,)) == 0
    # a product is still counted, as fvcore counts it
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    assert count_forward_macs(_Einsum("abc,abd->acd"), (a, b)).total_macs == 2 * 3 * 4 * 5
    assert _activations(_Einsum("abc,abd->acd"), (a, b)) == 2 * 4 * 5
    assert count_forward_macs(_Einsum("bij->bi"), a).total_macs > 0  # a sum over j is not a reordering


def test_mae_patchify_target_adds_no_multiply_adds():
    model = _tiny_mae()
    report = count_forward_macs(model, torch.randn(1, 3, 32, 32), mask_ratio=0.75)
    assert report.by_operator.get("einsum", 0) == 0  # 'nchpwq->nhwpqc' was 3 * 32 * 32 / 2 = 1536
