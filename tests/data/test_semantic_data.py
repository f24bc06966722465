"""Semantic datasets: registration from the config, label-map checks, ADE20K conversion and refusal, the
evaluator chosen by evaluator_type and its mIoU on a known prediction, the shapes semantic split."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import SemSegEvaluator
from PIL import Image

from mae_det.config.detection import load_det_cfg
from mae_det.data.detection import SKIPPED_IMAGES_KEY, DatasetError, remaining_bad_images
from mae_det.data.semantic import (
    build_mapper, check_label_map, check_task_datasets, convert_ade20k, register_sem_seg_dataset,
    register_sem_seg_datasets,
)
from mae_det.data.shapes import ShapesConfig, generate_shapes, write_semantic_split
from mae_det.engine.det_trainer import Trainer, write_sem_seg_results

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "configs" / "shapes" / "sem_seg_vit_scratch.yaml")


def make_semantic(root: Path, labels: list[np.ndarray], classes=("bg", "a", "b")) -> Path:
    """Images (gray) and mode-"L" label PNGs with the given label maps, plus classes.txt."""
    (root / "img").mkdir(parents=True)
    (root / "lab").mkdir()
    for i, lab in enumerate(labels):
        Image.fromarray(np.full((*lab.shape, 3), 100, np.uint8)).save(root / "img" / f"{i:03d}.jpg")
        Image.fromarray(lab.astype(np.uint8), mode="L").save(root / "lab" / f"{i:03d}.png")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def entry(name: str, root: Path) -> list[str]:
    return [name, str(root / "img"), str(root / "lab"), str(root / "classes.txt")]


def cfg_with(*entries, train=(), test=()):
    return load_det_cfg(CFG, ["DATASETS.REGISTER_SEM_SEG", [list(e) for e in entries], "DATASETS.TRAIN", tuple(train),
                              "DATASETS.TEST", tuple(test), "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 3], training=False)


# ---- registration and checks -------------------------------------------------------------------------------
def test_register_from_config_gives_checked_records_and_sem_seg_metadata(tmp_path):
    labels = [np.array([[0, 1], [2, 255]]), np.zeros((2, 2))]
    root = make_semantic(tmp_path / "d", labels)
    register_sem_seg_datasets(cfg_with(entry("sem_ok_a", root), train=["sem_ok_a"]))
    records = DatasetCatalog.get("sem_ok_a")
    assert [Path(r["sem_seg_file_name"]).name for r in records] == ["000.png", "001.png"]
    assert (records[0]["height"], records[0]["width"]) == (2, 2)
    meta = MetadataCatalog.get("sem_ok_a")
    assert meta.evaluator_type == "sem_seg" and meta.stuff_classes == ["bg", "a", "b"] and meta.ignore_label == 255


@pytest.mark.parametrize("case, message", [
    ("value", r"000\.png: label values \[3\] are >= the 3 classes and not the ignore value 255"),
    ("size", r"000\.png: size 3x2 differs from its image"),
    ("palette", r"000\.png: label maps must be single-channel 8-bit PNGs \(mode 'L'\), got mode 'P'"),
    ("missing", r"001\.png: label map of image .*001\.jpg not found"),
])
def test_bad_label_maps_are_one_line_errors_naming_the_file(tmp_path, case, message):
    root = make_semantic(tmp_path / case, [np.array([[0, 1], [2, 3 if case == "value" else 0]]), np.zeros((2, 2))])
    lab = root / "lab" / "000.png"
    if case == "size":
        Image.fromarray(np.zeros((2, 3), np.uint8), mode="L").save(lab)
    elif case == "palette":
        Image.fromarray(np.zeros((2, 2), np.uint8), mode="L").convert("P").save(lab)
    elif case == "missing":
        (root / "lab" / "001.png").unlink()
    with pytest.raises(DatasetError, match=message) as err:
        register_sem_seg_datasets(cfg_with(entry(f"sem_bad_{case}", root), train=[f"sem_bad_{case}"]))
    assert "\n" not in str(err.value)



def _rotated_photo(root: Path, label_shape: tuple[int, int]) -> Path:
    """A phone-style JPEG stored 48 wide x 32 high with EXIF orientation 6 (displayed 32 wide x 48 high), a plain
    second image, and mode-"L" labels: ``label_shape`` (H, W) for the rotated one, the image's own for the other."""
    root = make_semantic(root, [np.zeros(label_shape), np.zeros((32, 48))])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 270 on display: width and height swap
    Image.fromarray(np.full((32, 48, 3), 100, np.uint8)).save(root / "img" / "000.jpg", exif=exif.tobytes())
    return root


