import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.datasets import ImageFolder

from mae_det.data.shapes import (
    CLASS_NAMES,
    ShapesConfig,
    ShapeSpec,
    classification_sample,
    detection_sample,
    generate_shapes,
    render_scene,
    shape_area,
    shape_mask,
)

SMALL = dict(image_size=64, num_pool=10, num_train=8, num_val=6, num_cls_train=14, num_cls_val=7, max_objects=7)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, ShapesConfig]:
    root = tmp_path_factory.mktemp("shapes")
    cfg = ShapesConfig(**SMALL, seed=3, workers=1)
    t0 = time.perf_counter()
    generate_shapes(root, cfg, log=lambda _: None)
    print(f"generated {sum(SMALL[k] for k in SMALL if k.startswith('num'))} images in {time.perf_counter() - t0:.2f}s")
    return root, cfg


def test_layout_and_info(dataset):
    root, cfg = dataset
    for split in ("pool", "train", "val"):
        names = sorted(p.name for p in (root / "images" / split).iterdir())
        assert names == [f"{i:06d}.png" for i in range(1, getattr(cfg, f"num_{split}") + 1)]
        assert (root / "annotations" / f"instances_{split}.json").is_file()
    info = json.loads((root / "dataset_info.json").read_text())
    assert info["seed"] == 3 and info["image_size"] == 64 and info["classes"] == list(CLASS_NAMES)
    assert info["counts"] == {"pool": 10, "train": 8, "val": 6, "cls_train": 14, "cls_val": 7}
    assert info["version"] and info["config"]["max_objects"] == 7 and "workers" not in info["config"]


def test_same_seed_same_bytes_whatever_the_workers(dataset, tmp_path):
    root, cfg = dataset
    again = tmp_path / "again"
    generate_shapes(again, ShapesConfig(**SMALL, seed=3, workers=2), log=lambda _: None)
    assert _files(again) == _files(root)


def test_other_seed_differs(dataset, tmp_path):
    root, _ = dataset
    other = tmp_path / "other"
    generate_shapes(other, ShapesConfig(**SMALL, seed=4, workers=1), log=lambda _: None)
    a, b = _files(root), _files(other)
    assert a.keys() == b.keys()
    assert a["annotations/instances_train.json"] != b["annotations/instances_train.json"]
    assert a["images/pool/000001.png"] != b["images/pool/000001.png"]
    assert a["dataset_info.json"] != b["dataset_info.json"]


def test_a_larger_train_split_extends_the_smaller_one_and_leaves_the_other_splits_alone(dataset, tmp_path):
    # make experiment's 160 labeled images are the first 160 of make demo's 640, on the same pool and val images.
    root, _ = dataset
    larger = tmp_path / "larger"
    generate_shapes(larger, ShapesConfig(**{**SMALL, "num_train": 12}, seed=3, workers=1), log=lambda _: None)
    a, b = _files(root), _files(larger)
    changed = {k for k in a if a[k] != b.get(k)} | (b.keys() - a.keys())
    assert changed == {"annotations/instances_train.json", "dataset_info.json",
                       *(f"images/train/{i:06d}.png" for i in range(9, 13))}
    small, big = (json.loads(x["annotations/instances_train.json"]) for x in (a, b))
    assert big["images"][:8] == small["images"]
    assert big["annotations"][:len(small["annotations"])] == small["annotations"]


def test_pycocotools_masks_match_drawing_boxes_and_areas(dataset):
    root, cfg = dataset
    for split in ("pool", "train", "val"):
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        assert sorted(coco.getCatIds()) == list(range(1, len(CLASS_NAMES) + 1))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASS_NAMES)
        assert len(coco.getImgIds()) == getattr(cfg, f"num_{split}")
        n_ann = 0
        for image_id in coco.getImgIds():
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            _, drawn = detection_sample(cfg, split, image_id - 1)
            assert [a["category_id"] for a in anns] == [kind + 1 for kind, _ in drawn]
            union = np.zeros((cfg.image_size, cfg.image_size), dtype=np.int32)
            for ann, (_, mask) in zip(anns, drawn):
                decoded = coco.annToMask(ann).astype(bool)
                np.testing.assert_array_equal(decoded, mask)
                assert ann["area"] == int(mask.sum()) >= cfg.min_visible_pixels
                ys, xs = np.nonzero(mask)
                assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert mask_utils.toBbox(ann["segmentation"]).tolist() == ann["bbox"]
                assert ann["iscrowd"] == 0
                union += mask
            assert union.max() <= 1, "visible masks of one image must not overlap"
            n_ann += len(anns)
        assert n_ann > len(coco.getImgIds())  # several shapes per image on average


