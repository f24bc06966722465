"""Fixed 2-D sine-cosine position embeddings in the official MAE layout."""
from __future__ import annotations

import torch


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Embeds 1-D positions as ``[sin(pos * w), cos(pos * w)]`` with ``w_k = 1 / 10000^(k / (D/2))``.

    Args:
        embed_dim: output width D (even).
        positions: any shape, flattened to (M,).

    Returns:
        (M, D) float64 tensor.
    """
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    angles = torch.outer(positions.reshape(-1).to(torch.float64), omega)  # (M, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """2-D sin-cos table for a grid of ``grid_size`` = h or (h, w) patches, row-major over (row, col).

    The first D/2 channels encode the column index and the second D/2 the row index, which is the layout of
    the official MAE checkpoints (their grid is built with the column coordinate first).

    Returns:
        (h*w, D) float32 tensor, or (1 + h*w, D) with a leading all-zero row for the cls token.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be a multiple of 4, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")  # (h, w) each
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)  # (h*w, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
