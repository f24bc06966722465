"""The GPU data path of pretraining (``DATA.DECODE_DEVICE cuda``): JPEG bytes from the workers, nvjpeg decoding
and the MAE augmentation on GPU tensors in the main process.

Split of the work:

- loader workers (CPU): :class:`EncodedPretrainDataset` reads a file's bytes and its header (size, EXIF
  orientation) and draws the sample's crop, flip (and quarter turns and channel order, when enabled) with the
  same :meth:`PretrainTransform.sample` and the same (seed, epoch, index) generator as the CPU path, then the mask
  noise, so both paths train on the same crops, flips and masks. Files the GPU decoder cannot take - not a JPEG,
  CMYK/YCCK JPEGs, anything larger than ``max_pixels`` (the CPU path decodes those downscaled) - are decoded and
  augmented on the worker exactly as on the CPU path; unreadable files are skipped and counted as there.
- main process (GPU): :class:`GpuAugment` decodes a batch's JPEGs in one call of :func:`decode_jpegs`, applies the
  orientation, crops, resizes (bicubic with antialiasing: PIL's filter, which the CPU path uses), flips, turns,
  reorders the channels and normalizes. CUDA cannot run in forked loader workers, hence the main process;
  :class:`CudaPrefetcher` does it on a side stream for the next batch while the model trains on the current one.

With ``DATA.DECODE_DEVICE cpu`` on a GPU the workers decode and augment as on a CPU but stop short of the float
conversion: they pass uint8 images, and :class:`DeviceNormalize` normalizes them on the side stream.

A file that passes the header check but fails on the GPU, or decodes there to another size than its header's, is
decoded on the CPU in the main process (counted in the batch's ``"cpu_decoded"``); one that fails there too becomes
a zero image reported in ``"bad"`` (counted like any unreadable image) - unlike the CPU path, which can still swap
in the next readable file.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import _EXIF_ORIENTATION, ImageLoadError, _open_unchecked, load_image
from .pretrain import CropFlip, PretrainDataset, PretrainTransform, collate_pretrain, normalize_pixels, turn_and_shuffle

try:  # the maintained decoder; torchvision's is deprecated since 0.29
    from torchcodec.decoders import decode_jpeg as _torchcodec_decode_jpeg
except ImportError:  # not installed, or a release without JPEG decoding
    _torchcodec_decode_jpeg = None
except Exception as e:  # installed, but its native libraries do not load (no FFmpeg, built for another torch)
    _torchcodec_decode_jpeg = None
    logging.getLogger(__name__).warning("TorchCodec does not load (%s: %s); DATA.DECODE_DEVICE cuda decodes with "
                                        "torchvision", type(e).__name__, (str(e).strip().splitlines() or [""])[0])


class EncodedJpeg(NamedTuple):
    """A JPEG left for the GPU: its bytes, its size after the EXIF orientation, the orientation (1-8)."""

    data: torch.Tensor  # (nbytes,) uint8
    width: int
    height: int
    orientation: int
    path: str


def read_encoded(path: Path, max_pixels: int) -> EncodedJpeg | Image.Image:
    """The bytes and header of a JPEG the GPU decodes, or the decoded image (PIL) of any other file.

    Raises:
        ImageLoadError: as :func:`mae_det.data.images.load_image` for files it cannot read.
    """
    try:
        im = _open_unchecked(path)
    except Exception:
        return load_image(path, max_pixels)  # its own one-line error names what is wrong
    with im:
        w, h = im.size
        if im.format != "JPEG" or im.mode not in ("RGB", "L") or w * h > max_pixels:
            return load_image(path, max_pixels)
        try:
            orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
        except Exception:
            orientation = 1  # a broken EXIF block: the pixels are used as stored, as on the CPU path
    try:
        raw = bytearray(path.read_bytes())
    except OSError as e:
        raise ImageLoadError(f"{path}: cannot read file ({e.strerror or e})") from e
    # TorchCodec's decoder applies the EXIF orientation (torchvision's, as called, does not), and the first APP1
    # segment it parses, even one PIL finds corrupt: with the segments hidden, every decoder returns the pixels as
    # stored and apply_orientation turns them once, as PIL reads the tag.
    hide_exif(raw)
    if orientation not in range(1, 9):
        orientation = 1
    if orientation >= 5:  # transposing orientations swap width and height
        w, h = h, w
    return EncodedJpeg(torch.frombuffer(raw, dtype=torch.uint8), w, h, orientation, str(path))


def hide_exif(jpeg: bytearray) -> int:
    """Turns every APP1 segment (EXIF, XMP) into an APP15 one in place, which decoders skip unread; returns how
    many it turned. The orientation was read with PIL before, as the CPU path reads it."""
    pos, hidden = 2, 0  # after the start-of-image marker
    while pos + 4 <= len(jpeg) and jpeg[pos] == 0xFF:
        if jpeg[pos + 1] == 0xFF:  # a fill byte: any number of them may precede a marker
            pos += 1
            continue
        if jpeg[pos + 1] in (0xD9, 0xDA):  # headers end at a scan
            break
        if jpeg[pos + 1] == 0xE1:
            jpeg[pos + 1] = 0xEF
            hidden += 1
        pos += 2 + int.from_bytes(jpeg[pos + 2:pos + 4], "big")
    return hidden


class EncodedPretrainDataset(PretrainDataset):
    """:class:`PretrainDataset` for the GPU path: samples carry ``"jpeg"`` bytes, ``"orientation"`` and ``"crop"``
    (top, left, height, width, flip) instead of an image, or ``"image"`` for a file decoded on the worker."""

    def read(self, index: int) -> Any:
        item = read_encoded(self.source.paths[index], self.max_pixels)
        return (item, index) if isinstance(item, EncodedJpeg) else item

    def augment(self, item: Any, g: torch.Generator) -> dict:
        if not isinstance(item, tuple):
            return super().augment(item, g) | {"jpeg": None}
        jpeg, index = item
        crop = self.transform.sample(jpeg.width, jpeg.height, g)
        return {"image": None, "jpeg": jpeg.data, "orientation": jpeg.orientation, "crop": tuple(crop),
                "size": (jpeg.height, jpeg.width), "file": (index, jpeg.path)}


def collate_encoded(samples: list[dict]) -> dict:
    """Like :func:`collate_pretrain`, with ``"image"`` = ``{position: (C, S, S)}`` of the worker-decoded samples
    and per-sample lists ``"jpeg"`` (bytes or None), ``"orientation"``, ``"crop"``, ``"size"`` ((H, W) after the
    orientation, as the header gives it)."""
    decoded = {i: s["image"] for i, s in enumerate(samples) if s["jpeg"] is None}
    batch = collate_pretrain([dict(s, image=torch.zeros(0)) for s in samples])
    batch["image"] = decoded
    batch["jpeg"] = [s["jpeg"] for s in samples]
    batch["orientation"] = [s.get("orientation", 1) for s in samples]
    batch["crop"] = [s.get("crop") for s in samples]
    batch["size"] = [s.get("size") for s in samples]
    batch["file"] = [s.get("file") for s in samples]  # (dataset index, path) of the bytes
    return batch


# ---- decoding ----------------------------------------------------------------------------------------------
def _decode_batch(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if _torchcodec_decode_jpeg is not None:
        return list(_torchcodec_decode_jpeg(data, mode="RGB", device=device))
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision warns on every call that TorchCodec supersedes it; TorchCodec is used whenever installed.
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False))


def jpeg_decoder_name() -> str:
    """The decoder :func:`decode_jpegs` uses here: "torchcodec" or "torchvision" (the fallback)."""
    return "torchcodec" if _torchcodec_decode_jpeg is not None else "torchvision"


# Failures of the device, not of a file: retrying file by file would hide them behind CPU decoding
_DEVICE_ERRORS = tuple(e for e in (getattr(torch, "OutOfMemoryError", None), getattr(torch, "AcceleratorError", None))
                       if e is not None)


def decode_jpegs(data: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor | None]:
    """JPEG bytes (CPU uint8 tensors) -> (3, H, W) uint8 RGB tensors on ``device``, as stored (no EXIF rotation).

    One batched call (nvjpeg on CUDA); the batched call fails as a whole when one file is bad, so it is then
    retried file by file, and a file that still fails gives None. Out of memory and other errors of the device
    are raised, not taken for bad files.
    """
    device = torch.device(device)
    if not data:
        return []
    try:
        return _decode_batch(data, device)
    except _DEVICE_ERRORS:
        raise
    except (RuntimeError, ValueError):
        out: list[torch.Tensor | None] = []
        for d in data:
            try:
                out.append(_decode_batch([d], device)[0])
            except _DEVICE_ERRORS:
                raise
            except (RuntimeError, ValueError):
                out.append(None)
        return out


# ---- augmentation on tensors -------------------------------------------------------------------------------
def apply_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as stored -> as displayed: the EXIF orientation, as PIL's ``ImageOps.exif_transpose``."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(img, 1, (-2, -1))
    return img


def oriented_size(img: torch.Tensor, orientation: int) -> tuple[int, int]:
    """(H, W) of :func:`apply_orientation`'s result for a (C, H, W) image as stored."""
    h, w = img.shape[-2:]
    return (w, h) if orientation >= 5 else (h, w)


