"""Cluster submission of the trainers with submitit: the logic behind ``tools/submit.py``.

    tools/submit.py [--nodes N --gpus-per-node G --partition P --timeout MIN ...] TOOL [TOOL ARGS] [KEY VALUE ...]

``TOOL`` is ``pretrain``, ``train_net`` or ``finetune_cls``; its arguments and ``KEY VALUE`` overrides are those of
``tools/<TOOL>.py``, unchanged. The config (and, unless ``--no-data-check``, the dataset paths) is checked here,
before anything is submitted. Every task of the job (one per GPU) runs ``tools/<TOOL>.py`` in its own process, which
takes rank and world size from the job (:func:`mae_det.engine.launch.init_distributed`), under
:func:`mae_det.engine.launch.preemption_guard`, which turns the time-limit / preemption signal into checkpoint +
requeue at a step boundary; the resubmitted job gets ``--resume``, and so does a job SLURM restarts by itself (node
failure, preemption past its grace time, ``scontrol requeue``).

Writes into the run's OUTPUT_DIR, once the job is submitted: ``submitted_config.yaml`` (the resolved config) and
``submission.json`` (job id, command, resources, log paths). ``config.yaml`` is left to the trainer: a resumed run
compares it with its own config to log the changed keys (old -> new) before rewriting it. submitit's own files
(pickles, per-task stdout/stderr) go to ``--job-dir`` (default ``OUTPUT_DIR/submitit``). Exit codes: 0 submitted
(with ``--wait``: finished), 1 sbatch refused the job or (with ``--wait``) the job failed, 2 bad arguments, config
or data (one ``error:`` line), nothing submitted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ..checkpoint import atomic_write_text
from ..config.pretrain import ConfigError

TOOLS_DIR = Path(__file__).resolve().parents[2] / "tools"
TOOLS = ("pretrain", "train_net", "finetune_cls")
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
SUBMITTED_CONFIG = "submitted_config.yaml"

logger = logging.getLogger(__name__)


class SubmitError(ValueError):
    """The submission was refused (bad arguments, config or data); nothing was submitted."""


# ---- what runs in every task -----------------------------------------------------------------------------
def run_tool(tool: str, argv: Sequence[str]) -> int:
    """Runs ``tools/<tool>.py argv`` in this process, as its command line would; returns its exit code."""
    from .launch import JobRequeued

    saved = sys.argv
    sys.argv = [str(TOOLS_DIR / f"{tool}.py"), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except JobRequeued:
        raise
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_FAILED)
    finally:
        sys.argv = saved
    return 0


class TrainerJob:
    """The callable submitit pickles for every task: a trainer tool with its arguments.

    submitit calls :meth:`checkpoint` on rank 0 when the job is requeued (see ``launch.requeue``): the resubmitted
    job is the same one with ``--resume``. Without ``requeue`` it returns None, so the job ends after its checkpoint.
    A job SLURM restarts by itself (``SLURM_RESTART_COUNT`` > 0) gets ``--resume`` too.
    """

    def __init__(self, tool: str, argv: Sequence[str], requeue: bool = True) -> None:
        self.tool, self.argv, self.requeue = tool, list(argv), requeue

    def __call__(self) -> int:
        from .launch import preemption_guard

        argv = self.argv
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        if "--resume" not in argv and restarts.isdigit() and int(restarts) > 0:
            # SLURM reran the job by itself (node failure, preemption past its grace time, `scontrol requeue`): it
            # runs the pickle as submitted, which lacks the --resume of our own requeue; without it the trainer
            # would start from scratch over the run's checkpoints.
            logger.warning("SLURM restarted this job (SLURM_RESTART_COUNT=%s): running tools/%s.py with --resume",
                           restarts, self.tool)
            argv = ["--resume", *argv]
        with preemption_guard():
            code = run_tool(self.tool, argv)
        if code:
            raise RuntimeError(f"tools/{self.tool}.py exited with code {code}; its error line is in the task's stderr")
        return code

    def checkpoint(self) -> Any:
        from submitit.core.utils import DelayedSubmission

        if not self.requeue:
            return None
        argv = self.argv if "--resume" in self.argv else ["--resume", *self.argv]
        return DelayedSubmission(TrainerJob(self.tool, argv, self.requeue))


# ---- checks before submitting ----------------------------------------------------------------------------
def check_trainer_args(tool: str, argv: Sequence[str], world_size: int, data_check: bool,
                       gpus: bool = False) -> tuple[Any, int]:
    """Parses and validates the trainer's arguments as the tool will on the job's nodes (``gpus``: GPU nodes,
    whatever this machine has); returns (resolved config, loader workers).

    Raises:
        SubmitError, ConfigError, or the trainer's data error: one line saying what is wrong.
    """
    if tool == "pretrain":
        from ..config.pretrain import load_pretrain_cfg
        from ..data.pretrain import build_source
        from .pretrain import pretrain_argument_parser, resolve_accumulation

        args = _parse(pretrain_argument_parser(), argv, local_launch=True)
        cfg = load_pretrain_cfg(args.config_file or None, args.opts, check_paths=data_check)
        resolve_accumulation(cfg, world_size)
        if data_check:
            build_source(cfg.DATA.SOURCE, cfg.DATA.PATH, cfg.DATA.IMAGE_ROOT)
        return cfg, cfg.DATA.NUM_WORKERS
    if tool == "train_net":
        from detectron2.engine import default_argument_parser

        from ..config.detection import load_det_cfg

        args = _parse(default_argument_parser(), argv, local_launch=True)
        cfg = load_det_cfg(args.config_file, args.opts, training=not args.eval_only, gpu_elsewhere=gpus)
        if cfg.SOLVER.IMS_PER_BATCH % world_size:
            raise SubmitError(f"SOLVER.IMS_PER_BATCH: {cfg.SOLVER.IMS_PER_BATCH} is not divisible by the "
                              f"{world_size} tasks of the job (--nodes x --gpus-per-node)")
        if data_check:  # the tool's own check, on the config as the GPU nodes will resolve it
            runpy.run_path(str(TOOLS_DIR / "train_net.py"))["check_datasets"](cfg)
        return cfg, cfg.DATALOADER.NUM_WORKERS
    from ..config.classification import load_cls_cfg
    from .finetune_cls import _argument_parser

    args = _parse(_argument_parser("classification fine-tuning", resume=True), argv)
    if world_size != 1:
        raise SubmitError(f"finetune_cls runs in one process; the job asks for {world_size} tasks "
                          "(use --nodes 1 --gpus-per-node 1)")
    cfg = load_cls_cfg(args.config_file or None, args.opts, check_paths=data_check)
    if data_check:
        for key in ("TRAIN_ROOT", "VAL_ROOT"):
            if not os.path.isdir(cfg.DATA[key]):
                raise SubmitError(f"DATA.{key}: {cfg.DATA[key]} is not a folder (--no-data-check if it exists only "
                                  "on the compute nodes)")
    return cfg, cfg.DATA.NUM_WORKERS


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str], local_launch: bool = False) -> argparse.Namespace:
    """The trainer's arguments; with ``local_launch``, its own process options must be left at their defaults."""
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:  # argparse printed its usage line
        raise SubmitError(f"the trainer's arguments are invalid: {' '.join(argv)}") from e
    if local_launch and any(getattr(args, k) != parser.get_default(k)
                            for k in ("num_gpus", "num_machines", "machine_rank", "dist_url")):
        raise SubmitError("--num-gpus / --num-machines / --machine-rank / --dist-url are for local runs; the job's "
                          "processes come from --nodes and --gpus-per-node (or --tasks-per-node)")
    return args


