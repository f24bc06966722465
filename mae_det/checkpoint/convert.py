"""Explicit conversions of every weight format mae_det reads into the shared encoder's keys and Detectron2's.

Formats (``detect_format``):

* ``ours``: this project's pretraining checkpoint ``{"model": full MAE state dict, "meta": ...}`` or encoder
  export ``{"model": encoder state dict, "meta": ...}``; official key names in both.
* ``official``: the official MAE release (``mae_pretrain_vit_*.pth`` encoder only, ``*_full.pth`` /
  ``mae_visualize_*.pth`` with the decoder, training checkpoints with ``optimizer``/``args``).
* ``timm``: a timm ``VisionTransformer`` state dict, bare or under ``"state_dict"``; classifier ``head``/``fc_norm``
  are dropped. A full MAE state dict saved that way (``torch.save(mae.state_dict())``) detects as this too; its
  decoder is read by :func:`load_decoder_state`. Read here rather than through timm's ``checkpoint_filter_fn``,
  which takes any dict holding ``mask_token`` for DINOv2 and mangles full MAE checkpoints.
* ``hf``: Hugging Face ``ViTMAEForPreTraining`` / ``ViTMAEModel`` (through :func:`mae_det.checkpoint.hf.hf_to_mae`).
* ``d2``: a Detectron2 checkpoint of this project's ViT-FPN model (``backbone.net.*`` or
  ``backbone.bottom_up.net.*``, heads, maybe ``optimizer``/``iteration``).
* ``vitdet``: Detectron2's ViTDet (model zoo ``.pkl`` of numpy arrays or LazyConfig ``.pth``): ``backbone.net.*``
  and ``backbone.simfp_*``, mapped onto the ``simple`` pyramid's names by :data:`VITDET_PYRAMID_NAMES`.

Every key is mapped by name, never by suffix matching; keys no rule covers are an error, and a width or depth
that differs from the model's is an error naming the file (never a partial load). Inputs are never mutated.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import nn

from ..modeling.vit import VisionTransformer, resize_rel_pos
from .hf import hf_to_mae
from .io import SAFETENSORS_EXTRA, CheckpointError, load_checkpoint, require_checkpoint_file

logger = logging.getLogger(__name__)

FORMATS = ("ours", "official", "timm", "hf", "d2", "vitdet")
PRETRAINING_FORMATS = ("ours", "official", "timm", "hf")
FORMAT_NAMES = {
    "ours": "mae_det pretraining checkpoint / encoder export",
    "official": "official MAE",
    "timm": "timm ViT",
    "hf": "Hugging Face ViTMAE",
    "d2": "mae_det Detectron2 checkpoint",
    "vitdet": "Detectron2 ViTDet",
}
ENCODER_PREFIXES = ("backbone.net.", "backbone.bottom_up.net.")

_BLOCK_PARAMS = tuple(
    f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")
)
_REL_POS = ("attn.rel_pos_h", "attn.rel_pos_w")
_ENCODER_TOP = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias")
_REQUIRED_TOP = ("pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")
# Pretraining-checkpoint keys outside the encoder: the MAE decoder, and classifier heads of timm / fine-tuning.
_NOT_ENCODER = re.compile(r"^(mask_token|decoder_\w+(\..+)?|head\..+|fc_norm\..+)$")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")

# ViTDet's SimpleFeaturePyramid keeps each level in one nn.Sequential named simfp_<stage>; the index inside
# depends on how many resampling layers precede the two convs. Keyed by (stage - log2(patch)).
VITDET_PYRAMID_NAMES: dict[int, dict[str, str]] = {
    -2: {"0": "resample.0", "1": "resample.1", "3": "resample.3", "4": "lateral", "5": "output"},
    -1: {"0": "resample", "1": "lateral", "2": "output"},
    0: {"0": "lateral", "1": "output"},
    1: {"1": "lateral", "2": "output"},
}
_SIMFP_KEY = re.compile(r"^backbone\.simfp_(\d+)\.(\d+)\.(.+)$")


# ---- reading and detecting -----------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> dict:
    """Safely loads a ``.pth``/``.pt``/``.bin``/``.pkl`` (see :func:`load_checkpoint`) or ``.safetensors`` file.

    A safetensors file of ``tools/convert_checkpoint.py`` (metadata entry :data:`~mae_det.checkpoint.io.
    SAFETENSORS_EXTRA`) reads back as the torch file would, ``{"model": tensors, **its entries}``; any other is
    its bare tensors.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_checkpoint(path)
    require_checkpoint_file(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            extra = (f.metadata() or {}).get(SAFETENSORS_EXTRA)
        return tensors if extra is None else {**json.loads(extra), "model": tensors}
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {_first_line(e)}") from e


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_state_dict(d: Any) -> bool:
    return isinstance(d, Mapping) and len(d) > 0 and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in d.values())


