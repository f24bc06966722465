"""tools/benchmark_pretrain.py --against-official, driven by a stand-in checkout written here.

CI has no clone of facebookresearch/mae, so the test writes a ``models_mae.py`` + ``util/pos_embed.py`` of the same
interface and the same habits the shim exists for (timm's ``Block(..., qk_scale=None, ...)``, ``np.float``): a
compact MAE of our own, with the official key names so that our weights load into it.
"""
import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm

from mae_det.bench.official import load_official, write_jpeg_imagefolder
from mae_det.utils.precision import bf16_native

ROOT = Path(__file__).resolve().parents[2]

POS_EMBED = '''
import numpy as np


def get_2d_sincos_pos_embed(dim, grid, cls_token=False):
    """(grid*grid [+1], dim): column index in the first half of the channels, row index in the second."""
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float), np.arange(grid, dtype=np.float), indexing="ij")
    halves = []
    for pos in (cols.reshape(-1), rows.reshape(-1)):
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float) / (dim / 4.0))
        angles = np.outer(pos, omega)
        halves.append(np.concatenate([np.sin(angles), np.cos(angles)], axis=1))
    emb = np.concatenate(halves, axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0) if cls_token else emb
'''

MODELS_MAE = '''
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, PatchEmbed

from util.pos_embed import get_2d_sincos_pos_embed


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.,
                 norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, qk_scale=None,
                                           norm_layer=norm_layer) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                                                   qk_scale=None, norm_layer=norm_layer) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        grid = int(n ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(embed_dim, grid, True)).float()[None])
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(get_2d_sincos_pos_embed(decoder_embed_dim, grid, True)).float()[None])
        self.p = patch_size

    def forward(self, imgs, mask_ratio=0.75):
        N, C, H, W = imgs.shape
        p, h, w = self.p, H // self.p, W // self.p
        target = imgs.reshape(N, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(N, h * w, p * p * C)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        L, keep = x.shape[1], int(x.shape[1] * (1 - mask_ratio))
        order = torch.argsort(torch.rand(N, L, device=x.device), dim=1)
        restore = torch.argsort(order, dim=1)
        x = torch.gather(x, 1, order[:, :keep, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(N, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        y = torch.cat([x[:, 1:], self.mask_token.expand(N, L - keep, -1)], dim=1)
        y = torch.gather(y, 1, restore[..., None].expand(-1, -1, y.shape[2]))
        x = torch.cat([x[:, :1], y], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        mask = torch.ones(N, L, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)
        loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
        return loss, pred, mask
'''


def _write_checkout(root: Path, models_mae: str = MODELS_MAE) -> Path:
    (root / "util").mkdir()
    (root / "util" / "pos_embed.py").write_text(textwrap.dedent(POS_EMBED))
    (root / "models_mae.py").write_text(textwrap.dedent(models_mae))
    return root


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return _write_checkout(tmp_path_factory.mktemp("mae_checkout"))


def test_shim_imports_the_checkout_and_restores_timm(checkout):
    block = timm.models.vision_transformer.Block
    mod = load_official(checkout)
    assert timm.models.vision_transformer.Block is block and "util" not in sys.modules
    model = mod.MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                     decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    assert isinstance(model.blocks[0], block)
    with pytest.raises(ValueError, match="qk_scale=0.5"):
        type(model.blocks[0])(32, 2, qk_scale=0.5)


