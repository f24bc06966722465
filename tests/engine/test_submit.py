"""mae_det.engine.submit without a cluster: the resubmission, the sbatch script submitit writes from our options,
what a submission writes into the run folder, and (slow) a resumed job run by submitit's LocalExecutor."""
import json
from pathlib import Path

import pytest
import torch
from submitit.slurm.slurm import _make_sbatch_string

from mae_det.engine.submit import TrainerJob, parse_sbatch_options, slurm_parameters, submit_argument_parser


def test_the_resubmission_resumes_and_no_requeue_ends_the_chain():
    job = TrainerJob("pretrain", ["--config-file", "c.yaml", "SOLVER.EPOCHS", "4"])
    again = job.checkpoint()
    assert again.function.tool == "pretrain" and again.args == () and again.kwargs == {}
    assert again.function.argv == ["--resume", "--config-file", "c.yaml", "SOLVER.EPOCHS", "4"]
    assert again.function.checkpoint().function.argv == again.function.argv  # --resume only once
    assert TrainerJob("train_net", ["--config-file", "c.yaml"], requeue=False).checkpoint() is None


def test_a_job_slurm_restarted_by_itself_resumes(monkeypatch, caplog):
    # SLURM reruns the pickle as submitted after a node failure, a preemption past its grace time or an admin's
    # `scontrol requeue`: without --resume the trainer started from scratch over the run's checkpoints.
    import contextlib
    import logging

    from detectron2.engine import default_argument_parser

    import mae_det.engine.launch
    import mae_det.engine.submit
    from mae_det.engine.finetune_cls import _argument_parser
    from mae_det.engine.pretrain import pretrain_argument_parser

    ran = []
    monkeypatch.setattr(mae_det.engine.launch, "preemption_guard", contextlib.nullcontext)
    monkeypatch.setattr(mae_det.engine.submit, "run_tool", lambda tool, argv: ran.append((tool, list(argv))) or 0)
    argv = ["--config-file", "c.yaml", "SOLVER.EPOCHS", "4"]
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    TrainerJob("pretrain", argv)()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the job's first run
    TrainerJob("pretrain", argv)()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    with caplog.at_level(logging.WARNING, logger="mae_det.engine.submit"):
        for tool in ("pretrain", "train_net", "finetune_cls"):
            TrainerJob(tool, argv)()
        TrainerJob("pretrain", ["--resume", *argv])()  # requeued by us: --resume already there
    assert ran == [("pretrain", argv)] * 2 + [(t, ["--resume", *argv]) for t in ("pretrain", "train_net",
                                                                                 "finetune_cls", "pretrain")]
    assert caplog.messages == [f"SLURM restarted this job (SLURM_RESTART_COUNT=2): running tools/{t}.py with "
                               "--resume" for t in ("pretrain", "train_net", "finetune_cls")]
    # every trainer reads the leading --resume as its own flag, its overrides unchanged
    for parser in (pretrain_argument_parser(), default_argument_parser(), _argument_parser("x", resume=True)):
        args = parser.parse_args(["--resume", *argv])
        assert args.resume is True and args.config_file == "c.yaml" and args.opts == argv[2:]


def test_sbatch_options():
    assert parse_sbatch_options(["constraint=volta32gb", "--exclusive", "gres=gpu:8", "mail-type=END"]) == {
        "constraint": "volta32gb", "exclusive": True, "gres": "gpu:8", "mail_type": "END"}


@pytest.mark.parametrize("item, message", [
    ("time=60", "--sbatch time: use --timeout"),
    ("--signal=USR1@60", "--sbatch signal: use --signal-delay"),
    ("ntasks-per-node=2", "--sbatch ntasks-per-node: use --tasks-per-node"),
    ("ntasks_per_node=2", "--sbatch ntasks-per-node: use --tasks-per-node"),
    ("job-name=x", "--sbatch job-name: use --name"),
    ("open_mode=truncate", "--sbatch open-mode: use --job-dir"),
    ("array=0-3", "--sbatch array: tools/submit.py submits one job, not an array"),
])
def test_sbatch_options_that_repeat_ours_are_refused(item, message):
    # they won in the script while submitit's time-out accounting and submission.json kept our values
    from mae_det.engine.submit import SubmitError

    with pytest.raises(SubmitError) as e:
        parse_sbatch_options(["constraint=a100", item])
    assert str(e.value) == message