def _weights(ckpt: Mapping, src: str) -> tuple[dict[str, Any], str | None]:
    """The state dict inside a checkpoint and the key it was found under (None: the checkpoint is one)."""
    if _is_state_dict(ckpt):
        sd, wrapper = ckpt, None
    else:
        found = [k for k in ("model", "state_dict", "model_state") if _is_state_dict(ckpt.get(k))]
        if not found:
            raise CheckpointError(
                f"{src}: no state dict of tensors found (top-level keys: {sorted(map(str, ckpt))[:8]})"
            )
        sd, wrapper = ckpt[found[0]], found[0]
    if all(k.startswith("module.") for k in sd):  # saved from a (Distributed)DataParallel wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd), wrapper


def _detect(ckpt: Mapping, src: str) -> tuple[str, dict[str, Any]]:
    sd, wrapper = _weights(ckpt, src)
    if any(k.startswith(("backbone.", "proposal_generator.", "roi_heads.")) for k in sd):
        return ("vitdet" if any(k.startswith("backbone.simfp_") for k in sd) else "d2"), sd
    if any("embeddings.patch_embeddings." in k for k in sd):
        return "hf", sd
    if "patch_embed.proj.weight" in sd:
        if "meta" in ckpt:
            return "ours", sd
        return ("official" if wrapper == "model" else "timm"), sd
    raise CheckpointError(
        f"{src}: not a ViT checkpoint mae_det knows (no patch_embed.proj.weight, HF embeddings or Detectron2 "
        f"backbone keys; first keys: {list(sd)[:5]})"
    )


def detect_format(ckpt: Mapping) -> str:
    """The format (one of :data:`FORMATS`) of a loaded checkpoint, judged by its content."""
    return _detect(ckpt, "<checkpoint>")[0]


def _open(path_or_dict: str | os.PathLike | Mapping, source: str | None) -> tuple[Mapping, str]:
    if isinstance(path_or_dict, Mapping):
        return path_or_dict, source or "<state dict>"
    return read_checkpoint(path_or_dict), source or str(path_or_dict)


def _tensor(v: Any) -> torch.Tensor:
    return torch.as_tensor(v) if isinstance(v, np.ndarray) else v


# ---- the encoder in official key names -----------------------------------------------------------------
def _check_encoder(enc: Mapping[str, torch.Tensor], src: str) -> tuple[int, int]:
    """Validates a plain-ViT encoder state dict -> (embed_dim, depth)."""
    blocks: dict[int, set[str]] = {}
    for k in enc:
        m = _BLOCK_KEY.match(k)
        if m:
            if m.group(2) not in _BLOCK_PARAMS + _REL_POS:
                raise CheckpointError(
                    f"{src}: unsupported key '{k}': the encoder is a plain ViT block (norm1, attn.qkv, attn.proj, "
                    f"norm2, mlp.fc1, mlp.fc2; LayerScale, qk-norm or separate q/v biases are not supported)"
                )
            blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
        elif k not in _ENCODER_TOP:
            raise CheckpointError(f"{src}: unexpected key '{k}' in a ViT encoder state dict")
    for k in _REQUIRED_TOP:
        if k not in enc:
            raise CheckpointError(f"{src}: the encoder has no '{k}'")
    depth = len(blocks)
    if sorted(blocks) != list(range(depth)):
        raise CheckpointError(f"{src}: encoder blocks are not numbered 0..{depth - 1}: {sorted(blocks)}")
    for i, names in blocks.items():
        lacking = [p for p in _BLOCK_PARAMS if p not in names]
        if lacking:
            raise CheckpointError(f"{src}: block {i} has no '{lacking[0]}'")
    return int(enc["patch_embed.proj.weight"].shape[0]), depth


