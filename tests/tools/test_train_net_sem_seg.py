"""UperNet semantic segmentation end to end through the tools, on the embedded shapes dataset's semantic split:
generate_shapes --semantic -> train_net (configs/shapes/sem_seg_vit_scratch.yaml, a few iterations) ->
sem_seg_results.json -> predict -> compare_ap; and a bad label map stopping train_net before training."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "shapes" / "sem_seg_vit_scratch.yaml"
CLASSES = ["background", "circle", "square", "triangle", "star", "ring", "cross"]
ITERS = 4


def tool(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools" / name), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def register(data: Path) -> list[str]:
    entries = [[f"shapes_sem_{s}", str(data / "images" / s), str(data / "semantic" / s),
                str(data / "semantic" / "classes.txt")] for s in ("train", "val")]
    return ["DATASETS.REGISTER_SEM_SEG", json.dumps(entries).replace('"', "'")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    out = tool("generate_shapes.py", "--root", str(root), "--semantic", "--image-size", "64", "--num-pool", "0",
               "--num-train", "8", "--num-val", "4", "--num-cls-train", "0", "--num-cls-val", "0", "--workers", "1")
    assert out.returncode == 0, out.stderr
    return root


@pytest.mark.slow
def test_train_eval_predict_compare_on_the_shapes_semantic_split(data, tmp_path):
    out_dir = tmp_path / "run"
    proc = tool("train_net.py", "--config-file", str(CONFIG), *register(data), "SOLVER.MAX_ITER", str(ITERS),
                "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "OUTPUT_DIR", str(out_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out_dir / "sem_seg_results.json").read_text())
    assert res["dataset"] == "shapes_sem_val" and res["iteration"] == ITERS
    assert list(res["sem_seg"]["IoU"]) == CLASSES
    assert all(0.0 <= res["sem_seg"][k] <= 100.0 for k in ("mIoU", "fwIoU", "mACC", "pACC"))
    assert res["sem_seg"]["IoU"]["background"] > 0  # the most frequent class is found even after 4 steps
    info = json.loads((out_dir / "run_info.json").read_text())
    assert info["task"] == "semantic_segmentation" and info["init_type"] == "scratch"
    rows = [json.loads(line) for line in (out_dir / "metrics.json").read_text().splitlines()]
    losses = [r["loss_sem_seg"] for r in rows if "loss_sem_seg" in r]
    assert losses and all(math.isfinite(v) for v in losses)

    pred = tmp_path / "pred"
    proc = tool("predict.py", "--config-file", str(out_dir / "config.yaml"), "--input",
                str(data / "images" / "val" / "000001.png"), "--output", str(pred), "--no-progress",
                "--opts", "MODEL.WEIGHTS", str(out_dir / "model_final.pth"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = Image.open(pred / "000001_labels.png")
    assert labels.mode == "L" and labels.size == (64, 64) and np.asarray(labels).max() < len(CLASSES)
    assert Image.open(pred / "000001.png").size == (64, 64)
    assert json.loads((pred / "results.json").read_text()) == [{"image_id": 1, "label_map": "000001_labels.png"}]
    assert [c["name"] for c in json.loads((pred / "images.json").read_text())["categories"]] == CLASSES

    proc = tool("compare_ap.py", str(out_dir), "--baseline", "none", "--output", str(tmp_path / "cmp"))
    assert proc.returncode == 0, proc.stderr
    assert f"| scratch | 1 | {res['sem_seg']['mIoU']:.1f} |" in proc.stdout


@pytest.mark.slow
def test_seeded_draws_give_the_same_weights_with_and_without_loader_workers(data, tmp_path):
    """The shapes config draws from seeds (SEEDED_DRAWS, the default): 0 and 2 loader workers, equal weights."""
    finals = []
    for workers in (0, 2):
        out_dir = tmp_path / f"w{workers}"
        proc = tool("train_net.py", "--config-file", str(CONFIG), *register(data), "SOLVER.MAX_ITER", "3",
                    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "DATASETS.TEST", "()",
                    "DATALOADER.NUM_WORKERS", str(workers), "OUTPUT_DIR", str(out_dir))
        assert proc.returncode == 0, proc.stderr[-3000:]
        finals.append(torch.load(out_dir / "model_final.pth", map_location="cpu", weights_only=True)["model"])
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


@pytest.mark.slow
def test_detectron2_loader_resumes_bit_for_bit(data, tmp_path):
    """UperNet with Detectron2's loader (SEEDED_DRAWS False): one process, 0 workers, resumed exactly."""
    common = [*register(data), "SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
              "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()", "SEEDED_DRAWS", "False"]
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    # The reference keeps every checkpoint (the config keeps only the newest) to have iteration 1's to resume from.
    proc = tool("train_net.py", "--config-file", str(CONFIG), *common, "SOLVER.CHECKPOINT_KEEP", "0", "OUTPUT_DIR", str(ref))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed.mkdir()
    shutil.copy(ref / "model_0000001.pth", resumed)
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    proc = tool("train_net.py", "--resume", "--config-file", str(CONFIG), *common, "OUTPUT_DIR", str(resumed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(d / "model_final.pth", map_location="cpu", weights_only=True)["model"] for d in (ref, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_bad_label_map_stops_train_net_before_training(data, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    label = bad / "semantic" / "train" / "000003.png"
    Image.fromarray(np.full((64, 64), 9, np.uint8), mode="L").save(label)
    proc = tool("train_net.py", "--config-file", str(CONFIG), *register(bad), "OUTPUT_DIR", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {label}: label values [9] are >= the 7 classes and not the ignore value 255"]
    assert not (tmp_path / "run" / "metrics.json").exists()
