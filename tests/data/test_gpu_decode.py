"""The GPU data path's logic on CPU tensors: the same crops, flips and masks as the CPU path, pixels within
resampling tolerance, EXIF orientation as PIL, batched decoding with per-file retry and CPU fallbacks.
The CUDA decode itself runs only where a GPU is present."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from mae_det.config.pretrain import ConfigError
from mae_det.data import gpu_decode as G
from mae_det.data.images import load_image
from mae_det.data.pretrain import (
    CropFlip, GlobalBatchSampler, PretrainDataset, PretrainTransform, collate_pretrain, folder_source, sample_generator,
)

SIZES = [(120, 90), (90, 120), (200, 64), (64, 64), (47, 33)]


def _smooth(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth colour gradients: JPEG keeps them well, so decoders differ by little more than rounding."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    chans = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy) + rng.uniform(0, 6))
             for _ in range(3)]
    return ((np.stack(chans, -1) + 1) * 127.5).astype(np.uint8)


def _jpeg(path: Path, w: int, h: int, seed: int, orientation: int = 1, mode: str = "RGB") -> Path:
    im = Image.fromarray(_smooth(w, h, seed)).convert(mode)
    exif = im.getexif()
    if orientation != 1:
        exif[0x0112] = orientation
    im.save(path, quality=95, exif=exif.tobytes())
    return path


def _augment_alone(img: torch.Tensor, orientation: int, crop, transform: PretrainTransform) -> torch.Tensor:
    """(3, H, W) uint8 as stored -> (3, S, S) float: one image through the GPU path's steps on its own."""
    x = G.resize_crop(img, orientation, crop, transform.img_size)[None]
    return G.finish_batch(x, [crop], transform.mean_std(x.device))[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu_decode")
    for i, (w, h) in enumerate(SIZES):
        _jpeg(root / f"a{i}.jpg", w, h, i)
    _jpeg(root / "b_rotated.jpg", 100, 60, 7, orientation=6)
    _jpeg(root / "c_gray.jpg", 80, 70, 8, mode="L")
    _jpeg(root / "d_cmyk.jpg", 80, 70, 9, mode="CMYK")
    Image.fromarray(_smooth(70, 50, 10)).save(root / "e.png")
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["torchvision", "torchcodec"])
def decoder(request, monkeypatch):
    """Each JPEG decoder the GPU path can use; the CPU kernels stand in for nvjpeg. TorchCodec applies the EXIF
    orientation itself, torchvision (as called) does not: both must give the same pixels."""
    if request.param == "torchvision":
        monkeypatch.setattr(G, "_torchcodec_decode_jpeg", None)
    elif G._torchcodec_decode_jpeg is None:
        pytest.skip("TorchCodec is not installed")
    return request.param


def _datasets(folder: Path, transform: PretrainTransform | None = None, **kw):
    src = folder_source(folder)
    t = transform or PretrainTransform(48, scale=(0.2, 1.0))
    return (PretrainDataset(src, t, seed=3, num_patches=9, **kw), G.EncodedPretrainDataset(src, t, seed=3,
                                                                                           num_patches=9, **kw), t)


def _to_255(x: torch.Tensor, t: PretrainTransform) -> torch.Tensor:
    return (x * torch.tensor(t.std).view(-1, 1, 1) + torch.tensor(t.mean).view(-1, 1, 1)) * 255


