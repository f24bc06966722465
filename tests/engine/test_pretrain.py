"""The pretraining loop, in process: learning, outputs, resume, accumulation, faults, modes and precision."""
import errno
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_det.checkpoint import CheckpointError, load_checkpoint
from mae_det.checkpoint.convert import load_encoder_state
from mae_det.checkpoint.hf import mae_to_hf
from mae_det.config.pretrain import load_pretrain_cfg
from mae_det.data.classification import ClassificationDataError
from mae_det.data.pretrain import DataError
from mae_det.engine import pretrain as P
from mae_det.modeling.vit import VisionTransformer
from mae_det.utils.precision import bf16_native

TINY = ["MODEL.ARCH", "mae_vit_tiny_patch16", "MODEL.EMBED_DIM", "64", "MODEL.DEPTH", "2", "MODEL.NUM_HEADS", "2",
        "MODEL.PATCH_SIZE", "8", "MODEL.IMG_SIZE", "32", "MODEL.DECODER_EMBED_DIM", "32", "MODEL.DECODER_DEPTH", "1",
        "MODEL.DECODER_NUM_HEADS", "2", "DATA.NUM_WORKERS", "0", "PRECISION", "fp32", "DEVICE", "cpu",
        "SOLVER.BATCH_SIZE", "8", "SOLVER.EPOCHS", "3", "SOLVER.WARMUP_EPOCHS", "1", "SOLVER.LR", "1e-3",
        "LOG_PERIOD", "1", "CHECKPOINT_PERIOD", "1"]


def write_textures(root: Path, n: int, size: int = 40, seed: int = 0) -> Path:
    """Random smooth colour textures (sums of sinusoids): structure an MAE can learn to fill in."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        img = np.zeros((size, size, 3))
        for c in range(3):
            for _ in range(2):
                fx, fy = rng.uniform(0.5, 3, 2)
                img[..., c] += np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi))
        img = (img - img.min()) / (np.ptp(img) + 1e-9) * 255
        Image.fromarray(img.astype(np.uint8)).save(root / f"{i:03d}.png")
    return root


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_textures(tmp_path_factory.mktemp("pretrain_data") / "imgs", 32)


def make_cfg(data: Path, out: Path, *opts: str):
    return load_pretrain_cfg(None, [*TINY, "DATA.PATH", str(data), "OUTPUT_DIR", str(out), *opts])


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    P.run_pretrain(make_cfg(images, out, "SOLVER.EPOCHS", "8", "SOLVER.LR", "2e-3", "CHECKPOINT_PERIOD", "4"))
    return out


def test_short_run_learns(trained):
    epochs = records(trained, "epoch")
    assert [r["epoch"] for r in epochs] == list(range(1, 9))
    losses = [r["loss"] for r in epochs]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], losses


def test_run_outputs(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.yaml", "run_info.json", "log.txt", "metrics.jsonl", "last_checkpoint", "encoder.pth",
            "checkpoint_0004.pth", "checkpoint_0008.pth"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert (trained / "last_checkpoint").read_text().strip() == "checkpoint_0008.pth"
    train = records(trained, "train")
    assert [r["step"] for r in train] == list(range(1, 33))
    assert {"loss", "lr", "img_per_s", "epoch", "iter", "bad_images"} <= set(train[0])
    info = json.loads((trained / "run_info.json").read_text())
    assert info["seed"] == 0 and len(info["config_sha256"]) == 64


def test_checkpoint_format_is_weights_only(trained):
    ckpt = torch.load(trained / "checkpoint_0008.pth", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "iter", "global_step", "rng", "config",
            "meta"} <= set(ckpt)
    assert (ckpt["epoch"], ckpt["iter"], ckpt["global_step"]) == (8, 0, 32)
    assert ckpt["meta"]["model"] == "mae_vit_tiny_patch16" and ckpt["meta"]["img_size"] == 32
    assert ckpt["meta"]["mode"] == "mae" and ckpt["meta"]["norm_pix_loss"] is False
    assert "mask_token" in ckpt["model"] and "decoder_pred.weight" in ckpt["model"]
    assert isinstance(ckpt["config"], str) and "MASK_RATIO: 0.75" in ckpt["config"]


def test_encoder_export_loads_into_the_encoder(trained):
    exp = torch.load(trained / "encoder.pth", weights_only=True)
    full = torch.load(trained / "checkpoint_0008.pth", weights_only=True)["model"]
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    assert list(exp["model"]) == list(enc.state_dict())  # official order and names, nothing else
    enc.load_state_dict(exp["model"], strict=True)
    assert all(torch.equal(exp["model"][k], full[k]) for k in exp["model"])
    assert exp["meta"]["embed_dim"] == 64 and exp["meta"]["patch_size"] == 8


def test_optimizer_groups_and_schedule(images, tmp_path):
    cfg = make_cfg(images, tmp_path, "SOLVER.LR", "0.0", "SOLVER.BASE_LR", "0.032", "SOLVER.EPOCHS", "4",
                   "SOLVER.WARMUP_EPOCHS", "2", "SOLVER.MIN_LR", "1e-4")
    t = P.Pretrainer(cfg)
    assert t.lr == pytest.approx(0.032 * 8 / 256)  # base lr x effective batch / 256
    names = {n: g["weight_decay"] for g in t.optimizer.param_groups for n in g["param_names"]}
    assert "pos_embed" not in names and "decoder_pos_embed" not in names  # frozen sin-cos tables
    assert names["cls_token"] == names["mask_token"] == 0.05  # decayed, as the official code
    assert names["blocks.0.norm1.weight"] == names["blocks.0.attn.qkv.bias"] == 0.0
    assert names["blocks.0.attn.qkv.weight"] == 0.05
    no_tok = P.Pretrainer(make_cfg(images, tmp_path, "SOLVER.DECAY_TOKENS", "False"))
    names = {n: g["weight_decay"] for g in no_tok.optimizer.param_groups for n in g["param_names"]}
    assert names["cls_token"] == names["mask_token"] == 0.0
    lrs = []
    for _ in range(t.total_steps):
        lrs.append(t.optimizer.param_groups[0]["lr"])
        t.optimizer.step()
        t.scheduler.step()
    warm, total, lo = 8, 16, 1e-4
    expected = [t.lr * k / warm if k < warm
                else lo + (t.lr - lo) * 0.5 * (1 + math.cos(math.pi * (k - warm) / (total - warm)))
                for k in range(total)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-9)


def _final(out: Path) -> dict:
    return torch.load(out / (out / "last_checkpoint").read_text().strip(), weights_only=True)


def test_gradient_accumulation_matches_the_full_batch(images, tmp_path):
    P.run_pretrain(make_cfg(images, tmp_path / "full", "SOLVER.EPOCHS", "2"))
    P.run_pretrain(make_cfg(images, tmp_path / "accum", "SOLVER.EPOCHS", "2", "SOLVER.BATCH_SIZE", "4",
                            "SOLVER.ACCUM_ITER", "2"))
    a, b = _final(tmp_path / "full")["model"], _final(tmp_path / "accum")["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


class _Interrupt(BaseException):
    """Stands in for a kill: not an Exception, so nothing in the loop can swallow it."""


def _interrupt_after(monkeypatch, steps: int) -> None:
    original, calls = P.Pretrainer._optimizer_step, {"n": 0}

    def step(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == steps:
            raise _Interrupt

    monkeypatch.setattr(P.Pretrainer, "_optimizer_step", step)


def _train_starts(monkeypatch) -> list[tuple[int, int]]:
    """Records (global step, loader workers) of every run as its training starts: a resume starts at its
    checkpoint's step, a fresh run (or a resume that loaded nothing) at 0."""
    real, starts = P.Pretrainer.train, []

    def train(self):
        starts.append((self.global_step, self.loader.num_workers))
        return real(self)

    monkeypatch.setattr(P.Pretrainer, "train", train)
    return starts


