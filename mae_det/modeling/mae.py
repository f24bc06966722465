"""Masked autoencoder (He et al. 2021) on the shared :class:`VisionTransformer` encoder.

The model subclasses the encoder so that its ``state_dict`` is flat and key-for-key equal to the official
``MaskedAutoencoderViT`` (encoder keys first, then ``mask_token``, ``decoder_*``).
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from .pos_embed import get_2d_sincos_pos_embed
from .vit import VIT_SIZES, Block, LayerNorm6, VisionTransformer, _init_linear_and_norm


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, h*w, p*p*C), patches row-major, inside a patch (row, col, channel), channel fastest."""
    N, C, H, W = imgs.shape
    if H % p or W % p:
        raise ValueError(f"image size {(H, W)} is not divisible by patch size {p}")
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], in_chans: int = 3) -> torch.Tensor:
    """(N, h*w, p*p*C) -> (N, C, h*p, w*p), the exact inverse of :func:`patchify`."""
    h, w = grid
    N = x.shape[0]
    x = x.reshape(N, h, w, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, in_chans, h * p, w * p)


class MaskedAutoencoderViT(VisionTransformer):
    """MAE with a ViT encoder that sees only the visible patches and a light ViT decoder.

    Constructor keywords and defaults are the official ones; ``img_size`` may be (h, w) and ``in_chans`` any
    number. Extra encoder options (drop path, activation checkpointing) are passed through ``**encoder_kwargs``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        norm_pix_loss: bool = False,
        **encoder_kwargs,
    ) -> None:
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, norm_layer=norm_layer, **encoder_kwargs,
        )
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self._init_decoder_weights()

    def _init_decoder_weights(self) -> None:
        table = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True)
        self.decoder_pos_embed.data.copy_(table[None])
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("decoder"):
                _init_linear_and_norm(m)

    # ---- the algorithm's steps -----------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return unpatchify(x, self.patch_size, grid or self.grid_size, self.in_chans)

    @staticmethod
    def random_masking(
        x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keeps a random ``1 - mask_ratio`` of the tokens of each sample (argsort of uniform noise).

        Args:
            x: (N, L, D) tokens.
            noise: optional (N, L) noise; the lowest values are kept, in ascending-noise order.

        Returns:
            x_visible (N, len_keep, D), mask (N, L) float with 1 = removed, ids_restore (N, L).
        """
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        elif noise.shape != (N, L):
            raise ValueError(f"noise must have shape {(N, L)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise = keep
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(N, L, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to patch order
        return x_visible, mask, ids_restore

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.embed(imgs).flatten(1, 2)  # (N, L, D)
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # (N, len_keep, D)
        x = torch.cat([self.cls_with_pos(x.shape[0]), x], dim=1)  # (N, 1+len_keep, D)
        return self.forward_tokens(x), mask, ids_restore

    def decoder_pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == self.grid_size:
            return self.decoder_pos_embed
        table = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
        return table[None].to(self.decoder_pos_embed)

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.decoder_embed(x)  # (N, 1+len_keep, Dd)
        N, T, Dd = x.shape
        L = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(N, L + 1 - T, -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (N, L, Dd), shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed_for(grid)  # (N, 1+L, Dd)
        for blk in self.decoder_blocks:
            x = self.run_block(blk, x)
        x = self.decoder_pred(self.decoder_norm(x))  # (N, 1+L, p*p*C)
        return x[:, 1:]

    def pixel_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) targets; per-patch normalized (unbiased variance + 1e-6) when ``norm_pix_loss``."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over removed patches only; 0 (not NaN) when nothing is removed."""
        loss = ((pred.float() - self.pixel_targets(imgs).float()) ** 2).mean(dim=-1)  # (N, L)
        return (loss * mask).sum() / mask.sum().clamp(min=1.0)

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, pred (N, L, p*p*C), mask (N, L) with 1 = removed)."""
        grid = (imgs.shape[2] // self.patch_size, imgs.shape[3] // self.patch_size)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore, grid)
        return self.forward_loss(imgs, pred, mask), pred, mask


def _mae_factory(size: str, **kwargs) -> MaskedAutoencoderViT:
    embed_dim, depth, num_heads, patch_size = VIT_SIZES[size]
    defaults = dict(
        patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_layer=LayerNorm6,
    )
    defaults.update(kwargs)
    return MaskedAutoencoderViT(**defaults)


mae_vit_tiny_patch16 = partial(_mae_factory, "tiny")
mae_vit_small_patch16 = partial(_mae_factory, "small")
mae_vit_base_patch16 = partial(_mae_factory, "base")
mae_vit_large_patch16 = partial(_mae_factory, "large")
mae_vit_huge_patch14 = partial(_mae_factory, "huge")

MAE_FACTORIES = {
    "mae_vit_tiny_patch16": mae_vit_tiny_patch16,
    "mae_vit_small_patch16": mae_vit_small_patch16,
    "mae_vit_base_patch16": mae_vit_base_patch16,
    "mae_vit_large_patch16": mae_vit_large_patch16,
    "mae_vit_huge_patch14": mae_vit_huge_patch14,
}