def _split_vit_keys(sd: Mapping[str, Any], src: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official/timm keys -> (encoder state dict, dropped keys: decoder, mask token, classifier head).

    A ViT built without qkv biases (timm ``qkv_bias=False``) gets zero ones, as from the Hugging Face reader: the
    same function in the encoder, which always has them.
    """
    enc, dropped = {}, []
    for k, v in sd.items():
        if _NOT_ENCODER.match(k):
            dropped.append(k)
        else:
            enc[k] = _tensor(v)
    if not any(k.endswith(".attn.qkv.bias") for k in enc):
        for k in [k for k in enc if k.endswith(".attn.qkv.weight")]:
            enc[k.removesuffix("weight") + "bias"] = enc[k].new_zeros(enc[k].shape[0])
    _check_encoder(enc, src)
    return enc, dropped


def _detection_encoder(sd: Mapping[str, Any], src: str) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """A Detectron2 state dict -> (encoder prefix, encoder in official keys, the other keys)."""
    for prefix in ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            enc = {k[len(prefix):]: _tensor(v) for k, v in sd.items() if k.startswith(prefix)}
            rest = {k: v for k, v in sd.items() if not k.startswith(prefix)}
            _check_encoder(enc, src)
            return prefix, enc, rest
    raise CheckpointError(f"{src}: Detectron2 checkpoint without a ViT encoder (no keys under {ENCODER_PREFIXES})")


def source_grid(ckpt: Mapping, enc: Mapping[str, torch.Tensor], src: str = "<checkpoint>") -> tuple[int, int] | None:
    """The (h, w) token grid of a checkpoint's ``pos_embed`` where the checkpoint records it, else None.

    Recorded as ``pos_grid`` (files of ``tools/convert_checkpoint.py``), as this project's ``meta`` ``img_size`` (int
    or (h, w)) and ``patch_size``, or as an official training checkpoint's ``args.input_size``; the patch size
    defaults to the patch kernel's.

    Raises:
        CheckpointError: the recorded grid does not give the table's number of positions.
    """
    meta, patch = ckpt.get("meta"), int(enc["patch_embed.proj.weight"].shape[-1])
    if ckpt.get("pos_grid") is not None:
        size, patch, what = ckpt["pos_grid"], 1, "pos_grid"
    elif isinstance(meta, Mapping) and meta.get("img_size") is not None:
        size, patch, what = meta["img_size"], int(meta.get("patch_size") or patch), "meta img_size"
    elif isinstance(getattr(ckpt.get("args"), "input_size", None), int):
        size, what = ckpt["args"].input_size, "args.input_size"
    else:
        return None
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    grid, n = (h // patch, w // patch), enc["pos_embed"].shape[1]
    if n not in (grid[0] * grid[1], grid[0] * grid[1] + 1):
        raise CheckpointError(f"{src}: pos_embed has {n} positions but the checkpoint's {what} {size} gives a "
                              f"{grid[0]}x{grid[1]} grid")
    return grid


def resample_pos_embed(
    pos: torch.Tensor, grid: tuple[int, int], src: str = "<checkpoint>", old_grid: tuple[int, int] | None = None
) -> tuple[torch.Tensor, str]:
    """A (1, n, D) table -> (1, 1 + h*w, D) for ``grid`` with a cls slot (zero if the source had none).

    The source grid is ``old_grid`` (see :func:`source_grid`); unrecorded, a table of ``grid``'s size is taken as that
    grid and any other as square (every published ViT is). Bicubic with antialiasing, as timm.

    Returns:
        The new table and a note ("" when nothing changed).
    """
    n, gh, gw = pos.shape[1], grid[0], grid[1]
    if old_grid is None and n - gh * gw in (0, 1):
        old_grid = (gh, gw)
    if old_grid is None:
        side = next((s for s in (math.isqrt(n - 1), math.isqrt(n)) if s * s in (n - 1, n)), None)
        if side is None:
            raise CheckpointError(f"{src}: pos_embed has {n} positions, neither a square grid nor one plus a cls "
                                  "slot, and the checkpoint records no grid")
        old_grid = (side, side)
    prefix = n - old_grid[0] * old_grid[1]
    if tuple(old_grid) == (gh, gw):
        if prefix:
            return pos, ""
        return torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1), "pos_embed: zero cls slot added"
    new = resample_abs_pos_embed(
        pos.float(), new_size=[gh, gw], old_size=list(old_grid), num_prefix_tokens=prefix, interpolation="bicubic",
        antialias=True,
    ).to(pos.dtype)
    if not prefix:
        new = torch.cat([new.new_zeros(1, 1, new.shape[2]), new], dim=1)
    return new, f"pos_embed resampled {old_grid[0]}x{old_grid[1]} -> {gh}x{gw}"


def _resample_patch(w: torch.Tensor, patch: int) -> tuple[torch.Tensor, str]:
    if w.shape[-1] == patch and w.shape[-2] == patch:
        return w, ""
    new = resample_patch_embed(w.float(), [patch, patch], interpolation="bicubic", antialias=True).to(w.dtype)
    return new, f"patch_embed kernel resampled {w.shape[-2]}x{w.shape[-1]} -> {patch}x{patch}"


def _from_hf(sd: Mapping[str, Any], src: str) -> dict[str, torch.Tensor]:
    """:func:`hf_to_mae`, its errors naming the file as every other format's do."""
    try:
        return hf_to_mae(sd)
    except CheckpointError as e:
        raise CheckpointError(f"{src}: {e}") from e


