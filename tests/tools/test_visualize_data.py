"""tools/visualize_data.py and mae_det.analysis.data on a generated COCO-format dataset with polygons."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mae_det.config.detection import load_det_cfg
from mae_det.config.pretrain import ConfigError
from mae_det.data.detection import DatasetError
from mae_det.analysis.data import visualize_dataset
from mae_det.engine.predictor import class_color
from tests.tools.inference_data import ROOT, make_tiny_coco, write_tiny_config


@pytest.fixture
def tiny(tmp_path):
    json_path, image_dir = make_tiny_coco(tmp_path, num_images=3)
    return image_dir, write_tiny_config(tmp_path, json_path, image_dir)


def test_annotation_source_draws_on_original_images(tiny, tmp_path):
    image_dir, config = tiny
    (image_dir / "img_2.png").write_text("corrupted")  # listed in the json, unreadable
    summary = visualize_dataset(load_det_cfg(str(config), training=False), tmp_path / "vis", "annotation", num_images=5)
    assert [p.name for p in summary.written] == ["img_0.png", "img_1.png"]
    assert summary.failures == [(str(image_dir / "img_2.png"), "not a recognized image format")]
    for p in summary.written:
        drawn = np.asarray(Image.open(p).convert("RGB")).astype(int)
        raw = np.asarray(Image.open(image_dir / p.name)).astype(int).repeat(2, 0).repeat(2, 1)
        assert drawn.shape == raw.shape == (256, 256, 3)  # 128 px enlarged x2 (MIN_SIDE 256)
        assert np.abs(drawn - raw).mean() > 1  # masks, boxes and labels drawn over the image


def test_dataloader_source_shows_the_augmented_samples(tiny, tmp_path):
    _, config = tiny
    cfg = load_det_cfg(str(config), ["INPUT.LSJ.IMAGE_SIZE", "64", "SEED", "1"], training=False)
    summary = visualize_dataset(cfg, tmp_path / "vis", "dataloader", "tiny_shapes", num_images=4)
    assert [p.name[:5] for p in summary.written] == ["0000_", "0001_", "0002_", "0003_"]
    for p in summary.written:
        w, h = Image.open(p).size
        # LSJ crops to at most IMAGE_SIZE; drawn enlarged by the smallest integer factor k reaching 256 px
        assert any(w % k == h % k == 0 and max(w, h) // k <= 64 and -(-256 // (min(w, h) // k)) == k
                   for k in range(4, 257))


def test_errors(tiny, tmp_path):
    _, config = tiny
    cfg = load_det_cfg(str(config), training=False)
    with pytest.raises(DatasetError, match="'nope' is not registered"):
        visualize_dataset(cfg, tmp_path, "annotation", dataset="nope")
    with pytest.raises(DatasetError, match="source must be one of"):
        visualize_dataset(cfg, tmp_path, "raw")


@pytest.mark.slow
def test_tool_writes_images(tiny, tmp_path):
    _, config = tiny
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "visualize_data.py"), "--config-file", str(config), "--source",
         "dataloader", "--output", str(tmp_path / "out"), "--num-images", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 images written" in proc.stdout
    assert len(list((tmp_path / "out").glob("*.png"))) == 2


def test_fewer_than_one_image_is_a_usage_error(tiny, capsys):
    spec = importlib.util.spec_from_file_location("visualize_data_tool", ROOT / "tools" / "visualize_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    base = ["--config-file", str(tiny[1]), "--output", "unused"]
    assert tool.parse_args([*base, "--num-images", "1"]).num_images == 1
    for value in ("0", "-3"):
        with pytest.raises(SystemExit) as e:  # 0 was a traceback after the dataset had been loaded
            tool.parse_args([*base, "--num-images", value])
        assert e.value.code == 2
        assert f"error: --num-images: expected at least 1 image, got {value}\n" in capsys.readouterr().err


def _tool():
    spec = importlib.util.spec_from_file_location("visualize_data_tool", ROOT / "tools" / "visualize_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # the header (and so the load check) passes, decoding fails


@pytest.fixture
def flawed(tmp_path):
    """Five images: img_0 missing, img_1 truncated, the others fine."""
    json_path, image_dir = make_tiny_coco(tmp_path, num_images=5)
    (image_dir / "img_0.png").unlink()
    _truncate(image_dir / "img_1.png")
    return image_dir, write_tiny_config(tmp_path, json_path, image_dir)


def test_both_sources_name_every_image_they_could_not_draw(flawed, tmp_path, capsys):
    image_dir, config = flawed
    missing = (str(image_dir / "img_0.png"), "file not found")
    truncated = (str(image_dir / "img_1.png"), "cannot decode image (OSError: image file is truncated)")
    cfg = load_det_cfg(str(config), ["INPUT.LSJ.IMAGE_SIZE", "64"], training=False)
    annotation = visualize_dataset(cfg, tmp_path / "ann", "annotation", num_images=5)
    assert [p.name for p in annotation.written] == ["img_2.png", "img_3.png", "img_4.png"]
    assert annotation.failures == [missing, truncated]
    # Enough draws that the loader meets the truncated image (each of the 4 loadable ones is drawn ~5 times).
    loader = visualize_dataset(cfg, tmp_path / "dl", "dataloader", num_images=20)
    assert len(loader.written) == 20
    assert loader.failures == [missing, truncated]  # was []: "0 unreadable images skipped"
    assert not any("img_1" in p.name for p in loader.written)
    tool = _tool()
    args = tool.parse_args(["--config-file", str(config), "--source", "annotation", "--output", str(tmp_path / "cli")])
    assert tool.main(args) == 0
    out = capsys.readouterr().out
    assert "3 images written" in out and "2 images skipped" in out
    assert f"  {missing[0]}: {missing[1]}\n" in out and f"  {truncated[0]}: {truncated[1]}\n" in out


def test_no_drawable_image_is_one_error_line(tiny, tmp_path, capsys):
    image_dir, config = tiny
    for path in image_dir.iterdir():
        _truncate(path)
    tool = _tool()
    for source in ("annotation", "dataloader"):
        args = tool.parse_args(["--config-file", str(config), "--source", source, "--output", str(tmp_path / source)])
        with pytest.raises(SystemExit) as e:  # was: exit 1 (annotation), a RuntimeError traceback (dataloader)
            tool.run_with_exit_codes(tool.main, args)
        assert e.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error:", "Traceback"))]
        assert len(err) == 1 and err[0].startswith("error: dataset 'tiny_shapes': ") and "cannot decode" in err[0], err
        assert "img_0.png" in err[0] and "3 " in err[0]


def test_output_among_the_dataset_images_is_refused(tiny, tmp_path):
    image_dir, config = tiny
    before = {p.name: p.read_bytes() for p in image_dir.iterdir()}
    cfg = load_det_cfg(str(config), training=False)
    for source in ("annotation", "dataloader"):
        for out in (image_dir, image_dir / "vis"):
            with pytest.raises(DatasetError, match=f"--output {out} is in the image folder {image_dir} of dataset"):
                visualize_dataset(cfg, out, source, num_images=2)
    assert {p.name: p.read_bytes() for p in image_dir.iterdir()} == before  # was: img_0/1.png replaced by drawings


def test_a_bad_json_image_entry_is_named_and_its_json_folder_stays_a_valid_output(tmp_path):
    json_path, image_dir = make_tiny_coco(tmp_path, num_images=3)
    data = json.loads(json_path.read_text())
    data["images"][0]["width"] = "wide"
    json_path.write_text(json.dumps(data))
    cfg = load_det_cfg(str(write_tiny_config(tmp_path, json_path, image_dir)), training=False)
    bad_entry = (str(json_path), "image entry #1: 'width' must be a positive integer, got 'wide'")
    for source in ("annotation", "dataloader"):
        # the json's folder, not the image folder: it was refused as "holds images of dataset"
        summary = visualize_dataset(cfg, json_path.parent, source, num_images=2)
        assert bad_entry in summary.failures and len(summary.written) == 2


def test_another_dataset_of_the_config_may_be_missing(tiny, tmp_path):
    image_dir, config = tiny
    json_path = image_dir.parent / "instances.json"
    cfg = load_det_cfg(str(config), [
        "DATASETS.REGISTER", f"[['tiny_shapes', '{json_path}', '{image_dir}'], ['gone', '{tmp_path}/no.json', "
        f"'{tmp_path}/no']]", "DATASETS.TRAIN", "('gone',)", "DATASETS.TEST", "('gone',)"], training=False)
    for source in ("annotation", "dataloader"):  # was: "dataset 'gone': annotation file not found"
        summary = visualize_dataset(cfg, tmp_path / source, source, "tiny_shapes", num_images=2)
        assert len(summary.written) == 2 and summary.failures == []
    with pytest.raises(DatasetError, match=r"^dataset 'gone': annotation file not found: .*no.json"):
        visualize_dataset(cfg, tmp_path / "gone", "annotation")  # the drawn set itself is still checked


def test_an_output_that_is_a_file_is_one_config_error_before_loading(tiny, tmp_path, monkeypatch):
    _, config = tiny
    (tmp_path / "taken").write_text("")
    cfg = load_det_cfg(str(config), training=False)
    monkeypatch.setattr("mae_det.analysis.data.register_datasets", None)  # nothing may be read first
    for out, message in ((tmp_path / "taken", f"output folder {tmp_path / 'taken'} is a file, not a folder"),
                         (tmp_path / "taken" / "vis", f"cannot create output folder {tmp_path / 'taken' / 'vis'}: "
                                                      f"{tmp_path / 'taken'} is a file, not a folder")):
        with pytest.raises(ConfigError) as e:  # was: FileExistsError / NotADirectoryError tracebacks
            visualize_dataset(cfg, out, "annotation")
        assert str(e.value) == message


def test_pictures_are_enlarged_and_coloured_by_class_the_same_on_every_run(tmp_path):
    json_path, image_dir = make_tiny_coco(tmp_path, num_images=1)
    small = np.asarray(Image.open(image_dir / "img_0.png"))[::2, ::2]  # 64 px, the shapes dataset's size
    Image.fromarray(small).save(image_dir / "img_0.png")
    data = json.loads(json_path.read_text())
    data["images"][0]["height"] = data["images"][0]["width"] = 64
    for a in data["annotations"]:
        a["bbox"] = [v / 2 for v in a["bbox"]]
        a["segmentation"] = [[v / 2 for v in a["segmentation"][0]]]
    json_path.write_text(json.dumps(data))
    cfg = load_det_cfg(str(write_tiny_config(tmp_path, json_path, image_dir)), training=False)
    np.random.seed(0)
    first = visualize_dataset(cfg, tmp_path / "a", "annotation").written[0]
    np.random.seed(1)  # Detectron2's Visualizer drew each instance in a random colour of the global generator
    second = visualize_dataset(cfg, tmp_path / "b", "annotation").written[0]
    assert first.read_bytes() == second.read_bytes()
    drawn = np.asarray(Image.open(first).convert("RGB")).astype(float)
    assert drawn.shape == (256, 256, 3)  # x4: at 64 px the labels covered the objects
    boxes = [a["bbox"] for a in data["annotations"]]
    for k, (x0, y0, w, h) in enumerate(boxes):  # inside each object alone: the image tinted with its class's colour
        x, y = next((x, y) for y in range(int(y0 + h) - 2, int(y0) + 2, -1) for x in range(int(x0) + 2, int(x0 + w) - 2)
                    if not any(bx - 1 <= x <= bx + bw + 1 and by - 1 <= y <= by + bh + 1
                               for j, (bx, by, bw, bh) in enumerate(boxes) if j != k))
        raw = small[y, x].astype(float)
        errors = [np.abs(drawn[4 * y + 2, 4 * x + 2] - (0.65 * raw + 0.35 * 255 * class_color(c))).max()
                  for c in range(3)]
        assert np.argmin(errors) == k and errors[k] < 25, (k, errors)
