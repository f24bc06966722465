"""COCO-format registration, hostile json handling and the LSJ mapper (mae_det.data.detection)."""
import io
import json
import os
import re
import warnings

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.structures import BoxMode
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from mae_det.config.detection import get_det_cfg
from mae_det.data.images import DEFAULT_MAX_PIXELS, ImageLoadError
from mae_det.data.detection import (
    MISSING_IMAGE,
    SKIPPED_IMAGES_KEY,
    UNREADABLE_IMAGE,
    WRONG_SIZE_IMAGE,
    CocoLoadReport,
    DatasetError,
    build_detection_mapper,
    check_bad_images,
    check_dataset_files,
    check_num_classes,
    check_training_sets,
    flip_augmentations,
    image_file_problem,
    parse_coco_instances,
    register_coco_dataset,
    register_datasets,
    remaining_bad_images,
)
from mae_det.data.detection import _LOAD_REPORTS, _polygons_to_rle

H, W = 64, 96


def _write_images(root, names, h=H, w=W):
    os.makedirs(root, exist_ok=True)
    for n in names:
        img = np.zeros((h, w, 3), np.uint8)
        img[10:40, 20:60] = 200
        Image.fromarray(img).save(os.path.join(root, n))


def _rect(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _dataset(tmp_path, data, images=("a.png", "b.png", "c.png")):
    root = tmp_path / "images"
    _write_images(root, images)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(path), str(root)


def _images(n=3):
    return [{"id": i + 1, "file_name": "abc"[i] + ".png", "height": H, "width": W} for i in range(n)]


def _ann(i, image_id, cat, bbox, segm=None, **kw):
    a = {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0, "area": 1.0}
    if segm is not None:
        a["segmentation"] = segm
    return {**a, **kw}


def test_noncontiguous_category_ids_are_mapped_in_id_order(tmp_path):
    cats = [{"id": 12, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
    anns = [_ann(1, 1, 12, [20, 10, 40, 30], _rect(20, 10, 40, 30)), _ann(2, 2, 3, [0, 0, 5, 5], _rect(0, 0, 5, 5))]
    records, classes, id_map, report = parse_coco_instances(*_dataset(tmp_path, {
        "images": _images(), "annotations": anns, "categories": cats}))
    assert classes == ["a", "b", "c"]
    assert id_map == {3: 0, 7: 1, 12: 2}
    assert [r["image_id"] for r in records] == [1, 2, 3]
    assert [a["category_id"] for r in records for a in r["annotations"]] == [2, 0]
    assert records[2]["annotations"] == []  # image without annotations kept
    assert report.images == 3 and report.annotations == 2 and not report.skipped


def test_hostile_annotations_are_skipped_and_counted(tmp_path):
    crowd = mask_util.encode(np.asfortranarray(np.pad(np.ones((10, 10), np.uint8), ((5, H - 15), (5, W - 15)))))
    crowd_uncompressed = {"size": [H, W], "counts": [5 * H + 5] + [10, H - 10] * 9 + [10, H * W - (5 * H + 5) - 10 * 10 - (H - 10) * 9]}
    anns = [
        _ann(1, 1, 1, [20, 10, 40, 30], _rect(20, 10, 40, 30)),                       # kept
        _ann(2, 99, 1, [1, 1, 5, 5], _rect(1, 1, 5, 5)),                              # unknown image
        _ann(3, 1, 1, [1, 1, 5, 5], [[1, 1, 5, 5]]),                                  # 2-point polygon
        _ann(4, 1, 1, [1, 1, 0, 5], _rect(1, 1, 0, 5)),                               # zero width
        _ann(5, 1, 1, [1, 1, 5, -3], _rect(1, 1, 5, 3)),                              # negative height
        _ann(6, 2, 42, [1, 1, 5, 5], _rect(1, 1, 5, 5)),                              # unknown category
        _ann(7, 2, 1, [1, 1, "x", 5], _rect(1, 1, 5, 5)),                             # malformed box
        _ann(8, 2, 1, [5, 5, 10, 10], {"size": [H, W], "counts": crowd["counts"].decode()}, iscrowd=1),  # crowd RLE
        _ann(9, 2, 1, [5, 5, 10, 10], {"size": [H + 1, W], "counts": crowd["counts"].decode()}),         # RLE size
        _ann(10, 2, 1, [5, 5, 10, 10], crowd_uncompressed, iscrowd=1),                # uncompressed crowd RLE
        _ann(11, 3, 1, [1, 1, 5, 5]),                                                 # no mask among masked
        _ann(12, 3, 1, [20, 10, 40, 30], _rect(20, 10, 40, 30) + [[1, 2]]),           # one bad part: kept
        _ann(13, 4, 1, [1, 1, 5, 5], _rect(1, 1, 5, 5)),                              # image file missing
        "not an annotation",
    ]
    images = _images() + [{"id": 4, "file_name": "missing.png", "height": H, "width": W},
                          {"id": 5, "file_name": "d.png"}]  # no height/width
    records, _, _, report = parse_coco_instances(*_dataset(tmp_path, {
        "images": images, "annotations": anns, "categories": [{"id": 1, "name": "box"}]}))
    assert report.skipped == {
        "annotations whose image_id is not among the images": 1,
        "annotations of images skipped for their file": 1,
        "polygons with < 3 points": 1,
        "zero/negative-size boxes": 2,
        "annotations whose category_id is not among the categories": 1,
        "malformed boxes": 1,
        "RLE masks whose size differs from the image": 1,
        "annotations without a mask in a dataset with masks": 1,
        "polygon parts with < 3 points dropped (instance kept)": 1,
        "images whose file is missing": 1,
        "malformed image entries": 1,
        "malformed annotations": 1,
    }
    by_image = {r["image_id"]: r["annotations"] for r in records}
    assert sorted(by_image) == [1, 2, 3]
    assert len(by_image[1]) == 1 and by_image[1][0]["iscrowd"] == 0
    crowds = by_image[2]
    assert [a["iscrowd"] for a in crowds] == [1, 1]
    assert all(isinstance(a["segmentation"], dict) for a in crowds)
    assert mask_util.area(crowds[0]["segmentation"]) == 100 and mask_util.area(crowds[1]["segmentation"]) == 100
    assert by_image[3][0]["segmentation"] == _rect(20, 10, 40, 30)
    assert report.annotations == 4
    assert "skipped 13" in report.summary()



def test_boxes_entirely_outside_their_image_are_skipped_and_counted(tmp_path):
    # Each would be ground truth that no detection can match in evaluation (training drops them after clipping).
    outside = [[W, 10, 5, 5], [10, H + 3, 5, 5], [-20, 10, 20, 5], [10, -9.5, 5, 9.5]]
    crossing = [[W - 5, H - 5, 20, 20], [-3, -3, 10, 10]]  # partly inside: kept, clipped as training clips them
    inside = [[0, 0, W, H]]
    anns = [_ann(i + 1, 1, 1, box) for i, box in enumerate(outside + crossing + inside)]
    records, _, _, report = parse_coco_instances(*_dataset(tmp_path, {
        "images": _images(1), "annotations": anns, "categories": [{"id": 1, "name": "box"}]}, images=("a.png",)))
    assert report.skipped == {"boxes entirely outside their image": 4}
    assert [a["bbox"] for a in records[0]["annotations"]] == [[W - 5, H - 5, 5, 5], [0, 0, 7, 7], [0, 0, W, H]]
    assert report.clipped_boxes == 2
    assert ": 1 images, 3 annotations (2 boxes clipped to their image); skipped 4: 4 boxes entirely outside their " \
        "image" in report.summary()


def test_a_test_set_must_have_as_many_categories_as_the_model_before_anything_runs(tmp_path):
    anns = [_ann(1, 1, 3, [20, 10, 40, 30], _rect(20, 10, 40, 30)), _ann(2, 2, 9, [5, 5, 10, 10], _rect(5, 5, 10, 10))]
    json_file, root = _dataset(tmp_path, {"images": _images(), "annotations": anns,
                                          "categories": [{"id": 3, "name": "a"}, {"id": 9, "name": "b"}]})
    cfg = _cfg(tmp_path, b2_classes=(json_file, root))
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ("b2_classes",)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    register_datasets(cfg)  # inference only needs the names: more model classes are labelled "class k"
    check_num_classes(cfg, ["b2_classes"])  # training may have spare classes
    # COCOEvaluator asserts on a predicted class the dataset lacks, after the whole training run.
    with pytest.raises(DatasetError) as e:
        register_datasets(cfg, decode_test_sets=True)
    assert str(e.value) == ("dataset 'b2_classes' has 2 categories but MODEL.ROI_HEADS.NUM_CLASSES is 3 (COCO "
                            "evaluation needs them equal): set it to 2")
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    register_datasets(cfg, decode_test_sets=True)


@pytest.mark.parametrize("content, expected", [
    (None, "COCO json not found"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "top level must be an object"),
    ('{"images": [], "annotations": []}', "'categories' must be a list"),
    ('{"images": [], "categories": []}', "'categories' is empty"),
    ('{"images": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}', "category id 1 appears twice"),
    ('{"images": [], "categories": [{"id": "1", "name": "a"}]}', "integer 'id'"),
])
def test_unusable_json_is_a_one_line_error_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "ann.json"
    if content is not None:
        path.write_text(content)
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=expected) as e:
        parse_coco_instances(str(path), str(tmp_path / "images"))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_image_root_names_path_and_key(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text('{"images": [], "categories": [{"id": 1, "name": "a"}]}')
    with pytest.raises(DatasetError, match=r"image root not found: .*nowhere \(set the path in DATASETS.REGISTER\)"):
        parse_coco_instances(str(path), str(tmp_path / "nowhere"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.fixed_dictionaries({
    "image_id": st.one_of(st.integers(0, 3), st.text(max_size=2), st.none()),
    "category_id": st.one_of(st.integers(0, 3), st.booleans(), st.floats()),
    "bbox": st.one_of(st.lists(st.one_of(st.floats(allow_nan=True), st.integers(-5, 50)), max_size=5), st.text(max_size=3)),
    "segmentation": st.one_of(
        st.lists(st.lists(st.floats(-10, 100), max_size=10), max_size=3),
        st.fixed_dictionaries({"size": st.lists(st.integers(0, 100), max_size=3), "counts": st.text(max_size=6)}),
        st.none(), st.integers()),
    "iscrowd": st.one_of(st.integers(0, 1), st.none()),
}), max_size=8))
def test_fuzzed_annotations_never_crash_and_kept_ones_are_valid(tmp_path_factory, anns):
    tmp = tmp_path_factory.mktemp("fuzz")
    records, classes, _, report = parse_coco_instances(*_dataset(tmp, {
        "images": _images(), "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    kept = [a for r in records for a in r["annotations"]]
    assert report.annotations == len(kept) and len(kept) + sum(report.skipped.values()) >= len(anns)
    for a in kept:
        assert a["bbox"][2] > 0 and a["bbox"][3] > 0 and 0 <= a["category_id"] < len(classes)
        if isinstance(a.get("segmentation"), list):
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])


def _cfg(tmp_path, **datasets):
    cfg = get_det_cfg()
    cfg.DATASETS.REGISTER = [[k, *v] for k, v in datasets.items()]
    return cfg


def test_registration_and_empty_image_filtering(tmp_path):
    anns = [_ann(1, 1, 4, [20, 10, 40, 30], _rect(20, 10, 40, 30)),
            _ann(2, 2, 4, [5, 5, 10, 10], _rect(5, 5, 10, 10), iscrowd=1)]
    json_file, root = _dataset(tmp_path, {"images": _images(), "annotations": anns,
                                          "categories": [{"id": 4, "name": "box"}]})
    cfg = _cfg(tmp_path, b2_reg=(json_file, root))
    cfg.DATASETS.TRAIN = ("b2_reg",)
    register_datasets(cfg)
    assert len(DatasetCatalog.get("b2_reg")) == 3  # evaluation keeps images without (non-crowd) annotations
    assert MetadataCatalog.get("b2_reg").thing_classes == ["box"]
    assert not hasattr(MetadataCatalog.get("b2_reg"), "json_file")  # evaluated against the checked records
    assert [d["image_id"] for d in get_detection_dataset_dicts("b2_reg", filter_empty=True)] == [1]
    assert len(get_detection_dataset_dicts("b2_reg", filter_empty=False)) == 3
    register_datasets(cfg)  # same paths again: no-op
    other = tmp_path / "other"
    other.mkdir()
    json2, root2 = _dataset(other, {"images": _images(1), "annotations": [], "categories": [{"id": 1, "name": "x"}]})
    register_coco_dataset("b2_reg", json2, root2)  # our own name, new paths: re-registered
    assert len(DatasetCatalog.get("b2_reg")) == 1
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 0
    with pytest.raises(DatasetError, match="has 1 categories but MODEL.ROI_HEADS.NUM_CLASSES is 0"):
        check_num_classes(cfg, ["b2_reg"])


def test_missing_and_unregistered_datasets_give_clear_errors(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, b2_missing=(str(tmp_path / "no.json"), str(tmp_path)))
    cfg.DATASETS.TRAIN = ("b2_missing",)
    with pytest.raises(DatasetError, match=r"annotation file not found: .*no.json \(set the paths of 'b2_missing' in DATASETS.REGISTER\)"):
        register_datasets(cfg)
    cfg.DATASETS.TRAIN = ("b2_unknown",)
    with pytest.raises(DatasetError, match="'b2_unknown' in DATASETS.TRAIN is not registered"):
        register_datasets(cfg)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match=r"coco_2017_val': annotation file not found: .*instances_val2017.json .*DETECTRON2_DATASETS"):
        check_dataset_files("coco_2017_val", "DATASETS.TEST")
    with pytest.raises(DatasetError, match="'coco_2017_val' is already a Detectron2 dataset"):
        register_coco_dataset("coco_2017_val", str(tmp_path / "x.json"), str(tmp_path))


def _lsj_cfg(scale):
    cfg = get_det_cfg()
    cfg.INPUT.LSJ.ENABLED = True
    cfg.INPUT.LSJ.IMAGE_SIZE = 48
    cfg.INPUT.LSJ.MIN_SCALE = cfg.INPUT.LSJ.MAX_SCALE = scale
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.MASK_ON = True
    return cfg


@pytest.mark.parametrize("scale, expected_hw", [(2.0, (48, 48)), (0.5, (16, 24))])
def test_lsj_mapper_output_size_and_recomputed_boxes(tmp_path, scale, expected_hw):
    anns = [_ann(1, 1, 1, [0, 0, W, H], _rect(20, 10, 40, 30)), _ann(2, 1, 1, [60, 40, 30, 20], _rect(60, 40, 30, 20))]
    records, *_ = parse_coco_instances(*_dataset(tmp_path, {
        "images": _images(1), "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    mapper = build_detection_mapper(_lsj_cfg(scale), is_train=True)
    torch.manual_seed(0)
    np.random.seed(0)
    for _ in range(4):
        out = mapper(records[0])
        assert tuple(out["image"].shape) == (3, *expected_hw)
        inst = out["instances"]
        assert tuple(inst.gt_masks.tensor.shape[1:]) == expected_hw
        # Boxes are recomputed from the (cropped) masks: tight, not the loose json box of annotation 1.
        assert torch.equal(inst.gt_boxes.tensor, inst.gt_masks.get_bounding_boxes().tensor)
        assert (inst.gt_boxes.tensor[:, 2] <= expected_hw[1]).all() and (inst.gt_boxes.tensor[:, 3] <= expected_hw[0]).all()
    assert records[0]["annotations"][0]["segmentation"] == _rect(20, 10, 40, 30)  # input not mutated
    if scale == 0.5:  # nothing cropped: the first mask is the 40x30 rectangle at 1/4 scale, its box tight
        w, h = (inst.gt_boxes.tensor[0, 2:] - inst.gt_boxes.tensor[0, :2]).tolist()
        assert abs(w - 10) <= 1.5 and abs(h - 7.5) <= 1.5


@pytest.mark.parametrize("flip, axis", [("horizontal", 1), ("vertical", 0), ("none", None)])
def test_random_flip_setting_flips_along_its_axis_or_never(flip, axis):
    cfg = _lsj_cfg(1.0)
    cfg.INPUT.RANDOM_FLIP = flip
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    seen = set()
    np.random.seed(0)
    for _ in range(20):
        out = T.AugmentationList(flip_augmentations(cfg))(T.AugInput(image.copy())).apply_image(image)
        seen.add(out.tobytes())
        assert np.array_equal(out, image) or (axis is not None and np.array_equal(out, np.flip(image, axis)))
    assert len(seen) == (1 if axis is None else 2)  # p = 0.5: both outcomes occur in 20 draws


@pytest.mark.skipif(__import__("importlib").util.find_spec("shapely") is not None, reason="shapely installed")
def test_lsj_with_polygon_masks_without_shapely_is_a_clear_error():
    cfg = _lsj_cfg(1.0)
    cfg.INPUT.MASK_FORMAT = "polygon"
    with pytest.raises(DatasetError, match="set INPUT.MASK_FORMAT bitmask or install shapely"):
        build_detection_mapper(cfg, is_train=True)


# ---- image files checked against the json ------------------------------------------------------------------
def _save_jpeg(path, orientation=None):
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    img = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    Image.fromarray(img).save(path, quality=90, exif=exif.tobytes())


def _dirty_dataset(tmp_path):
    """Three good PNGs plus: a JPEG cut in half (its header is intact), a text file named .jpg, a PNG declared
    50x50, an EXIF-rotated JPEG declared as it reads (kept) and one declared as stored, and a missing file."""
    root = tmp_path / "images"
    _write_images(root, ["a.png", "b.png", "c.png", "wrong.png"])
    _save_jpeg(root / "trunc.jpg")
    data = (root / "trunc.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (root / "text.jpg").write_text("not an image")
    _save_jpeg(root / "rot.jpg", orientation=6)  # rotated 90 degrees on reading: W x H -> H x W
    _save_jpeg(root / "rot_as_stored.jpg", orientation=6)
    entries = [("a.png", H, W), ("b.png", H, W), ("c.png", H, W), ("trunc.jpg", H, W), ("text.jpg", H, W),
               ("wrong.png", 50, 50), ("rot.jpg", W, H), ("rot_as_stored.jpg", H, W), ("gone.png", H, W)]
    images = [{"id": i + 1, "file_name": f, "height": h, "width": w} for i, (f, h, w) in enumerate(entries)]
    anns = [_ann(i + 1, i + 1, 1, [2, 2, 20, 20], _rect(2, 2, 20, 20)) for i in range(len(entries))]
    path = tmp_path / "dirty.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    return str(path), str(root)


def test_image_headers_are_checked_against_the_json(tmp_path):
    json_file, root = _dirty_dataset(tmp_path)
    records, _, _, report = parse_coco_instances(json_file, root)
    kept = [os.path.basename(r["file_name"]) for r in records]
    assert kept == ["a.png", "b.png", "c.png", "trunc.jpg", "rot.jpg"]  # the truncation is not in the header
    assert report.skipped == {UNREADABLE_IMAGE: 1, WRONG_SIZE_IMAGE: 2, MISSING_IMAGE: 1,
                              "annotations of images skipped for their file": 4}
    assert report.images == 5 and report.annotations == 5
    p = lambda name: os.path.join(root, name)  # noqa: E731
    assert report.bad_files == [
        f"{p('text.jpg')}: not a recognized image format",
        f"{p('wrong.png')}: the file is 96x64 (width x height, EXIF orientation applied) but the json declares 50x50",
        f"{p('rot_as_stored.jpg')}: the file is 64x96 (width x height, EXIF orientation applied) but the json "
        "declares 96x64",
        f"{p('gone.png')}: file not found",
    ]
    assert f"first bad files: {report.bad_files[0]} | {report.bad_files[1]} | {report.bad_files[2]} | and 1 more" \
        in report.summary()
    # What Detectron2's mapper reads agrees with the check: the kept sizes are the decoded ones (EXIF applied)...
    for r in records:
        if not r["file_name"].endswith("trunc.jpg"):
            assert read_image(r["file_name"], "RGB").shape[:2] == (r["height"], r["width"])
    # ... and the truncated JPEG fails only when decoded, which decode=True (test sets) does up front.
    with pytest.raises(OSError, match="truncated"):
        read_image(p("trunc.jpg"), "RGB")
    records, _, _, report = parse_coco_instances(json_file, root, decode=True)
    assert len(records) == 4 and report.skipped[UNREADABLE_IMAGE] == 2
    assert report.bad_files[0].startswith(f"{p('trunc.jpg')}: cannot decode image (OSError: image file is truncated")


def test_bad_image_budget_and_strict_test_sets(tmp_path):
    json_file, root = _dirty_dataset(tmp_path)
    *_, report = parse_coco_instances(json_file, root)  # 4 bad of 9
    check_bad_images(report, "dirty", 4 / 9)
    with pytest.raises(DatasetError) as e:
        check_bad_images(report, "dirty", 0.4)
    msg = str(e.value)
    assert msg.startswith(f"dataset 'dirty': 4 of 9 images in {json_file} are missing, unreadable or not the size "
                          "the json declares, more than DATASETS.MAX_BAD_FRACTION=0.4 allows (3): ")
    assert os.path.join(root, "text.jpg") in msg and "and 1 more" in msg and "\n" not in msg
    with pytest.raises(DatasetError, match=r"^dataset 'dirty' \(DATASETS.TEST\): 4 of 9 images .* a test set must be "
                                           "complete, skipping images would change the AP: "):
        check_bad_images(report, "dirty", 1.0, test=True)


def test_registered_sets_skip_or_fail_per_max_bad_fraction_and_test_sets_decode(tmp_path):
    json_file, root = _dirty_dataset(tmp_path)
    cfg = _cfg(tmp_path, b2_dirty=(json_file, root))
    cfg.DATASETS.TRAIN = ("b2_dirty",)
    cfg.DATASETS.MAX_BAD_FRACTION = 0.5
    register_datasets(cfg)
    assert len(DatasetCatalog.get("b2_dirty")) == 5
    cfg.DATASETS.MAX_BAD_FRACTION = 0.01
    register_datasets(cfg)  # new budget: re-registered, and now loading fails
    with pytest.raises(DatasetError, match=r"dataset 'b2_dirty': 4 of 9 images .* DATASETS.MAX_BAD_FRACTION=0.01 allows \(0\)"):
        DatasetCatalog.get("b2_dirty")
    cfg.DATASETS.MAX_BAD_FRACTION = 0.5
    cfg.DATASETS.TEST = ("b2_dirty",)
    register_datasets(cfg)  # inference and data pictures do not decode the test set
    with pytest.raises(DatasetError) as e:  # training and evaluation runs do, before anything else
        register_datasets(cfg, decode_test_sets=True)
    assert str(e.value).startswith("dataset 'b2_dirty' (DATASETS.TEST): 5 of 9 images")
    assert "trunc.jpg: cannot decode image" in str(e.value)


def test_training_mapper_skips_an_image_that_fails_to_decode(tmp_path):
    json_file, root = _dirty_dataset(tmp_path)
    records, *_ = parse_coco_instances(json_file, root)
    good, trunc = records[0], records[3]
    assert trunc["file_name"].endswith("trunc.jpg")
    cfg = _lsj_cfg(1.0)
    mapper = build_detection_mapper(cfg, is_train=True)
    assert mapper(trunc) is None
    resized = {**good, "height": H + 1}  # a size the header check did not see: Detectron2's SizeMismatchError
    assert mapper(resized) is None
    out = mapper(good)
    first, second = out[SKIPPED_IMAGES_KEY]
    assert first.startswith(f"{trunc['file_name']}: cannot decode image (OSError: image file is truncated")
    assert second == (f"{good['file_name']}: the file is {W}x{H} (width x height, EXIF orientation applied) but the "
                      f"json declares {W}x{H + 1}")
    assert tuple(out["image"].shape) == (3, 32, 48) and len(out["instances"]) == 1
    assert SKIPPED_IMAGES_KEY not in mapper(good)  # each skip is reported once
    # A failure that the image does not explain is not hidden.
    broken = {**good, "annotations": [{**good["annotations"][0], "bbox_mode": "not a mode"}]}
    with pytest.raises(Exception) as e:
        mapper(broken)
    assert not isinstance(e.value, DatasetError)
    # Evaluation never skips (it would change the AP): the decode error propagates, naming the file.
    with pytest.raises(ImageLoadError, match=f"^{re.escape(trunc['file_name'])}: cannot decode image .*truncated"):
        build_detection_mapper(cfg, is_train=False)(trunc)


def test_detectron2_registered_coco_sets_get_the_same_checks(tmp_path):
    from detectron2.data.datasets import register_coco_instances

    json_file, root = _dirty_dataset(tmp_path)
    register_coco_instances("b2_d2_dirty", {}, json_file, root)  # how Detectron2 registers coco_2017_train & co.
    cfg = get_det_cfg()
    cfg.DATASETS.TRAIN = ("b2_d2_dirty",)
    cfg.DATASETS.MAX_BAD_FRACTION = 0.5
    register_datasets(cfg)
    records = DatasetCatalog.get("b2_d2_dirty")
    assert [os.path.basename(r["file_name"]) for r in records] == ["a.png", "b.png", "c.png", "trunc.jpg", "rot.jpg"]
    cfg.DATASETS.MAX_BAD_FRACTION = 0.1
    register_datasets(cfg)
    with pytest.raises(DatasetError, match=r"^dataset 'b2_d2_dirty': 4 of 9 images in .*dirty.json are missing"):
        DatasetCatalog.get("b2_d2_dirty")
    cfg.DATASETS.TEST = ("b2_d2_dirty",)
    with pytest.raises(DatasetError, match=r"^dataset 'b2_d2_dirty' \(DATASETS.TEST\): 5 of 9 images .*trunc.jpg: "
                                           "cannot decode image"):
        register_datasets(cfg, decode_test_sets=True)


def _rle_ann(i, image_id, counts, **kw):
    return _ann(i, image_id, 1, [0, 0, 10, 10], {"size": [H, W], "counts": counts}, **kw)


def test_rle_masks_whose_runs_do_not_cover_the_image_exactly_are_skipped(tmp_path):
    # pycocotools decodes runs short of the image into uninitialized memory and fails on runs past its end.
    mask = np.zeros((H, W), np.uint8)
    mask[5:20, 10:30] = 1
    good = mask_util.encode(np.asfortranarray(mask))["counts"].decode()
    short = mask_util.frPyObjects({"size": [H, W], "counts": [10 * H, 30 * H]}, H, W)["counts"].decode()
    anns = [
        _rle_ann(1, 1, good),                               # kept
        _rle_ann(2, 1, [10 * H, W * H - 10 * H]),           # uncompressed, exact: kept
        _rle_ann(3, 1, [10 * H, 30 * H]),                   # uncompressed, short of the image
        _rle_ann(4, 1, [10 * H, 300 * H]),                  # uncompressed, past its end
        _rle_ann(5, 2, short),                              # compressed, short of the image
        _rle_ann(6, 2, [10 * H, -5, W * H - 10 * H + 5]),   # a negative run
        _rle_ann(7, 2, good[:-1] + "\x7f"),                # not a run-length character
        _rle_ann(8, 2, "0" * 3 + "a"),                      # ends inside a run length
    ]
    records, *_, report = parse_coco_instances(*_dataset(tmp_path, {
        "images": _images(2), "annotations": anns, "categories": [{"id": 1, "name": "box"}]}))
    assert report.skipped == {"malformed RLE masks": 6}
    kept = records[0]["annotations"]
    assert [mask_util.area(a["segmentation"]) for a in kept] == [15 * 20, (W - 10) * H]
    assert np.array_equal(mask_util.decode(kept[0]["segmentation"]), mask)
    assert report.rle_instances == 2


def _masks_cfg(tmp_path, anns, name, **cfg_keys):
    json_file, root = _dataset(tmp_path, {"images": _images(), "annotations": anns,
                                          "categories": [{"id": 1, "name": "box"}]})
    cfg = _cfg(tmp_path, **{name: (json_file, root)})
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (name,), ()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    for k, v in cfg_keys.items():
        cfg.merge_from_list([k.replace("__", "."), v])
    register_datasets(cfg)
    DatasetCatalog.get(name)  # what building the train loader does first
    return cfg, json_file


def test_a_box_only_json_needs_mask_on_off_before_training(tmp_path):
    anns = [_ann(1, 1, 1, [20, 10, 40, 30], []), _ann(2, 2, 1, [5, 5, 10, 10], [])]  # box-only exporters write []
    cfg, json_file = _masks_cfg(tmp_path, anns, "b2_boxes_only", MODEL__MASK_ON=True)
    with pytest.raises(DatasetError) as e:
        check_training_sets(cfg)
    assert str(e.value) == (f"dataset 'b2_boxes_only' (DATASETS.TRAIN): {json_file} has no segmentation masks but "
                            "MODEL.MASK_ON is True: set MODEL.MASK_ON False to train boxes only, or add masks")
    cfg.MODEL.MASK_ON = False
    check_training_sets(cfg)


def test_single_object_rle_masks_need_the_bitmask_format(tmp_path):
    mask = np.zeros((H, W), np.uint8)
    mask[10:40, 20:60] = 1
    rle = mask_util.encode(np.asfortranarray(mask))["counts"].decode()
    anns = [_rle_ann(1, 1, rle), _ann(2, 2, 1, [5, 5, 10, 10], _rect(5, 5, 10, 10)),
            _rle_ann(3, 3, rle, iscrowd=1)]  # crowd RLEs never reach the mask head
    cfg, json_file = _masks_cfg(tmp_path, anns, "b2_rle", MODEL__MASK_ON=True, INPUT__MASK_FORMAT="polygon")
    with pytest.raises(DatasetError) as e:
        check_training_sets(cfg)
    assert str(e.value) == (f"dataset 'b2_rle' (DATASETS.TRAIN): 1 non-crowd instances in {json_file} have RLE "
                            "masks, which INPUT.MASK_FORMAT polygon cannot hold: set INPUT.MASK_FORMAT bitmask")
    cfg.INPUT.MASK_FORMAT = "bitmask"
    check_training_sets(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (H,), 1000  # the image as it is
    out = build_detection_mapper(cfg, is_train=True)(DatasetCatalog.get("b2_rle")[0])
    assert out["instances"].gt_masks.tensor[0].sum() == 30 * 40


def test_a_test_set_must_name_the_training_categories_in_the_same_order(tmp_path):
    anns = [_ann(1, 1, 1, [20, 10, 40, 30], _rect(20, 10, 40, 30)), _ann(2, 2, 2, [5, 5, 10, 10], _rect(5, 5, 10, 10))]
    sets = {}
    for name, cats in (("b2_cats_train", ["cat", "dog"]), ("b2_cats_test", ["dog", "cat"])):
        (tmp_path / name).mkdir()
        sets[name] = _dataset(tmp_path / name, {"images": _images(), "annotations": anns,
                                                "categories": [{"id": i + 1, "name": c} for i, c in enumerate(cats)]})
    cfg = _cfg(tmp_path, **sets)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = ("b2_cats_train",), ("b2_cats_test",)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    register_datasets(cfg, decode_test_sets=True)  # equal counts: this check alone cannot see it
    DatasetCatalog.get("b2_cats_train")
    with pytest.raises(DatasetError) as e:
        check_training_sets(cfg)
    assert str(e.value) == ("dataset 'b2_cats_test' (DATASETS.TEST) has the categories ['dog', 'cat'] in id order but "
                            "DATASETS.TRAIN has ['cat', 'dog']: the model's class k would be scored as the test set's "
                            "class k; give both jsons the same category ids and names")
    cfg.DATASETS.TEST = ("b2_cats_train",)
    check_training_sets(cfg)


def test_the_mappers_decode_16_bit_and_transparent_images_as_load_image_does(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    ramp = (np.arange(H * W, dtype=np.uint32).reshape(H, W) * 65535 // (H * W - 1)).astype(np.uint16)
    Image.fromarray(ramp).save(root / "a.png")  # 16-bit grayscale ("I;16")
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = 255  # white stored under fully transparent pixels
    rgba[10:40, 20:60] = (0, 200, 0, 255)
    Image.fromarray(rgba, "RGBA").save(root / "b.png")
    record = {"file_name": str(root / "a.png"), "height": H, "width": W, "image_id": 1, "annotations": []}
    cfg = get_det_cfg()
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = H, 1000
    test_mapper = build_detection_mapper(cfg, is_train=False)
    gray = test_mapper(record)["image"]
    # Detectron2's read_image clips the 16-bit values: almost every pixel white.
    assert (read_image(record["file_name"], "RGB") == 255).mean() > 0.99
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert torch.equal(gray, torch.as_tensor(expected)[None].expand(3, H, W))
    colour = test_mapper({**record, "file_name": str(root / "b.png")})["image"]
    assert colour[:, 0, 0].tolist() == [0, 0, 0] and colour[:, 20, 30].tolist() == [0, 200, 0]
    cfg.INPUT.FORMAT = "BGR"
    assert build_detection_mapper(cfg, is_train=False)({**record, "file_name": str(root / "b.png")})["image"][:, 20, 30].tolist() == [0, 200, 0]


def test_the_training_mapper_maps_as_detectron2s_on_8_bit_images_label_maps_included(tmp_path):
    # The shipped configs' numbers were measured with Detectron2's own mapping: it must stay the same bits.
    anns = [_ann(1, 1, 1, [20, 10, 40, 30], _rect(20, 10, 40, 30)), _ann(2, 1, 1, [60, 40, 30, 20], _rect(60, 40, 30, 20))]
    records, *_ = parse_coco_instances(*_dataset(tmp_path, {
        "images": _images(1), "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    labels = np.zeros((H, W), np.uint8)
    labels[10:40, 20:60] = 3
    Image.fromarray(labels).save(tmp_path / "labels.png")
    for fmt, mask_format in (("RGB", "bitmask"), ("BGR", "polygon")):
        cfg = _lsj_cfg(0.8)
        cfg.INPUT.LSJ.MAX_SCALE = 1.25
        cfg.INPUT.FORMAT, cfg.INPUT.MASK_FORMAT = fmt, mask_format
        if mask_format == "polygon":
            cfg.INPUT.LSJ.ENABLED = False
        mapper = build_detection_mapper(cfg, is_train=True)
        for seed, record in enumerate([records[0], {**records[0], "sem_seg_file_name": str(tmp_path / "labels.png")}]):
            torch.manual_seed(seed)
            np.random.seed(seed)
            ours = mapper(record)
            torch.manual_seed(seed)
            np.random.seed(seed)
            theirs = DatasetMapper.__call__(mapper, record if mask_format == "polygon" else {
                **record, "annotations": [_polygons_to_rle(a, H, W) for a in record["annotations"]]})
            assert ours.keys() == theirs.keys()
            assert torch.equal(ours["image"], theirs["image"])
            assert torch.equal(ours["instances"].gt_boxes.tensor, theirs["instances"].gt_boxes.tensor)
            if "sem_seg" in theirs:
                assert torch.equal(ours["sem_seg"], theirs["sem_seg"]) and ours["sem_seg"].max() == 3


# ---- image entries, border boxes, crowd flags, box-only models, class lists, budgets ---------------------------
def test_malformed_and_repeated_image_entries_count_as_bad_images(tmp_path):
    images = [
        {"id": 1, "file_name": "a.png", "height": float(H), "width": float(W)},  # pandas-style 64.0: accepted
        {"id": "2", "file_name": "b.png", "height": H, "width": W},            # string id
        {"id": 3, "file_name": "c.png", "height": H},                          # no width
        {"id": 4, "file_name": "b.png", "height": H, "width": W},              # id 4 twice: whose objects?
        {"id": 4, "file_name": "c.png", "height": H, "width": W},
        "not an entry",
    ]
    anns = [_ann(i, image_id, 1, [20, 10, 40, 30]) for i, image_id in enumerate([1, "2", 3, 4, 4], 1)]
    json_file, root = _dataset(tmp_path, {"images": images, "annotations": anns,
                                          "categories": [{"id": 1, "name": "box"}]})
    records, _, _, report = parse_coco_instances(json_file, root)
    assert [(r["image_id"], r["height"], r["width"], len(r["annotations"])) for r in records] == [(1, H, W, 1)]
    assert type(records[0]["height"]) is int and type(records[0]["width"]) is int
    assert report.skipped == {"malformed image entries": 3, "image entries with a repeated id": 2,
                              "annotations of skipped image entries": 3,
                              "annotations whose image_id is not among the images": 1}
    assert report.bad_files == [
        f"{json_file}: image entry #2: 'id' must be an integer, got '2'",
        f"{json_file}: image entry #3: 'width' is missing",
        f"{json_file}: image entry #4: id 4 is also the id of image entry #5 (all skipped)",
        f"{json_file}: image entry #5: id 4 is also the id of image entry #4 (all skipped)",
        f"{json_file}: image entry #6: expected an object with 'id', 'file_name', 'height' and 'width', got "
        "'not an entry'",
    ]
    # Training: within the bad-image budget (5 of 6), with the entries named.
    check_bad_images(report, "b2_entries", 5 / 6)
    with pytest.raises(DatasetError) as e:
        check_bad_images(report, "b2_entries", 0.5)
    assert str(e.value).startswith(
        f"dataset 'b2_entries': 5 of 6 images in {json_file} have a malformed or repeated-id json entry or a file "
        "that is missing, unreadable or not the size the json declares, more than DATASETS.MAX_BAD_FRACTION=0.5 "
        f"allows (3): {json_file}: image entry #2: 'id' must be an integer")
    # A test set must be complete: refused before training, not evaluated on the one image left.
    cfg = _cfg(tmp_path, b2_entries=(json_file, root))
    cfg.DATASETS.TEST = ("b2_entries",)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    with pytest.raises(DatasetError) as e:
        register_datasets(cfg, decode_test_sets=True, training=False)
    assert str(e.value).startswith(
        f"dataset 'b2_entries' (DATASETS.TEST): 5 of 6 images in {json_file} have a malformed or repeated-id json "
        "entry or a file that is missing, unreadable or not the size the json declares; a test set must be complete, "
        f"skipping images would change the AP: {json_file}: image entry #2: 'id' must be an integer, got '2' | ")


def test_a_test_set_of_string_ids_is_refused_before_training(tmp_path):
    images = [{"id": str(i), "file_name": "abc"[i - 1] + ".png", "height": H, "width": W} for i in (1, 2, 3)]
    json_file, root = _dataset(tmp_path, {"images": images, "annotations": [_ann(1, "1", 1, [20, 10, 40, 30])],
                                          "categories": [{"id": 1, "name": "box"}]})
    cfg = _cfg(tmp_path, b2_str_ids=(json_file, root))
    cfg.DATASETS.TEST = ("b2_str_ids",)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    with pytest.raises(DatasetError, match=r"^dataset 'b2_str_ids' \(DATASETS.TEST\): 3 of 3 images in .* image entry "
                                           r"#1: 'id' must be an integer, got '1' \| "):
        register_datasets(cfg, decode_test_sets=True, training=False)


def test_border_crossing_ground_truth_matches_a_detection_of_the_visible_object(tmp_path):
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    json_file, root = _dataset(tmp_path, {"images": _images(1), "annotations": [_ann(1, 1, 1, [-30, -25, 60, 50])],
                                          "categories": [{"id": 1, "name": "box"}]}, images=("a.png",))
    register_coco_dataset("b2_border", json_file, root)
    record = DatasetCatalog.get("b2_border")[0]
    assert record["annotations"][0]["bbox"] == [0, 0, 30, 25]
    ev = COCOEvaluator("b2_border", tasks=("bbox",), distributed=False, output_dir=str(tmp_path / "eval"),
                       use_fast_impl=False, allow_cached_coco=False)
    ev.reset()
    inst = Instances((H, W), pred_boxes=Boxes(torch.tensor([[0.0, 0.0, 30.0, 25.0]])), scores=torch.tensor([0.9]),
                     pred_classes=torch.tensor([0]))
    ev.process([{"image_id": 1, "file_name": record["file_name"], "height": H, "width": W}], [{"instances": inst}])
    assert ev.evaluate()["bbox"]["AP"] == pytest.approx(100.0)


@pytest.mark.parametrize("iscrowd, kept", [(0, 0), (1, 1), (False, 0), (True, 1), (None, None), ("0", None),
                                           ("false", None), (0.0, None), (2, None)])
def test_iscrowd_must_be_0_1_or_a_boolean(tmp_path, iscrowd, kept):
    anns = [_ann(1, 1, 1, [20, 10, 40, 30], _rect(20, 10, 40, 30), iscrowd=iscrowd)]
    records, *_, report = parse_coco_instances(*_dataset(tmp_path, {
        "images": _images(1), "annotations": anns, "categories": [{"id": 1, "name": "box"}]}, images=("a.png",)))
    if kept is None:  # "0" used to become a crowd region, silently
        assert records[0]["annotations"] == []
        assert report.skipped == {"malformed iscrowd (expected 0, 1, true or false)": 1}
    else:
        assert [a["iscrowd"] for a in records[0]["annotations"]] == [kept] and not report.skipped


def test_a_flat_polygon_list_is_counted_as_such(tmp_path):
    anns = [_ann(1, 1, 1, [20, 10, 40, 30], _rect(20, 10, 40, 30)[0]), _ann(2, 1, 1, [2, 2, 9, 9], _rect(2, 2, 9, 9))]
    records, *_, report = parse_coco_instances(*_dataset(tmp_path, {
        "images": _images(1), "annotations": anns, "categories": [{"id": 1, "name": "box"}]}, images=("a.png",)))
    assert report.skipped == {"segmentation is a flat list, expected a list of polygons": 1}
    assert [a["bbox"] for a in records[0]["annotations"]] == [[2, 2, 9, 9]]


def test_a_box_only_model_keeps_objects_without_masks(tmp_path):
    anns = [_ann(1, 1, 1, [20, 10, 40, 30], _rect(20, 10, 40, 30)), _ann(2, 2, 1, [20, 10, 40, 30], []),
            _ann(3, 3, 1, [20, 10, 40, 30])]
    cfg, _ = _masks_cfg(tmp_path, anns, "b2_mixed_masks", MODEL__MASK_ON=False)
    records = DatasetCatalog.get("b2_mixed_masks")
    assert [len(r["annotations"]) for r in records] == [1, 1, 1]
    assert not any("segmentation" in a for r in records for a in r["annotations"])
    check_training_sets(cfg)
    cfg.MODEL.MASK_ON = True
    register_datasets(cfg)  # the mask setting is part of the registration
    assert [len(r["annotations"]) for r in DatasetCatalog.get("b2_mixed_masks")] == [1, 0, 0]


def test_training_sets_must_name_the_same_categories(tmp_path):
    anns = [_ann(1, 1, 1, [20, 10, 40, 30]), _ann(2, 2, 2, [5, 5, 10, 10])]
    sets = {}
    for name, cats in (("b2_train_a", ["cat", "dog"]), ("b2_train_b", ["dog", "cat"]), ("b2_train_c", ["cat", "dog"])):
        (tmp_path / name).mkdir()
        sets[name] = _dataset(tmp_path / name, {"images": _images(), "annotations": anns,
                                                "categories": [{"id": i + 1, "name": c} for i, c in enumerate(cats)]})
    cfg = _cfg(tmp_path, **sets)
    cfg.DATASETS.TRAIN = ("b2_train_a", "b2_train_c")
    register_datasets(cfg)
    assert len(get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)) == 6
    cfg.DATASETS.TRAIN = ("b2_train_a", "b2_train_b")
    with pytest.raises(DatasetError) as e:  # Detectron2 would raise a multi-line ValueError building the loader
        register_datasets(cfg)
    assert str(e.value) == ("dataset 'b2_train_b' (DATASETS.TRAIN) has the categories ['dog', 'cat'] in id order but "
                            "'b2_train_a' has ['cat', 'dog']: Detectron2 trains all DATASETS.TRAIN sets as one class "
                            "list; give their jsons the same category ids and names")
    register_datasets(cfg, training=False)  # --eval-only does not train on them


@pytest.mark.parametrize("fraction, bad", [(0.29, 29), (0.57, 57), (0.07, 7), (0.01, 1)])
def test_max_bad_fraction_allows_exactly_its_share(fraction, bad):
    report = CocoLoadReport("x.json", images=100 - bad, bad_files=[f"f{i}.png: file not found" for i in range(bad)])
    check_bad_images(report, "b2_frac", fraction)  # int(0.29 * 100) was 28
    over = CocoLoadReport("x.json", images=99 - bad, bad_files=report.bad_files + ["g.png: file not found"])
    with pytest.raises(DatasetError, match=rf"{bad + 1} of 100 images .*MAX_BAD_FRACTION={fraction} allows \({bad}\)"):
        check_bad_images(over, "b2_frac", fraction)
    _LOAD_REPORTS["b2_frac"] = report
    assert remaining_bad_images(["b2_frac"], fraction) == 0


# ---- the decode check decodes as the mapper does ------------------------------------------------------------
def _damaged_exif_jpeg(path):
    """A JPEG stored W x H with orientation 6 whose EXIF block has a text value under a rational tag: PIL's
    exif_transpose fails rewriting it (TypeError), while Detectron2's read_image and the header rotate the image."""
    exif = Image.Exif()
    exif[0x0112], exif[0x0110] = 6, "Model"
    img = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    assert data.count(b"\x01\x10\x00\x02") == 1  # the Model entry (big-endian: tag, type ASCII)
    path.write_bytes(data.replace(b"\x01\x10\x00\x02", b"\x01\x1b\x00\x02"))  # now YResolution, a rational


def test_an_image_with_a_damaged_exif_block_is_checked_and_mapped_as_displayed(tmp_path):
    p = tmp_path / "images" / "damaged_exif.jpg"
    p.parent.mkdir()
    _damaged_exif_jpeg(p)
    with pytest.raises(TypeError):
        ImageOps.exif_transpose(Image.open(p))
    assert read_image(str(p)).shape[:2] == (W, H)  # Detectron2 turns it
    assert image_file_problem(str(p), W, H, decode=True) is None
    record = {"file_name": str(p), "height": W, "width": H, "image_id": 1,
              "annotations": [{"bbox": [1, 1, 20, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}]}
    cfg = _lsj_cfg(1.0)
    cfg.MODEL.MASK_ON = False
    out = build_detection_mapper(cfg, is_train=True)(record)  # was a SizeMismatchError out of the training loop
    assert out is not None and SKIPPED_IMAGES_KEY not in out
    cfg.INPUT.MIN_SIZE_TEST = 0  # no resize
    assert tuple(build_detection_mapper(cfg, is_train=False)(record)["image"].shape) == (3, W, H)


def test_an_image_beyond_the_loaders_pixel_limit_is_refused_up_front_and_skipped_in_training(tmp_path):
    # 143 Mpixel: under PIL's own 179 M limit (the header check passes) but over load_image's 128 M one.
    big_w, big_h = 13000, 11000
    root = tmp_path / "images"
    _write_images(root, ["a.png"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.new("1", (big_w, big_h)).save(root / "big.png")  # 17 kB on disk
    images = [{"id": 1, "file_name": "a.png", "height": H, "width": W},
              {"id": 2, "file_name": "big.png", "height": big_h, "width": big_w}]
    json_file = tmp_path / "big.json"
    json_file.write_text(json.dumps({"images": images, "annotations": [_ann(1, 1, 1, [2, 2, 9, 9]),
                                                                       _ann(2, 2, 1, [9, 9, 90, 90])],
                                     "categories": [{"id": 1, "name": "box"}]}))
    cfg = _cfg(tmp_path, b2_big=(str(json_file), str(root)))
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = ("b2_big",)
    cfg.DATASETS.MAX_BAD_FRACTION, cfg.MODEL.MASK_ON, cfg.MODEL.ROI_HEADS.NUM_CLASSES = 0.5, False, 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        register_datasets(cfg)
        good, big = DatasetCatalog.get("b2_big")  # the header check passes it
        with pytest.raises(DatasetError) as e:
            register_datasets(cfg, decode_test_sets=True)
        problem = (f"{root / 'big.png'}: 13000x11000 = 143000000 pixels exceeds the limit of {DEFAULT_MAX_PIXELS} "
                   "(only JPEGs can be decoded downscaled, at most 1/8); raise the limit or downscale the file")
        assert str(e.value).startswith("dataset 'b2_big' (DATASETS.TEST): 1 of 2 images") and \
            str(e.value).endswith(f"the AP: {problem}")
        mapper = build_detection_mapper(cfg, is_train=True)
        assert mapper(big) is None  # was the loader's ImageLoadError out of the training loop
        assert mapper(good)[SKIPPED_IMAGES_KEY] == [problem]


# ---- images without instances under LSJ, read-only pixels --------------------------------------------------------
@pytest.mark.parametrize("mask_format", ["bitmask", "polygon"])
def test_the_lsj_mapper_maps_an_image_without_instances_to_empty_masks(tmp_path, mask_format):
    # DATALOADER.FILTER_EMPTY_ANNOTATIONS False keeps such images; LSJ recomputes boxes from gt_masks, which
    # Detectron2 leaves unset without a first instance: AttributeError "Cannot find field 'gt_masks'".
    anns = [_ann(1, 1, 1, [20, 10, 40, 30], _rect(20, 10, 40, 30)),
            _ann(2, 3, 1, [5, 5, 10, 10], _rect(5, 5, 10, 10), iscrowd=1)]  # image 3: a crowd region only
    records, *_ = parse_coco_instances(*_dataset(tmp_path, {
        "images": _images(3), "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    cfg = _lsj_cfg(1.0)
    cfg.INPUT.MASK_FORMAT = mask_format
    cfg.INPUT.LSJ.ENABLED = mask_format == "bitmask"  # LSJ crops polygons with shapely, not installed here
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (32,), 48  # the same size without LSJ
    mapper = build_detection_mapper(cfg, is_train=True)
    assert mapper.recompute_boxes == (mask_format == "bitmask")
    for record in records[1:]:
        out = mapper(record)
        inst = out["instances"]
        masks = inst.gt_masks.tensor if mask_format == "bitmask" else inst.gt_masks.polygons
        assert len(inst) == 0 and len(masks) == 0 and inst.gt_boxes.tensor.shape == (0, 4)
        assert inst.image_size == (32, 48) == tuple(out["image"].shape[1:])  # 64x96 at most 48 px
        if mask_format == "bitmask":
            assert tuple(inst.gt_masks.tensor.shape) == (0, 32, 48)
    assert len(mapper(records[0])["instances"]) == 1


def test_a_training_step_through_the_loader_with_an_image_without_annotations(tmp_path):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from mae_det.config.detection import load_det_cfg
    from mae_det.engine.det_trainer import Trainer
    from tests.tools.inference_data import make_tiny_coco, write_tiny_config

    json_path, image_dir = make_tiny_coco(tmp_path, num_images=2)
    data = json.loads(json_path.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 1]  # img_1.png: no annotation
    json_path.write_text(json.dumps(data))
    cfg = load_det_cfg(str(write_tiny_config(tmp_path, json_path, image_dir)), [
        "DATASETS.REGISTER", f"[['b2_noann', '{json_path}', '{image_dir}']]", "DATASETS.TRAIN", "('b2_noann',)",
        "DATASETS.TEST", "()", "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False", "INPUT.LSJ.IMAGE_SIZE", "64",
        "MODEL.VIT.INPUT_SIZE", "64", "MODEL.VIT.PRETRAIN_IMG_SIZE", "64"], training=False)
    register_datasets(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batches = iter(Trainer.build_train_loader(cfg))
    for _ in range(4):  # until a batch holds the image without annotations
        batch = next(batches)
        if any(len(s["instances"]) == 0 for s in batch):
            break
    empty = next(s for s in batch if len(s["instances"]) == 0)
    assert empty["file_name"].endswith("img_1.png") and empty["instances"].gt_masks.tensor.shape[0] == 0
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and {"loss_cls", "loss_box_reg", "loss_mask"} <= losses.keys()


def test_the_mapper_never_hands_torch_read_only_pixels(tmp_path, monkeypatch):
    # "L": the (H, W, 1) image transposes to a contiguous (1, H, W) view of a read-only PIL buffer, which
    # ascontiguousarray passed on uncopied (torch warns once, and that warning was filtered as Detectron2's).
    records, *_ = parse_coco_instances(*_dataset(tmp_path, {
        "images": _images(1), "annotations": [_ann(1, 1, 1, [20, 10, 40, 30], _rect(20, 10, 40, 30))],
        "categories": [{"id": 1, "name": "a"}]}))
    read_only = []
    as_tensor = torch.as_tensor

    def spy(data, *args, **kwargs):
        if isinstance(data, np.ndarray) and not data.flags.writeable:
            read_only.append(data.shape)
        return as_tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "as_tensor", spy)
    for fmt in ("L", "RGB", "BGR"):
        cfg = _lsj_cfg(1.0)
        cfg.INPUT.FORMAT = fmt
        for is_train in (True, False):
            out = build_detection_mapper(cfg, is_train=is_train)(records[0])
            assert out["image"].shape[0] == (1 if fmt == "L" else 3)
    assert read_only == []
