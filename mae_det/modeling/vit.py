"""The one ViT encoder of mae_det, shared by MAE pretraining and the detection backbone.

Parameter names follow the official MAE / timm ViT (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``) so that official, timm and our own
checkpoints load without renaming. Blocks optionally use windowed attention and decomposed relative position
(ViTDet), which timm's ``Block`` lacks; attention always runs through fused ``scaled_dot_product_attention``.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed
from torch import nn

from .pos_embed import get_2d_sincos_pos_embed

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resamples a (L, C) relative-position table to (length, C)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear")  # (1, C, length)
    return resized.squeeze(0).t()


def relative_positions(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gathers the table rows for every (query, key) offset along one axis -> (q_size, k_size, C).

    When query and key lengths differ, coordinates are scaled to the longer axis before taking offsets.
    """
    table = resize_rel_pos(rel_pos, 2 * max(q_size, k_size) - 1)
    q_scale, k_scale = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    offsets = (q_coords - k_coords) + (k_size - 1) * k_scale  # (q, k), all >= 0
    return table[offsets.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """Additive attention bias of decomposed relative position (MViTv2 / ViTDet).

    Args:
        q: (B, heads, h*w, C) unscaled queries.
        hw: the (h, w) token grid; keys share it.

    Returns:
        (B, heads, h*w, h*w) bias.
    """
    h, w = hw
    B, nh, _, C = q.shape
    r_q = q.reshape(B, nh, h, w, C)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, relative_positions(h, h, rel_pos_h))  # (B, nh, h, w, h)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, relative_positions(w, w, rel_pos_w))  # (B, nh, h, w, w)
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # (B, nh, h, w, h, w)
    return bias.reshape(B, nh, h * w, h * w)


class Attention(nn.Module):
    """Multi-head self-attention through fused SDPA, with optional decomposed relative position."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if rel_pos_size is None:
                raise ValueError("use_rel_pos needs rel_pos_size, the token grid the tables are sized for")
            head_dim = dim // num_heads
            # Zero init: a pretrained encoder without relative position starts out unchanged.
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        B, N, C = x.shape  # (B, N, D)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        bias = None
        if self.use_rel_pos:
            if hw is None or hw[0] * hw[1] != N:
                raise ValueError("relative position needs a spatial token grid without a cls token")
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, hw).to(q.dtype)
        if x.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            # CPU SDPA kernels run ~2x slower in bf16 than in fp32 (while bf16 matmuls run 2x faster), so only the
            # attention itself goes back to fp32, also under CPU autocast.
            with torch.autocast("cpu", enabled=False):
                mask = None if bias is None else bias.float()
                x = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWin, window*window, C), zero-padding H and W up to multiples of ``window``."""
    B, H, W, C = x.shape
    pad_h, pad_w = (-H) % window, (-W) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window, window, Wp // window, window, C)
    x = torch.einsum("bhpwqc->bhwpqc", x).reshape(-1, window * window, C)
    return x, (Hp, Wp)


