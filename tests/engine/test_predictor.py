"""mae_det.engine.predictor on a tiny randomly initialized ViT Mask R-CNN and a generated COCO-format dataset."""
import hashlib
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from PIL import Image
from pycocotools.coco import COCO

from mae_det.checkpoint.io import CheckpointError
from mae_det.config.pretrain import ConfigError
from mae_det.data.detection import DatasetError
from mae_det.data.images import load_image
from mae_det.engine.det_trainer import build_checkpointer
from mae_det.engine.predictor import (
    UNNAMED, Predictor, check_output_dir, class_color, dataset_metadata, draw_detections, draw_instances,
    expand_inputs, ground_truth_instances, instances_to_coco_results, load_predict_cfg, predict_to_dir,
    side_by_side_detections,
)
from mae_det.modeling.mae import MaskedAutoencoderViT
from tests.data.test_images import _exif_after_pixels_png, _gray_jpeg_of_side
from tests.tools.inference_data import CATEGORIES, ROOT, make_tiny_coco, save_untrained_detector, write_tiny_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_coco")
    json_path, image_dir = make_tiny_coco(root)
    return root, image_dir, write_tiny_config(root, json_path, image_dir)


@pytest.fixture(scope="module")
def weights(tiny):
    return ["MODEL.WEIGHTS", str(save_untrained_detector(tiny[2]))]


@pytest.fixture(scope="module")
def predictor(tiny, weights):
    return Predictor(load_predict_cfg(str(tiny[2]), weights, confidence_threshold=0.0))


def test_prediction_refuses_missing_or_partial_weights(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"^prediction needs trained weights: set MODEL.WEIGHTS .*--opts"):
        Predictor(load_predict_cfg(str(tiny[2])))  # pictures of a random model would look like a result
    encoder = tmp_path / "encoder.pth"
    mae = MaskedAutoencoderViT(img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                               decoder_depth=1, decoder_num_heads=2)
    torch.save({"model": mae.state_dict()}, encoder)
    with pytest.raises(CheckpointError) as e:  # the pretrained encoder of a training config: heads stay random
        Predictor(load_predict_cfg(str(tiny[2]), ["MODEL.WEIGHTS", str(encoder)]))
    assert str(e.value).startswith(f"{encoder} (")
    assert "untrained (e.g. " in str(e.value) and "prediction needs a trained detection checkpoint" in str(e.value)


def test_expand_inputs_folders_globs_and_missing(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "empty").mkdir()
    for name in ("x.png", "y.JPG", "notes.txt"):
        (tmp_path / "a" / name).write_bytes(b"1")
    files, empty = expand_inputs([
        str(tmp_path / "a"), str(tmp_path / "a" / "*.png"), str(tmp_path / "missing.png"), str(tmp_path / "empty"),
        str(tmp_path / "*.gif"),
    ])
    # Folder: image extensions only, sorted; the glob's x.png is a duplicate; an explicit missing path is kept.
    assert [p.name for p in files] == ["x.png", "y.JPG", "missing.png"]
    assert empty == [(str(tmp_path / "empty"), "folder holds no image files"),
                     (str(tmp_path / "*.gif"), "pattern matched no files")]


def test_expand_inputs_takes_existing_files_with_glob_characters_and_one_file_once(tmp_path, monkeypatch):
    for name in ("img[1].png", "img1.png", "b.png"):
        (tmp_path / name).write_bytes(b"1")
    monkeypatch.chdir(tmp_path)
    # "img[1].png" names a file: it was read as a pattern (matching img1.png, or nothing), the file never taken.
    # b.png given relative and absolute was predicted twice.
    files, empty = expand_inputs(["img[1].png", "b.png", str(tmp_path / "b.png"), str(tmp_path / "img[1].png"),
                                  str(tmp_path / "img[0-9].png")])
    assert [str(p) for p in files] == ["img[1].png", "b.png", str(tmp_path / "img1.png")] and empty == []