def test_occlusion_keeps_exact_visible_masks_and_drops_hidden_shapes():
    size = 64
    circle = ShapeSpec(0, 32.0, 28.0, 12.0, 0.3)
    square = ShapeSpec(1, 32.0, 40.0, 10.0, 0.7)
    tiny_star = ShapeSpec(3, 40.0, 40.0, 4.0, 0.0)  # drawn before the square, fully under it
    _, instances = render_scene(np.random.default_rng(0), size, [circle, tiny_star, square], 0.25, 16)

    def alone(spec):
        window, m = shape_mask(spec, size)
        full = np.zeros((size, size), dtype=bool)
        full[window] = m
        return full

    assert [kind for kind, _ in instances] == [0, 1]
    np.testing.assert_array_equal(instances[0][1], alone(circle) & ~alone(square))
    np.testing.assert_array_equal(instances[1][1], alone(square))
    assert 0 < instances[0][1].sum() < alone(circle).sum()


def test_ring_has_a_hole_and_the_image_shows_only_annotated_shapes():
    size = 64
    ring = ShapeSpec(4, 32.0, 32.0, 20.0, 0.0)
    image, instances = render_scene(np.random.default_rng(1), size, [ring], 0.25, 16)
    mask = instances[0][1]
    assert not mask[32, 32] and mask[32, 32 + 15] and not mask[32, 32 + 21]
    empty, _ = render_scene(np.random.default_rng(1), size, [], 0.25, 16)
    # Same generator stream up to the background, so outside the ring the pixels differ only by the final grain.
    assert np.abs(image[~mask].astype(int) - empty[~mask].astype(int)).mean() < 10
    assert image.shape == (size, size, 3) and image.dtype == np.uint8


def test_rasterized_area_matches_the_analytic_area_of_every_class():
    for kind, name in enumerate(CLASS_NAMES):
        _, m = shape_mask(ShapeSpec(kind, 50.0, 50.0, 30.0, 0.4), 100)
        assert abs(m.sum() / shape_area(name, 30.0) - 1) < 0.02, name


def test_detectron2_registration_and_mapper(dataset):
    root, cfg = dataset
    name = "test_shapes_val_registration"
    register_coco_instances(name, {}, str(root / "annotations/instances_val.json"), str(root / "images/val"))
    try:
        records = DatasetCatalog.get(name)
        assert len(records) == cfg.num_val
        assert MetadataCatalog.get(name).thing_classes == list(CLASS_NAMES)
        rec = records[0]
        assert Path(rec["file_name"]).is_file() and rec["height"] == rec["width"] == 64
        assert all(a["bbox_mode"] == BoxMode.XYWH_ABS for a in rec["annotations"])
        assert all(0 <= a["category_id"] < len(CLASS_NAMES) for r in records for a in r["annotations"])
        mapper = DatasetMapper(is_train=True, augmentations=[], image_format="RGB", use_instance_mask=True,
                               instance_mask_format="bitmask")
        out = mapper(rec)
        _, drawn = detection_sample(cfg, "val", 0)
        gt = out["instances"]
        assert out["image"].shape == (3, 64, 64)
        assert gt.gt_classes.tolist() == [kind for kind, _ in drawn]
        assert torch.equal(gt.gt_masks.tensor, torch.from_numpy(np.stack([m for _, m in drawn])))
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in rec["annotations"]]
        assert torch.allclose(gt.gt_boxes.tensor, torch.tensor(boxes))
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_classification_split_is_a_balanced_image_folder(dataset):
    root, cfg = dataset
    for split, n in (("train", cfg.num_cls_train), ("val", cfg.num_cls_val)):
        folder = ImageFolder(str(root / "classification" / split))
        assert sorted(folder.classes) == sorted(CLASS_NAMES)
        assert len(folder) == n
        per_class = np.bincount([t for _, t in folder.samples], minlength=len(CLASS_NAMES))
        assert per_class.max() - per_class.min() <= 1
        img, _ = folder[0]
        assert img.size == (64, 64)
        for path, target in folder.samples:
            assert Path(path).parent.name == folder.classes[target]


