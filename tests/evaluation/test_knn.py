"""Weighted k-NN (DINO protocol) on synthetic features, and the pretraining monitor's folder entry point."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_det.data.classification import ClassificationDataError, ImageFolderDataset, eval_transform
from mae_det.evaluation.knn import extract_features, folder_loader, knn_classify, knn_eval_folders, topk_accuracy
from mae_det.modeling.vit import VisionTransformer
from mae_det.utils.precision import bf16_native

COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 220)]


def make_color_folders(root: Path, per_class: dict[str, int], size: int = 32, seed: int = 0) -> None:
    """root/<split>/<class>/i.png: one solid color per class plus pixel noise, easily separable."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c, color in enumerate(COLORS):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(color) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")


def tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, **kw)


def test_separable_features_give_100_percent():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 32, generator=g) * 3
    train_y = torch.arange(5).repeat_interleave(40)
    test_y = torch.arange(5).repeat_interleave(20)
    train = centers[train_y] + 0.3 * torch.randn(200, 32, generator=g)
    test = centers[test_y] + 0.3 * torch.randn(100, 32, generator=g)
    pred, scores = knn_classify(train, train_y, test, k=20, temperature=0.07, num_classes=5)
    assert pred.shape == (100,) and scores.shape == (100, 5)
    assert torch.equal(pred, test_y)
    assert topk_accuracy(scores, test_y)[1] == 100.0


def test_shuffled_labels_give_about_chance():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1500, 16, generator=g)
    labels = torch.randint(0, 10, (1500,), generator=g)
    _, scores = knn_classify(feats[:1000], labels[:1000], feats[1000:], k=20, temperature=0.07, num_classes=10)
    acc = topk_accuracy(scores, labels[1000:])
    assert 3.0 <= acc[1] <= 20.0  # chance is 10 %
    assert 35.0 <= acc[5] <= 65.0  # chance is 50 %


def test_votes_are_exp_similarity_weighted():
    # One neighbour of class 0 at similarity 1, two of class 1 at similarity 0.8.
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[2.0, 0.0]])  # normalized inside: cosine similarity only
    pred, scores = knn_classify(train, labels, query, k=3, temperature=0.07, num_classes=2)
    # exp(sim / T), scaled by exp(-1 / T) for the nearest neighbour's similarity 1
    expected = torch.tensor([[1.0, 2 * np.exp((0.8 - 1) / 0.07)]], dtype=torch.float32)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=0)
    assert pred.item() == 0  # a sharp temperature lets the single closest neighbour win...
    pred_flat, _ = knn_classify(train, labels, query, k=3, temperature=10.0, num_classes=2)
    assert pred_flat.item() == 1  # ...a flat one counts heads
    pred_k1, _ = knn_classify(train, labels, torch.tensor([[0.8, 0.5]]), k=1, temperature=10.0, num_classes=2)
    assert pred_k1.item() == 1


def test_a_sharp_temperature_keeps_the_votes_finite():
    # The nearest neighbour is class 1 at similarity 0.999; classes 0 and 2 have one at 0.9 each. exp(0.999 / T)
    # overflowed float32 below T ~ 0.0113: every voted class scored inf and the lowest index, 0, won.
    def at(s: float) -> list[float]:
        return [s, (1 - s * s) ** 0.5]

    train, labels = torch.tensor([at(0.999), at(0.9), at(0.9)]), torch.tensor([1, 0, 2])
    runs = [knn_classify(train, labels, torch.tensor([[1.0, 0.0]]), k=3, temperature=t, num_classes=3)
            for t in (0.07, 0.01, 0.001)]
    assert [pred.tolist() for pred, _ in runs] == [[1]] * 3
    assert all(torch.isfinite(scores).all() for _, scores in runs)
    for _, scores in runs:  # the nearest neighbour's vote is 1
        assert scores[0, 1] == 1.0 and scores[0, 0] == scores[0, 2] < 1.0
        assert topk_accuracy(scores, torch.tensor([1])) == {1: 100.0, 5: 100.0}