def test_every_sbatch_option_the_script_gets_from_us_is_refused_in_sbatch(tmp_path):
    from mae_det.engine.submit import DEDICATED_SBATCH, SubmitError

    args = submit_argument_parser().parse_args(["--mem", "1G", "--partition", "p", "--account", "a", "--qos", "q",
                                                "pretrain"])
    script = _make_sbatch_string(command="x", folder=tmp_path, map_count=2,  # map_count: submitit's array line
                                 **slurm_parameters(args, tasks_per_node=1, cpus_per_task=1))
    keys = {line[len("#SBATCH --"):].partition("=")[0].replace("-", "_") for line in script.splitlines()
            if line.startswith("#SBATCH --")}
    assert keys - {"wckey"} == set(DEDICATED_SBATCH)  # wckey: submitit's accounting tag, free to override
    for key in keys - {"wckey"}:
        with pytest.raises(SubmitError, match=f"^--sbatch {key.replace('_', '-')}: "):
            parse_sbatch_options([f"{key}=1"])


def test_sbatch_script_of_the_paper_recipe(tmp_path):
    args = submit_argument_parser().parse_args([
        "--nodes", "8", "--gpus-per-node", "8", "--partition", "learn", "--account", "vision", "--qos", "high",
        "--mem", "480G", "--timeout", "4320", "--sbatch", "constraint=volta32gb", "--sbatch", "exclusive",
        "--setup", "module load cuda/12.4", "pretrain", "--config-file", "x.yaml",
    ])
    args.name = "mae_det_pretrain"
    script = _make_sbatch_string(command="python -m submitit.core._submit", folder=tmp_path,
                                 **slurm_parameters(args, tasks_per_node=8, cpus_per_task=11))
    for line in ("--nodes=8", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=11", "--mem=480G",
                 "--partition=learn", "--account=vision", "--qos=high", "--time=4320", "--signal=USR2@120",
                 "--constraint=volta32gb", "--exclusive", "--job-name=mae_det_pretrain"):
        assert f"#SBATCH {line}\n" in script, line
    assert "\nmodule load cuda/12.4\n" in script
    assert args.max_num_timeout == 30 and args.requeue


def test_data_checks_and_their_opt_out(tmp_path):
    from mae_det.config.pretrain import ConfigError
    from mae_det.data.detection import DatasetError
    from mae_det.engine.submit import check_trainer_args
    from tests.tools.test_train_net import tiny_config

    config = str(Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "mae_vit_base_in1k.yaml")
    pretrain = ["--config-file", config, "DATA.PATH", str(tmp_path / "imagenet")]
    with pytest.raises(ConfigError, match=f"DATA.PATH: {tmp_path / 'imagenet'} does not exist"):
        check_trainer_args("pretrain", pretrain, 64, data_check=True)
    cfg, workers = check_trainer_args("pretrain", pretrain, 64, data_check=False)  # mounted on the nodes only
    assert cfg.SOLVER.EFFECTIVE_BATCH_SIZE == 4096 and workers == cfg.DATA.NUM_WORKERS

    # A GPU recipe (fp16) submitted from a machine without a GPU keeps its device; its datasets are checked by
    # the tool's own check.
    det = tiny_config(tmp_path / "det.yaml", tmp_path / "coco", tmp_path / "out",
                      **{"MODEL.DEVICE": "cuda", "SOLVER.PRECISION": "fp16"})
    with pytest.raises(DatasetError, match="annotation file not found"):
        check_trainer_args("train_net", ["--config-file", str(det)], 2, data_check=True, gpus=True)
    cfg, _ = check_trainer_args("train_net", ["--config-file", str(det)], 2, data_check=False, gpus=True)
    assert cfg.MODEL.DEVICE == "cuda"


def _trainer_args(out: Path, data: Path, *extra: str) -> list[str]:
    from tests.tools.test_pretrain_tool import CONFIG, TINY

    return ["--config-file", CONFIG, *TINY, "DATA.PATH", str(data), "OUTPUT_DIR", str(out), *extra]