@pytest.mark.parametrize("stop_after", [7, 8])  # resumes from an epoch end / from a mid-epoch checkpoint
def test_resume_is_bit_exact(images, tmp_path, monkeypatch, stop_after):
    opts = ["SOLVER.BATCH_SIZE", "4", "SOLVER.ACCUM_ITER", "2", "MODEL.DROP_PATH", "0.2",
            "SOLVER.CHECKPOINT_ITER_PERIOD", "3"]
    P.run_pretrain(make_cfg(images, tmp_path / "ref", *opts))
    with monkeypatch.context() as m:
        _interrupt_after(m, stop_after)
        with pytest.raises(_Interrupt):
            P.run_pretrain(make_cfg(images, tmp_path / "cut", *opts))
    last = (tmp_path / "cut" / "last_checkpoint").read_text().strip()
    assert last == ("checkpoint_0001.pth" if stop_after == 7 else "checkpoint_0001_000003.pth")
    # more loader workers after the restart: the data must not depend on them
    starts = _train_starts(monkeypatch)
    P.run_pretrain(make_cfg(images, tmp_path / "cut", *opts, "DATA.NUM_WORKERS", "2"), resume=True)
    resumed_at = 4 if stop_after == 7 else 7  # the end of epoch 1, or its mid-epoch checkpoint after 3 steps
    assert starts == [(resumed_at, 2)]  # from the checkpoint's step (nothing retrained before it), with 2 workers
    assert (f"resumed from {tmp_path / 'cut' / last} (epoch 1, step {resumed_at - 4} of the epoch)"
            in (tmp_path / "cut" / "log.txt").read_text())
    ref, cut = _final(tmp_path / "ref"), _final(tmp_path / "cut")
    assert cut["global_step"] == ref["global_step"] == 12
    for k in ref["model"]:
        assert torch.equal(ref["model"][k], cut["model"][k]), k
    for i, s in ref["optimizer"]["state"].items():
        assert all(torch.equal(s[n], cut["optimizer"]["state"][i][n]) for n in ("exp_avg", "exp_avg_sq"))
    assert ref["scheduler"] == cut["scheduler"]
    steps = [r["step"] for r in records(tmp_path / "cut", "train")]
    assert steps == list(range(1, 13))  # records past the checkpoint were replaced, not duplicated
    for kind in ("train", "epoch"):
        assert [r["loss"] for r in records(tmp_path / "ref", kind)] == [r["loss"] for r in records(tmp_path / "cut", kind)]
    assert not (tmp_path / "cut" / "checkpoint_0001_000003.pth").exists()  # rolling checkpoint cleaned up


def test_resume_without_checkpoint_starts_fresh_and_finished_run_is_kept(images, tmp_path, monkeypatch):
    cfg = make_cfg(images, tmp_path, "SOLVER.EPOCHS", "2")
    starts = _train_starts(monkeypatch)
    P.run_pretrain(cfg, resume=True)
    assert f"no last_checkpoint in {tmp_path}: starting from scratch" in (tmp_path / "log.txt").read_text()
    before = _final(tmp_path)
    written = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.glob("checkpoint_*.pth")}
    P.run_pretrain(cfg, resume=True)  # already complete: nothing is retrained
    assert starts == [(0, 0), (8, 0)]
    assert (f"resumed from {tmp_path / 'checkpoint_0002.pth'} (epoch 2, step 0 of the epoch)"
            in (tmp_path / "log.txt").read_text())
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tmp_path.glob("checkpoint_*.pth")} == written
    after = _final(tmp_path)
    assert after["global_step"] == before["global_step"] == 8
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_checkpoint_keep_deletes_older_epoch_checkpoints_an_earlier_process_included(images, tmp_path):
    P.run_pretrain(make_cfg(images, tmp_path, "SOLVER.EPOCHS", "2"))  # CHECKPOINT_KEEP 0: every epoch kept
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == ["checkpoint_0001.pth", "checkpoint_0002.pth"]
    (tmp_path / "checkpoint_0001_000002.pth").write_bytes(b"")  # a mid-epoch file: not an epoch checkpoint
    P.run_pretrain(make_cfg(images, tmp_path, "SOLVER.EPOCHS", "4", "CHECKPOINT_KEEP", "2"), resume=True)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == [
        "checkpoint_0001_000002.pth", "checkpoint_0003.pth", "checkpoint_0004.pth"]
    assert (tmp_path / "last_checkpoint").read_text().strip() == "checkpoint_0004.pth"
    assert _final(tmp_path)["global_step"] == 16 and (tmp_path / "encoder.pth").is_file()
    with pytest.raises(P.ConfigError, match=r"CHECKPOINT_KEEP: expected >= 0 \(0 = keep all\), got -1"):
        make_cfg(images, tmp_path, "CHECKPOINT_KEEP", "-1")


