"""tools/train_net.py end to end on a tiny COCO-format dataset, resume, faults, and the COCO configs.

The tiny model keeps CPU time down: a 64-d 2-block ViT on 128-px images, 32 RoIs per image, a 1-fc box head.
"""
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "train_net.py"
BASE = ROOT / "configs" / "Base-MaskRCNN-ViT.yaml"
TRAIN_ITERS = 8


def make_coco(root: Path, n: int = 8, size: int = 128, seed: int = 0) -> Path:
    """n images with a filled rectangle (polygon, category id 1) and a disk (RLE, category id 5)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        img = np.full((size, size, 3), 40, np.uint8)
        w, h = rng.integers(28, 56, size=2)
        x, y = rng.integers(0, size - w), rng.integers(0, size - h)
        img[y:y + h, x:x + w] = (220, 60, 60)
        rect = [[float(x), float(y), float(x + w), float(y), float(x + w), float(y + h), float(x), float(y + h)]]
        anns.append({"image_id": i + 1, "category_id": 1, "bbox": [float(x), float(y), float(w), float(h)],
                     "segmentation": rect, "iscrowd": 0, "area": float(w * h)})
        r = int(rng.integers(12, 24))
        cx, cy = rng.integers(r, size - r, size=2)
        disk = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img[disk] = (60, 200, 60)
        rle = mask_util.encode(np.asfortranarray(disk.astype(np.uint8)))
        anns.append({"image_id": i + 1, "category_id": 5, "bbox": mask_util.toBbox(rle).tolist(),
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}, "iscrowd": 0,
                     "area": float(disk.sum())})
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "height": size, "width": size})
    for k, a in enumerate(anns):
        a["id"] = k + 1
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "rectangle"}, {"id": 5, "name": "disk"}]}))
    return path


def tiny_config(path: Path, data: Path, output: Path, *, test: bool = True, **extra) -> Path:
    """A tiny Mask R-CNN config on the fixture, built on configs/Base-MaskRCNN-ViT.yaml."""
    cfg = {
        "_BASE_": str(BASE),
        "MODEL": {
            "DEVICE": "cpu", "INIT_TYPE": "scratch",
            "VIT": {"SIZE": "custom", "EMBED_DIM": 64, "DEPTH": 2, "NUM_HEADS": 2, "PRETRAIN_IMG_SIZE": 128,
                    "WINDOW_SIZE": 4, "GLOBAL_ATTN_INDEXES": [1], "INPUT_SIZE": 128, "DROP_PATH_RATE": 0.0,
                    "OUT_CHANNELS": 64},
            "ANCHOR_GENERATOR": {"SIZES": [[16], [32], [64], [128], [256]]},
            "RPN": {"PRE_NMS_TOPK_TRAIN": 200, "PRE_NMS_TOPK_TEST": 100, "POST_NMS_TOPK_TRAIN": 100,
                    "POST_NMS_TOPK_TEST": 50, "BATCH_SIZE_PER_IMAGE": 64},
            "ROI_HEADS": {"NUM_CLASSES": 2, "BATCH_SIZE_PER_IMAGE": 32},
            "ROI_BOX_HEAD": {"NUM_CONV": 0, "NUM_FC": 1, "FC_DIM": 128},
            "ROI_MASK_HEAD": {"NUM_CONV": 1, "CONV_DIM": 64},
        },
        "DATASETS": {"REGISTER": [["b2_tiny", str(data / "train.json"), str(data / "images")]],
                     "TRAIN": ["b2_tiny"], "TEST": ["b2_tiny"] if test else []},
        "INPUT": {"LSJ": {"ENABLED": True, "IMAGE_SIZE": 128}, "MIN_SIZE_TEST": 128, "MAX_SIZE_TEST": 128},
        "DATALOADER": {"NUM_WORKERS": 0},
        "SOLVER": {"IMS_PER_BATCH": 2, "BASE_LR": 0.001, "MAX_ITER": TRAIN_ITERS, "WARMUP_ITERS": 0, "STEPS": [],
                   "CHECKPOINT_PERIOD": 4},
        "TEST": {"DETECTIONS_PER_IMAGE": 20},
        "LOG_PERIOD": 1,
        "SEED": 0,
        "OUTPUT_DIR": str(output),
    }
    for key, value in extra.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_tool(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "ignore", str(TOOL), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def losses(output: Path, key: str = "total_loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    return {r["iteration"]: r[key] for r in rows if key in r}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    make_coco(root)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    """One training run (TRAIN_ITERS iterations, checkpoints every 4) shared by the tests below."""
    work = tmp_path_factory.mktemp("train")
    cfg = tiny_config(work / "tiny.yaml", data, work / "out", test=False)
    r = run_tool("--config-file", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    return work / "out"


@pytest.mark.slow
def test_training_decreases_the_loss_and_records_the_run(trained):
    loss = losses(trained)
    assert sorted(loss) == list(range(TRAIN_ITERS))
    # metrics.json holds medians over the last 20 iterations: compare with the first (unsmoothed) one
    assert np.mean([loss[i] for i in range(TRAIN_ITERS - 3, TRAIN_ITERS)]) < loss[0], loss
    cls = losses(trained, "loss_cls")
    assert max(cls[i] for i in range(TRAIN_ITERS - 3, TRAIN_ITERS)) < cls[0], cls
    for name in ("model_0000003.pth", "model_0000007.pth", "model_final.pth", "config.yaml", "log.txt"):
        assert (trained / name).is_file(), name
    assert (trained / "last_checkpoint").read_text() == "model_final.pth"
    info = json.loads((trained / "run_info.json").read_text())
    assert (info["init_type"], info["seed"], info["mode"], info["world_size"], info["precision"]) == ("scratch", 0, "train", 1, "fp32")
    assert info["datasets"] == {"train": ["b2_tiny"], "test": []} and len(info["config_sha256"]) == 64
    log = (trained / "log.txt").read_text()
    assert "dataset 'b2_tiny'" in log and "8 images, 16 annotations" in log  # mae_det's load report joins the log


@pytest.mark.slow
def test_eval_only_writes_box_and_mask_ap(trained, tmp_path, data):
    cfg = tiny_config(tmp_path / "eval.yaml", data, tmp_path / "eval")
    weights = trained / "model_final.pth"
    # evaluation needs no training set: one whose files are gone stopped --eval-only (exit 2)
    gone = ["DATASETS.REGISTER", f"[['b2_tiny', '{data / 'train.json'}', '{data / 'images'}'], "
            f"['gone', '{tmp_path / 'gone.json'}', '{tmp_path / 'gone'}']]", "DATASETS.TRAIN", "('gone',)"]
    r = run_tool("--config-file", str(cfg), "--eval-only", "MODEL.WEIGHTS", str(weights), *gone)
    assert r.returncode == 0, r.stderr[-3000:]
    ap = json.loads((tmp_path / "eval" / "ap_results.json").read_text())
    assert set(ap) == {"bbox", "segm", "dataset", "iteration"}
    assert ap["dataset"] == "b2_tiny" and ap["iteration"] == TRAIN_ITERS
    for task in ("bbox", "segm"):
        assert set(ap[task]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert 0.0 <= ap[task]["AP"] <= ap[task]["AP50"] <= 100.0
        assert ap[task]["APl"] is None  # no large objects in 128-px images: undefined -> null
    info = json.loads((tmp_path / "eval" / "run_info.json").read_text())
    assert info["mode"] == "eval_only" and info["init_checkpoint_sha256"] == sha256(weights)


@pytest.mark.slow
def test_resume_restores_model_optimizer_scheduler_and_iteration(trained, tmp_path, data):
    from mae_det.config.detection import load_det_cfg
    from mae_det.data.detection import register_datasets
    from mae_det.engine.det_trainer import Trainer

    out = tmp_path / "out"
    shutil.copytree(trained, out)
    cfg = load_det_cfg(str(tiny_config(tmp_path / "r.yaml", data, out, **{"SOLVER.MAX_ITER": TRAIN_ITERS + 2})))
    register_datasets(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert trainer.start_iter == saved["iteration"] + 1 == TRAIN_ITERS
    model_state = trainer.model.state_dict()
    assert set(model_state) == set(saved["model"])
    assert all(torch.equal(model_state[k], saved["model"][k]) for k in model_state)
    opt, saved_opt = trainer.optimizer.state_dict(), saved["trainer"]["_trainer"]["optimizer"]
    assert [g["lr"] for g in opt["param_groups"]] == [g["lr"] for g in saved_opt["param_groups"]]
    assert set(opt["state"]) == set(saved_opt["state"]) and opt["state"]
    for i, st in opt["state"].items():
        for k, v in st.items():
            assert torch.equal(v, saved_opt["state"][i][k]), (i, k)
    assert trainer.scheduler.state_dict() == saved["trainer"]["hooks"]["LRScheduler"]
    assert trainer.scheduler.last_epoch == TRAIN_ITERS
    trainer.train()
    assert sorted(losses(out)) == list(range(TRAIN_ITERS + 2))  # continued at TRAIN_ITERS, nothing repeated
    ap = json.loads((out / "ap_results.json").read_text())
    assert ap["iteration"] == TRAIN_ITERS + 2 and set(ap) == {"bbox", "segm", "dataset", "iteration"}


def _trainer(tmp_path, data, out, **opts):
    """An in-process Trainer of the tiny config writing to ``out``."""
    from mae_det.config.detection import load_det_cfg
    from mae_det.data.detection import register_datasets
    from mae_det.engine.det_trainer import Trainer

    cfg = load_det_cfg(str(tiny_config(tmp_path / "t.yaml", data, out, **opts)))
    register_datasets(cfg)
    return Trainer(cfg)


@pytest.mark.slow
def test_a_fresh_start_sets_an_earlier_runs_checkpoints_aside(trained, tmp_path, data, caplog):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    opts = {"SOLVER.MAX_ITER": 2, "SOLVER.CHECKPOINT_PERIOD": 100}
    fresh = _trainer(tmp_path, data, out, test=False, **opts)
    with caplog.at_level("WARNING"):
        fresh.resume_or_load(resume=False)
    assert f"{out} holds checkpoints of an earlier run: starting from scratch (--resume continues instead); moved " \
           f"them to {out / 'earlier_run_1'}" in caplog.text
    assert sorted(os.listdir(out / "earlier_run_1")) == ["last_checkpoint", "model_0000003.pth", "model_0000007.pth",
                                                         "model_final.pth"]
    assert not list(out.glob("model_*.pth")) and not (out / "last_checkpoint").exists()
    killed = _trainer(tmp_path, data, out, test=False, **opts)  # a --resume before the fresh run's first checkpoint
    killed.resume_or_load(resume=True)
    assert killed.start_iter == 0  # starts over: the earlier run is not continued
    fresh.train()
    assert sorted(losses(out)) == [0, 1]  # the earlier run's metrics records are gone, none repeated
    # A new schedule from one of the folder's own checkpoints loads it from where the set-aside moved it.
    again = _trainer(tmp_path, data, out, test=False, **opts,
                     **{"MODEL.WEIGHTS": str(out / "model_final.pth"), "MODEL.INIT_TYPE": "scratch_continued"})
    again.resume_or_load(resume=False)
    moved = out / "earlier_run_2" / "model_final.pth"
    assert again.cfg.MODEL.WEIGHTS == str(moved)
    expected = torch.load(moved, weights_only=False)["model"]
    assert all(torch.equal(v, expected[k]) for k, v in again.model.state_dict().items())


@pytest.mark.slow
def test_resume_without_a_pointer_truncates_metrics_and_tensorboard_past_the_checkpoint(trained, tmp_path, data):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    for name in ("last_checkpoint", "model_0000007.pth", "model_final.pth"):
        (out / name).unlink()
    trainer = _trainer(tmp_path, data, out, test=False)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4  # from the newest checkpoint, model_0000003.pth, not from scratch
    assert sorted(losses(trained)) == list(range(TRAIN_ITERS))
    writers = trainer.writers_from_start()
    assert sorted(losses(out)) == [0, 1, 2, 3]  # 4..7 are redone: written once
    assert writers[2]._writer_args["purge_step"] == 4


@pytest.mark.slow
def test_resume_writes_the_final_checkpoint_a_kill_left_unwritten_and_refuses_a_shorter_max_iter(trained, tmp_path,
                                                                                                  data):
    from mae_det.config.pretrain import ConfigError

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained / "model_0000007.pth", out)
    (out / "last_checkpoint").write_text("model_0000007.pth")  # killed while writing model_final.pth
    trainer = _trainer(tmp_path, data, out, test=False)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == TRAIN_ITERS and (out / "last_checkpoint").read_text() == "model_final.pth"
    final, last = (torch.load(out / n, map_location="cpu", weights_only=True)
                   for n in ("model_final.pth", "model_0000007.pth"))
    assert final["iteration"] == 7 and all(torch.equal(final["model"][k], v) for k, v in last["model"].items())
    with pytest.raises(ConfigError) as e:
        _trainer(tmp_path, data, out, test=False, **{"SOLVER.MAX_ITER": 4}).resume_or_load(resume=True)
    assert str(e.value) == (f"cannot resume: {out / 'model_final.pth'} holds 8 iterations, more than SOLVER.MAX_ITER "
                            "4: set SOLVER.MAX_ITER 8 or more to continue it, or evaluate it with --eval-only")


@pytest.mark.slow
def test_requeue_comes_before_the_evaluation_and_does_not_rewrite_a_periodic_checkpoint(trained, tmp_path, data,
                                                                                         monkeypatch):
    from detectron2.engine import hooks
    from mae_det.engine import det_trainer

    trainer = _trainer(tmp_path, data, tmp_path / "out", **{"TEST.EVAL_PERIOD": 4})
    kinds = [type(h) for h in trainer._hooks]
    requeue = kinds.index(det_trainer._RequeueHook)
    assert issubclass(kinds[requeue - 1], hooks.PeriodicCheckpointer)
    assert requeue < next(i for i, k in enumerate(kinds) if issubclass(k, hooks.EvalHook))

    class Requeued(Exception):
        pass

    def requeued():
        raise Requeued

    saved = []
    monkeypatch.setattr(det_trainer, "stop_requested", lambda it: True)
    monkeypatch.setattr(det_trainer, "requeue", requeued)
    monkeypatch.setattr(trainer.checkpointer, "save", lambda name, **kw: saved.append((name, kw)))
    for it in (3, 7, 5):  # 3: model_0000003.pth, 7: model_final.pth were just written
        trainer.iter = it
        with pytest.raises(Requeued):
            trainer._hooks[requeue].after_step()
    assert saved == [("model_0000005", {"iteration": 5})]


@pytest.mark.slow
def test_a_resumed_run_redoes_an_evaluation_a_kill_interrupted(trained, tmp_path, data):
    from detectron2.engine import hooks
    from detectron2.utils.events import EventStorage

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained / "model_0000003.pth", out)
    (out / "last_checkpoint").write_text("model_0000003.pth")  # killed during the evaluation after iteration 3
    # A dataset name of its own: Detectron2 keeps the COCO json it converts for a name in the process's metadata.
    trainer = _trainer(tmp_path, data, out, **{
        "TEST.EVAL_PERIOD": 4, "DATASETS.REGISTER": [["b2_redo", str(data / "train.json"), str(data / "images")]],
        "DATASETS.TRAIN": ["b2_redo"], "DATASETS.TEST": ["b2_redo"]})
    trainer.resume_or_load(resume=True)
    evaluation = next(h for h in trainer._hooks if isinstance(h, hooks.EvalHook))
    with EventStorage(trainer.start_iter) as trainer.storage:
        evaluation.before_train()
        assert trainer.iter == trainer.storage.iter == 4
        assert json.loads((out / "ap_results.json").read_text())["iteration"] == 4
        assert trainer.storage.latest()["bbox/AP"][1] == 3  # recorded where the interrupted run would have
        evaluation._func = None  # evaluated already: not again
        evaluation.before_train()


@pytest.mark.slow
def test_seeded_draws_make_resume_and_loader_workers_change_nothing(tmp_path, data):
    """SEEDED_DRAWS (the default): resumed at iteration 4 with 2 loader workers, a run ends with the weights of the
    uninterrupted 0-worker run, drop path on; resumed with Detectron2's loader it does not."""
    drop_path = {"MODEL.VIT.DROP_PATH_RATE": 0.1}
    ref = tmp_path / "ref"
    r = run_tool("--config-file", str(tiny_config(tmp_path / "ref.yaml", data, ref, test=False, **drop_path)))
    assert r.returncode == 0, r.stderr[-3000:]
    final = torch.load(ref / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    for seeded, workers in ((True, 2), (False, 2)):
        out = tmp_path / f"resumed_{seeded}"
        out.mkdir()
        shutil.copy(ref / "model_0000003.pth", out)
        (out / "last_checkpoint").write_text("model_0000003.pth")
        cfg = tiny_config(tmp_path / f"r_{seeded}.yaml", data, out, test=False, **drop_path,
                          **{"SEEDED_DRAWS": seeded, "DATALOADER.NUM_WORKERS": workers})
        r = run_tool("--config-file", str(cfg), "--resume")
        assert r.returncode == 0, r.stderr[-3000:]
        assert sorted(losses(out)) == list(range(4, TRAIN_ITERS))
        resumed = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["model"]
        assert all(torch.equal(resumed[k], final[k]) for k in final) is seeded
        warned = "resuming at iteration 4 with SEEDED_DRAWS False and no loader state" in (out / "log.txt").read_text()
        assert warned is not seeded


@pytest.mark.slow
def test_checkpoint_keep_leaves_the_newest_periodic_checkpoint_an_earlier_process_included(trained, tmp_path, data):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model_0000001.pth", "model_0000003.pth"):  # as left by the process that --resume continues
        shutil.copy(trained / "model_0000003.pth", out / name)
    (out / "last_checkpoint").write_text("model_0000003.pth")
    cfg = tiny_config(tmp_path / "k.yaml", data, out, test=False,
                      **{"SOLVER.CHECKPOINT_PERIOD": 2, "SOLVER.CHECKPOINT_KEEP": 1})
    r = run_tool("--config-file", str(cfg), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.glob("model_*.pth")) == ["model_0000007.pth", "model_final.pth"]
    log = (out / "log.txt").read_text()
    assert "removed 2 older checkpoints" in log and "['model_0000001.pth', 'model_0000003.pth']" in log
    a, b = (torch.load(d / "model_final.pth", map_location="cpu", weights_only=True)["model"] for d in (trained, out))
    assert all(torch.equal(a[k], b[k]) for k in a)  # deleting files changes nothing in the run


@pytest.mark.slow
def test_detectron2_loader_resumes_exactly_in_one_process_without_workers(tmp_path, data):
    """SEEDED_DRAWS False (Detectron2's loader; the parity config): with 0 workers the checkpoint holds the loader's
    sample count and the generators' states, so a run resumed at iteration 4 ends with the uninterrupted run's
    weights, also when an evaluation ran right after that checkpoint (it leaves the generators as it found them)."""
    opts = {"MODEL.VIT.DROP_PATH_RATE": 0.1, "SEEDED_DRAWS": False, "TEST.EVAL_PERIOD": 4}
    ref = tmp_path / "ref"
    r = run_tool("--config-file", str(tiny_config(tmp_path / "ref.yaml", data, ref, **opts)))
    assert r.returncode == 0, r.stderr[-3000:]
    saved = torch.load(ref / "model_0000003.pth", map_location="cpu", weights_only=True)["trainer"]["hooks"]
    assert saved["LoaderStateHook"]["samples"] == 4 * 2
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(ref / "model_0000003.pth", out)
    (out / "last_checkpoint").write_text("model_0000003.pth")
    r = run_tool("--config-file", str(tiny_config(tmp_path / "r.yaml", data, out, **opts)), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming Detectron2's loader at sample 8 with the checkpoint's generator states" in (out / "log.txt").read_text()
    again = torch.load(out / "model_0000007.pth", map_location="cpu", weights_only=True)["trainer"]["hooks"]
    assert again["LoaderStateHook"]["samples"] == 8 * 2  # counted on from where the resumed loader started
    a, b = (torch.load(d / "model_final.pth", map_location="cpu", weights_only=True)["model"] for d in (ref, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_detectron2_loader_resumes_exactly_after_skipping_an_image(tmp_path, data):
    """An image that fails to decode makes Detectron2's MapDataset draw a replacement from its own generator and
    drop the index from its candidates: both are checkpointed, so the resumed run still ends where the
    uninterrupted one does."""
    dirty = tmp_path / "data"
    shutil.copytree(data, dirty)
    png = dirty / "images" / "002.png"
    png.write_bytes(png.read_bytes()[:200])  # the header check passes, decoding fails
    opts = {"SEEDED_DRAWS": False, "DATASETS.MAX_BAD_FRACTION": 0.2}
    ref = tmp_path / "ref"
    r = run_tool("--config-file", str(tiny_config(tmp_path / "ref.yaml", dirty, ref, test=False, **opts)))
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(ref / "model_0000003.pth", map_location="cpu", weights_only=True)["trainer"]["hooks"]
    assert state["LoaderStateHook"]["map_failed"] == [2]
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(ref / "model_0000003.pth", out)
    (out / "last_checkpoint").write_text("model_0000003.pth")
    r = run_tool("--config-file", str(tiny_config(tmp_path / "r.yaml", dirty, out, test=False, **opts)), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(d / "model_final.pth", map_location="cpu", weights_only=True)["model"] for d in (ref, out))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(trained, tmp_path, data):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    before = {p.name: sha256(p) for p in out.glob("*.pth")}
    cfg = tiny_config(tmp_path / "nan.yaml", data, out, test=False, **{
        "SOLVER.MAX_ITER": TRAIN_ITERS + 4, "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT": float("nan")})
    r = run_tool("--config-file", str(cfg), "--resume")
    assert r.returncode == 3, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: training stopped: non-finite loss at iteration {TRAIN_ITERS}: ")
    assert "loss_box_reg=nan" in last and "loss_cls=" in last and str(out / "model_final.pth") in last
    assert {p.name: sha256(p) for p in out.glob("*.pth")} == before
    assert (out / "last_checkpoint").read_text() == "model_final.pth"


@pytest.mark.slow
def test_weights_made_non_finite_by_an_update_are_never_saved(tmp_path, data):
    out = tmp_path / "out"
    # Iteration 0 trains at lr 1e-3 (warmup factor 1e-42 of BASE_LR 1e39), iteration 1 at 1e39: its loss is finite,
    # its update makes weights infinite, and the periodic checkpoint after it would hold them.
    cfg = tiny_config(tmp_path / "diverge.yaml", data, out, test=False, **{
        "SOLVER.MAX_ITER": 4, "SOLVER.CHECKPOINT_PERIOD": 1, "SOLVER.BASE_LR": 1e39, "SOLVER.WARMUP_ITERS": 1,
        "SOLVER.WARMUP_FACTOR": 1e-42})
    r = run_tool("--config-file", str(cfg))
    assert r.returncode == 3, r.stderr[-3000:]
    assert re.fullmatch(
        r"error: training stopped: non-finite weights after iteration 1: \d+ parameters \(first: [\w.]+\); "
        rf"{re.escape(str(out / 'model_0000001.pth'))} was not written; last good checkpoint: "
        rf"{re.escape(str(out / 'model_0000000.pth'))}", r.stderr.strip().splitlines()[-1])
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000000.pth"]
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    weights = torch.load(out / "model_0000000.pth", map_location="cpu", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


@pytest.mark.slow
def test_two_process_cpu_training(tmp_path, data):
    opts = {"SOLVER.MAX_ITER": 4, "SOLVER.CHECKPOINT_PERIOD": 2, "MODEL.VIT.DROP_PATH_RATE": 0.1}
    cfg = tiny_config(tmp_path / "ddp.yaml", data, tmp_path / "out", test=False, **opts)
    r = run_tool("--config-file", str(cfg), "--num-gpus", "2", "--dist-url", "auto")
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "World size: 2" in log
    assert sorted(losses(tmp_path / "out")) == [0, 1, 2, 3]
    assert (tmp_path / "out" / "model_final.pth").is_file() and (tmp_path / "out" / "log.txt.rank1").is_file()
    assert json.loads((tmp_path / "out" / "run_info.json").read_text())["world_size"] == 2
    # each rank draws from (SEED, rank, ...): resumed at iteration 2, both processes continue the same run exactly
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(tmp_path / "out" / "model_0000001.pth", resumed)
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    cfg = tiny_config(tmp_path / "resumed.yaml", data, resumed, test=False, **opts)
    r = run_tool("--config-file", str(cfg), "--num-gpus", "2", "--dist-url", "auto", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(d / "model_final.pth", map_location="cpu", weights_only=True)["model"]
            for d in (tmp_path / "out", resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    odd = tiny_config(tmp_path / "odd.yaml", data, tmp_path / "odd", test=False, **{"SOLVER.IMS_PER_BATCH": 3})
    r = run_tool("--config-file", str(odd), "--num-gpus", "2", "--dist-url", "auto")
    assert r.returncode == 2
    assert "error: SOLVER.IMS_PER_BATCH 3 is the total batch: it must be divisible by the 2 processes" in r.stderr
    assert r.stderr.count("error:") == 1, r.stderr[-3000:]  # each rank raises it: it was printed once per rank
    with socket.socket() as taken:  # a rank that cannot join: one line (it was a 30-line traceback)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = run_tool("--config-file", str(cfg), "--num-gpus", "2", "--dist-url",
                     f"tcp://127.0.0.1:{taken.getsockname()[1]}")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: rank ")
    r = run_tool("--config-file", str(odd), "--num-machines", "2", "--machine-rank", "3", "--dist-url",
                 "tcp://127.0.0.1:29643")  # waited 30 minutes for a rank 0 that never comes
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: --machine-rank 3: expected 0 to --num-machines - 1 (1)")


@pytest.mark.slow
def test_missing_dataset_path_is_a_one_line_error(tmp_path, data):
    cfg = tiny_config(tmp_path / "m.yaml", data, tmp_path / "out",
                      **{"DATASETS.REGISTER": [["b2_tiny", str(tmp_path / "missing.json"), str(data / "images")]]})
    r = run_tool("--config-file", str(cfg))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: dataset 'b2_tiny': annotation file not found: {tmp_path / 'missing.json'} "
        "(set the paths of 'b2_tiny' in DATASETS.REGISTER)")
    assert "Traceback" not in r.stderr



@pytest.mark.slow
def test_missing_or_untrained_weights_exit_2_before_anything_is_written(tmp_path, data):
    cfg = tiny_config(tmp_path / "w.yaml", data, tmp_path / "out")
    r = run_tool("--config-file", str(cfg), "MODEL.INIT_TYPE", "mae", "MODEL.WEIGHTS", str(tmp_path / "mae.pth"))
    assert r.returncode == 2 and "Traceback" not in r.stderr  # was fvcore's AssertionError, exit 1
    assert r.stderr.strip().splitlines()[-1] == f"error: checkpoint {tmp_path / 'mae.pth'} (MODEL.WEIGHTS): not found"
    out = tmp_path / "eval"
    r = run_tool("--config-file", str(cfg), "--eval-only", "OUTPUT_DIR", str(out))  # was a random model's AP, exit 0
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --eval-only needs trained weights: set MODEL.WEIGHTS")
    assert not (out / "ap_results.json").exists() and not (out / "run_info.json").exists()


COCO_LEAVES = sorted(p for p in glob.glob(str(ROOT / "configs" / "COCO" / "*.yaml")) if "Base-" not in p)


def test_unsynced_batch_norm_with_one_image_per_process_is_refused_before_starting():
    import importlib.util

    from detectron2.engine import default_argument_parser
    from mae_det.config.pretrain import ConfigError

    spec = importlib.util.spec_from_file_location("train_net_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = default_argument_parser().parse_args([
        "--config-file", str(ROOT / "configs" / "shapes" / "sem_seg_vit_scratch.yaml"), "--num-gpus", "2",
        "MODEL.SEM_SEG_HEAD.NORM", "BN", "SOLVER.IMS_PER_BATCH", "2", "MODEL.DEVICE", "cpu"])
    with pytest.raises(ConfigError) as e:
        tool.check_inputs(args)
    assert str(e.value) == (
        "SOLVER.IMS_PER_BATCH 2 over 2 processes with MODEL.SEM_SEG_HEAD.NORM 'BN': the 1x1 bin of POOL_SCALES "
        "batch-normalizes one value per channel in each process; train with 2 or more images per process, NORM "
        "'SyncBN' or 'GN', or POOL_SCALES without 1")


@pytest.mark.parametrize("path", COCO_LEAVES, ids=[os.path.basename(p) for p in COCO_LEAVES])
def test_registered_builder_builds_each_coco_config(path):
    from detectron2.modeling import build_model

    from mae_det.config.detection import load_det_cfg
    from mae_det.engine import det_trainer  # noqa: F401  (registers the backbone)

    cfg = load_det_cfg(path, ["MODEL.DEVICE", "meta"], training=False)
    with torch.device("meta"):
        model = build_model(cfg)
    shapes = model.backbone.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        f"p{i}": (256, 2 ** i) for i in range(2, 7)}
    if "vit" in path:
        dim, depth = (768, 12) if "vit_b" in path else (1024, 24)
        net = model.backbone.net
        assert (net.embed_dim, net.depth, net.patch_embed.proj.weight.device.type) == (dim, depth, "meta")
        encoder = sum(p.numel() for n, p in net.named_parameters() if "rel_pos" not in n)
        # Official ViT encoder minus cls token and final norm; pos table kept at the 224-px grid.
        assert encoder == {768: 85_798_656, 1024: 303_301_632}[dim] - dim - 2 * dim


@pytest.mark.slow
def test_vit_b_config_runs_a_forward_at_1024px_on_cpu():
    from detectron2.modeling import build_model

    from mae_det.config.detection import load_det_cfg
    from mae_det.engine import det_trainer  # noqa: F401

    # The real ViT-B config at the real size; only the number of test-time proposals is cut (1000 -> 100).
    cfg = load_det_cfg(str(ROOT / "configs" / "COCO" / "mask_rcnn_vit_b_mae.yaml"),
                       ["MODEL.DEVICE", "cpu", "MODEL.RPN.POST_NMS_TOPK_TEST", "100"], training=False)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    features = {}
    model.backbone.register_forward_hook(lambda m, i, o: features.update(o))
    image = torch.randint(0, 255, (3, 1024, 768), dtype=torch.uint8)
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 1024, "width": 768}])
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "p2": (1, 256, 256, 256), "p3": (1, 256, 128, 128), "p4": (1, 256, 64, 64), "p5": (1, 256, 32, 32),
        "p6": (1, 256, 16, 16)}  # square-padded to 1024
    inst = out["instances"]
    assert inst.image_size == (1024, 768) and len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE
    assert inst.pred_masks.shape[1:] == (1024, 768)
