"""tools/predict.py end to end: a tiny random ViT Mask R-CNN on generated images, plus unreadable inputs."""
import importlib.util
import json
import subprocess
import sys

import pytest
from PIL import Image
from pycocotools.coco import COCO

from mae_det.config.pretrain import ConfigError
from mae_det.engine.predictor import load_predict_cfg
from tests.tools.inference_data import ROOT, make_tiny_coco, save_untrained_detector, write_tiny_config


def run_predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "predict.py"), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_predict_writes_pictures_and_coco_results_and_reports_bad_inputs(tmp_path):
    json_path, image_dir = make_tiny_coco(tmp_path)
    config = write_tiny_config(tmp_path, json_path, image_dir)
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is text")
    out = tmp_path / "pred"
    proc = run_predict("--config-file", str(config), "--input", str(image_dir / "*.png"), str(tmp_path / "zero.png"),
                       str(tmp_path / "text.png"), "--output", str(out), "--confidence-threshold", "0.0",
                       "--opts", "TEST.DETECTIONS_PER_IMAGE", "5", "MODEL.WEIGHTS", str(save_untrained_detector(config)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert f"{tmp_path / 'zero.png'}: empty file (0 bytes)" in log
    assert f"{tmp_path / 'text.png'}: not a recognized image format" in log
    assert "3 images, 15 detections" in log and "2 inputs skipped" in log
    assert "predict: 100%" in proc.stderr  # the progress bar

    for i in range(3):
        assert Image.open(out / f"img_{i}.png").size == (256, 256)  # 128 px drawn enlarged x2
    gt = COCO(str(out / "images.json"))
    assert [gt.imgs[i]["file_name"] for i in (1, 2, 3)] == [str(image_dir / f"img_{i}.png") for i in range(3)]
    dt = gt.loadRes(str(out / "results.json"))
    assert len(dt.anns) == 15  # --opts reached the model: 5 per image
    results = json.loads((out / "results.json").read_text())
    assert {r["category_id"] for r in results} <= {3, 7, 11}
    assert all(len(r["bbox"]) == 4 and isinstance(r["segmentation"]["counts"], str) for r in results)


def load_tool():
    spec = importlib.util.spec_from_file_location("predict_tool", ROOT / "tools" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_predict_fails_when_no_input_is_readable(tmp_path, caplog):
    json_path, image_dir = make_tiny_coco(tmp_path, num_images=1)
    config = write_tiny_config(tmp_path, json_path, image_dir)
    (tmp_path / "zero.png").write_bytes(b"")
    tool = load_tool()
    args = tool.parse_args(["--config-file", str(config), "--input", str(tmp_path / "zero.png"),
                            str(tmp_path / "no_dir"), "--output", str(tmp_path / "pred"), "--no-progress",
                            "--opts", "MODEL.WEIGHTS", str(save_untrained_detector(config))])
    assert tool.main(args) == 1
    assert f"{tmp_path / 'zero.png'}: empty file (0 bytes)" in caplog.text
    assert f"{tmp_path / 'no_dir'}: cannot access file" in caplog.text


def test_predict_config_errors_name_the_key(tmp_path):
    json_path, image_dir = make_tiny_coco(tmp_path, num_images=1)
    config = write_tiny_config(tmp_path, json_path, image_dir)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY"):
        load_predict_cfg(str(config), ["MODEL.NO_SUCH_KEY", "1"])
    with pytest.raises(ValueError, match=r"confidence threshold must be in \[0, 1\], got 1.5"):
        load_predict_cfg(str(config), [], confidence_threshold=1.5)


def test_bad_options_and_missing_weights_exit_2_with_one_line(tmp_path, capsys):
    from mae_det.engine.det_trainer import run_with_exit_codes

    json_path, image_dir = make_tiny_coco(tmp_path, num_images=1)
    config = write_tiny_config(tmp_path, json_path, image_dir)
    tool = load_tool()
    base = ["--config-file", str(config), "--input", str(image_dir), "--output", str(tmp_path / "pred")]
    for option, value, message in (("--confidence-threshold", "2", "expected a score in [0, 1], got 2.0"),
                                   ("--batch-size", "0", "expected at least 1 image, got 0")):
        with pytest.raises(SystemExit) as e:  # was a ValueError traceback after the model was built
            tool.parse_args([*base, option, value])
        assert e.value.code == 2 and f"error: {option}: {message}" in capsys.readouterr().err
    args = tool.parse_args([*base, "--opts", "MODEL.WEIGHTS", str(tmp_path / "model_final.pth")])
    with pytest.raises(SystemExit) as e:  # was fvcore's AssertionError traceback
        run_with_exit_codes(tool.main, args)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: checkpoint {tmp_path / 'model_final.pth'} (MODEL.WEIGHTS): not found\n"
    with pytest.raises(SystemExit) as e:  # no weights: was a warning, then pictures of a random model
        run_with_exit_codes(tool.main, tool.parse_args(base))
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: prediction needs trained weights")
    assert not (tmp_path / "pred").exists()


def test_an_output_that_is_a_file_or_holds_an_input_exits_2_before_the_model_is_loaded(tmp_path, capsys):
    from mae_det.engine.det_trainer import run_with_exit_codes

    json_path, image_dir = make_tiny_coco(tmp_path, num_images=1)
    config = write_tiny_config(tmp_path, json_path, image_dir)
    (tmp_path / "afile").write_text("x")
    tool = load_tool()
    # Weights that do not exist: their error would come first if the model were built before the output is checked.
    missing = ["--opts", "MODEL.WEIGHTS", str(tmp_path / "model_final.pth")]
    for output, message in ((tmp_path / "afile", f"output folder {tmp_path / 'afile'} is a file, not a folder"),
                            (image_dir, f"output folder {image_dir} holds the input {image_dir / 'img_0.png'}: its "
                                        "pictures would replace inputs and be read as inputs by the next run; choose "
                                        "another --output")):
        args = tool.parse_args(["--config-file", str(config), "--input", str(image_dir), "--output", str(output),
                                *missing])
        with pytest.raises(SystemExit) as e:  # was a FileExistsError traceback (exit 1) after the model loaded
            run_with_exit_codes(tool.main, args)
        assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert (tmp_path / "afile").read_text() == "x" and sorted(p.name for p in image_dir.iterdir()) == ["img_0.png"]
