"""Robust image decoding shared by every mae_det tool.

:func:`load_image` turns any file PIL can read into an 8-bit RGB image, or raises :class:`ImageLoadError` with a
one-line message that starts with the path. Conversions:

- grayscale (``L``, ``1``), palette (``P``), CMYK, YCbCr -> RGB;
- alpha (``RGBA``, ``LA``, ``PA``, palette transparency) is composited on black: fully transparent pixels become
  black instead of whatever colour the file stores under them;
- 16-bit grayscale (``I;16*``, and ``I`` with values in [0, 65535]) is scaled by 255/65535 with rounding, so the
  whole 16-bit range maps onto the whole 8-bit range (clipping would saturate almost every pixel);
  32-bit ``I``/``F`` data outside those ranges is min-max scaled; 16-bit RGB(A) PNGs are already reduced to
  their high bytes by PIL; in float data the finite values set the range, NaN pixels become black, and a file
  without a finite value is an :class:`ImageLoadError`;
- EXIF orientation is applied, as Detectron2's ``read_image`` applies it: when PIL cannot rewrite a damaged EXIF
  block after turning the image, the orientation value read from it still turns the pixels; a block whose
  orientation cannot be read leaves them as stored rather than rejecting them;
- multi-frame files (GIF, TIFF) give their first frame.

Memory is bounded by ``max_pixels`` (width x height of the *declared* size, checked before any pixel is
decoded): a larger JPEG is decoded directly at 1/2, 1/4 or 1/8 scale through libjpeg's DCT scaling (``draft``),
which never materializes the full-size image; any other format larger than ``max_pixels``, or a JPEG still too
large at 1/8, is an :class:`ImageLoadError`. PIL's own decompression-bomb check is replaced by this one.

:func:`load_image_and_file_size` also gives the file's full size, oriented as the pixels are (the frame that
results computed on a downscaled decode are mapped back to). :func:`image_size` answers, from the header alone,
which size a reader that applies EXIF orientation (this module, Detectron2's ``read_image``) will see; detection
datasets check their json against it.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

# Suffixes (lower case) that every folder listing of the project takes for images: what PIL decodes.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".gif")
# 128 Mpixel: a 11585 x 11585 image, far beyond any training crop. Decoding one peaks at about 8 bytes a pixel
# (RGB; 20 with alpha, 28 for 16-bit grayscale, measured): 1 to 3.5 GiB in one process (or loader worker).
DEFAULT_MAX_PIXELS = 128 * 1024 * 1024

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # transpose, rotate 270, transverse, rotate 90: width and height swap
_ORIENTATION_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_BOMB_CHECK_LOCK = threading.Lock()
logger = logging.getLogger(__name__)


class ImageLoadError(ValueError):
    """An image file cannot be decoded; the message is one line that starts with the path."""


def _open_unchecked(path: Path) -> Image.Image:
    """``Image.open`` without PIL's global decompression-bomb check (ours, on ``max_pixels``, runs instead).

    Only the header is read here, so lifting PIL's limit for the duration of the call costs no memory.
    """
    with _BOMB_CHECK_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _draft_scale(size: tuple[int, int], max_pixels: int) -> int | None:
    """Smallest JPEG DCT scale (1, 2, 4, 8) that brings the decoded size within ``max_pixels``."""
    w, h = size
    for k in (1, 2, 4, 8):
        if math.ceil(w / k) * math.ceil(h / k) <= max_pixels:
            return k
    return None


def _scale_to_uint8(a: np.ndarray, mode: str, path: Path) -> np.ndarray:
    """32-bit or 16-bit grayscale -> uint8 (see the module docstring). Float (``F``) data may hold NaN (no data) and
    infinities: the finite values set the range, NaN pixels become 0 and infinities the ends of the range.

    Raises:
        ImageLoadError: no pixel has a finite value.
    """
    a = a.astype(np.float64)
    finite = np.isfinite(a) if mode == "F" else None
    if finite is None or finite.all():
        return _scale_range(a, mode)
    if not finite.any():
        raise ImageLoadError(f"{path}: no finite pixel values (all NaN or infinite)")
    lo, hi = a[finite].min(), a[finite].max()
    out = _scale_range(np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo), mode)
    out[np.isnan(a)] = 0
    return out


def _scale_range(a: np.ndarray, mode: str) -> np.ndarray:
    """Finite float64 grayscale -> uint8: 16-bit ranges by 255/65535, [0, 1] floats by 255, anything else min-max."""
    if mode.startswith("I;16") or (mode == "I" and a.min() >= 0 and a.max() <= 65535):
        return np.rint(a * (255.0 / 65535.0)).astype(np.uint8)
    if mode == "F" and a.min() >= 0.0 and a.max() <= 1.0:
        return np.rint(a * 255.0).astype(np.uint8)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8: each colour times alpha / 255, rounded to nearest.

    In integers, one channel at a time: ``(c * a + 127) // 255`` is exactly ``round(c * a / 255)`` (a quotient by
    255 is never halfway) in 2 bytes a pixel of temporaries, where float32 took 28.
    """
    alpha = rgba[..., 3]
    rgb = np.empty(rgba.shape[:2] + (3,), np.uint8)
    for k in range(3):
        c = rgba[..., k].astype(np.uint16)  # 255 * 255 + 127 fits
        c *= alpha
        c += 127
        c //= 255
        rgb[..., k] = c
    return rgb


