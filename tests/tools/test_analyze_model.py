"""tools/analyze_model.py on a tiny ViT Mask R-CNN config and a tiny MAE pretraining config."""
import importlib.util
import re
import subprocess
import sys

import pytest
from detectron2.modeling import build_model

from mae_det.config.detection import load_det_cfg
from mae_det.config.pretrain import ConfigError
from mae_det.engine.pretrain import build_pretrain_model
from mae_det.analysis.model import build_target, load_pretrain_model_cfg
from tests.tools.inference_data import ROOT, make_tiny_coco, write_tiny_config, write_tiny_pretrain_config


def numbers(text: str) -> tuple[int, float, int]:
    """(total parameters, total GFLOPs, total activations) printed by the tool."""
    params = int(re.search(r"total parameters: ([\d,]+)", text).group(1).replace(",", ""))
    gflops = float(re.search(r"total GFLOPs: ([\d.e+-]+)", text).group(1))
    acts = int(re.search(r"total activations: ([\d,]+)", text).group(1).replace(",", ""))
    return params, gflops, acts


@pytest.mark.slow
def test_detection_model(tmp_path):
    json_path, image_dir = make_tiny_coco(tmp_path, num_images=1)
    config = write_tiny_config(tmp_path, json_path, image_dir)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "analyze_model.py"), "--config-file", str(config), "--input-size", "128"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    params, gflops, acts = numbers(proc.stdout)
    model = build_model(load_det_cfg(str(config), training=False))
    assert params == sum(p.numel() for p in model.parameters())
    assert gflops > 0 and acts > 0
    assert "input 3x128x128" in proc.stdout
    for part in ("backbone", "proposal_generator", "roi_heads"):
        assert re.search(rf"\| {part} +\| +[\d.e+-]+ \|", proc.stdout)  # per-part FLOPs rows
    assert "| backbone.net.blocks " in proc.stdout  # the parameter table goes below the top level


def test_mae_model_in_process(tmp_path, capsys):
    config = write_tiny_pretrain_config(tmp_path)  # its DATA.PATH does not exist: analysis needs no data
    spec = importlib.util.spec_from_file_location("analyze_tool", ROOT / "tools" / "analyze_model.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(tool.parse_args(["--config-file", str(config), "--model-type", "mae", "--tasks", "parameter", "flop",
                               "activation", "--max-depth", "1"]))
    out = capsys.readouterr().out
    params, gflops, acts = numbers(out)
    model = build_pretrain_model(load_pretrain_model_cfg(config))
    assert params == sum(p.numel() for p in model.parameters())
    assert gflops > 0 and acts > 0
    assert "mask ratio 0.75" in out and "input 3x64x64" in out
    assert "| decoder_blocks " in out and "| blocks.0 " not in out  # --max-depth 1


def test_input_size_is_rejected_for_mae(tmp_path):
    with pytest.raises(ConfigError, match="--input-size applies to detection"):
        build_target("mae", str(write_tiny_pretrain_config(tmp_path)), input_size=(64, 64))


def test_input_size_below_one_pixel_is_a_usage_error(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("analyze_tool", ROOT / "tools" / "analyze_model.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    base = ["--config-file", str(tmp_path / "unused.yaml"), "--input-size"]
    assert tool.parse_args([*base, "1", "2"]).input_size == [1, 2]
    for sizes in (["0"], ["128", "0"], ["-64"]):
        with pytest.raises(SystemExit) as e:  # 0 was a traceback from inside the model
            tool.parse_args([*base, *sizes])
        assert e.value.code == 2
        assert f"error: --input-size: expected sizes of at least 1 pixel, got {' '.join(sizes)}\n" in \
            capsys.readouterr().err


def test_mae_model_of_make_demos_config_and_one_line_errors(tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "analyze_model.py"), "--model-type", "mae", "--tasks", "flop"]
    demo = str(ROOT / "configs" / "shapes" / "pretrain_mae.yaml")  # DATA.CACHE_DECODED_MB 64 was a type mismatch
    proc = subprocess.run([*tool, "--config-file", demo], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mask ratio 0.5" in proc.stdout and "total GFLOPs:" in proc.stdout
    bad = subprocess.run([*tool, "--config-file", demo, "MODEL.MASK_RATIO", "0.99"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: MODEL.MASK_RATIO: 0.99 keeps none of the 64 patches")
