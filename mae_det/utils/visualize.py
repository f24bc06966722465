"""MAE reconstructions as PNG grids: original | masked input | reconstruction | reconstruction + visible.

Works with mae_det pretraining checkpoints (``{"model": state_dict, "meta": {...}}``), official full checkpoints
(``{"model": ...}`` from ``*_full.pth`` / ``mae_visualize_*.pth``, optionally with the training ``args``) and bare
full state dicts. For norm-pix models the prediction is in per-patch normalized units; it is mapped back to
pixels with each *target* patch's own mean and standard deviation (the same statistics the loss used), so the
masked patches borrow brightness and contrast from the hidden image; the figure title says so.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from mae_det.checkpoint import CheckpointError, load_checkpoint
from mae_det.data.images import IMAGE_EXTENSIONS
from mae_det.modeling import MAE_FACTORIES, VIT_SIZES, MaskedAutoencoderViT

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PANEL_TITLES = ("original", "masked input", "reconstruction", "reconstruction + visible")
PAD = 8
HEADER = 36  # title line + panel labels
MIN_PANEL = 224  # small models are upscaled (nearest) to at least this many pixels per panel
# Constructor keywords a mae_det checkpoint's "meta" may carry (what the tensors cannot tell: heads).
ARCH_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "decoder_embed_dim", "decoder_depth",
             "decoder_num_heads")


@dataclass(frozen=True)
class LoadedMAE:
    model: MaskedAutoencoderViT
    name: str
    img_size: tuple[int, int]
    norm_pix_loss: bool


def _state_dict_and_meta(ckpt: dict, path: Path) -> tuple[dict, dict]:
    if "model" in ckpt and isinstance(ckpt["model"], dict):
        meta = dict(ckpt.get("meta") or {})
        args = ckpt.get("args")  # official training checkpoints: an argparse.Namespace
        if "norm_pix_loss" not in meta and hasattr(args, "norm_pix_loss"):
            meta["norm_pix_loss"] = bool(args.norm_pix_loss)
        if "model" not in meta and isinstance(getattr(args, "model", None), str):
            meta["model"] = args.model
        return ckpt["model"], meta
    if "cls_token" in ckpt:
        return ckpt, {}
    raise CheckpointError(f"{path}: expected a dict with a 'model' state dict (or a bare MAE state dict), "
                          f"found keys {sorted(ckpt)[:5]}")


def _factory_for(sd: dict, path: Path) -> str:
    dim, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
    for name in MAE_FACTORIES:
        embed_dim, _, _, patch_size = VIT_SIZES[name.split("_")[2]]
        if (embed_dim, patch_size) == (dim, patch):
            return name
    raise CheckpointError(f"{path}: no factory has width {dim} and patch {patch}; pass --model")


def _shape_kwargs(sd: dict) -> dict:
    """Constructor arguments that the tensors themselves fix."""
    def count(prefix: str) -> int:
        return len({k.split(".")[1] for k in sd if k.startswith(prefix)})

    return dict(
        in_chans=sd["patch_embed.proj.weight"].shape[1],
        depth=count("blocks."),
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / sd["cls_token"].shape[-1],
        decoder_embed_dim=sd["mask_token"].shape[-1],
        decoder_depth=count("decoder_blocks."),
    )


def load_mae(
    path: str | os.PathLike,
    model_name: str | None = None,
    norm_pix_loss: bool | None = None,
) -> LoadedMAE:
    """Builds the MAE a full checkpoint describes and loads it strictly (eval mode, CPU).

    The factory (``model_name``, else the checkpoint's ``meta["model"]`` or official ``args.model``, else the
    one with the checkpoint's width and patch size) supplies defaults; depths, decoder width, MLP ratio and
    channels come from the tensors, and the architecture keys of a mae_det checkpoint's ``meta`` (widths,
    depths, heads, patch size) override both.

    Args:
        path: a mae_det pretraining checkpoint, an official full checkpoint or a bare full state dict.
        model_name: a :data:`MAE_FACTORIES` name.
        norm_pix_loss: overrides what the checkpoint says (official full files without ``args`` say nothing;
            the released ``mae_visualize_*`` models use pixel targets, the default).

    Raises:
        CheckpointError: unreadable file, unknown model, encoder-only weights or mismatched tensors, naming
            the file.
    """
    path = Path(path)
    sd, meta = _state_dict_and_meta(load_checkpoint(path), path)
    if "decoder_pred.weight" not in sd or "mask_token" not in sd:
        raise CheckpointError(f"{path} holds no decoder (an encoder-only export?); reconstructions need a full "
                              "MAE checkpoint such as a mae_det pretraining checkpoint or mae_visualize_*.pth")
    name = model_name or meta.get("model") or _factory_for(sd, path)
    if name not in MAE_FACTORIES:
        raise CheckpointError(f"{path}: unknown model '{name}'; choose one of {sorted(MAE_FACTORIES)}")
    img_size = meta.get("img_size")
    if img_size is None:
        side = round((sd["pos_embed"].shape[1] - 1) ** 0.5) * sd["patch_embed.proj.weight"].shape[-1]
        img_size = side  # official tables are square
    img_size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    npl = bool(meta.get("norm_pix_loss", False)) if norm_pix_loss is None else norm_pix_loss
    arch = {k: meta[k] for k in ARCH_KEYS if k in meta}
    if arch and "decoder_num_heads" not in arch:  # heads change the function but no tensor shape
        logger.warning("%s: its meta has no decoder_num_heads; using %s's default", path, name)
    kwargs = {**_shape_kwargs(sd), **arch, "img_size": img_size, "norm_pix_loss": npl}
    try:
        model = MAE_FACTORIES[name](**kwargs)
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} does not fit {name} ({kwargs}): {str(e).splitlines()[0]}") from e
    return LoadedMAE(model.eval(), name, img_size, npl)


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files given directly or found recursively in folders, in sorted order per folder."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    return found


def _norm_stats(in_chans: int) -> tuple[torch.Tensor, torch.Tensor]:
    if in_chans == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif in_chans == 1:
        mean, std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    else:
        raise ValueError(f"visualization handles 1- or 3-channel models, this one has {in_chans} channels")
    return torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)


def load_image(path: Path, size: tuple[int, int], in_chans: int) -> torch.Tensor:
    """(C, H, W) in [0, 1]: resized so it covers ``size`` (bicubic), then center-cropped."""
    with Image.open(path) as img:
        img = img.convert("RGB" if in_chans == 3 else "L")
        h, w = size
        scale = max(h / img.height, w / img.width)
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        img = img.crop((left, top, left + w, top + h))
        arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@torch.no_grad()
def reconstruct(model: MaskedAutoencoderViT, image: torch.Tensor, mask_ratio: float, noise: torch.Tensor) -> dict:
    """Runs the MAE on one [0, 1] image (C, H, W) and returns the four [0, 1] panels and the loss.

    The prediction of a norm-pix model is de-normalized with each target patch's mean and unbiased variance
    (+1e-6), the inverse of the loss's target normalization.
    """
    mean, std = _norm_stats(image.shape[0])
    x = ((image - mean) / std)[None]  # (1, C, H, W)
    grid = (x.shape[2] // model.patch_size, x.shape[3] // model.patch_size)
    loss, pred, mask = model(x, mask_ratio=mask_ratio, noise=noise)  # (1, L, p*p*C), (1, L)
    if model.norm_pix_loss:
        target = model.patchify(x)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    recon = model.unpatchify(pred, grid)[0] * std + mean  # (C, H, W)
    removed = model.unpatchify(mask[..., None].expand_as(pred), grid)[0]  # (C, H, W), 1 = removed
    return {
        "original": image,
        "masked input": image * (1 - removed) + 0.5 * removed,
        "reconstruction": recon.clamp(0, 1),
        "reconstruction + visible": (image * (1 - removed) + recon * removed).clamp(0, 1),
        "loss": float(loss),
    }


def grid_image_size(img_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) in pixels of the PNG written for a model input of ``img_size`` = (h, w)."""
    zoom = max(1, MIN_PANEL // min(img_size))
    h, w = img_size[0] * zoom, img_size[1] * zoom
    return 4 * w + 5 * PAD, HEADER + h + PAD


def save_grid(panels: dict, path: Path, title: str) -> None:
    """Writes the four panels side by side under ``title`` (also stored as the PNG's "Title" text)."""
    first = panels[PANEL_TITLES[0]]
    width, height = grid_image_size(tuple(first.shape[1:]))
    zoom = max(1, MIN_PANEL // min(first.shape[1:]))
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((PAD, 4), title, fill="black", font=font)
    for i, name in enumerate(PANEL_TITLES):
        arr = (panels[name].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        tile = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert("RGB")
        tile = tile.resize((tile.width * zoom, tile.height * zoom), Image.NEAREST)
        x = PAD + i * (tile.width + PAD)
        draw.text((x, HEADER - 14), name, fill="black", font=font)
        canvas.paste(tile, (x, HEADER))
    info = PngInfo()
    info.add_text("Title", title)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, pnginfo=info)


def visualize_images(
    checkpoint: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    model_name: str | None = None,
    mask_ratio: float = 0.75,
    seed: int = 0,
    img_size: int | None = None,
    norm_pix_loss: bool | None = None,
) -> list[Path]:
    """Writes ``<output_dir>/<image stem>.png`` per readable input image; returns the written paths.

    Unreadable images are skipped with a warning and counted in the log. ``img_size`` (square) overrides the
    checkpoint's input size; position embeddings are then resampled. The same ``seed`` gives the same masks.
    """
    loaded = load_mae(checkpoint, model_name, norm_pix_loss)
    model = loaded.model
    size = (img_size, img_size) if img_size else loaded.img_size
    if size[0] % model.patch_size or size[1] % model.patch_size:
        raise ValueError(f"--img-size {size} must be a multiple of the patch size {model.patch_size}")
    paths = find_images(list(inputs))
    if not paths:
        raise FileNotFoundError(f"no images found in {[str(p) for p in inputs]}")
    generator = torch.Generator().manual_seed(seed)
    num_patches = (size[0] // model.patch_size) * (size[1] // model.patch_size)
    target_note = ("norm-pix model: prediction de-normalized with each target patch's own mean/std"
                   if loaded.norm_pix_loss else "pixel targets")
    out_dir = Path(output_dir)
    written: list[Path] = []
    used_names: set[str] = set()
    skipped = 0
    for path in paths:
        noise = torch.rand(1, num_patches, generator=generator)  # drawn even for skipped files: stable masks
        try:
            image = load_image(path, size, model.in_chans)
        except (OSError, ValueError) as e:
            skipped += 1
            logger.warning("skipping unreadable image %s: %s", path, e)
            continue
        panels = reconstruct(model, image, mask_ratio, noise)
        name = path.stem
        while name in used_names:
            name += "_"
        used_names.add(name)
        title = (f"{path.name} | {loaded.name} | mask {mask_ratio:.0%} | loss {panels['loss']:.4f} | "
                 f"{target_note}")
        out = out_dir / f"{name}.png"
        save_grid(panels, out, title)
        written.append(out)
    if skipped:
        logger.warning("skipped %d of %d images (unreadable)", skipped, len(paths))
    return written
