from .mae import (
    MAE_FACTORIES,
    MaskedAutoencoderViT,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    mae_vit_small_patch16,
    mae_vit_tiny_patch16,
    patchify,
    unpatchify,
)
from .pos_embed import get_2d_sincos_pos_embed
from .vit import VIT_SIZES, VisionTransformer

__all__ = [
    "MAE_FACTORIES", "MaskedAutoencoderViT", "VIT_SIZES", "VisionTransformer", "get_2d_sincos_pos_embed",
    "mae_vit_base_patch16", "mae_vit_huge_patch14", "mae_vit_large_patch16", "mae_vit_small_patch16",
    "mae_vit_tiny_patch16", "patchify", "unpatchify",
]
