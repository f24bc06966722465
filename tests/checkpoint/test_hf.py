"""Hugging Face ViTMAE import/export: parity with transformers' own implementation and exact round trips."""
import json

import pytest
import torch

from mae_det.checkpoint import CheckpointError
from mae_det.checkpoint.hf import hf_config_from_mae, hf_to_mae, mae_kwargs_from_hf_config, mae_to_hf
from mae_det.modeling import MaskedAutoencoderViT, patchify, unpatchify

transformers = pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def small_config(**kwargs) -> ViTMAEConfig:
    args = dict(
        image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
        decoder_intermediate_size=128, layer_norm_eps=1e-6, mask_ratio=0.75,
    )
    args.update(kwargs)
    return ViTMAEConfig(**args)


def randomized_hf(config: ViTMAEConfig, seed: int = 0) -> ViTMAEForPreTraining:
    torch.manual_seed(seed)
    model = ViTMAEForPreTraining(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # every tensor, pos tables included: the mapping must carry each one
    return model


def assert_same_outputs(hf_model, ours, imgs, noise, mask_ratio=0.75):
    with torch.no_grad():
        theirs = hf_model(pixel_values=imgs, noise=noise)
        loss, pred, mask = ours(imgs, mask_ratio, noise)
    torch.testing.assert_close(mask, theirs.mask, atol=0, rtol=0)
    torch.testing.assert_close(pred, theirs.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, theirs.loss, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_imported_weights_give_hf_loss_prediction_and_mask(norm_pix_loss):
    config = small_config(norm_pix_loss=norm_pix_loss)
    hf_model = randomized_hf(config)
    ours = MaskedAutoencoderViT(**mae_kwargs_from_hf_config(config)).eval()
    ours.load_state_dict(hf_to_mae(hf_model.state_dict()), strict=True)
    imgs = torch.randn(3, 3, 32, 32)
    assert_same_outputs(hf_model, ours, imgs, torch.rand(3, 16))


def test_exported_weights_load_strictly_into_hf_and_agree():
    torch.manual_seed(1)
    ours = MaskedAutoencoderViT(
        img_size=32, patch_size=8, in_chans=2, embed_dim=48, depth=2, num_heads=4, decoder_embed_dim=32,
        decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0, norm_pix_loss=True,
    ).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    config = hf_config_from_mae(ours, mask_ratio=0.5)
    assert config.layer_norm_eps == 1e-5 and config.num_channels == 2 and config.intermediate_size == 96
    hf_model = ViTMAEForPreTraining(config).eval()
    hf_model.load_state_dict(mae_to_hf(ours.state_dict(), legacy_names=not TRANSFORMERS_5), strict=True)
    assert_same_outputs(hf_model, ours, torch.randn(2, 2, 32, 32), torch.rand(2, 16), mask_ratio=0.5)


def test_legacy_file_layout_loads_with_from_pretrained(tmp_path, monkeypatch):
    """What the hub's facebook/vit-mae-* files hold; every transformers version reads it."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(2)
    ours = MaskedAutoencoderViT(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
        decoder_num_heads=4,
    ).eval()
    legacy = mae_to_hf(ours.state_dict(), legacy_names=True)
    assert "vit.encoder.layer.1.attention.attention.query.weight" in legacy
    assert "decoder.decoder_layers.0.intermediate.dense.bias" in legacy
    safetensors_torch.save_file(legacy, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_mae(ours).to_dict()))
    hf_model = ViTMAEForPreTraining.from_pretrained(str(tmp_path)).eval()
    assert_same_outputs(hf_model, ours, torch.randn(2, 3, 32, 32), torch.rand(2, 16))
    # And back: the legacy file imports to exactly our weights.
    back = hf_to_mae(safetensors_torch.load_file(str(tmp_path / "model.safetensors")))
    assert list(back) == list(ours.state_dict())
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(back[k], v, atol=0, rtol=0, msg=k)


def test_a_file_written_by_save_pretrained_imports(tmp_path, monkeypatch):
    # transformers 5 writes the decoder layers as decoder.decoder_encoder.layer.N (its state_dict says
    # decoder.decoder_layers.N): such a file was refused for keys "with no MAE counterpart"
    safetensors_torch = pytest.importorskip("safetensors.torch")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = small_config()
    hf_model = randomized_hf(config)
    hf_model.save_pretrained(str(tmp_path))
    ours = MaskedAutoencoderViT(**mae_kwargs_from_hf_config(config)).eval()
    ours.load_state_dict(hf_to_mae(safetensors_torch.load_file(str(tmp_path / "model.safetensors"))), strict=True)
    assert_same_outputs(hf_model, ours, torch.randn(2, 3, 32, 32), torch.rand(2, 16))


@pytest.mark.parametrize("legacy", [True, False])
def test_round_trips_are_exact_and_inputs_untouched(legacy):
    hf_sd = randomized_hf(small_config()).state_dict()
    if legacy != (not TRANSFORMERS_5):
        hf_sd = mae_to_hf(hf_to_mae(hf_sd), legacy_names=legacy)  # the other layout, built by us
    before = {k: v.clone() for k, v in hf_sd.items()}
    mae_sd = hf_to_mae(hf_sd)
    again = mae_to_hf(mae_sd, legacy_names=legacy)
    assert set(again) == set(hf_sd)
    for k in hf_sd:
        torch.testing.assert_close(again[k], hf_sd[k], atol=0, rtol=0, msg=k)
        torch.testing.assert_close(hf_sd[k], before[k], atol=0, rtol=0, msg=k)
    ours_again = hf_to_mae(mae_to_hf(mae_sd, legacy_names=not legacy))
    assert list(ours_again) == list(mae_sd)
    for k in mae_sd:
        torch.testing.assert_close(ours_again[k], mae_sd[k], atol=0, rtol=0, msg=k)


def test_keys_come_out_in_official_order_and_qkv_is_q_k_v_stacked():
    hf_model = randomized_hf(small_config())
    mae_sd = hf_to_mae(hf_model.state_dict())
    reference = MaskedAutoencoderViT(**mae_kwargs_from_hf_config(small_config())).state_dict()
    assert list(mae_sd) == list(reference)
    attn = hf_model.vit.layers[1].attention if TRANSFORMERS_5 else hf_model.vit.encoder.layer[1].attention.attention
    q, k, v = (attn.q_proj, attn.k_proj, attn.v_proj) if TRANSFORMERS_5 else (attn.query, attn.key, attn.value)
    torch.testing.assert_close(mae_sd["blocks.1.attn.qkv.weight"], torch.cat([q.weight, k.weight, v.weight]))
    torch.testing.assert_close(mae_sd["blocks.1.attn.qkv.bias"][64:128], k.bias)


def test_encoder_only_dicts_convert_both_ways():
    hf_model = randomized_hf(small_config())
    encoder_sd = hf_to_mae(hf_model.vit.state_dict())  # bare ViTMAEModel keys
    assert "mask_token" not in encoder_sd and not any(k.startswith("decoder") for k in encoder_sd)
    assert len(encoder_sd) == 4 + 2 * 12 + 2
    hf_keys = mae_to_hf(encoder_sd, legacy_names=not TRANSFORMERS_5)
    assert set(hf_keys) == {f"vit.{k}" for k in hf_model.vit.state_dict()}


def test_qkv_without_bias_imports_as_zero_bias():
    config = small_config(qkv_bias=False)
    hf_model = randomized_hf(config)
    ours = MaskedAutoencoderViT(**mae_kwargs_from_hf_config(config)).eval()
    mae_sd = hf_to_mae(hf_model.state_dict())
    assert torch.count_nonzero(mae_sd["blocks.0.attn.qkv.bias"]) == 0
    ours.load_state_dict(mae_sd, strict=True)
    assert_same_outputs(hf_model, ours, torch.randn(2, 3, 32, 32), torch.rand(2, 16))


def test_patchify_conventions_match_hf():
    hf_model = randomized_hf(small_config(num_channels=2))
    imgs = torch.randn(2, 2, 32, 32)
    torch.testing.assert_close(patchify(imgs, 8), hf_model.patchify(imgs), atol=0, rtol=0)
    x = torch.randn(2, 16, 128)
    torch.testing.assert_close(unpatchify(x, 8, (4, 4), 2), hf_model.unpatchify(x, (32, 32)), atol=0, rtol=0)


def test_conversion_errors_name_the_key():
    hf_sd = randomized_hf(small_config()).state_dict()
    missing = {k: v for k, v in hf_sd.items() if not k.endswith("decoder_pred.bias")}
    with pytest.raises(CheckpointError, match="no 'decoder.decoder_pred.bias'"):
        hf_to_mae(missing)
    with pytest.raises(CheckpointError, match=r"no MAE counterpart: \['classifier.weight'\]"):
        hf_to_mae({**hf_sd, "classifier.weight": torch.zeros(1)})
    mae_sd = hf_to_mae(hf_sd)
    with pytest.raises(CheckpointError, match="MAE state dict has no 'blocks.1.norm2.weight'"):
        mae_to_hf({k: v for k, v in mae_sd.items() if k != "blocks.1.norm2.weight"})
    with pytest.raises(CheckpointError, match=r"no HF ViTMAE counterpart: \['head.weight'\]"):
        mae_to_hf({**mae_sd, "head.weight": torch.zeros(1)})


def test_configs_without_an_equivalent_are_refused():
    with pytest.raises(ValueError, match="hidden_act must be 'gelu'"):
        mae_kwargs_from_hf_config(small_config(hidden_act="relu"))
    with pytest.raises(ValueError, match="must equal the encoder's"):
        mae_kwargs_from_hf_config(small_config(decoder_intermediate_size=64))
    non_square = MaskedAutoencoderViT(img_size=(32, 48), patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    with pytest.raises(ValueError, match="square input; this model's patch grid is 4x6"):
        hf_config_from_mae(non_square)
