"""Classification fine-tuning: learns, resumes exactly, loads every encoder format, rejects a wrong width."""
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import mae_det.engine.finetune_cls as F
from mae_det.checkpoint import CheckpointError, atomic_save, load_checkpoint
from mae_det.config.classification import get_cls_cfg, validate_cls_cfg
from mae_det.config.pretrain import ConfigError
from mae_det.data.classification import ClassificationDataError
from mae_det.checkpoint.convert import load_encoder_weights
from mae_det.engine.finetune_cls import ViTClassifier, build_classifier, build_encoder, finetune
from mae_det.modeling.mae import MaskedAutoencoderViT
from mae_det.modeling.vit import VisionTransformer

TINY = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4)
COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 220)]


pytestmark = pytest.mark.usefixtures("one_thread")


def color_folders(root: Path, n_train: int, n_val: int) -> None:
    """Solid colors per class plus noise: easily separable, so a few steps must beat chance."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, color in enumerate(COLORS):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(color) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")


def tiny_cfg(root: Path, out: Path, **over):
    cfg = get_cls_cfg()
    cfg.MODEL.ARCH = "vit_tiny_patch16"
    cfg.MODEL.EMBED_DIM, cfg.MODEL.DEPTH, cfg.MODEL.NUM_HEADS, cfg.MODEL.PATCH_SIZE = 64, 2, 4, 8
    cfg.MODEL.IMG_SIZE = 32
    cfg.DATA.TRAIN_ROOT, cfg.DATA.VAL_ROOT = str(root / "train"), str(root / "val")
    cfg.DATA.NUM_WORKERS = 0
    cfg.DATA.CROP_PCT = 1.0
    cfg.AUG.MIXUP = cfg.AUG.CUTMIX = 0.0
    cfg.AUG.RAND_AUGMENT = "rand-m9-mstd0.5-inc1-mmax9"
    cfg.AUG.REPROB = 0.0
    cfg.AUG.LABEL_SMOOTHING = 0.1
    cfg.AUG.SCALE = (0.5, 1.0)
    cfg.SOLVER.EPOCHS = 4
    cfg.SOLVER.WARMUP_EPOCHS = 1.0
    cfg.SOLVER.BATCH_SIZE = 12
    cfg.SOLVER.LR = 2e-3
    cfg.SOLVER.LAYER_DECAY = 0.75
    cfg.TEST.BATCH_SIZE = 32
    cfg.LOG_PERIOD = 2
    cfg.PRECISION = "fp32"
    cfg.DEVICE = "cpu"
    cfg.OUTPUT_DIR = str(out)
    for k, v in over.items():
        node, key = cfg, k.split(".")
        for part in key[:-1]:
            node = node[part]
        node[key[-1]] = v
    validate_cls_cfg(cfg)
    return cfg


def test_classifier_has_official_finetune_keys():
    gp = ViTClassifier(5, img_size=32, **TINY)
    keys = set(gp.state_dict())
    assert {"fc_norm.weight", "head.weight", "head.bias", "cls_token", "pos_embed"} <= keys
    assert not any(k.startswith("norm.") for k in keys)
    assert gp(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    cls = ViTClassifier(5, global_pool=False, img_size=32, **TINY)
    assert "norm.weight" in cls.state_dict() and not any(k.startswith("fc_norm") for k in cls.state_dict())


def test_finetune_raises_accuracy_above_chance(tmp_path):
    color_folders(tmp_path / "data", n_train=12, n_val=6)
    cfg = tiny_cfg(tmp_path / "data", tmp_path / "out", **{"REFERENCE.PUBLISHED_TOP1": 83.6})
    res = finetune(cfg, progress=False)
    assert res["finetune_top1"] >= 70.0  # chance is 33 %
    # A published reference is kept apart from the measured *_top1 keys that the comparison tables read.
    assert res["published"]["finetune_top1"]["value"] == 83.6
    assert [k for k in res if k.endswith("_top1")] == ["finetune_top1"]
    assert res["finetune_epochs"] == 4 and res["init"] == "random" and res["init_type"] == "random"
    assert (res["num_train"], res["num_val"], res["num_classes"]) == (36, 18, 3)
    assert "finetune_top5" not in res
    out = tmp_path / "out"
    assert (out / "run_info.json").is_file() and (out / "cls_results.json").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 + 6  # one record per epoch, one per LOG_PERIOD (2) of the 12 steps
    ckpt = load_checkpoint(out / (out / "last_checkpoint").read_text().strip())
    assert ckpt["epoch"] == 4 and ckpt["classes"] == ["c0", "c1", "c2"]


def _epochs_trained(monkeypatch) -> list[int]:
    """Records the (0-based) epoch of every training epoch that runs from now on."""
    real, epochs = F._train_one_epoch, []

    def train_one_epoch(*args, epoch, **kwargs):
        epochs.append(epoch)
        return real(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(F, "_train_one_epoch", train_one_epoch)
    return epochs


def _inode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns  # an atomic rewrite replaces the file: both change


def test_resume_continues_exactly(tmp_path, monkeypatch, caplog):
    color_folders(tmp_path / "data", n_train=8, n_val=2)
    over = {"SOLVER.EPOCHS": 2, "SOLVER.BATCH_SIZE": 8, "AUG.MIXUP": 0.8, "AUG.CUTMIX": 1.0}
    straight = finetune(tiny_cfg(tmp_path / "data", tmp_path / "a", **over), progress=False)
    finetune(tiny_cfg(tmp_path / "data", tmp_path / "b", **over), progress=False)
    b = tmp_path / "b"
    (b / "checkpoint_0002.pth").unlink()  # as if the run had been killed during epoch 2
    (b / "last_checkpoint").write_text("checkpoint_0001.pth")
    first = _inode(b / "checkpoint_0001.pth")
    epochs = _epochs_trained(monkeypatch)
    with caplog.at_level("INFO", logger="mae_det"):
        resumed = finetune(tiny_cfg(tmp_path / "data", b, **over), resume=True, progress=False)
    # only epoch 2 ran again, from epoch 1's checkpoint, which stays as it was
    assert epochs == [1] and f"resumed from {b / 'checkpoint_0001.pth'} at epoch 1" in caplog.text
    assert _inode(b / "checkpoint_0001.pth") == first
    sa, sb = load_checkpoint(tmp_path / "a" / "checkpoint_0002.pth"), load_checkpoint(b / "checkpoint_0002.pth")
    assert sa["model"].keys() == sb["model"].keys()
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert straight["finetune_top1"] == resumed["finetune_top1"]
    assert [r["epoch"] for r in sb["history"]] == [1, 2]


def test_checkpoint_keep_leaves_the_newest_and_resume_still_works(tmp_path, monkeypatch, caplog):
    color_folders(tmp_path / "data", n_train=8, n_val=2)
    over = {"SOLVER.EPOCHS": 3, "SOLVER.BATCH_SIZE": 8, "CHECKPOINT_KEEP": 1}
    res = finetune(tiny_cfg(tmp_path / "data", tmp_path / "a", **over), progress=False)
    a = tmp_path / "a"
    assert sorted(p.name for p in a.glob("checkpoint_*.pth")) == ["checkpoint_0003.pth"]
    kept, epochs = _inode(a / "checkpoint_0003.pth"), _epochs_trained(monkeypatch)
    with caplog.at_level("INFO", logger="mae_det"):
        again = finetune(tiny_cfg(tmp_path / "data", a, **over), resume=True, progress=False)  # finished
    # nothing retrained: no epoch ran and the checkpoint was not rewritten
    assert epochs == [] and f"resumed from {a / 'checkpoint_0003.pth'} at epoch 3" in caplog.text
    assert _inode(a / "checkpoint_0003.pth") == kept
    assert again["finetune_top1"] == res["finetune_top1"]
    with pytest.raises(ConfigError, match=r"CHECKPOINT_KEEP: expected >= 0 \(0 = keep all\), got -2"):
        tiny_cfg(tmp_path / "data", a, CHECKPOINT_KEEP=-2)


def test_resume_with_changed_settings_says_which(tmp_path, caplog):
    color_folders(tmp_path / "data", n_train=8, n_val=2)
    over = {"SOLVER.EPOCHS": 1, "SOLVER.BATCH_SIZE": 8, "SOLVER.WARMUP_EPOCHS": 0}
    finetune(tiny_cfg(tmp_path / "data", tmp_path / "a", **over), progress=False)
    with caplog.at_level("WARNING"):
        finetune(tiny_cfg(tmp_path / "data", tmp_path / "a", **over), resume=True, progress=False)
        assert "changed since its last launch" not in caplog.text
        finetune(tiny_cfg(tmp_path / "data", tmp_path / "a", **{**over, "SOLVER.EPOCHS": 2}), resume=True,
                 progress=False)
    assert "1 setting changed since its last launch" in caplog.text and "SOLVER.EPOCHS: 1 -> 2" in caplog.text
    # and a changed lr / weight decay is what the resumed epochs train with (the checkpoint's came back before)
    lr_wd = {"SOLVER.LR": 2e-3, "SOLVER.WEIGHT_DECAY": 0.3, "SOLVER.EPOCHS": 3}
    finetune(tiny_cfg(tmp_path / "data", tmp_path / "a", **{**over, **lr_wd}), resume=True, progress=False)
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoint_0003.pth")
    groups = ckpt["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.0, 0.3}
    assert [round(b, 12) for b in ckpt["scheduler"]["base_lrs"]] == [round(2e-3 * g["lr_scale"], 12) for g in groups]


def test_loader_workers_change_nothing(tmp_path, monkeypatch):
    # Augmentation draws come from (SEED, epoch, index): two loader workers train the very same weights as none.
    color_folders(tmp_path / "data", n_train=8, n_val=2)
    over = {"SOLVER.EPOCHS": 2, "SOLVER.BATCH_SIZE": 8, "AUG.MIXUP": 0.8, "AUG.REPROB": 0.25}
    real_loader, workers = F.folder_loader, []

    def folder_loader(*args, **kwargs):
        loader = real_loader(*args, **kwargs)
        workers.append(loader.num_workers)
        return loader

    monkeypatch.setattr(F, "folder_loader", folder_loader)
    runs = {}
    for w in (0, 2):
        workers.clear()
        runs[w] = finetune(tiny_cfg(tmp_path / "data", tmp_path / f"w{w}", **over, **{"DATA.NUM_WORKERS": w}),
                           progress=False)
        assert workers == [w] * 3  # the validation loader and the 2 epochs' training loaders
    assert runs[0]["finetune_top1"] == runs[2]["finetune_top1"]
    w0, w2 = (load_checkpoint(tmp_path / f"w{w}" / "checkpoint_0002.pth")["model"] for w in (0, 2))
    assert all(torch.equal(w0[k], w2[k]) for k in w0)


def test_decoded_image_cache_changes_nothing_and_needs_the_main_process(tmp_path, monkeypatch):
    color_folders(tmp_path / "data", n_train=8, n_val=2)
    over = {"SOLVER.EPOCHS": 2, "SOLVER.BATCH_SIZE": 8, "AUG.REPROB": 0.25}
    real_cache, caches = F.decoded_image_cache, []
    monkeypatch.setattr(F, "decoded_image_cache", lambda mb: caches.append(real_cache(mb)) or caches[-1])
    runs = {mb: finetune(tiny_cfg(tmp_path / "data", tmp_path / f"mb{mb}", **over, **{"DATA.CACHE_DECODED_MB": mb}),
                         progress=False) for mb in (0.0, 1.0)}
    # one cache a run: none for 0 MiB; 1 MiB holds, and was filled with, all 24 train and 6 val images of 40x40
    assert [c if c is None else len(c) for c in caches] == [None, 30]
    assert runs[0.0]["finetune_top1"] == runs[1.0]["finetune_top1"]
    a, b = (load_checkpoint(tmp_path / f"mb{mb}" / "checkpoint_0002.pth")["model"] for mb in (0.0, 1.0))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match=r"DATA.CACHE_DECODED_MB: .* set DATA.NUM_WORKERS 0 to use it \(got 2\)"):
        tiny_cfg(tmp_path / "data", tmp_path / "bad", **{"DATA.CACHE_DECODED_MB": 1.0, "DATA.NUM_WORKERS": 2})
    with pytest.raises(Exception, match=r"DATA.CACHE_DECODED_MB: expected >= 0 MiB \(0 = off\), got -1"):
        tiny_cfg(tmp_path / "data", tmp_path / "bad", **{"DATA.CACHE_DECODED_MB": -1.0})


def test_eval_period_zero_scores_only_the_last_epoch_with_the_same_top1(tmp_path):
    color_folders(tmp_path / "data", n_train=8, n_val=2)
    over = {"SOLVER.EPOCHS": 3, "SOLVER.BATCH_SIZE": 8, "AUG.MIXUP": 0.8}
    every = finetune(tiny_cfg(tmp_path / "data", tmp_path / "every", **over), progress=False)
    last = finetune(tiny_cfg(tmp_path / "data", tmp_path / "last", **over, **{"TEST.EVAL_PERIOD": 0}), progress=False)

    def evaluated(out: Path) -> list[int]:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["epoch"] for r in records if "val_top1" in r]

    assert evaluated(tmp_path / "every") == [1, 2, 3] and evaluated(tmp_path / "last") == [3]
    # Every epoch reseeds its randomness: skipping the evaluations leaves training, and the top-1, unchanged.
    assert last["finetune_top1"] == every["finetune_top1"]
    wa, wb = (load_checkpoint(tmp_path / d / "checkpoint_0003.pth")["model"] for d in ("every", "last"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(Exception, match=r"TEST.EVAL_PERIOD: expected >= 0 epochs \(0 = after the last only\), got -1"):
        tiny_cfg(tmp_path / "data", tmp_path / "bad", **{"TEST.EVAL_PERIOD": -1})


def _official_full(img_size: int) -> dict:
    torch.manual_seed(1)
    mae = MaskedAutoencoderViT(img_size=img_size, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, **TINY)
    return {"model": mae.state_dict()}


def test_loads_ours_official_and_timm_formats(tmp_path):
    torch.manual_seed(2)
    enc = VisionTransformer(img_size=32, **TINY)
    atomic_save({"model": enc.state_dict()}, tmp_path / "export.pth")
    atomic_save(_official_full(48), tmp_path / "official_full.pth")  # pretrained at 48 px: 6x6 -> 4x4 grid
    tv = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=7)
    atomic_save(tv.state_dict(), tmp_path / "timm.pth")

    model = ViTClassifier(3, img_size=32, **TINY)
    load_encoder_weights(model, tmp_path / "export.pth")
    assert torch.equal(model.blocks[1].mlp.fc2.weight, enc.blocks[1].mlp.fc2.weight)
    assert torch.equal(model.pos_embed, enc.pos_embed)

    load_encoder_weights(model, tmp_path / "official_full.pth")
    full = _official_full(48)["model"]
    assert torch.equal(model.blocks[0].attn.qkv.weight, full["blocks.0.attn.qkv.weight"])
    assert model.pos_embed.shape == (1, 17, 64)  # resampled to the model's grid

    info = load_encoder_weights(model, tmp_path / "timm.pth")
    assert info["format"] == "timm"
    assert torch.equal(model.patch_embed.proj.weight, tv.patch_embed.proj.weight)
    assert model.head.weight.shape == (3, 64)  # the checkpoint's 7-way head is not taken

    enc2 = VisionTransformer(img_size=32, **TINY)
    load_encoder_weights(enc2, tmp_path / "timm.pth")
    assert torch.equal(enc2.norm.weight, tv.norm.weight)  # a plain encoder keeps the final norm


def test_wrong_width_or_depth_names_the_file(tmp_path):
    small = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    atomic_save({"model": small.state_dict()}, tmp_path / "narrow.pth")
    with pytest.raises(CheckpointError, match=r"narrow\.pth: encoder width 32 does not match the model's embed_dim 64"):
        load_encoder_weights(ViTClassifier(3, img_size=32, **TINY), tmp_path / "narrow.pth")
    deep = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4)
    atomic_save({"model": deep.state_dict()}, tmp_path / "deep.pth")
    with pytest.raises(CheckpointError, match=r"deep\.pth: 3 blocks but the model has depth 2"):
        load_encoder_weights(VisionTransformer(img_size=32, **TINY), tmp_path / "deep.pth")


def test_build_from_config_uses_the_weights(tmp_path):
    torch.manual_seed(3)
    enc = VisionTransformer(img_size=32, **TINY)
    atomic_save({"model": enc.state_dict()}, tmp_path / "enc.pth")
    cfg = tiny_cfg(tmp_path, tmp_path / "out", **{"MODEL.WEIGHTS": str(tmp_path / "enc.pth")})
    built = build_encoder(cfg, torch.device("cpu"))
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in built.state_dict().items())
    clf = build_classifier(cfg, 4)
    assert clf.pos_embed.requires_grad and clf.blocks[1].drop_path.drop_prob == pytest.approx(cfg.MODEL.DROP_PATH)
    assert torch.equal(clf.blocks[0].attn.proj.weight, enc.blocks[0].attn.proj.weight)


def test_results_merge_per_init(tmp_path):
    from mae_det.engine.finetune_cls import write_results

    write_results(tmp_path, {"knn_top1": 50.0, "init": "a.pth"}, "knn")
    assert write_results(tmp_path, {"linear_top1": 60.0, "init": "a.pth"}, "linear") == {
        "knn_top1": 50.0, "linear_top1": 60.0, "init": "a.pth"}
    # Another initialization in the same folder replaces the file rather than mixing two encoders' numbers.
    assert write_results(tmp_path, {"knn_top1": 40.0, "init": "b.pth"}, "knn") == {"knn_top1": 40.0, "init": "b.pth"}


def test_a_rerun_of_a_task_leaves_none_of_its_earlier_keys(tmp_path):
    from mae_det.engine.finetune_cls import write_results

    published = {"value": 68.0, "source": "paper", "note": "published for this recipe, not measured by this run"}
    write_results(tmp_path, {"knn_top1": 40.0, "init": "a.pth"}, "knn")
    write_results(tmp_path, {"linear_top1": 50.0, "linear_top5": 80.0, "init": "a.pth",
                             "published": {"linear_top1": published}}, "linear")
    # Until 2026-12-08 the 10-class run's top-5 and published reference stayed beside a later 3-class run's top-1.
    assert write_results(tmp_path, {"linear_top1": 70.0, "init": "a.pth"}, "linear") == {
        "knn_top1": 40.0, "linear_top1": 70.0, "init": "a.pth"}
    write_results(tmp_path, {"finetune_top1": 90.0, "init": "a.pth", "published": {"finetune_top1": published}},
                  "finetune")
    assert write_results(tmp_path, {"knn_top1": 45.0, "init": "a.pth"}, "knn")["published"] == {
        "finetune_top1": published}  # another task's reference stays


def test_partial_finetuning_trains_only_the_last_blocks_norm_and_head(tmp_path):
    color_folders(tmp_path / "data", n_train=12, n_val=6)
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path / "data", tmp_path / "out", **{"MODEL.TRAIN_BLOCKS": 1, "SOLVER.EPOCHS": 2,
                                                           "SOLVER.WARMUP_EPOCHS": 0.0})
    model = build_classifier(cfg, 3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("blocks.1.", "fc_norm.", "head."))}
    torch.manual_seed(cfg.SEED)
    before = build_classifier(cfg, 3).state_dict()
    finetune(cfg, progress=False)
    out = tmp_path / "out"
    after = load_checkpoint(out / (out / "last_checkpoint").read_text().strip())["model"]
    for k, v in before.items():
        learned = k.startswith(("blocks.1.", "fc_norm.", "head."))
        assert torch.equal(v, after[k]) != learned, k
    with pytest.raises(Exception, match="MODEL.TRAIN_BLOCKS: expected -1 \\(all\\) or 0..2"):
        tiny_cfg(tmp_path / "data", tmp_path / "o2", **{"MODEL.TRAIN_BLOCKS": 3})


# ---- hostile inputs (audit of 2026-12-05) -------------------------------------------------------------------
def test_resume_without_the_pointer_continues_from_the_newest_checkpoint(tmp_path, caplog):
    color_folders(tmp_path / "data", n_train=8, n_val=2)
    over = {"SOLVER.EPOCHS": 2, "SOLVER.BATCH_SIZE": 8}
    out = tmp_path / "out"
    finetune(tiny_cfg(tmp_path / "data", out, **over), progress=False)
    (out / "last_checkpoint").unlink()  # deleted by hand, or a kill between the first checkpoint and its pointer
    before = {n: _inode(out / n) for n in ("checkpoint_0001.pth", "checkpoint_0002.pth")}
    with caplog.at_level("INFO", logger="mae_det"):
        res = finetune(tiny_cfg(tmp_path / "data", out, **over), resume=True, progress=False)
    # Until 2026-12-05 this started from scratch and rewrote both checkpoints.
    assert f"{out / 'last_checkpoint'} is missing: resuming from the newest checkpoint file, checkpoint_0002.pth" \
        in caplog.text and f"resumed from {out / 'checkpoint_0002.pth'} at epoch 2" in caplog.text
    assert {n: _inode(out / n) for n in before} == before and res["finetune_epochs"] == 2
    (out / "last_checkpoint").write_text("")  # empty: as if missing (it was "names <the run folder>, which does
    caplog.clear()                            # not exist")
    with caplog.at_level("INFO", logger="mae_det"):
        finetune(tiny_cfg(tmp_path / "data", out, **over), resume=True, progress=False)
    assert f"{out / 'last_checkpoint'} is empty: resuming from the newest checkpoint file" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mae_det"):  # without --resume: set aside, as detection does
        finetune(tiny_cfg(tmp_path / "data", out, **over), progress=False)
    assert f"{out} holds checkpoints of an earlier run: starting from scratch (--resume continues instead); moved " \
           f"them to {out / 'earlier_run_1'}" in caplog.text


def test_resume_refuses_a_checkpoint_of_another_model_class_set_or_schedule(tmp_path):
    color_folders(tmp_path / "data", n_train=8, n_val=2)
    out = tmp_path / "out"
    finetune(tiny_cfg(tmp_path / "data", out, **{"SOLVER.EPOCHS": 1, "SOLVER.BATCH_SIZE": 8}), progress=False)
    ckpt = out / "checkpoint_0001.pth"
    before = _inode(ckpt)

    def refusal(data: Path, **over) -> str:
        cfg = tiny_cfg(data, out, **{"SOLVER.EPOCHS": 2, "SOLVER.BATCH_SIZE": 8, **over})
        with pytest.raises(CheckpointError) as info:
            finetune(cfg, resume=True, progress=False)
        assert "\n" not in str(info.value)
        return str(info.value)

    # Another depth used to be torch's multi-line RuntimeError, another class set a head size mismatch.
    msg = refusal(tmp_path / "data", **{"MODEL.DEPTH": 3})
    assert msg.startswith(f"cannot resume from {ckpt}: it does not match the configured model (Missing key(s) in "
                          f"state_dict: \"blocks.2.")
    color_folders(tmp_path / "four", n_train=8, n_val=2)
    (tmp_path / "four" / "train" / "c3").mkdir()
    Image.new("RGB", (40, 40), (250, 250, 0)).save(tmp_path / "four" / "train" / "c3" / "0.png")
    assert refusal(tmp_path / "four") == (f"cannot resume from {ckpt}: it was trained on the classes ['c0', 'c1', "
                                          f"'c2'], DATA.TRAIN_ROOT now has ['c0', 'c1', 'c2', 'c3']")
    # Another batch size used to resume silently with the lr schedule at the wrong step.
    msg = refusal(tmp_path / "data", **{"SOLVER.BATCH_SIZE": 4})
    assert msg.startswith(f"cannot resume from {ckpt}: it was trained with 3 optimizer steps per epoch, the config "
                          f"and data now give 6")
    assert _inode(ckpt) == before and (out / "last_checkpoint").read_text() == "checkpoint_0001.pth"


def test_verification_applies_the_bad_image_budget(tmp_path):
    color_folders(tmp_path / "data", n_train=4, n_val=2)
    (tmp_path / "data" / "train" / "c1" / "broken.png").write_bytes(b"")
    cfg = tiny_cfg(tmp_path / "data", tmp_path / "out", **{"SOLVER.EPOCHS": 1, "SOLVER.BATCH_SIZE": 4})
    assert cfg.DATA.VERIFY_IMAGES and cfg.DATA.MAX_BAD_FRACTION == 0.01
    # 1 of 13 is over 1 %: knn_eval and linear_probe refused these folders while fine-tuning trained on them.
    with pytest.raises(ClassificationDataError, match=r"train: 1 of 13 images are unreadable \(more than 1%\)"):
        finetune(cfg, progress=False)
    assert not (tmp_path / "out" / "last_checkpoint").exists()
    cfg.DATA.MAX_BAD_FRACTION = 0.1
    res = finetune(cfg, progress=False)
    assert res["num_train"] == 12


def test_folders_and_weights_fail_before_the_images_are_verified(tmp_path, caplog):
    color_folders(tmp_path / "data", n_train=4, n_val=2)
    (tmp_path / "data" / "train" / "c0" / "broken.png").write_bytes(b"")  # what the verification would report
    (tmp_path / "data" / "val" / "c9").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "data" / "val" / "c9" / "0.png")
    cfg = tiny_cfg(tmp_path / "data", tmp_path / "out", **{"SOLVER.EPOCHS": 1, "SOLVER.BATCH_SIZE": 4})
    with caplog.at_level("INFO", logger="mae_det"), pytest.raises(ClassificationDataError, match=r"\['c9'\]"):
        finetune(cfg, progress=False)
    assert "broken.png" not in caplog.text  # on ImageNet, the verification is an hour
    (tmp_path / "data" / "val" / "c9" / "0.png").unlink()
    (tmp_path / "data" / "val" / "c9").rmdir()
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    cfg.MODEL.WEIGHTS = str(tmp_path / "notes.pth")
    with caplog.at_level("INFO", logger="mae_det"), pytest.raises(CheckpointError, match="notes.pth"):
        finetune(cfg, progress=False)
    assert "broken.png" not in caplog.text


def test_validation_without_a_readable_image_names_the_folder(tmp_path):
    color_folders(tmp_path / "data", n_train=4, n_val=1)
    for p in (tmp_path / "data" / "val").rglob("*.png"):
        p.write_bytes(b"")
    cfg = tiny_cfg(tmp_path / "data", tmp_path / "out", **{"SOLVER.EPOCHS": 1, "SOLVER.BATCH_SIZE": 4,
                                                           "DATA.VERIFY_IMAGES": False, "DATA.MAX_BAD_FRACTION": 1.0})
    with pytest.raises(ClassificationDataError, match=f"^{tmp_path / 'data' / 'val'}: none of the validation images "
                                                      f"is readable$"):
        finetune(cfg, progress=False)


def _history(out: Path) -> list[dict]:
    """metrics.jsonl without the throughput, which is timing."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"} for line in lines]