def test_metadata_names_and_original_category_ids(tiny):
    meta = dataset_metadata(load_predict_cfg(str(tiny[2])))
    assert meta.thing_classes == ["square", "bar", "diamond"]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 11: 2}
    # More model classes than dataset classes: the extra ones get generic names and fresh ids.
    meta = dataset_metadata(load_predict_cfg(str(tiny[2]), ["MODEL.ROI_HEADS.NUM_CLASSES", "5"]))
    assert meta.thing_classes == ["square", "bar", "diamond", "class 3", "class 4"]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 11: 2, 12: 3, 13: 4}
    # No dataset at all.
    cfg = load_predict_cfg(str(tiny[2]), ["DATASETS.REGISTER", "[]", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"])
    meta = dataset_metadata(cfg)
    assert meta.thing_classes == ["class 0", "class 1", "class 2"]
    assert meta.thing_dataset_id_to_contiguous_id == {0: 0, 1: 1, 2: 2}


def test_coco_results_map_ids_and_encode_masks():
    inst = Instances((20, 30))
    inst.pred_boxes = Boxes(torch.tensor([[2.0, 3.0, 12.0, 9.0], [0.0, 0.0, 30.0, 20.0]]))
    inst.scores = torch.tensor([0.9, 0.4])
    inst.pred_classes = torch.tensor([2, 0])
    masks = torch.zeros(2, 20, 30, dtype=torch.bool)
    masks[0, 3:9, 2:12] = True
    masks[1, 10:, :5] = True
    inst.pred_masks = masks
    meta = Metadata(thing_classes=["a", "b", "c"], thing_dataset_id_to_contiguous_id={3: 0, 7: 1, 11: 2})
    res = json.loads(json.dumps(instances_to_coco_results(inst, 5, meta)))  # counts are str: json-serializable
    assert [(r["image_id"], r["category_id"]) for r in res] == [(5, 11), (5, 3)]
    assert res[0]["bbox"] == [2.0, 3.0, 10.0, 6.0] and res[1]["bbox"] == [0.0, 0.0, 30.0, 20.0]
    assert res[0]["score"] == pytest.approx(0.9) and res[1]["score"] == pytest.approx(0.4)
    for r, m in zip(res, masks):
        rle = {"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(mask_util.decode(rle), m.numpy().astype(np.uint8))


def test_preprocess_honors_format_and_test_resize(tiny, weights):
    image = np.zeros((64, 32, 3), np.uint8)
    image[..., 0] = 200  # red
    rgb = Predictor(load_predict_cfg(str(tiny[2]), weights))
    bgr = Predictor(load_predict_cfg(str(tiny[2]), [*weights, "INPUT.FORMAT", "BGR"]))
    a, b = rgb.preprocess(image), bgr.preprocess(image)
    # Short side 32 -> 128 would make the long side 256 > MAX_SIZE_TEST 128, so the long side becomes 128.
    assert a["image"].shape == b["image"].shape == (3, 128, 64)
    assert (a["height"], a["width"]) == (64, 32)
    assert a["image"][0].float().mean() == 200 and a["image"][2].float().mean() == 0
    assert b["image"][2].float().mean() == 200 and b["image"][0].float().mean() == 0
    with pytest.raises(ValueError, match="uint8 RGB"):
        rgb.preprocess(image[..., 0])


def test_batch_of_different_sizes_returns_detections_in_each_image_frame(predictor):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), rng.integers(0, 256, (96, 160, 3), dtype=np.uint8)]
    outs = predictor(images)
    assert len(outs) == 2
    for im, inst in zip(images, outs):
        h, w = im.shape[:2]
        assert inst.image_size == (h, w)
        assert 0 < len(inst) <= 10  # threshold 0 keeps TEST.DETECTIONS_PER_IMAGE detections
        assert inst.pred_boxes.tensor.device.type == "cpu"
        box = inst.pred_boxes.tensor
        assert (box[:, 0] >= 0).all() and (box[:, 2] <= w).all() and (box[:, 1] >= 0).all() and (box[:, 3] <= h).all()
        assert inst.pred_masks.shape == (len(inst), h, w)
        assert set(inst.pred_classes.tolist()) <= {0, 1, 2}
    assert predictor([]) == []


def test_weights_are_loaded_through_the_checkpointer(tiny, tmp_path):
    cfg = load_predict_cfg(str(tiny[2]), ["OUTPUT_DIR", str(tmp_path)])
    torch.manual_seed(123)
    model = build_model(cfg)
    build_checkpointer(cfg, model).save("model_a")
    pred = Predictor(load_predict_cfg(str(tiny[2]), ["MODEL.WEIGHTS", str(tmp_path / "model_a.pth")]))
    loaded, saved = pred.model.state_dict(), model.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_predict_to_dir_writes_pictures_and_loadable_coco_json(tiny, predictor, tmp_path):
    _, image_dir, _ = tiny
    other = tmp_path / "other"
    other.mkdir()
    Image.open(image_dir / "img_0.png").resize((100, 80)).save(other / "img_0.png")  # same stem, other folder
    (other / "empty.png").write_bytes(b"")
    (other / "text.png").write_text("not an image")
    summary = predict_to_dir(predictor, [str(image_dir), str(other)], tmp_path / "out", batch_size=2, progress=False)

    assert sorted(summary.failures) == [(str(other / "empty.png"), "empty file (0 bytes)"),
                                        (str(other / "text.png"), "not a recognized image format")]
    names = [im["visualization"] for im in summary.images]
    assert names == ["img_0.png", "img_1.png", "img_2.png", "img_0_1.png"]
    assert [im["id"] for im in summary.images] == [1, 2, 3, 4]
    for im in summary.images:  # enlarged x2 (128 px) and x4 (80 px): the smallest integer factor reaching 256 px
        k = 2 if im["height"] == 128 else 4
        assert Image.open(tmp_path / "out" / im["visualization"]).size == (k * im["width"], k * im["height"])
    assert summary.images[3]["file_name"] == str((other / "img_0.png").resolve())
    assert (summary.images[3]["height"], summary.images[3]["width"]) == (80, 100)

    gt = COCO(str(summary.images_json))
    assert gt.loadCats(gt.getCatIds()) == CATEGORIES
    dt = gt.loadRes(str(summary.results_json))
    assert len(dt.anns) == summary.num_detections == 4 * 10
    assert {a["category_id"] for a in dt.anns.values()} <= {3, 7, 11}
    assert {a["image_id"] for a in dt.anns.values()} == {1, 2, 3, 4}
    assert all(a["segmentation"]["size"] == [80, 100] for a in dt.anns.values() if a["image_id"] == 4)


def test_batched_detections_equal_those_of_one_image_at_a_time(tiny, predictor):
    """SQUARE_PAD 0: a batch was padded to its largest image, which moved the position table's grid and what global
    attention saw, so an image's detections depended on its batch mates (and differed from train_net --eval-only)."""
    a = np.asarray(load_image(tiny[1] / "img_0.png"))  # 128 x 128
    b = np.ascontiguousarray(np.asarray(load_image(tiny[1] / "img_1.png"))[16:112])  # 96 x 128
    batched, alone = predictor([b, a, b]), [predictor([im])[0] for im in (b, a, b)]
    for x, y in zip(batched, alone):
        assert len(x) == len(y) > 0 and torch.equal(x.pred_classes, y.pred_classes)
        torch.testing.assert_close(x.scores, y.scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(x.pred_boxes.tensor, y.pred_boxes.tensor, rtol=0, atol=1e-3)
    assert batched[0].image_size == (96, 128) and batched[1].image_size == (128, 128)


def test_output_folder_holding_an_input_is_refused_before_anything_is_written(tiny, predictor, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        (photos / f"img_{i}.png").write_bytes((tiny[1] / f"img_{i}.png").read_bytes())
    before = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in photos.iterdir()}
    with pytest.raises(ConfigError) as e:  # img_0.png's picture was written over img_0.png
        predict_to_dir(predictor, [str(photos)], photos, progress=False)
    assert str(e.value) == (f"output folder {photos} holds the input {photos / 'img_0.png'}: its pictures would "
                            "replace inputs and be read as inputs by the next run; choose another --output")
    assert {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in photos.iterdir()} == before
    # An output folder inside a recursively searched one: the first run is fine, the next would read its pictures.
    pattern = str(photos / "**" / "*.png")
    predict_to_dir(predictor, [pattern], photos / "pred", progress=False)
    with pytest.raises(ConfigError, match=f"^output folder {photos / 'pred'} holds the input {photos / 'pred'}/img_0"):
        predict_to_dir(predictor, [pattern], photos / "pred", progress=False)
    # An input named through a symlink in the output folder: its picture would be written through the link.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link.png").symlink_to(photos / "img_1.png")
    with pytest.raises(ConfigError, match="holds the input"):
        check_output_dir(tmp_path / "out", expand_inputs([str(tmp_path / "out" / "link.png")])[0])
    assert {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in photos.iterdir() if p.is_file()} == before


def test_an_output_path_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError) as e:
        check_output_dir(tmp_path / "afile", [])
    assert str(e.value) == f"output folder {tmp_path / 'afile'} is a file, not a folder"
    with pytest.raises(ConfigError) as e:
        check_output_dir(tmp_path / "afile" / "sub", [])
    sub = tmp_path / "afile" / "sub"
    assert str(e.value) == f"cannot create output folder {sub}: {tmp_path / 'afile'} is a file, not a folder"


def test_a_too_thin_image_is_a_counted_skip_and_the_json_files_survive_a_failing_batch(
    tiny, predictor, tmp_path, monkeypatch
):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "d.png"):
        (images / name).write_bytes((tiny[1] / "img_0.png").read_bytes())
    Image.new("RGB", (1000, 2)).save(images / "b_strip.png")  # the test resize makes it 128 x 0: was a traceback
    summary = predict_to_dir(predictor, [str(images)], tmp_path / "out", progress=False)
    assert summary.failures == [(str(images / "b_strip.png"), "resized to 0 px (1000x2 -> 128x0 by the test resize)")]
    assert [im["visualization"] for im in summary.images] == ["a.png", "d.png"]
    with pytest.raises(ValueError, match=r"^resized to 0 px \(2x1000 -> 0x128 by the test resize\)$"):
        predictor([np.zeros((1000, 2, 3), np.uint8)])

    run = predictor.run
    monkeypatch.setattr(predictor, "run", lambda xs: 1 / 0 if any(x["width"] == 1 for x in xs) else run(xs))
    Image.new("RGB", (1, 1)).save(images / "e.png")  # a model failure on the last image: the results were lost
    with pytest.raises(ZeroDivisionError):
        predict_to_dir(predictor, [str(images)], tmp_path / "out2", progress=False)
    written = json.loads((tmp_path / "out2" / "images.json").read_text())
    assert [im["visualization"] for im in written["images"]] == ["a.png", "d.png"]
    assert len(json.loads((tmp_path / "out2" / "results.json").read_text())) == 2 * 10


