"""tools/finetune_cls.py, tools/linear_probe.py, tools/knn_eval.py end to end on a tiny generated folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mae_det.checkpoint import atomic_save
from mae_det.engine.finetune_cls import finetune_main, knn_main, linear_probe_main
from mae_det.modeling.vit import VisionTransformer


pytestmark = pytest.mark.usefixtures("one_thread")


def _folders(root: Path, n_train: int = 8, n_val: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for name, color in (("blue", (40, 60, 220)), ("green", (30, 200, 40)), ("red", (220, 30, 30))):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(color) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / name / f"{i}.png")


def _config(tmp_path: Path, repo_root: Path) -> Path:
    """The shipped shapes profile through _BASE_, shrunk to a 64-d, 2-block ViT on 32 px."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"""_BASE_: "{repo_root / 'configs/classification/shapes_finetune.yaml'}"
MODEL: {{EMBED_DIM: 64, DEPTH: 2, NUM_HEADS: 4, IMG_SIZE: 32}}
DATA: {{TRAIN_ROOT: "{tmp_path / 'data/train'}", VAL_ROOT: "{tmp_path / 'data/val'}", NUM_WORKERS: 0}}
SOLVER: {{EPOCHS: 1, WARMUP_EPOCHS: 0, BATCH_SIZE: 8}}
LINPROBE: {{EPOCHS: 5, BATCH_SIZE: 12}}
KNN: {{K: 5}}
PRECISION: "fp32"
""")
    return cfg


@pytest.mark.slow
def test_cli_finetune_resume_then_probe_and_knn(tmp_path, repo_root):
    _folders(tmp_path / "data")
    cfg = _config(tmp_path, repo_root)
    out = tmp_path / "ft"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, str(repo_root / "tools/finetune_cls.py"), "--config-file", str(cfg), "OUTPUT_DIR", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads((out / "cls_results.json").read_text())
    assert res["finetune_epochs"] == 1 and 0.0 <= res["finetune_top1"] <= 100.0 and res["init"] == "random"
    info = json.loads((out / "run_info.json").read_text())
    assert info["init_type"] == "random" and info["command"][0].endswith("finetune_cls.py")
    assert (out / "checkpoint_0001.pth").is_file() and (out / "config.yaml").is_file()

    # --resume with a longer schedule continues from epoch 1 instead of starting over.
    assert finetune_main(["--config-file", str(cfg), "--resume", "OUTPUT_DIR", str(out), "SOLVER.EPOCHS", "2"]) == 0
    assert "resumed from" in (out / "log.txt").read_text()
    res = json.loads((out / "cls_results.json").read_text())
    assert res["finetune_epochs"] == 2 and (out / "checkpoint_0002.pth").is_file()

    # The fine-tuned checkpoint is itself an accepted init for the frozen-encoder evaluations.
    ev = tmp_path / "eval"
    common = ["--config-file", str(cfg), "OUTPUT_DIR", str(ev), "MODEL.WEIGHTS", str(out / "checkpoint_0002.pth"),
              "MODEL.INIT_TYPE", "finetuned"]
    assert knn_main(common) == 0
    assert linear_probe_main(common) == 0
    res = json.loads((ev / "cls_results.json").read_text())
    assert {"knn_top1", "linear_top1", "knn_num_train", "linear_num_val"} <= res.keys()
    assert res["knn_num_train"] == 24 and res["linear_num_val"] == 9 and res["init_type"] == "finetuned"
    assert all(0.0 <= res[k] <= 100.0 for k in ("knn_top1", "linear_top1"))
    log = (ev / "log.txt").read_text()  # it stayed empty
    assert f"top-1 {res['knn_top1']:.2f} % on 9 val images, 24 in the bank" in log
    assert f"linear probe of {res['init']} (cls pooling" in log and f"top-1 {res['linear_top1']:.2f} %" in log


def test_bad_inputs_give_one_line_errors(tmp_path, repo_root, capsys):
    _folders(tmp_path / "data", n_train=2, n_val=1)
    cfg = _config(tmp_path, repo_root)
    base = ["--config-file", str(cfg), "OUTPUT_DIR", str(tmp_path / "out")]

    def error_of(main, *extra) -> tuple[int, str]:
        rc = main([*base, *extra])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(err) == 1
        return rc, err[0]

    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")
    rc, err = error_of(finetune_main, "DATA.TRAIN_ROOT", str(tmp_path / "flat"))
    assert rc == 2 and "no labels" in err and "flat" in err

    (tmp_path / "data/train/violet").mkdir()
    rc, err = error_of(knn_main)
    assert rc == 2 and f"class folder {tmp_path / 'data/train/violet'} has no image files" in err
    (tmp_path / "data/train/violet").rmdir()

    narrow = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    atomic_save({"model": narrow.state_dict()}, tmp_path / "narrow.pth")
    rc, err = error_of(linear_probe_main, "MODEL.WEIGHTS", str(tmp_path / "narrow.pth"))
    assert rc == 2 and "narrow.pth: encoder width 32 does not match the model's embed_dim 64" in err

    rc, err = error_of(finetune_main, "SOLVER.NOT_A_KEY", "1")
    assert rc == 2 and "unknown config key 'SOLVER.NOT_A_KEY'" in err
    rc, err = error_of(finetune_main, "MODEL.WEIGHTS", str(tmp_path / "missing.pth"))
    assert rc == 2 and "MODEL.WEIGHTS: checkpoint" in err and "missing.pth not found" in err
    rc, err = error_of(finetune_main, "SOLVER.BATCH_SIZE", "64")
    assert rc == 2 and "SOLVER.BATCH_SIZE 64" in err and "6 training images" in err


def test_more_bad_inputs_give_one_line_errors(tmp_path, repo_root, capsys):
    # Each of these used to end in a traceback (audit of 2026-12-05).
    _folders(tmp_path / "data", n_train=2, n_val=1)
    cfg = _config(tmp_path, repo_root)
    (tmp_path / "a_file").write_text("notes")

    def error_of(main, *extra) -> tuple[int, str]:
        rc = main(["--config-file", str(cfg), "OUTPUT_DIR", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in err, err
        return rc, lines[0]

    for main in (finetune_main, linear_probe_main, knn_main):
        assert error_of(main, "OUTPUT_DIR", str(tmp_path / "a_file")) == (
            2, f"error: OUTPUT_DIR: {tmp_path / 'a_file'} exists and is not a folder")
    # An empty root used to be read as the current folder (its sub-folders taken for classes).
    assert error_of(knn_main, "DATA.VAL_ROOT", "") == (
        2, "error: DATA.VAL_ROOT is empty: set it to a labeled ImageFolder tree (<root>/<class>/<images>)")

    for split in ("train", "val"):
        (tmp_path / "one" / split / "red").mkdir(parents=True)
        Image.new("RGB", (40, 40), (220, 30, 30)).save(tmp_path / "one" / split / "red" / "0.png")
    assert error_of(linear_probe_main, "DATA.TRAIN_ROOT", str(tmp_path / "one" / "train"),
                    "DATA.VAL_ROOT", str(tmp_path / "one" / "val")) == (
        2, f"error: {tmp_path / 'one' / 'train'}: the linear probe needs at least 2 training images (BatchNorm "
           f"statistics), found 1")

    for p in (tmp_path / "data" / "val").rglob("*.png"):
        p.write_bytes(b"")
    rc, err = error_of(knn_main, "DATA.MAX_BAD_FRACTION", "1.0")
    assert (rc, err) == (2, f"error: {tmp_path / 'data' / 'val'}: no readable images to extract features from")
