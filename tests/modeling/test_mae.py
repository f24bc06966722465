"""MaskedAutoencoderViT against the official model's conventions (issue 3, "Done when")."""
import math
import re
from pathlib import Path

import pytest
import torch

from mae_det.modeling import (
    MAE_FACTORIES,
    MaskedAutoencoderViT,
    get_2d_sincos_pos_embed,
    mae_vit_base_patch16,
    mae_vit_huge_patch14,
    mae_vit_large_patch16,
    patchify,
    unpatchify,
)
from mae_det.modeling.vit import LayerNorm6

REFERENCE_TSV = Path(__file__).parent / "data" / "official_mae_vit_base_state_dict.tsv"


def tiny_mae(**kwargs) -> MaskedAutoencoderViT:
    args = dict(
        img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, norm_layer=LayerNorm6,
    )
    args.update(kwargs)
    return MaskedAutoencoderViT(**args)


def read_reference() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in REFERENCE_TSV.read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


def scaled_reference(D: int, depth: int, p: int) -> list[tuple[str, tuple[int, ...]]]:
    """The official ViT-B key list rewritten for another encoder (width D, depth, patch p) at 224 px."""
    L = (224 // p) ** 2
    encoder = {768: D, 2304: 3 * D, 3072: 4 * D, 197: L + 1, 16: p}
    per_key = {"decoder_pos_embed": {197: L + 1}, "decoder_embed.weight": {768: D},
               "decoder_pred.weight": {768: p * p * 3}, "decoder_pred.bias": {768: p * p * 3}}
    rows = []
    for key, shape in read_reference():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m and m.group(1) != "0":
            continue
        if key.startswith("decoder") or key == "mask_token":
            table = per_key.get(key, {})
        else:
            table = encoder
        new_shape = tuple(table.get(s, s) for s in shape)
        if m:
            # Keep the official order: all of block i's tensors, then block i+1's.
            rows.append((("block", m.group(2)), new_shape))
        else:
            rows.append((key, new_shape))
    suffixes = [(k[1], s) for k, s in rows if isinstance(k, tuple)]
    first = next(i for i, (k, _) in enumerate(rows) if isinstance(k, tuple))
    plain = [r for r in rows if not isinstance(r[0], tuple)]
    blocks = [(f"blocks.{i}.{suffix}", s) for i in range(depth) for suffix, s in suffixes]
    return plain[:first] + blocks + plain[first:]


# ---- patchify --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,p", [((2, 3, 32, 32), 8), ((2, 3, 32, 48), 16), ((1, 1, 24, 40), 8), ((2, 5, 16, 32), 4)]
)
def test_patchify_unpatchify_round_trip(shape, p):
    imgs = torch.randn(shape)
    N, C, H, W = shape
    x = patchify(imgs, p)
    assert x.shape == (N, (H // p) * (W // p), p * p * C)
    torch.testing.assert_close(unpatchify(x, p, (H // p, W // p), C), imgs, atol=0, rtol=0)


def test_patchify_layout_channel_fastest_row_major():
    N, C, H, W, p = 1, 2, 4, 6, 2
    imgs = torch.arange(N * C * H * W, dtype=torch.float32).reshape(N, C, H, W)
    x = patchify(imgs, p)
    w = W // p
    for i in range(H // p):
        for j in range(w):
            for r in range(p):
                for c in range(p):
                    for ch in range(C):
                        assert x[0, i * w + j, (r * p + c) * C + ch] == imgs[0, ch, i * p + r, j * p + c]


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match=r"\(30, 32\) is not divisible by patch size 8"):
        patchify(torch.zeros(1, 3, 30, 32), 8)


def test_model_patchify_uses_its_grid_and_channels():
    model = tiny_mae(img_size=(32, 48), in_chans=1)
    imgs = torch.randn(2, 1, 32, 48)
    torch.testing.assert_close(model.unpatchify(model.patchify(imgs)), imgs, atol=0, rtol=0)


# ---- masking ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("L,ratio,keep", [(196, 0.75, 49), (100, 0.9, 9), (16, 0.5, 8), (10, 0.0, 10), (7, 0.3, 4)])
def test_masking_keeps_exact_count_in_ascending_noise_order(L, ratio, keep):
    assert int(L * (1 - ratio)) == keep  # the official truncation, e.g. 100 * 0.1 = 9.999.. -> 9
    torch.manual_seed(0)
    N, D = 3, 5
    x = torch.randn(N, L, D)
    noise = torch.rand(N, L)
    x_vis, mask, ids_restore = MaskedAutoencoderViT.random_masking(x, ratio, noise)
    assert x_vis.shape == (N, keep, D) and mask.dtype == torch.float32
    assert mask.sum(dim=1).tolist() == [float(L - keep)] * N
    for n in range(N):
        order = sorted(range(L), key=lambda j: noise[n, j].item())
        torch.testing.assert_close(x_vis[n], x[n, order[:keep]], atol=0, rtol=0)
        rank = {j: r for r, j in enumerate(order)}
        assert ids_restore[n].tolist() == [rank[j] for j in range(L)]
        assert mask[n].tolist() == [float(rank[j] >= keep) for j in range(L)]


def test_ids_restore_inverts_the_shuffle():
    torch.manual_seed(1)
    x = torch.randn(2, 16, 4)
    noise = torch.rand(2, 16)
    _, _, ids_restore = MaskedAutoencoderViT.random_masking(x, 0.0, noise)
    shuffled = torch.gather(x, 1, torch.argsort(noise, dim=1)[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(torch.gather(shuffled, 1, ids_restore[..., None].expand(-1, -1, 4)), x, atol=0, rtol=0)


def test_noise_makes_masking_deterministic_and_rand_is_the_only_rng():
    model = tiny_mae().eval()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    out1 = model(imgs, 0.75, noise)
    torch.manual_seed(123)
    out2 = model(imgs, 0.75, noise)
    for a, b in zip(out1, out2):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Without noise, the mask comes from torch.rand(N, L): same seed -> same draw.
    torch.manual_seed(5)
    expected = torch.rand(2, 16)
    torch.manual_seed(5)
    _, _, mask = model(imgs, 0.75)
    torch.testing.assert_close(mask, (torch.argsort(torch.argsort(expected, 1), 1) >= 4).float(), atol=0, rtol=0)
    other = torch.rand(2, 16)
    assert not torch.equal(model(imgs, 0.75, other)[2], out1[2])


def test_bad_masking_arguments_raise_clear_errors():
    x = torch.zeros(2, 16, 4)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \[0, 1\), got 1.0"):
        MaskedAutoencoderViT.random_masking(x, 1.0)
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 16\), got \(2, 15\)"):
        MaskedAutoencoderViT.random_masking(x, 0.5, torch.rand(2, 15))


# ---- loss --------------------------------------------------------------------------------------------
def test_loss_counts_only_removed_patches():
    torch.manual_seed(2)
    model = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 16, 192)
    mask = torch.zeros(2, 16)
    mask[0, [1, 5, 7]] = 1
    mask[1, [0, 2]] = 1
    target = model.patchify(imgs)
    expected = torch.stack([((pred[n, j] - target[n, j]) ** 2).mean() for n, j in mask.nonzero().tolist()]).mean()
    loss = model.forward_loss(imgs, pred, mask)
    torch.testing.assert_close(loss, expected)
    changed_visible = pred.clone()
    changed_visible[mask == 0] += 10.0
    torch.testing.assert_close(model.forward_loss(imgs, changed_visible, mask), loss, atol=0, rtol=0)
    changed_removed = pred.clone()
    changed_removed[1, 2] += 1.0
    assert model.forward_loss(imgs, changed_removed, mask) > loss


def test_loss_gradient_vanishes_on_visible_predictions():
    torch.manual_seed(3)
    model = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    latent, mask, ids_restore = model.forward_encoder(imgs, 0.75)
    pred = model.forward_decoder(latent, ids_restore, model.grid_size).detach().requires_grad_()
    model.forward_loss(imgs, pred, mask).backward()
    assert torch.count_nonzero(pred.grad[mask == 0]) == 0
    assert torch.count_nonzero(pred.grad[mask == 1].abs().sum(-1)) == int(mask.sum())


def test_norm_pix_targets_use_unbiased_variance_plus_eps():
    torch.manual_seed(4)
    model = tiny_mae(norm_pix_loss=True)
    imgs = torch.rand(2, 3, 32, 32) * 3
    imgs[0, :, :8, :8] = 0.25  # a constant patch: variance 0, so the 1e-6 keeps it finite
    patches = model.patchify(imgs).double()
    n = patches.shape[-1]
    mean = patches.sum(-1, keepdim=True) / n
    var = ((patches - mean) ** 2).sum(-1, keepdim=True) / (n - 1)
    expected = ((patches - mean) / torch.sqrt(var + 1e-6)).float()
    targets = model.pixel_targets(imgs)
    torch.testing.assert_close(targets, expected, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(targets[0, 0]) == 0 and torch.isfinite(targets).all()
    pred = torch.randn(2, 16, 192)
    mask = (torch.rand(2, 16) > 0.5).float()
    loss_expected = (((pred - expected) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(model.forward_loss(imgs, pred, mask), loss_expected, atol=1e-5, rtol=1e-5)
    plain = tiny_mae(norm_pix_loss=False)
    torch.testing.assert_close(plain.pixel_targets(imgs), model.patchify(imgs), atol=0, rtol=0)


# ---- mask ratio 0 and deterministic features --------------------------------------------------------
def test_mask_ratio_zero_is_finite_and_a_permuted_forward_features():
    torch.manual_seed(6)
    model = tiny_mae().eval()
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs, mask_ratio=0.0)
    assert torch.isfinite(loss) and loss.item() == 0.0 and mask.sum() == 0 and torch.isfinite(pred).all()
    latent, _, ids_restore = model.forward_encoder(imgs, 0.0)
    features = model.forward_features(imgs)
    unshuffled = torch.gather(latent[:, 1:], 1, ids_restore[..., None].expand(-1, -1, latent.shape[-1]))
    torch.testing.assert_close(unshuffled, features[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(latent[:, 0], features[:, 0], atol=1e-5, rtol=1e-5)
    identity_noise = torch.arange(16.0).expand(2, -1)
    torch.testing.assert_close(model.forward_encoder(imgs, 0.0, identity_noise)[0], features, atol=1e-5, rtol=1e-5)


def test_forward_features_is_deterministic_even_in_train_mode():
    torch.manual_seed(7)
    model = tiny_mae().train()
    imgs = torch.randn(2, 3, 32, 32)
    a = model.forward_features(imgs)
    torch.manual_seed(99)
    b = model.forward_features(imgs)
    assert a.shape == (2, 17, 64)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_non_square_input_and_any_channel_count_train():
    torch.manual_seed(8)
    model = tiny_mae(img_size=(32, 48), in_chans=5)
    imgs = torch.randn(2, 5, 32, 48)
    loss, pred, mask = model(imgs, 0.75)
    assert pred.shape == (2, 24, 8 * 8 * 5) and mask.sum(1).tolist() == [18.0, 18.0]
    loss.backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0 and model.mask_token.grad.abs().sum() > 0


def test_other_input_size_resamples_both_position_embeddings():
    torch.manual_seed(9)
    model = tiny_mae()
    imgs = torch.randn(1, 3, 48, 64)
    loss, pred, mask = model(imgs, 0.5)
    assert pred.shape == (1, 48, 192) and torch.isfinite(loss)
    torch.testing.assert_close(
        model.decoder_pos_embed_for((6, 8))[0], get_2d_sincos_pos_embed(32, (6, 8), cls_token=True)
    )


def test_bf16_autocast_forward_backward_runs():
    torch.manual_seed(10)
    model = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    ref = model(imgs, 0.75, noise)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = model(imgs, 0.75, noise)
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(model.blocks[0].attn.qkv.weight.grad).all()
    assert abs(loss.item() - ref.item()) < 0.05 * ref.item()


# ---- official state dict, parameter count, init ---------------------------------------------------
def test_base_state_dict_equals_official_list_in_order():
    with torch.device("meta"):
        model = mae_vit_base_patch16()
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == read_reference()
    assert len(ours) == 254
    assert sum(p.numel() for p in model.parameters()) == 111_907_840
    encoder = sum(v.numel() for k, v in model.state_dict().items() if not k.startswith(("decoder", "mask_token")))
    assert encoder == 85_798_656


@pytest.mark.parametrize(
    "factory,D,depth,p", [(mae_vit_large_patch16, 1024, 24, 16), (mae_vit_huge_patch14, 1280, 32, 14)]
)
def test_large_and_huge_state_dicts_follow_the_official_pattern(factory, D, depth, p):
    with torch.device("meta"):
        model = factory()
    expected = scaled_reference(D, depth, p)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected
    assert sum(math.prod(s) for _, s in expected) == sum(p_.numel() for p_ in model.parameters())


def test_scaled_reference_reproduces_base():
    assert scaled_reference(768, 12, 16) == read_reference()


def test_factories_use_official_sizes_and_eps():
    assert set(MAE_FACTORIES) >= {"mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"}
    with torch.device("meta"):
        model = mae_vit_large_patch16()
    assert model.norm.eps == 1e-6 and model.decoder_norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6
    assert model.blocks[0].attn.num_heads == 16 and model.decoder_blocks[0].attn.num_heads == 16
    assert len(model.decoder_blocks) == 8 and model.mask_token.shape[-1] == 512 and not model.norm_pix_loss


def test_official_init():
    torch.manual_seed(11)
    model = tiny_mae(embed_dim=192, num_heads=3, decoder_embed_dim=512, decoder_num_heads=8)
    D = 192
    qkv = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (D + 3 * D))  # xavier over the fused (3D, D) matrix, not per q/k/v
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.98 * bound
    assert abs(qkv.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    conv = model.patch_embed.proj.weight
    conv_bound = math.sqrt(6 / (D + 3 * 8 * 8))
    assert conv.abs().max() <= conv_bound and conv.abs().max() > 0.98 * conv_bound
    assert torch.count_nonzero(model.patch_embed.proj.bias) > 0  # PyTorch's default conv bias init is kept
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.count_nonzero(m.bias) == 0, name
            b = math.sqrt(6 / sum(m.weight.shape))
            assert m.weight.abs().max() <= b, name
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    assert 0.016 < model.cls_token.std().item() < 0.024
    assert 0.017 < model.mask_token.std().item() < 0.023
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0], get_2d_sincos_pos_embed(D, 4, cls_token=True), atol=0, rtol=0)
    decoder_table = get_2d_sincos_pos_embed(512, 4, cls_token=True)
    torch.testing.assert_close(model.decoder_pos_embed[0], decoder_table, atol=0, rtol=0)


def test_act_checkpointing_gives_identical_loss_and_grads():
    torch.manual_seed(12)
    plain = tiny_mae()
    ckpt = tiny_mae(use_act_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    losses, calls = [], []
    for model in (plain, ckpt):
        count = [0]
        model.blocks[0].register_forward_pre_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        loss = model(imgs, 0.75, noise)[0]
        loss.backward()
        losses.append(loss)
        calls.append(count[0])
    assert calls == [1, 2]  # the checkpointed block is recomputed in backward
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-6, msg=name)


def test_vitdet_init_draws_encoder_linears_trunc_normal_and_keeps_the_frozen_sincos_table_and_decoder():
    torch.manual_seed(13)
    model = tiny_mae(embed_dim=192, num_heads=3, decoder_embed_dim=512, decoder_num_heads=8, init="vitdet")
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            if name.startswith("decoder"):  # MAE's decoder init whatever the encoder's
                assert m.weight.abs().max() <= math.sqrt(6 / sum(m.weight.shape)), name
            else:
                assert 0.018 < m.weight.std().item() < 0.022, name  # torch trunc_normal_ cuts at +-2 (absolute)
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0], get_2d_sincos_pos_embed(192, 4, cls_token=True), atol=0, rtol=0)