def test_requeue_and_fresh_start_leave_one_history_in_metrics(tmp_path, monkeypatch, caplog):
    color_folders(tmp_path / "data", n_train=8, n_val=2)
    over = {"SOLVER.EPOCHS": 3, "SOLVER.BATCH_SIZE": 4, "LOG_PERIOD": 1}  # 6 steps per epoch
    finetune(tiny_cfg(tmp_path / "data", tmp_path / "ref", **over), progress=False)
    ref = _history(tmp_path / "ref")
    assert [r.get("step") for r in ref] == [*range(1, 7), None, *range(7, 13), None, *range(13, 19), None]

    class Requeued(BaseException):
        pass

    def requeue():
        raise Requeued

    cut = tmp_path / "cut"
    with monkeypatch.context() as m:  # a submitted job told to stop at step 14, inside epoch 3
        m.setattr(F, "stop_requested", lambda step: step == 14)
        m.setattr(F, "requeue", requeue)
        with pytest.raises(Requeued):
            finetune(tiny_cfg(tmp_path / "data", cut, **over), progress=False)
    assert (cut / "last_checkpoint").read_text() == "checkpoint_0002.pth"
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 15, "epoch": 2.5, "lo')  # a line cut short by a kill
    epochs = _epochs_trained(monkeypatch)
    with caplog.at_level("INFO", logger="mae_det"):
        finetune(tiny_cfg(tmp_path / "data", cut, **over), resume=True, progress=False)
    assert epochs == [2] and f"resumed from {cut / 'checkpoint_0002.pth'} at epoch 2" in caplog.text
    assert _history(cut) == ref  # the redone steps once, the cut line gone
    finetune(tiny_cfg(tmp_path / "data", cut, **over), progress=False)  # from scratch in the used folder
    assert _history(cut) == ref


