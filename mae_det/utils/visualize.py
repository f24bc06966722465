"""MAE reconstructions as PNG grids: original | masked input | reconstruction | reconstruction + visible.

Works with mae_det pretraining checkpoints (``{"model": state_dict, "meta": {...}}``), official full checkpoints
(``{"model": ...}`` from ``*_full.pth`` / ``mae_visualize_*.pth``, optionally with the training ``args``) and bare
full state dicts. For norm-pix models the prediction is in per-patch normalized units; it is mapped back to
pixels with each *target* patch's own mean and standard deviation (the same statistics the loss used), so the
masked patches borrow brightness and contrast from the hidden image; the figure title says so.

Images are decoded and listed as everywhere else in mae_det (:func:`mae_det.data.images.load_image`,
:func:`mae_det.data.pretrain.list_images`) and normalized with the mean and std the model was trained with.
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
from mae_det.data.images import ImageLoadError, load_image as decode_image  # ours, below, also resizes
from mae_det.data.pretrain import list_images
from mae_det.engine.predictor import check_output_dir
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


class VisualizationError(ValueError):
    """Arguments or inputs that no grid can be made from; the message is one line naming the file or argument."""


@dataclass(frozen=True)
class LoadedMAE:
    """A full MAE ready to reconstruct, with what its checkpoint says about how it was trained.

    ``pixel_mean`` / ``pixel_std``: the normalization of its training inputs, one value per channel.
    """

    model: MaskedAutoencoderViT
    name: str
    img_size: tuple[int, int]
    norm_pix_loss: bool
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD


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
    """The factory of the tensors' width and patch size, else (warned) the first of their width: depths, decoder
    width and the patch size come from the tensors either way, the width and head counts from the factory."""
    dim, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
    same_width = [name for name in MAE_FACTORIES if VIT_SIZES[name.split("_")[2]][0] == dim]
    exact = [name for name in same_width if VIT_SIZES[name.split("_")[2]][3] == patch]
    if exact:
        return exact[0]
    if not same_width:
        raise CheckpointError(f"{path}: no factory has width {dim}, and no tensor records the head counts of a bare "
                              "state dict: use a mae_det pretraining checkpoint, whose meta records them")
    name = same_width[0]
    logger.warning("%s: no factory has width %d and patch %d; using %s with the checkpoint's patch size and its "
                   "head counts (%d encoder, 16 decoder), which no tensor records: if the model was trained with "
                   "others, its reconstructions are wrong", path, dim, patch, name, VIT_SIZES[name.split("_")[2]][2])
    return name


def _shape_kwargs(sd: dict) -> dict:
    """Constructor arguments that the tensors themselves fix."""
    def count(prefix: str) -> int:
        return len({k.split(".")[1] for k in sd if k.startswith(prefix)})

    return dict(
        in_chans=sd["patch_embed.proj.weight"].shape[1],
        patch_size=sd["patch_embed.proj.weight"].shape[-1],
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
    one with the checkpoint's width and patch size, else one of its width, with a warning) supplies the defaults,
    among them the width (a ``model_name`` of another width does not fit) and the head counts; depths, decoder
    width, patch size, MLP ratio and channels come from the tensors, and the architecture keys of a mae_det
    checkpoint's ``meta`` (widths, depths, heads, patch size) override both. The input normalization is the
    ``meta``'s ``pixel_mean`` / ``pixel_std`` (pretraining's DATA.MEAN / DATA.STD), else ImageNet's (official
    checkpoints).

    Args:
        path: a mae_det pretraining checkpoint, an official full checkpoint or a bare full state dict.
        model_name: a :data:`MAE_FACTORIES` name.
        norm_pix_loss: overrides what the checkpoint says (official full files without ``args`` say nothing;
            the released ``mae_visualize_*`` models use pixel targets, the default).

    Raises:
        CheckpointError: unreadable file, unknown model, encoder-only weights, mismatched tensors or
            normalization statistics, naming the file.
        VisualizationError: a model with neither 1 nor 3 channels and no statistics in its meta.
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
    mean, std = _norm_stats(model.in_chans, meta, path)
    return LoadedMAE(model.eval(), name, img_size, npl, mean, std)


def find_images(inputs: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None) -> list[Path]:
    """Image files given directly or found recursively in folders, in sorted order per folder.

    Folders are listed as every mae_det tool lists them (:func:`~mae_det.data.pretrain.list_images`: the same
    suffixes, hidden files and folders skipped); files named directly are taken as they are.

    Args:
        inputs: files and folders.
        exclude: a folder left out of the search (the output folder: the grids of one run inside a searched
            folder must not become inputs of the next).

    Raises:
        VisualizationError: an input does not exist, or a folder to search is ``exclude`` itself.
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            if item.resolve() == skip:  # leaving it out would leave nothing; reading it mixes images and grids
                raise VisualizationError(f"--input {item} is the --output folder: its images and their grids "
                                         "would share it (a.png's grid is a.png); choose another --output")
            found += [p for p in list_images(item) if skip is None or not p.resolve().is_relative_to(skip)]
        elif item.is_file():
            found.append(item)
        else:
            raise VisualizationError(f"--input {item}: no such file or folder")
    return found