def test_quick_side_by_side_prints_every_row_and_ratio(checkout, tmp_path):
    # one loader worker: each end-to-end visit first takes the 2 batches it prefetched meanwhile, untimed
    proc = subprocess.run([sys.executable, "tools/benchmark_pretrain.py", "--against-official", str(checkout),
                           "--quick", "--rounds", "3", "--jpeg-folder", str(tmp_path / "jpegs"), "--workers", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    *table, last = proc.stdout.strip().splitlines()
    res = json.loads(last)
    text = "\n".join(table)
    assert f"timm {timm.__version__}" in text and "median of 3 interleaved rounds" in text
    names = [r["variant"] for r in res["rows"]]
    assert {"official fp32", "ours fp32", "official fp32 [jpeg]"} <= set(names)
    assert any(n.startswith("ours") and n.endswith("[jpeg]") for n in names)
    for r in res["rows"]:
        assert r["img_s_min"] <= r["img_s"] <= r["img_s_max"] and r["mfu"] > 0
        assert any(line.startswith(f"{r['variant']:<34}") for line in table)
    assert res["ratios"]["ours fp32 / official fp32"] == pytest.approx(
        res["rows"][names.index("ours fp32")]["img_s"] / res["rows"][names.index("official fp32")]["img_s"])
    assert any(k.endswith("[jpeg] / its step-only") for k in res["ratios"])
    assert len(list((tmp_path / "jpegs").rglob("*.jpg"))) == 8
    assert any(line.startswith(f"{tmp_path / 'jpegs'}: 8 images, mean ") and line.endswith(" KB (synthetic JPEGs)")
               for line in proc.stderr.splitlines())
    assert "taken untimed before each visit" in text and res["failed"] == []


def test_a_failing_variant_is_reported_and_the_others_measured(tmp_path):
    """A variant that raises (here the official loop's FloatingPointError on a non-finite loss; on a GPU also a
    compile error or out of memory) is listed as failed; the run goes on and prints the rest."""
    nan_loss = MODELS_MAE.replace("        return loss, pred, mask", "        return loss * float('nan'), pred, mask")
    root = tmp_path / "nan_checkout"
    root.mkdir()
    _write_checkout(root, nan_loss)
    proc = subprocess.run([sys.executable, "tools/benchmark_pretrain.py", "--against-official", str(root),
                           "--quick", "--rounds", "2", "--workers", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    *table, last = proc.stdout.strip().splitlines()
    res = json.loads(last)
    assert {r["variant"] for r in res["failed"]} == {"official fp32"} | ({"official bf16"} if bf16_native("cpu") else set())
    assert all(r["error"].startswith("FloatingPointError: official model: loss is nan") for r in res["failed"])
    assert "official fp32                     FAILED: FloatingPointError" in "\n".join(table)
    assert {"ours fp32"} <= {r["variant"] for r in res["rows"]}
    assert "official fp32 failed, skipped from now on" in proc.stderr


def test_jpeg_folder_is_the_same_written_by_worker_processes(tmp_path):
    kb = write_jpeg_imagefolder(tmp_path / "a", 6, (40, 30), classes=2)
    assert write_jpeg_imagefolder(tmp_path / "b", 6, (40, 30), classes=2, workers=2) == kb
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(files) == 6 and files[0] == Path("class_00/000000.jpg")
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert len({(tmp_path / "a" / f).read_bytes() for f in files}) == 6  # every file its own image


def test_a_sigterm_still_prints_the_rounds_measured_so_far(checkout):
    """scripts/gpu_benchmark.sh runs each section under `timeout`, which sends SIGTERM: a section stopped at its
    limit keeps its figures instead of losing them all."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "tools/benchmark_pretrain.py", "--against-official", str(checkout),
                             "--quick", "--rounds", "1000000", "--workers", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    for line in proc.stderr:  # progress lines; round 2 done: every variant has a figure
        if line.startswith("round 2/") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    *table, last = out.strip().splitlines()
    res = json.loads(last)
    assert res["interrupted"] is True and 2 <= res["rounds"] < 1000000
    assert any(line.startswith(f"STOPPED by a signal in round {res['rounds']}") for line in table)
    names = [r["variant"] for r in res["rows"]]
    assert {"official fp32", "ours fp32"} <= set(names) and "ours fp32 / official fp32" in res["ratios"]


def test_missing_checkout_file_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "tools/benchmark_pretrain.py", "--against-official", str(tmp_path),
                           "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'models_mae.py'}: not found; "
                                                    "--against-official expects a clone of facebookresearch/mae")


def test_loader_workers_are_shut_down_when_the_comparison_returns(checkout, tmp_path):
    # workers left to the interpreter's exit are joined one by one by DataLoader's atexit hook: a remote run with 16
    # workers a loader outlived its time limit that way after printing its table
    import multiprocessing

    from mae_det.bench.official import run_against_official

    root = tmp_path / "jpegs"
    write_jpeg_imagefolder(root, 8, (48, 40), classes=2)
    arch = dict(patch_size=16, embed_dim=64, depth=1, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=4)
    before = set(multiprocessing.active_children())
    res = run_against_official(checkout, arch=arch, img_size=32, batch_size=2, rounds=1, steps=1, jpeg_root=str(root),
                               workers=1, matmul_sizes=(64,), matmul_seconds=0.01)
    assert any(r["data"] == "jpeg" for r in res["rows"])
    assert set(multiprocessing.active_children()) <= before


def test_one_compiled_row_per_mode_and_the_end_to_end_rows_in_the_last():
    from mae_det.bench.official import COMPILE_SUFFIX, default_variants

    rows = default_variants("cuda", ("default", "reduce-overhead"), e2e=True)
    names = [f"{s} {p}{COMPILE_SUFFIX[c]}" + ("" if d == "synthetic" else f" [{d}]") for s, p, c, d in rows]
    assert names == ["official fp16", "official fp32", "ours bf16 compiled", "ours bf16 compiled+cudagraphs",
                     "ours bf16", "ours fp16", "ours fp32", "official fp16 [jpeg]",
                     "ours bf16 compiled+cudagraphs [jpeg]", "ours bf16 compiled+cudagraphs [jpeg-gpu]"]
    assert [c for *_, c, d in rows if d == "synthetic"].count("") == 5
    assert default_variants("cuda", (), e2e=False)[2] == ("ours", "bf16", "", "synthetic")
    with pytest.raises(ValueError, match=r"compile modes: expected some of \('default', 'reduce-overhead'\), "
                                         r"got \['max-autotune'\]"):
        default_variants("cuda", ("max-autotune",), e2e=False)


@pytest.mark.slow  # one side-by-side round of a ViT-Tiny MAE, ~30 s of CPU
def test_both_sides_are_built_at_the_size_of_model(checkout):
    # --model was ignored: both sides were ViT-B whatever it named
    proc = subprocess.run([sys.executable, "tools/benchmark_pretrain.py", "--against-official", str(checkout),
                           "--model", "mae_vit_tiny_patch16", "--img-size", "32", "--batch-size", "2", "--rounds", "1",
                           "--iters", "1", "--warmup", "0", "--workers", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *table, last = proc.stdout.strip().splitlines()
    assert json.loads(last)["arch"] == dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                                            decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
    assert "model: ViT 192-d x 12, decoder 512-d x 8, 32 px" in "\n".join(table)


# ---- a checkout that is not the official code ----------------------------------------------------------------
def _expected_not_official(path: Path, why: str) -> str:
    return (f"{path}: not the official MAE model ({why}); --against-official expects a clone of "
            "facebookresearch/mae")


@pytest.mark.parametrize("models_mae, why", [
    ("import torch\n\nclass SomethingElse:\n    pass\n", "it defines no class MaskedAutoencoderViT"),
    ("import no_such_module_of_mae\n", "importing it raised ModuleNotFoundError: No module named "
                                       "'no_such_module_of_mae'"),
])
def test_a_checkout_that_is_not_the_official_code_is_one_line(tmp_path, models_mae, why):
    # both were tracebacks (AttributeError in the middle of the benchmark, or the module's own error)
    root = _write_checkout(tmp_path, models_mae)
    with pytest.raises(ValueError) as e:
        load_official(root)
    assert str(e.value) == _expected_not_official(root / "models_mae.py", why)
    assert timm.models.vision_transformer.Block.__name__ == "Block" and "util" not in sys.modules


def test_a_fork_with_other_weight_names_exits_2_with_one_line(tmp_path):
    root = _write_checkout(tmp_path, MODELS_MAE.replace("decoder_pred", "decoder_head"))
    proc = subprocess.run([sys.executable, "tools/benchmark_pretrain.py", "--against-official", str(root), "--quick",
                           "--rounds", "1", "--workers", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == "error: " + _expected_not_official(
        root / "models_mae.py", "its state-dict keys differ from ours: decoder_head.weight, decoder_head.bias only "
                                "in it, decoder_pred.weight, decoder_pred.bias only in ours")


# ---- --jpeg-folder -----------------------------------------------------------------------------------------
def _user_imagefolder(root: Path) -> dict[Path, bytes]:
    """A user's ImageFolder: 3 PNGs in 2 classes; returns its files and their bytes."""
    from PIL import Image

    for i, name in enumerate(["n01/a.png", "n01/b.png", "n02/c.png"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (i * 60, 90, 30)).save(root / name)
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_jpeg_folder_generates_only_into_a_new_or_its_own_folder(tmp_path):
    # synthetic class_XX/NNNNNN.jpg went into any folder, a user's ImageFolder included, and the log counted n
    from mae_det.bench.official import SYNTHETIC_MARKER, jpeg_imagefolder
    from mae_det.data.pretrain import DataError

    user = tmp_path / "imagenet"
    files = _user_imagefolder(user)
    count, kb, synthetic = jpeg_imagefolder(user, 8, (48, 40))
    assert (count, synthetic) == (3, False)
    assert kb == pytest.approx(sum(len(b) for b in files.values()) / 3 / 1024)
    assert {p: p.read_bytes() for p in user.rglob("*") if p.is_file()} == files  # nothing written into it
    with pytest.raises(DataError, match=f"^{user}: not empty and not written by write_jpeg_imagefolder"):
        write_jpeg_imagefolder(user, 8, (48, 40))

    new = tmp_path / "new"
    assert jpeg_imagefolder(new, 8, (48, 40))[::2] == (8, True) and (new / SYNTHETIC_MARKER).is_file()
    assert jpeg_imagefolder(new, 4, (48, 40))[::2] == (8, True)  # its own folder: the 8 images it holds
    (tmp_path / "empty").mkdir()
    assert jpeg_imagefolder(tmp_path / "empty", 2, (48, 40))[::2] == (2, True)

    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=f"^{tmp_path / 'flat'}: no class sub-folders"):
        jpeg_imagefolder(tmp_path / "flat", 8, (48, 40))
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == ["notes.txt"]


def test_the_tool_times_a_users_imagefolder_as_it_is(checkout, tmp_path):
    user = tmp_path / "imagenet"
    files = _user_imagefolder(user)
    proc = subprocess.run([sys.executable, "tools/benchmark_pretrain.py", "--against-official", str(checkout),
                           "--quick", "--rounds", "1", "--workers", "0", "--jpeg-folder", str(user)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    kb = sum(len(b) for b in files.values()) / 3 / 1024
    assert (f"{user}: 3 images, mean {kb:.0f} KB (an existing ImageFolder, read as it is, nothing written into "
            "it)") in proc.stderr.splitlines()
    assert {p: p.read_bytes() for p in user.rglob("*") if p.is_file()} == files
    assert any(r["data"] == "jpeg" for r in json.loads(proc.stdout.strip().splitlines()[-1])["rows"])


# ---- timing -------------------------------------------------------------------------------------------------
def test_end_to_end_visits_settle_the_loader_before_each_timed_window(checkout, monkeypatch):
    """The order of events in an end-to-end visit, read off stand-ins (no timing): the batches a loader of 4 workers
    prefetched are drained, then one untimed step per worker runs, and only then is the clock read. Every timed
    window used to start right after the drain, with a whole batch's latency to wait (a step-bound run measured
    ~0.6 of its step-only speed at 3 steps)."""
    import types

    import mae_det.bench.official as off

    events: list[tuple[str, str]] = []
    ticks = itertools.count(1)
    monkeypatch.setattr(off, "time", types.SimpleNamespace(
        perf_counter=lambda: events.append(("clock", "")) or float(next(ticks))))

    def stand_in_loader(side: str):
        for _ in itertools.count():
            events.append(("draw", side))
            yield (side, 0) if side == "official" else {"image": side}

    monkeypatch.setattr(off, "official_loader", lambda root, img_size, batch, workers: stand_in_loader("official"))
    monkeypatch.setattr(off, "our_loader",
                        lambda root, img_size, batch, workers, device, gpu_decode: stand_in_loader("ours"))
    for step in (off.OfficialStep, off.OurStep):
        monkeypatch.setattr(step, "__call__", lambda self, samples, mask_ratio: events.append(
            ("step", samples if isinstance(samples, str) else "synthetic")))
    arch = dict(patch_size=16, embed_dim=64, depth=1, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=4)
    res = off.run_against_official(checkout, arch=arch, img_size=32, batch_size=2, rounds=2, steps=3,
                                   jpeg_root="unused", workers=4, matmul_sizes=(64,), matmul_seconds=0.01)
    segments, current = [], []  # the events between two clock reads
    for event in events:
        if event[0] == "clock":
            segments.append(current)
            current = []
        else:
            current.append(event)
    for side in ("official", "ours"):
        window = [("draw", side), ("step", side)] * 3
        before = [segments[i - 1] for i, seg in enumerate(segments) if seg == window]
        # 2 * 4 prefetched batches taken untimed, then 4 untimed steps, in each of the 2 rounds
        assert before == [[("draw", side)] * 8 + [("draw", side), ("step", side)] * 4] * 2, side
    assert res["settle_steps"] == 4
    assert len([k for k in res["ratios"] if k.endswith("[jpeg] / its step-only")]) == 2


def test_compiling_without_a_warm_up_step_is_refused(capsys):
    # the compilation then ran inside the first timed round
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_pretrain_tool", ROOT / "tools" / "benchmark_pretrain.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for extra in (["--compile"], ["--compile-modes", "default,reduce-overhead"]):
        with pytest.raises(SystemExit) as e:
            tool.parse_args(["--warmup", "0", *extra])
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
            "error: --warmup 0 with --compile / --compile-modes: expected >= 1 warm-up step "
            "to compile in")
    assert tool.parse_args(["--warmup", "0"]).warmup == 0 and tool.parse_args(["--compile"]).warmup == 1