def test_exif_rotated_images_are_sized_as_the_mappers_read_them(tmp_path):
    from detectron2.data.detection_utils import read_image

    # A label map drawn on the photo as displayed: registered with the displayed size, mapped in training and test.
    root = _rotated_photo(tmp_path / "shown", (48, 32))
    cfg = cfg_with(entry("sem_exif_shown", root), train=["sem_exif_shown"], test=["sem_exif_shown"])
    register_sem_seg_datasets(cfg, decode_test_sets=True)
    rotated, plain = DatasetCatalog.get("sem_exif_shown")
    assert (rotated["height"], rotated["width"]) == read_image(rotated["file_name"]).shape[:2] == (48, 32)
    assert (plain["height"], plain["width"]) == (32, 48)
    # The training mapper skipped the image as undecodable; the test mapper raised SizeMismatchError.
    out = build_mapper(cfg, is_train=True)(rotated)
    assert out is not None and SKIPPED_IMAGES_KEY not in out and out["sem_seg"].shape == out["image"].shape[1:]
    h, w = build_mapper(cfg, is_train=False)(rotated)["image"].shape[1:]
    assert h > w  # portrait, as displayed
    # A label map of the stored pixels does not fit what the mapper reads: one line naming it, before training.
    root = _rotated_photo(tmp_path / "stored", (32, 48))
    with pytest.raises(DatasetError) as err:
        register_sem_seg_datasets(cfg_with(entry("sem_exif_stored", root), train=["sem_exif_stored"]))
    assert str(err.value) == (f"{root / 'lab' / '000.png'}: size 48x32 differs from its image "
                              f"{root / 'img' / '000.jpg'} (32x48 with its EXIF orientation applied)")


def _truncate_image(root: Path, name: str) -> Path:
    """Replaces img/<name>.jpg by the first half of a 32x32 noise JPEG: its header reads, its data does not."""
    path = root / "img" / f"{name}.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_a_file_that_is_not_an_image_is_a_one_line_error(tmp_path):
    root = make_semantic(tmp_path / "d", [np.zeros((2, 2)), np.zeros((2, 2))])
    (root / "img" / "001.jpg").write_text("not an image")
    with pytest.raises(DatasetError) as err:
        register_sem_seg_datasets(cfg_with(entry("sem_text", root), train=["sem_text"]))
    assert str(err.value) == (f"{root / 'img' / '001.jpg'}: not a recognized image format; dataset 'sem_text' in "
                              f"DATASETS.REGISTER_SEM_SEG lists every image file of {root / 'img'}")
    assert "\n" not in str(err.value)


def test_test_sets_are_decoded_before_a_run_and_training_skips_what_fails_to_decode(tmp_path):
    labels = [np.zeros((32, 32))] * 4
    root = make_semantic(tmp_path / "d", labels)
    bad = _truncate_image(root, "002")
    cfg = cfg_with(entry("sem_trunc", root), train=["sem_trunc"], test=["sem_trunc"])
    register_sem_seg_datasets(cfg)  # inference needs the class names only
    # SemSegEvaluator would meet the image after training: it is decoded first.
    with pytest.raises(DatasetError) as err:
        register_sem_seg_datasets(cfg, decode_test_sets=True)
    assert str(err.value).startswith("dataset 'sem_trunc' (DATASETS.TEST): 1 of 4 images cannot be decoded or are "
                                     "not the size of their label map; a test set must be complete: "
                                     f"{bad}: cannot decode image (OSError: image file is truncated")
    # Training: the mapper skips it (counted by the trainer) instead of crashing the run.
    records = DatasetCatalog.get("sem_trunc")
    assert remaining_bad_images(["sem_trunc"], 0.5) == 2  # the trainer's budget covers semantic sets too
    mapper = build_mapper(cfg, is_train=True)
    assert mapper(records[2]) is None
    out = mapper(records[0])
    [note] = out[SKIPPED_IMAGES_KEY]
    assert note.startswith(f"{bad}: cannot decode image (OSError: image file is truncated")
    assert out["sem_seg"].shape == out["image"].shape[1:]