def _to_rgb(im: Image.Image, path: Path) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        return Image.fromarray(composite_on_black(np.asarray(im.convert("RGBA"))), "RGB")
    if mode.startswith("I") or mode == "F":
        gray = _scale_to_uint8(np.asarray(im), mode, path)
        return Image.fromarray(gray, "L").convert("RGB")
    return im.convert("RGB")


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes an image file to an 8-bit RGB ``PIL.Image`` (see the module docstring for the conversions).

    Args:
        path: the image file.
        max_pixels: largest number of pixels decoded at once; larger JPEGs are decoded downscaled, larger
            files of other formats are rejected.

    Raises:
        ImageLoadError: missing, empty, unreadable, not an image, truncated, too large, or undecodable.
    """
    return load_image_and_file_size(path, max_pixels)[0]


def load_image_and_file_size(
    path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`load_image`, plus the (width, height) of the file at full resolution, oriented as the image is.

    The size is the decoded image's own unless the file was decoded downscaled (a JPEG beyond ``max_pixels``);
    it comes from the same open that decoded the pixels, so PIL's decompression-bomb limit does not apply to it
    and an EXIF block anywhere in the file (a PNG's may follow the pixel data) orients it as it orients them,
    which :func:`image_size` cannot promise.

    Raises:
        ImageLoadError: as :func:`load_image`.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageLoadError(f"{path}: cannot access file ({e.strerror or e})") from e
    if path.is_dir():
        raise ImageLoadError(f"{path}: is a directory, not an image file")
    if size == 0:
        raise ImageLoadError(f"{path}: empty file (0 bytes)")
    try:
        im = _open_unchecked(path)
    except PermissionError as e:
        raise ImageLoadError(f"{path}: permission denied") from e
    except Image.UnidentifiedImageError as e:
        raise ImageLoadError(f"{path}: not a recognized image format") from e
    except Exception as e:
        raise ImageLoadError(f"{path}: cannot read image header ({type(e).__name__}: {_first_line(e)})") from e
    try:
        with im:
            w, h = im.size
            downscaled = w * h > max_pixels
            if downscaled:
                k = _draft_scale(im.size, max_pixels) if im.format == "JPEG" else None
                if k is None:
                    raise ImageLoadError(
                        f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                        f"(only JPEGs can be decoded downscaled, at most 1/8); raise the limit or downscale the file"
                    )
                im.draft(im.mode, (max(1, w // k), max(1, h // k)))
            im.seek(0)
            im.load()
            # The value exif_transpose reads (cached by PIL, so both see the same block); read first because the
            # transposed copy no longer holds it.
            orientation = _orientation(im.getexif)
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:
                # It fails rewriting a damaged EXIF block for the turned copy; Detectron2's read_image and
                # image_size still turn the image by the value read, so the pixels must be turned too.
                if orientation in _ORIENTATION_TRANSPOSES:
                    im = im.transpose(_ORIENTATION_TRANSPOSES[orientation])
            rgb = _to_rgb(im, path)
            rgb.load()
            if not downscaled:
                return rgb, rgb.size
            return rgb, (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)
    except ImageLoadError:
        raise
    except Exception as e:
        raise ImageLoadError(f"{path}: cannot decode image ({type(e).__name__}: {_first_line(e)})") from e


class DecodedImageCache:
    """Images decoded once and kept in this process's memory, up to ``max_bytes`` of pixels.

    On small images the decoding is most of a sample's loading (a 64 px PNG: 0.3 of 0.5 ms; the demo's pretraining
    batch of 16 loads in 3.1 instead of 7.8 ms from the cache); the pixels, and so every number a run gives, are the
    same. First come, first kept: once the budget is full, further images are decoded on every read as without a
    cache (epochs draw the images in random order, in which an evicting cache smaller than the dataset would miss
    about as often as no cache). Unreadable files are not kept: they raise :class:`ImageLoadError` on every read and
    are skipped and counted as before. The cache lives in the process that decodes (the main process with
    ``NUM_WORKERS 0``; each persistent loader worker keeps its own, so the memory is per process). Callers must
    not change the returned image in place (PIL's transforms return new images).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes: expected > 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.full = False  # an image did not fit (logged once)
        self._images: dict[tuple[str, int], Image.Image] = {}

    def __len__(self) -> int:
        return len(self._images)

    def load(self, path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """:func:`load_image` of ``path``, from memory after its first read while the budget lasts."""
        key = (os.fspath(path), max_pixels)
        img = self._images.get(key)
        if img is not None:
            return img
        img = load_image(path, max_pixels)
        size = img.width * img.height * len(img.getbands())
        if self.bytes + size <= self.max_bytes:
            self._images[key] = img
            self.bytes += size
        elif not self.full:
            self.full = True
            logger.info(
                "decoded-image cache full (%d images, %.1f MiB of %.1f): further images are decoded on every read",
                len(self._images), self.bytes / 2**20, self.max_bytes / 2**20)
        return img


def decoded_image_cache(megabytes: float) -> DecodedImageCache | None:
    """The cache of a ``DATA.CACHE_DECODED_MB`` setting: None for 0 (off)."""
    return DecodedImageCache(int(megabytes * 2**20)) if megabytes > 0 else None


def _orientation(getexif: Callable[[], Image.Exif]) -> int | None:
    """The EXIF orientation value that ``getexif`` gives, or None when the block cannot be read or holds no single
    integer there (a damaged block may hold a tuple or a string)."""
    try:
        value = getexif().get(_EXIF_ORIENTATION)
    except Exception:
        return None
    return value if isinstance(value, int) else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no details"


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file as Detectron2's ``read_image`` returns it: EXIF orientation applied.

    Only the header (and the EXIF block) is read; :func:`load_image_and_file_size` decodes the pixels as well. Like
    ``read_image``, PIL's own decompression-bomb limit applies and an unreadable EXIF block means no rotation. One
    difference: a PNG whose EXIF chunk comes after its pixel data reads as unrotated (finding that chunk means
    decoding the image).

    Raises:
        ImageLoadError: missing, empty, not an image, unreadable header.
    """
    try:
        if os.path.getsize(path) == 0:
            raise ImageLoadError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as im:
            w, h = im.size
            # The base method reads only what the header gave; PNG's override would decode the image to look for
            # an EXIF chunk after the pixels.
            orientation = _orientation(lambda: Image.Image.getexif(im))
    except ImageLoadError:
        raise
    except FileNotFoundError as e:
        raise ImageLoadError(f"{path}: file not found") from e
    except Image.UnidentifiedImageError as e:
        raise ImageLoadError(f"{path}: not a recognized image format") from e
    except Exception as e:
        raise ImageLoadError(f"{path}: cannot read image header ({type(e).__name__}: {_first_line(e)})") from e
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)