def test_a_resubmission_leaves_config_yaml_to_the_trainer(tmp_path, monkeypatch, capsys):
    # Until 2026-12-08 submitting wrote config.yaml, so a resumed job compared its config with itself and never
    # named the changed keys, and a job sbatch refused still replaced the record of the run's last launch.
    import logging

    import yaml

    from mae_det.config.pretrain import load_pretrain_cfg
    from mae_det.engine.submit import main
    from mae_det.utils.provenance import warn_resumed_config_changes
    from tests.tools.test_submit import _fake_slurm

    out = tmp_path / "out"
    out.mkdir()
    args = _trainer_args(out, tmp_path / "imgs")
    earlier = load_pretrain_cfg(args[1], args[2:], check_paths=False).dump()  # SOLVER.EPOCHS 2
    (out / "config.yaml").write_text(earlier)
    for name in ("refusing", "accepting"):
        (tmp_path / name).mkdir()
    _fake_slurm(tmp_path / "refusing", monkeypatch, 'echo "sbatch: error: invalid account" >&2; exit 1')
    resume = ["--no-data-check", "pretrain", "--resume", *args, "SOLVER.EPOCHS", "3"]
    assert main(resume) == 1
    assert (out / "config.yaml").read_text() == earlier and not (out / "submitted_config.yaml").exists()

    _fake_slurm(tmp_path / "accepting", monkeypatch, 'echo "Submitted batch job 4243"')
    assert main(resume) == 0
    assert "submitted job 4243" in capsys.readouterr().out
    assert (out / "config.yaml").read_text() == earlier
    record = json.loads((out / "submission.json").read_text())
    assert record["config"] == str(out / "submitted_config.yaml")
    assert yaml.safe_load((out / "submitted_config.yaml").read_text())["SOLVER"]["EPOCHS"] == 3
    # What the job's trainer does first: it names the change, then rewrites config.yaml.
    submitted = load_pretrain_cfg(args[1], [*args[2:], "SOLVER.EPOCHS", "3"], check_paths=False)
    assert warn_resumed_config_changes(out, submitted, logging.getLogger("test")) == ["SOLVER.EPOCHS: 2 -> 3"]


@pytest.mark.slow
def test_a_run_resumed_through_submit_logs_the_changed_keys(tmp_path):
    from mae_det.config.pretrain import load_pretrain_cfg
    from mae_det.engine.pretrain import run_pretrain
    from tests.engine.test_pretrain import write_textures
    from tests.tools.test_submit import LOCAL, submit

    images, out = write_textures(tmp_path / "imgs", 32), tmp_path / "out"
    args = _trainer_args(out, images)
    run_pretrain(load_pretrain_cfg(args[1], args[2:]))  # 2 epochs
    r = submit(*LOCAL, "pretrain", "--resume", *args, "SOLVER.EPOCHS", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    warned = [x for x in (out / "log.txt").read_text().splitlines() if "changed since its last launch" in x]
    assert len(warned) == 1 and warned[0].endswith("1 setting changed since its last launch (its config.yaml will "
                                                   "show the new values): SOLVER.EPOCHS: 2 -> 3"), warned
    assert torch.load(out / "checkpoint_0003.pth", weights_only=True)["epoch"] == 3


def test_unusable_folders_and_sbatch_options_are_refused_before_anything_is_submitted(tmp_path, capsys):
    # the local executor started the job although --sbatch was refused afterwards (exit 2, job running), and an
    # OUTPUT_DIR or --job-dir that is a file was a FileExistsError traceback
    from mae_det.engine.submit import main

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    local = ["--cluster", "local", "--gpus-per-node", "0", "--no-data-check"]
    cases = [
        ([*local, "--sbatch", "=x", "pretrain", *_trainer_args(tmp_path / "o1", tmp_path / "imgs")],
         "error: --sbatch: expected KEY=VALUE or KEY, got '=x'"),
        ([*local, "pretrain", *_trainer_args(a_file, tmp_path / "imgs")],
         f"error: OUTPUT_DIR: {a_file} exists and is not a folder"),
        ([*local, "--job-dir", str(a_file), "pretrain", *_trainer_args(tmp_path / "o3", tmp_path / "imgs")],
         f"error: --job-dir: {a_file} exists and is not a folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert capsys.readouterr().err.strip().splitlines() == [message]
    assert not (tmp_path / "o1").exists()  # nothing was submitted, nothing started