def resize_crop(img: torch.Tensor, orientation: int, crop: CropFlip | Sequence, size: int) -> torch.Tensor:
    """(3, H, W) uint8 as stored -> (3, size, size) float in [0, 255] (before rounding): the EXIF orientation, the
    crop, and the resize with antialiased bicubic, PIL's filter, which the CPU path uses. One float pass where PIL
    makes two 8-bit ones (rounded and clipped in between): equal within 1-2 levels on smooth images, further at
    single pixels of hard edges (README, section 5)."""
    p = CropFlip(*crop)
    x = apply_orientation(img, orientation)[:, p.top:p.top + p.height, p.left:p.left + p.width]
    return F.interpolate(x[None].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]


def finish_batch(x: torch.Tensor, crops: Sequence[CropFlip | Sequence],
                 mean_std: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(N, 3, S, S) outputs of :func:`resize_crop` -> the normalized images, in place where it can: PIL resizes to 8
    bits, so the values are rounded and clipped, then flipped, turned, reordered and normalized. One call per batch
    rather than per image: on a GPU each elementwise step is a kernel launch of the host thread that also drives the
    training step."""
    x = x.round_().clamp_(0, 255)
    crops = [CropFlip(*c) for c in crops]
    flips = [k for k, p in enumerate(crops) if p.flip]
    if flips:
        x[flips] = x[flips].flip(-1)
    for k, p in enumerate(crops):
        if p.quarter_turns or p.channels is not None:
            x[k] = turn_and_shuffle(x[k], p)
    return normalize_pixels(x, *mean_std)


class GpuAugment:
    """A collated encoded batch -> its ``(B, C, S, S)`` float images on ``device`` (see the module docstring).

    Also sets ``batch["cpu_decoded"]`` (the files decoded on the CPU: by the workers, or here after the device
    decoder refused them) and appends to ``batch["bad"]`` the files no decoder could read.
    """

    def __init__(self, transform: PretrainTransform, device: torch.device | str) -> None:
        self.transform, self.device = transform, torch.device(device)
        self.mean_std = transform.mean_std(self.device)  # made once (see PretrainTransform.mean_std)

    def __call__(self, batch: dict) -> torch.Tensor:
        t, n = self.transform, len(batch["jpeg"])
        out = torch.empty(n, len(t.mean), t.img_size, t.img_size, device=self.device)
        for i, img in batch["image"].items():
            out[i] = img.to(self.device, non_blocking=True)
        slots = [i for i, d in enumerate(batch["jpeg"]) if d is not None]
        batch["cpu_decoded"] = len(batch["image"])  # on the workers: not JPEGs, CMYK, oversized
        resized = []  # slots whose pixels are resized, not yet rounded and normalized
        for i, img in zip(slots, decode_jpegs([batch["jpeg"][i] for i in slots], self.device)):
            # Another size than the header's (a decoder that applied an EXIF orientation after all): the crop was
            # drawn for the header's, so the CPU decodes the file as stored.
            if img is None or oriented_size(img, batch["orientation"][i]) != tuple(batch["size"][i]):
                img = self._decode_on_cpu(batch, *batch["file"][i])
            if img is None:
                out[i] = 0.0
            else:
                out[i] = resize_crop(img, batch["orientation"][i], batch["crop"][i], t.img_size)
                resized.append(i)
        crops = [batch["crop"][i] for i in resized]
        if len(resized) == n:
            return finish_batch(out, crops, self.mean_std)
        if resized:
            out[resized] = finish_batch(out[resized], crops, self.mean_std)
        return out

    def _decode_on_cpu(self, batch: dict, index: int, path: str) -> torch.Tensor | None:
        """The file as stored (the orientation is applied later), or None after reporting it in ``bad``."""
        try:
            with _open_unchecked(path) as im:
                im.load()
                rgb = im.convert("RGB")
        except Exception as e:
            batch["bad"].append((index, f"{path}: cannot decode image ({type(e).__name__}: {e})"))
            return None
        batch["cpu_decoded"] += 1
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).to(self.device)


class DeviceNormalize:
    """A collated batch of uint8 images (``PretrainDataset(normalize=False)``) -> its ``(B, C, S, S)`` float images on
    ``device``, normalized there: the CPU-decoding path on a GPU. The values are those of the workers'
    normalization bit for bit (the same float operations in the same order)."""

    def __init__(self, transform: PretrainTransform, device: torch.device | str) -> None:
        self.transform, self.device = transform, torch.device(device)
        self.mean_std = transform.mean_std(self.device)  # made once (see PretrainTransform.mean_std)

    def __call__(self, batch: dict) -> torch.Tensor:
        return self.transform.normalize(batch["image"].to(self.device, non_blocking=True), self.mean_std)


def workers_normalize(device: torch.device | str, gpu_decode: bool) -> bool:
    """Whether the CPU loader workers normalize the images themselves: not on a GPU, where their uint8 images are
    normalized by :class:`DeviceNormalize` (and not on the nvjpeg path, whose worker-decoded fallbacks are floats)."""
    return gpu_decode or torch.device(device).type != "cuda"


def device_batches(loader: Iterable[dict], transform: PretrainTransform, device: torch.device | str,
                   gpu_decode: bool) -> Iterable[dict]:
    """``loader`` as the pretraining loop iterates it: on a GPU through a :class:`CudaPrefetcher` that decodes and
    augments (``gpu_decode``) or normalizes the batch one step ahead; elsewhere as it is."""
    if torch.device(device).type != "cuda":
        return loader
    return CudaPrefetcher(loader, (GpuAugment if gpu_decode else DeviceNormalize)(transform, device))


class CudaPrefetcher:
    """Iterates the batches of ``loader`` with their images made by ``augment`` (:class:`GpuAugment`: decoded and
    augmented; :class:`DeviceNormalize`: normalized), one batch ahead, on a side CUDA stream (on a CPU device:
    inline, which the tests use).
    """

    def __init__(self, loader: Iterable[dict], augment: GpuAugment | DeviceNormalize) -> None:
        self.loader, self.augment = loader, augment

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict]:
        device = self.augment.device
        side = torch.cuda.Stream(device) if device.type == "cuda" else None

        def prepare(batch: dict) -> dict:
            with torch.cuda.stream(side) if side is not None else nullcontext():
                batch["image"] = self.augment(batch)
                if side is not None:
                    batch["ready"] = torch.cuda.Event()
                    batch["ready"].record(side)
            return batch

        pending = None
        for batch in self.loader:
            ready = prepare(batch)
            if pending is not None:
                yield self._handover(pending)
            pending = ready
        if pending is not None:
            yield self._handover(pending)

    @staticmethod
    def _handover(batch: dict) -> dict:
        event = batch.pop("ready", None)
        if event is not None:
            current = torch.cuda.current_stream(batch["image"].device)
            current.wait_event(event)
            batch["image"].record_stream(current)  # allocated on the side stream, used on this one
        return batch