def window_unpartition(x: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nWin, window*window, C) -> (B, H, W, C)."""
    Hp, Wp = padded_hw
    nh, nw = Hp // window, Wp // window
    C = x.shape[-1]
    x = x.view(-1, nh, nw, window, window, C)
    x = torch.einsum("bhwpqc->bhpwqc", x).reshape(-1, Hp, Wp, C)
    return x[:, : hw[0], : hw[1]].contiguous()


class Block(nn.Module):
    """Pre-norm transformer block; ``window_size > 0`` attends within non-overlapping windows."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = LayerNorm6,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        window_size: int = 0,
        use_rel_pos: bool = False,
        rel_pos_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_size=(window_size, window_size) if window_size > 0 else rel_pos_size,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) token sequence (global attention), or (B, H, W, D) spatial grid."""
        if x.dim() == 3:
            return self._residual(x, self.attn(self.norm1(x)))
        B, H, W, D = x.shape
        y = self.norm1(x)
        if self.window_size > 0:
            y, padded = window_partition(y, self.window_size)
            y = self.attn(y, (self.window_size, self.window_size))
            y = window_unpartition(y, self.window_size, padded, (H, W))
        else:
            y = self.attn(y.reshape(B, H * W, D), (H, W)).reshape(B, H, W, D)
        return self._residual(x, y)

    def _residual(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(attn_out)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT encoder for MAE pretraining (token sequences) and detection (spatial grids).

    Args:
        img_size: pretraining image size, int or (h, w); sets the position-embedding grid.
        patch_size: patch side in pixels.
        in_chans: input channels (any number).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the usual ViT sizes.
        norm_layer: norm constructor (LayerNorm eps 1e-6 by default, as the official factories).
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        window_size: window side for windowed attention in spatial mode (0 = global everywhere).
        global_attn_indexes: blocks (0-based) that stay global when ``window_size > 0``.
        use_rel_pos: add decomposed relative position in spatial mode (zero-initialized).
        rel_pos_grid: token grid the global blocks' relative-position tables are sized for (the detection
            input grid, e.g. 64 for 1024 px); defaults to the pretraining grid.
        use_act_checkpoint: recompute block activations in backward to save memory.
        learnable_pos_embed: train the position embedding (timm ViTs) instead of the fixed sin-cos table (MAE).
        init: "mae" (xavier-uniform Linear and patch weights, sin-cos position table: the official MAE model) or
            "vitdet" (Detectron2 ViTDet's from-scratch rules: trunc-normal std 0.02 Linear weights and position
            table, PyTorch's default patch conv; same random draws in the same order as Detectron2's ``ViT``).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = LayerNorm6,
        drop_path_rate: float = 0.0,
        window_size: int = 0,
        global_attn_indexes: Sequence[int] = (),
        use_rel_pos: bool = False,
        rel_pos_grid: int | tuple[int, int] | None = None,
        use_act_checkpoint: bool = False,
        learnable_pos_embed: bool = False,
        init: str = "mae",
    ) -> None:
        super().__init__()
        img_hw = _pair(img_size)
        if img_hw[0] % patch_size or img_hw[1] % patch_size:
            raise ValueError(f"image size {img_hw} is not divisible by patch_size {patch_size}")
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0, got {window_size}")
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} out of range for depth {depth} (0-based)")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.use_act_checkpoint = use_act_checkpoint
        self.patch_embed = PatchEmbed(
            img_size=img_hw, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            strict_img_size=False, output_fmt="NHWC",
        )
        self.grid_size: tuple[int, int] = (img_hw[0] // patch_size, img_hw[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=learnable_pos_embed
        )
        rel_grid = _pair(rel_pos_grid) if rel_pos_grid is not None else self.grid_size
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: buildable under a meta device
        self.blocks = nn.ModuleList(
            Block(
                embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=dpr[i], norm_layer=norm_layer,
                window_size=window_size if i not in global_attn_indexes else 0,
                use_rel_pos=use_rel_pos, rel_pos_size=rel_grid,
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        if init == "mae":
            self._init_mae_weights()
        elif init == "vitdet":
            self._init_vitdet_weights()
        else:
            raise ValueError(f"init must be 'mae' or 'vitdet', got {init!r}")

    def _init_mae_weights(self) -> None:
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.embed_dim, self.grid_size, cls_token=True)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            _init_linear_and_norm(m)
        _init_linear_and_norm(self.norm)

    def _init_vitdet_weights(self) -> None:
        # The patch conv keeps PyTorch's default init (drawn at construction), relative-position tables stay zero
        # and the cls token stays zero (its input still differs per run through the random cls position slot).
        # A frozen position table (MAE pretraining) must carry positions, so it stays sin-cos.
        if self.pos_embed.requires_grad:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.embed_dim, self.grid_size, cls_token=True)[None])
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- shared pieces -------------------------------------------------------------------------------
    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Patch position embeddings (no cls slot) for a (h, w) grid -> (1, h, w, D), resampled if needed."""
        pos = self.pos_embed
        if tuple(grid) != self.grid_size:
            pos = resample_abs_pos_embed(
                pos, new_size=list(grid), old_size=list(self.grid_size), num_prefix_tokens=1,
                interpolation="bicubic", antialias=False,
            )
        return pos[:, 1:].reshape(1, grid[0], grid[1], -1)

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, h, w, D) patch tokens with position embedding added."""
        x = self.patch_embed(imgs)  # (N, h, w, D)
        return x + self.pos_embed_for(x.shape[1:3])

    def cls_with_pos(self, batch: int) -> torch.Tensor:
        """(N, 1, D) cls token plus its (fixed, zero in MAE) position embedding."""
        return (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)

    def run_block(self, blk: Block, x: torch.Tensor) -> torch.Tensor:
        if self.use_act_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    # ---- token mode (MAE, classification) ------------------------------------------------------------
    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Runs all blocks and the final norm on a (N, T, D) token sequence (cls + patches)."""
        for blk in self.blocks:
            x = self.run_block(blk, x)
        return self.norm(x)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked, deterministic encoding: (N, C, H, W) -> (N, 1 + h*w, D) normalized tokens, cls first."""
        x = self.embed(imgs).flatten(1, 2)  # (N, L, D)
        x = torch.cat([self.cls_with_pos(x.shape[0]), x], dim=1)  # (N, 1+L, D)
        return self.forward_tokens(x)

    def pooled_features(self, imgs: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """(N, D) image features: the cls token or the mean of the patch tokens."""
        x = self.forward_features(imgs)
        if pool == "cls":
            return x[:, 0]
        if pool == "mean":
            return x[:, 1:].mean(dim=1)
        raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")

    # ---- spatial mode (detection) --------------------------------------------------------------------
    def forward_spatial(self, imgs: torch.Tensor, out_indices: Sequence[int]) -> list[torch.Tensor]:
        """Encodes without cls token on the spatial grid (windowed / relative-position blocks).

        Args:
            imgs: (N, C, H, W) with H, W multiples of the patch size.
            out_indices: 0-based block indexes whose outputs are returned (no final norm, as ViTDet); an index may
                repeat.

        Returns:
            One (N, D, h, w) map per index, in the order given (a repeated index gives its block's map again).
        """
        x = self.embed(imgs)  # (N, h, w, D)
        # An index may repeat (the default quarter taps of an encoder shallower than 4 blocks): each of its slots
        # gets the block's output.
        slots: dict[int, list[int]] = {}
        for k, i in enumerate(out_indices):
            slots.setdefault(i, []).append(k)
        outs: list[torch.Tensor | None] = [None] * len(out_indices)
        for i, blk in enumerate(self.blocks):
            x = self.run_block(blk, x)
            for k in slots.get(i, ()):
                outs[k] = x.permute(0, 3, 1, 2)
        return outs  # type: ignore[return-value]


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# Standard encoder sizes: (embed_dim, depth, num_heads, patch_size).
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (192, 12, 3, 16),
    "small": (384, 12, 6, 16),
    "base": (768, 12, 12, 16),
    "large": (1024, 24, 16, 16),
    "huge": (1280, 32, 16, 14),
}