def test_errors_inside_the_run_exit_as_in_pretraining(tmp_path, capsys):
    # tools/pretrain.py and tools/train_net.py exit 2 for a bad config, data or checkpoint and 3 for a non-finite
    # loss; until 2026-12-08 fine-tuning exited 1 for every error raised after its config had loaded.
    from mae_det.engine.finetune_cls import finetune_main

    color_folders(tmp_path / "data", n_train=2, n_val=1)
    config = tmp_path / "cls.yaml"
    config.write_text(tiny_cfg(tmp_path / "data", tmp_path / "out", **{"SOLVER.BATCH_SIZE": 2}).dump())
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")

    def error_of(*opts: str, resume: bool = False) -> tuple[int, str]:
        rc = finetune_main(["--config-file", str(config), *(["--resume"] if resume else []), "SOLVER.EPOCHS", "1",
                            *opts])
        text = capsys.readouterr().err
        err = [line for line in text.splitlines() if line.startswith("error: ")]
        assert len(err) == 1, (rc, text[-500:])
        return rc, err[0]

    rc, err = error_of("SOLVER.BATCH_SIZE", "64")  # a ConfigError
    assert rc == 2 and "SOLVER.BATCH_SIZE 64" in err and "6 training images" in err
    rc, err = error_of("DATA.TRAIN_ROOT", str(tmp_path / "flat"))  # a ClassificationDataError
    assert rc == 2 and "no labels" in err
    assert finetune_main(["--config-file", str(config), "SOLVER.EPOCHS", "1"]) == 0
    capsys.readouterr()
    rc, err = error_of("SOLVER.BATCH_SIZE", "1", resume=True)  # a CheckpointError
    assert rc == 2 and err.startswith(f"error: cannot resume from {tmp_path / 'out' / 'checkpoint_0001.pth'}")
    rc, err = error_of("SOLVER.LR", "1e30", "SOLVER.WARMUP_EPOCHS", "0.0",  # a FloatingPointError
                       "OUTPUT_DIR", str(tmp_path / "diverged"))
    assert rc == 3 and "fine-tuning loss is nan" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs where there is a GPU")
