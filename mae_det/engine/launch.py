"""Launching inside a scheduler's job: the process group from the job's environment, and preemption-safe stops.

Process group: inside a submitit/SLURM job (one task per GPU) rank, local rank, world size and the master address
come from the job environment, exported the way ``env://`` reads them; under ``torchrun`` they are there already;
a single process needs none. The same :func:`init_distributed` serves all three.

Preemption and time limits: SLURM sends SIGUSR2 ``signal_delay_s`` before the time limit (submitit asks for it) and,
where the cluster is configured to, on preemption; otherwise preemption is SIGTERM, then SIGKILL after the grace
time. submitit's own handler checkpoints on global rank 0 in the middle of a step, and the other ranks then wait
forever in their next collective. Under :func:`preemption_guard` a signal only sets a flag; the training loops call
:func:`stop_requested` at every step boundary, where all ranks agree on it with one all-reduce, then write their
checkpoint and call :func:`requeue`: rank 0 resubmits the job through submitit (the resubmission adds ``--resume``)
and every rank exits.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import time
import contextlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

import torch
import torch.distributed as dist

from ..config.pretrain import ConfigError
from ..utils import dist as du

logger = logging.getLogger(__name__)

# Test hook: "SIG:STEP[:RANK],..." (e.g. "USR2:3:1,TERM:6") makes that rank (default 0) send itself SIG<SIG> at the
# boundary after that step, once per job (a resumed fine-tuning repeats steps).
TEST_SIGNAL_ENV = "MAE_DET_TEST_SIGNAL"
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def in_submitit_job() -> bool:
    """True in a task started by submitit (SLURM or its local executor)."""
    return bool(os.environ.get("SUBMITIT_EXECUTOR")) and "SUBMITIT_FOLDER" in os.environ


def launched_externally() -> bool:
    """True when the processes were started by torchrun or a submitit job rather than by our tools."""
    return du.launched_by_torchrun() or in_submitit_job()


def threads_per_process(processes: int) -> int:
    """Torch threads for each of ``processes`` local processes: all cores shared out on CPU (each process would
    otherwise start one thread per core: 2 processes ran Mask R-CNN 10x slower on 2 cores), 1 beside a GPU;
    ``OMP_NUM_THREADS``, when set, wins."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return 1 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // processes)


def check_launch_args(num_gpus: int, num_machines: int, machine_rank: int) -> None:
    """Raises a one-line ConfigError for process counts that cannot start: fewer than one process, a
    ``--machine-rank`` outside ``--num-machines`` (its processes would wait 30 minutes for a rank 0 that never
    comes), or ``--num-gpus``/``--num-machines`` in a process that torchrun or a job already started as one rank
    (they were silently ignored)."""
    if num_gpus < 1 or num_machines < 1:
        raise ConfigError(f"--num-gpus {num_gpus} / --num-machines {num_machines}: expected >= 1 each "
                          "(processes per machine, on CPU too)")
    if not 0 <= machine_rank < num_machines:
        raise ConfigError(f"--machine-rank {machine_rank}: expected 0 to --num-machines - 1 ({num_machines - 1})")
    if launched_externally() and (num_gpus, num_machines) != (1, 1):
        raise ConfigError(
            f"--num-gpus {num_gpus} / --num-machines {num_machines}: this process is already rank "
            f"{os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')} started by torchrun or a job "
            "(RANK and WORLD_SIZE are set): drop --num-gpus/--num-machines, or unset RANK and WORLD_SIZE")


def clear_file_store(dist_url: str, num_machines: int) -> None:
    """Removes the rendezvous file of a one-machine ``file://`` URL before the processes start: spawned ranks exit
    without deleting it, and the next run read the old run's addresses from it (gloo: connection refused)."""
    if dist_url.startswith("file://") and num_machines == 1:
        Path(dist_url[len("file://"):]).unlink(missing_ok=True)


RUN_LOCK = ".run.lock"


@contextmanager
def output_dir_lock(output_dir: str | os.PathLike, command: Sequence[str] = ()) -> Iterator[None]:
    """Holds ``OUTPUT_DIR/.run.lock`` for the length of one run: a second run into the same folder is refused.

    Two runs in one folder interleave their checkpoints, ``last_checkpoint`` pointer and metrics, and either one's
    ``--resume`` then continues a mix of both. The lock is the kernel's (``flock``), held by an open file: it goes
    with the process however that ends (a kill, a node lost under SLURM), so no stale lock is left to remove (NFSv3
    may keep a lost client's lock: the refusal says to delete the file if the holder's host is gone).
    The file keeps the holder's pid, host, start time and command for the refusal's message. A file system without
    ``flock`` gets a warning and no lock. Called by the process that writes the run's files (rank 0).

    Raises:
        ConfigError: one line naming the folder and the run that holds it.
    """
    import fcntl

    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"OUTPUT_DIR: cannot create {out} ({e.strerror or e})") from None
    with open(out / RUN_LOCK, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise ConfigError(f"OUTPUT_DIR: {out} is in use by another run ({holder}); wait for it to end or set "
                              f"another OUTPUT_DIR (if that host is gone, delete {out / RUN_LOCK})") from None
        except OSError as e:  # e.g. a Lustre mount without flock support
            logger.warning("OUTPUT_DIR: cannot lock %s (%s): a second run into this folder will not be refused",
                           out / RUN_LOCK, e.strerror or e)
        else:
            f.seek(0)
            f.truncate()
            holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            f.write(f"{holder}: {shlex.join(command)}" if command else holder)
            f.flush()
        try:
            yield
        finally:
            # Explicitly: data-loader workers forked during the run share this open file, and while one of them
            # lives (an interrupted run's, kept by a traceback in a notebook) closing it would not release it.
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)