def test_existing_dataset_needs_overwrite_and_bad_config_is_named(dataset, tmp_path):
    root, cfg = dataset
    with pytest.raises(FileExistsError, match=str(root)):
        generate_shapes(root, cfg, log=lambda _: None)
    with pytest.raises(ValueError, match="max_objects"):
        ShapesConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="min_size"):
        ShapesConfig(min_size=0.9)
    # a hidden instance had area 0 and crashed the writer; a sub-pixel classification shape drew a blank image
    with pytest.raises(ValueError, match="min_visible_pixels >= 1"):
        ShapesConfig(min_visible_pixels=0, min_visible_fraction=0.0)
    with pytest.raises(ValueError, match="ShapesConfig.cls_min_size: 0.01 of 32 px is a radius under 2 px"):
        ShapesConfig(image_size=32, cls_min_size=0.01, cls_max_size=0.03)


def test_a_classification_split_smaller_than_the_class_set_loads(tmp_path):
    # classes cycle: 4 val images cover 4 of the 6 classes, and an empty folder for the others was unloadable
    from mae_det.data.classification import ImageFolderDataset

    cfg = ShapesConfig(**{**SMALL, "num_pool": 0, "num_train": 0, "num_val": 0, "num_cls_val": 4}, workers=1)
    generate_shapes(tmp_path / "s", cfg, log=lambda _: None)
    train = ImageFolderDataset(tmp_path / "s" / "classification" / "train")
    val = ImageFolderDataset(tmp_path / "s" / "classification" / "val", classes=train.classes)
    assert sorted(p.name for p in (tmp_path / "s" / "classification" / "val").iterdir()) == sorted(CLASS_NAMES[:4])
    assert len(val) == 4 and len(train.classes) == len(CLASS_NAMES)


def test_tool_writes_dataset_and_reports_errors(tmp_path, repo_root, capsys):
    spec = importlib.util.spec_from_file_location("generate_shapes_tool", repo_root / "tools/generate_shapes.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--root", str(tmp_path / "d"), "--image-size", "32", "--num-pool", "3", "--num-train", "2", "--num-val",
            "2", "--num-cls-train", "6", "--num-cls-val", "6", "--workers", "1", "--cls-background-contrast", "0.5"]
    tool.main(argv)
    assert "wrote 19 images" in capsys.readouterr().out
    info = json.loads((tmp_path / "d/dataset_info.json").read_text())
    assert info["image_size"] == 32 and info["counts"]["cls_val"] == 6
    assert info["config"]["cls_background_contrast"] == 0.5 and info["config"]["background_contrast"] == 1.0
    with pytest.raises(SystemExit, match="--overwrite"):
        tool.main(argv)
    with pytest.raises(SystemExit, match="min_objects <= max_objects"):
        tool.main(argv + ["--overwrite", "--max-objects", "0"])


def test_background_contrast_flattens_only_the_background(dataset, tmp_path):
    root, cfg = dataset
    flat_root = tmp_path / "flat"
    flat = ShapesConfig(**SMALL, seed=3, workers=1, background_contrast=0.2)
    generate_shapes(flat_root, flat, log=lambda _: None)
    again = tmp_path / "flat_again"
    generate_shapes(again, ShapesConfig(**SMALL, seed=3, workers=2, background_contrast=0.2), log=lambda _: None)
    assert _files(again) == _files(flat_root)  # deterministic
    for split in ("pool", "train", "val"):
        # Same draws in the same order: the annotations (exact masks, boxes, areas) are those of contrast 1,
        # and pycocotools loads them.
        name = f"annotations/instances_{split}.json"
        assert (flat_root / name).read_bytes() == (root / name).read_bytes()
        COCO(str(flat_root / name))
    spread = {}
    for c, conf in ((1.0, cfg), (0.2, flat)):
        stds = []
        for i in range(cfg.num_train):
            image, instances = detection_sample(conf, "train", i)
            background = ~np.any([m for _, m in instances], axis=0) if instances else np.ones(image.shape[:2], bool)
            stds.append(image[background].astype(float).std(0).mean())
        spread[c] = np.mean(stds)
    assert spread[0.2] < 0.5 * spread[1.0]
    with pytest.raises(ValueError, match="background_contrast"):
        ShapesConfig(background_contrast=1.5)