# ---- the executor ----------------------------------------------------------------------------------------
# The sbatch options the job's script gets from our options or from submitit (submitit's names), and what sets them:
# an --sbatch copy would win in the script while submitit's time-out accounting and submission.json kept ours.
DEDICATED_SBATCH = {
    "job_name": "use --name", "nodes": "use --nodes", "ntasks_per_node": "use --tasks-per-node",
    "gpus_per_node": "use --gpus-per-node", "cpus_per_task": "use --cpus-per-task", "mem": "use --mem",
    "partition": "use --partition", "account": "use --account", "qos": "use --qos", "time": "use --timeout",
    "signal": "use --signal-delay", "output": "use --job-dir", "error": "use --job-dir", "open_mode": "use --job-dir",
    "array": "tools/submit.py submits one job, not an array",
}


def parse_sbatch_options(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` (or a bare ``KEY`` flag such as ``exclusive``) -> submitit's ``additional_parameters``.

    Raises:
        SubmitError: an empty key, or one of :data:`DEDICATED_SBATCH` (its message names the option to use).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not key:
            raise SubmitError(f"--sbatch: expected KEY=VALUE or KEY, got {item!r}")
        if key in DEDICATED_SBATCH:
            raise SubmitError(f"--sbatch {key.replace('_', '-')}: {DEDICATED_SBATCH[key]}")
        out[key] = value if sep else True
    return out


def slurm_parameters(args: argparse.Namespace, tasks_per_node: int, cpus_per_task: int) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters (its names for the sbatch options) for the job's resources."""
    params = dict(
        job_name=args.name, nodes=args.nodes, ntasks_per_node=tasks_per_node, gpus_per_node=args.gpus_per_node or None,
        cpus_per_task=cpus_per_task, mem=args.mem, partition=args.partition, account=args.account, qos=args.qos,
        time=max(1, int(round(args.timeout))), signal_delay_s=args.signal_delay, setup=list(args.setup),
        additional_parameters=parse_sbatch_options(args.sbatch),
    )
    return {k: v for k, v in params.items() if v is not None}


def build_executor(args: argparse.Namespace, tasks_per_node: int, cpus_per_task: int) -> Any:
    """A submitit SlurmExecutor (or LocalExecutor for ``--cluster local``) with the job's resources."""
    import submitit

    if args.cluster == "local":
        ex = submitit.LocalExecutor(args.job_dir, max_num_timeout=args.max_num_timeout)
        ex.update_parameters(tasks_per_node=tasks_per_node, gpus_per_node=args.gpus_per_node,
                             timeout_min=args.timeout, signal_delay_s=args.signal_delay, setup=list(args.setup))
        return ex
    ex = submitit.SlurmExecutor(args.job_dir, max_num_timeout=args.max_num_timeout)
    ex.update_parameters(**slurm_parameters(args, tasks_per_node, cpus_per_task))
    return ex


def submit_argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Submit pretrain / train_net / finetune_cls as a SLURM job (submitit), requeued on preemption "
                    "and time limits",
        usage="tools/submit.py [options] {pretrain,train_net,finetune_cls} [trainer args] [KEY VALUE ...]",
        epilog="Example:\n  tools/submit.py --nodes 8 --gpus-per-node 8 --partition learn --timeout 4320 \\\n"
               "      pretrain --config-file configs/pretrain/mae_vit_large_in1k.yaml OUTPUT_DIR /checkpoint/mae_l",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="slurm (sbatch), or local: this machine's processes, with the same signals and requeue")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs per node, one task each (0: CPU tasks)")
    p.add_argument("--tasks-per-node", type=int, default=0, help="default: --gpus-per-node (1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=0, help="default: the config's loader workers + 1")
    p.add_argument("--mem", default=None, help="memory per node, e.g. 480G (sbatch --mem)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--timeout", type=float, default=72 * 60, help="time limit of one job in minutes (default 72 h)")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds between SIGUSR2 and the time limit: more than a step plus a checkpoint write")
    p.add_argument("--job-dir", default="", help="submitit's pickles and task logs (default OUTPUT_DIR/submitit)")
    p.add_argument("--name", default="", help="job name (default mae_det_<tool>)")
    p.add_argument("--requeue", action=argparse.BooleanOptionalAction, default=True,
                   help="requeue on preemption / time limit (always checkpoints first)")
    p.add_argument("--max-num-timeout", type=int, default=30,
                   help="how many time-limit requeues before the chain stops (submitit's default 3 is too few)")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY[=VALUE]",
                   help="any other sbatch option, e.g. constraint=volta32gb, gres=gpu:8, exclusive (repeatable)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before the tasks start, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--no-data-check", dest="data_check", action="store_false",
                   help="skip the dataset path checks (data mounted only on the compute nodes)")
    p.add_argument("--wait", action="store_true", help="wait for the job; exit 0 when it finished, 1 when it failed")
    p.add_argument("tool", choices=TOOLS)
    p.add_argument("tool_args", nargs=argparse.REMAINDER, help="the trainer's arguments and KEY VALUE overrides")
    return p


def submit(args: argparse.Namespace, argv: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """Checks and submits the parsed ``tools/submit.py`` arguments; returns (the submitit job, the submission
    record written to OUTPUT_DIR/submission.json).

    Writes OUTPUT_DIR/submitted_config.yaml, never config.yaml: that file holds the config of the run's last
    launch, which a ``--resume`` compares with its own (README section 6), and the job may start late or never.
    """
    if args.nodes < 1 or args.gpus_per_node < 0 or args.tasks_per_node < 0 or args.timeout <= 0:
        raise SubmitError("--nodes must be >= 1, --gpus-per-node / --tasks-per-node >= 0 and --timeout > 0")
    if args.cluster == "local" and args.nodes != 1:
        raise SubmitError("--cluster local runs on one node (--nodes 1)")
    if args.cluster == "slurm" and shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found: submit from a SLURM login node (or --cluster local on this machine)")
    parse_sbatch_options(args.sbatch)  # here: the local executor never reads them, and it starts the job at once
    tasks = args.tasks_per_node or max(args.gpus_per_node, 1)
    cfg, workers = check_trainer_args(args.tool, args.tool_args, args.nodes * tasks, args.data_check,
                                      gpus=args.gpus_per_node > 0)
    device = cfg.MODEL.DEVICE if args.tool == "train_net" else cfg.DEVICE  # "auto" is cuda on a GPU node
    if args.gpus_per_node and tasks > args.gpus_per_node and device != "cpu":
        raise SubmitError(f"--tasks-per-node {tasks} > --gpus-per-node {args.gpus_per_node}: each task of a GPU job "
                          "uses its own GPU (cuda:LOCAL_RANK)")
    cpus = args.cpus_per_task or workers + 1
    out = Path(cfg.OUTPUT_DIR).resolve()
    args.job_dir = str(Path(args.job_dir).resolve() if args.job_dir else out / "submitit")
    args.name = args.name or f"mae_det_{args.tool}"

    from .pretrain import prepare_output_dir  # with the trainers: submitting stays light until here

    prepare_output_dir(out)
    try:
        prepare_output_dir(args.job_dir)
    except ConfigError as e:
        raise SubmitError(f"--job-dir: {str(e).partition(': ')[2]}") from e
    executor = build_executor(args, tasks, cpus)
    job = executor.submit(TrainerJob(args.tool, args.tool_args, args.requeue))
    record = {
        "job_id": job.job_id, "cluster": args.cluster, "tool": args.tool,
        "command": [f"tools/{args.tool}.py", *args.tool_args], "submit_command": ["tools/submit.py", *argv],
        "resources": {"nodes": args.nodes, "tasks_per_node": tasks, "gpus_per_node": args.gpus_per_node,
                      "cpus_per_task": cpus, "mem": args.mem, "partition": args.partition, "account": args.account,
                      "qos": args.qos, "timeout_min": args.timeout, "signal_delay_s": args.signal_delay,
                      "requeue": args.requeue, "max_num_timeout": args.max_num_timeout,
                      "sbatch": parse_sbatch_options(args.sbatch), "setup": args.setup},
        "job_dir": args.job_dir, "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr),
        "output_dir": str(out), "config": str(out / SUBMITTED_CONFIG),
        "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_text(out / SUBMITTED_CONFIG, cfg.dump())
    atomic_write_text(out / "submission.json", json.dumps(record, indent=2) + "\n")
    return job, record


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/submit.py``; see the module docstring for the exit codes."""
    from ..data.detection import DatasetError
    from ..data.pretrain import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = submit_argument_parser().parse_args(argv)
    try:
        from submitit.core.utils import FailedJobError, FailedSubmissionError
    except ImportError:  # the optional `cluster` extra
        print('error: tools/submit.py needs submitit: pip install -e ".[cluster]"', file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        job, record = submit(args, argv)
    except (SubmitError, ConfigError, DataError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FailedJobError, FailedSubmissionError) as e:  # sbatch refused the job (its message, e.g. a bad option)
        print(f"error: the job was not submitted: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_FAILED
    res = record["resources"]
    print(f"submitted job {record['job_id']}: {record['tool']} on {res['nodes']} node(s) x {res['tasks_per_node']} "
          f"task(s)\ntask 0 logs: {record['stdout']}\n             {record['stderr']}\n"
          f"run folder: {record['output_dir']} (submission.json, {SUBMITTED_CONFIG}; once the job runs config.yaml, "
          "log.txt, checkpoints)", flush=True)
    if not args.wait:
        return 0
    try:
        job.results()  # waits for every task (across requeues); raises with the failed task's traceback
    except Exception as e:
        # submitit's message: a task's traceback between lines of dashes (its last line says what failed), or
        # two lines saying that a task ended without a result (e.g. it was killed), then its stderr.
        text = str(e)
        if "failed during processing" in text:
            what = text.split("-" * 22)[1].strip().splitlines()[-1]
        else:
            what = " ".join(text.splitlines()[:2])
        print(f"error: job {record['job_id']} failed: {what.strip()} (see {record['stderr']})", file=sys.stderr)
        return EXIT_FAILED
    print(f"job {record['job_id']} finished")
    return 0