@pytest.mark.parametrize("tool", ["finetune", "knn", "linear_probe"])
def test_fp16_without_a_gpu_is_a_one_line_config_error_before_anything_is_written(tmp_path, tool, capsys):
    color_folders(tmp_path, n_train=2, n_val=1)
    main = {"finetune": F.finetune_main, "knn": F.knn_main, "linear_probe": F.linear_probe_main}[tool]
    rc = main(["DATA.TRAIN_ROOT", str(tmp_path / "train"), "DATA.VAL_ROOT", str(tmp_path / "val"), "PRECISION", "fp16",
               "OUTPUT_DIR", str(tmp_path / "out"), "MODEL.ARCH", "vit_tiny_patch16"])
    assert rc == 2
    assert capsys.readouterr().err == ("error: PRECISION fp16 needs a CUDA device, but DEVICE auto runs on cpu; use "
                                       "PRECISION bf16 or fp32\n")
    assert not (tmp_path / "out" / "run_info.json").exists()


# ---- review of 2026-12-08 ------------------------------------------------------------------------------------
class _Killed(Exception):
    pass


def test_a_fresh_start_sets_an_earlier_runs_checkpoints_aside(tmp_path, monkeypatch, caplog):
    color_folders(tmp_path / "data", n_train=8, n_val=2)
    over = {"SOLVER.EPOCHS": 2, "SOLVER.BATCH_SIZE": 8}
    out = tmp_path / "out"
    finetune(tiny_cfg(tmp_path / "data", out, **over), progress=False)
    with monkeypatch.context() as m:  # a fresh run in the same folder, killed in its first epoch
        m.setattr(F, "_train_one_epoch", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
        with pytest.raises(_Killed):
            finetune(tiny_cfg(tmp_path / "data", out, **{**over, "SOLVER.LR": 5e-4}), progress=False)
    assert sorted(p.name for p in (out / "earlier_run_1").iterdir()) == [
        "checkpoint_0001.pth", "checkpoint_0002.pth", "last_checkpoint"]
    assert not list(out.glob("checkpoint_*.pth")) and not (out / "last_checkpoint").exists()
    epochs = _epochs_trained(monkeypatch)
    with caplog.at_level("INFO", logger="mae_det"):  # its requeue's --resume
        finetune(tiny_cfg(tmp_path / "data", out, **{**over, "SOLVER.LR": 5e-4}), resume=True, progress=False)
    # Until 2026-12-08 this continued the earlier run (lr 2e-3) from its epoch 2, without a word.
    assert epochs == [0, 1] and f"--resume: no checkpoint in {out}, starting from scratch" in caplog.text


def test_resume_with_fewer_epochs_than_the_checkpoint_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from mae_det.engine.finetune_cls import finetune_main

    color_folders(tmp_path / "data", n_train=8, n_val=2)
    out = tmp_path / "out"
    config = tmp_path / "cls.yaml"
    config.write_text(tiny_cfg(tmp_path / "data", out, **{"SOLVER.BATCH_SIZE": 8, "TEST.EVAL_PERIOD": 0}).dump())
    real = F._train_one_epoch

    def killed_in_epoch_3(*args, epoch, **kwargs):
        if epoch == 2:
            raise _Killed()
        return real(*args, epoch=epoch, **kwargs)

    with monkeypatch.context() as m, pytest.raises(_Killed):
        m.setattr(F, "_train_one_epoch", killed_in_epoch_3)
        finetune_main(["--config-file", str(config), "SOLVER.EPOCHS", "4"])
    ckpt = out / "checkpoint_0002.pth"
    for epochs, need in (("2", 4), ("1", 4)):  # epoch 2 of 4 was not evaluated: 2 used to be an IndexError
        capsys.readouterr()
        assert finetune_main(["--config-file", str(config), "--resume", "SOLVER.EPOCHS", epochs]) == 2
        assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")] == [
            f"error: cannot resume from {ckpt}: it holds 2 epochs of a longer run than SOLVER.EPOCHS {epochs}; set "
            f"SOLVER.EPOCHS {need} or more (that run's own, to finish its schedule) to continue it"]
    assert (out / "last_checkpoint").read_text() == "checkpoint_0002.pth"
    # An evaluated checkpoint past SOLVER.EPOCHS (it used to report SOLVER.EPOCHS with its later weights and top-1)
    ref = tiny_cfg(tmp_path / "data", tmp_path / "ref", **{"SOLVER.BATCH_SIZE": 8, "SOLVER.EPOCHS": 2})
    done = finetune(ref, progress=False)
    ref.SOLVER.EPOCHS = 1
    ref.SOLVER.WARMUP_EPOCHS = 0.0
    with pytest.raises(ConfigError, match=r"it holds 2 epochs of a longer run than SOLVER.EPOCHS 1; set SOLVER.EPOCHS "
                                          r"2 or more"):
        finetune(ref, resume=True, progress=False)
    ref.SOLVER.EPOCHS = 2  # a finished run resumed: its results again, nothing trained
    assert finetune(ref, resume=True, progress=False)["finetune_top1"] == done["finetune_top1"]
    # An evaluated checkpoint inside a longer run, at SOLVER.EPOCHS: its lr never annealed (accepted before 2026-12-08)
    long = tiny_cfg(tmp_path / "data", tmp_path / "long", **{"SOLVER.BATCH_SIZE": 8, "SOLVER.EPOCHS": 4})
    with monkeypatch.context() as m, pytest.raises(_Killed):
        m.setattr(F, "_train_one_epoch", killed_in_epoch_3)
        finetune(long, progress=False)
    assert "val_top1" in torch.load(tmp_path / "long" / "checkpoint_0002.pth", weights_only=False)["history"][-1]
    long.SOLVER.EPOCHS = 2
    with pytest.raises(ConfigError, match=r"it holds 2 epochs of a longer run than SOLVER.EPOCHS 2; set SOLVER.EPOCHS "
                                          r"4 or more"):
        finetune(long, resume=True, progress=False)


