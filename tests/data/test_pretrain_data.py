"""Pretraining sources, augmentation determinism, corrupt-image handling and the global-batch sampler."""
import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mae_det.data.images import DecodedImageCache
from mae_det.data.pretrain import (
    CROWD_COUNT, DataError, GlobalBatchSampler, PretrainDataset, PretrainTransform, build_source, coco_source,
    collate_pretrain, detect_source, folder_source, imagefolder_source, list_images, sample_generator,
)
from mae_det.engine.pretrain import SupervisedViT


def _texture(path, seed, size=(40, 30)):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_list_images_recursive_sorted_and_filtered(tmp_path):
    for rel in ["b/2.png", "a.JPG", "b/c/1.png", ".hidden/x.png", "b/.y.png", "notes.txt"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a.JPG", "b/2.png", "b/c/1.png"]


def test_detect_source(tmp_path):
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    (tmp_path / "flat").mkdir()
    _texture(tmp_path / "flat" / "x.png", 0)
    (tmp_path / "ann.json").write_text("{}")
    (tmp_path / "x.txt").write_text("")
    assert detect_source(tmp_path / "tree") == "imagefolder"
    assert detect_source(tmp_path / "flat") == "folder"
    assert detect_source(tmp_path / "ann.json") == "coco"
    with pytest.raises(DataError, match="must be a COCO .json"):
        detect_source(tmp_path / "x.txt")
    with pytest.raises(DataError, match="no such file or folder"):
        detect_source(tmp_path / "absent")


def test_imagefolder_labels_follow_sorted_classes(tmp_path):
    _texture(tmp_path / "zebra" / "1.png", 0)
    _texture(tmp_path / "ant" / "sub" / "2.png", 1)
    _texture(tmp_path / "ant" / "3.png", 2)
    src = imagefolder_source(tmp_path)
    assert src.class_names == ["ant", "zebra"]
    pairs = [(p.name, lab) for p, lab in zip(src.paths, src.labels)]
    assert pairs == [("3.png", (0,)), ("2.png", (0,)), ("1.png", (1,))]


def _coco(tmp_path, images, annotations, categories):
    p = tmp_path / "ann.json"
    p.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return p


def test_coco_crowds_mark_presence_and_the_top_count_and_string_ids_are_read(tmp_path):
    for name in ["a.png", "b.png"]:
        _texture(tmp_path / "imgs" / name, 0)
    images = [{"id": 7, "file_name": "a.png"}, {"id": 8, "file_name": "b.png"}]
    cats = [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]
    anns = [{"image_id": 7, "category_id": 1, "iscrowd": 0}, {"image_id": 7, "category_id": 1, "iscrowd": 1},
            {"image_id": 7, "category_id": 2, "iscrowd": 1}, {"image_id": 7, "category_id": 2, "iscrowd": 1},
            {"image_id": "8", "category_id": "2"}]  # ids written as strings
    src = coco_source(_coco(tmp_path, images, anns, cats), tmp_path / "imgs")
    assert src.labels == [(0, 0, 1), (1,)] and src.crowds == [(0, 1), ()]
    transform = PretrainTransform(16, (1.0, 1.0), (1.0, 1.0), False, (0.5,) * 3, (0.5,) * 3)
    presence = PretrainDataset(src, transform, seed=0, num_classes=2)
    assert presence[(0, 0)]["target"].tolist() == [1, 1] and presence[(0, 1)]["target"].tolist() == [0, 1]
    # A crowd of people is not one person: its class takes the top count bin, whatever MAX_COUNT is.
    counts = PretrainDataset(src, transform, seed=0, num_classes=2, counts=True)
    assert counts[(0, 0)]["target"].tolist() == [CROWD_COUNT, CROWD_COUNT]
    assert counts[(0, 1)]["target"].tolist() == [0, 1]
    model = SupervisedViT(2, max_count=3, img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    loss, logits = model(counts[(0, 0)]["image"][None], counts[(0, 0)]["target"][None])
    assert torch.isfinite(loss)


def test_coco_source_multi_hot_labels(tmp_path):
    for name in ["a.png", "b.png", "c.png"]:
        _texture(tmp_path / "imgs" / name, 0)
    images = [{"id": 10, "file_name": "a.png"}, {"id": 11, "file_name": "b.png"}, {"id": 12, "file_name": "c.png"},
              {"id": 13, "file_name": "gone.png"}]
    cats = [{"id": 9, "name": "star"}, {"id": 1, "name": "circle"}, {"id": 5, "name": "square"}]  # non-contiguous
    anns = [{"image_id": 10, "category_id": 9}, {"image_id": 10, "category_id": 1}, {"image_id": 10, "category_id": 9},
            {"image_id": 11, "category_id": 5}, {"image_id": 99, "category_id": 1}, {"image_id": 11, "category_id": 7}]
    src = coco_source(_coco(tmp_path, images, anns, cats), tmp_path / "imgs")
    assert src.class_names == ["circle", "square", "star"]
    assert [p.name for p in src.paths] == ["a.png", "b.png", "c.png"]
    assert src.labels == [(0, 2, 2), (1,), ()]  # one entry per instance; c.png has none: all negative
    assert src.missing == [str(tmp_path / "imgs" / "gone.png")]
    transform = PretrainTransform(16, (1.0, 1.0), (1.0, 1.0), False, (0.5,) * 3, (0.5,) * 3)
    presence = PretrainDataset(src, transform, seed=0, num_classes=3)
    counts = PretrainDataset(src, transform, seed=0, num_classes=3, counts=True)
    assert [presence[(0, i)]["target"].tolist() for i in range(3)] == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    assert [counts[(0, i)]["target"].tolist() for i in range(3)] == [[1, 0, 2], [0, 1, 0], [0, 0, 0]]


def test_coco_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"missing\.json: COCO json not found"):
        coco_source(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataError, match=r"bad\.json: invalid json .* line 1"):
        coco_source(bad)
    (tmp_path / "x.json").write_text('{"annotations": []}')
    with pytest.raises(DataError, match="no 'images' list"):
        coco_source(tmp_path / "x.json")


def test_empty_dataset_is_an_error_naming_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: no images found"):
        build_source("auto", str(tmp_path / "empty"))
    p = _coco(tmp_path, [{"id": 1, "file_name": "nope.png"}], [], [])
    with pytest.raises(DataError, match="no images found.*1 listed files do not exist"):
        build_source("coco", str(p))


def test_transform_shapes_normalization_and_determinism():
    t = PretrainTransform(32)
    mean_rgb = tuple(int(round(m * 255)) for m in (0.485, 0.456, 0.406))
    flat = t(Image.new("RGB", (8, 8), mean_rgb), sample_generator(0, 0, 0))
    assert flat.shape == (3, 32, 32) and flat.abs().max() < 0.02  # the mean colour normalizes to ~0
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8))
    a = t(img, sample_generator(0, 3, 7))
    assert torch.equal(a, t(img, sample_generator(0, 3, 7)))
    assert not torch.equal(a, t(img, sample_generator(0, 3, 8)))
    assert not torch.equal(a, t(img, sample_generator(0, 4, 7)))
    gray = PretrainTransform(32, mean=(0.5,), std=(0.5,))(img, sample_generator(0, 0, 0))
    assert gray.shape == (1, 32, 32)