def test_a_fresh_start_sets_an_earlier_runs_checkpoints_aside(images, tmp_path):
    # Left in place (before 2026-12-08), a --resume of the new run killed before its first checkpoint (a requeued
    # job adds --resume) continued the earlier run.
    P.run_pretrain(make_cfg(images, tmp_path, "SOLVER.EPOCHS", "2"))
    earlier = _final(tmp_path)
    P.run_pretrain(make_cfg(images, tmp_path, "SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0"))
    aside = tmp_path / "earlier_run_1"
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint_0001.pth", "checkpoint_0002.pth", "last_checkpoint"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pth")) == ["checkpoint_0001.pth"]
    assert _final(tmp_path)["global_step"] == 4 and _final(aside)["global_step"] == earlier["global_step"] == 8
    assert f"{tmp_path} holds checkpoints of an earlier run: starting from scratch (--resume continues instead); " \
           f"moved them to {aside}" in (tmp_path / "log.txt").read_text()
    # initial weights from one of the folder's own checkpoints are loaded before it is moved aside
    P.run_pretrain(make_cfg(images, tmp_path, "SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0", "MODEL.WEIGHTS",
                            str(tmp_path / "checkpoint_0001.pth")))
    assert (tmp_path / "earlier_run_2" / "checkpoint_0001.pth").is_file() and _final(tmp_path)["global_step"] == 4


def test_resume_with_changed_settings_says_which(images, tmp_path):
    P.run_pretrain(make_cfg(images, tmp_path, "SOLVER.EPOCHS", "2"))
    P.run_pretrain(make_cfg(images, tmp_path, "SOLVER.EPOCHS", "2"), resume=True)
    assert "changed since its last launch" not in (tmp_path / "log.txt").read_text()
    P.run_pretrain(make_cfg(images, tmp_path, "SOLVER.EPOCHS", "3", "MODEL.MASK_RATIO", "0.5"), resume=True)
    warned = [x for x in (tmp_path / "log.txt").read_text().splitlines() if "changed since its last launch" in x]
    assert len(warned) == 1 and warned[0].endswith("MODEL.MASK_RATIO: 0.75 -> 0.5; SOLVER.EPOCHS: 2 -> 3")
    assert _final(tmp_path)["epoch"] == 3  # and the run goes on with them


@pytest.mark.filterwarnings("ignore:Detected call of .lr_scheduler.step")  # the schedule alone, stepped below
def test_resume_trains_with_the_changed_lr_and_weight_decay(images, tmp_path):
    # the optimizer's and scheduler's states brought back the checkpoint's lr and weight decay: the log and
    # config.yaml said 5e-3 / 0.5 while the run went on at 1e-3 / 0.05
    P.run_pretrain(make_cfg(images, tmp_path, "SOLVER.EPOCHS", "2"))
    cfg = make_cfg(images, tmp_path, "SOLVER.EPOCHS", "2", "SOLVER.LR", "5e-3", "SOLVER.WEIGHT_DECAY", "0.5")
    trainer = P.Pretrainer(cfg, resume=True)
    fresh = P.Pretrainer(cfg)  # the same config, started over: the schedule a resume must follow
    assert trainer.restore() and trainer.global_step == 8
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [
        g["weight_decay"] for g in fresh.optimizer.param_groups] and 0.5 in [
        g["weight_decay"] for g in trainer.optimizer.param_groups]
    assert trainer.scheduler.base_lrs == [5e-3] * len(trainer.optimizer.param_groups)
    for _ in range(trainer.global_step):
        fresh.scheduler.step()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [g["lr"] for g in fresh.optimizer.param_groups]
    assert trainer.optimizer.state_dict()["state"]  # the AdamW moments stay the checkpoint's


def test_resume_with_other_batch_is_refused(images, tmp_path):
    P.run_pretrain(make_cfg(images, tmp_path, "SOLVER.EPOCHS", "2"))
    recorded = (tmp_path / "config.yaml").read_text(), (tmp_path / "run_info.json").read_text()
    with pytest.raises(CheckpointError, match="effective batch 8 .* now gives 4"):
        P.run_pretrain(make_cfg(images, tmp_path, "SOLVER.EPOCHS", "2", "SOLVER.BATCH_SIZE", "4"), resume=True)
    # a refused resume leaves the run's record alone (the next resume warned about a batch it never trained with)
    assert ((tmp_path / "config.yaml").read_text(), (tmp_path / "run_info.json").read_text()) == recorded


def test_failed_checkpoint_write_keeps_the_previous_one(images, tmp_path, monkeypatch):
    real_save, calls = torch.save, {"n": 0}

    def failing_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError) as info:
        P.run_pretrain(make_cfg(images, tmp_path))
    assert str(tmp_path / "checkpoint_0002.pth") in str(info.value) and "No space left" in str(info.value)
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text().strip() == "checkpoint_0001.pth"
    assert load_checkpoint(tmp_path / "checkpoint_0001.pth")["epoch"] == 1
    assert not (tmp_path / "checkpoint_0002.pth").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(images, tmp_path):
    # A learning rate far too high: the weights blow up within a few steps, as in a real divergence.
    cfg = make_cfg(images, tmp_path, "SOLVER.LR", "1e6", "SOLVER.WARMUP_EPOCHS", "2", "SOLVER.EPOCHS", "4",
                   "SOLVER.CHECKPOINT_ITER_PERIOD", "1")
    with pytest.raises(P.NonFiniteLossError) as info:
        P.run_pretrain(cfg)
    msg = str(info.value)
    step = int(msg.split("global step ")[1].split(")")[0].split(";")[0].split(",")[0])
    last = (tmp_path / "last_checkpoint").read_text().strip()
    assert f"last good checkpoint: {tmp_path / last}" in msg
    ckpt = load_checkpoint(tmp_path / last)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    if "loss_mae = " in msg:  # the loss of the step after the checkpoint overflowed; that step was not taken
        assert ("loss_mae = nan" in msg or "loss_mae = inf" in msg) and ckpt["global_step"] == step - 1
    else:  # the update itself overflowed the weights: that checkpoint was refused
        assert "parameters became non-finite" in msg and ckpt["global_step"] == step - 1
    assert max(r["step"] for r in records(tmp_path, "train")) <= step
    saved = [p.name for p in tmp_path.glob("checkpoint_*.pth")]
    assert max(saved) == last