def init_distributed(device: torch.device | str) -> None:
    """Joins the process group of this submitit job or torchrun run (no-op for one process)."""
    if in_submitit_job() and not du.launched_by_torchrun():
        from submitit.helpers import TorchDistributedEnvironment

        # Device index = local rank (as with torchrun), so every task keeps seeing all GPUs of its node.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    du.init_from_env(device)


def init_detectron2_distributed(device: torch.device | str) -> None:
    """:func:`init_distributed` plus Detectron2's per-machine group (``comm.get_local_rank()`` asserts without it)."""
    from detectron2.utils import comm

    init_distributed(device)
    if du.is_dist():
        comm.create_local_process_group(int(os.environ.get("LOCAL_WORLD_SIZE", du.get_world_size())))


class JobRequeued(SystemExit):
    """Ends a rank after a preemption or time-limit signal: the checkpoint is written and rank 0 requeued the job."""


class _Guard:
    """The state behind :func:`preemption_guard`: the caught signal and submitit's requeue machinery."""

    def __init__(self) -> None:
        from submitit import JobEnvironment
        from submitit.core.job_environment import SignalHandler
        from submitit.core.utils import DelayedSubmission

        self.signum = 0
        env = JobEnvironment()
        # Created at the start of the job, as submitit's own, so that it can tell a time-out from a preemption.
        self.requeuer = SignalHandler(env, env.paths, DelayedSubmission.load(env.paths.submitted_pickle))
        self.test_signals = _parse_test_signals(os.environ.get(TEST_SIGNAL_ENV, ""))
        self._fired = env.paths.folder / f"{env.job_id}_{env.global_rank}_test_signals_fired"
        if self._fired.is_file():  # by an earlier run of this job
            for step in self._fired.read_text().split():
                self.test_signals.pop((int(step), env.global_rank), None)
        self._group: Any = None

    def on_signal(self, signum: int, frame: Any) -> None:
        if not self.signum:
            logger.warning("caught %s: checkpointing and requeueing at the next step boundary",
                           signal.Signals(signum).name)
        self.signum = signum

    def fire_test_signal(self, step: int) -> None:
        sig = self.test_signals.pop((step, du.get_rank()), None)
        if sig is not None:
            with open(self._fired, "a", encoding="utf-8") as f:
                f.write(f"{step}\n")
            os.kill(os.getpid(), sig)

    def cpu_group(self) -> Any:
        """A gloo group for the flag, so that agreeing on it never waits for the GPU stream."""
        if self._group is None:
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return self._group


def _parse_test_signals(spec: str) -> dict[tuple[int, int], signal.Signals]:
    """``"USR2:3:1,TERM:6"`` -> {(step, rank): signal}."""
    out = {}
    for item in filter(None, spec.split(",")):
        parts = item.split(":")
        try:
            if len(parts) > 3:
                raise ValueError
            out[int(parts[1]), int(parts[2]) if len(parts) > 2 else 0] = signal.Signals["SIG" + parts[0]]
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                f"{TEST_SIGNAL_ENV}: expected SIG:STEP[:RANK],... such as USR2:3:1,TERM:6, got {spec!r}"
            ) from None
    return out


_guard: _Guard | None = None


@contextmanager
def preemption_guard() -> Iterator[None]:
    """Within a submitit task: SIGUSR2 and SIGTERM set a flag for :func:`stop_requested` instead of acting."""
    global _guard
    _guard = _Guard()
    previous = {s: signal.signal(s, _guard.on_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _guard = None


def stop_requested(step: int) -> bool:
    """At the boundary after ``step``: True on every rank once any rank caught a stop signal.

    A collective within a guarded job: every rank calls it after the same step. Outside :func:`preemption_guard`
    it is always False and costs nothing.
    """
    g = _guard
    if g is None:
        return False
    g.fire_test_signal(step)
    flag = torch.tensor([g.signum], dtype=torch.int32)
    if du.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=g.cpu_group())
    g.signum = int(flag.item())
    return g.signum != 0


def requeue() -> NoReturn:
    """Ends this rank after its checkpoint was written: rank 0 requeues the job through submitit (whose
    resubmission resumes), the other ranks exit with 0. Raises submitit's ``UncompletedJobError`` on rank 0 when the
    job timed out more than ``max_num_timeout`` times."""
    g = _guard
    assert g is not None and g.signum, "requeue() follows stop_requested() inside preemption_guard()"
    if du.get_world_size() > 1:
        dist.barrier(group=g.cpu_group())  # every rank's part of the checkpoint is done before anyone leaves
    if du.get_rank() != 0:
        raise JobRequeued(0)
    try:
        g.requeuer.checkpoint_and_try_requeue(g.signum)
    except SystemExit as e:  # submitit exits after requeueing
        raise JobRequeued(e.code) from None