def _encoder_of(ckpt: Mapping, fmt: str, src: str) -> tuple[str, dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """-> (format, encoder in official keys, non-encoder keys of a Detectron2 checkpoint, dropped keys)."""
    detected, sd = _detect(ckpt, src)
    fmt = detected if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise CheckpointError(f"{src}: unknown checkpoint format {fmt!r}; expected 'auto' or one of {FORMATS}")
    try:
        if fmt in ("d2", "vitdet"):
            _, enc, rest = _detection_encoder(sd, src)
            return fmt, enc, rest, []
        if fmt == "hf":
            sd = _from_hf(sd, src)
        enc, dropped = _split_vit_keys(sd, src)
        return fmt, enc, {}, dropped
    except CheckpointError as e:
        if fmt == detected:
            raise
        # A forced format (--format, MODEL.WEIGHTS_FORMAT) that does not fit: say what the content looks like.
        raise CheckpointError(
            f"{src}: cannot be read as {FORMAT_NAMES[fmt]} (format {fmt!r} was forced), its content looks like "
            f"{FORMAT_NAMES[detected]} (format {detected!r}; 'auto' detects it): {str(e).removeprefix(f'{src}: ')}"
        ) from e


def load_encoder_state(
    path_or_dict: str | os.PathLike | Mapping,
    fmt: str = "auto",
    *,
    grid: tuple[int, int] | None = None,
    patch_size: int | None = None,
    source: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ViT encoder of any supported checkpoint, in official MAE / timm key names.

    Loads into a bare :class:`~mae_det.modeling.vit.VisionTransformer` with ``load_state_dict`` (detection
    checkpoints hold no ``cls_token`` / final ``norm``; use ``strict=False`` there).

    Args:
        path_or_dict: a checkpoint file or an already loaded checkpoint / state dict (not modified).
        fmt: "auto" or one of :data:`FORMATS`.
        grid: resample ``pos_embed`` to this (h, w) token grid.
        patch_size: resample the patch-embedding kernel to this size (e.g. a patch-14 ViT-H to 16).
        source: name used in messages (defaults to the path).

    Returns:
        (a new state dict, info) with info keys ``format``, ``source``, ``embed_dim``, ``depth``,
        ``patch_size``, ``dropped`` (keys left out: decoder, mask token, heads, detection layers) and ``notes``.

    Raises:
        CheckpointError: unreadable or unsafe file, unknown layout or a malformed encoder, naming the file.
    """
    ckpt, src = _open(path_or_dict, source)
    fmt, enc, rest, dropped = _encoder_of(ckpt, fmt, src)
    recorded = source_grid(ckpt, enc, src)  # before the patch kernel is resampled: the grid is of the source patch
    notes = []
    if patch_size is not None:
        enc["patch_embed.proj.weight"], note = _resample_patch(enc["patch_embed.proj.weight"], patch_size)
        notes.append(note)
    if grid is not None:
        enc["pos_embed"], note = resample_pos_embed(enc["pos_embed"], grid, src, recorded)
        notes.append(note)
    dim, depth = _check_encoder(enc, src)
    info = dict(
        format=fmt, source=src, embed_dim=dim, depth=depth, patch_size=int(enc["patch_embed.proj.weight"].shape[-1]),
        dropped=dropped + sorted(rest), notes=[n for n in notes if n],
    )
    return enc, info


def load_encoder_weights(
    model: VisionTransformer, path_or_dict: str | os.PathLike | Mapping, *, source: str | None = None
) -> dict[str, Any]:
    """Loads the encoder of any checkpoint :func:`load_encoder_state` reads into ``model``: a bare encoder or a
    :class:`VisionTransformer` subclass with parts of its own (a classifier, an MAE decoder).

    The position embedding is resampled to the model's grid; a checkpoint's classifier (``head``, ``fc_norm``) is
    never loaded, nor its final ``norm`` into a global-pool classifier (which has none). The model's own parts
    outside the encoder (``_NOT_ENCODER`` names) keep their values.

    Returns:
        The converter's info plus ``ignored``: the checkpoint keys the model did not take.

    Raises:
        CheckpointError: naming the file, when its width, patch size or depth differ from the model's, or any other
            encoder tensor's shape (MLP width, input channels).
    """
    sd, info = load_encoder_state(path_or_dict, grid=model.grid_size, source=source)
    src = info["source"]
    if info["embed_dim"] != model.embed_dim:
        raise CheckpointError(
            f"{src}: encoder width {info['embed_dim']} does not match the model's embed_dim {model.embed_dim} "
            f"(set MODEL.ARCH / MODEL.EMBED_DIM to the checkpoint's size)"
        )
    if info["patch_size"] != model.patch_size:
        raise CheckpointError(
            f"{src}: patch size {info['patch_size']} does not match the model's {model.patch_size} (set MODEL.PATCH_SIZE)"
        )
    if info["depth"] != model.depth:
        raise CheckpointError(f"{src}: {info['depth']} blocks but the model has depth {model.depth} (set MODEL.DEPTH)")
    own = model.state_dict()
    for key, value in sd.items():
        if key in own and tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(f"{src}: {key} has shape {tuple(value.shape)} but the model's is "
                                  f"{tuple(own[key].shape)} (set MODEL.MLP_RATIO / MODEL.IN_CHANS to the checkpoint's)")
    for note in info["notes"]:
        logger.info("%s: %s", src, note)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not _NOT_ENCODER.match(k)]
    if any(k.startswith("norm.") for k in missing):
        # Global-pool fine-tuned and detection checkpoints have no final norm; LayerNorm's identity init stands in.
        logger.warning("%s: no final 'norm' in the checkpoint; the encoder's norm keeps its initial values", src)
        missing = [k for k in missing if not k.startswith("norm.")]
    if missing:
        raise CheckpointError(f"{src}: encoder weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        logger.info("%s: %d key(s) not used by this model, e.g. %s", src, len(unexpected), unexpected[:3])
    return info | {"ignored": list(unexpected)}


def is_mae_decoder_key(key: str) -> bool:
    """``mask_token`` and the ``decoder_*`` entries: the MAE parts outside the encoder, in official key names."""
    return key == "mask_token" or key.startswith("decoder_")


def load_decoder_state(path_or_dict: str | os.PathLike | Mapping, *, source: str | None = None) -> dict[str, torch.Tensor]:
    """The MAE decoder of a pretraining checkpoint (``mask_token`` and ``decoder_*``, official key names).

    Found in this project's full checkpoints, the official ``*_full.pth`` / ``mae_visualize_*.pth`` releases, HF
    ``ViTMAEForPreTraining`` and a full MAE state dict saved bare or under ``"state_dict"`` (``torch.save(
    mae.state_dict())``, also from a DDP-wrapped model), which detects as timm.

    Args:
        path_or_dict: a checkpoint file or an already loaded checkpoint / state dict (not modified).
        source: name used in messages (defaults to the path).

    Returns:
        A new dict; empty for encoder-only checkpoints (official ``mae_pretrain_vit_*.pth``, exports, timm ViTs)
        and for detection checkpoints, which cannot hold a decoder.

    Raises:
        CheckpointError: unreadable or unsafe file, or an unknown layout, naming the file.
    """
    ckpt, src = _open(path_or_dict, source)
    fmt, sd = _detect(ckpt, src)
    if fmt in ("d2", "vitdet"):
        return {}
    if fmt == "hf":
        sd = _from_hf(sd, src)
    return {k: _tensor(v) for k, v in sd.items() if is_mae_decoder_key(k)}


# ---- Detectron2 targets ----------------------------------------------------------------------------------
@dataclass
class Target:
    """What a Detectron2 model expects of the encoder: its key prefix, parameter shapes (keys without the
    prefix) and pretraining token grid (the position table's)."""

    prefix: str
    encoder: dict[str, tuple[int, ...]]
    grid: tuple[int, int]

    @property
    def patch_size(self) -> int:
        return self.encoder["patch_embed.proj.weight"][-1]


def target_of(model_or_cfg: nn.Module | Any) -> Target:
    """The :class:`Target` of a built model (any module holding one ``VisionTransformer``) or of a config.

    A config's backbone is built on the meta device (no memory, no initialization).
    """
    if isinstance(model_or_cfg, nn.Module):
        model, outer = model_or_cfg, ""
    else:  # Detectron2 is imported only here: encoder-only users (classification) do without it
        from detectron2.layers import ShapeSpec

        from ..modeling.backbone import build_vit_fpn_backbone

        with torch.device("meta"):
            model = build_vit_fpn_backbone(model_or_cfg, ShapeSpec(channels=model_or_cfg.MODEL.VIT.IN_CHANS))
        outer = "backbone."
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, VisionTransformer)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one VisionTransformer in the model, found {len(found)}")
    name, vit = found[0]
    shapes = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    return Target(prefix=f"{outer}{name}." if name else outer, encoder=shapes, grid=tuple(vit.grid_size))


def _fit_encoder(
    enc: dict[str, torch.Tensor], target: Target, src: str, grid: tuple[int, int] | None = None
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Resamples and checks an encoder (``pos_embed`` on ``grid``, if recorded) against the target -> (fitted
    encoder, dropped keys, notes)."""
    t = target.encoder
    dim, depth = _check_encoder(enc, src)
    t_dim = t["patch_embed.proj.weight"][0]
    t_depth = len({k.split(".")[1] for k in t if k.startswith("blocks.")})
    if (dim, depth) != (t_dim, t_depth):
        raise CheckpointError(
            f"{src}: the checkpoint's encoder is {dim}-d with {depth} blocks but the model's is {t_dim}-d with "
            f"{t_depth} blocks (MODEL.VIT.SIZE / EMBED_DIM / DEPTH); refusing a partial load"
        )
    out, dropped, notes = {}, [], []
    for k, v in enc.items():
        if k not in t:
            dropped.append(k)  # cls token and final norm: unused on the spatial grid; rel-pos if the model has none
            continue
        note = ""
        if k == "pos_embed":
            v, note = resample_pos_embed(v, target.grid, src, grid)
        elif k == "patch_embed.proj.weight":
            v, note = _resample_patch(v, target.patch_size)
        elif k.endswith(_REL_POS) and v.shape[0] != t[k][0]:
            v, note = resize_rel_pos(v, t[k][0]), "relative-position tables resampled to the model's sizes"
        if tuple(v.shape) != t[k]:
            raise CheckpointError(f"{src}: '{k}' has shape {tuple(v.shape)} but the model expects {t[k]}")
        out[k] = v
        if note and note not in notes:
            notes.append(note)
    lacking = [k for k in t if k not in out and not k.endswith(_REL_POS)]
    if lacking:
        raise CheckpointError(f"{src}: the checkpoint's encoder has no '{lacking[0]}' ({len(lacking)} keys lacking)")
    return out, dropped, notes


def _vitdet_pyramid(rest: Mapping[str, Any], patch: int, src: str) -> dict[str, Any]:
    """Renames ViTDet's ``backbone.simfp_<stage>.<index>.*`` to ``backbone.pyramid.p<stage>.<name>.*``."""
    out = {}
    base = int(math.log2(patch))
    for k, v in rest.items():
        m = _SIMFP_KEY.match(k)
        if not m:
            out[k] = v
            continue
        stage, index, tail = int(m.group(1)), m.group(2), m.group(3)
        name = VITDET_PYRAMID_NAMES.get(stage - base, {}).get(index)
        if name is None:
            raise CheckpointError(f"{src}: ViTDet pyramid key '{k}' has no counterpart in the simple pyramid")
        out[f"backbone.pyramid.p{stage}.{name}.{tail}"] = v
    return out


def convert_to_detectron2(
    path_or_dict: str | os.PathLike | Mapping,
    target: nn.Module | Any | None,
    fmt: str = "auto",
    *,
    source: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Any supported checkpoint -> (state dict with Detectron2-model keys, info).

    Args:
        path_or_dict: a checkpoint file or a loaded checkpoint / state dict (not modified).
        target: the model (or its config) the result is for: the encoder is checked against it (width and
            depth must match), ``pos_embed`` resampled to its pretraining grid, the patch kernel and relative-
            position tables resampled to its sizes, and the encoder placed under its prefix. None: no checks,
            prefix ``backbone.net.``.
        fmt: "auto" or one of :data:`FORMATS`.
        source: name used in messages.

    Returns:
        (new state dict, info) with info keys ``format``, ``origin`` (the format the weights were first
        converted from: differs from ``format`` for files of ``tools/convert_checkpoint.py``), ``source``,
        ``encoder_prefix``, ``dropped`` (keys of the checkpoint left out on purpose), ``notes`` (resampling
        done) and ``grid`` (the (h, w) token grid of the result's ``pos_embed``; None when the checkpoint records
        none and no target was given).
    """
    ckpt, src = _open(path_or_dict, source)
    fmt, enc, rest, dropped = _encoder_of(ckpt, fmt, src)
    grid = source_grid(ckpt, enc, src)
    notes: list[str] = []
    if target is None:
        prefix = ENCODER_PREFIXES[0]
        dropped += [k for k in ("cls_token", "norm.weight", "norm.bias") if k in enc]
        enc = {k: v for k, v in enc.items() if k not in dropped}
    else:
        tgt = target if isinstance(target, Target) else target_of(target)
        prefix = tgt.prefix
        enc, more, notes = _fit_encoder(enc, tgt, src, grid)
        dropped += more
        grid = tgt.grid
    if fmt == "vitdet":
        rest = _vitdet_pyramid(rest, int(enc["patch_embed.proj.weight"].shape[-1]), src)
    out = {f"{prefix}{k}": v for k, v in enc.items()}
    out.update({k: _tensor(v) for k, v in rest.items()})
    # A file written by tools/convert_checkpoint.py is in our Detectron2 layout but holds pretraining weights.
    origin = ckpt.get("source_format", fmt) if fmt == "d2" else fmt
    info = dict(format=fmt, origin=origin, source=src, encoder_prefix=prefix, dropped=dropped, notes=notes, grid=grid)
    return out, info


def to_detectron2(
    path_or_dict: str | os.PathLike | Mapping, cfg: Any | None = None, fmt: str = "auto"
) -> dict[str, torch.Tensor]:
    """:func:`convert_to_detectron2` without the info: the state dict for a model built from ``cfg``."""
    return convert_to_detectron2(path_or_dict, cfg, fmt)[0]


# ---- the load report ----------------------------------------------------------------------------------
def _is_new_table(key: str, fmt: str, encoder_prefix: str) -> bool:
    """Tables a checkpoint of this format cannot hold: relative position, and for pretraining formats all but
    the encoder (pyramid, heads)."""
    if key.endswith(_REL_POS):
        return True
    return fmt in PRETRAINING_FORMATS and not key.startswith(encoder_prefix)


def _groups(keys: Iterable[str], limit: int = 8) -> list[str]:
    """Compact key patterns with counts: indexes become ``*``, sibling leaves merge as ``{weight,bias}``, and a
    module with more than two such stems collapses to ``module.*``."""
    leaves: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for k in keys:
        stem, _, leaf = re.sub(r"\.\d+(?=\.|$)", ".*", k).rpartition(".")
        stem = stem or leaf
        leaves.setdefault(stem, set()).add(leaf)
        counts[stem] = counts.get(stem, 0) + 1
    families: dict[str, list[str]] = {}
    for stem in sorted(leaves):
        families.setdefault(".".join(stem.split(".")[:2]), []).append(stem)
    lines = []
    for family, stems in families.items():
        if len(stems) > 2:
            lines.append(f"{family}.* ({sum(counts[s] for s in stems)})")
            continue
        for stem in stems:
            names = sorted(leaves[stem])
            text = stem if names == [stem] else f"{stem}.{names[0]}" if len(names) == 1 else f"{stem}.{{{','.join(names)}}}"
            lines.append(f"{text} ({counts[stem]})" if counts[stem] > 1 else text)
    return lines[:limit] + ([f"... {len(lines) - limit} more groups"] if len(lines) > limit else [])


@dataclass
class LoadReport:
    """What a checkpoint load did, for one screen of log."""

    source: str
    format: str
    origin: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    skipped: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        kind = FORMAT_NAMES.get(self.format, self.format)
        if self.origin != self.format:
            kind += f", converted from {FORMAT_NAMES.get(self.origin, self.origin)}"
        lines = [f"Loaded {self.source} ({kind})"]

        def section(title: str, keys: list[str]) -> None:
            lines.append(f"  {title}: {len(keys)}")
            lines.extend(f"      {g}" for g in _groups(keys) if keys)

        section("loaded", self.loaded)
        section("new (initialized; no checkpoint of this format holds them)", self.new)
        section("MISSING (initialized, but the checkpoint should have held them)", self.missing)
        section("unused checkpoint keys", self.unused)
        if self.skipped:
            lines.append(f"  skipped, shape mismatch (initialized): {len(self.skipped)}")
            lines.extend(f"      {k}: checkpoint {a}, model {b}" for k, a, b in self.skipped[:6])
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def build_load_report(
    loaded: Iterable[str],
    missing: Iterable[str],
    unexpected: Iterable[str],
    info: Mapping[str, Any],
    incorrect_shapes: Iterable[tuple[str, tuple, tuple]] = (),
) -> LoadReport:
    """Sorts the outcome of ``load_state_dict`` of a converted checkpoint into a :class:`LoadReport`.

    Args:
        loaded: model keys that received a tensor.
        missing: model keys the converted checkpoint lacked.
        unexpected: converted-checkpoint keys the model lacks.
        info: the info of :func:`convert_to_detectron2`.
        incorrect_shapes: (key, checkpoint shape, model shape) skipped by the loader.
    """
    fmt, prefix = info["origin"], info["encoder_prefix"]
    missing = list(missing)
    return LoadReport(
        source=info["source"],
        format=info["format"],
        origin=fmt,
        loaded=sorted(loaded),
        new=sorted(k for k in missing if _is_new_table(k, fmt, prefix)),
        missing=sorted(k for k in missing if not _is_new_table(k, fmt, prefix)),
        unused=sorted([*unexpected, *info["dropped"]]),
        skipped=list(incorrect_shapes),
        notes=list(info["notes"]),
    )