def test_a_jpeg_decoded_downscaled_gets_results_in_the_file_frame(predictor, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=90)
    # A pixel limit below its 200x120 makes load_image decode it at 1/2 (how a huge photo is read).
    summary = predict_to_dir(predictor, [str(tmp_path / "big.jpg")], tmp_path / "out", progress=False,
                             max_pixels=200 * 120 // 2)
    assert (summary.images[0]["width"], summary.images[0]["height"]) == (200, 120)
    assert Image.open(tmp_path / "out" / "big.png").size == (500, 300)  # drawn as decoded (100x60), enlarged x5
    decoded = predictor([np.asarray(load_image(tmp_path / "big.jpg", 200 * 120 // 2))])[0]
    assert decoded.image_size == (60, 100) and len(decoded) > 0
    dt = COCO(str(summary.images_json)).loadRes(str(summary.results_json))
    anns = [dt.anns[k] for k in sorted(dt.anns)]
    assert len(anns) == len(decoded)
    for ann, box, mask in zip(anns, decoded.pred_boxes.tensor.tolist(), decoded.pred_masks.numpy()):
        x0, y0, x1, y1 = box
        np.testing.assert_allclose(ann["bbox"], [2 * x0, 2 * y0, 2 * (x1 - x0), 2 * (y1 - y0)], rtol=1e-5)
        assert ann["segmentation"]["size"] == [120, 200]
        full = mask_util.decode(ann["segmentation"]).astype(bool)
        assert np.array_equal(full, mask.repeat(2, 0).repeat(2, 1))  # nearest: each pixel becomes 2x2


def test_an_image_decoded_whole_is_never_rescaled(tiny, predictor, tmp_path, caplog):
    # Its EXIF block follows the pixel data: a header read sees it unrotated, the decode rotates it to 64 x 40.
    shown = np.asarray(Image.open(tiny[1] / "img_0.png").convert("RGB").crop((0, 0, 64, 40)))
    (tmp_path / "late_exif.png").write_bytes(_exif_after_pixels_png(shown))
    summary = predict_to_dir(predictor, [str(tmp_path / "late_exif.png")], tmp_path / "out", progress=False)
    assert (summary.images[0]["width"], summary.images[0]["height"]) == (64, 40)
    assert "was decoded at" not in caplog.text
    expected = instances_to_coco_results(predictor([shown])[0], 1, predictor.metadata)
    got = json.loads(summary.results_json.read_text())
    assert len(got) == len(expected) > 0
    for r, e in zip(got, expected):
        assert r["bbox"] == pytest.approx(e["bbox"]) and r["segmentation"] == e["segmentation"]


def test_a_jpeg_beyond_pils_bomb_limit_gets_its_file_frame(tiny, weights, tmp_path):
    side = 13440  # 180.6 Mpixel, over PIL's limit: its header cannot be read with the limit in place
    (tmp_path / "huge.jpg").write_bytes(_gray_jpeg_of_side(side))
    # No detection passes a threshold of 1: each would be a full-size mask, and the frame is what is tested.
    none = Predictor(load_predict_cfg(str(tiny[2]), weights, confidence_threshold=1.0))
    summary = predict_to_dir(none, [str(tmp_path / "huge.jpg")], tmp_path / "out", progress=False,
                             max_pixels=(side // 8) ** 2)
    assert (summary.images[0]["width"], summary.images[0]["height"]) == (side, side)  # was the 1/8 decode's 1680
    assert Image.open(tmp_path / "out" / "huge.png").size == (side // 8, side // 8)


def _tiny_semantic_predictor(root) -> Predictor:
    """The shapes UperNet config made narrow (64-d encoder, 3 classes), at its seeded initial weights."""
    config = root / "sem_seg.yaml"
    config.write_text(f"""
_BASE_: "{ROOT / 'configs' / 'shapes' / 'sem_seg_vit_scratch.yaml'}"
MODEL:
  VIT:
    EMBED_DIM: 64
    NUM_HEADS: 4
  SEM_SEG_HEAD:
    NUM_CLASSES: 3
    CONVS_DIM: 16
    AUX_CONVS_DIM: 16
DATASETS:
  REGISTER_SEM_SEG: []
  TRAIN: ()
  TEST: ()
""")
    return Predictor(load_predict_cfg(str(config), ["MODEL.WEIGHTS", str(save_untrained_detector(config))]))


def test_a_label_map_name_is_never_another_inputs_picture(tmp_path):
    semantic = _tiny_semantic_predictor(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 24), (10, 200, 10)).save(images / "a.png")
    Image.new("RGB", (40, 16), (200, 10, 10)).save(images / "a_labels.png")  # named like a.png's label map
    expected = {"a": ["a_labels.png", "a_labels_1_labels.png"],  # the second input's names move, both of them
                "a_labels": ["a_labels_labels.png", "a_1_labels.png"]}
    for order in ([images / "a.png", images / "a_labels.png"], [images / "a_labels.png", images / "a.png"]):
        out = tmp_path / f"out_{order[0].stem}"
        summary = predict_to_dir(semantic, [str(p) for p in order], out, progress=False)
        results = json.loads(summary.results_json.read_text())
        pictures = [im["visualization"] for im in summary.images]
        label_maps = [r["label_map"] for r in results]
        assert len(set(pictures + label_maps)) == 4
        assert sorted(p.name for p in out.glob("*.png")) == sorted(pictures + label_maps)
        for im, label_map in zip(summary.images, label_maps):
            labels = Image.open(out / label_map)
            assert labels.mode == "L" and labels.size == (im["width"], im["height"])
            assert Image.open(out / im["visualization"]).mode == "RGB"
        assert label_maps == expected[order[0].stem]


def test_side_by_side_detections(tiny, tmp_path):
    root, image_dir, config = tiny
    cfg = load_predict_cfg(str(config), ["OUTPUT_DIR", str(tmp_path)])
    for name in ("a", "b"):
        build_checkpointer(cfg, build_model(cfg)).save(name)
    runs = [("MAE", str(config), str(tmp_path / "a.pth")), ("scratch", str(config), str(tmp_path / "b.pth"))]
    images = [image_dir / "img_0.png", image_dir / "img_1.png"]
    out = side_by_side_detections(runs, images, tmp_path / "vis" / "cmp.png", confidence_threshold=0.0, panel_size=96)
    pic = np.asarray(Image.open(out).convert("RGB")).astype(int)
    header, pad = 24, 6  # default font 12 px + 12; 6 px gaps
    assert pic.shape == (header + 2 * (96 + pad), 2 * (96 + pad) + pad, 3)
    for col in range(2):
        x = pad + col * (96 + pad)
        assert (pic[:header, x : x + 96] < 128).any()  # the label is drawn
        for row in range(2):
            y = header + row * (96 + pad)
            source = np.asarray(Image.open(images[row]).resize((96, 96), Image.BILINEAR)).astype(int)
            panel = pic[y : y + 96, x : x + 96]
            assert 0 < np.abs(panel - source).mean() < 100  # the image, with detections drawn over it
    # A ground-truth column in front and a title line above the labels.
    out = side_by_side_detections(runs, images, tmp_path / "gt.png", confidence_threshold=0.0, panel_size=96,
                                  ground_truth=next(root.glob("*.json")), title="score >= 0")
    gt_pic = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert gt_pic.shape == (20 + header + 2 * (96 + pad), 3 * (96 + pad) + pad, 3)
    assert np.array_equal(gt_pic[20 + header:, pad + 96 + pad:], pic[header:, pad:])  # the runs' columns, shifted
    with pytest.raises(ValueError, match="at least one run"):
        side_by_side_detections([], images, tmp_path / "x.png")


def test_draw_instances_enlarges_small_images_and_colors_by_class():
    image = np.full((32, 40, 3), 255, dtype=np.uint8)
    meta = Metadata(thing_classes=["a", "b"])
    masks = np.zeros((2, 32, 40), dtype=bool)
    masks[0, 2:10, 2:10] = True
    masks[1, 20:30, 25:38] = True
    boxes = np.array([[2, 2, 10, 10], [25, 20, 38, 30]], dtype=float)
    out = draw_instances(image, meta, [1, 1], boxes, masks, [0.9, 0.6], min_side=100)
    assert out.shape == (128, 160, 3)  # x4: the smallest integer factor giving a shorter side >= 100
    # Both instances are class 1: their mask interiors get the same tint, class 1's color blended over white.
    a, b = out[4 * 5, 4 * 5].astype(int), out[4 * 26, 4 * 33].astype(int)
    assert np.abs(a - b).max() <= 2
    expected = 255 * (0.65 + 0.35 * class_color(1))
    assert np.abs(a - expected).max() < 25
    assert draw_instances(image, meta, [], np.zeros((0, 4)), None, None).shape == (32, 40, 3)


def test_ground_truth_instances_decode_coco(tiny):
    root, _, config = tiny
    meta = dataset_metadata(load_predict_cfg(str(config)))
    data = json.loads(next(root.glob("*.json")).read_text())
    gt = ground_truth_instances(next(root.glob("*.json")), meta)
    img = data["images"][0]
    classes, boxes, masks = gt[img["file_name"]]
    anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
    assert classes == [meta.thing_dataset_id_to_contiguous_id[a["category_id"]] for a in anns]
    x, y, w, h = anns[0]["bbox"]
    assert boxes[0].tolist() == [x, y, x + w, y + h]
    assert masks.shape == (len(anns), img["height"], img["width"])
    assert [int(m.sum()) for m in masks] == [int(mask_util.area(mask_util.merge(mask_util.frPyObjects(
        a["segmentation"], img["height"], img["width"])))) for a in anns]


def test_predict_to_dir_draws_small_images_enlarged(tiny, predictor, tmp_path):
    image = np.ascontiguousarray(np.asarray(Image.open(tiny[1] / "img_0.png"))[::2, :96:2])  # 64 x 48
    Image.fromarray(image).save(tmp_path / "small.png")
    summary = predict_to_dir(predictor, [str(tmp_path / "small.png")], tmp_path / "out", progress=False)
    h, w = image.shape[:2]
    k = -(-256 // min(h, w))
    drawn = Image.open(tmp_path / "out" / "small.png")
    assert drawn.size == (k * w, k * h)  # was drawn at 64 px: labels taller than the objects
    expected = draw_detections(image, predictor([image])[0], predictor.metadata, 256)
    assert np.array_equal(np.asarray(drawn), expected)
    predict_to_dir(predictor, [str(tmp_path / "small.png")], tmp_path / "native", progress=False, min_side=0)
    assert Image.open(tmp_path / "native" / "small.png").size == (w, h)


def test_ground_truth_classes_follow_the_jsons_categories_when_no_dataset_names_them(tiny):
    root, _, config = tiny
    json_file = next(root.glob("*.json"))
    data = json.loads(json_file.read_text())
    # The run's dataset moved: the model's classes are "class k" with stand-in ids 0..2 (the json has 3, 7, 11).
    meta = dataset_metadata(load_predict_cfg(str(config), [
        "DATASETS.REGISTER", "[['moved_set', '/moved/instances.json', '/moved/images']]",
        "DATASETS.TRAIN", "('moved_set',)", "DATASETS.TEST", "('moved_set',)"]))
    assert meta.name == UNNAMED and meta.thing_dataset_id_to_contiguous_id == {0: 0, 1: 1, 2: 2}
    gt = ground_truth_instances(json_file, meta)  # was KeyError 3 (ids 1..6 of the shapes json: class k+1 or 6)
    rank = {3: 0, 7: 1, 11: 2}
    for img in data["images"]:
        assert gt[img["file_name"]][0] == [rank[a["category_id"]] for a in data["annotations"]
                                           if a["image_id"] == img["id"]]


def test_ground_truth_of_other_categories_than_the_models_is_refused(tiny, tmp_path):
    root, _, config = tiny
    data = json.loads(next(root.glob("*.json")).read_text())
    data["categories"] = [{**c, "name": c["name"].upper()} for c in data["categories"]]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    meta = dataset_metadata(load_predict_cfg(str(config)))
    with pytest.raises(DatasetError) as e:  # was drawn with the model's names for the json's classes
        ground_truth_instances(other, meta)
    assert str(e.value) == (f"{other}: its categories ['SQUARE', 'BAR', 'DIAMOND'] in id order are not the model's "
                            "classes ['square', 'bar', 'diamond'] (dataset 'tiny_shapes'): the ground truth would be "
                            "drawn as other classes")
    data["categories"].append({"id": 12, "name": "extra"})
    other.write_text(json.dumps(data))
    unnamed = Metadata(name=UNNAMED, thing_classes=["class 0", "class 1", "class 2"])
    with pytest.raises(DatasetError, match=r"categories \['SQUARE', 'BAR', 'DIAMOND', 'extra'\] in id order are not"):
        ground_truth_instances(other, unnamed)  # 4 categories, 3 model classes