def test_quarter_turns_and_channel_orders_cover_the_group_and_keep_crop_and_flip_draws():
    plain = PretrainTransform(32, hflip=True)
    both = PretrainTransform(32, hflip=True, rot90=True, channel_shuffle=True)
    turns, orders = set(), set()
    for i in range(120):
        a, b = plain.sample(100, 60, sample_generator(2, 0, i)), both.sample(100, 60, sample_generator(2, 0, i))
        assert a[:5] == b[:5] and (a.quarter_turns, a.channels) == (0, None)  # drawn after crop and flip
        turns.add(b.quarter_turns)
        orders.add(b.channels)
    assert turns == {0, 1, 2, 3} and orders == set(itertools.permutations(range(3)))


def test_turned_and_shuffled_sample_is_the_plain_sample_turned_and_shuffled():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    kw = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False, mean=(0.5,) * 3, std=(0.5,) * 3)
    plain = PretrainTransform(16, **kw)(img, sample_generator(0, 0, 0))
    both = PretrainTransform(16, rot90=True, channel_shuffle=True, **kw)
    seen = 0
    for i in range(40):
        p = both.sample(40, 40, sample_generator(0, 0, i))
        # the whole image, no flip: only the quarter turns and the channel order differ from ``plain``
        expected = torch.rot90(plain, p.quarter_turns, dims=(1, 2))[list(p.channels)]
        assert torch.equal(both(img, sample_generator(0, 0, i)), expected)
        seen += p.quarter_turns != 0 and p.channels != (0, 1, 2)
    assert seen > 10
    with pytest.raises(ValueError, match="channel_shuffle needs 3 channels"):
        PretrainTransform(16, mean=(0.5,), std=(0.5,), channel_shuffle=True)


