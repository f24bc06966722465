"""Hugging Face ``ViTMAEForPreTraining`` <-> official MAE state dicts (pure key/tensor mapping, no downloads).

The two models compute the same function: HF keeps q, k and v as three Linears where MAE fuses them into one
``qkv`` (rows q, then k, then v), names the layers differently, and stores the same sin-cos position tables
(its builder swaps halves to the official column-first layout) and the same patchify layout.

Two HF key layouts exist: the one of files written by transformers < 5 (and the hub's ``facebook/vit-mae-*``),
``vit.encoder.layer.{i}.attention.attention.query``..., which transformers 5 still reads, and the module names
of transformers 5, ``vit.layers.{i}.attention.q_proj``.... :func:`hf_to_mae` reads both; :func:`mae_to_hf`
writes either.

Differences that remain (so parity holds at the configured image size only): HF's decoder resamples its
position table as a 1-D sequence when ``interpolate_pos_encoding`` is set, where MAE here resamples the 2-D
grid; HF's loss is NaN for ``mask_ratio = 0`` where ours is 0.
"""
from __future__ import annotations

import re
from functools import partial
from importlib import metadata
from typing import Any, Mapping

import torch
from torch import nn

from .io import CheckpointError

# official block suffix -> HF suffix, per layout; q/k/v are handled apart.
_BLOCK_NAMES = {
    "legacy": {
        "norm1": "layernorm_before",
        "attn.proj": "attention.output.dense",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    },
    "v5": {
        "norm1": "layernorm_before",
        "attn.proj": "attention.o_proj",
        "norm2": "layernorm_after",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
}
_QKV_NAMES = {
    "legacy": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    "v5": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
}
_ENCODER_LAYER_PREFIX = {"legacy": "vit.encoder.layer", "v5": "vit.layers"}
_BLOCK_ORDER = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")

# Official non-block keys (in the official state-dict order) and their HF names.
_HEAD_KEYS = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.decoder_pos_embed",
    "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
}
_TAIL_KEYS = {
    "norm.weight": "vit.layernorm.weight",
    "norm.bias": "vit.layernorm.bias",
}
_DECODER_TAIL_KEYS = {
    "decoder_norm.weight": "decoder.decoder_norm.weight",
    "decoder_norm.bias": "decoder.decoder_norm.bias",
    "decoder_pred.weight": "decoder.decoder_pred.weight",
    "decoder_pred.bias": "decoder.decoder_pred.bias",
}
_DECODER_EMBED_KEYS = {
    "decoder_embed.weight": "decoder.decoder_embed.weight",
    "decoder_embed.bias": "decoder.decoder_embed.bias",
}


def _hf_layout(keys: set[str]) -> str:
    return "legacy" if any(".encoder.layer." in k or "attention.attention." in k for k in keys) else "v5"


