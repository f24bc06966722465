"""tools/visualize_mae.py and mae_det.utils.visualize on a tiny MAE saved to a temporary folder."""
import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_det.checkpoint import CheckpointError
from mae_det.data.images import load_image as decode_image
from mae_det.modeling import mae_vit_tiny_patch16
from mae_det.utils import visualize
from mae_det.utils.visualize import HEADER, PAD, grid_image_size, load_mae, visualize_images

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(depth=2, decoder_embed_dim=64, decoder_depth=1)  # tiny width, few blocks


def tiny_model(norm_pix_loss: bool, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return mae_vit_tiny_patch16(img_size=64, norm_pix_loss=norm_pix_loss, **{**SMALL, **kwargs})


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8)).save(folder / "sub" / "gray.jpg")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def panel(img: Image.Image, i: int, side: int = 256) -> np.ndarray:
    x = PAD + i * (side + PAD)
    return np.asarray(img)[HEADER : HEADER + side, x : x + side].astype(int)


def test_our_checkpoint_norm_pix_grid(tmp_path, images, caplog):
    ckpt = tmp_path / "ours.pth"
    # A width and head count the factory does not have: only the checkpoint's meta (as pretrain writes it) knows.
    model = tiny_model(norm_pix_loss=True, embed_dim=96, num_heads=2)
    meta = {"model": "mae_vit_tiny_patch16", "mode": "mae", "img_size": 64, "in_chans": 3, "norm_pix_loss": True,
            "patch_size": 16, "embed_dim": 96, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0}
    torch.save({"model": model.state_dict(), "meta": meta, "epoch": 3}, ckpt)
    written = visualize_images(ckpt, [images], tmp_path / "out", mask_ratio=0.75, seed=1)
    assert [p.name for p in written] == ["a.png", "gray.png"]
    assert "skipped 1 of 3 images" in caplog.text and "broken.png" in caplog.text
    assert "its meta has no decoder_num_heads; using mae_vit_tiny_patch16's default" in caplog.text
    img = Image.open(written[0])
    # 64 px shown x4: the panels are at least MIN_PANEL (224) px (x3 = 192 px was "at least 224")
    assert img.size == grid_image_size((64, 64)) == (4 * 256 + 5 * PAD, HEADER + 256 + PAD)
    assert "norm-pix model: prediction de-normalized with each target patch's own mean/std" in img.text["Title"]
    assert "mask 75% (12/16 patches)" in img.text["Title"]
    img = img.convert("RGB")
    source = np.asarray(Image.open(images / "a.png").resize((256, 256), Image.NEAREST)).astype(int)
    assert np.abs(panel(img, 0) - source).max() <= 1  # the original panel is the input image
    # Visible patches (16x16 px, shown 64x64) are the input in the masked and pasted panels; removed ones gray.
    patches = lambda a: a.reshape(4, 64, 4, 64, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1)  # noqa: E731
    same_masked = (np.abs(patches(panel(img, 1)) - patches(source)).max(1) <= 1)
    same_pasted = (np.abs(patches(panel(img, 3)) - patches(source)).max(1) <= 1)
    gray = (np.abs(patches(panel(img, 1)) - 128).max(1) <= 1)
    assert same_masked.sum() == 4 and gray.sum() == 12 and (same_masked == same_pasted).all()
    noise = torch.rand(1, 16, generator=torch.Generator().manual_seed(1))
    assert same_masked.tolist() == (torch.argsort(torch.argsort(noise[0])) < 4).tolist()


def test_norm_pix_denormalization_uses_target_patch_statistics():
    torch.manual_seed(1)
    model = tiny_model(norm_pix_loss=True).eval()
    image = torch.rand(3, 64, 64)
    noise = torch.rand(1, 16)
    panels = visualize.reconstruct(model, image, 0.75, noise)
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in visualize._norm_stats(3))
    x = ((image - mean) / std)[None]
    _, pred, _ = model(x, 0.75, noise)
    target = model.patchify(x)
    expected = pred * target.var(-1, unbiased=True, keepdim=True).add(1e-6).sqrt() + target.mean(-1, keepdim=True)
    expected = (model.unpatchify(expected)[0] * std + mean).clamp(0, 1)
    torch.testing.assert_close(panels["reconstruction"], expected)


