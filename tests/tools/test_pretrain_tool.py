"""tools/pretrain.py end to end, in subprocesses: CLI, exit codes, kill -9 + --resume, 2 processes, a dead rank."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mae_det.engine.pretrain import main
from mae_det.modeling.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "pretrain.py")
CONFIG = str(ROOT / "configs" / "pretrain" / "folder_vit_tiny_cpu.yaml")
TINY = ["MODEL.EMBED_DIM", "64", "MODEL.DEPTH", "2", "MODEL.NUM_HEADS", "2", "MODEL.IMG_SIZE", "32",
        "MODEL.DECODER_EMBED_DIM", "32", "MODEL.DECODER_DEPTH", "1", "MODEL.DECODER_NUM_HEADS", "2",
        "MODEL.NORM_PIX_LOSS", "False", "DATA.NUM_WORKERS", "0", "PRECISION", "fp32", "SOLVER.BATCH_SIZE", "8",
        "SOLVER.EPOCHS", "2", "SOLVER.WARMUP_EPOCHS", "1", "SOLVER.LR", "1e-3", "LOG_PERIOD", "1"]
# One intra-op thread: identical kernels in every run, and no spinning against other jobs on a shared machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_data") / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40] / 40
    for i in range(32):
        f = rng.uniform(0.5, 3, (3, 2))
        img = np.stack([np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy) + rng.uniform(0, 6)) for c in range(3)], -1)
        Image.fromarray(((img + 1) * 127.5).astype(np.uint8)).save(root / f"{i:03d}.png")
    return root


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=ENV, timeout=timeout,
                          cwd=ROOT)


def opts(images: Path, out: Path, *extra: str) -> list[str]:
    return ["--config-file", CONFIG, *TINY, "DATA.PATH", str(images), "OUTPUT_DIR", str(out), *extra]


def final_model(out: Path) -> dict:
    return torch.load(out / (out / "last_checkpoint").read_text().strip(), weights_only=True)["model"]


def test_cli_trains_a_folder_with_progress_and_outputs(images, tmp_path):
    r = cli(*opts(images, tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert {"config.yaml", "run_info.json", "metrics.jsonl", "encoder.pth", "checkpoint_0002.pth",
            "last_checkpoint"} <= {p.name for p in out.iterdir()}
    assert "epoch 2/2" in r.stderr and "img_s=" in r.stderr and "lr=" in r.stderr  # the progress bar
    saved = (out / "config.yaml").read_text()
    assert "EMBED_DIM: 64" in saved and f"PATH: {images}" in saved
    info = json.loads((out / "run_info.json").read_text())
    assert info["command"][-2:] == ["OUTPUT_DIR", str(out)] and info["world_size"] == 1


def test_config_errors_exit_2_with_one_line(images, tmp_path, capsys):
    assert main(opts(images, tmp_path, "MODEL.MASK_RATIO", "1.0")) == 2
    assert capsys.readouterr().err == "error: MODEL.MASK_RATIO: expected a value in [0, 1), got 1.0\n"
    assert main(opts(images, tmp_path, "SOLVER.EPOCS", "3")) == 2
    assert capsys.readouterr().err == "error: unknown config key 'SOLVER.EPOCS'\n"
    # a seed beyond 64 bits failed with a struct.error traceback at the first batch, after the run's records
    assert main(opts(images, tmp_path / "seed", "SEED", str(2**63))) == 2
    assert capsys.readouterr().err == f"error: SEED: expected an integer in [0, 2**63), got {2**63}\n"
    assert not (tmp_path / "seed" / "config.yaml").exists()


def test_a_min_lr_above_the_process_count_scaled_peak_is_one_line(images, tmp_path, capsys):
    # BASE_LR x batch / 256 is known only once the processes are: the cosine would climb from it to MIN_LR
    assert main(opts(images, tmp_path, "SOLVER.LR", "0", "SOLVER.BASE_LR", "1e-6", "SOLVER.MIN_LR", "1e-4")) == 2
    assert capsys.readouterr().err.startswith("error: SOLVER.MIN_LR 0.0001 exceeds the peak lr ")


def test_launcher_arguments_that_cannot_launch_exit_2_with_one_line(images, tmp_path, capsys):
    assert main(["--num-gpus", "0", *opts(images, tmp_path)]) == 2  # a division by zero before
    assert capsys.readouterr().err == ("error: --num-gpus 0 / --num-machines 1: expected >= 1 each (processes per "
                                       "machine, on CPU too)\n")
    assert main(["--num-machines", "2", *opts(images, tmp_path)]) == 2  # Detectron2's assertion before
    assert capsys.readouterr().err.startswith("error: --num-machines > 1 needs --dist-url tcp://")
    # a rank past the last machine waited 30 minutes for a rank 0 that never comes
    assert main(["--num-machines", "2", "--machine-rank", "5", "--dist-url", "tcp://127.0.0.1:29641",
                 *opts(images, tmp_path)]) == 2
    assert capsys.readouterr().err == "error: --machine-rank 5: expected 0 to --num-machines - 1 (1)\n"


def test_nan_loss_exits_3_naming_the_step(images, tmp_path, capsys):
    code = main(opts(images, tmp_path, "SOLVER.LR", "1e6", "SOLVER.EPOCHS", "4", "SOLVER.WARMUP_EPOCHS", "2",
                     "CHECKPOINT_PERIOD", "1"))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3 and last.startswith("error: ") and "global step" in last and "last good checkpoint" in last


def test_data_errors_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(opts(tmp_path / "empty", tmp_path / "out")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"error: {tmp_path / 'empty'}: no images found (source folder)"


def test_unusable_output_dir_and_monitor_folders_exit_2_with_one_line(images, tmp_path, capsys):
    # Both used to end in a traceback: OUTPUT_DIR at once, the kNN monitor's folders after its first period.
    (tmp_path / "a_file").write_text("notes")
    assert main(opts(images, tmp_path / "a_file")) == 2
    assert capsys.readouterr().err == f"error: OUTPUT_DIR: {tmp_path / 'a_file'} exists and is not a folder\n"
    assert main(opts(images, tmp_path / "a_file" / "run")) == 2
    err = capsys.readouterr().err
    assert err == f"error: OUTPUT_DIR: cannot create or write files in {tmp_path / 'a_file/run'} (Not a directory)\n"
    (tmp_path / "knn" / "train" / "a").mkdir(parents=True)
    (tmp_path / "knn" / "val").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "knn" / "train" / "a" / "0.png")
    assert main(opts(images, tmp_path / "out", "MONITOR.KNN.ENABLED", "True", "MONITOR.KNN.TRAIN_ROOT",
                     str(tmp_path / "knn" / "train"), "MONITOR.KNN.VAL_ROOT", str(tmp_path / "knn" / "val"))) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"error: no labels: {tmp_path / 'knn' / 'val'} has no class sub-folders")
    assert not list((tmp_path / "out").glob("checkpoint_*"))


def test_initial_weights_of_another_width_exit_2_with_one_line(images, tmp_path, capsys):
    narrow = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.save({"model": narrow.state_dict()}, tmp_path / "mae_pretrain_narrow.pth")  # the official release layout
    assert main(opts(images, tmp_path / "out", "MODEL.WEIGHTS", str(tmp_path / "mae_pretrain_narrow.pth"))) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"error: {tmp_path / 'mae_pretrain_narrow.pth'}: encoder width 32 does not match the model's "
                    f"embed_dim 64 (set MODEL.ARCH / MODEL.EMBED_DIM to the checkpoint's size)")


def test_rank_failures_map_to_one_line_and_exit_codes():
    import torch.multiprocessing as mp

    from mae_det.engine.pretrain import describe_rank_failure

    tb = "Traceback (most recent call last):\n  File ...\n" \
         "mae_det.engine.pretrain.NonFiniteLossError: loss_mae = nan at ..."
    line, code = describe_rank_failure(mp.ProcessRaisedException(f"\n\n-- Process 1 terminated:\n{tb}\n", 1, 4242))
    assert (line, code) == ("rank 1 failed: mae_det.engine.pretrain.NonFiniteLossError: loss_mae = nan at ...; "
                            "the other ranks were stopped", 3)
    line, code = describe_rank_failure(mp.ProcessRaisedException("x\nmae_det.data.pretrain.DataError: d: empty", 0, 1))
    assert code == 2 and line.startswith("rank 0 failed: mae_det.data.pretrain.DataError: d: empty")
    line, code = describe_rank_failure(mp.ProcessExitedException("gone", 1, 77, exit_code=-9, signal_name="SIGKILL"))
    assert (line, code) == ("rank 1 (pid 77) was killed by SIGKILL; the other ranks were stopped", 1)


@pytest.mark.slow
def test_kill9_then_resume_equals_uninterrupted_bit_for_bit(images, tmp_path):
    run = opts(images, tmp_path / "{}", "SOLVER.EPOCHS", "4", "SOLVER.CHECKPOINT_ITER_PERIOD", "1", "LOG_PERIOD", "1",
               "MODEL.DROP_PATH", "0.1")

    def args(name: str) -> list[str]:
        return [a.replace("{}", name) for a in run]

    ref = cli(*args("ref"))
    assert ref.returncode == 0, ref.stderr
    delay = random.uniform(0.0, 0.4)
    proc = subprocess.Popen([sys.executable, TOOL, *args("cut")], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "cut" / "last_checkpoint"
    deadline = time.time() + 240
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert alive, f"the run ended before the kill (delay {delay:.3f} s): make it longer"
    killed_at = torch.load(tmp_path / "cut" / pointer.read_text().strip(), weights_only=True)["global_step"]
    assert 1 <= killed_at < 32, killed_at

    resumed = cli("--resume", *args("cut"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    a, b = final_model(tmp_path / "ref"), final_model(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after a kill at step {killed_at} (delay {delay:.3f} s)"
    ea = torch.load(tmp_path / "ref" / "encoder.pth", weights_only=True)["model"]
    eb = torch.load(tmp_path / "cut" / "encoder.pth", weights_only=True)["model"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert not list((tmp_path / "cut").glob(".*.tmp"))


@pytest.mark.slow
def test_two_gloo_processes_match_one(images, tmp_path):
    assert main(opts(images, tmp_path / "one", "SOLVER.BATCH_SIZE", "8")) == 0  # the reference, in this process
    two = cli("--num-gpus", "2", *opts(images, tmp_path / "two", "SOLVER.BATCH_SIZE", "4"))
    assert two.returncode == 0, two.stderr
    assert "2 processes, effective batch 8" in two.stderr
    a, b = final_model(tmp_path / "one"), final_model(tmp_path / "two")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-4, diff
    la = [r["loss"] for r in map(json.loads, (tmp_path / "one" / "metrics.jsonl").read_text().splitlines())]
    lb = [r["loss"] for r in map(json.loads, (tmp_path / "two" / "metrics.jsonl").read_text().splitlines())]
    np.testing.assert_allclose(la, lb, rtol=1e-4)


def _spawned_ranks(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text().replace("\0", " ")]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the rank processes through /proc")
def test_a_killed_rank_ends_the_whole_job(images, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, TOOL, "--num-gpus", "2", *opts(images, out, "SOLVER.BATCH_SIZE", "4", "SOLVER.EPOCHS", "500")],
        env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        ranks = _spawned_ranks(proc.pid)
        assert proc.poll() is None and len(ranks) == 2, "training did not start"
        victim = ranks[-1]
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # a hang would end here, as a failure
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rank ") and f"(pid {victim}) was killed by SIGKILL" in last, last
    assert "the other ranks were stopped" in last
    assert all(not Path(f"/proc/{r}").exists() or "zombie" in Path(f"/proc/{r}/status").read_text() for r in ranks)


@pytest.mark.slow
def test_two_processes_enforce_the_bad_image_budget_on_their_sum(images, tmp_path):
    # each rank checked only its own unreadable images: 2 of the 4 per rank stayed within the budget of 2, so the
    # run that one process refuses finished with exit 0
    data = tmp_path / "data"
    data.mkdir()
    for f in sorted(images.iterdir())[:20]:
        (data / f.name).write_bytes(f.read_bytes())
    for name in ("002b.png", "007b.png", "012b.png", "017b.png"):
        (data / name).write_text("not an image")
    extra = ("SEED", "2", "SOLVER.BATCH_SIZE", "4", "SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0",
             "DATA.MAX_BAD_FRACTION", "0.1", "DATA.PATH", str(data))
    two = cli("--num-gpus", "2", *opts(images, tmp_path / "two", *extra))
    assert two.returncode == 2, two.stderr[-2000:]
    assert "4 of 24 images are unreadable or missing" in two.stderr and not (tmp_path / "two" / "encoder.pth").exists()


@pytest.mark.slow
def test_a_file_rendezvous_can_be_used_again(images, tmp_path):
    # the spawned ranks leave the FileStore file behind: a second run read the first one's addresses and failed
    url = f"file://{tmp_path / 'rendezvous'}"
    for run in ("a", "b"):
        r = cli("--num-gpus", "2", "--dist-url", url, *opts(images, tmp_path / run, "SOLVER.BATCH_SIZE", "4",
                                                             "SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0"))
        assert r.returncode == 0, r.stderr[-2000:]