def test_a_non_finite_validation_loss_stops_before_the_epochs_checkpoint(tmp_path, monkeypatch, capsys):
    color_folders(tmp_path / "data", n_train=8, n_val=2)
    real = F._train_one_epoch

    def weights_break_in_epoch_2(model, *args, epoch, **kwargs):
        record = real(model, *args, epoch=epoch, **kwargs)
        if epoch == 1:
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))
        return record

    monkeypatch.setattr(F, "_train_one_epoch", weights_break_in_epoch_2)
    out = tmp_path / "out"
    config = tmp_path / "cls.yaml"
    config.write_text(tiny_cfg(tmp_path / "data", out, **{"SOLVER.BATCH_SIZE": 8, "SOLVER.EPOCHS": 3}).dump())
    assert F.finetune_main(["--config-file", str(config)]) == 3
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")] == [
        "error: validation loss is nan after epoch 2; the last good checkpoint is intact (lower SOLVER.BASE_LR or use "
        "PRECISION fp32)"]
    # metrics.jsonl stays JSON (it held a bare NaN) and the broken weights were not checkpointed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "val_loss" in r] == [1]
    assert (out / "last_checkpoint").read_text() == "checkpoint_0001.pth" and not (out / "checkpoint_0002.pth").exists()


def test_evaluation_runs_on_a_torch_without_set_stance(tmp_path, monkeypatch):
    # setup.py asks for torch >= 2.1; torch.compiler.set_stance came with 2.6, and every evaluation called it.
    color_folders(tmp_path / "data", n_train=8, n_val=2)
    monkeypatch.delattr(torch.compiler, "set_stance", raising=False)
    res = finetune(tiny_cfg(tmp_path / "data", tmp_path / "out", **{"SOLVER.EPOCHS": 1, "SOLVER.BATCH_SIZE": 8,
                                                                     "SOLVER.WARMUP_EPOCHS": 0.0}), progress=False)
    assert res["finetune_epochs"] == 1 and 0 <= res["finetune_top1"] <= 100