def test_official_file_via_cli_and_same_seed_same_png(tmp_path, images):
    ckpt = tmp_path / "mae_visualize_tiny.pth"
    model = tiny_model(norm_pix_loss=False)
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(norm_pix_loss=False)}, ckpt)
    cmd = [sys.executable, "tools/visualize_mae.py", "--checkpoint", str(ckpt), "--input", str(images / "a.png"),
           "--output", str(tmp_path / "cli"), "--seed", "7", "--mask-ratio", "0.5", "--img-size", "96"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 image(s)" in proc.stdout
    png = (tmp_path / "cli" / "a.png").read_bytes()
    img = Image.open(tmp_path / "cli" / "a.png")
    assert img.size == grid_image_size((96, 96)) == (4 * 288 + 5 * PAD, HEADER + 288 + PAD)  # x3 (was x2)
    assert grid_image_size((224, 224)) == (4 * 224 + 5 * PAD, HEADER + 224 + PAD)
    assert "pixel targets" in img.text["Title"] and "mae_vit_tiny_patch16" in img.text["Title"]
    again = visualize_images(ckpt, [images / "a.png"], tmp_path / "again", mask_ratio=0.5, seed=7, img_size=96)
    assert again[0].read_bytes() == png
    other = visualize_images(ckpt, [images / "a.png"], tmp_path / "other", mask_ratio=0.5, seed=8, img_size=96)
    assert other[0].read_bytes() != png


def test_factory_inferred_and_tensors_fix_the_sizes(tmp_path):
    ckpt = tmp_path / "bare.pth"
    torch.save(tiny_model(norm_pix_loss=False).state_dict(), ckpt)
    loaded = load_mae(ckpt)
    assert loaded.name == "mae_vit_tiny_patch16" and loaded.img_size == (64, 64) and not loaded.norm_pix_loss
    assert len(loaded.model.blocks) == 2 and len(loaded.model.decoder_blocks) == 1
    assert load_mae(ckpt, norm_pix_loss=True).norm_pix_loss


def test_unusable_checkpoints_raise_clear_errors(tmp_path):
    sd = tiny_model(norm_pix_loss=False).state_dict()
    encoder_only = tmp_path / "encoder.pth"
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}}, encoder_only)
    with pytest.raises(CheckpointError, match="encoder.pth holds no decoder"):
        load_mae(encoder_only)
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": sd}, wrong)
    with pytest.raises(CheckpointError, match="wrong.pth does not fit mae_vit_base_patch16"):
        load_mae(wrong, model_name="mae_vit_base_patch16")
    odd = tmp_path / "odd.pth"
    torch.save({"weights": sd}, odd)
    with pytest.raises(CheckpointError, match="expected a dict with a 'model' state dict"):
        load_mae(odd)


