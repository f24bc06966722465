"""tools/convert_checkpoint.py: official MAE and Hugging Face weights to Detectron2-ready files."""
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from safetensors.torch import save_file
from torch import nn

from mae_det.checkpoint.detectron2 import ViTDetCheckpointer
from mae_det.checkpoint.hf import mae_to_hf
from mae_det.checkpoint.io import load_checkpoint
from mae_det.config.vit_backbone import add_vit_config
from mae_det.modeling import MaskedAutoencoderViT
from mae_det.modeling.backbone import build_vit_fpn_backbone

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "convert_checkpoint.py"
CONFIG = """\
MODEL:
  BACKBONE:
    NAME: build_vit_fpn_backbone
  VIT:
    SIZE: custom
    EMBED_DIM: 64
    DEPTH: 4
    NUM_HEADS: 2
    WINDOW_SIZE: 4
    INPUT_SIZE: 128
    PRETRAIN_IMG_SIZE: 64
    OUT_CHANNELS: 32
  RPN:
    IN_FEATURES: ["p2", "p3", "p4", "p5", "p6"]
  ROI_HEADS:
    IN_FEATURES: ["p2", "p3", "p4", "p5"]
"""


def tiny_mae(img: int) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(
        img_size=img, patch_size=16, embed_dim=64, depth=4, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
        decoder_num_heads=2, norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )


def test_official_checkpoint_with_config_loads_as_pretrained(tmp_path):
    src, out, cfg_file = tmp_path / "mae_full.pth", tmp_path / "vit_d2.pth", tmp_path / "tiny.yaml"
    mae = tiny_mae(img=32)  # 2x2 grid: resampled to the config's 4x4
    torch.save({"model": mae.state_dict()}, src)
    cfg_file.write_text(CONFIG)
    run = subprocess.run(
        [sys.executable, str(TOOL), "--input", str(src), "--output", str(out), "--config-file", str(cfg_file)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "(official) ->" in run.stdout and "pos_embed resampled 2x2 -> 4x4" in run.stdout
    written = load_checkpoint(out)
    assert written["__author__"] == "mae_det" and written["source_format"] == "official"
    assert written["matching_heuristics"] is False and written["model"]["backbone.net.pos_embed"].shape == (1, 17, 64)

    cfg = add_vit_config(get_cfg())
    cfg.merge_from_file(str(cfg_file))
    holder = nn.Module()
    holder.backbone = build_vit_fpn_backbone(cfg, ShapeSpec(channels=3))
    ck = ViTDetCheckpointer(holder)
    ck.load(str(out))
    r = ck.last_report
    assert (r.format, r.origin, r.missing, r.unused) == ("d2", "official", [], [])
    assert len(r.loaded) == 4 * 12 + 3 and any(k.startswith("backbone.pyramid.") for k in r.new)
    assert torch.equal(holder.backbone.net.blocks[2].mlp.fc1.weight, mae.blocks[2].mlp.fc1.weight)


def test_hf_safetensors_without_config(tmp_path, capsys):
    from tools.convert_checkpoint import main

    mae = tiny_mae(img=64)
    src, out = tmp_path / "model.safetensors", tmp_path / "hf_d2.pth"
    save_file(mae_to_hf(mae.state_dict(), legacy_names=True), str(src))
    main(["--input", str(src), "--output", str(out)])
    assert "(hf) ->" in capsys.readouterr().out
    written = load_checkpoint(out)
    assert written["source_format"] == "hf"
    assert "backbone.net.cls_token" not in written["model"] and "backbone.net.norm.weight" not in written["model"]
    assert torch.equal(written["model"]["backbone.net.blocks.1.attn.qkv.weight"], mae.blocks[1].attn.qkv.weight)


def test_bad_input_is_a_one_line_error(tmp_path):
    from tools.convert_checkpoint import main

    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "o.pth")])
    assert str(e.value) == f"convert_checkpoint: checkpoint not found: {tmp_path / 'missing.pth'}"
    assert not (tmp_path / "o.pth").exists()