def test_cls_background_contrast_flattens_only_the_classification_backgrounds(dataset, tmp_path):
    root, cfg = dataset
    flat = ShapesConfig(**SMALL, seed=3, workers=1, cls_background_contrast=0.0)
    generate_shapes(tmp_path / "a", flat, log=lambda _: None)
    generate_shapes(tmp_path / "b", ShapesConfig(**SMALL, seed=3, workers=2, cls_background_contrast=0.0),
                    log=lambda _: None)
    files = _files(tmp_path / "a")
    assert _files(tmp_path / "b") == files  # deterministic, whatever the number of workers
    before = _files(root)
    detection = [k for k in files if not k.startswith("classification/") and k != "dataset_info.json"]
    assert detection and all(files[k] == before[k] for k in detection)  # detection splits untouched
    cls_files = [k for k in files if k.startswith("classification/")]
    assert cls_files and all(files[k] != before[k] for k in cls_files)
    spread = {"textured": [], "plain": []}
    for i in range(cfg.num_cls_train):
        textured, kind = classification_sample(cfg, "train", i)
        plain, same_kind = classification_sample(flat, "train", i)
        assert kind == same_kind
        # The shape's color is drawn far from the background's: pixels near the flat image's median are background.
        background = np.abs(plain.astype(int) - np.median(plain.reshape(-1, 3), 0)).max(-1) < 20  # (S, S)
        assert background.mean() > 0.4
        for name, image in (("textured", textured), ("plain", plain)):
            spread[name].append(image[background].astype(float).std(0).mean())
    # What is left of a flat background is the final grain (std 0.015 * 255 ~ 4).
    assert np.mean(spread["plain"]) < 6 < np.mean(spread["textured"])
    # None follows background_contrast; the option is validated like it.
    assert np.array_equal(classification_sample(ShapesConfig(**SMALL, background_contrast=0.0), "val", 1)[0],
                          classification_sample(ShapesConfig(**SMALL, cls_background_contrast=0.0), "val", 1)[0])
    with pytest.raises(ValueError, match="cls_background_contrast must be in"):
        ShapesConfig(cls_background_contrast=-0.5)
    info = json.loads((tmp_path / "a" / "dataset_info.json").read_text())
    assert info["config"]["cls_background_contrast"] == 0.0


def test_a_negative_seed_or_a_file_as_root_is_one_line_before_anything_is_written(tmp_path, repo_root):
    spec = importlib.util.spec_from_file_location("generate_shapes_tool", repo_root / "tools/generate_shapes.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with pytest.raises(ValueError, match=r"^ShapesConfig.seed must be >= 0, got -1$"):
        ShapesConfig(seed=-1)
    argv = ["--image-size", "32", "--num-pool", "1", "--num-train", "1", "--num-val", "1", "--num-cls-train", "1",
            "--num-cls-val", "1", "--workers", "1"]
    with pytest.raises(SystemExit) as e:  # was numpy's unnamed "expected non-negative integer"
        tool.main(["--root", str(tmp_path / "neg"), "--seed", "-1", *argv])
    assert str(e.value.code) == "generate_shapes: ShapesConfig.seed must be >= 0, got -1"
    assert not (tmp_path / "neg").exists()  # annotations/ and images/ were left, and the rerun needed --overwrite
    (tmp_path / "file").write_text("")
    for root, message in ((tmp_path / "file", f"output folder {tmp_path / 'file'} is a file, not a folder"),
                          (tmp_path / "file" / "d", f"cannot create output folder {tmp_path / 'file' / 'd'}: "
                                                    f"{tmp_path / 'file'} is a file, not a folder")):
        with pytest.raises(SystemExit) as e:  # was a NotADirectoryError traceback
            tool.main(["--root", str(root), *argv])
        assert str(e.value.code) == f"generate_shapes: {message}"
    assert (tmp_path / "file").read_text() == ""
