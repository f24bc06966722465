"""mae_det.engine.launch: the test-signal hook, the guard's absence outside a job, and multi-node = single-node."""
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae_det.engine import launch
from mae_det.engine.pretrain import main
from tests.tools.test_pretrain_tool import ENV, ROOT, TOOL, final_model, images, opts  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def test_test_signal_spec():
    assert launch._parse_test_signals("USR2:3:1,TERM:6") == {(3, 1): signal.SIGUSR2, (6, 0): signal.SIGTERM}
    assert launch._parse_test_signals("") == {}
    for bad in ("USR2", "NOPE:3", "USR2:x", "USR2:3:1:2"):
        with pytest.raises(ValueError, match=f"MAE_DET_TEST_SIGNAL: expected SIG:STEP.*got '{bad}'"):
            launch._parse_test_signals(bad)


def test_outside_a_submitted_job_nothing_is_guarded(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert not launch.in_submitit_job()
    assert launch.stop_requested(3) is False
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SUBMITIT_FOLDER", "/nowhere")
    assert launch.in_submitit_job() and launch.launched_externally()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _torchrun(nnodes: int, node_rank: int, nproc: int, port: int, args: list[str], log_dir: Path) -> subprocess.Popen:
    # A static rendezvous: with c10d, --node-rank is ignored and ranks are assigned in arrival order.
    # --log-dir: without it every launch leaves a torchelastic_* folder in /tmp.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node-rank", str(node_rank),
           "--nproc-per-node", str(nproc), "--rdzv-backend", "static", "--master-addr", "localhost",
           "--master-port", str(port), "--log-dir", str(log_dir), TOOL, *args]
    return subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_nodes_equal_one_node_and_one_process(images, tmp_path):  # noqa: F811
    assert main(opts(images, tmp_path / "one", "SOLVER.BATCH_SIZE", "8")) == 0  # 1 process, the same global batch
    two = opts(images, tmp_path / "1x2", "SOLVER.BATCH_SIZE", "4")
    err = _torchrun(1, 0, 2, _free_port(), two, tmp_path / "logs").communicate(timeout=300)[1]
    assert "2 processes, effective batch 8" in err, err[-2000:]

    port, nodes = _free_port(), opts(images, tmp_path / "2x1", "SOLVER.BATCH_SIZE", "4")
    procs = [_torchrun(2, r, 1, port, nodes, tmp_path / "logs") for r in (0, 1)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    # Rank 0 (the only one logging INFO) ran on node 0: the node rank was honoured.
    assert "2 processes, effective batch 8" in errs[0] and "2 processes" not in errs[1]

    one, a, b = (final_model(tmp_path / n) for n in ("one", "1x2", "2x1"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same ranks, same gloo reductions: identical
    diff = max((one[k] - b[k]).abs().max().item() for k in one)
    assert diff < 1e-4, diff  # another reduction order than one process: the 2-process test's tolerance


def test_local_processes_share_the_cores_unless_omp_num_threads_says(monkeypatch):
    # Detectron2's launch sets no thread count: 2 Mask R-CNN processes on 2 cores ran 2 threads each, 10x slower
    from mae_det.engine.launch import threads_per_process

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert [threads_per_process(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert threads_per_process(2) == 1  # beside a GPU
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr("torch.get_num_threads", lambda: 3)
    assert threads_per_process(2) == 3


def test_process_counts_are_checked_before_anything_starts(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(var, raising=False)
    launch.check_launch_args(2, 1, 0)
    with pytest.raises(launch.ConfigError, match=r"^--machine-rank 3: expected 0 to --num-machines - 1 \(1\)$"):
        launch.check_launch_args(1, 2, 3)
    with pytest.raises(launch.ConfigError, match=r"^--num-gpus 0 / --num-machines 1: expected >= 1 each"):
        launch.check_launch_args(0, 1, 0)
    # torchrun's variables made the tools run one rank and ignore --num-gpus without a word
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    launch.check_launch_args(1, 1, 0)
    with pytest.raises(launch.ConfigError, match=r"^--num-gpus 2 / --num-machines 1: this process is already rank 0 "
                                                  r"of 4 started by torchrun or a job \(RANK and WORLD_SIZE are set\)"):
        launch.check_launch_args(2, 1, 0)