def _count_layers(keys: set[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if found and found != set(range(len(found))):
        raise CheckpointError(f"layers under '{prefix}' are not numbered 0..{len(found) - 1}: {sorted(found)}")
    return len(found)


class _KeyReader:
    """Reads tensors of a state dict by key, so that a converter can name what was missing and what it never read."""

    def __init__(self, sd: Mapping[str, torch.Tensor], what: str, hint: str = "") -> None:
        self.sd, self.what, self.hint, self.used = sd, what, hint, set()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise CheckpointError(f"{self.what} has no '{key}'{self.hint}")
        self.used.add(key)
        return self.sd[key]

    def check_all_read(self, counterpart: str) -> None:
        left = sorted(set(self.sd) - self.used)
        if left:
            raise CheckpointError(f"{self.what} has keys with no {counterpart} counterpart: {left[:5]}")


def hf_to_mae(hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Converts a ``ViTMAEForPreTraining`` (or ``ViTMAEModel``) state dict to official MAE keys.

    Args:
        hf_state_dict: HF keys in either layout (see the module docstring); keys of a bare ``ViTMAEModel``
            (no ``vit.`` prefix) give an encoder-only dict.

    Returns:
        A new dict in the official key order. HF models built with ``qkv_bias=False`` get zero ``qkv`` biases
        (the official model always has them; zeros compute the same function).

    Raises:
        CheckpointError: a key is missing or left over, naming it.
    """
    sd = dict(hf_state_dict)
    if any(k.startswith("embeddings.") for k in sd):
        sd = {f"vit.{k}": v for k, v in sd.items()}  # bare ViTMAEModel
    layout = _hf_layout(set(sd))
    take = _KeyReader(sd, "HF ViTMAE state dict", f" (layout '{layout}')")

    def block(hf_prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for ours in _BLOCK_ORDER:
            if ours == "attn.qkv":
                q, k, v = (f"{hf_prefix}.{name}" for name in _QKV_NAMES[layout])
                out["attn.qkv.weight"] = torch.cat([take(f"{n}.weight") for n in (q, k, v)], dim=0)
                if f"{q}.bias" in sd:
                    out["attn.qkv.bias"] = torch.cat([take(f"{n}.bias") for n in (q, k, v)], dim=0)
                else:
                    out["attn.qkv.bias"] = out["attn.qkv.weight"].new_zeros(out["attn.qkv.weight"].shape[0])
            else:
                hf_name = _BLOCK_NAMES[layout][ours]
                out[f"{ours}.weight"] = take(f"{hf_prefix}.{hf_name}.weight")
                out[f"{ours}.bias"] = take(f"{hf_prefix}.{hf_name}.bias")
        return out

    has_decoder = any(k.startswith("decoder.") for k in sd)
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _HEAD_KEYS.items():
        if has_decoder or not theirs.startswith("decoder."):
            out[ours] = take(theirs)
    enc_prefix = _ENCODER_LAYER_PREFIX[layout]
    for i in range(_count_layers(set(sd), enc_prefix)):
        out.update({f"blocks.{i}.{k}": v for k, v in block(f"{enc_prefix}.{i}").items()})
    out.update({ours: take(theirs) for ours, theirs in _TAIL_KEYS.items()})
    if has_decoder:
        out.update({ours: take(theirs) for ours, theirs in _DECODER_EMBED_KEYS.items()})
        # transformers 5's save_pretrained writes the decoder layers under another prefix than its state_dict
        dec_prefix = ("decoder.decoder_encoder.layer" if any(k.startswith("decoder.decoder_encoder.layer.") for k in sd)
                      else "decoder.decoder_layers")
        for i in range(_count_layers(set(sd), dec_prefix)):
            out.update({f"decoder_blocks.{i}.{k}": v for k, v in block(f"{dec_prefix}.{i}").items()})
        out.update({ours: take(theirs) for ours, theirs in _DECODER_TAIL_KEYS.items()})
    take.check_all_read("MAE")
    return out


def _default_layout() -> str:
    try:
        major = int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return "legacy"
    return "v5" if major >= 5 else "legacy"


def mae_to_hf(state_dict: Mapping[str, torch.Tensor], legacy_names: bool | None = None) -> dict[str, torch.Tensor]:
    """Converts an official-key MAE state dict (full, or encoder only) to ``ViTMAEForPreTraining`` keys.

    Args:
        state_dict: official MAE keys (``cls_token``, ``blocks.{i}.attn.qkv.weight``, ``decoder_*``, ...).
        legacy_names: True writes the transformers < 5 file layout (what the hub holds and every version reads
            with ``from_pretrained``); False the transformers 5 module names (``load_state_dict`` there);
            None picks the installed version's module names.

    Returns:
        A new dict; an encoder-only input gives only the ``vit.`` keys.

    Raises:
        CheckpointError: a key is missing or left over, naming it.
    """
    layout = _default_layout() if legacy_names is None else ("legacy" if legacy_names else "v5")
    sd = dict(state_dict)
    take = _KeyReader(sd, "MAE state dict")

    def block(ours_prefix: str, hf_prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for ours, theirs in _BLOCK_NAMES[layout].items():
            for p in ("weight", "bias"):
                out[f"{hf_prefix}.{theirs}.{p}"] = take(f"{ours_prefix}.{ours}.{p}")
        for p in ("weight", "bias"):
            for name, part in zip(_QKV_NAMES[layout], take(f"{ours_prefix}.attn.qkv.{p}").chunk(3, dim=0)):
                out[f"{hf_prefix}.{name}.{p}"] = part.clone()  # views of one tensor would break safetensors
        return out

    has_decoder = "mask_token" in sd
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in {**_HEAD_KEYS, **_TAIL_KEYS}.items():
        if has_decoder or not theirs.startswith("decoder."):
            out[theirs] = take(ours)
    enc_prefix = _ENCODER_LAYER_PREFIX[layout]
    for i in range(_count_layers(set(sd), "blocks")):
        out.update(block(f"blocks.{i}", f"{enc_prefix}.{i}"))
    if has_decoder:
        out.update({theirs: take(ours) for ours, theirs in {**_DECODER_EMBED_KEYS, **_DECODER_TAIL_KEYS}.items()})
        for i in range(_count_layers(set(sd), "decoder_blocks")):
            out.update(block(f"decoder_blocks.{i}", f"decoder.decoder_layers.{i}"))
    take.check_all_read("HF ViTMAE")
    return out


def hf_config_from_mae(model: nn.Module, mask_ratio: float = 0.75) -> Any:
    """The ``transformers.ViTMAEConfig`` describing a :class:`~mae_det.modeling.MaskedAutoencoderViT`.

    Raises:
        ValueError: the model is not expressible in HF ViTMAE (non-square grid, or a non-LayerNorm norm).
    """
    from transformers import ViTMAEConfig

    gh, gw = model.grid_size
    if gh != gw:
        raise ValueError(f"HF ViTMAE needs a square input; this model's patch grid is {gh}x{gw}")
    if not isinstance(model.norm, nn.LayerNorm):
        raise ValueError(f"HF ViTMAE uses LayerNorm; this model's norm is {type(model.norm).__name__}")
    enc, dec = model.blocks[0], model.decoder_blocks[0]
    return ViTMAEConfig(
        image_size=gh * model.patch_size,
        patch_size=model.patch_size,
        num_channels=model.in_chans,
        hidden_size=model.embed_dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=enc.attn.num_heads,
        intermediate_size=enc.mlp.fc1.out_features,
        decoder_hidden_size=model.decoder_embed.out_features,
        decoder_num_hidden_layers=len(model.decoder_blocks),
        decoder_num_attention_heads=dec.attn.num_heads,
        decoder_intermediate_size=dec.mlp.fc1.out_features,
        qkv_bias=enc.attn.qkv.bias is not None,
        hidden_act="gelu",
        layer_norm_eps=model.norm.eps,
        mask_ratio=mask_ratio,
        norm_pix_loss=model.norm_pix_loss,
    )


def mae_kwargs_from_hf_config(config: Any) -> dict[str, Any]:
    """``MaskedAutoencoderViT`` constructor keywords for a ``ViTMAEConfig`` (object, or its ``config.json`` dict).

    Raises:
        ValueError: the configuration has no MAE equivalent (activation other than exact GELU, decoder MLP
            ratio differing from the encoder's, dropout), naming the field.
    """
    cfg = config if isinstance(config, Mapping) else config.to_dict()
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act must be 'gelu' (exact GELU as in MAE), got {cfg['hidden_act']!r}")
    for field in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if cfg.get(field, 0.0):
            raise ValueError(f"{field} must be 0 (MAE has no dropout), got {cfg[field]}")
    mlp_ratio = cfg["intermediate_size"] / cfg["hidden_size"]
    decoder_ratio = cfg["decoder_intermediate_size"] / cfg["decoder_hidden_size"]
    if mlp_ratio != decoder_ratio:
        raise ValueError(
            f"decoder_intermediate_size / decoder_hidden_size = {decoder_ratio} must equal the encoder's "
            f"intermediate_size / hidden_size = {mlp_ratio} (MAE uses one mlp_ratio)"
        )
    return dict(
        img_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        in_chans=cfg["num_channels"],
        embed_dim=cfg["hidden_size"],
        depth=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        decoder_embed_dim=cfg["decoder_hidden_size"],
        decoder_depth=cfg["decoder_num_hidden_layers"],
        decoder_num_heads=cfg["decoder_num_attention_heads"],
        mlp_ratio=mlp_ratio,
        norm_layer=partial(nn.LayerNorm, eps=cfg["layer_norm_eps"]),
        norm_pix_loss=cfg["norm_pix_loss"],
    )
