"""2-D sin-cos position embeddings: the official MAE layout, checked against independent formulas."""
import math

import pytest
import torch

from mae_det.modeling import get_2d_sincos_pos_embed
from mae_det.modeling.pos_embed import sincos_1d


def _reference_entry(D: int, row: int, col: int) -> list[float]:
    """One table row written out from the paper's formula: [sin(col w), cos(col w), sin(row w), cos(row w)]."""
    omega = [1.0 / 10000 ** (k / (D / 4)) for k in range(D // 4)]
    half = lambda pos: [math.sin(pos * w) for w in omega] + [math.cos(pos * w) for w in omega]  # noqa: E731
    return half(col) + half(row)


def test_documented_example_row_d8_grid2():
    table = get_2d_sincos_pos_embed(8, 2, cls_token=False)
    # Patch (row 0, col 1): first half encodes the column, second half the row.
    expected = torch.tensor([0.8415, 0.01, 0.5403, 1.0, 0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(table[1], expected, atol=1e-4, rtol=0)
    assert table.shape == (4, 8) and table.dtype == torch.float32


@pytest.mark.parametrize("D,grid", [(16, (3, 3)), (32, (2, 5)), (64, (4, 3))])
def test_every_row_matches_formula_row_major(D, grid):
    h, w = grid
    table = get_2d_sincos_pos_embed(D, grid, cls_token=True)
    assert table.shape == (1 + h * w, D)
    assert torch.count_nonzero(table[0]) == 0  # cls slot
    for r in range(h):
        for c in range(w):
            expected = torch.tensor(_reference_entry(D, r, c), dtype=torch.float32)
            torch.testing.assert_close(table[1 + r * w + c], expected, atol=1e-6, rtol=0)


def test_int_grid_equals_square_tuple():
    torch.testing.assert_close(get_2d_sincos_pos_embed(32, 4), get_2d_sincos_pos_embed(32, (4, 4)), atol=0, rtol=0)


def test_sincos_1d_layout_and_odd_width_error():
    emb = sincos_1d(6, torch.tensor([0.0, 2.0]))
    omega = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)], dtype=torch.float64)
    torch.testing.assert_close(emb[1], torch.cat([(2 * omega).sin(), (2 * omega).cos()]))
    torch.testing.assert_close(emb[0], torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.float64))
    with pytest.raises(ValueError, match="must be even"):
        sincos_1d(5, torch.arange(3))


def test_width_not_multiple_of_four_is_an_error():
    with pytest.raises(ValueError, match="multiple of 4, got 30"):
        get_2d_sincos_pos_embed(30, 2)


def test_equals_transformers_table_after_its_documented_half_swap():
    """Cross-check against Hugging Face's independent implementation (it rotates halves to the official layout)."""
    hf = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")
    if not hasattr(hf, "build_2d_sinusoidal_position_embedding"):
        pytest.skip("this transformers version has no standalone sin-cos builder")
    theirs = hf.build_2d_sinusoidal_position_embedding(4, 4, embed_dim=48, cls_token=True)
    theirs = torch.cat([theirs[:, 24:], theirs[:, :24]], dim=1)
    torch.testing.assert_close(get_2d_sincos_pos_embed(48, 4, cls_token=True), theirs, atol=1e-6, rtol=0)
