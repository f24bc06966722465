"""Linear probe: learns separable features, leaves the frozen encoder bit-identical."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mae_det.evaluation.linear_probe as LP
from mae_det.data.images import DecodedImageCache
from mae_det.evaluation.linear_probe import LinearProbeHead, linear_probe_features, linear_probe_folders
from mae_det.modeling.vit import VisionTransformer


def _color_folders(root: Path, n_train: int, n_val: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, color in enumerate([(220, 30, 30), (30, 200, 40), (40, 60, 220)]):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(color) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.png")


def _separable(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 24, generator=torch.Generator().manual_seed(99)) * 2 + 5  # offset: BN must center
    y = torch.arange(4).repeat_interleave(n_per_class)
    return centers[y] + 0.5 * torch.randn(len(y), 24, generator=g), y


def test_head_is_batchnorm_without_affine_then_linear():
    head = LinearProbeHead(16, 5)
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine
    assert head[1].weight.shape == (5, 16) and head[1].weight.std() < 0.02


# LARS at the recipe's actual lr (0.1 x 16384 / 256 = 6.4): its steps are relative to the weight norm.
@pytest.mark.parametrize("optimizer, base_lr", [("lars", 25.6), ("sgd", 1.0)])
def test_probe_learns_separable_features(optimizer, base_lr, one_thread, monkeypatch):
    real_train, heads = LP.train_head, []

    def train_head(head, *args, **kwargs):  # keeps a copy of every trained head
        heads.append({k: v.clone() for k, v in real_train(head, *args, **kwargs).state_dict().items()})
        return head

    monkeypatch.setattr(LP, "train_head", train_head)
    xtr, ytr = _separable(50, seed=0)
    xva, yva = _separable(25, seed=1)
    res = linear_probe_features(xtr, ytr, xva, yva, 4, epochs=40, batch_size=64, base_lr=base_lr,
                                optimizer=optimizer, warmup_epochs=2, progress=False)
    assert res["linear_top1"] == 100.0
    assert res["batch_size"] == 64 and res["epochs"] == 40 and res["lr"] == pytest.approx(base_lr / 4)
    # Same seed, same result: the head init and batch order do not depend on the global RNG.
    torch.manual_seed(123)
    again = linear_probe_features(xtr, ytr, xva, yva, 4, epochs=3, batch_size=64, optimizer=optimizer,
                                  warmup_epochs=1, progress=False)
    torch.manual_seed(456)
    again2 = linear_probe_features(xtr, ytr, xva, yva, 4, epochs=3, batch_size=64, optimizer=optimizer,
                                   warmup_epochs=1, progress=False)
    assert again == again2
    # the top-1 saturates: the trained weights themselves must be equal
    assert len(heads) == 3 and all(torch.equal(heads[1][k], heads[2][k]) for k in heads[1])


def test_probe_on_shuffled_labels_stays_near_chance(one_thread):
    xtr, _ = _separable(50, seed=0)
    xva, _ = _separable(50, seed=1)
    g = torch.Generator().manual_seed(3)
    res = linear_probe_features(xtr, torch.randint(0, 4, (200,), generator=g), xva,
                                torch.randint(0, 4, (200,), generator=g), 4, epochs=20, batch_size=64,
                                warmup_epochs=2, progress=False)
    assert res["linear_top1"] < 45.0  # chance is 25 %


@pytest.mark.parametrize("augment", [False, True])
def test_encoder_weights_stay_bit_identical(tmp_path, augment):
    _color_folders(tmp_path, n_train=6, n_val=3)
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, drop_path_rate=0.1)
    enc.train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    res = linear_probe_folders(enc, tmp_path / "train", tmp_path / "val", img_size=32, augment=augment,
                               epochs=3, batch_size=8, base_lr=0.5, warmup_epochs=1, feature_batch_size=9,
                               precision="fp32", progress=False)
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert all(p.grad is None for p in enc.parameters())
    assert enc.training
    assert res["num_train"] == 18 and res["num_val"] == 9 and res["augment"] is augment
    assert 0.0 <= res["linear_top1"] <= 100.0 and "linear_top5" not in res


def test_augmented_probe_reads_the_same_pixels_from_the_decoded_image_cache(tmp_path, one_thread):
    _color_folders(tmp_path, n_train=6, n_val=3)
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    cache = DecodedImageCache(10**6)
    runs = [linear_probe_folders(enc, tmp_path / "train", tmp_path / "val", img_size=32, augment=True, epochs=3,
                                 batch_size=8, base_lr=0.5, warmup_epochs=1, feature_batch_size=9, precision="fp32",
                                 progress=False, cache=c) for c in (None, cache)]
    assert runs[0] == runs[1]
    assert len(cache) == 27  # every train and val image, decoded once over the 3 epochs


def test_augmented_probe_encodes_an_optimizer_batch_in_feature_batch_chunks(tmp_path, one_thread):
    # the IN-1K config's batch of 16384 went through one loader batch and one encoder forward (~10 GB of pixels
    # per batch, 20 prefetched); now the encoder sees at most feature_batch_size images, the head the whole batch
    _color_folders(tmp_path, n_train=6, n_val=3)
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    seen: list[int] = []
    real = enc.pooled_features

    def pooled_features(x, pool):
        seen.append(len(x))
        return real(x, pool=pool)

    enc.pooled_features = pooled_features
    runs = {}
    for chunk in (8, 3):
        seen.clear()
        runs[chunk] = linear_probe_folders(enc, tmp_path / "train", tmp_path / "val", img_size=32, augment=True,
                                           epochs=3, batch_size=8, base_lr=0.5, warmup_epochs=1,
                                           feature_batch_size=chunk, precision="fp32", progress=False)
        train_chunks = seen[-3 * 2 * (8 // chunk + (8 % chunk > 0)):]  # after the val features: 3 epochs x 2 batches
        assert train_chunks == [8] * 6 if chunk == 8 else train_chunks == [3, 3, 2] * 6
    assert runs[3]["batch_size"] == runs[8]["batch_size"] == 8
    assert runs[3]["linear_top1"] == runs[8]["linear_top1"]


@pytest.mark.parametrize("augment", [False, True])
def test_a_grayscale_encoder_is_probed_with_its_own_statistics(tmp_path, augment, one_thread, monkeypatch):
    # Both transforms used ImageNet's RGB statistics (three channels) whatever the encoder was trained with.
    _color_folders(tmp_path, n_train=4, n_val=2)
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, in_chans=1)
    inputs: list[torch.Tensor] = []
    real = enc.pooled_features

    def pooled_features(x, pool):
        inputs.append(x)
        return real(x, pool=pool)

    enc.pooled_features = pooled_features
    res = linear_probe_folders(enc, tmp_path / "train", tmp_path / "val", img_size=32, augment=augment, epochs=2,
                               batch_size=4, base_lr=0.5, warmup_epochs=0, mean=(0.5,), std=(0.25,),
                               precision="fp32", progress=False)
    assert res["num_train"] == 12 and {x.shape[1] for x in inputs} == {1}
    # the gray levels of the red, green and blue images, normalized with (0.5, 0.25): all within [-2, 2]
    assert max(x.abs().max().item() for x in inputs) <= 2.0


@pytest.mark.parametrize("augment", [False, True])
def test_min_lr_above_the_peak_lr_of_a_small_set_is_a_config_error(tmp_path, augment, one_thread):
    # 18 training images cap the batch of 256, and so the peak lr, below what the config check could know
    from mae_det.config.pretrain import ConfigError

    _color_folders(tmp_path, n_train=6, n_val=3)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    with pytest.raises(ConfigError) as info:
        linear_probe_folders(enc, tmp_path / "train", tmp_path / "val", img_size=32, augment=augment, epochs=2,
                             batch_size=256, base_lr=0.1, min_lr=0.05, precision="fp32", progress=False)
    assert str(info.value) == "LINPROBE.MIN_LR 0.05 exceeds the peak lr 0.00703 (LINPROBE.BASE_LR x batch 18/256)"