def test_a_damaged_label_png_is_a_one_line_error_naming_it(tmp_path):
    root = make_semantic(tmp_path / "d", [np.random.default_rng(0).integers(0, 3, (32, 32))] * 2)
    lab = root / "lab" / "001.png"
    data = bytearray(lab.read_bytes())
    data[data.find(b"IDAT") - 1] ^= 0x40  # IDAT length damaged: PIL raises SyntaxError while decoding
    lab.write_bytes(bytes(data))
    with pytest.raises(DatasetError) as err:
        register_sem_seg_datasets(cfg_with(entry("sem_syntax", root), train=["sem_syntax"]))
    assert str(err.value).startswith(f"{lab}: cannot read the label map or its image {root / 'img' / '001.jpg'} "
                                     "(SyntaxError: broken PNG file")
    assert "\n" not in str(err.value)


def test_a_test_image_that_decodes_to_another_size_than_its_label_map_is_refused_before_a_run(tmp_path):
    import struct
    import zlib

    # A PNG stored 40 wide x 64 high whose EXIF orientation 6 follows the pixels: the header (which the label map
    # is checked against) reads 40 x 64, the mappers' decoder 64 x 40.
    root = make_semantic(tmp_path / "d", [np.zeros((64, 40))])
    img = root / "img" / "000.png"
    (root / "img" / "000.jpg").unlink()
    Image.fromarray(np.zeros((64, 40, 3), np.uint8)).save(img)
    exif = Image.Exif()
    exif[0x0112] = 6
    body = exif.tobytes().removeprefix(b"Exif\x00\x00")
    png = img.read_bytes()
    iend = png.rindex(b"IEND") - 4
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    img.write_bytes(png[:iend] + chunk + png[iend:])
    cfg = cfg_with(entry("sem_late_exif", root), train=["sem_late_exif"], test=["sem_late_exif"])
    register_sem_seg_datasets(cfg)
    with pytest.raises(DatasetError) as err:  # SemSegEvaluator's mapper would fail on it after training
        register_sem_seg_datasets(cfg, decode_test_sets=True)
    assert str(err.value) == ("dataset 'sem_late_exif' (DATASETS.TEST): 1 of 1 images cannot be decoded or are not "
                              f"the size of their label map; a test set must be complete: {img}: the file is 64x40 "
                              "(width x height, EXIF orientation applied) but its label map is 40x64")


def test_ade20k_style_one_based_labels_point_at_the_conversion(tmp_path):
    labels = [np.array([[0, 1], [2, 3]])]  # raw ADE20K-like: 0 = other, classes 1..K with K = 3
    root = make_semantic(tmp_path / "d", labels)
    with pytest.raises(DatasetError, match=r"label values \[3\].*tools/convert_ade20k.py"):
        check_label_map(str(root / "lab" / "000.png"), str(root / "img" / "000.jpg"), 3, 255)


def test_raw_ade20k_folder_is_refused(tmp_path):
    raw = tmp_path / "ADEChallengeData2016" / "annotations" / "training"
    raw.mkdir(parents=True)
    (tmp_path / "classes.txt").write_text("a\n")
    with pytest.raises(DatasetError, match=r"holds ADE20K's raw labels; convert .*tools/convert_ade20k.py"):
        register_sem_seg_dataset("sem_raw_ade", str(tmp_path), str(raw), str(tmp_path / "classes.txt"))