def test_an_output_that_cannot_be_written_and_a_wrong_format_flag_are_one_line_errors(tmp_path):
    from tools.convert_checkpoint import main

    src = tmp_path / "mae_pretrain.pth"
    torch.save({"model": tiny_mae(64).state_dict()}, src)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:  # the output's folder is a file: was a FileExistsError traceback
        main(["--input", str(src), "--output", str(tmp_path / "file" / "o.pth")])
    assert str(e.value).startswith(f"convert_checkpoint: cannot write checkpoint {tmp_path / 'file' / 'o.pth'}: ")
    with pytest.raises(SystemExit) as e:  # the HF reader's message did not name the file
        main(["--input", str(src), "--output", str(tmp_path / "o.pth"), "--format", "hf"])
    assert str(e.value).startswith(f"convert_checkpoint: {src}: cannot be read as Hugging Face ViTMAE (format 'hf' "
                                   "was forced), its content looks like official MAE")
    assert "\n" not in str(e.value) and not (tmp_path / "o.pth").exists()


def test_the_input_as_output_is_refused_and_the_source_kept(tmp_path):
    from tools.convert_checkpoint import main

    src = tmp_path / "mae_full.pth"
    torch.save({"model": tiny_mae(64).state_dict()}, src)
    before = src.read_bytes()
    (tmp_path / "link.pth").symlink_to(src)
    for output in (src, tmp_path / "link.pth"):
        with pytest.raises(SystemExit) as e:  # the decoder-less conversion replaced the full checkpoint
            main(["--input", str(src), "--output", str(output)])
        assert str(e.value) == (f"convert_checkpoint: --output {output} is the input file; write the conversion to "
                                "another file")
    assert src.read_bytes() == before


def test_a_safetensors_output_reads_back_and_other_suffixes_are_refused(tmp_path, capsys):
    from mae_det.checkpoint.convert import read_checkpoint
    from tools.convert_checkpoint import main

    src, cfg_file = tmp_path / "mae_full.pth", tmp_path / "tiny.yaml"
    torch.save({"model": tiny_mae(32).state_dict()}, src)
    cfg_file.write_text(CONFIG)
    for name in ("o.pth", "o.safetensors"):
        main(["--input", str(src), "--output", str(tmp_path / name), "--config-file", str(cfg_file)])
    pth, st = load_checkpoint(tmp_path / "o.pth"), read_checkpoint(tmp_path / "o.safetensors")  # was a torch zip
    assert {k: v for k, v in st.items() if k != "model"} == {
        "__author__": "mae_det", "matching_heuristics": False, "source_format": "official", "pos_grid": [4, 4]}
    assert st.keys() == pth.keys() and st["model"].keys() == pth["model"].keys()
    assert all(torch.equal(st["model"][k], v) for k, v in pth["model"].items())
    cfg = add_vit_config(get_cfg())
    cfg.merge_from_file(str(cfg_file))
    holder = nn.Module()
    holder.backbone = build_vit_fpn_backbone(cfg, ShapeSpec(channels=3))
    ck = ViTDetCheckpointer(holder)
    ck.load(str(tmp_path / "o.safetensors"))
    assert (ck.last_report.origin, ck.last_report.missing, ck.last_report.unused) == ("official", [], [])
    for name in ("o.pkl", "o.bin", "o"):  # a .pkl was a torch zip that the .pkl reader cannot read, exit 0
        with pytest.raises(SystemExit) as e:
            main(["--input", str(src), "--output", str(tmp_path / name)])
        assert str(e.value) == (f"convert_checkpoint: --output {tmp_path / name}: expected a file name ending in "
                                ".pth, .pt, .safetensors (MODEL.WEIGHTS reads a file by its suffix)")
        assert not (tmp_path / name).exists()