def _norm_stats(in_chans: int, meta: dict | None = None, path: Path | None = None) -> tuple[tuple, tuple]:
    """The (mean, std) a model's inputs were normalized with: its checkpoint meta's, else ImageNet's.

    Official checkpoints record no statistics; they were trained on ImageNet's (the channel average for a
    1-channel model, which sees the grayscale image).

    Raises:
        CheckpointError: the meta's statistics do not have ``in_chans`` values each or a std is not positive.
        VisualizationError: neither 1 nor 3 channels.
    """
    meta = meta or {}
    if "pixel_mean" in meta and "pixel_std" in meta:
        mean, std = tuple(map(float, meta["pixel_mean"])), tuple(map(float, meta["pixel_std"]))
        if len(mean) != in_chans or len(std) != in_chans or min(std) <= 0:
            raise CheckpointError(f"{path}: meta pixel_mean {list(mean)} / pixel_std {list(std)} do not fit a "
                                  f"{in_chans}-channel model (one value per channel, std > 0)")
        return mean, std
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_chans == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    raise VisualizationError(f"visualization handles 1- or 3-channel models, this one has {in_chans} channels")


def load_image(path: Path, size: tuple[int, int], in_chans: int) -> torch.Tensor:
    """(C, H, W) in [0, 1]: decoded as training decodes (16-bit scaled, EXIF orientation applied, grayscale for a
    1-channel model), resized so it covers ``size`` (bicubic), then center-cropped.

    Raises:
        ImageLoadError: the file cannot be decoded (one line naming it).
    """
    img = decode_image(path)
    if in_chans == 1:
        img = img.convert("L")  # as pretraining's augmentation does for a 1-channel model
    h, w = size
    scale = max(h / img.height, w / img.width)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    img = img.crop((left, top, left + w, top + h))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[..., None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@torch.no_grad()
def reconstruct(
    model: MaskedAutoencoderViT,
    image: torch.Tensor,
    mask_ratio: float,
    noise: torch.Tensor,
    pixel_mean: Sequence[float] | None = None,
    pixel_std: Sequence[float] | None = None,
) -> dict:
    """Runs the MAE on one [0, 1] image (C, H, W) and returns the four [0, 1] panels, the loss and the number of
    patches masked.

    The image is normalized with ``pixel_mean`` / ``pixel_std`` (:attr:`LoadedMAE.pixel_mean`; default
    ImageNet's). The prediction of a norm-pix model is de-normalized with each target patch's mean and unbiased
    variance (+1e-6), the inverse of the loss's target normalization.
    """
    if pixel_mean is None or pixel_std is None:
        pixel_mean, pixel_std = _norm_stats(image.shape[0])
    mean, std = (torch.tensor(v, dtype=image.dtype).view(-1, 1, 1) for v in (pixel_mean, pixel_std))
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
        "masked_patches": int(mask.sum()),
    }