def test_crop_params_respect_scale_and_bounds():
    t = PretrainTransform(32, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    for i in range(200):
        top, left, h, w = t.crop_params(100, 60, sample_generator(1, 0, i))
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 100
        assert 0.18 * 6000 <= h * w <= 6000


def _dataset(tmp_path, n=12, bad=(), max_bad=3, num_patches=4, labels=False, cache=None):
    root = tmp_path / "data"
    for i in range(n):
        p = root / f"c{i % 2}" / f"{i:02d}.png"
        if i in bad:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"broken")
        else:
            _texture(p, i)
    src = imagefolder_source(root) if labels else folder_source(root)
    return PretrainDataset(src, PretrainTransform(16), seed=5, num_patches=num_patches,
                           num_classes=2 if labels else 0, max_bad=max_bad, cache=cache)


def test_corrupt_image_is_replaced_by_the_next_and_reported(tmp_path):
    ds = _dataset(tmp_path, bad=(3,), labels=True)
    names = [p.name for p in ds.source.paths]
    i = names.index("03.png")
    s = ds[(0, i)]
    assert [b[0] for b in s["bad"]] == [i] and "03.png" in s["bad"][0][1]
    # the substitute is the next file, with its own label
    nxt = ds.source.labels[(i + 1) % len(ds)][0]
    assert s["target"].tolist() == [float(c == nxt) for c in range(2)]
    assert s["image"].shape == (3, 16, 16) and s["noise"].shape == (4,)
    assert ds[(0, 0)]["bad"] == []


def test_too_many_consecutive_failures_give_a_zero_sample_and_the_proof(tmp_path):
    ds = _dataset(tmp_path, n=6, bad=(0, 1, 2, 3, 4, 5), max_bad=2)
    s = ds[(0, 0)]
    assert len(s["bad"]) == 3 and s["image"].abs().sum() == 0  # max_bad + 1 distinct failures: over the limit


def test_loader_output_independent_of_worker_count(tmp_path):
    ds = _dataset(tmp_path)

    def batches(workers):
        sampler = GlobalBatchSampler(len(ds), 4, seed=1)
        sampler.set_epoch(2)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate_pretrain)
        return [(b["image"], b["noise"]) for b in loader]

    zero, two = batches(0), batches(2)
    assert len(zero) == len(two) == 3  # zip below would stop at the shorter
    for (a, n), (b, m) in zip(zero, two):
        assert torch.equal(a, b) and torch.equal(n, m)


def test_decoded_image_cache_gives_the_same_batches_in_persistent_workers(tmp_path):
    plain, cached = _dataset(tmp_path, bad=(3,)), _dataset(tmp_path, bad=(3,), cache=DecodedImageCache(10**6))

    def epochs(ds, workers):
        sampler = GlobalBatchSampler(len(ds), 4, seed=1)
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate_pretrain,
                            persistent_workers=workers > 0)
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            out += [(b["image"], b["noise"], b["bad"]) for b in loader]
        return out

    expected = epochs(plain, 0)
    for workers in (0, 2):
        got = epochs(cached, workers)
        assert len(got) == len(expected) == 6
        for (a, n, bad), (b, m, bad2) in zip(expected, got):
            assert torch.equal(a, b) and torch.equal(n, m) and bad == bad2
    assert len(cached.cache) == 11  # the main process's reads (workers 0): every readable file, once