def test_corrupt_images_are_counted_or_fail_the_run(images, tmp_path):
    data = tmp_path / "dirty"
    data.mkdir()
    for p in sorted(images.iterdir())[:30]:
        (data / p.name).write_bytes(p.read_bytes())
    (data / "zero.png").write_bytes(b"")
    (data / "text.jpg").write_text("not an image")
    P.run_pretrain(make_cfg(data, tmp_path / "ok", "SOLVER.EPOCHS", "2", "DATA.MAX_BAD_FRACTION", "0.1"))
    assert [r["bad_images"] for r in records(tmp_path / "ok", "epoch")] == [2, 2]
    log = (tmp_path / "ok" / "log.txt").read_text()
    assert "zero.png: empty file" in log and "text.jpg: not a recognized image format" in log
    with pytest.raises(DataError, match=r"of 32 images are unreadable or missing, more than DATA.MAX_BAD_FRACTION="):
        P.run_pretrain(make_cfg(data, tmp_path / "strict", "DATA.MAX_BAD_FRACTION", "0.01"))


def test_decoded_image_cache_gives_the_same_run_and_the_same_bad_image_counts(images, tmp_path):
    data = tmp_path / "dirty"
    data.mkdir()
    for p in sorted(images.iterdir())[:30]:
        (data / p.name).write_bytes(p.read_bytes())
    (data / "text.jpg").write_text("not an image")
    P.run_pretrain(make_cfg(data, tmp_path / "plain", "SOLVER.EPOCHS", "2", "DATA.MAX_BAD_FRACTION", "0.1"))
    # A budget of 20 of the 30 40-px images: some come from memory, the others are decoded again every epoch.
    P.run_pretrain(make_cfg(data, tmp_path / "cached", "SOLVER.EPOCHS", "2", "DATA.MAX_BAD_FRACTION", "0.1",
                            "DATA.CACHE_DECODED_MB", str(20 * 40 * 40 * 3 / 2**20)))
    a, b = _final(tmp_path / "plain")["model"], _final(tmp_path / "cached")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["bad_images"] for r in records(tmp_path / "cached", "epoch")] == [1, 1]
    assert "decoded-image cache full (20 images" in (tmp_path / "cached" / "log.txt").read_text()


def test_empty_and_too_small_datasets(tmp_path, images):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: no images found"):
        P.run_pretrain(make_cfg(tmp_path / "empty", tmp_path / "o1"))
    with pytest.raises(DataError, match="32 images are fewer than one optimizer step of 64"):
        P.run_pretrain(make_cfg(images, tmp_path / "o2", "SOLVER.BATCH_SIZE", "64"))


def _coco_pool(root: Path, images: Path) -> Path:
    files = sorted(images.iterdir())
    anns = [{"id": i, "image_id": i, "category_id": 3 if i % 2 else 7, "bbox": [0, 0, 1, 1]} for i in range(len(files))]
    anns += [{"id": 100 + i, "image_id": i, "category_id": 9, "bbox": [0, 0, 1, 1]} for i in range(0, len(files), 3)]
    data = {"images": [{"id": i, "file_name": p.name} for i, p in enumerate(files)], "annotations": anns,
            "categories": [{"id": c, "name": f"c{c}"} for c in (3, 7, 9)]}
    path = root / "pool.json"
    path.write_text(json.dumps(data))
    return path


def test_supervised_mode_trains_and_exports_like_mae(images, tmp_path, trained):
    ann = _coco_pool(tmp_path, images)
    cfg = make_cfg(ann, tmp_path / "sup", "MODEL.MODE", "supervised", "DATA.IMAGE_ROOT", str(images),
                   "SOLVER.EPOCHS", "6", "SOLVER.LR", "3e-3")
    P.run_pretrain(cfg)
    losses = [r["loss"] for r in records(tmp_path / "sup", "epoch")]
    assert losses[-1] < losses[0], losses
    ckpt = torch.load(tmp_path / "sup" / "checkpoint_0006.pth", weights_only=True)
    assert ckpt["meta"]["mode"] == "supervised" and ckpt["meta"]["num_classes"] == 3
    assert ckpt["model"]["head.weight"].shape == (3, 64)
    sup = torch.load(tmp_path / "sup" / "encoder.pth", weights_only=True)["model"]
    mae = torch.load(trained / "encoder.pth", weights_only=True)["model"]
    assert list(sup) == list(mae) and all(sup[k].shape == mae[k].shape for k in sup)
    assert torch.equal(sup["pos_embed"], mae["pos_embed"])  # the same fixed sin-cos table
    # the checkpoint reader of detection fine-tuning sees both exports alike, and drops the head of the full one
    enc_sup, info_sup = load_encoder_state(tmp_path / "sup" / "encoder.pth")
    enc_mae, info_mae = load_encoder_state(trained / "encoder.pth")
    assert info_sup["format"] == info_mae["format"] == "ours" and list(enc_sup) == list(enc_mae)
    _, info_full = load_encoder_state(tmp_path / "sup" / "checkpoint_0006.pth")
    assert info_full["dropped"] == ["head.weight", "head.bias"]


