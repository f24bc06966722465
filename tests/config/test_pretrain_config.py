"""Pretraining config: defaults, _BASE_ files, overrides and one-line validation errors naming the key."""
from pathlib import Path

import pytest

from mae_det.config.pretrain import (
    ConfigError, get_pretrain_cfg, load_pretrain_cfg, resolve_arch, validate_pretrain_cfg,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pretrain"


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    return str(d)


def _cfg(data_dir, *opts):
    return load_pretrain_cfg(None, ["DATA.PATH", data_dir, *opts])


def _error(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_defaults_follow_the_paper():
    cfg = get_pretrain_cfg()
    assert (cfg.MODEL.MASK_RATIO, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY) == (0.75, 1.5e-4, 0.05)
    assert tuple(cfg.SOLVER.BETAS) == (0.9, 0.95) and tuple(cfg.DATA.SCALE) == (0.2, 1.0)
    assert cfg.SOLVER.DECAY_TOKENS and cfg.MONITOR.KNN.ENABLED is False
    assert resolve_arch(cfg) == {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0,
                                 "decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}


def test_shipped_configs_load_with_base(data_dir):
    base = load_pretrain_cfg(CONFIGS / "mae_vit_base_in1k.yaml", ["DATA.PATH", data_dir])
    assert base.MODEL.ARCH == "mae_vit_base_patch16" and base.MODEL.NORM_PIX_LOSS  # from Base-Pretrain.yaml
    assert (base.SOLVER.EPOCHS, base.SOLVER.WARMUP_EPOCHS, base.SOLVER.EFFECTIVE_BATCH_SIZE) == (800, 40, 4096)
    large = load_pretrain_cfg(CONFIGS / "mae_vit_large_in1k.yaml", ["DATA.PATH", data_dir])
    assert resolve_arch(large)["depth"] == 24
    tiny = load_pretrain_cfg(CONFIGS / "folder_vit_tiny_cpu.yaml", ["DATA.PATH", data_dir])
    assert resolve_arch(tiny)["patch_size"] == 8 and tiny.MODEL.IMG_SIZE % 8 == 0


def test_overrides_and_int_for_float(data_dir):
    cfg = _cfg(data_dir, "SOLVER.MIN_LR", "0", "MODEL.EMBED_DIM", "64", "MODEL.NUM_HEADS", "2",
               "DATA.SCALE", "(0.5, 1)")
    assert isinstance(cfg.SOLVER.MIN_LR, float) and resolve_arch(cfg)["embed_dim"] == 64
    assert tuple(cfg.DATA.SCALE) == (0.5, 1.0)


def test_unknown_key_on_command_line_and_in_file(data_dir, tmp_path):
    assert "unknown config key 'MODEL.MASK_RATOI'" in _error(_cfg, data_dir, "MODEL.MASK_RATOI", "0.5")
    f = tmp_path / "x.yaml"
    f.write_text(f"_BASE_: {CONFIGS / 'Base-Pretrain.yaml'}\nSOLVER:\n  EPOCS: 3\n")
    msg = _error(load_pretrain_cfg, f, ["DATA.PATH", data_dir])
    assert str(f) in msg and "unknown config key" in msg and "EPOCS" in msg


def test_wrong_type(data_dir, tmp_path):
    msg = _error(_cfg, data_dir, "SOLVER.EPOCHS", "'many'")
    assert "SOLVER.EPOCHS" in msg
    f = tmp_path / "t.yaml"
    f.write_text("MODEL:\n  NORM_PIX_LOSS: 3\n")
    assert "MODEL.NORM_PIX_LOSS" in _error(load_pretrain_cfg, f, ["DATA.PATH", data_dir])
    cfg = _cfg(data_dir)
    cfg.MODEL.IMG_SIZE = "224"
    assert _error(validate_pretrain_cfg, cfg) == "config key MODEL.IMG_SIZE: expected int, got str '224'"


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_mask_ratio_range(data_dir, ratio):
    msg = _error(_cfg, data_dir, "MODEL.MASK_RATIO", ratio)
    assert msg == f"MODEL.MASK_RATIO: expected a value in [0, 1), got {float(ratio)}"


def test_mask_ratio_that_masks_or_keeps_no_patch_is_refused_in_mae_mode(data_dir):
    # Until 2026-12-05 both ran to the end: ratio 0 with an MAE loss of exactly 0, 0.999 with an encoder that
    # never saw a patch. 224 px / 16 = 196 patches; the model keeps int(196 * (1 - ratio)).
    msg = _error(_cfg, data_dir, "MODEL.MASK_RATIO", "0.0")
    assert msg.startswith("MODEL.MASK_RATIO: 0.0 masks none of the 196 patches, so the MAE loss (on masked patches "
                          "only) is 0 and nothing trains; expected a ratio that masks at least one patch")
    msg = _error(_cfg, data_dir, "MODEL.MASK_RATIO", "0.999")
    assert msg.startswith("MODEL.MASK_RATIO: 0.999 keeps none of the 196 patches, so the encoder never sees the image")
    # The bounds that still mask and keep one patch, on this grid and on the tiny CPU config's 8x8 grid.
    assert _cfg(data_dir, "MODEL.MASK_RATIO", "0.001").MODEL.MASK_RATIO == 0.001  # keeps 195
    assert _cfg(data_dir, "MODEL.MASK_RATIO", "0.99").MODEL.MASK_RATIO == 0.99  # keeps 1
    assert "keeps none of the 64 patches" in _error(
        load_pretrain_cfg, CONFIGS / "folder_vit_tiny_cpu.yaml", ["DATA.PATH", data_dir, "MODEL.MASK_RATIO", "0.99"])
    # The supervised baseline masks nothing: the ratio is unused there.
    assert _cfg(data_dir, "MODEL.MODE", "supervised", "MODEL.MASK_RATIO", "0.0").MODEL.MASK_RATIO == 0.0


def test_option_after_the_overrides_is_named(data_dir):
    # argparse gives everything after the first KEY to the overrides; the message used to be "an odd list".
    msg = _error(_cfg, data_dir, "SOLVER.EPOCHS", "3", "--resume")
    assert msg == "command line: --resume is an option; options go before the KEY VALUE overrides"
    assert "--num-gpus is an option" in _error(_cfg, data_dir, "--num-gpus", "2")
    assert _cfg(data_dir, "OUTPUT_DIR", "--odd-but-valid-folder").OUTPUT_DIR == "--odd-but-valid-folder"


def test_image_size_not_divisible_by_patch(data_dir):
    msg = _error(_cfg, data_dir, "MODEL.IMG_SIZE", "100")
    assert msg == "MODEL.IMG_SIZE: 100 is not a positive multiple of the patch size 16"
    assert _cfg(data_dir, "MODEL.IMG_SIZE", "100", "MODEL.PATCH_SIZE", "10").MODEL.IMG_SIZE == 100


def test_data_path_empty_or_missing(tmp_path):
    assert "DATA.PATH is empty" in _error(load_pretrain_cfg, None, [])
    missing = str(tmp_path / "nowhere")
    assert _error(load_pretrain_cfg, None, ["DATA.PATH", missing]) == f"DATA.PATH: {missing} does not exist"


def test_other_checks(data_dir):
    assert "MODEL.ARCH: unknown architecture 'vit_giant'" in _error(_cfg, data_dir, "MODEL.ARCH", "vit_giant")
    assert "MODEL.MODE" in _error(_cfg, data_dir, "MODEL.MODE", "contrastive")
    assert "SOLVER.WARMUP_EPOCHS" in _error(_cfg, data_dir, "SOLVER.EPOCHS", "10", "SOLVER.WARMUP_EPOCHS", "10")
    assert "PRECISION: fp16 needs a GPU" in _error(_cfg, data_dir, "PRECISION", "fp16", "DEVICE", "cpu")
    msg = _error(_cfg, data_dir, "MODEL.EMBED_DIM", "64")
    assert msg == "MODEL.EMBED_DIM: 64 is not divisible by MODEL.NUM_HEADS 12"
    assert "DATA.MEAN/DATA.STD" in _error(_cfg, data_dir, "MODEL.IN_CHANS", "1")
    msg = _error(_cfg, data_dir, "MODEL.IN_CHANS", "1", "DATA.MEAN", "(0.5,)", "DATA.STD", "(0.5,)",
                 "DATA.CHANNEL_SHUFFLE", "True")
    assert msg == "DATA.CHANNEL_SHUFFLE: needs RGB input (MODEL.IN_CHANS 3), got MODEL.IN_CHANS 1"
    assert "MONITOR.KNN.TRAIN_ROOT is empty" in _error(_cfg, data_dir, "MONITOR.KNN.ENABLED", "True")
    assert "odd list" in _error(_cfg, data_dir, "SEED")
    assert "config file not found" in _error(load_pretrain_cfg, "/no/such.yaml", [])


def test_large_batch_recipe_is_the_paper_recipe_with_fewer_accumulation_steps(data_dir):
    from mae_det.engine.pretrain import resolve_accumulation

    base = load_pretrain_cfg(CONFIGS / "mae_vit_base_in1k.yaml", ["DATA.PATH", data_dir])
    large = load_pretrain_cfg(CONFIGS / "mae_vit_base_in1k_large_batch.yaml", ["DATA.PATH", data_dir])
    assert (large.SOLVER.BATCH_SIZE, large.DATA.DECODE_DEVICE, large.SOLVER.COMPILE) == (512, "cuda", "auto")
    for key in ("EPOCHS", "WARMUP_EPOCHS", "EFFECTIVE_BATCH_SIZE", "BASE_LR", "BETAS", "WEIGHT_DECAY"):
        assert large.SOLVER[key] == base.SOLVER[key], key
    assert [resolve_accumulation(large, n) for n in (1, 8)] == [(8, 4096), (1, 4096)]
    assert [resolve_accumulation(base, n) for n in (1, 8)] == [(64, 4096), (8, 4096)]


def test_compile_and_decode_device_values(data_dir):
    assert "SOLVER.COMPILE: expected one of ('auto', 'on', 'off'), got 'yes'" in _error(
        _cfg, data_dir, "SOLVER.COMPILE", "yes")
    assert "DATA.DECODE_DEVICE: expected one of ('cpu', 'cuda'), got 'gpu'" in _error(
        _cfg, data_dir, "DATA.DECODE_DEVICE", "gpu")
    assert _cfg(data_dir, "SOLVER.COMPILE", "off", "DATA.DECODE_DEVICE", "cuda").SOLVER.COMPILE == "off"
    assert _error(_cfg, data_dir, "DATA.CACHE_DECODED_MB", "-1") == (
        "DATA.CACHE_DECODED_MB: expected >= 0 MiB (0 = off), got -1.0")
    assert _error(_cfg, data_dir, "DATA.CACHE_DECODED_MB", "64", "DATA.DECODE_DEVICE", "cuda") == (
        "DATA.CACHE_DECODED_MB: caches images decoded on the CPU; with DATA.DECODE_DEVICE cuda set it to 0")


def test_encoder_init_choice_is_validated(data_dir):
    assert _cfg(data_dir).MODEL.INIT == "mae"
    assert _cfg(data_dir, "MODEL.INIT", "vitdet").MODEL.INIT == "vitdet"
    with pytest.raises(ConfigError, match=r"MODEL.INIT: expected one of \('vitdet', 'mae'\), got 'xavier'"):
        _cfg(data_dir, "MODEL.INIT", "xavier")


def test_embed_widths_must_suit_the_sin_cos_position_tables(data_dir):
    from mae_det.engine.pretrain import SupervisedViT, build_pretrain_model

    tiny = ["MODEL.ARCH", "mae_vit_tiny_patch16", "MODEL.DEPTH", "2", "MODEL.IMG_SIZE", "32", "MODEL.DECODER_DEPTH", "1"]
    encoder = "MODEL.EMBED_DIM: 66 is not a multiple of 4, which the encoder's 2-D sin-cos position table needs"
    for init in ("mae", "vitdet"):  # vitdet keeps the frozen sin-cos table too
        assert _error(_cfg, data_dir, *tiny, "MODEL.INIT", init, "MODEL.EMBED_DIM", "66", "MODEL.NUM_HEADS", "3") == encoder
    assert _error(_cfg, data_dir, *tiny, "MODEL.DECODER_EMBED_DIM", "30", "MODEL.DECODER_NUM_HEADS", "3") == (
        "MODEL.DECODER_EMBED_DIM: 30 is not a multiple of 4, which the decoder's 2-D sin-cos position table needs")
    # Supervised pretraining has no decoder: its width is never built, so it is no error.
    cfg = _cfg(data_dir, *tiny, "MODEL.MODE", "supervised", "MODEL.DECODER_EMBED_DIM", "30",
               "MODEL.DECODER_NUM_HEADS", "3")
    model = build_pretrain_model(cfg, num_classes=2)
    assert isinstance(model, SupervisedViT) and model.pos_embed.shape == (1, 1 + 4, 192)


def test_demo_supervised_arm_uses_only_count_preserving_augmentation():
    # A crop would change the per-class counts it learns from; flips, quarter turns and channel orders keep them
    # and stop it memorizing the 2,400-image pool (README pilot p55).
    shapes = CONFIGS.parent / "shapes"
    cfg = load_pretrain_cfg(shapes / "pretrain_supervised.yaml", check_paths=False)
    assert cfg.MODEL.MODE == "supervised" and cfg.MODEL.MAX_COUNT == 3
    assert tuple(cfg.DATA.SCALE) == (1.0, 1.0) and tuple(cfg.DATA.RATIO) == (1.0, 1.0)
    assert cfg.DATA.HFLIP and cfg.DATA.ROT90 and cfg.DATA.CHANNEL_SHUFFLE
    mae = load_pretrain_cfg(shapes / "pretrain_mae.yaml", check_paths=False)
    assert not mae.DATA.ROT90 and not mae.DATA.CHANNEL_SHUFFLE


def test_base_file_errors_name_the_base_file_and_yaml_errors_their_line(data_dir, tmp_path):
    base, child = tmp_path / "base.yaml", tmp_path / "child.yaml"
    child.write_text("_BASE_: base.yaml\nSOLVER:\n  EPOCHS: 10\n")
    base.write_text("SOLVER:\n  EPOCS: 3\n")
    assert _error(load_pretrain_cfg, child, ["DATA.PATH", data_dir]) == f"{base}: unknown config key 'SOLVER.EPOCS'"
    base.write_text("SOLVER:\n  EPOCHS: 3\n   BATCH_SIZE: 4\n")
    assert _error(load_pretrain_cfg, child, ["DATA.PATH", data_dir]) == (
        f"{base}: YAML syntax error at line 3, column 14: mapping values are not allowed here")
    base.write_text("")
    assert _error(load_pretrain_cfg, child, ["DATA.PATH", data_dir]) == (
        f"{base}: expected a YAML mapping of config keys, got an empty file")
    base.write_text("_BASE_: child.yaml\n")
    assert "is already in the chain" in _error(load_pretrain_cfg, child, ["DATA.PATH", data_dir])
    child.write_text("_BASE_: nope.yaml\n")
    assert _error(load_pretrain_cfg, child, ["DATA.PATH", data_dir]) == (
        f"{child}: _BASE_ file {tmp_path / 'nope.yaml'} not found")


def test_min_lr_above_the_peak_lr_is_refused_where_the_peak_is_known(data_dir):
    # The cosine schedule would climb from the peak to MIN_LR instead of decaying.
    assert _error(_cfg, data_dir, "SOLVER.LR", "1e-4", "SOLVER.MIN_LR", "1e-3") == (
        "SOLVER.MIN_LR 0.001 exceeds the peak lr 0.0001 (SOLVER.LR)")
    assert _error(_cfg, data_dir, "SOLVER.EFFECTIVE_BATCH_SIZE", "64", "SOLVER.MIN_LR", "1e-4") == (
        "SOLVER.MIN_LR 0.0001 exceeds the peak lr 3.75e-05 (SOLVER.BASE_LR x batch 64/256)")
    assert _cfg(data_dir, "SOLVER.EFFECTIVE_BATCH_SIZE", "64", "SOLVER.MIN_LR", "3.75e-5").SOLVER.MIN_LR == 3.75e-5


def test_seed_must_fit_a_signed_64_bit_key(data_dir):
    from mae_det.data.pretrain import sample_generator

    # every seed a run derives hashes (SEED, epoch, index) packed as signed 64-bit integers
    for bad in (str(2**63), "-1"):
        assert _error(_cfg, data_dir, "SEED", bad) == f"SEED: expected an integer in [0, 2**63), got {bad}"
    assert _cfg(data_dir, "SEED", str(2**63 - 1)).SEED == 2**63 - 1
    sample_generator(2**63 - 1, 0, 0)  # the largest valid seed works where the first batch uses it
