"""AdamW and its parameter groups: weight-decay exemptions and layer-wise learning-rate decay for ViTs."""
from __future__ import annotations

import re
from typing import Any, Iterable

import torch
from torch import nn

def adamw(params: Iterable[Any], **kwargs: Any) -> torch.optim.AdamW:
    """The AdamW of every training loop here, with the fused (one kernel for all tensors) step: the default
    for-loop step is ~6x slower on CPU for a ViT-B (298 vs 49 ms on 2 cores)."""
    return torch.optim.AdamW(params, fused=True, **kwargs)


_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED_RE = re.compile(r"(?:^|\.)(cls_token|pos_embed|patch_embed)(?:\.|$)")


def vit_layer_id(name: str, depth: int) -> int:
    """Layer index of a parameter for layer decay: embeddings 0, ``blocks.i`` i + 1, everything else depth + 1.

    Works on names with any prefix (``backbone.net.blocks.3.attn.qkv.weight`` -> 4) so the same rule serves the
    bare encoder, the MAE model and the detection backbone. Decoder blocks (``decoder_blocks.i``) count as heads.
    """
    m = _BLOCK_RE.search(name)
    if m and not name[: m.start() + 1].rstrip(".").endswith("decoder"):
        return int(m.group(1)) + 1
    if _EMBED_RE.search(name) and "decoder" not in name:
        return 0
    return depth + 1


def build_param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay_names: Iterable[str] = (),
    decay_1d: bool = False,
    layer_decay: float | None = None,
    depth: int | None = None,
) -> list[dict]:
    """Splits trainable parameters into AdamW groups.

    Args:
        model: any module; frozen parameters (e.g. fixed sin-cos position embeddings) are left out.
        weight_decay: decay for ordinary weights.
        no_decay_names: substrings of parameter names that get no decay (e.g. ``"pos_embed"``, ``"cls_token"``).
        decay_1d: also decay 1-D parameters (biases and norm weights). False exempts them all, as MAE's
            pretraining and fine-tuning do. ViTDet (Detectron2's ``get_default_optimizer_params`` with
            ``weight_decay_norm=0``) decays biases and exempts norm layers: True, with the norm parameters named in
            ``no_decay_names`` (what the detection trainer builds from ``SOLVER.BIAS_NO_DECAY False`` and
            ``SOLVER.NORM_NO_DECAY True``).
        layer_decay: if set, lr scale ``layer_decay ** (depth + 1 - layer_id)`` per ViT layer.
        depth: number of ViT blocks (required with ``layer_decay``).

    Returns:
        Groups with ``params``, ``weight_decay``, ``lr_scale`` and ``param_names``, merged by (decay, scale).
    """
    if layer_decay is not None and depth is None:
        raise ValueError("layer_decay needs the ViT depth")
    no_decay_names = tuple(no_decay_names)
    groups: dict[tuple[float, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = (p.ndim <= 1 and not decay_1d) or any(s in name for s in no_decay_names)
        wd = 0.0 if exempt else weight_decay
        scale = 1.0
        if layer_decay is not None:
            scale = layer_decay ** (depth + 1 - vit_layer_id(name, depth))
        g = groups.setdefault((wd, scale), {"params": [], "param_names": [], "weight_decay": wd, "lr_scale": scale})
        g["params"].append(p)
        g["param_names"].append(name)
    return list(groups.values())
