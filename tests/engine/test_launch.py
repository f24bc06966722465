"""mae_det.engine.launch: the test-signal hook, the guard's absence outside a job, multi-node = single-node, and
the run lock of OUTPUT_DIR."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mae_det.config.pretrain import ConfigError
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


HOLDER = """
import sys, time
from mae_det.engine.launch import output_dir_lock
with output_dir_lock(sys.argv[1], ["holder", "--of", "the lock"]):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s run lock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    with launch.output_dir_lock(tmp_path / "run", ["first"]):
        assert (tmp_path / "run" / launch.RUN_LOCK).read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(ConfigError, match=rf"^OUTPUT_DIR: {tmp_path / 'run'} is in use by another run "
                                              rf"\(pid {os.getpid()} on .* since .*: first\); wait for it"):
            with launch.output_dir_lock(tmp_path / "run"):
                pass
    with launch.output_dir_lock(tmp_path / "run", ["second"]):  # released on exit
        assert (tmp_path / "run" / launch.RUN_LOCK).read_text().endswith(": second")
    holder = _hold(tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"\(pid {holder.pid} on .*: holder --of 'the lock'\)"):
        with launch.output_dir_lock(tmp_path / "run"):
            pass
    holder.kill()  # no clean-up of any kind: the kernel drops the lock with the process
    holder.wait()
    with launch.output_dir_lock(tmp_path / "run"):
        pass
    holder_text = (tmp_path / "run" / launch.RUN_LOCK).read_text()  # no command: no trailing colon
    assert re.fullmatch(r"pid \d+ on \S+ since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", holder_text), holder_text
    (tmp_path / "a_file").write_text("notes")
    with pytest.raises(ConfigError, match=rf"^OUTPUT_DIR: cannot create {tmp_path / 'a_file'} \(File exists\)$"):
        with launch.output_dir_lock(tmp_path / "a_file"):
            pass


def test_a_run_lock_is_released_while_a_forked_worker_of_the_run_lives(tmp_path):
    # A data-loader worker forked during the run shares the lock's open file: an interrupted run's worker, kept
    # alive by a traceback in a notebook, held the lock against the same user's --resume (before 2026-12-08).
    import multiprocessing

    with launch.output_dir_lock(tmp_path / "run"):
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        worker.start()
    try:
        with launch.output_dir_lock(tmp_path / "run"):
            pass
    finally:
        worker.kill()
        worker.join()


def test_training_tools_refuse_an_output_dir_in_use_and_write_nothing_there(images, tmp_path, capsys):
    out = tmp_path / "pretrain"
    holder = _hold(out)
    try:
        assert main(opts(images, out)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: OUTPUT_DIR: {out} is in use by another run (pid {holder.pid} on ")
        assert err.count("\n") == 1
        assert [p.name for p in out.iterdir()] == [launch.RUN_LOCK]  # no log.txt, config.yaml, checkpoint
    finally:
        holder.kill()
        holder.wait()
    assert main(opts(images, out, "SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0")) == 0
    assert (out / "encoder.pth").is_file()


def test_train_net_finetune_and_demo_refuse_an_output_dir_in_use(tmp_path, repo_root, capsys):
    from mae_det.demo import DemoError, run_demo
    from mae_det.engine.finetune_cls import finetune_main
    from tests.tools.test_train_net import make_coco, run_tool, tiny_config

    make_coco(tmp_path / "coco", n=2)
    det_out, cls_out, demo_out = tmp_path / "det", tmp_path / "cls", tmp_path / "demo"
    holders = [_hold(det_out), _hold(cls_out), _hold(demo_out)]
    try:
        r = run_tool("--num-gpus", "2", "--config-file", str(tiny_config(tmp_path / "tiny.yaml", tmp_path / "coco",
                                                                         det_out)))
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith(f"error: OUTPUT_DIR: {det_out} is in use by another "
                                                             f"run (pid {holders[0].pid} on ")
        assert finetune_main(["--config-file", str(repo_root / "configs/classification/shapes_finetune.yaml"),
                              "OUTPUT_DIR", str(cls_out)]) == 2
        assert capsys.readouterr().err.startswith(f"error: OUTPUT_DIR: {cls_out} is in use by another run (pid "
                                                  f"{holders[1].pid} on ")
        with pytest.raises(DemoError, match=rf"^--output: {demo_out} is in use by another run \(pid "
                                            rf"{holders[2].pid} on "):
            run_demo("quick", output=demo_out, data_root=tmp_path / "shapes")
        for out in (det_out, cls_out, demo_out):
            assert [p.name for p in out.iterdir()] == [launch.RUN_LOCK]
        assert not (tmp_path / "shapes").exists()
    finally:
        for h in holders:
            h.kill()
            h.wait()