def test_count_head_is_a_softmax_over_count_bins_per_class():
    torch.manual_seed(0)
    model = P.SupervisedViT(3, "mean", max_count=2, img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    assert model.head.out_features == 3 * 3
    imgs, targets = torch.randn(2, 3, 16, 16), torch.tensor([[0.0, 1.0, 5.0], [2.0, 0.0, 1.0]])
    loss, logits = model(imgs, targets)
    assert logits.shape == (2, 3, 3)
    bins = torch.tensor([[0, 1, 2], [2, 0, 1]])  # 5 instances fall in the last bin, "2 or more"
    expected = torch.nn.functional.cross_entropy(logits.reshape(6, 3), bins.reshape(6))
    assert torch.allclose(loss, expected)
    presence = P.SupervisedViT(3, "mean", img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    assert presence(imgs, (targets > 0).float())[1].shape == (2, 3)


def test_supervised_mode_needs_labels(images, tmp_path):
    with pytest.raises(DataError, match="supervised mode needs labels"):
        P.run_pretrain(make_cfg(images, tmp_path, "MODEL.MODE", "supervised"))


def test_bf16_path_runs(images, tmp_path, monkeypatch):
    cfg = make_cfg(images, tmp_path, "PRECISION", "bf16", "SOLVER.EPOCHS", "2", "SOLVER.WARMUP_EPOCHS", "0",
                   "MODEL.DEPTH", "1", "SOLVER.BATCH_SIZE", "16")
    t = P.Pretrainer(cfg)
    assert t.precision == "bf16"
    # the dtype a real layer computes in inside each training step: bf16 under the step's autocast
    real_forward, qkv_dtypes = P.Pretrainer._forward, []

    def forward(self, batch):
        hook = self.model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: qkv_dtypes.append(out.dtype))
        try:
            return real_forward(self, batch)
        finally:
            hook.remove()

    monkeypatch.setattr(P.Pretrainer, "_forward", forward)
    P.run_pretrain(cfg)
    assert qkv_dtypes == [torch.bfloat16] * 4  # 2 epochs x 2 steps
    losses = [r["loss"] for r in records(tmp_path, "train")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


def test_resolve_precision_auto():
    cpu = torch.device("cpu")
    expected = "bf16" if bf16_native("cpu") else "fp32"
    assert P.resolve_precision("auto", cpu) == expected
    assert P.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        P.resolve_precision("fp16", cpu)


@pytest.mark.parametrize("channels", [(), ("MODEL.IN_CHANS", "1", "DATA.MEAN", "(0.5,)", "DATA.STD", "(0.25,)")],
                         ids=["rgb", "grayscale"])
def test_knn_monitor_logs_at_its_period(images, tmp_path, channels):
    # grayscale: the monitor feeds the encoder what pretraining does (it gave it 3 ImageNet-normalized channels)
    for split in ("train", "val"):
        for cls, seed in (("a", 0), ("b", 50)):
            write_textures(tmp_path / "knn" / split / cls, 4, size=32, seed=seed + (split == "val"))
    cfg = make_cfg(images, tmp_path / "out", "MONITOR.KNN.ENABLED", "True", "MONITOR.KNN.PERIOD", "2",
                   "MONITOR.KNN.TRAIN_ROOT", str(tmp_path / "knn" / "train"),
                   "MONITOR.KNN.VAL_ROOT", str(tmp_path / "knn" / "val"), "MONITOR.KNN.K", "3", *channels)
    P.run_pretrain(cfg)
    epochs = records(tmp_path / "out", "epoch")
    with_knn = [r["epoch"] for r in epochs if "knn_top1" in r]
    assert with_knn == [2, 3]  # every 2 epochs, and after the last
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in epochs if "knn_top1" in r)
    assert "kNN top-1" in (tmp_path / "out" / "log.txt").read_text()


def test_non_finite_loss_skips_every_update_until_the_next_check(images, tmp_path, monkeypatch):
    # LOG_PERIOD 4: the host sees the losses once per epoch (4 steps); a NaN loss in step 2 must not reach the
    # weights, nor must the updates of steps 3 and 4 taken before the check, which then names step 2.
    real_forward, real_step, calls, weights = P.Pretrainer._forward, P.Pretrainer._optimizer_step, {"n": 0}, []

    def forward(self, batch):
        calls["n"] += 1
        loss = real_forward(self, batch)
        return loss * float("nan") if calls["n"] == 2 else loss

    def step(self):
        real_step(self)
        weights.append({k: v.clone() for k, v in self.model.state_dict().items()})

    monkeypatch.setattr(P.Pretrainer, "_forward", forward)
    monkeypatch.setattr(P.Pretrainer, "_optimizer_step", step)
    t = P.Pretrainer(make_cfg(images, tmp_path, "LOG_PERIOD", "4", "SOLVER.WARMUP_EPOCHS", "0"))
    t.out.mkdir(parents=True, exist_ok=True)
    initial = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(P.NonFiniteLossError) as info:
        t.train()
    # numbered as metrics.jsonl numbers its steps (it said "iteration 1 (global step 1)": the step logged healthy)
    assert str(info.value) == ("loss_mae = nan at epoch 1, iteration 2 (global step 2, as metrics.jsonl counts); the "
                               "weights were not updated with it nor in the 2 steps until this check; last good "
                               "checkpoint: none written yet")
    assert len(weights) == 4  # no host sync stopped the steps in between
    assert any(not torch.equal(initial[k], weights[0][k]) for k in initial)  # step 1 was a real update
    for later in weights[1:]:
        assert all(torch.equal(weights[0][k], later[k]) for k in initial)
    assert all(int(s["step"]) == 1 for s in t.optimizer.state.values())  # AdamW's count skipped them too
    assert not (tmp_path / "metrics.jsonl").exists() or not records(tmp_path, "train")


# ---- MODEL.WEIGHTS: a run that starts from a checkpoint ------------------------------------------------------
def _mae(seed: int, **over):
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
              decoder_num_heads=2) | over
    torch.manual_seed(seed)
    return P.MAE_FACTORIES["mae_vit_tiny_patch16"](**kw)


def test_initial_weights_take_encoder_and_decoder_and_keep_the_fixed_tables(trained, tmp_path):
    full = torch.load(trained / "checkpoint_0008.pth", weights_only=True)["model"]
    model = _mae(1)
    info = P.load_initial_weights(model, trained / "checkpoint_0008.pth")
    assert info["format"] == "ours" and info["decoder"] == "loaded"
    assert all(torch.equal(v, full[k]) for k, v in model.state_dict().items())
    # the same weights as a Hugging Face ViTMAEForPreTraining state dict
    torch.save(mae_to_hf(full), tmp_path / "pytorch_model.bin")
    model = _mae(2)
    assert P.load_initial_weights(model, tmp_path / "pytorch_model.bin")["format"] == "hf"
    assert all(torch.equal(v, full[k]) for k, v in model.state_dict().items())
    # an encoder-only release (the official mae_pretrain_vit_*.pth layout): the decoder keeps its random init
    torch.save({"model": P.encoder_state_dict(full)}, tmp_path / "official_encoder.pth")
    model, fresh = _mae(1), _mae(1).state_dict()
    assert P.load_initial_weights(model, tmp_path / "official_encoder.pth")["decoder"] == "random"
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k] if k in P.encoder_state_dict(full) else fresh[k]), k
    # another image size: the weights load, the fixed sin-cos tables stay exact for the model's own grid
    model, fresh = _mae(1, img_size=48), _mae(1, img_size=48).state_dict()
    P.load_initial_weights(model, trained / "checkpoint_0008.pth")
    assert model.pos_embed.shape == (1, 37, 64)
    assert torch.equal(model.pos_embed, fresh["pos_embed"]) and torch.equal(model.decoder_pos_embed,
                                                                             fresh["decoder_pos_embed"])
    assert torch.equal(model.blocks[1].mlp.fc2.weight, full["blocks.1.mlp.fc2.weight"])


