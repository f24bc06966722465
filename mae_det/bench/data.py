"""How long the image checks of a detection dataset take at registration, on a generated COCO-format folder, and
what ``SEEDED_DRAWS`` costs the train loader.

Training sets get a header check per image (:func:`~mae_det.data.detection.image_file_problem`), test sets a full
decode; this times both and extrapolates to COCO 2017 (118,287 train / 5,000 val images). The generated files
were just written, so they are in the page cache: on a cold or network file system the header reads cost more.

:func:`time_train_loaders` times the training batches of Detectron2's loader and of the seeded one
(:mod:`mae_det.data.seeded_loader`) with the same mapper and worker counts, one variant after the other within each
round, so that load changes on a shared machine hit all of them alike. Both read the images in the same order, and
the mapper is LSJ at a fixed scale (flip and crop still drawn): the two loaders draw different scales, and a random
scale would make the work per image, not the loader, differ.

:func:`time_decoded_cache` times pretraining batches (:class:`~mae_det.data.pretrain.PretrainDataset`, the demo's
64 px transform) decoding every image against reading it from a filled
:class:`~mae_det.data.images.DecodedImageCache`, alternating within each round, and checks that both give the same
tensors.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, build_detection_train_loader
from detectron2.data.samplers import TrainingSampler

from ..config.detection import load_det_cfg
from ..data.detection import image_file_problem, parse_coco_instances, register_datasets
from ..data.images import DecodedImageCache
from ..data.pretrain import PretrainDataset, PretrainTransform, coco_source, collate_pretrain
from ..data.seeding import sample_seed, seeded_global_rngs
from ..data.semantic import build_mapper
from ..engine.det_trainer import Trainer

BASE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "Base-MaskRCNN-ViT.yaml"

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
    """Generates both datasets under ``root`` and times them; returns every figure. A count of 0 skips that check
    (its key is left out)."""
    result: dict[str, Any] = {"decode_size": list(decode_size)}
    if header_images:
        small = make_dataset(root / "header", header_images, (96, 72))
        result["header"] = time_checks(small, root / "header" / "images", decode=False)
    if decode_images:
        big = make_dataset(root / "decode", decode_images, decode_size, png=False, seed=1)  # COCO is JPEG
        result["decode"] = time_checks(big, root / "decode" / "images", decode=True)
    return result


def format_report(result: dict) -> str:
    """The lines of the checks that ran (:func:`run`'s ``header`` and ``decode``)."""
    lines = []
    if "header" in result:
        h = result["header"]
        per_h = h["check_s"] / h["images"]
        lines += [
            f"header check (training sets): {h['images']} images (96x72 JPEG/PNG) in {h['check_s']:.2f} s = "
            f"{per_h * 1e6:.0f} us/image; whole registration parse {h['parse_s']:.2f} s",
            f"  -> COCO train2017, {COCO_TRAIN_IMAGES:,} images: {per_h * COCO_TRAIN_IMAGES:.1f} s "
            f"(plus reading its json)",
        ]
    if "decode" in result:
        d = result["decode"]
        per_d = d["check_s"] / d["images"]
        w, hh = result["decode_size"]
        lines += [
            f"full decode (test sets): {d['images']} images ({w}x{hh} JPEG) in {d['check_s']:.2f} s = "
            f"{per_d * 1e3:.1f} ms/image; whole registration parse {d['parse_s']:.2f} s",
            f"  -> COCO val2017, {COCO_VAL_IMAGES:,} images: {per_d * COCO_VAL_IMAGES:.0f} s",
        ]
    return "\n".join(lines)


def train_loader(json_file: Path, image_root: Path, *, seeded: bool, workers: int, batch_size: int,
                 image_size: int) -> Any:
    """The benchmark's train loader: the seeded one, or Detectron2's with the seeded loader's sampler (Detectron2
    seeds its own from numpy's global state), so that both read the same images in the same order."""
    cfg = load_det_cfg(str(BASE_CONFIG), [
        "DATASETS.REGISTER", [["bench_loader", str(json_file), str(image_root)]],
        "DATASETS.TRAIN", ("bench_loader",), "DATASETS.TEST", (), "MODEL.MASK_ON", False,
        "MODEL.ROI_HEADS.NUM_CLASSES", 1, "INPUT.LSJ.ENABLED", True, "INPUT.LSJ.IMAGE_SIZE", image_size,
        "INPUT.LSJ.MIN_SCALE", 1.0, "INPUT.LSJ.MAX_SCALE", 1.0,
        "SOLVER.IMS_PER_BATCH", batch_size, "DATALOADER.NUM_WORKERS", workers, "SEEDED_DRAWS", seeded,
        "SEED", 0, "MODEL.DEVICE", "cpu",
    ])
    register_datasets(cfg)
    if seeded:
        return Trainer.build_train_loader(cfg)
    sampler = TrainingSampler(len(DatasetCatalog.get("bench_loader")), seed=sample_seed(cfg.SEED) % 2**31)
    return build_detection_train_loader(cfg, mapper=build_mapper(cfg, is_train=True), sampler=sampler)


def time_train_loaders(json_file: Path, image_root: Path, *, batches: int, workers: tuple[int, ...] = (0, 2),
                       rounds: int = 3, batch_size: int = 2, image_size: int = 1024) -> dict:
    """Seconds per training batch of each loader ("detectron2", "seeded") and worker count: per round, each variant
    starts its loader, takes one batch untimed (worker start-up) and then ``batches`` timed ones; the median over
    ``rounds`` is reported, with the seeded / Detectron2 ratio per worker count."""
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for seeded in (False, True):
            for w in workers:
                it = iter(train_loader(json_file, image_root, seeded=seeded, workers=w, batch_size=batch_size,
                                       image_size=image_size))
                next(it)
                t0 = time.perf_counter()
                for _ in range(batches):
                    next(it)
                times.setdefault(f"{'seeded' if seeded else 'detectron2'}_w{w}", []).append(
                    (time.perf_counter() - t0) / batches)
                del it  # stops its workers before the next variant starts
    median = {k: float(np.median(v)) for k, v in times.items()}
    ratios = {f"w{w}": median[f"seeded_w{w}"] / median[f"detectron2_w{w}"] for w in workers}
    return {"s_per_batch": median, "seeded_over_detectron2": ratios, "batches": batches, "rounds": rounds,
            "batch_size": batch_size, "image_size": image_size, "seeding_us_per_image": seeding_cost_us()}


def seeding_cost_us(samples: int = 2000) -> float:
    """Microseconds that seeding and restoring the three global generators adds to each mapped image."""
    t0 = time.perf_counter()
    for i in range(samples):
        with seeded_global_rngs(sample_seed(0, 0, i)):
            pass
    return (time.perf_counter() - t0) / samples * 1e6


def format_loader_report(result: dict) -> str:
    lines = [f"train loader, LSJ {result['image_size']} px at scale 1, batch {result['batch_size']}, median of "
             f"{result['rounds']} rounds x {result['batches']} batches (seconds per batch):"]
    for key, ratio in result["seeded_over_detectron2"].items():
        d2, seeded = result["s_per_batch"][f"detectron2_{key}"], result["s_per_batch"][f"seeded_{key}"]
        lines.append(f"  {key[1:]} loader worker(s): Detectron2's loader {d2:.4f}, SEEDED_DRAWS {seeded:.4f}, "
                     f"ratio {ratio:.3f}")
    lines.append(f"  seeding and restoring the global generators: {result['seeding_us_per_image']:.0f} us per image")
    return "\n".join(lines)


def time_decoded_cache(json_file: Path, image_root: Path, *, batches: int, rounds: int = 3, batch_size: int = 16,
                       img_size: int = 64) -> dict:
    """Seconds per pretraining batch of the images ``json_file`` lists (:func:`make_dataset`'s) decoded on every read
    ("decode") and read from a :class:`DecodedImageCache` filled by one untimed pass ("cache"); the median over
    ``rounds``, each timing both variants on the same ``batches`` batches (the same crops), and whether every batch
    was the same tensor."""
    # The json, not the folder: a reused --root keeps the files of an earlier run with more images
    source = coco_source(json_file, image_root)
    transform = PretrainTransform(img_size)
    variants = {"decode": PretrainDataset(source, transform, seed=0),
                "cache": PretrainDataset(source, transform, seed=0, cache=DecodedImageCache(2**40))}
    keys = [(0, i % len(source.paths)) for i in range(batches * batch_size)]
    for key in keys:
        variants["cache"][key]
    times: dict[str, list[float]] = {}
    identical = True
    for _ in range(rounds):
        images = {}
        for name, ds in variants.items():
            t0 = time.perf_counter()
            images[name] = [collate_pretrain([ds[k] for k in keys[b * batch_size:(b + 1) * batch_size]])["image"]
                            for b in range(batches)]
            times.setdefault(name, []).append((time.perf_counter() - t0) / batches)
        identical &= all(torch.equal(a, b) for a, b in zip(images["decode"], images["cache"]))
    median = {k: float(np.median(v)) for k, v in times.items()}
    return {"s_per_batch": median, "cache_over_decode": median["cache"] / median["decode"], "identical": identical,
            "images": len(source.paths), "batches": batches, "rounds": rounds, "batch_size": batch_size,
            "image_size": img_size}


def format_cache_report(result: dict) -> str:
    return (f"pretraining batches of {result['batch_size']} at {result['image_size']} px from {result['images']} "
            f"files, median of {result['rounds']} rounds x {result['batches']} batches (seconds per batch): decoded "
            f"every read {result['s_per_batch']['decode']:.4f}, from the decoded-image cache "
            f"{result['s_per_batch']['cache']:.4f}, ratio {result['cache_over_decode']:.3f}; identical tensors: "
            f"{result['identical']}")