def _zoom(img_size: tuple[int, int]) -> int:
    """The smallest integer factor that gives the shorter side at least ``MIN_PANEL`` pixels (at least 1)."""
    return max(1, -(-MIN_PANEL // min(img_size)))


def grid_image_size(img_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) in pixels of the PNG written for a model input of ``img_size`` = (h, w)."""
    zoom = _zoom(img_size)
    h, w = img_size[0] * zoom, img_size[1] * zoom
    return 4 * w + 5 * PAD, HEADER + h + PAD


def save_grid(panels: dict, path: Path, title: str) -> None:
    """Writes the four panels side by side under ``title`` (also stored as the PNG's "Title" text)."""
    first = panels[PANEL_TITLES[0]]
    width, height = grid_image_size(tuple(first.shape[1:]))
    zoom = _zoom(tuple(first.shape[1:]))
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
    Folders are searched without ``output_dir`` (see :func:`find_images`), and nothing is written unless every
    grid's path differs from every input's.

    Raises:
        CheckpointError: see :func:`load_mae`.
        ConfigError: ``output_dir`` is a file or lies below one (before the model is loaded).
        VisualizationError: a bad ``mask_ratio`` (also one that keeps no patch of the input) or ``img_size``, a
            missing input, no image found, or a grid that would overwrite an input image; nothing is written then.
    """
    if not 0.0 <= mask_ratio < 1.0:  # 1.0 leaves no visible patch for the encoder
        raise VisualizationError(f"--mask-ratio: expected a fraction in [0, 1), got {mask_ratio}")
    if img_size is not None and img_size < 1:
        raise VisualizationError(f"--img-size: expected a positive side, got {img_size}")
    out_dir = check_output_dir(output_dir, ())
    loaded = load_mae(checkpoint, model_name, norm_pix_loss)
    model = loaded.model
    size = (img_size, img_size) if img_size else loaded.img_size
    if size[0] % model.patch_size or size[1] % model.patch_size:
        what = f"--img-size {img_size}" if img_size else f"{checkpoint}: img_size {size}"
        raise VisualizationError(f"{what}: expected a multiple of the patch size {model.patch_size}")
    num_patches = (size[0] // model.patch_size) * (size[1] // model.patch_size)
    if int(num_patches * (1 - mask_ratio)) < 1:  # counted as the model keeps them
        raise VisualizationError(f"--mask-ratio: {mask_ratio} keeps none of the {num_patches} patches of a "
                                 f"{size[0]}x{size[1]} input, so the encoder would see nothing; expected a ratio "
                                 "that keeps at least one patch")
    inputs = list(inputs)
    paths = find_images(inputs, exclude=out_dir)
    if not paths:
        raise VisualizationError(f"--input: no images found in {' '.join(map(str, inputs))}")
    names = []
    used_names: set[str] = set()
    for path in paths:
        name = path.stem
        while name in used_names:
            name += "_"
        used_names.add(name)
        names.append(name)
    sources = {p.resolve(): p for p in paths}
    for name in names:  # all checked before the first write: a refused run must not have replaced any image
        grid = out_dir / f"{name}.png"
        if grid.resolve() in sources:
            raise VisualizationError(f"--output {out_dir}: the grid {grid} would overwrite the input image "
                                     f"{sources[grid.resolve()]}; choose another --output")
    generator = torch.Generator().manual_seed(seed)
    target_note = ("norm-pix model: prediction de-normalized with each target patch's own mean/std"
                   if loaded.norm_pix_loss else "pixel targets")
    written: list[Path] = []
    skipped = 0
    for path, name in zip(paths, names):
        noise = torch.rand(1, num_patches, generator=generator)  # drawn even for skipped files: stable masks
        try:
            image = load_image(path, size, model.in_chans)
        except ImageLoadError as e:
            skipped += 1
            logger.warning("skipping unreadable image %s", e)
            continue
        panels = reconstruct(model, image, mask_ratio, noise, loaded.pixel_mean, loaded.pixel_std)
        title = (f"{path.name} | {loaded.name} | mask {mask_ratio:.0%} ({panels['masked_patches']}/{num_patches} "
                 f"patches) | loss {panels['loss']:.4f} | {target_note}")
        out = out_dir / f"{name}.png"
        save_grid(panels, out, title)
        written.append(out)
    if skipped:
        logger.warning("skipped %d of %d images (unreadable)", skipped, len(paths))
    return written