def test_initial_weights_that_do_not_fit_are_one_line_errors(trained):
    path = trained / "checkpoint_0008.pth"
    with pytest.raises(CheckpointError, match=r"checkpoint_0008.pth: decoder key 'mask_token' has shape \(1, 1, 32\), the "
                                             r"model's is \(1, 1, 48\)"):
        P.load_initial_weights(_mae(0, decoder_embed_dim=48, decoder_num_heads=2), path)
    with pytest.raises(CheckpointError, match=r"checkpoint_0008.pth: its MAE decoder does not match .* 'decoder_blocks\.1"):
        P.load_initial_weights(_mae(0, decoder_depth=2), path)
    with pytest.raises(CheckpointError, match=r"checkpoint_0008.pth: 2 blocks but the model has depth 3"):
        P.load_initial_weights(_mae(0, depth=3), path)


def test_supervised_run_from_mae_weights_and_resume_precedence(images, tmp_path, trained):
    ann = _coco_pool(tmp_path, images)
    mae_enc = torch.load(trained / "encoder.pth", weights_only=True)["model"]
    opts = ("MODEL.MODE", "supervised", "DATA.IMAGE_ROOT", str(images), "SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0",
            "MODEL.WEIGHTS", str(trained / "checkpoint_0008.pth"))
    out = tmp_path / "sup"
    P.run_pretrain(make_cfg(ann, out, *opts, "SOLVER.LR", "1e-12"))  # steps too small to move the weights
    got = torch.load(out / "encoder.pth", weights_only=True)["model"]
    assert all(torch.allclose(got[k], mae_enc[k], rtol=0, atol=1e-8) for k in mae_enc)
    P.run_pretrain(make_cfg(ann, out, *opts))
    info = json.loads((out / "run_info.json").read_text())
    assert info["init_type"] == "pretrained" and info["init_checkpoint"].endswith("checkpoint_0008.pth")
    assert len(info["init_checkpoint_sha256"]) == 64
    trained_once = torch.load(out / "checkpoint_0001.pth", weights_only=True)["model"]
    assert not torch.equal(trained_once["blocks.0.attn.qkv.weight"], mae_enc["blocks.0.attn.qkv.weight"])
    # --resume of that finished run to 2 epochs continues from its checkpoint, not from MODEL.WEIGHTS again
    P.run_pretrain(make_cfg(ann, out, *opts, "SOLVER.EPOCHS", "2"), resume=True)
    assert "resumed from" in (out / "log.txt").read_text()
    assert "initial weights" not in (out / "log.txt").read_text().split("resumed from")[-1]


def test_missing_initial_weights_file_is_a_config_error(images, tmp_path):
    with pytest.raises(Exception, match=r"MODEL.WEIGHTS: checkpoint file '.*nope.pth' not found"):
        make_cfg(images, tmp_path, "MODEL.WEIGHTS", str(tmp_path / "nope.pth"))
    (tmp_path / "run").mkdir()  # a folder exists: it was called "not found"
    (tmp_path / "run" / "encoder.pth").write_bytes(b"")
    with pytest.raises(Exception, match=r"MODEL.WEIGHTS: .*run is a folder, not a checkpoint file; pass the weights "
                                        r"file inside it \(there: encoder.pth\)"):
        make_cfg(images, tmp_path, "MODEL.WEIGHTS", str(tmp_path / "run"))


# ---- hostile inputs (audit of 2026-12-05) -------------------------------------------------------------------
def test_newest_checkpoint_orders_by_epoch_then_step_and_ignores_other_files(tmp_path):
    assert P.newest_checkpoint(tmp_path) is None and P.newest_checkpoint(tmp_path / "absent") is None
    for name in ("checkpoint_0002.pth", "checkpoint_0009_000120.pth", "checkpoint_0010.pth",
                 "checkpoint_0010_000003.pth", ".checkpoint_0011.pth.x1y2.tmp", "checkpoint_0012.pth.tmp",
                 "checkpoint_final.pth", "encoder.pth"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "checkpoint_0013.pth").mkdir()
    assert P.newest_checkpoint(tmp_path) == tmp_path / "checkpoint_0010_000003.pth"


