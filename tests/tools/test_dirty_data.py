"""Dirty COCO data through tools/train_net.py: bad image files are skipped and counted, never a crash.

The tiny dataset of test_train_net plus a JPEG cut in half (its header is intact, so only decoding finds it), a
text file named .jpg and a PNG whose declared size is wrong.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.tools.test_train_net import make_coco, run_tool, tiny_config


def add_bad_images(data: Path) -> tuple[Path, list[str]]:
    """Adds the three bad images (with an annotation each) to the json; returns it and their paths."""
    ann_path = data / "train.json"
    coco = json.loads(ann_path.read_text())
    images = data / "images"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8)).save(images / "trunc.jpg")
    full = (images / "trunc.jpg").read_bytes()
    (images / "trunc.jpg").write_bytes(full[: len(full) // 2])
    (images / "notes.jpg").write_text("this is not an image")
    shutil.copy(images / "000.png", images / "wrong_size.png")
    rect = [[20.0, 20.0, 60.0, 20.0, 60.0, 60.0, 20.0, 60.0]]
    for k, (name, h) in enumerate([("trunc.jpg", 128), ("notes.jpg", 128), ("wrong_size.png", 100)]):
        image_id = 100 + k
        coco["images"].append({"id": image_id, "file_name": name, "height": h, "width": 128})
        coco["annotations"].append({"id": 1000 + k, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                    "bbox": [20.0, 20.0, 40.0, 40.0], "segmentation": rect, "area": 1600.0})
    ann_path.write_text(json.dumps(coco))
    return ann_path, [str(images / n) for n in ("trunc.jpg", "notes.jpg", "wrong_size.png")]


@pytest.fixture(scope="module")
def dirty(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("dirty")
    make_coco(root)
    return (root, *add_bad_images(root))


@pytest.mark.slow
def test_training_on_dirty_data_completes_with_the_bad_files_named_and_counted(dirty, tmp_path):
    data, json_file, (trunc, notes, wrong) = dirty
    out = tmp_path / "out"
    # 2 of 11 images are bad at load; the truncated one passes the header check and fails in the loader worker.
    # 0.3 allows 3 bad images in all (at 0.2 the third, found in training, would stop the run).
    cfg = tiny_config(tmp_path / "dirty.yaml", data, out, test=False, **{
        "DATASETS.MAX_BAD_FRACTION": 0.3, "DATALOADER.NUM_WORKERS": 1, "SOLVER.CHECKPOINT_PERIOD": 100})
    r = run_tool("--config-file", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert (f"dataset 'b2_tiny': {json_file}: 9 images, 17 annotations; skipped 4: 2 annotations of images skipped "
            "for their file, 1 images whose size differs from the json, 1 unreadable images; first bad files: "
            f"{notes}: not a recognized image format | {wrong}: the file is 128x128 (width x height, EXIF "
            "orientation applied) but the json declares 128x100") in log
    skip_lines = [line for line in log.splitlines() if "skipped a training image that failed to decode" in line]
    assert len(skip_lines) == 1, skip_lines  # logged once, though 16 samples were drawn from 9 images
    assert f"(counted in data/skipped_images): {trunc}: cannot decode image (OSError: image file is truncated" \
        in skip_lines[0]
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    counts = [row["data/skipped_images"] for row in rows if "total_loss" in row]
    assert len(counts) == 8 and counts[-1] == 1 and counts == sorted(counts)
    assert (out / "model_final.pth").is_file()


@pytest.mark.slow
def test_too_many_bad_training_images_is_one_line_exit_2(dirty, tmp_path):
    data, json_file, (_, notes, _) = dirty
    out = tmp_path / "out"
    cfg = tiny_config(tmp_path / "strict.yaml", data, out, test=False)  # DATASETS.MAX_BAD_FRACTION 0.01
    r = run_tool("--config-file", str(cfg))
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: dataset 'b2_tiny': 2 of 11 images in {json_file} are missing, unreadable or not "
                           f"the size the json declares, more than DATASETS.MAX_BAD_FRACTION=0.01 allows (0): {notes}")
    assert "Traceback" not in r.stderr and not (out / "metrics.json").exists()


@pytest.mark.slow
def test_an_unreadable_test_image_is_one_line_exit_2_before_training(dirty, tmp_path):
    data, json_file, (trunc, _, _) = dirty
    coco = json.loads(json_file.read_text())
    coco["images"] = [i for i in coco["images"] if i["file_name"] != "notes.jpg" and i["file_name"] != "wrong_size.png"]
    val = data / "val.json"
    val.write_text(json.dumps(coco))  # 9 images whose headers are fine, one of them truncated
    out = tmp_path / "out"
    cfg = tiny_config(tmp_path / "val.yaml", data, out, **{
        "DATASETS.REGISTER": [["b2_tiny", str(json_file), str(data / "images")],
                              ["b2_val", str(val), str(data / "images")]],
        "DATASETS.TEST": ["b2_val"], "DATASETS.MAX_BAD_FRACTION": 0.5})
    r = run_tool("--config-file", str(cfg))
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: dataset 'b2_val' (DATASETS.TEST): 1 of 9 images in {val} are missing, unreadable "
                           "or not the size the json declares; a test set must be complete, skipping images would "
                           f"change the AP: {trunc}: cannot decode image (OSError: image file is truncated")
    assert "Traceback" not in r.stderr and not out.exists()  # checked before any process started training