@pytest.mark.parametrize("turns_and_channels", [False, True], ids=["crop_flip", "crop_flip_turn_shuffle"])
def test_both_paths_draw_the_same_crops_flips_and_masks(folder, turns_and_channels, decoder):
    t = PretrainTransform(48, scale=(0.2, 1.0), rot90=turns_and_channels, channel_shuffle=turns_and_channels)
    cpu, enc, t = _datasets(folder, t)
    names = [p.name for p in cpu.source.paths]
    flips = set()
    for epoch in (0, 1, 2):
        for i, name in enumerate(names):
            a, b = cpu[(epoch, i)], enc[(epoch, i)]
            assert torch.equal(a["noise"], b["noise"])  # drawn after crop and flip: as many draws on both paths
            img = load_image(folder / name)
            expected = t.sample(img.width, img.height, sample_generator(3, epoch, i))
            if b["jpeg"] is None:  # CMYK and PNG: decoded and augmented on the worker, as on the CPU path
                assert name in ("d_cmyk.jpg", "e.png") and torch.equal(a["image"], b["image"])
                continue
            assert b["crop"] == tuple(expected)  # the box the CPU path cropped, in the EXIF-oriented image
            flips.add(expected.flip)
            got = _augment_alone(G.decode_jpegs([b["jpeg"]], "cpu")[0], b["orientation"], b["crop"], t)
            diff = (_to_255(got, t) - _to_255(a["image"], t)).abs()
            # antialiased bicubic in torch vs PIL (measured: <= 1 level, 0.19 mean; without antialiasing 3 and 0.39)
            assert diff.max() <= 2 and diff.mean() < 0.5, (name, float(diff.max()), float(diff.mean()))
    assert flips == {True, False}


def test_orientation_matches_pil(tmp_path):
    for o in range(1, 9):
        path = _jpeg(tmp_path / f"o{o}.jpg", 30, 20, o, orientation=o)
        with Image.open(path) as im:
            stored = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
            shown = torch.from_numpy(np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()).permute(2, 0, 1)
        enc = G.read_encoded(path, 10**8)
        assert enc.orientation == o and (enc.width, enc.height) == (shown.shape[2], shown.shape[1])
        assert torch.equal(G.apply_orientation(stored, o), shown), o


def test_a_torchcodec_that_does_not_load_falls_back_to_torchvision_with_one_warning(tmp_path):
    import subprocess
    import sys

    # as a TorchCodec built for another torch, or without FFmpeg, fails: at import, with a RuntimeError
    (tmp_path / "torchcodec").mkdir()
    (tmp_path / "torchcodec" / "__init__.py").write_text(
        "raise RuntimeError('Could not load libtorchcodec. Likely causes:\\n  1. FFmpeg is not installed')\n")
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", "import mae_det.data.gpu_decode as G; print(G._torchcodec_decode_jpeg)"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": f"{tmp_path}:{root}", "PATH": ""})
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if "TorchCodec" in ln]
    assert len(lines) == 1 and "RuntimeError: Could not load libtorchcodec. Likely causes:" in lines[0]
    assert "decodes with torchvision" in lines[0]


def test_exif_is_hidden_from_the_decoders_in_the_bytes_only(tmp_path):
    from torchvision.io import decode_jpeg

    for o in (1, 3, 6, 8, 9):
        path = _jpeg(tmp_path / f"o{o}.jpg", 30, 20, o, orientation=o)
        before = path.read_bytes()
        with Image.open(path) as im:
            stored = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        enc = G.read_encoded(path, 10**8)
        assert enc.orientation == (o if o <= 8 else 1) and path.read_bytes() == before  # the file is untouched
        data = bytes(enc.data.numpy())
        changed = [i for i, (a, b) in enumerate(zip(data, before)) if a != b]  # the APP1 marker byte alone
        assert len(data) == len(before) and len(changed) == 1 and before[changed[0] - 1:changed[0] + 1] == b"\xff\xe1"
        # a decoder that honours the tag returns the stored pixels, as one that ignores it
        assert torch.equal(decode_jpeg(enc.data, apply_exif_orientation=True), decode_jpeg(enc.data))
        assert (decode_jpeg(enc.data).int() - stored.int()).abs().max() <= 1
    plain = tmp_path / "plain.jpg"
    Image.fromarray(_smooth(30, 20, 0)).save(plain)
    assert G.hide_exif(bytearray(before)) == 1 and G.hide_exif(bytearray(plain.read_bytes())) == 0


