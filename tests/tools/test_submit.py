"""tools/submit.py: refusals before anything is submitted, and jobs run by submitit's LocalExecutor (real task
processes, the executor's own time-limit signal and requeue loop): completion, preemption by SIGUSR2 / SIGTERM
at chosen steps, time limits, and detection resuming at its saved iteration."""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mae_det.engine.submit import main
from tests.tools.test_pretrain_tool import CONFIG, ENV, ROOT, final_model, images, opts  # noqa: F401
from tests.tools.test_train_net import TOOL, make_coco, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

SUBMIT = str(ROOT / "tools" / "submit.py")
LOCAL = ["--cluster", "local", "--gpus-per-node", "0", "--timeout", "5", "--wait"]


def submit(*args: str, env: dict | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SUBMIT, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**ENV, **(env or {})}, timeout=timeout)


def task_log(out: Path, task: int, stream: str) -> str:
    """All attempts of one task's stdout ("out": submitit's info lines) or stderr ("err": warnings, our logs)."""
    return "".join(p.read_text() for p in (out / "submitit").glob(f"*_{task}_log.{stream}"))


# ---- refused before submission ---------------------------------------------------------------------------
@pytest.mark.slow
def test_invalid_config_is_refused_with_exit_2(images, tmp_path):  # noqa: F811
    r = submit("--cluster", "local", "pretrain", *opts(images, tmp_path / "out", "SOLVER.NO_SUCH_KEY", "1"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "SOLVER.NO_SUCH_KEY" in r.stderr
    assert not (tmp_path / "out").exists()  # no job folder, no submission.json: nothing was submitted


@pytest.mark.parametrize("submit_opts, tool, tool_opts, overrides, expected", [
    ([], "pretrain", [], ["DATA.PATH", "{tmp}/missing"], "missing"),
    (["--tasks-per-node", "3"], "pretrain", [], ["SOLVER.EFFECTIVE_BATCH_SIZE", "8"], "not a multiple"),
    ([], "pretrain", ["--num-gpus", "2"], [], "--num-gpus / --num-machines"),
    (["--nodes", "2"], "pretrain", [], [], "--cluster local runs on one node"),
    (["--timeout", "0"], "pretrain", [], [], "--timeout > 0"),
    (["--tasks-per-node", "2"], "finetune_cls", [], [], "finetune_cls runs in one process"),
    (["--gpus-per-node", "2", "--tasks-per-node", "4"], "pretrain", [], ["DEVICE", "auto"],
     "--tasks-per-node 4 > --gpus-per-node 2: each task of a GPU job uses its own GPU (cuda:LOCAL_RANK)"),
])
def test_bad_submissions_exit_2_with_one_line(images, tmp_path, capsys, submit_opts, tool, tool_opts, overrides,
                                             expected):  # noqa: F811
    if tool == "pretrain":
        trainer = [*tool_opts, *opts(images, tmp_path / "out"), *(a.replace("{tmp}", str(tmp_path)) for a in overrides)]
    else:
        trainer = ["--config-file", str(ROOT / "configs" / "classification" / "shapes_finetune.yaml"),
                   "OUTPUT_DIR", str(tmp_path / "out")]
    assert main(["--cluster", "local", *submit_opts, tool, *trainer]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "out" / "submission.json").exists()


def test_without_submitit_one_line_names_the_extra(tmp_path):
    # submitit is the optional `cluster` extra: without it the tool ended in a ModuleNotFoundError traceback
    r = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.modules['submitit'] = None; "
                        f"sys.argv = [{SUBMIT!r}, *sys.argv[1:]]; runpy.run_path({SUBMIT!r}, run_name='__main__')",
                        "--cluster", "local", "pretrain", "--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ['error: tools/submit.py needs submitit: pip install -e ".[cluster]"']
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="this machine has SLURM")
def test_slurm_without_sbatch_is_refused(images, tmp_path, capsys):  # noqa: F811
    assert main(["pretrain", *opts(images, tmp_path / "out")]) == 2
    assert "sbatch not found" in capsys.readouterr().err


def _fake_slurm(tmp_path: Path, monkeypatch, sbatch_body: str) -> None:
    """srun and sbatch stand-ins on PATH: submitit's SlurmExecutor checks for srun and submits with sbatch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", sbatch_body)):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_submission(images, tmp_path, monkeypatch, capsys):  # noqa: F811
    _fake_slurm(tmp_path, monkeypatch, f'cp "$1" {tmp_path / "job.sh"}; echo "Submitted batch job 4242"')
    out = tmp_path / "out"
    assert main(["--nodes", "2", "--gpus-per-node", "4", "--partition", "learn", "--sbatch", "constraint=a100",
                 "pretrain", *opts(images, out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "submission.json").read_text())
    assert record["job_id"] == "4242" and record["stdout"] == str(out / "submitit" / "4242_0_log.out")
    assert f"submitted job 4242: pretrain on 2 node(s) x 4 task(s)\ntask 0 logs: {record['stdout']}" in printed
    script = (tmp_path / "job.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=1", "--partition=learn",
                 "--constraint=a100", "--signal=USR2@120", "--time=4320"):
        assert f"#SBATCH {line}\n" in script, line
    assert "\nsrun " in script and "submitit.core._submit" in script
    job = pickle.loads((out / "submitit" / "4242_submitted.pkl").read_bytes())
    assert (job.function.tool, job.function.argv) == ("pretrain", opts(images, out))
    assert job._timeout_countdown == 30  # --max-num-timeout


def test_sbatch_refusal_is_one_line(images, tmp_path, monkeypatch, capsys):  # noqa: F811
    _fake_slurm(tmp_path, monkeypatch, 'echo "sbatch: error: invalid partition specified: nope" >&2; exit 1')
    assert main(["--partition", "nope", "pretrain", *opts(images, tmp_path / "out")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (sbatch's own stderr passes through above it)
    assert last == "error: the job was not submitted: sbatch: error: invalid partition specified: nope", last


# ---- jobs on the local executor --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:  # noqa: F811
    """An uninterrupted 2-task job."""
    out = tmp_path_factory.mktemp("submit") / "ref"
    return out, submit(*LOCAL, "--tasks-per-node", "2", "pretrain", *opts(images, out, "SOLVER.BATCH_SIZE", "4"))


@pytest.mark.slow
def test_two_task_job_runs_to_completion(reference):
    out, r = reference
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((out / "submission.json").read_text())
    assert re.search(rf"submitted job {record['job_id']}: pretrain on 1 node\(s\) x 2 task\(s\)", r.stdout)
    assert record["stdout"] in r.stdout and f"job {record['job_id']} finished" in r.stdout
    assert record["resources"]["tasks_per_node"] == 2 and record["resources"]["cpus_per_task"] == 1
    assert record["command"][:3] == ["tools/pretrain.py", "--config-file", CONFIG]
    assert yaml.safe_load((out / "config.yaml").read_text())["SOLVER"]["BATCH_SIZE"] == 4
    assert "2 processes, effective batch 8" in (out / "log.txt").read_text()
    assert (out / "encoder.pth").is_file()


@pytest.mark.slow
def test_preemption_signals_checkpoint_requeue_and_finish_bit_identical(reference, images, tmp_path):  # noqa: F811
    ref, _ = reference
    out = tmp_path / "cut"
    # SIGUSR2 reaches only rank 1 after step 3 (rank 0 must still checkpoint), SIGTERM rank 0 after step 6.
    r = submit(*LOCAL, "--tasks-per-node", "2", "pretrain", *opts(images, out, "SOLVER.BATCH_SIZE", "4"),
               env={"MAE_DET_TEST_SIGNAL": "USR2:3:1,TERM:6:0"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "caught SIGUSR2" in task_log(out, 1, "err") and "caught SIGTERM" in task_log(out, 0, "err")
    assert len(re.findall(r"Requeued job \d+ \(\d+ remaining timeouts\)", task_log(out, 0, "out"))) == 2
    log = (out / "log.txt").read_text()
    assert "resumed from " + str(out / "checkpoint_0000_000003.pth") in log  # 4 steps per epoch: 3 = epoch 0 + 3
    assert "resumed from " + str(out / "checkpoint_0001_000002.pth") in log  # 6 = epoch 1 + 2
    a, b = final_model(ref), final_model(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = (torch.load(d / "encoder.pth", weights_only=True)["model"] for d in (ref, out))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(line)["step"] for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert steps == ref_steps  # no step logged twice or lost across the requeues


@pytest.mark.slow
def test_time_limit_requeues_until_max_num_timeout(images, tmp_path):  # noqa: F811
    """As submitit's own requeue test: the executor signals SIGUSR2 signal_delay_s before its time limit (here 10 s
    into each 24 s attempt, mid-training of a run far longer); one requeue allowed, the second signal ends the
    chain, each time after a checkpoint at a step boundary and before the kill."""
    out = tmp_path / "long"
    r = submit("--cluster", "local", "--gpus-per-node", "0", "--timeout", "0.4", "--signal-delay", "14",
               "--max-num-timeout", "1", "--wait", "pretrain",
               *opts(images, out, "SOLVER.EPOCHS", "10000", "CHECKPOINT_PERIOD", "10000", "LOG_PERIOD", "50"))
    assert r.returncode == 1 and "timed-out too many times" in r.stderr, r.stderr[-3000:]
    assert task_log(out, 0, "out").count("(0 remaining timeouts)") == 1
    assert task_log(out, 0, "err").count("Caught signal SIGUSR2") == 2
    first = re.search(r"resumed from .*checkpoint_(\d+)_(\d+)\.pth", (out / "log.txt").read_text())
    assert first, (out / "log.txt").read_text()[-2000:]
    k1 = int(first[1]) * 4 + int(first[2])
    k2 = torch.load(out / (out / "last_checkpoint").read_text().strip(), weights_only=True)["global_step"]
    assert 1 <= k1 < k2, (k1, k2)


@pytest.mark.slow
def test_detection_resumes_at_the_saved_iteration(tmp_path):
    make_coco(tmp_path / "data")
    cfg = tiny_config(tmp_path / "cfg.yaml", tmp_path / "data", tmp_path / "out", test=False,
                      **{"SOLVER.MAX_ITER": 4, "SOLVER.CHECKPOINT_PERIOD": 100})
    r = submit(*LOCAL, "train_net", "--config-file", str(cfg), env={"MAE_DET_TEST_SIGNAL": "TERM:1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    log = (out / "log.txt").read_text()
    assert re.search(r"Starting training from iteration 0.*caught SIGTERM.*model_0000001\.pth.*"
                     r"Starting training from iteration 2", log, re.S), log[-3000:]
    assert torch.load(out / "model_0000001.pth", weights_only=False)["iteration"] == 1
    iters = [json.loads(line)["iteration"] for line in (out / "metrics.json").read_text().splitlines()]
    assert iters == [0, 1, 2, 3] and (out / "model_final.pth").is_file()
    # SEEDED_DRAWS (the default): the preempted job ends with the weights of an uninterrupted run (same threads)
    plain = tiny_config(tmp_path / "plain.yaml", tmp_path / "data", tmp_path / "plain", test=False,
                        **{"SOLVER.MAX_ITER": 4, "SOLVER.CHECKPOINT_PERIOD": 100})
    r = subprocess.run([sys.executable, str(TOOL), "--config-file", str(plain)], capture_output=True, text=True,
                       cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(d / "model_final.pth", weights_only=True)["model"] for d in (out, tmp_path / "plain"))
    assert all(torch.equal(a[k], b[k]) for k in b)