def test_global_batches_identical_for_one_and_two_processes():
    one = GlobalBatchSampler(23, 6, seed=3)
    two = [GlobalBatchSampler(23, 3, world_size=2, rank=r, seed=3) for r in range(2)]
    for epoch in range(3):
        for s in [one, *two]:
            s.set_epoch(epoch)
        b1 = list(one)
        b2 = [a + b for a, b in zip(*[list(s) for s in two])]
        assert b1 == b2 and len(b1) == 23 // 6
        flat = [i for b in b1 for _, i in b]
        assert len(set(flat)) == len(flat) and all(e == epoch for b in b1 for e, _ in b)
    one.set_epoch(0)
    first = list(one)
    one.set_epoch(1)
    assert list(one) != first
    one.set_epoch(0, start_batch=2)
    assert list(one) == first[2:] and len(one) == len(first) - 2


def test_sampler_num_batches_truncates():
    s = GlobalBatchSampler(100, 4, num_batches=5)
    assert len(list(s)) == 5
    assert GlobalBatchSampler(100, 4, num_batches=500).num_batches == 25


def _deny(monkeypatch, *folders):
    """Listing ``folders`` fails as without read permission (the tests may run as root, which chmod cannot stop)."""
    import errno
    import os

    denied = {str(f) for f in folders}
    for name in ("scandir", "listdir"):
        real = getattr(os, name)

        def listing(path=".", _real=real):
            if os.fspath(path) in denied:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return _real(path)

        monkeypatch.setattr(os, name, listing)


def test_a_folder_that_cannot_be_listed_is_named_and_counted(tmp_path, monkeypatch, caplog):
    for rel in ["a.png", "locked/b.png", "locked/deeper/c.png", "open/d.png"]:
        _texture(tmp_path / "data" / rel, 0)
    _deny(monkeypatch, tmp_path / "data" / "locked")
    unlisted = []
    assert [p.name for p in list_images(tmp_path / "data", unlisted)] == ["a.png", "d.png"]
    assert unlisted == [str(tmp_path / "data" / "locked")]
    locked = tmp_path / "data" / "locked"
    assert f"cannot list folder {locked} (Permission denied): its images are left out" in caplog.text
    src = build_source("auto", str(tmp_path / "data"))
    assert len(src.paths) == 2 and src.unlisted == [str(tmp_path / "data" / "locked")]
    _deny(monkeypatch, tmp_path / "data")
    with pytest.raises(DataError) as info:
        build_source("auto", str(tmp_path / "data"))
    assert str(info.value) == f"{tmp_path / 'data'}: cannot list the folder (Permission denied)"
    with pytest.raises(DataError) as info:
        build_source("imagefolder", str(tmp_path / "data"))
    assert str(info.value) == f"{tmp_path / 'data'}: cannot list the folder (Permission denied)"


def test_relative_names_and_listing_hash_follow_the_files_not_the_folder(tmp_path):
    for rel in ["a.png", "sub/b.png"]:
        _texture(tmp_path / "one" / rel, 0)
    one = folder_source(tmp_path / "one")
    assert one.relative_names() == ["a.png", "sub/b.png"] and one.relative_names([1]) == ["sub/b.png"]
    (tmp_path / "one").rename(tmp_path / "moved")
    moved = folder_source(f"{tmp_path}/./moved/")  # another spelling of another place: the same listing
    assert moved.relative_names() == one.relative_names() and moved.listing_hash() == one.listing_hash()
    (tmp_path / "moved" / "a.png").rename(tmp_path / "moved" / "c.png")  # renamed: the indices name other files
    assert folder_source(tmp_path / "moved").listing_hash() != one.listing_hash()
    coco = tmp_path / "ann" / "coco.json"
    coco.parent.mkdir()
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "sub/b.png"}, {"id": 2, "file_name": "c.png"}]}))
    assert coco_source(coco, tmp_path / "moved").relative_names() == ["sub/b.png", "c.png"]  # under the image root