def _gray_encoder(path: Path, meta: dict | None) -> None:
    torch.manual_seed(4)
    enc = VisionTransformer(img_size=32, in_chans=1, **TINY)
    atomic_save({"model": enc.state_dict(), **({"meta": meta} if meta is not None else {})}, path)


def test_the_tools_normalize_as_the_encoder_was_pretrained(tmp_path, monkeypatch, caplog):
    color_folders(tmp_path / "data", n_train=4, n_val=2)
    data = tmp_path / "data"
    _gray_encoder(tmp_path / "ours.pth", {"mode": "mae", "in_chans": 1, "pixel_mean": [0.5], "pixel_std": [0.25]})
    seen: list[tuple] = []

    def spy(real):
        def call(*args, **kwargs):
            seen.append((kwargs["mean"], kwargs["std"]))
            return real(*args, **kwargs)
        return call

    for name in ("knn_eval_folders", "linear_probe_folders", "train_transform", "eval_transform"):
        monkeypatch.setattr(F, name, spy(getattr(F, name)))
    over = {"MODEL.WEIGHTS": str(tmp_path / "ours.pth"), "SOLVER.EPOCHS": 1, "SOLVER.BATCH_SIZE": 4,
            "SOLVER.WARMUP_EPOCHS": 0.0, "LINPROBE.EPOCHS": 1, "LINPROBE.WARMUP_EPOCHS": 0.0, "LINPROBE.AUGMENT": True}
    cfg = tiny_cfg(data, tmp_path / "out", **over)
    # A grayscale encoder was refused by every tool (3 channels and ImageNet's statistics, always); MODEL.IN_CHANS
    # and DATA.MEAN / STD unset take the checkpoint's meta.
    assert F.run_knn(cfg)["knn_num_val"] == 6
    assert F.run_linear_probe(cfg)["linear_num_train"] == 12
    assert finetune(cfg, progress=False)["finetune_epochs"] == 1
    assert seen == [((0.5,), (0.25,))] * 4
    assert F.input_norm(cfg) == (1, (0.5,), (0.25,))
    # Without weights, or with a checkpoint that records no statistics (official MAE, timm): ImageNet's, as before.
    assert F.input_norm(tiny_cfg(data, tmp_path / "o2")) == (3, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    _gray_encoder(tmp_path / "bare.pth", None)
    bare = {"MODEL.WEIGHTS": str(tmp_path / "bare.pth"), "MODEL.IN_CHANS": 1}
    with pytest.raises(ConfigError, match=r"^ImageNet's statistics \[0.485, 0.456, 0.406\] / \[0.229, 0.224, 0.225\]: "
                                          r"expected one value per input channel, the encoder takes 1 "
                                          r"\(MODEL.IN_CHANS\); set DATA.MEAN and DATA.STD to 1 values each$"):
        F.input_norm(tiny_cfg(data, tmp_path / "o3", **bare))
    cfg = tiny_cfg(data, tmp_path / "o3", **bare, **{"DATA.MEAN": (0.4,), "DATA.STD": (0.2,)})
    assert F.input_norm(cfg) == (1, (0.4,), (0.2,))
    # Statistics set against the checkpoint's: used, with a warning.
    cfg = tiny_cfg(data, tmp_path / "o4", **over, **{"DATA.MEAN": (0.4,), "DATA.STD": (0.2,)})
    with caplog.at_level("WARNING", logger="mae_det"):
        assert F.input_norm(cfg, F.logger) == (1, (0.4,), (0.2,))
    assert (f"DATA.MEAN / DATA.STD [0.4] / [0.2] differ from the normalization {tmp_path / 'ours.pth'} was pretrained "
            f"with, [0.5] / [0.25]") in caplog.text