def test_convert_ade20k_maps_other_to_ignore_and_shifts_classes(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.array([[0, 1], [75, 150]], np.uint8), mode="L").save(root / "annotations" / split / "a.png")
    assert convert_ade20k(root) == {"training": 1, "validation": 1}
    out = np.asarray(Image.open(root / "annotations_detectron2" / "validation" / "a.png"))
    assert out.tolist() == [[255, 0], [74, 149]]
    assert convert_ade20k(root) == {"training": 0, "validation": 0}  # kept unless overwrite
    Image.fromarray(out, mode="L").save(root / "annotations" / "training" / "b.png")  # already converted
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools" / "convert_ade20k.py"), str(root)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "b.png: expected a raw ADE20K label map" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_an_interrupted_ade20k_conversion_is_not_kept_by_a_rerun(tmp_path, monkeypatch):
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.array([[0, 1], [75, 150]], np.uint8), mode="L").save(root / "annotations" / split / "a.png")
    save = Image.Image.save

    def interrupted(self, fp, *args, **kwargs):  # half a file written, then Ctrl-C
        save(self, fp, *args, **kwargs)
        Path(fp).write_bytes(Path(fp).read_bytes()[:20])
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_ade20k(root)
    monkeypatch.setattr(Image.Image, "save", save)
    assert convert_ade20k(root) == {"training": 1, "validation": 1}
    for split in ("training", "validation"):
        out = np.asarray(Image.open(root / "annotations_detectron2" / split / "a.png"))
        assert out.tolist() == [[255, 0], [74, 149]]


@pytest.mark.parametrize("damage,message", [
    (lambda png: b"not a png at all", "not a recognized image format"),  # was PIL.UnidentifiedImageError
    (lambda png: png[: len(png) // 2], "OSError"),  # truncated: the header reads, the pixels do not
], ids=["not-an-image", "truncated"])
def test_convert_ade20k_names_a_corrupt_label_file_in_one_line(tmp_path, damage, message):
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (root / "annotations" / split).mkdir(parents=True)
    bad = root / "annotations" / "training" / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 151, (64, 64), np.uint8), mode="L").save(bad)
    bad.write_bytes(damage(bad.read_bytes()))
    expected = rf"^{re.escape(str(bad))}: cannot read the raw ADE20K label map.*{message}"
    with pytest.raises(DatasetError, match=expected):
        convert_ade20k(root)
    proc = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools" / "convert_ade20k.py"), str(root)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {bad}: cannot read the raw ADE20K label map")
    assert proc.stderr.count("\n") == 1


# ---- evaluation ------------------------------------------------------------------------------------------------
def test_evaluator_follows_evaluator_type_and_scores_a_known_prediction(tmp_path):
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 255], [2, 2, 2, 255]])
    root = make_semantic(tmp_path / "d", [gt])
    cfg = cfg_with(entry("sem_eval", root), test=["sem_eval"])
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    register_sem_seg_datasets(cfg)
    evaluator = Trainer.build_evaluator(cfg, "sem_eval")
    assert isinstance(evaluator, SemSegEvaluator)
    pred = np.array([[0, 0, 0, 1], [0, 0, 1, 1], [2, 2, 1, 0], [2, 2, 2, 1]])  # 2 of 14 labelled pixels wrong
    logits = torch.nn.functional.one_hot(torch.as_tensor(pred), 3).permute(2, 0, 1).float()
    evaluator.reset()
    evaluator.process([{"file_name": DatasetCatalog.get("sem_eval")[0]["file_name"]}], [{"sem_seg": logits}])
    res = evaluator.evaluate()
    # class 0: tp 4, gt 4, pred 5 -> 4/5; class 1: tp 3, gt 4, pred 4 -> 3/5; class 2: tp 5, gt 6, pred 5 -> 5/6
    iou = [4 / 5, 3 / 5, 5 / 6]
    assert res["sem_seg"]["mIoU"] == pytest.approx(100 * sum(iou) / 3)
    assert res["sem_seg"]["pACC"] == pytest.approx(100 * 12 / 14)
    out = write_sem_seg_results(str(tmp_path / "sem_seg_results.json"), res, dataset="sem_eval", iteration=7)
    on_disk = json.loads((tmp_path / "sem_seg_results.json").read_text())
    assert on_disk == out and on_disk["iteration"] == 7
    assert on_disk["sem_seg"]["IoU"] == pytest.approx({"bg": 80.0, "a": 60.0, "b": 100 * 5 / 6})


