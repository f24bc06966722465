"""load_image on hostile files: each either decodes to 8-bit RGB or raises a one-line ImageLoadError."""
import io
import logging
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mae_det.data.images import (
    DEFAULT_MAX_PIXELS, DecodedImageCache, ImageLoadError, decoded_image_cache, image_size, load_image,
    load_image_and_file_size,
)


def _expect_error(path, fragment: str, **kw) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_image(path, **kw)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg and fragment in msg, msg
    return msg


def _png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def _with_declared_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its IHDR claiming another size (valid CRC), e.g. a decompression bomb."""
    ihdr = png[12:16] + struct.pack(">II", width, height) + png[24:29]
    return png[:8] + png[8:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def test_plain_rgb_roundtrip(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    p = tmp_path / "a.png"
    Image.fromarray(arr).save(p)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (9, 7)
    np.testing.assert_array_equal(np.asarray(im), arr)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    _expect_error(p, "empty file (0 bytes)")


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _expect_error(p, "truncated")


def test_text_file_with_image_extension(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a picture\n")
    _expect_error(p, "not a recognized image format")


def test_missing_file_and_directory(tmp_path):
    _expect_error(tmp_path / "nope.png", "cannot access file")
    d = tmp_path / "folder.png"
    d.mkdir()
    _expect_error(d, "is a directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_permissions(tmp_path):
    p = tmp_path / "secret.png"
    p.write_bytes(_png_bytes(np.zeros((4, 4, 3), np.uint8)))
    p.chmod(0)
    try:
        _expect_error(p, "permission denied")
    finally:
        p.chmod(0o644)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(values).save(p)
    assert Image.open(p).mode.startswith("I")
    out = np.asarray(load_image(p))
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_grayscale_becomes_three_equal_channels(tmp_path):
    p = tmp_path / "gray.png"
    Image.fromarray(np.array([[0, 100, 255]], np.uint8), "L").save(p)
    out = np.asarray(load_image(p))
    np.testing.assert_array_equal(out[0], [[0, 0, 0], [100, 100, 100], [255, 255, 255]])


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [255, 255, 255, 0]]], np.uint8)
    p = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(p)
    out = np.asarray(load_image(p)).astype(int)
    np.testing.assert_array_equal(out[0, 0], [200, 100, 50])
    np.testing.assert_array_equal(out[0, 1], np.rint(np.array([200, 100, 50]) * 128 / 255))
    np.testing.assert_array_equal(out[0, 2], [0, 0, 0])


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    p = tmp_path / "pal.png"
    im.save(p, transparency=1)
    out = np.asarray(load_image(p))
    np.testing.assert_array_equal(out[0], [[255, 0, 0], [0, 0, 0]])


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)  # pure red in CMYK
    im = load_image(p)
    r, g, b = np.asarray(im).reshape(-1, 3).mean(0)
    assert im.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)  # left half red
    arr[:, 10:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    p = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(p, exif=exif, quality=95)
    im = load_image(p)
    assert im.size == (10, 20)
    out = np.asarray(im).astype(int)
    assert out[2, 5, 0] > 200 and out[2, 5, 2] < 50  # top is the former left (red)
    assert out[17, 5, 2] > 200 and out[17, 5, 0] < 50  # bottom is the former right (blue)


def test_tiny_image(tmp_path):
    p = tmp_path / "tiny.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(p)
    im = load_image(p)
    assert im.size == (8, 8) and im.getpixel((7, 7)) == (1, 2, 3)


def test_multiframe_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 255, 0)]]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert load_image(p).getpixel((0, 0)) == (255, 0, 0)


def test_large_jpeg_is_decoded_downscaled(tmp_path):
    p = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1000), (0, 128, 255)).save(p)
    assert load_image(p).size == (2000, 1000)
    im = load_image(p, max_pixels=600_000)  # DCT scaling 1/2 fits (1000 x 500)
    assert im.size == (1000, 500)
    assert load_image(p, max_pixels=40_000).size == (250, 125)  # 1/8
    _expect_error(p, "exceeds the limit", max_pixels=10_000)  # even 1/8 is too large


def _exif_after_pixels_png(shown: np.ndarray) -> bytes:
    """A PNG storing ``shown`` rotated, with an eXIf chunk (orientation 6) after its pixel data, where a header
    read does not find it."""
    stored = np.ascontiguousarray(np.rot90(shown))  # orientation 6 turns it back
    png = _png_bytes(stored)
    exif = Image.Exif()
    exif[0x0112] = 6
    body = exif.tobytes().removeprefix(b"Exif\x00\x00")
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    iend = png.rindex(b"IEND") - 4
    return png[:iend] + chunk + png[iend:]


def _gray_jpeg_of_side(side: int) -> bytes:
    """A valid baseline grayscale JPEG of ``side`` x ``side`` mid-gray pixels (``side`` a multiple of 16),
    written without ever holding its pixels: every 8x8 block of a flat 128 image encodes to the same 6 bits, so a
    small image's entropy-coded data (4 blocks = 3 bytes) repeats."""
    buf = io.BytesIO()
    Image.new("L", (32, 8), 128).save(buf, "JPEG", quality=75)
    template = buf.getvalue()
    sos = template.index(b"\xff\xda")
    header_end = sos + 2 + int.from_bytes(template[sos + 2 : sos + 4], "big")
    scan = template[header_end:-2]
    assert scan == bytes.fromhex("28a28a"), scan.hex()  # 4 blocks of (DC diff 0, end of block)
    sof = template.index(b"\xff\xc0")
    header = bytearray(template[:header_end])
    header[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    return bytes(header) + scan * ((side // 8) ** 2 // 4) + b"\xff\xd9"


def test_file_size_is_the_decoded_size_unless_decoded_downscaled(tmp_path):
    p = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1000), (0, 128, 255)).save(p)
    im, size = load_image_and_file_size(p)
    assert im.size == size == (2000, 1000)
    im, size = load_image_and_file_size(p, max_pixels=40_000)
    assert im.size == (250, 125) and size == (2000, 1000)
    assert np.array_equal(np.asarray(im), np.asarray(load_image(p, max_pixels=40_000)))
    # Stored 120 wide, 200 high with orientation 6: shown (and sized) 200 x 120, decoded at 1/2.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (120, 200), (9, 9, 9)).save(tmp_path / "rot.jpg", exif=exif)
    im, size = load_image_and_file_size(tmp_path / "rot.jpg", max_pixels=200 * 120 // 2)
    assert im.size == (100, 60) and size == (200, 120)


def test_file_size_follows_an_exif_block_after_the_pixels(tmp_path):
    shown = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    p = tmp_path / "late_exif.png"
    p.write_bytes(_exif_after_pixels_png(shown))
    im, size = load_image_and_file_size(p)
    assert np.array_equal(np.asarray(im), shown) and size == (64, 40)
    assert image_size(p) == (40, 64)  # the header alone misses it (what predict_to_dir used to rescale by)


def test_file_size_of_a_jpeg_beyond_pils_decompression_bomb_limit(tmp_path):
    side = 13440  # 180.6 Mpixel: above PIL's 178.9 M limit, which load_image lifts and image_size keeps
    assert side * side > Image.MAX_IMAGE_PIXELS
    p = tmp_path / "huge.jpg"
    p.write_bytes(_gray_jpeg_of_side(side))
    with pytest.raises(ImageLoadError, match="DecompressionBombError"):
        image_size(p)
    im, size = load_image_and_file_size(p, max_pixels=(side // 8) ** 2)
    assert im.size == (side // 8, side // 8) and size == (side, side)
    assert np.asarray(im).min() == np.asarray(im).max() == 128


def test_bomb_png_is_refused_before_decoding(tmp_path):
    png = _png_bytes(np.zeros((2, 2, 3), np.uint8))
    p = tmp_path / "bomb.png"
    p.write_bytes(_with_declared_size(png, 20000, 20000))
    msg = _expect_error(p, "exceeds the limit")
    assert "20000x20000" in msg and str(DEFAULT_MAX_PIXELS) in msg


def test_non_jpeg_over_limit(tmp_path):
    p = tmp_path / "wide.png"
    Image.new("RGB", (300, 200)).save(p)
    _expect_error(p, "300x200 = 60000 pixels exceeds", max_pixels=50_000)


_SEED_PNG = _png_bytes(np.random.default_rng(2).integers(0, 256, (6, 5, 3), dtype=np.uint8))
_jpeg = io.BytesIO()
Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(_jpeg, "JPEG")
_SEED_JPEG = _jpeg.getvalue()


@st.composite
def _hostile_bytes(draw):
    kind = draw(st.sampled_from(["random", "png", "jpeg"]))
    if kind == "random":
        return draw(st.binary(min_size=0, max_size=512))
    data = bytearray(_SEED_PNG if kind == "png" else _SEED_JPEG)
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    cut = draw(st.integers(1, len(data)))
    return bytes(data[:cut])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=_hostile_bytes(), ext=st.sampled_from([".png", ".jpg", ".gif"]))
def test_fuzz_decoding_never_raises_anything_else(tmp_path, blob, ext):
    p = tmp_path / f"fuzz{ext}"
    p.write_bytes(blob)
    try:
        im = load_image(p, max_pixels=1_000_000)
    except ImageLoadError as e:
        assert str(e).startswith(str(p)) and "\n" not in str(e)
    else:
        assert im.mode == "RGB" and im.width * im.height >= 1
        np.asarray(im)  # the pixels are really there


def test_decoded_image_cache_returns_the_decoded_pixels_once_and_keeps_its_budget(tmp_path, caplog):
    arrays = [np.random.default_rng(i).integers(0, 256, (6, 5, 3), dtype=np.uint8) for i in range(3)]
    paths = []
    for i, arr in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    caplog.set_level(logging.INFO, logger="mae_det.data.images")
    cache = DecodedImageCache(max_bytes=2 * 6 * 5 * 3)  # room for two of the three images
    first = [cache.load(p) for p in paths]
    for im, arr in zip(first, arrays):
        np.testing.assert_array_equal(np.asarray(im), arr)
    assert len(cache) == 2 and cache.bytes == 180 and cache.full
    assert "decoded-image cache full (2 images" in caplog.text
    # Kept images come from memory even once their file changed; the one past the budget is read again.
    for p in paths:
        Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(p)
    again = [cache.load(p) for p in paths]
    assert again[0] is first[0] and again[1] is first[1]
    np.testing.assert_array_equal(np.asarray(again[2]), 0)
    assert decoded_image_cache(0) is None and decoded_image_cache(1.5).max_bytes == 1_572_864
    with pytest.raises(ValueError, match="max_bytes"):
        DecodedImageCache(0)


def test_decoded_image_cache_does_not_keep_unreadable_files(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(b"broken")
    cache = DecodedImageCache(max_bytes=10_000)
    for _ in range(2):  # an error every time, never a cached entry
        with pytest.raises(ImageLoadError, match="not a recognized image format"):
            cache.load(p)
    assert len(cache) == 0
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(p)  # repaired: read and kept now
    np.testing.assert_array_equal(np.asarray(cache.load(p)), 7)
    assert len(cache) == 1


def test_a_damaged_exif_block_still_orients_the_pixels_as_detectron2_does(tmp_path):
    from detectron2.data.detection_utils import read_image
    from PIL import ImageOps

    # Orientation 6 plus a text value under a rational tag (YResolution): PIL's exif_transpose raises TypeError
    # rewriting the block, while Detectron2's read_image and image_size turn the image by the orientation read.
    exif = Image.Exif()
    exif[0x0112], exif[0x0110] = 6, "Model"
    arr = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    assert buf.getvalue().count(b"\x01\x10\x00\x02") == 1  # the Model entry: tag, type ASCII (big-endian)
    p = tmp_path / "damaged_exif.jpg"
    p.write_bytes(buf.getvalue().replace(b"\x01\x10\x00\x02", b"\x01\x1b\x00\x02"))
    with pytest.raises(TypeError):
        ImageOps.exif_transpose(Image.open(p))
    im, size = load_image_and_file_size(p)
    assert im.size == size == image_size(p) == (16, 24)
    assert np.array_equal(np.asarray(im), read_image(str(p), "RGB"))


def test_alpha_compositing_equals_the_float_formula_for_every_colour_and_alpha(tmp_path):
    # every (c, a) pair; the reference is the float32 formula the integer one replaced
    c, a = (v.ravel() for v in np.meshgrid(np.arange(256), np.arange(256), indexing="ij"))
    rgba = np.stack([c, 255 - c, (c * 7) % 256, a], -1).astype(np.uint8).reshape(256, 256, 4)
    f = rgba.astype(np.float32)
    want = np.rint(f[..., :3] * (f[..., 3:] / 255.0)).astype(np.uint8)
    p = tmp_path / "all.png"
    Image.fromarray(rgba, "RGBA").save(p)
    assert np.array_equal(np.asarray(load_image(p)), want)
    la = tmp_path / "la.png"
    Image.fromarray(rgba[..., [0, 3]].copy(), "LA").save(la)
    assert np.array_equal(np.asarray(load_image(la)), np.repeat(want[..., :1], 3, -1))


def test_alpha_compositing_memory_is_a_few_bytes_a_pixel(tmp_path):
    import tracemalloc

    p = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 4), dtype=np.uint8), "RGBA").save(p)
    tracemalloc.start()
    try:
        load_image(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # numpy's arrays (PIL's own buffers are not traced): 11 bytes a pixel, float32 compositing took 43
    assert peak / (512 * 512) < 16, peak / (512 * 512)


def test_float_tiff_with_nan_scales_its_finite_values(tmp_path):
    a = np.full((4, 5), np.nan, np.float32)
    a[0, :3] = [10.0, 20.0, 30.0]
    a[1, 0], a[1, 1] = np.inf, -np.inf
    Image.fromarray(a).save(tmp_path / "nan.tif")
    got = np.asarray(load_image(tmp_path / "nan.tif"))[..., 0]
    assert got[0, :3].tolist() == [0, 128, 255] and got[1, :2].tolist() == [255, 0]  # infinities: the range's ends
    assert (got[np.isnan(a)] == 0).all()
    b = np.full((4, 5), np.nan, np.float32)
    b[0, 0] = 1.0
    Image.fromarray(b).save(tmp_path / "unit.tif")  # [0, 1] data keeps its scale
    assert np.asarray(load_image(tmp_path / "unit.tif"))[..., 0].tolist() == [[255, 0, 0, 0, 0]] + [[0] * 5] * 3
    Image.fromarray(np.full((4, 5), np.nan, np.float32)).save(tmp_path / "all_nan.tif")
    msg = _expect_error(tmp_path / "all_nan.tif", "no finite")
    assert msg == f"{tmp_path / 'all_nan.tif'}: no finite pixel values (all NaN or infinite)"