def test_knn_top5_counts_only_classes_some_neighbour_voted_for():
    # 10 classes; every bank vector is class 9 and every query's true class is 0-8: no query can be a top-5 hit,
    # although topk fills the rest of each top 5 with classes that got no vote.
    train, labels = torch.randn(12, 4), torch.full((12,), 9)
    query, truth = torch.randn(9, 4), torch.arange(9)
    for k in (1, 3, 5):
        pred, scores = knn_classify(train, labels, query, k=k, temperature=0.07, num_classes=10)
        assert (pred == 9).all() and torch.isinf(scores[:, :9]).all() and (scores[:, 9] > 0).all()
        assert topk_accuracy(scores, truth) == {1: 0.0, 5: 0.0}
    assert topk_accuracy(scores, torch.full((9,), 9)) == {1: 100.0, 5: 100.0}


def test_eval_transform_normalizes_with_the_given_statistics_and_one_channel_means_grayscale():
    gray = Image.new("RGB", (40, 40), (128, 128, 128))
    x = eval_transform(32, mean=(0.5,), std=(0.1,))(gray)
    assert x.shape == (1, 32, 32)
    torch.testing.assert_close(x, torch.full_like(x, (128 / 255 - 0.5) / 0.1))
    rgb = eval_transform(32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.5, 1.0))(Image.new("RGB", (32, 32), (255, 0, 51)))
    torch.testing.assert_close(rgb.mean(dim=(1, 2)), torch.tensor([1.0, -0.5, 0.2]))


def test_knn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_classify(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), torch.zeros(1, 2), k=0)
    with pytest.raises(ValueError, match="3 train features but 2 labels"):
        knn_classify(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), torch.zeros(1, 2))


def test_knn_eval_folders_on_a_tiny_image_folder(tmp_path):
    make_color_folders(tmp_path, {"train": 6, "val": 4})
    (tmp_path / "train" / "class_1" / "broken.png").write_bytes(b"not a png")
    enc = tiny_vit()
    enc.train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    res = knn_eval_folders(enc, tmp_path / "train", tmp_path / "val", img_size=32, k=5, batch_size=8,
                           precision="fp32", progress=False)
    assert res["num_train"] == 18 and res["num_val"] == 12 and res["num_classes"] == 3
    assert "knn_top5" not in res  # fewer than 10 classes
    assert res["knn_top1"] > 80.0  # solid colors are separable even for a random encoder; chance is 33 %
    assert enc.training  # the monitor's model comes back in train mode
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    mean_pool = knn_eval_folders(enc, tmp_path / "train", tmp_path / "val", img_size=32, k=5, pool="mean",
                                 precision="fp32", progress=False)
    assert mean_pool["pool"] == "mean" and 0.0 <= mean_pool["knn_top1"] <= 100.0


def test_knn_eval_folders_names_a_class_without_readable_images(tmp_path):
    make_color_folders(tmp_path, {"train": 2, "val": 1})
    for f in (tmp_path / "train" / "class_2").iterdir():
        f.write_bytes(b"")
    with pytest.raises(ClassificationDataError, match=r"class folder .*train/class_2 has no readable images"):
        knn_eval_folders(tiny_vit(), tmp_path / "train", tmp_path / "val", img_size=32, precision="fp32",
                         progress=False)


@pytest.mark.skipif(not bf16_native("cpu"), reason="CPU without native bf16")
def test_bf16_features_match_fp32(tmp_path):
    make_color_folders(tmp_path, {"train": 2})
    ds = ImageFolderDataset(tmp_path / "train", eval_transform(32))
    enc = tiny_vit()
    f32, y32 = extract_features(enc, folder_loader(ds, 6, 0, "cpu"), precision="fp32", progress=False)
    bf16, ybf = extract_features(enc, folder_loader(ds, 6, 0, "cpu"), precision="bf16", progress=False)
    assert f32.dtype == bf16.dtype == torch.float32 and torch.equal(y32, ybf)
    assert not torch.equal(f32, bf16)  # autocast really ran in bf16
    assert torch.nn.functional.cosine_similarity(f32, bf16).min() > 0.98