@pytest.mark.parametrize("offset,value", [(0, b"XX"), (4, (5000).to_bytes(4, "big")), (12, b"\0\x4d")],
                         ids=["byte_order", "ifd_offset", "tag_type"])
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_a_corrupt_exif_block_leaves_the_pixels_as_stored(tmp_path, offset, value):
    from torchvision.io import decode_jpeg

    path = _jpeg(tmp_path / "x.jpg", 30, 20, 0, orientation=6)
    raw = bytearray(path.read_bytes())
    tiff = raw.index(b"Exif\0\0") + 6
    raw[tiff + offset:tiff + offset + len(value)] = value
    path.write_bytes(bytes(raw))
    enc = G.read_encoded(path, 10**8)
    assert load_image(path).size == (30, 20)  # the CPU path: no rotation
    assert enc.orientation == 1 and (enc.width, enc.height) == (30, 20)
    assert decode_jpeg(enc.data, apply_exif_orientation=True).shape == (3, 20, 30)


def test_batched_decode_retries_file_by_file(folder, tmp_path, decoder):
    good = [torch.frombuffer(bytearray((folder / f"a{i}.jpg").read_bytes()), dtype=torch.uint8) for i in range(2)]
    broken = good[0][:300].clone()  # a header and no scan: undecodable
    out = G.decode_jpegs([good[0], broken, good[1]], "cpu")
    assert out[1] is None
    assert [tuple(x.shape) for x in (out[0], out[2])] == [(3, 90, 120), (3, 120, 90)]
    assert torch.equal(out[0], G.decode_jpegs([good[0]], "cpu")[0])


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, torch.AcceleratorError])
def test_a_failing_device_is_raised_not_taken_for_bad_files(folder, monkeypatch, error):
    """Out of memory (a RuntimeError) must not send the batch file by file to the CPU decoder, which would train
    on and be reported as nvjpeg decoding while the GPU path is broken."""
    data = [torch.frombuffer(bytearray((folder / "a0.jpg").read_bytes()), dtype=torch.uint8)]
    calls = []

    def device_fails(batch, device):
        calls.append(len(batch))
        raise error("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(G, "_decode_batch", device_fails)
    with pytest.raises(error, match="out of memory"):
        G.decode_jpegs(data * 3, "cpu")
    assert calls == [3]  # no retry file by file
    assert G.jpeg_decoder_name() == ("torchcodec" if G._torchcodec_decode_jpeg is not None else "torchvision")


def test_device_refusals_go_to_the_cpu_and_unreadable_files_are_reported(folder, tmp_path, monkeypatch):
    for i, (w, h) in enumerate(SIZES[:3]):
        _jpeg(tmp_path / f"{i}.jpg", w, h, i)
    data = (tmp_path / "2.jpg").read_bytes()
    (tmp_path / "2.jpg").write_bytes(data[: len(data) // 3])  # the header reads, the pixels do not
    refused = bytearray((tmp_path / "1.jpg").read_bytes())
    G.hide_exif(refused)  # as the worker sends it
    real = G._decode_batch

    def device_decoder(data, device):  # as nvjpeg refusing a file PIL reads (e.g. an unsupported coding)
        if any(bytes(d.numpy()) == bytes(refused) for d in data):
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return real(data, device)

    monkeypatch.setattr(G, "_decode_batch", device_decoder)
    cpu, enc, t = _datasets(tmp_path)
    keys = [(0, i) for i in range(3)]
    batch = G.collate_encoded([enc[k] for k in keys])
    images = G.GpuAugment(t, "cpu")(batch)
    assert images.shape == (3, 3, 48, 48) and batch["cpu_decoded"] == 1
    assert [b[0] for b in batch["bad"]] == [2] and "2.jpg: cannot decode image" in batch["bad"][0][1]
    assert torch.equal(images[2], torch.zeros(3, 48, 48))
    ref = collate_pretrain([cpu[k] for k in keys[:2]])["image"]
    assert (_to_255(images[1], t) - _to_255(ref[1], t)).abs().max() <= 2


@pytest.mark.parametrize("turns_and_channels", [False, True], ids=["crop_flip", "crop_flip_turn_shuffle"])
def test_batch_finishing_equals_each_image_alone(folder, turns_and_channels, monkeypatch):
    """GpuAugment rounds, flips and normalizes once per batch (fewer kernel launches): bit for bit what each image
    gets alone, also around a slot no decoder could read."""
    t = PretrainTransform(48, scale=(0.2, 1.0), rot90=turns_and_channels, channel_shuffle=turns_and_channels)
    _, enc, t = _datasets(folder, t)
    samples = [enc[(e, i)] for e in (0, 1) for i in range(len(enc))]
    samples = [s for s in samples if s["jpeg"] is not None]
    assert {CropFlip(*s["crop"]).flip for s in samples} == {True, False}
    alone = [_augment_alone(G.decode_jpegs([s["jpeg"]], "cpu")[0], s["orientation"], s["crop"], t) for s in samples]
    assert torch.equal(G.GpuAugment(t, "cpu")(G.collate_encoded(samples)), torch.stack(alone))
    broken = dict(samples[1], jpeg=samples[1]["jpeg"][:200].clone(), file=(1, str(folder / "missing.jpg")))
    batch = G.collate_encoded([samples[0], broken, samples[2]])
    got = G.GpuAugment(t, "cpu")(batch)
    assert [b[0] for b in batch["bad"]] == [1] and torch.equal(got[1], torch.zeros_like(got[1]))
    assert torch.equal(got[0], alone[0]) and torch.equal(got[2], alone[2])


def test_prefetcher_yields_every_batch_augmented(folder):
    cpu, enc, t = _datasets(folder)
    sampler = GlobalBatchSampler(len(enc), 3, seed=1)
    loader = DataLoader(enc, batch_sampler=sampler, collate_fn=G.collate_encoded)
    batches = list(G.CudaPrefetcher(loader, G.GpuAugment(t, "cpu")))
    assert len(batches) == len(sampler) == 3
    assert sum(b["cpu_decoded"] for b in batches) == 2  # the CMYK JPEG and the PNG, on the worker
    ref = list(DataLoader(cpu, batch_sampler=sampler, collate_fn=collate_pretrain))
    for got, want in zip(batches, ref):
        assert got["image"].shape == want["image"].shape and torch.equal(got["noise"], want["noise"])
        assert (_to_255(got["image"], t) - _to_255(want["image"], t)).abs().max() <= 2


def test_trainer_refuses_gpu_decoding_without_a_gpu(folder, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from mae_det.config.pretrain import load_pretrain_cfg
    from mae_det.engine.pretrain import Pretrainer

    cfg = load_pretrain_cfg(None, ["DATA.PATH", str(folder), "OUTPUT_DIR", str(tmp_path), "DATA.DECODE_DEVICE",
                                   "cuda", "MODEL.ARCH", "mae_vit_tiny_patch16", "SOLVER.BATCH_SIZE", "2"])
    with pytest.raises(ConfigError, match="DATA.DECODE_DEVICE: cuda decoding needs a GPU"):
        Pretrainer(cfg)
    with pytest.raises(ConfigError, match="DATA.DECODE_DEVICE: cuda decoding needs DEVICE cuda or auto"):
        load_pretrain_cfg(None, ["DATA.PATH", str(folder), "DEVICE", "cpu", "DATA.DECODE_DEVICE", "cuda"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg decoding needs a CUDA device")
def test_cuda_decode_and_prefetch(folder):
    cpu, enc, t = _datasets(folder)
    data = [enc[(0, i)]["jpeg"] for i in range(len(SIZES))]
    for a, b in zip(G.decode_jpegs(data, "cuda"), G.decode_jpegs(data, "cpu")):
        assert a.is_cuda and (a.cpu().int() - b.int()).abs().max() <= 3
    sampler = GlobalBatchSampler(len(enc), 3, seed=1)
    loader = DataLoader(enc, batch_sampler=sampler, collate_fn=G.collate_encoded, pin_memory=True)
    ref = list(DataLoader(cpu, batch_sampler=sampler, collate_fn=collate_pretrain))
    for got, want in zip(G.CudaPrefetcher(loader, G.GpuAugment(t, "cuda")), ref):
        assert got["image"].is_cuda
        assert (_to_255(got["image"].cpu(), t) - _to_255(want["image"], t)).abs().max() <= 8


@pytest.mark.parametrize("variant", ["rgb", "rgb_turn_shuffle", "gray"])
def test_uint8_batches_normalized_on_the_device_equal_the_workers_bit_for_bit(folder, variant):
    # on a GPU the CPU-decoding workers pass uint8 images (4x fewer bytes through shared and pinned memory); the
    # normalization after the copy must give exactly the floats the workers would have made
    kw = dict(rot90=True, channel_shuffle=True) if variant == "rgb_turn_shuffle" else {}
    if variant == "gray":
        kw = dict(mean=(0.5,), std=(0.25,))
    t = PretrainTransform(48, scale=(0.2, 1.0), **kw)
    src = folder_source(folder)
    floats = PretrainDataset(src, t, seed=3, num_patches=9)
    pixels = PretrainDataset(src, t, seed=3, num_patches=9, normalize=False)
    sampler = GlobalBatchSampler(len(floats), 3, seed=1)
    ref = list(DataLoader(floats, batch_sampler=sampler, collate_fn=collate_pretrain))
    raw = list(DataLoader(pixels, batch_sampler=sampler, collate_fn=collate_pretrain))
    assert all(b["image"].dtype == torch.uint8 for b in raw)
    got = list(G.CudaPrefetcher(raw, G.DeviceNormalize(t, "cpu")))
    assert len(got) == len(ref) == 3
    for g, want in zip(got, ref):
        assert g["image"].dtype == torch.float32 and torch.equal(g["image"], want["image"])
        assert torch.equal(g["noise"], want["noise"])


def test_uint8_sample_of_an_unreadable_image_is_a_zero_image(tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"not a jpeg")
    ds = PretrainDataset(folder_source(tmp_path), PretrainTransform(16), seed=0, normalize=False)
    sample = ds[(0, 0)]
    assert sample["image"].dtype == torch.uint8 and not sample["image"].any() and len(sample["bad"]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_normalization_of_uint8_batches(folder):
    t = PretrainTransform(48, scale=(0.2, 1.0))
    src = folder_source(folder)
    sampler = GlobalBatchSampler(len(src.paths), 3, seed=1)
    ref = DataLoader(PretrainDataset(src, t, seed=3), batch_sampler=sampler, collate_fn=collate_pretrain)
    raw = DataLoader(PretrainDataset(src, t, seed=3, normalize=False), batch_sampler=sampler,
                     collate_fn=collate_pretrain, pin_memory=True)
    for got, want in zip(G.CudaPrefetcher(raw, G.DeviceNormalize(t, "cuda")), ref):
        assert got["image"].is_cuda and torch.allclose(got["image"].cpu(), want["image"], atol=1e-6, rtol=0)


def test_loader_wrapping_and_worker_normalization_follow_the_device():
    t = PretrainTransform(16)
    loader = [{"image": torch.zeros(1, 3, 16, 16, dtype=torch.uint8)}]
    assert G.device_batches(loader, t, "cpu", gpu_decode=False) is loader
    if torch.cuda.is_available():  # the wrappers keep their mean and std on the device
        on_gpu = G.device_batches(loader, t, "cuda", gpu_decode=False)
        assert isinstance(on_gpu, G.CudaPrefetcher) and isinstance(on_gpu.augment, G.DeviceNormalize)
        assert isinstance(G.device_batches(loader, t, "cuda", gpu_decode=True).augment, G.GpuAugment)
    assert [G.workers_normalize(d, g) for d, g in (("cpu", False), ("cuda", False), ("cuda", True))] == [
        True, False, True]


def test_resize_is_near_pil_at_hard_edges_too():
    # PIL resizes in two 8-bit passes (rounded and clipped between them, in an order that depends on the shapes);
    # the GPU path in one float pass. Smooth images differ by <= 2 levels (above); black/white blocks, the worst
    # case, by more at single pixels but little on average (the figures the README states).
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    rng = np.random.default_rng(0)
    worst_max, means = 0.0, []
    for _ in range(50):
        height, width = (int(v) for v in rng.integers(40, 120, 2))
        blocks = (rng.random((height // 4 + 1, width // 4 + 1)) > 0.5).astype(np.uint8) * 255
        gray = np.repeat(np.repeat(blocks, 4, 0), 4, 1)[:height, :width]
        rgb = np.ascontiguousarray(np.stack([gray, 255 - gray, gray], -1))
        h, w = int(rng.integers(8, height + 1)), int(rng.integers(8, width + 1))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        pil = TF.resized_crop(Image.fromarray(rgb), top, left, h, w, [32, 32], InterpolationMode.BICUBIC)
        ref = torch.from_numpy(np.asarray(pil)).permute(2, 0, 1).float()
        got = G.resize_crop(torch.from_numpy(rgb).permute(2, 0, 1), 1, CropFlip(top, left, h, w, False, 0, None), 32)
        diff = (got.round().clamp(0, 255) - ref).abs()
        worst_max, means = max(worst_max, float(diff.max())), means + [float(diff.mean())]
    assert worst_max <= 32 and max(means) < 2.0 and np.mean(means) < 0.6, (worst_max, max(means), np.mean(means))


def _fill_byte_jpeg(path: Path, orientation: int = 6) -> Path:
    """A JPEG whose APP1 (EXIF) marker follows a 0xFF fill byte, which the JPEG standard allows before any marker."""
    _jpeg(path, 64, 48, 11, orientation=orientation)
    data = bytearray(path.read_bytes())
    at = data.find(b"\xff\xe1")
    data[at:at] = b"\xff"
    path.write_bytes(bytes(data))
    return path


def test_exif_after_a_fill_byte_is_hidden_too(tmp_path, decoder):
    path = _fill_byte_jpeg(tmp_path / "fill.jpg")
    enc = G.read_encoded(path, 10**8)
    assert (enc.width, enc.height, enc.orientation) == (48, 64, 6)
    assert b"\xff\xe1" not in bytes(enc.data.numpy()) and b"\xff\xff\xef" in bytes(enc.data.numpy())
    # the decoder gives the pixels as stored (TorchCodec turned them by the tag it found), turned once here
    assert tuple(G.decode_jpegs([enc.data], "cpu")[0].shape) == (3, 48, 64)
    t = PretrainTransform(32, scale=(1, 1), ratio=(1, 1), hflip=False)
    src = folder_source(tmp_path)
    cpu = PretrainDataset(src, t, seed=0)[(0, 0)]["image"]
    gpu = G.GpuAugment(t, "cpu")(G.collate_encoded([G.EncodedPretrainDataset(src, t, seed=0)[(0, 0)]]))[0]
    assert (_to_255(gpu, t) - _to_255(cpu, t)).abs().max() <= 2  # was 4 in normalized units: the image turned twice


def test_a_decode_of_another_size_than_the_header_goes_to_the_cpu(folder, monkeypatch):
    cpu, enc, t = _datasets(folder)
    keys = [(0, i) for i in range(3)]  # a0 (120 x 90), a1 (90 x 120), a2 (200 x 64)
    want = G.GpuAugment(t, "cpu")(G.collate_encoded([enc[k] for k in keys]))
    real = G._decode_batch

    def turning_decoder(data, device):  # as a decoder that applies an EXIF orientation the worker did not hide
        return [x.transpose(-2, -1) if x.shape[-1] in (90, 120) else x for x in real(data, device)]

    monkeypatch.setattr(G, "_decode_batch", turning_decoder)
    batch = G.collate_encoded([enc[k] for k in keys])
    assert batch["size"] == [(90, 120), (120, 90), (64, 200)]
    got = G.GpuAugment(t, "cpu")(batch)
    assert batch["cpu_decoded"] == 2 and not batch["bad"]  # the two turned ones, decoded again as stored
    assert (_to_255(got, t) - _to_255(want, t)).abs().max() <= 1