# ---- shapes ------------------------------------------------------------------------------------------------
def test_shapes_semantic_split_paints_each_instance_with_its_class(tmp_path):
    cfg = ShapesConfig(image_size=32, num_pool=0, num_train=3, num_val=2, num_cls_train=0, num_cls_val=0, workers=1)
    generate_shapes(tmp_path, cfg, log=lambda _: None)
    info = write_semantic_split(tmp_path, log=lambda _: None)
    assert info["classes"][0] == "background" and info["counts"] == {"train": 3, "val": 2}
    assert (tmp_path / "semantic" / "classes.txt").read_text().split() == info["classes"]
    from pycocotools import mask as mask_utils

    coco = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    rank = {c["id"]: i + 1 for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    assert info["classes"][1:] == [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    for img in coco["images"]:
        label = Image.open(tmp_path / "semantic" / "val" / img["file_name"])
        assert label.mode == "L"
        label = np.asarray(label)
        expected = np.zeros_like(label)
        for a in coco["annotations"]:
            if a["image_id"] == img["id"]:
                expected[mask_utils.decode(a["segmentation"]).astype(bool)] = rank[a["category_id"]]
        assert np.array_equal(label, expected)
    assert any(np.asarray(Image.open(p)).max() > 0 for p in (tmp_path / "semantic" / "val").iterdir())


def test_hidden_files_in_the_image_folder_are_not_images(tmp_path):
    root = make_semantic(tmp_path / "d", [np.zeros((4, 6))])
    (root / "img" / "._000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # a macOS metadata twin
    register_sem_seg_datasets(cfg_with(entry("sem_hidden", root), train=["sem_hidden"]))
    assert [Path(r["file_name"]).name for r in DatasetCatalog.get("sem_hidden")] == ["000.jpg"]


def test_the_test_mapper_decodes_16_bit_images_as_training_does(tmp_path):
    root = make_semantic(tmp_path / "d", [np.zeros((4, 6))])
    ramp = (np.arange(24, dtype=np.uint32).reshape(4, 6) * 65535 // 23).astype(np.uint16)
    (root / "img" / "000.jpg").unlink()
    Image.fromarray(ramp).save(root / "img" / "000.png")  # 16-bit grayscale: read_image would clip it to white
    cfg = cfg_with(entry("sem_16bit", root), test=["sem_16bit"])
    register_sem_seg_datasets(cfg, decode_test_sets=True)
    cfg.defrost()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 4, 100
    out = build_mapper(cfg, is_train=False)(DatasetCatalog.get("sem_16bit")[0])
    expected = torch.as_tensor(np.rint(ramp * (255 / 65535)).astype(np.uint8))
    assert torch.equal(out["image"], expected[None].expand(3, 4, 6)) and out["sem_seg"].shape == (4, 6)


def test_a_run_is_checked_against_its_test_sets_before_training(tmp_path):
    root = make_semantic(tmp_path / "d", [np.zeros((4, 6))])
    two = make_semantic(tmp_path / "two", [np.zeros((4, 6))], classes=("bg", "a"))
    cfg = cfg_with(entry("sem_task_3", root), entry("sem_task_2", two), train=["sem_task_3"], test=["sem_task_3"])
    register_sem_seg_datasets(cfg, decode_test_sets=True)
    check_task_datasets(cfg)
    cfg.defrost()
    cfg.DATASETS.TEST = ("sem_task_2",)  # SemSegEvaluator would stop on it only after the whole training run
    with pytest.raises(DatasetError, match=r"^dataset 'sem_task_2' has 2 classes but MODEL.SEM_SEG_HEAD.NUM_CLASSES "
                                           r"is 3: set it to 2$"):
        check_task_datasets(cfg)
    cfg.DATASETS.TEST = ("sem_task_3",)
    check_task_datasets(cfg)
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"  # a detector scored on a semantic set
    with pytest.raises(DatasetError, match=r"^dataset 'sem_task_3' \(DATASETS.TEST\) is a semantic dataset but "
                                           r"MODEL.META_ARCHITECTURE GeneralizedRCNN is a detector"):
        check_task_datasets(cfg)
