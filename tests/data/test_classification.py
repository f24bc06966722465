"""ImageFolderDataset: labels from sorted folder names, clear errors, counted skips of unreadable images."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp

from mae_det.config.classification import get_cls_cfg, validate_cls_cfg
from mae_det.config.pretrain import ConfigError
from mae_det.data.images import DecodedImageCache
from mae_det.data.classification import (
    ClassificationDataError,
    ImageFolderDataset,
    SkipCounter,
    auto_augment_problem,
    collate_skipping,
    eval_transform,
    train_transform,
)


def _write(path: Path, color: tuple[int, int, int], size: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(path)


def test_labels_follow_sorted_folder_names(tmp_path):
    for name in ("zebra", "ant", "mole"):
        for i in range(2):
            _write(tmp_path / name / f"{i}.png", (10, 20, 30))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["ant", "mole", "zebra"]
    assert ds.targets == [0, 0, 1, 1, 2, 2]
    img, label, path = ds[4]
    assert label == 2 and path.endswith("zebra/0.png") and img.size == (24, 24)


def test_hidden_files_and_folders_are_not_images_or_classes(tmp_path):
    # A tree copied from macOS: an AppleDouble "._" sibling per image, Finder and Spotlight folders.
    for name in ("cat", "dog"):
        for rel in ("1.png", "0.png", "sub/0.png"):
            _write(tmp_path / name / rel, (10, 20, 30))
            apple_double = tmp_path / name / Path(rel).with_name(f"._{Path(rel).name}")
            apple_double.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(4000))
        _write(tmp_path / name / ".thumbnails" / "0.png", (0, 0, 0))
    _write(tmp_path / ".Trashes" / "0.png", (0, 0, 0))
    ds = ImageFolderDataset(tmp_path, verify=True, max_bad_fraction=0.0, progress=False)
    assert ds.classes == ds.present_classes == ["cat", "dog"] and ds.skipped == []
    assert [(Path(p).relative_to(tmp_path).as_posix(), label) for p, label in ds.samples] == [
        ("cat/0.png", 0), ("cat/1.png", 0), ("cat/sub/0.png", 0), ("dog/0.png", 1), ("dog/1.png", 1),
        ("dog/sub/0.png", 1),
    ]


def test_val_split_takes_train_label_set(tmp_path):
    for name in ("a", "b", "c"):
        _write(tmp_path / "train" / name / "0.png", (0, 0, 0))
    _write(tmp_path / "val" / "c" / "0.png", (0, 0, 0))
    train = ImageFolderDataset(tmp_path / "train")
    val = ImageFolderDataset(tmp_path / "val", classes=train.classes)
    assert val.targets == [2] and val.num_classes == 3
    _write(tmp_path / "val" / "d" / "0.png", (0, 0, 0))
    with pytest.raises(ClassificationDataError, match=r"\['d'\].*not among the training classes"):
        ImageFolderDataset(tmp_path / "val", classes=train.classes)


def test_errors_name_the_folder(tmp_path):
    with pytest.raises(ClassificationDataError, match="classification folder not found: .*missing"):
        ImageFolderDataset(tmp_path / "missing")
    _write(tmp_path / "flat" / "0.png", (0, 0, 0))
    with pytest.raises(ClassificationDataError, match=r"no labels: .*flat has no class sub-folders"):
        ImageFolderDataset(tmp_path / "flat")
    _write(tmp_path / "tree" / "cat" / "0.png", (0, 0, 0))
    (tmp_path / "tree" / "dog").mkdir()
    with pytest.raises(ClassificationDataError, match=r"class folder .*tree/dog has no image files"):
        ImageFolderDataset(tmp_path / "tree")


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    _write(tmp_path / "cat" / "0.png", (0, 0, 0))
    _write(tmp_path / "cat" / "1.png", (0, 0, 0))
    (tmp_path / "cat" / "2.png").write_bytes(b"\x89PNG truncated")
    _write(tmp_path / "dog" / "0.png", (255, 255, 255))
    lazy = ImageFolderDataset(tmp_path, eval_transform(16, 1.0))
    imgs, labels, errors = collate_skipping([lazy[i] for i in range(len(lazy))])
    assert imgs.shape == (3, 3, 16, 16) and labels.tolist() == [0, 0, 1]
    assert len(errors) == 1 and "cat/2.png" in errors[0]
    counter = SkipCounter("set", max_fraction=0.5)
    counter.update(len(labels), errors)
    counter.check()
    assert (counter.skipped, counter.seen) == (1, 4)
    strict = SkipCounter("set", max_fraction=0.1)
    strict.update(len(labels), errors)
    with pytest.raises(ClassificationDataError, match="set: 1 of 4 images are unreadable"):
        strict.check()

    verified = ImageFolderDataset(tmp_path, verify=True)
    assert len(verified) == 3 and len(verified.skipped) == 1
    # With a cache, the verification decodes each readable image into it once; the unreadable one stays out.
    cache = DecodedImageCache(10**6)
    cached = ImageFolderDataset(tmp_path, eval_transform(16, 1.0), verify=True, cache=cache)
    assert len(cached) == 3 and len(cached.skipped) == 1 and len(cache) == 3
    for i in range(3):
        assert torch.equal(cached[i][0], lazy[[0, 1, 3][i]][0])
    (tmp_path / "dog" / "0.png").write_bytes(b"")
    with pytest.raises(ClassificationDataError, match=r"class folder .*dog has no readable images"):
        ImageFolderDataset(tmp_path, verify=True)


def test_transforms_shapes_and_normalization(tmp_path):
    _write(tmp_path / "x.png", (124, 116, 104), size=40)  # ~ the ImageNet mean
    img = Image.open(tmp_path / "x.png").convert("RGB")
    x = eval_transform(32)(img)
    assert x.shape == (3, 32, 32) and x.abs().max() < 0.02
    torch.manual_seed(0)
    y = train_transform(32, rand_augment="rand-m9-mstd0.5-inc1", reprob=0.0)(img)
    assert y.shape == (3, 32, 32) and torch.isfinite(y).all()


def test_train_transform_normalizes_with_the_given_statistics_and_one_channel_means_grayscale():
    # It normalized with ImageNet's RGB statistics, whatever the encoder was pretrained with.
    gray = Image.new("RGB", (40, 40), (128, 128, 128))
    x = train_transform(32, scale=(1.0, 1.0), hflip=0.0, rand_augment=None, reprob=0.0, mean=(0.5,), std=(0.1,))(gray)
    assert x.shape == (1, 32, 32)
    torch.testing.assert_close(x, torch.full_like(x, (128 / 255 - 0.5) / 0.1))
    torch.manual_seed(0)
    for _ in range(20):  # RandAugment and random erasing on one channel
        y = train_transform(32, reprob=1.0, mean=(0.5,), std=(0.1,))(gray)
        assert y.shape == (1, 32, 32) and torch.isfinite(y).all()


def test_default_rand_augment_survives_many_draws():
    # Magnitude 10 would ask Pillow >= 13 for a 0-bit posterize (a ValueError) about once in 400 draws.
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    tf = train_transform(16, reprob=0.0)
    for _ in range(1500):
        tf(img)


def _noise_folders(root: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for i in range(per_class):
            d = root / name
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(d / f"{i}.png")


def _epoch_images(ds: ImageFolderDataset, epoch: int, workers: int) -> torch.Tensor:
    ds.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate_skipping,
                                         generator=torch.Generator().manual_seed(0))  # else it draws a base seed
    return torch.cat([imgs for imgs, _, _ in loader])


def test_seeded_augmentation_does_not_depend_on_workers_and_leaves_global_rngs_alone(tmp_path):
    import random

    _noise_folders(tmp_path, per_class=4)
    tf = train_transform(16, scale=(0.2, 1.0), reprob=0.5)  # crop, flip, RandAugment and erasing all draw
    ds = ImageFolderDataset(tmp_path, tf, seed=7)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = random.random(), np.random.rand(), torch.rand(()).item()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    in_process = _epoch_images(ds, 3, workers=0)
    # The per-sample seeding restores the main process's generators (drop path and mixup draw from them).
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == before
    assert torch.equal(in_process, _epoch_images(ds, 3, workers=2))
    assert not torch.equal(in_process, _epoch_images(ds, 4, workers=0))  # a new epoch draws anew
    assert not torch.equal(in_process, _epoch_images(ImageFolderDataset(tmp_path, tf, seed=8), 3, workers=0))
    # Each sample's draws depend on its index, not on its neighbours in the batch.
    ds.set_epoch(3)
    assert torch.equal(ds[5][0], in_process[5])


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m2", "v0"])
def test_auto_augment_that_reaches_a_zero_bit_posterize_is_refused_before_training(spec):
    problem = auto_augment_problem(spec)
    assert problem is not None and "0 bits" in problem and repr(spec) in problem
    # What the check predicts is what Pillow does: that posterize raises on a real image.
    op_name, magnitude = problem.split(" can draw ")[1].split(", which")[0].split(" at magnitude ")
    op = AugmentOp(op_name, prob=1.0, magnitude=float(magnitude))
    with pytest.raises(ValueError, match="bits"):
        op(Image.new("RGB", (8, 8)))
    cfg = get_cls_cfg()
    cfg.AUG.RAND_AUGMENT = spec
    with pytest.raises(ConfigError, match=r"^AUG\.RAND_AUGMENT: "):
        validate_cls_cfg(cfg, check_paths=False)


@pytest.mark.parametrize("spec", ["", "rand-m9-mstd0.5-inc1-mmax9", "rand-m9-mstd0.5", "rand-m9-mstd101-inc1",
                                  "original", "augmix-m5-w3"])
def test_auto_augment_whose_posterize_keeps_a_bit_passes(spec):
    assert auto_augment_problem(spec) is None


def test_verification_fails_above_the_bad_fraction_and_logs_each_skip(tmp_path, caplog):
    for i in range(3):
        _write(tmp_path / "cat" / f"{i}.png", (0, 0, 0))
    (tmp_path / "cat" / "3.png").write_bytes(b"")
    with caplog.at_level("WARNING", logger="mae_det"):
        ok = ImageFolderDataset(tmp_path, verify=True, max_bad_fraction=0.25, progress=False)
    assert len(ok) == 3 and ok.skipped == [str(tmp_path / "cat" / "3.png")]
    assert f"skipping unreadable image: {tmp_path / 'cat' / '3.png'}: empty file (0 bytes)" in caplog.text
    assert f"{tmp_path}: skipped 1 unreadable image(s) of 4" in caplog.text
    # The verification used to drop any number of images: the budget held only for runs without it.
    with pytest.raises(ClassificationDataError, match=r"^.*: 1 of 4 images are unreadable \(more than 10%\)"):
        ImageFolderDataset(tmp_path, verify=True, max_bad_fraction=0.1, progress=False)
