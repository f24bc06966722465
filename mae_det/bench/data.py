"""How long the image checks of a detection dataset take at registration, on a generated COCO-format folder.

Training sets get a header check per image (:func:`~mae_det.data.detection.image_file_problem`), test sets a full
decode; this times both and extrapolates to COCO 2017 (118,287 train / 5,000 val images). The generated files
were just written, so they are in the page cache: on a cold or network file system the header reads cost more.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.detection import image_file_problem, parse_coco_instances

COCO_TRAIN_IMAGES = 118_287
COCO_VAL_IMAGES = 5_000


def make_dataset(root: Path, n: int, size: tuple[int, int], *, png: bool = True, seed: int = 0) -> Path:
    """Writes ``n`` noise images of ``size`` (width, height) under ``root/images``, alternating JPEG and PNG (or
    JPEG only), every tenth JPEG EXIF-rotated (declared as it reads), and ``root/ann.json`` with one box each."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    w, h = size
    rotated = Image.Exif()
    rotated[0x0112] = 6
    images, anns = [], []
    for i in range(n):
        pixels = Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8))
        if png and i % 2:
            name, declared = f"{i:06d}.png", (w, h)
            pixels.save(root / "images" / name)
        else:
            turn = i % (20 if png else 10) == 0
            name, declared = f"{i:06d}.jpg", (h, w) if turn else (w, h)
            pixels.save(root / "images" / name, quality=90, exif=rotated.tobytes() if turn else b"")
        images.append({"id": i + 1, "file_name": name, "width": declared[0], "height": declared[1]})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1.0, 1.0, 8.0, 8.0],
                     "area": 64.0, "iscrowd": 0})
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return path


def time_checks(json_file: Path, image_root: Path, *, decode: bool) -> dict[str, float]:
    """Seconds for the per-image check alone and for the whole registration parse (json and checks); raises if
    the generated data did not pass."""
    entries = json.loads(json_file.read_text())["images"]
    t0 = time.perf_counter()
    problems = [image_file_problem(str(image_root / e["file_name"]), e["height"], e["width"], decode=decode)
                for e in entries]
    check_s = time.perf_counter() - t0
    if any(problems):
        raise RuntimeError(f"generated data failed its own check: {next(p for p in problems if p)}")
    t0 = time.perf_counter()
    records, *_ = parse_coco_instances(str(json_file), str(image_root), decode=decode)
    parse_s = time.perf_counter() - t0
    assert len(records) == len(entries)
    return {"images": len(entries), "check_s": check_s, "parse_s": parse_s}


def run(root: Path, header_images: int, decode_images: int, decode_size: tuple[int, int]) -> dict:
    """Generates both datasets under ``root`` and times them; returns every figure."""
    small = make_dataset(root / "header", header_images, (96, 72))
    header = time_checks(small, root / "header" / "images", decode=False)
    big = make_dataset(root / "decode", decode_images, decode_size, png=False, seed=1)  # COCO is JPEG
    decode = time_checks(big, root / "decode" / "images", decode=True)
    return {"header": header, "decode": decode, "decode_size": list(decode_size)}


def format_report(result: dict) -> str:
    h, d = result["header"], result["decode"]
    per_h = h["check_s"] / h["images"]
    per_d = d["check_s"] / d["images"]
    w, hh = result["decode_size"]
    return "\n".join([
        f"header check (training sets): {h['images']} images (96x72 JPEG/PNG) in {h['check_s']:.2f} s = "
        f"{per_h * 1e6:.0f} us/image; whole registration parse {h['parse_s']:.2f} s",
        f"  -> COCO train2017, {COCO_TRAIN_IMAGES:,} images: {per_h * COCO_TRAIN_IMAGES:.1f} s "
        f"(plus reading its json)",
        f"full decode (test sets): {d['images']} images ({w}x{hh} JPEG) in {d['check_s']:.2f} s = "
        f"{per_d * 1e3:.1f} ms/image; whole registration parse {d['parse_s']:.2f} s",
        f"  -> COCO val2017, {COCO_VAL_IMAGES:,} images: {per_d * COCO_VAL_IMAGES:.0f} s",
    ])
