"""The shared ViT encoder: attention, windows, relative position, checkpointing, timm key/forward parity."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT

from mae_det.modeling import VisionTransformer, get_2d_sincos_pos_embed
from mae_det.modeling.vit import (
    Attention,
    Block,
    decomposed_rel_pos_bias,
    relative_positions,
    window_partition,
    window_unpartition,
)


def tiny_vit(**kwargs) -> VisionTransformer:
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4)
    args.update(kwargs)
    return VisionTransformer(**args)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero biases and norms, so equalities cannot hold by accident of the official init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad and not name.endswith(("pos_embed",)):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("norm1.weight") else 0.0))
    return module


# ---- attention ----------------------------------------------------------------------------------------
def test_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    attn = randomize_(Attention(32, num_heads=4))
    x = torch.randn(2, 5, 32)
    qkv = attn.qkv(x).reshape(2, 5, 3, 4, 8)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, heads, N, hd)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_rel_pos", [False, True])
def test_cpu_bf16_attention_runs_sdpa_in_fp32(use_rel_pos):
    torch.manual_seed(3)
    kw = {"use_rel_pos": True, "rel_pos_size": (2, 3)} if use_rel_pos else {}
    attn = randomize_(Attention(32, num_heads=4, **kw))
    if use_rel_pos:
        with torch.no_grad():
            attn.rel_pos_h.normal_(0, 0.5), attn.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(2, 6, 32)
    seen = []
    attn.proj.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, (2, 3))
    assert seen == [(torch.bfloat16, torch.bfloat16)]  # the matmuls around attention stay bf16
    # the same fp32 SDPA on bf16-rounded q, k, v is what ran
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = attn.qkv(x).reshape(2, 6, 3, 4, 8).permute(2, 0, 3, 1, 4)
        bias = decomposed_rel_pos_bias(q, attn.rel_pos_h, attn.rel_pos_w, (2, 3)).float() if use_rel_pos else None
    ctx = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = attn.proj(ctx.transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # a module cast to bf16 (no autocast) keeps bf16 in and out
    assert attn.bfloat16()(x.bfloat16(), (2, 3)).dtype == torch.bfloat16


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="embed_dim 30 is not divisible by num_heads 4"):
        Attention(30, 4)


def test_decomposed_rel_pos_bias_equals_loop():
    torch.manual_seed(1)
    h, w, C = 3, 4, 6
    q = torch.randn(2, 2, h * w, C)
    rh, rw = torch.randn(2 * h - 1, C), torch.randn(2 * w - 1, C)
    bias = decomposed_rel_pos_bias(q, rh, rw, (h, w))
    assert bias.shape == (2, 2, h * w, h * w)
    for i in range(h):
        for j in range(w):
            for k in range(h):
                for l in range(w):
                    qi = q[:, :, i * w + j]
                    expected = qi @ rh[i - k + h - 1] + qi @ rw[j - l + w - 1]
                    torch.testing.assert_close(bias[:, :, i * w + j, k * w + l], expected, atol=1e-5, rtol=1e-5)


def test_relative_positions_scales_coordinates_for_unequal_lengths():
    table = torch.arange(7.0)[:, None]  # 2*4-1 rows, value = row index
    offsets = relative_positions(2, 4, table)[..., 0]
    # Queries are stretched to the key length: offset = 2*i - j + 3.
    assert offsets.tolist() == [[3, 2, 1, 0], [5, 4, 3, 2]]
    resized = relative_positions(3, 3, torch.arange(9.0)[:, None])  # 9-row table resampled to 5 rows
    assert resized.shape == (3, 3, 1) and resized[0, 0, 0] == resized[1, 1, 0] == resized[2, 2, 0]


def test_rel_pos_refuses_token_sequences_with_cls():
    block = Block(32, 4, use_rel_pos=True, rel_pos_size=(2, 2))
    with pytest.raises(ValueError, match="relative position needs a spatial token grid"):
        block(torch.randn(1, 5, 32))


# ---- windows ----------------------------------------------------------------------------------------
def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 5, 7, 3)
    windows, padded = window_partition(x, 3)
    assert padded == (6, 9) and windows.shape == (2 * 2 * 3, 9, 3)
    torch.testing.assert_close(windows[1].reshape(3, 3, 3), x[0, 0:3, 3:6], atol=0, rtol=0)
    last = windows[5].reshape(3, 3, 3)  # sample 0, window (1, 2): rows 3-5, cols 6-8, mostly padding
    torch.testing.assert_close(last[:2, :1], x[0, 3:5, 6:7], atol=0, rtol=0)
    assert torch.count_nonzero(last[2]) == 0 and torch.count_nonzero(last[:, 1:]) == 0
    torch.testing.assert_close(window_unpartition(windows, 3, padded, (5, 7)), x, atol=0, rtol=0)


def _windowed_block_reference(block: Block, x: torch.Tensor, win: int) -> torch.Tensor:
    """Zero-pad the normalized grid, attend inside each window separately (padded tokens included, as in
    ViTDet), crop, then the residual and MLP."""
    B, H, W, D = x.shape
    y = block.norm1(x)
    Hp, Wp = -(-H // win) * win, -(-W // win) * win
    y = F.pad(y, (0, 0, 0, Wp - W, 0, Hp - H))
    out = torch.zeros_like(y)
    for r in range(0, Hp, win):
        for c in range(0, Wp, win):
            tokens = y[:, r : r + win, c : c + win].reshape(B, win * win, D)
            out[:, r : r + win, c : c + win] = block.attn(tokens, (win, win)).reshape(B, win, win, D)
    x = x + out[:, :H, :W]
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("use_rel_pos", [False, True])
def test_windowed_block_with_padding_equals_per_window_reference(use_rel_pos):
    torch.manual_seed(2)
    block = randomize_(Block(32, 4, window_size=3, use_rel_pos=use_rel_pos))
    x = torch.randn(2, 5, 7, 32)
    torch.testing.assert_close(block(x), _windowed_block_reference(block, x, 3), atol=1e-5, rtol=1e-5)


def test_windows_do_not_see_each_other():
    torch.manual_seed(3)
    block = randomize_(Block(32, 4, window_size=3)).eval()
    x = torch.randn(1, 5, 7, 32)
    x2 = x.clone()
    x2[0, 4, 6] += 5.0  # inside window (1, 2)
    changed = (block(x) - block(x2)).abs().sum(-1)[0] > 0
    assert changed[3:, 6:].any() and not changed[:3].any() and not changed[:, :6].any()


def test_window_equal_to_grid_is_global_attention():
    torch.manual_seed(4)
    glob = randomize_(Block(32, 4, window_size=0))
    windowed = Block(32, 4, window_size=4)
    windowed.load_state_dict(glob.state_dict())
    x = torch.randn(2, 4, 4, 32)
    torch.testing.assert_close(windowed(x), glob(x), atol=1e-5, rtol=1e-5)
    # A larger window pads: the zero-padded tokens become keys (ViTDet's behaviour), so it is not global.
    padded = Block(32, 4, window_size=5)
    padded.load_state_dict(glob.state_dict())
    assert not torch.allclose(padded(x), glob(x), atol=1e-3)


# ---- encoder ----------------------------------------------------------------------------------------
def test_zero_init_rel_pos_leaves_outputs_unchanged_and_learns():
    torch.manual_seed(5)
    plain = randomize_(tiny_vit(img_size=48, window_size=2, global_attn_indexes=(2,)))
    rel = tiny_vit(img_size=48, window_size=2, global_attn_indexes=(2,), use_rel_pos=True)
    result = rel.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(f"blocks.{i}.attn.rel_pos_{a}" for i in range(3) for a in "hw")
    assert rel.blocks[0].attn.rel_pos_h.shape == (3, 8)  # window 2 -> 2*2-1 rows
    assert rel.blocks[2].attn.rel_pos_h.shape == (11, 8)  # global block sized for the 6x6 grid
    imgs = torch.randn(2, 3, 48, 48)
    outs_plain = plain.forward_spatial(imgs, [0, 2])
    outs_rel = rel.forward_spatial(imgs, [0, 2])
    for a, b in zip(outs_plain, outs_rel):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    outs_rel[1].square().mean().backward()
    assert rel.blocks[2].attn.rel_pos_h.grad.abs().sum() > 0 and rel.blocks[0].attn.rel_pos_w.grad.abs().sum() > 0
    with torch.no_grad():
        rel.blocks[2].attn.rel_pos_h.normal_()
    assert not torch.allclose(rel.forward_spatial(imgs, [2])[0], outs_plain[1], atol=1e-3)


def test_rel_pos_tables_are_resampled_for_other_grids():
    torch.manual_seed(6)
    model = randomize_(tiny_vit(use_rel_pos=True, rel_pos_grid=4))
    out = model.forward_spatial(torch.randn(1, 3, 64, 48), [2])[0]
    assert out.shape == (1, 32, 8, 6) and torch.isfinite(out).all()


def test_forward_spatial_returns_requested_blocks_in_order():
    torch.manual_seed(7)
    model = randomize_(tiny_vit()).eval()
    imgs = torch.randn(2, 3, 32, 48)
    outs = model.forward_spatial(imgs, [2, 0])
    assert [o.shape for o in outs] == [(2, 32, 4, 6)] * 2
    x = model.embed(imgs)
    x0 = model.blocks[0](x)
    torch.testing.assert_close(outs[1], x0.permute(0, 3, 1, 2), atol=0, rtol=0)
    torch.testing.assert_close(outs[0], model.blocks[2](model.blocks[1](x0)).permute(0, 3, 1, 2), atol=0, rtol=0)


def test_forward_spatial_fills_every_slot_of_a_repeated_index():
    """The default quarter taps of a 2- or 3-block encoder repeat a block ([0, 0, 0, 1], [0, 0, 1, 2])."""
    torch.manual_seed(7)
    model = randomize_(tiny_vit()).eval()
    imgs = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        b0, b1, b2 = model.forward_spatial(imgs, [0, 1, 2])
        outs = model.forward_spatial(imgs, [0, 0, 1, 2, 0])
    assert all(o is not None for o in outs)
    for got, expected in zip(outs, (b0, b0, b1, b2, b0)):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_encoder_keys_and_features_equal_timm_vit():
    torch.manual_seed(8)
    ours = randomize_(tiny_vit())
    timm_vit = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=0)
    timm_vit.load_state_dict(ours.state_dict(), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours.forward_features(imgs), timm_vit.forward_features(imgs), atol=1e-5, rtol=1e-5)


def test_features_deterministic_and_pooling():
    torch.manual_seed(9)
    model = tiny_vit(drop_path_rate=0.0).train()
    imgs = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(imgs)
    torch.testing.assert_close(model.forward_features(imgs), feats, atol=0, rtol=0)
    torch.testing.assert_close(model.pooled_features(imgs, "cls"), feats[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(model.pooled_features(imgs, "mean"), feats[:, 1:].mean(1), atol=0, rtol=0)
    with pytest.raises(ValueError, match="pool must be 'cls' or 'mean', got 'max'"):
        model.pooled_features(imgs, "max")


def test_drop_path_schedule_and_eval_determinism():
    torch.manual_seed(10)
    model = randomize_(tiny_vit(drop_path_rate=0.2))
    assert isinstance(model.blocks[0].drop_path, torch.nn.Identity)
    assert [b.drop_path.drop_prob for b in model.blocks[1:]] == pytest.approx([0.1, 0.2])
    imgs = torch.randn(4, 3, 32, 32)
    no_drop = tiny_vit()
    no_drop.load_state_dict(model.state_dict())
    model.eval()
    torch.testing.assert_close(model.forward_features(imgs), no_drop.forward_features(imgs), atol=0, rtol=0)
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model.forward_features(imgs), no_drop.forward_features(imgs))


def test_act_checkpoint_spatial_identical_outputs_and_grads():
    torch.manual_seed(11)
    plain = randomize_(tiny_vit(window_size=3, global_attn_indexes=(1,), use_rel_pos=True))
    ckpt = tiny_vit(window_size=3, global_attn_indexes=(1,), use_rel_pos=True, use_act_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    imgs = torch.randn(2, 3, 40, 32)
    outs = []
    for model in (plain, ckpt):
        out = model.forward_spatial(imgs, [1, 2])
        sum(o.square().mean() for o in out).backward()
        outs.append(out)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-6, msg=name)


def test_position_embedding_native_and_resampled():
    model = tiny_vit()
    table = get_2d_sincos_pos_embed(32, 4)
    torch.testing.assert_close(model.pos_embed_for((4, 4)).reshape(16, 32), table, atol=0, rtol=0)
    resampled = model.pos_embed_for((6, 8))
    assert resampled.shape == (1, 6, 8, 32) and torch.isfinite(resampled).all()
    # Corners of an align_corners=False bicubic upsample stay close to the original corners.
    assert (resampled[0, 0, 0] - table[0]).abs().max() < 0.3
    assert model.embed(torch.randn(1, 3, 48, 64)).shape == (1, 6, 8, 32)
    assert not model.pos_embed.requires_grad and tiny_vit(learnable_pos_embed=True).pos_embed.requires_grad


def test_builds_on_meta_device():
    with torch.device("meta"):
        model = tiny_vit(drop_path_rate=0.1, window_size=2, use_rel_pos=True)
    assert model.pos_embed.is_meta and model.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(img_size=30), r"image size \(30, 30\) is not divisible by patch_size 8"),
        (dict(window_size=-1), "window_size must be >= 0, got -1"),
        (dict(window_size=2, global_attn_indexes=(3,)), r"global_attn_indexes \[3\] out of range for depth 3"),
    ],
)
def test_constructor_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_vit(**kwargs)


def test_bf16_autocast_spatial_forward_runs():
    torch.manual_seed(12)
    model = randomize_(tiny_vit(window_size=3, global_attn_indexes=(2,), use_rel_pos=True))
    imgs = torch.randn(1, 3, 32, 32)
    ref = model.forward_spatial(imgs, [2])[0]
    dtypes = []
    model.blocks[2].attn.qkv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_spatial(imgs, [2])[0]
    assert dtypes == [torch.bfloat16] and torch.isfinite(out.float()).all()
    assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


@pytest.mark.parametrize("window,globals_", [(0, ()), (2, (1,))])
def test_vitdet_init_draws_what_detectron2_vit_draws(window, globals_):
    """init="vitdet" is Detectron2's ViT init rule for rule and draw for draw: the same seed, the same tensors."""
    from functools import partial

    from detectron2.modeling.backbone.vit import ViT

    kw = dict(patch_size=8, embed_dim=32, depth=3, num_heads=4, drop_path_rate=0.1, window_size=window, use_rel_pos=True)
    torch.manual_seed(7)
    theirs = ViT(img_size=48, pretrain_img_size=32, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                 window_block_indexes=[i for i in range(3) if i not in globals_], **kw)
    torch.manual_seed(7)
    ours = VisionTransformer(img_size=32, global_attn_indexes=globals_, rel_pos_grid=6, learnable_pos_embed=True,
                             init="vitdet", **kw)
    expected, got = theirs.state_dict(), ours.state_dict()
    assert set(got) - set(expected) == {"cls_token", "norm.weight", "norm.bias"}  # unused on the spatial grid
    for k, v in expected.items():
        assert torch.equal(got[k], v), k
    assert got["blocks.0.attn.qkv.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert not got["blocks.0.attn.qkv.bias"].any() and not got["cls_token"].any()


def test_mae_init_is_the_default_and_differs_from_vitdet():
    torch.manual_seed(0)
    mae = tiny_vit()
    torch.manual_seed(0)
    vitdet = tiny_vit(init="vitdet", learnable_pos_embed=True)
    torch.testing.assert_close(mae.pos_embed[0], get_2d_sincos_pos_embed(32, 4, cls_token=True).float())
    assert not torch.equal(mae.pos_embed, vitdet.pos_embed) and 0.015 < vitdet.pos_embed.std() < 0.025
    frozen = tiny_vit(init="vitdet")  # a table nobody trains must carry positions: it stays sin-cos
    assert torch.equal(mae.pos_embed, frozen.pos_embed)
    bound = math.sqrt(6 / (32 + 96))  # xavier-uniform of the fused qkv
    assert mae.blocks[0].attn.qkv.weight.abs().max() <= bound and mae.blocks[0].attn.qkv.weight.std() > 0.1
    assert vitdet.blocks[0].attn.qkv.weight.std() < 0.03
    with pytest.raises(ValueError, match="init must be 'mae' or 'vitdet', got 'normal'"):
        tiny_vit(init="normal")


def test_double_precision_attention_stays_in_double_on_cpu():
    # the fp32 detour meant for bf16 / fp16 caught float64 too: 3e-8 off, and gradcheck failed
    torch.manual_seed(0)
    attn = Attention(16, 2, use_rel_pos=True, rel_pos_size=(3, 3)).double()
    torch.nn.init.normal_(attn.rel_pos_h, std=0.1)
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    q, k, v = attn.qkv(x).reshape(2, 9, 3, 2, 8).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8) + decomposed_rel_pos_bias(q, attn.rel_pos_h, attn.rel_pos_w, (3, 3))
    expected = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 16))
    assert attn(x, (3, 3)).dtype == torch.float64
    torch.testing.assert_close(attn(x, (3, 3)), expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: attn(t, (3, 3)), (x,))