def test_resume_without_the_pointer_continues_from_the_newest_checkpoint(images, tmp_path):
    cfg = make_cfg(images, tmp_path, "SOLVER.EPOCHS", "3")
    P.run_pretrain(cfg)
    final = _final(tmp_path)
    (tmp_path / "last_checkpoint").unlink()  # deleted by hand, or a kill between the first checkpoint and it
    (tmp_path / "checkpoint_0003.pth").unlink()
    kept = {n: (tmp_path / n).stat() for n in ("checkpoint_0001.pth", "checkpoint_0002.pth")}
    P.run_pretrain(cfg, resume=True)
    log = (tmp_path / "log.txt").read_text()
    # Until 2026-12-05 this started over from step 0 and rewrote every checkpoint.
    assert (f"{tmp_path / 'last_checkpoint'} is missing: resuming from the newest checkpoint file, "
            f"checkpoint_0002.pth") in log and "(epoch 2, step 0 of the epoch)" in log
    for name, st in kept.items():
        now = (tmp_path / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{name} was rewritten"
    again = _final(tmp_path)
    assert again["global_step"] == 12 and all(torch.equal(final["model"][k], again["model"][k]) for k in final["model"])
    # an empty pointer is no pointer (it said the run folder itself "is a folder, not a checkpoint file")
    (tmp_path / "last_checkpoint").write_text("\n")
    (tmp_path / "checkpoint_0003.pth").unlink()
    P.run_pretrain(cfg, resume=True)
    assert (f"{tmp_path / 'last_checkpoint'} is empty: resuming from the newest checkpoint file, "
            f"checkpoint_0002.pth") in (tmp_path / "log.txt").read_text()
    assert _final(tmp_path)["global_step"] == 12


def test_unusable_knn_monitor_folders_fail_before_training(images, tmp_path):
    for split, classes in (("train", ("a", "b")), ("val", ("a", "c"))):
        for cls in classes:
            write_textures(tmp_path / "knn" / split / cls, 2, size=32)
    cfg = make_cfg(images, tmp_path / "out", "MONITOR.KNN.ENABLED", "True",
                   "MONITOR.KNN.TRAIN_ROOT", str(tmp_path / "knn" / "train"),
                   "MONITOR.KNN.VAL_ROOT", str(tmp_path / "knn" / "val"), "MONITOR.KNN.K", "3")
    # The monitor used to find this after its first period of training (here one epoch; days on ImageNet).
    with pytest.raises(ClassificationDataError, match=r"val has class folder\(s\) \['c'\] that are not among"):
        P.run_pretrain(cfg)
    assert not list((tmp_path / "out").glob("checkpoint_*"))
    (tmp_path / "knn" / "train" / "b" / "000.png").unlink()
    (tmp_path / "knn" / "train" / "b" / "001.png").unlink()
    with pytest.raises(ClassificationDataError, match=r"class folder .*train/b has no image files"):
        P.run_pretrain(cfg)


def test_a_folder_without_a_readable_image_says_so(tmp_path):
    (tmp_path / "bad").mkdir()
    for i in range(8):
        (tmp_path / "bad" / f"{i}.jpg").write_bytes(b"")
    # It used to read "8 of 8 images are unreadable or missing, more than DATA.MAX_BAD_FRACTION=1.0 allows (8)".
    with pytest.raises(DataError, match=f"^{tmp_path / 'bad'}: none of the 8 images is readable; see the log"):
        P.run_pretrain(make_cfg(tmp_path / "bad", tmp_path / "out", "DATA.MAX_BAD_FRACTION", "1.0"))


def test_a_kill_around_the_epoch_checkpoint_keeps_every_epoch_record(images, tmp_path, monkeypatch):
    # Killed while writing epoch 2's record (e.g. in the kNN monitor before it), or just after epoch 2's
    # checkpoint: the resumed run must end with the uninterrupted run's records and weights.
    P.run_pretrain(make_cfg(images, tmp_path / "ref"))
    real_metrics, real_save = P.Pretrainer._metrics, P.Pretrainer.save_checkpoint

    def kill_in_record(self, record):
        if record["type"] == "epoch" and record["epoch"] == 2:
            raise _Interrupt
        real_metrics(self, record)

    def kill_after_checkpoint(self):
        path = real_save(self)
        if self.epoch == 2:
            raise _Interrupt
        return path

    starts = _train_starts(monkeypatch)
    # killed before epoch 2's checkpoint: redone from epoch 1's (step 4); killed after it: from epoch 2's (step 8)
    for name, patch, resumed_at in (("_metrics", kill_in_record, 4), ("save_checkpoint", kill_after_checkpoint, 8)):
        cut = tmp_path / name
        with monkeypatch.context() as m:
            m.setattr(P.Pretrainer, name, patch)
            with pytest.raises(_Interrupt):
                P.run_pretrain(make_cfg(images, cut))
        starts.clear()
        P.run_pretrain(make_cfg(images, cut), resume=True)
        assert starts == [(resumed_at, 0)], name
        for kind in ("train", "epoch"):
            assert [(r["epoch"], r["step"], r["loss"]) for r in records(cut, kind)] == [
                (r["epoch"], r["step"], r["loss"]) for r in records(tmp_path / "ref", kind)], (name, kind)
        ref, got = _final(tmp_path / "ref")["model"], _final(cut)["model"]
        assert all(torch.equal(ref[k], got[k]) for k in ref), name


def test_tensorboard_keeps_the_scalars_of_the_checkpoint_step_after_a_resume(images, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with monkeypatch.context() as m:
        _interrupt_after(m, 10)  # 4 steps per epoch: resumed from checkpoint_0002.pth, global step 8
        with pytest.raises(_Interrupt):
            P.run_pretrain(make_cfg(images, tmp_path))
    assert (tmp_path / "last_checkpoint").read_text().strip() == "checkpoint_0002.pth"
    starts = _train_starts(monkeypatch)
    P.run_pretrain(make_cfg(images, tmp_path), resume=True)
    assert starts == [(8, 0)]  # steps 1-8 come from the first run's event file, not from a rerun
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))
    assert [e.step for e in events.Scalars("epoch/loss")] == [4, 8, 12]
    logged = [r["loss"] for r in records(tmp_path, "epoch")]
    assert [e.value for e in events.Scalars("epoch/loss")] == pytest.approx(logged)