def test_normalization_recorded_in_the_checkpoint_is_used(tmp_path, images):
    model = tiny_model(norm_pix_loss=False)
    plain, stats = tmp_path / "plain.pth", tmp_path / "stats.pth"
    meta = {"model": "mae_vit_tiny_patch16", "img_size": 64, "norm_pix_loss": False}
    torch.save({"model": model.state_dict(), "meta": meta}, plain)
    torch.save({"model": model.state_dict(),
                "meta": {**meta, "pixel_mean": [0.5, 0.5, 0.5], "pixel_std": [0.25, 0.25, 0.25]}}, stats)
    loaded = load_mae(stats)
    assert (loaded.pixel_mean, loaded.pixel_std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert (load_mae(plain).pixel_mean, load_mae(plain).pixel_std) == (visualize.IMAGENET_MEAN, visualize.IMAGENET_STD)
    a = visualize_images(plain, [images / "a.png"], tmp_path / "plain", seed=3)[0]
    b = visualize_images(stats, [images / "a.png"], tmp_path / "stats", seed=3)[0]
    same_png = a.read_bytes() == b.read_bytes()
    assert not same_png  # was byte-identical: ImageNet's statistics whatever the meta said
    image = visualize.load_image(images / "a.png", (64, 64), 3)
    noise = torch.rand(1, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = float(loaded.model(((image - 0.5) / 0.25)[None], 0.75, noise)[0])
    assert f"loss {expected:.4f}" in Image.open(b).text["Title"]
    bad = tmp_path / "bad.pth"
    torch.save({"model": model.state_dict(), "meta": {**meta, "pixel_mean": [0.5], "pixel_std": [0.25]}}, bad)
    with pytest.raises(CheckpointError, match="bad.pth: meta pixel_mean .* do not fit a 3-channel model"):
        load_mae(bad)


def test_grids_never_overwrite_or_reread_inputs(tmp_path, images):
    ckpt = tmp_path / "ours.pth"
    torch.save(tiny_model(norm_pix_loss=False).state_dict(), ckpt)
    before = {p: p.read_bytes() for p in images.rglob("*") if p.is_file()}
    with pytest.raises(visualize.VisualizationError, match="is the --output folder"):
        visualize_images(ckpt, [images], images)
    with pytest.raises(visualize.VisualizationError, match=r"grid .*a.png would overwrite the input image"):
        visualize_images(ckpt, [images / "sub" / "gray.jpg", images / "a.png"], images)
    assert {p: p.read_bytes() for p in images.rglob("*") if p.is_file()} == before  # nothing written
    # An output folder inside the input folder: a second run must not take the first run's grids as inputs.
    first = visualize_images(ckpt, [images], images / "vis")
    second = visualize_images(ckpt, [images], images / "vis")
    assert [p.name for p in first] == [p.name for p in second] == ["a.png", "gray.png"]


def test_images_decoded_and_listed_as_everywhere_else(tmp_path, caplog):
    folder = tmp_path / "hostile"
    (folder / ".thumbs").mkdir(parents=True)
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(folder / "g16.png")  # 16-bit: was clipped to white
    stored = Image.new("RGB", (64, 32), "red")
    stored.paste((0, 0, 255), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 32 wide, 64 high
    stored.save(folder / "rot.jpg", exif=exif.tobytes(), quality=95)
    (folder / "._g16.png").write_bytes(b"\x00\x05\x16\x07 mac")  # AppleDouble junk next to the real file
    Image.new("RGB", (8, 8)).save(folder / ".thumbs" / "thumb.png")
    ckpt = tmp_path / "bare.pth"
    torch.save(tiny_model(norm_pix_loss=False).state_dict(), ckpt)
    written = visualize_images(ckpt, [folder], tmp_path / "out")
    assert [p.name for p in written] == ["g16.png", "rot.png"] and "skipp" not in caplog.text
    g16 = visualize.load_image(folder / "g16.png", (64, 64), 3)
    expected = np.asarray(decode_image(folder / "g16.png"), dtype=np.float32) / 255
    np.testing.assert_allclose(g16.permute(1, 2, 0).numpy(), expected, atol=1 / 255)
    assert 0.45 < float(g16.mean()) < 0.55
    rot = visualize.load_image(folder / "rot.jpg", (64, 64), 3)  # 32x64 upright, cropped to its middle
    assert rot[:, 0, 0].tolist() == pytest.approx([0, 0, 1], abs=0.02)
    assert rot[:, 63, 63].tolist() == pytest.approx([1, 0, 0], abs=0.02)


def _tool():
    spec = importlib.util.spec_from_file_location("visualize_mae_tool", ROOT / "tools" / "visualize_mae.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_bad_input_is_one_error_line(tmp_path, images, capsys):
    tool = _tool()
    sd = tiny_model(norm_pix_loss=False).state_dict()
    ckpt, encoder = tmp_path / "full.pth", tmp_path / "encoder.pth"
    torch.save(sd, ckpt)
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}}, encoder)
    ok = ["--checkpoint", str(ckpt), "--input", str(images), "--output", str(tmp_path / "out")]
    cases = {
        "checkpoint not found": ["--checkpoint", str(tmp_path / "missing.pth")],
        "encoder.pth holds no decoder": ["--checkpoint", str(encoder)],
        "--img-size 40: expected a multiple of the patch size 16": ["--img-size", "40"],
        "--input nope: no such file or folder": ["--input", "nope"],
        "--mask-ratio: expected a fraction in [0, 1), got 1.0": ["--mask-ratio", "1.0"],
        # 16 patches: int(16 x 0.05) = 0 kept; the title said "mask 95%" over a fully gray input panel
        "--mask-ratio: 0.95 keeps none of the 16 patches of a 64x64 input, so the encoder would see nothing; "
        "expected a ratio that keeps at least one patch": ["--mask-ratio", "0.95"],
        "is the --output folder": ["--output", str(images)],
        # was a FileExistsError / NotADirectoryError traceback once the model had loaded
        f"output folder {tmp_path / 'taken'} is a file, not a folder": ["--output", str(tmp_path / "taken")],
        f"cannot create output folder {tmp_path / 'taken' / 'vis'}: {tmp_path / 'taken'} is a file, not a folder":
            ["--output", str(tmp_path / "taken" / "vis")],
    }
    (tmp_path / "taken").write_text("")
    for message, change in cases.items():
        assert tool.main([*ok, *change]) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_bare_state_dict_of_a_patch_size_no_factory_has(tmp_path, images, caplog):
    # The shapes MAE (configs/shapes/pretrain_mae.yaml): width 192 as the tiny factory, but patch 8.
    model = tiny_model(norm_pix_loss=False, patch_size=8, decoder_num_heads=16)
    ckpt = tmp_path / "bare_p8.pth"
    torch.save(model.state_dict(), ckpt)
    for name in (None, "mae_vit_tiny_patch16"):  # was "no factory has width 192 and patch 8; pass --model", and
        loaded = load_mae(ckpt, name)  # --model failed to load it ("does not fit")
        assert loaded.name == "mae_vit_tiny_patch16" and loaded.model.patch_size == 8 and loaded.img_size == (64, 64)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    assert ("bare_p8.pth: no factory has width 192 and patch 8; using mae_vit_tiny_patch16 with the checkpoint's "
            "patch size and its head counts (3 encoder, 16 decoder), which no tensor records") in caplog.text
    [grid] = visualize_images(ckpt, [images / "a.png"], tmp_path / "out", mask_ratio=0.75)
    assert "mask 75% (48/64 patches)" in Image.open(grid).text["Title"]
    wide = tmp_path / "wide.pth"
    torch.save(tiny_model(norm_pix_loss=False, embed_dim=96).state_dict(), wide)
    with pytest.raises(CheckpointError) as e:  # was "pass --model", which no --model could satisfy
        load_mae(wide)
    assert str(e.value) == (f"{wide}: no factory has width 96, and no tensor records the head counts of a bare "
                            "state dict: use a mae_det pretraining checkpoint, whose meta records them")