def test_truncate_metrics_keeps_the_complete_records_up_to_the_position(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = ['{"type": "train", "step": 1, "epoch": 0.5}', '{"type": "epoch", "step": 2, "epoch": 1}', "[3]",
             '{"type": "note"}', '{"type": "train", "step": 3, "epoch": 1.5}', '{"type": "train", "st']
    path.write_text("\n".join(lines))  # the last line was cut short by a kill
    P.truncate_metrics(path, 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    P.truncate_metrics(path, 0.5, key="epoch")
    assert path.read_text() == lines[0] + "\n"
    P.truncate_metrics(path, 0)
    assert path.read_text() == ""
    P.truncate_metrics(tmp_path / "absent.jsonl", 0)
    assert not (tmp_path / "absent.jsonl").exists()


def _dirty_copy(images: Path, root: Path, n: int) -> Path:
    """``n`` of the images plus one unreadable file, 012_bad.png."""
    root.mkdir(parents=True)
    for p in sorted(images.iterdir())[:n]:
        (root / p.name).write_bytes(p.read_bytes())
    (root / "012_bad.png").write_text("not an image")
    return root


def test_a_resume_on_a_changed_folder_warns_and_takes_the_unreadable_files_by_name(images, tmp_path, monkeypatch):
    data = _dirty_copy(images, tmp_path / "data", 25)  # 26 files: 3 steps of 8
    opts = ["SOLVER.EPOCHS", "5", "DATA.MAX_BAD_FRACTION", "0.2", "SOLVER.CHECKPOINT_ITER_PERIOD", "2"]
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(_Interrupt):
            P.run_pretrain(make_cfg(data, tmp_path / "out", *opts))
    cut = _final(tmp_path / "out")
    assert cut["bad_indices"].tolist() == [13] and cut["bad_files"] == ["012_bad.png"]
    assert (cut["meta"]["num_images"], len(cut["meta"]["images_hash"])) == (26, 32)
    for name in ("000a.png", "000b.png"):  # sorted first: every index moves by 2, the steps stay 3
        (data / name).write_bytes((data / "000.png").read_bytes())
    P.run_pretrain(make_cfg(data, tmp_path / "out", *opts), resume=True)
    # the checkpoint's index 13 was another, readable, file now: the one unreadable file counted twice
    assert [r["bad_images"] for r in records(tmp_path / "out", "epoch")] == [1] * 5
    assert _final(tmp_path / "out")["bad_files"] == ["012_bad.png"]
    log = (tmp_path / "out" / "log.txt").read_text()
    assert (f"WARNING resuming from {tmp_path / 'out' / 'checkpoint_0000_000002.pth'} on other images: it was trained "
            f"on 26, {data} now lists 28 (files added, removed, renamed or reordered); the data order follows the "
            "new listing, so the run does not repeat one on the old images") in log
    # more files that change the steps per epoch: the refusal names the folder, not the config
    for i in range(4):
        (data / f"100{i}.png").write_bytes((data / "000.png").read_bytes())
    with pytest.raises(CheckpointError) as info:
        P.run_pretrain(make_cfg(data, tmp_path / "out", *opts), resume=True)
    assert str(info.value) == (f"cannot resume from {tmp_path / 'out' / 'checkpoint_0005.pth'}: it was trained on 28 "
                               f"images with effective batch 8 and 3 steps per epoch; {data} now lists 32 images, "
                               "which give 8 and 4")


def test_a_checkpoint_without_the_listing_resumes_as_before(images, tmp_path, monkeypatch):
    # checkpoints written before the images' listing was recorded: their sample indices are taken as they are
    data = _dirty_copy(images, tmp_path / "data", 25)
    opts = ["SOLVER.EPOCHS", "2", "DATA.MAX_BAD_FRACTION", "0.2", "SOLVER.CHECKPOINT_ITER_PERIOD", "2"]
    P.run_pretrain(make_cfg(data, tmp_path / "ref", *opts))
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(_Interrupt):
            P.run_pretrain(make_cfg(data, tmp_path / "cut", *opts))
    path = tmp_path / "cut" / "checkpoint_0000_000002.pth"
    old = torch.load(path, weights_only=True)
    del old["bad_files"], old["meta"]["num_images"], old["meta"]["images_hash"]
    torch.save(old, path)
    P.run_pretrain(make_cfg(data, tmp_path / "cut", *opts), resume=True)
    ref, cut = _final(tmp_path / "ref"), _final(tmp_path / "cut")
    assert all(torch.equal(ref["model"][k], cut["model"][k]) for k in ref["model"])
    assert [r["bad_images"] for r in records(tmp_path / "cut", "epoch")] == [1, 1]
    assert "other images" not in (tmp_path / "cut" / "log.txt").read_text()


def test_a_folder_that_cannot_be_listed_is_named_in_the_log(images, tmp_path, monkeypatch):
    import os

    data = tmp_path / "data"
    for i, p in enumerate(sorted(images.iterdir())[:16]):
        (data / ("locked" if i % 2 else "open")).mkdir(parents=True, exist_ok=True)
        (data / ("locked" if i % 2 else "open") / p.name).write_bytes(p.read_bytes())
    real = os.scandir

    def scandir(path="."):  # as a folder without read permission (chmod does not stop root)
        if os.fspath(path) == str(data / "locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    P.run_pretrain(make_cfg(data, tmp_path / "out", "SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0"))
    log = (tmp_path / "out" / "log.txt").read_text()
    assert f"WARNING cannot list folder {data / 'locked'} (Permission denied): its images are left out" in log
    assert f"on 8 images ({data}; folders that could not be listed: 1): 1 processes" in log


def _two_ranks(rank: int, port: int, cfg, interrupt: int, resume: bool) -> None:
    """One of two gloo ranks of a run (``interrupt``: stopped after that many optimizer steps, as by a kill)."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if interrupt:
        with pytest.MonkeyPatch.context() as m:
            _interrupt_after(m, interrupt)
            with pytest.raises(_Interrupt):
                P.run_pretrain(cfg)
    else:
        P.run_pretrain(cfg, resume=resume)


@pytest.mark.slow
def test_two_ranks_checkpoint_the_unreadable_images_of_both(tmp_path):
    import socket

    import torch.multiprocessing as mp

    data = write_textures(tmp_path / "data", 12, size=20)
    for i in range(4):
        (data / f"{i:03d}_bad.png").write_text("not an image")
    opts = ["SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0", "MODEL.IMG_SIZE", "16", "DATA.MAX_BAD_FRACTION", "0.5",
            "SOLVER.CHECKPOINT_ITER_PERIOD", "2"]
    # one process with the global batch of two: the same batches, so the same unreadable images at every step
    P.run_pretrain(make_cfg(data, tmp_path / "one", *opts, "SOLVER.BATCH_SIZE", "4"))
    cfg = make_cfg(data, tmp_path / "two", *opts, "SOLVER.BATCH_SIZE", "2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_ranks, args=(port, cfg, 3, False), nprocs=2)
    assert (tmp_path / "two" / "last_checkpoint").read_text().strip() == "checkpoint_0000_000002.pth"
    mp.spawn(_two_ranks, args=(port, cfg, 0, True), nprocs=2)
    # the mid-epoch checkpoint had rank 0's alone (epoch [3]); the train records counted rank 0's ([0, 0, 1, 3])
    for kind in ("epoch", "train"):
        bad = [[r["bad_images"] for r in records(tmp_path / run, kind)] for run in ("one", "two")]
        assert bad[0] == bad[1] == ([0, 1, 2, 4] if kind == "train" else [4]), kind
