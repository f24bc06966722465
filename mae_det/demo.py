"""The embedded demo behind ``make demo``: shapes dataset -> MAE and supervised pretraining -> Mask R-CNN from MAE,
supervised and random init -> AP tables -> ``REPORT.md``.

Every stage is resumable. A stage records ``<output>/.stages/<key>.json`` with a hash of everything that defines
its result (tool, config settings with their ``_BASE_`` chain, not comments, command-line overrides, and the
hashes of the stages it consumes; paths under the output, data and checkout folders relative to them, so that
moving or copying these folders keeps every stage up to date). On a re-run a stage whose record says "done" with
the same hash, and whose outputs exist (for the dataset, in a folder other runs may share: still hold this
profile's dataset), is skipped; one that was started with the same hash but not finished is continued with
``--resume`` where its tool has that flag (pretraining, Mask R-CNN, UperNet, classification fine-tuning) and
started over in a clean directory where it has not (kNN, linear probe); one whose hash changed starts over in a
clean directory; a stage directory without a record is an error, never deleted. Training stages run as
subprocesses of the same interpreter, their output shown live and kept in ``<output>/logs/<key>.log``, so a
failure names the stage and its log; SIGTERM and SIGHUP stop them as Ctrl-C does, and on Linux they die with the
demo process however it ends.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import yaml

from .checkpoint import atomic_write_text
from .config.pretrain import ConfigError
from .config.vit_backbone import PYRAMIDS
from .data.shapes import (
    CLASS_NAMES,
    CLASSIFICATION_SPLITS,
    DETECTION_SPLITS,
    ShapesConfig,
    generate_shapes,
    write_semantic_split,
)
from .engine.launch import output_dir_lock
from .evaluation.compare import SEG_FILE, aggregate, collect_runs, compare, format_delta, header
from .evaluation.operating_point import operating_point
from .utils.provenance import machine_info

REPO = Path(__file__).resolve().parents[1]
ARMS: tuple[str, ...] = ("mae", "supervised", "scratch")
PRETRAINED_ARMS = ARMS[:2]  # the inits that have a pretraining stage (scratch is random init)
# "auto": what each config says (bf16 autocast where the CPU has it natively, fp32 elsewhere); "fp32" gives a
# bf16 machine the numbers a CPU without native bf16 gets (its time differs: bf16 matmuls are 2-3x faster there).
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
STATE_DIR = ".stages"


class DemoError(RuntimeError):
    """A stage failed; the message names the stage and where its log is."""


# ------------------------------------------------------------------------------------------------ profiles
@dataclass(frozen=True)
class Profile:
    """One demo size. The YAML configs under ``configs/shapes/`` hold the full settings; a profile adds
    command-line overrides on top of them (the same for every arm, so the comparison stays fair).

    Attributes:
        name: "quick", "full" or "experiment".
        shapes: The dataset to generate.
        pretrain_opts: ``KEY VALUE`` overrides for both pretraining runs.
        pretrain_scale: Multiplies each pretraining config's ``SOLVER.EPOCHS`` and ``SOLVER.WARMUP_EPOCHS``, so
            both arms keep the same compute as each other.
        finetune_opts: ``KEY VALUE`` overrides for every Mask R-CNN run.
        knn_monitor: Log the kNN top-1 during pretraining (the accuracy curve of the report).
        reconstructions: Number of validation images shown in the reconstruction figure.
        cls_opts: ``KEY VALUE`` overrides for the encoder checks on the classification split (kNN, linear probe,
            fine-tuning; ``configs/classification/shapes_finetune.yaml``).
        semantic_opts: ``KEY VALUE`` overrides for the UperNet runs on the semantic split
            (``configs/shapes/sem_seg_vit_*.yaml``; only with ``semantic``).
        subset_epochs: Runs on a fraction of the labels keep the full run's epochs (iterations, warmup and lr
            steps scaled by the fraction); False keeps its iterations (more epochs on fewer images).
    """

    name: str
    shapes: ShapesConfig
    pretrain_opts: tuple[str, ...] = ()
    pretrain_scale: int = 1
    finetune_opts: tuple[str, ...] = ()
    knn_monitor: bool = True
    reconstructions: int = 4
    cls_opts: tuple[str, ...] = ()
    semantic_opts: tuple[str, ...] = ()
    subset_epochs: bool = False


PROFILES: dict[str, Profile] = {
    "full": Profile(
        name="full",
        # Plain backgrounds in the classification split: on textured ones (100 images per class) every encoder,
        # a small CNN from scratch too, memorized backgrounds and stayed near chance (pilot p24, docs/demo_pilots.md).
        # 640 labeled train images with the configs' 2000 Mask R-CNN iterations: with 160 and 1200, MAE init stayed
        # under target 1 (25.9 / 21.0 box / mask AP) and led by ~5 AP; with 640 and 1500, 32.8 / 27.8 and ~9 (pilot
        # p109); 2000 (p112) make its detector find most val objects with the right class at score >= 0.5.
        shapes=ShapesConfig(image_size=64, num_pool=2400, num_train=640, num_val=300, num_cls_train=600,
                            num_cls_val=600, max_objects=4, min_size=0.12, max_size=0.3, cls_background_contrast=0.0),
        # 9 UperNet runs (3 inits x 3 seeds) within make experiment's 15 extra minutes on 2 cores.
        semantic_opts=("SOLVER.MAX_ITER", "1200", "SOLVER.PRECISION", "auto"),
    ),
    "quick": Profile(
        name="quick",
        shapes=ShapesConfig(image_size=64, num_pool=384, num_train=48, num_val=48, num_cls_train=120,
                            num_cls_val=60, max_objects=4, min_size=0.12, max_size=0.3, cls_background_contrast=0.0),
        pretrain_opts=("SOLVER.EPOCHS", "2", "SOLVER.WARMUP_EPOCHS", "1", "MONITOR.KNN.PERIOD", "1"),
        finetune_opts=("SOLVER.MAX_ITER", "30", "SOLVER.WARMUP_ITERS", "5", "SOLVER.STEPS", "(25,)"),
        cls_opts=("SOLVER.EPOCHS", "1", "SOLVER.WARMUP_EPOCHS", "0", "LINPROBE.EPOCHS", "2",
                  "LINPROBE.WARMUP_EPOCHS", "0"),
        semantic_opts=("SOLVER.MAX_ITER", "10", "SOLVER.WARMUP_ITERS", "2"),
    ),
}
# make experiment: the full demo with twice the pretraining of each arm, on a label-scarce split of 160 train images
# (the generator's per-index seeds make them the first 160 of make demo's 640, and the pool, val and classification
# splits the same bytes), with the configs' Mask R-CNN (2000 iterations, 64 sampled RoIs per image): 50 epochs of
# the 160 images. Label-fraction runs keep the 50 epochs: 500 / 1000 / 2000 iterations on 40 / 80 / 160 images.
PROFILES["experiment"] = replace(PROFILES["full"], name="experiment", pretrain_scale=2,
                                 shapes=replace(PROFILES["full"].shapes, num_train=160), subset_epochs=True)


# -------------------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    """One step of the pipeline.

    Attributes:
        key: Name of its state record, log file and (for tool stages) output directory.
        title: What the progress header says.
        params: JSON-serializable description of the result (hashed with ``deps``' hashes).
        outputs: Files that must exist when the stage is done.
        deps: Keys of the stages whose results this one consumes.
        command: For tool stages: the argument list after ``sys.executable``.
        resumable: For tool stages: the tool takes ``--resume`` (added to continue an unfinished run); a stage
            whose tool does not is started over instead.
        run: For in-process stages: the function doing the work.
        out_dir: Directory the stage owns (wiped when its hash changes, or when it cannot resume).
        current: For outputs that other runs may rewrite (a dataset folder shared between output folders): whether
            they still hold this stage's result; False runs a done stage again.
        progress: For tool stages: maps one output line to (units done, units in all), or None if it says nothing
            about progress; drives the stage's progress bar (the lines themselves go to the log only).
        result: Returns the stage's one-line result (e.g. its AP), printed when it is done.
    """

    key: str
    title: str
    params: dict[str, Any]
    outputs: list[Path]
    deps: list[str] = field(default_factory=list)
    command: list[str] | None = None
    resumable: bool = False
    run: Callable[[], None] | None = None
    out_dir: Path | None = None
    current: Callable[[], bool] | None = None
    progress: Callable[[str], tuple[int, int] | None] | None = None
    result: Callable[[], str] | None = None


def config_chain(path: str | os.PathLike) -> dict[str, Any]:
    """The settings of a YAML config and of every ``_BASE_`` it inherits from (path -> parsed YAML, the config
    first). Stage hashes are taken over these rather than the text, so that editing a comment does not restart
    hours of finished runs."""
    out: dict[str, Any] = {}
    todo = [Path(path)]
    while todo:
        p = todo.pop()
        out[str(p)] = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        base = out[str(p)].get("_BASE_")
        for b in [base] if isinstance(base, str) else base or []:
            todo.append(p.parent / b)
    return out


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _map_strings(obj: Any, fn: Callable[[str], str]) -> Any:
    """``obj`` (JSON-like) with ``fn`` applied to each string and path in it, dict keys included."""
    if isinstance(obj, (str, Path)):
        return fn(str(obj))
    if isinstance(obj, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_map_strings(v, fn) for v in obj]
    return obj


def portable(obj: Any, roots: dict[str, Path]) -> Any:
    """``obj`` (a stage's params) with each path under a folder of ``roots`` (placeholder -> folder) written from
    the placeholder, inside longer strings too (a repr'd dataset list), so that its hash survives moving or
    copying those folders. Where the folders nest, the innermost one names the path."""
    folders = {str(path): name for name, path in roots.items()}
    pattern = re.compile("(?:" + "|".join(map(re.escape, sorted(folders, key=len, reverse=True))) + r""")(?=[/'"]|$)""")
    return _map_strings(obj, lambda s: pattern.sub(lambda m: folders[m.group()], s))


def expand(obj: Any, roots: dict[str, Path]) -> Any:
    """The inverse of :func:`portable`: each placeholder of ``roots`` replaced by its folder."""
    pattern = re.compile("|".join(map(re.escape, roots)))
    return _map_strings(obj, lambda s: pattern.sub(lambda m: str(roots[m.group()]), s))


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


def _bar(done: int, total: int, width: int = 24) -> str:
    if total > 0:  # Detectron2 resumed after its last iteration logs "iter: MAX_ITER + 1"
        done = min(done, total)
    frac = max(done / total, 0.0) if total > 0 else 0.0
    filled = int(round(frac * width))
    return f"|{'#' * filled}{'.' * (width - filled)}| {frac:4.0%} ({done}/{total})"


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with(parent: int) -> None:
    """``preexec_fn`` of the tool processes (Linux): SIGTERM when the demo process dies, whatever killed it
    (SIGKILL included), so that no tool goes on training in a folder that a re-run resumes at the same time."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the demo died before the call above
        os._exit(1)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the demo runs so that it stops its tools as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


class _ToolProcess:
    """A running tool stage: the subprocess and a thread copying its output to the log file. The console gets one
    progress bar (redrawn as a new line at most every ``bar_every`` s, from :attr:`Stage.progress`), not the
    output itself; :meth:`poll` reaps the process with ``wait4`` to keep its CPU time."""

    def __init__(self, stage: Stage, cmd: list[str], env: dict[str, str], log_path: Path, bar_every: float) -> None:
        self.stage, self.log_path, self.t0 = stage, log_path, time.perf_counter()
        self.cpu_s = 0.0
        die_with = (lambda parent=os.getpid(): _die_with(parent)) if _LIBC is not None else None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                     preexec_fn=die_with)
        self._bar_every = bar_every
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        last_bar, shown, pending = 0.0, None, b""
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n===== {datetime.now().isoformat(timespec='seconds')} {' '.join(self.proc.args)}\n".encode())
            while chunk := self.proc.stdout.read1(65536):
                logf.write(chunk)
                logf.flush()
                pending += chunk
                *segments, pending = re.split(rb"(\r|\n)", pending)
                if self.stage.progress is None:
                    continue
                for text in segments[::2]:
                    step = self.stage.progress(text.decode("utf-8", "replace"))
                    now = time.perf_counter()
                    if step is None or step == shown or (now - last_bar < self._bar_every and step[0] < step[1]):
                        continue
                    last_bar, shown = now, step
                    _console(f"[{self.stage.key}] {_bar(*step)} {_fmt_time(now - self.t0)}")

    def poll(self) -> int | None:
        """The exit code once the process has ended (reaping it and recording its CPU time), else None."""
        if self.proc.returncode is None:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid == 0:
                return None
            self.cpu_s = usage.ru_utime + usage.ru_stime
            self.proc.returncode = os.waitstatus_to_exitcode(status)
        return self.proc.returncode

    def wait(self) -> int:
        while self.poll() is None:
            time.sleep(0.1)
        self._reader.join()
        return self.proc.returncode


_CONSOLE = threading.Lock()


def _cpu_self_and_children() -> float:
    """CPU seconds of this process and of its reaped children (the dataset generator's worker pool)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _console(line: str) -> None:
    with _CONSOLE:
        print(line, flush=True)


class StageRunner:
    """Runs stages in dependency order with headers, timing, state records, resume and skip (see the module
    docstring). Up to ``jobs`` tool stages run at once, each with ``threads`` intra-op threads: on a 2-core
    machine two single-threaded processes use both cores without the collapse that two OpenMP threads suffer as
    soon as anything else wants a core (measured: a training step 2-7x slower than with one thread)."""

    def __init__(self, output: Path, jobs: int = 1, threads: int | None = None, log: Callable[[str], None] = _console,
                 bar_every: float = 10.0, roots: dict[str, Path] | None = None) -> None:
        self.output = output
        # Records written before the params were portable hashed the absolute paths: the folders of the placeholders
        # (default: the output and the checkout) turn them back, so that those records still match here.
        self.roots = roots or {"<output>": output, "<repo>": REPO}
        self.state_dir = output / STATE_DIR
        self.log_dir = output / "logs"
        self.jobs = max(1, jobs)
        self.threads = threads
        self.log = log
        self.bar_every = bar_every
        self.hashes: dict[str, str] = {}
        self.absolute_hashes: dict[str, str] = {}
        # key -> (title, wall seconds, CPU seconds, "ran" | "resumed" | "skipped")
        self.wall: dict[str, tuple[str, float, float, str]] = {}
        self.t0 = time.perf_counter()

    def _state(self, key: str) -> dict[str, Any] | None:
        path = self.state_dir / f"{key}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def _write_state(self, key: str, state: dict[str, Any]) -> None:
        atomic_write_text(self.state_dir / f"{key}.json", json.dumps(state, indent=1))

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.threads is not None and "OMP_NUM_THREADS" not in os.environ:  # the user's setting wins
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        return env

    def run_all(self, stages: Sequence[Stage]) -> None:
        """Runs every stage whose dependencies are done, first in list order; raises on the first failure
        (stopping the other running tools: their records say "started", so a re-run resumes them)."""
        n = len(stages)
        number = {s.key: k for k, s in enumerate(stages, 1)}
        pending, running, done = list(stages), {}, set()
        # SIGTERM (kill, docker stop, a batch system) and SIGHUP (a closed terminal) end the demo as Ctrl-C does,
        # through the finally below; their default would leave the tools training. Signals reach the main thread only.
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)} if main else {}
        try:
            while pending or running:
                for stage in [s for s in pending if all(d in done for d in s.deps)]:
                    if stage.command is not None and len(running) >= self.jobs:
                        continue
                    pending.remove(stage)
                    started = self._start(stage, number[stage.key], n)
                    if started is None:
                        done.add(stage.key)
                    else:
                        running[stage.key] = started
                for key, (proc, resume) in list(running.items()):
                    if proc.poll() is not None:
                        del running[key]
                        self._finish(proc, resume, number[key], n)
                        done.add(key)
                if running:
                    time.sleep(0.2)
                elif pending and not any(all(d in done for d in s.deps) for s in pending):
                    raise DemoError(f"stages {[s.key for s in pending]} depend on stages that are not in the list")
        finally:
            for proc, _ in running.values():
                proc.proc.terminate()
            for sig, handler in previous.items():  # a second signal while the tools stop ends the demo at once
                signal.signal(sig, handler)
            for proc, _ in running.values():
                proc.wait()

    def _start(self, stage: Stage, k: int, n: int) -> tuple[_ToolProcess, bool] | None:
        """Skips, runs (in-process stages, to completion) or starts (tool stages) ``stage``."""
        h = _hash({"params": stage.params, "deps": [self.hashes[d] for d in stage.deps]})
        absolute = _hash({"params": expand(stage.params, self.roots),
                          "deps": [self.absolute_hashes[d] for d in stage.deps]})
        self.hashes[stage.key], self.absolute_hashes[stage.key] = h, absolute
        self.log(f"[demo] ===== stage {k}/{n}: {stage.title} ===== (elapsed {_fmt_time(time.perf_counter() - self.t0)})")
        state = self._state(stage.key)
        same = state is not None and state.get("hash") in (h, absolute)
        if same and state.get("status") == "done" and all(p.exists() for p in stage.outputs):
            if stage.current is None or stage.current():
                if state["hash"] != h:
                    self._write_state(stage.key, {**state, "hash": h})
                self.log(f"[demo] {stage.key}: up to date (ran in {_fmt_time(state.get('wall_s', 0.0))}), skipped")
                self.wall[stage.key] = (stage.title, float(state.get("wall_s", 0.0)),
                                        float(state.get("cpu_s", 0.0)), "skipped")
                return None
            self.log(f"[demo] {stage.key}: its outputs were replaced since it ran ({stage.outputs[0]}), running it "
                     "again")
        resume = (same and stage.command is not None and stage.resumable and stage.out_dir is not None
                  and stage.out_dir.exists())
        if not resume and stage.out_dir is not None and stage.out_dir.exists():
            if state is None and any(stage.out_dir.iterdir()):
                # Not made by this output's demo as far as it knows (copied without the hidden .stages, or a run by
                # hand): maybe hours of training, so it is the user's to delete.
                raise DemoError(f"{stage.out_dir} exists but has no record in {self.state_dir / f'{stage.key}.json'}: "
                                "delete it or restore the record")
            if state is not None:
                why = "unfinished, and its tool cannot resume" if same else "settings changed since the last run"
                self.log(f"[demo] {stage.key}: {why}, starting {stage.out_dir} over")
            shutil.rmtree(stage.out_dir)
        threads = self._env().get("OMP_NUM_THREADS", "default")
        if resume and state.get("threads", threads) != threads:
            # The thread count changes the summation order of torch's matmuls: the run stays valid, not bit-exact.
            self.log(f"[demo] {stage.key}: resuming with {threads} thread(s) per tool, started with "
                     f"{state['threads']}: its numbers will differ from an uninterrupted run's, rounding grows over training "
                     f"(delete {stage.out_dir} to start it over)")
            threads = state["threads"]  # the record keeps the first count, so every later resume still warns
        self._write_state(stage.key, {"hash": h, "status": "started", "title": stage.title, "threads": threads})
        if stage.command is None:
            t0, cpu0 = time.perf_counter(), _cpu_self_and_children()
            stage.run()
            self._complete(stage, k, n, time.perf_counter() - t0, _cpu_self_and_children() - cpu0, "ran")
            return None
        # --resume goes before the KEY VALUE overrides, which are the remainder of the tools' argument parsers.
        cmd = [sys.executable, stage.command[0], *(["--resume"] if resume else []), *stage.command[1:]]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{stage.key}.log"
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"\n[demo] {'resuming' if resume else 'running'} {' '.join(cmd[1:])}\n")
        self.log(f"[demo] {stage.key}: {'resuming' if resume else 'running'}, log {log_path}")
        return _ToolProcess(stage, cmd, self._env(), log_path, self.bar_every), resume

    def _finish(self, proc: _ToolProcess, resume: bool, k: int, n: int) -> None:
        code = proc.wait()
        if code != 0:
            tail = proc.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            raise DemoError(f"stage {k}/{n} '{proc.stage.title}' failed with exit code {code}; log: {proc.log_path}\n"
                            + "\n".join(f"    {line}" for line in tail))
        self._complete(proc.stage, k, n, time.perf_counter() - proc.t0, proc.cpu_s, "resumed" if resume else "ran")

    def _complete(self, stage: Stage, k: int, n: int, wall: float, cpu: float, status: str) -> None:
        missing = [str(p) for p in stage.outputs if not p.exists()]
        if missing:
            raise DemoError(f"stage {k}/{n} '{stage.title}' finished without writing {', '.join(missing)}"
                            + (f"; log: {self.log_dir / (stage.key + '.log')}" if stage.command else ""))
        self._write_state(stage.key, {"hash": self.hashes[stage.key], "status": "done", "title": stage.title,
                                      "wall_s": wall, "cpu_s": cpu})
        self.wall[stage.key] = (stage.title, wall, cpu, status)
        result = f": {stage.result()}" if stage.result is not None else ""
        self.log(f"[demo] {stage.key}: done in {_fmt_time(wall)} wall, {_fmt_time(cpu)} CPU{result} "
                 f"(elapsed {_fmt_time(time.perf_counter() - self.t0)})")


# ----------------------------------------------------------------------------------------------- the pipeline
@dataclass(frozen=True)
class DemoPaths:
    """Where everything goes."""

    output: Path
    data: Path

    def run(self, key: str) -> Path:
        return self.output / key

    @property
    def roots(self) -> dict[str, Path]:
        """The folders that stage params name paths from (:func:`portable`), by placeholder."""
        return {"<output>": self.output, "<data>": self.data, "<repo>": REPO}

    def annotations(self, split: str) -> Path:
        """The COCO json of a dataset split ("train", "val", "pool")."""
        return self.data / "annotations" / f"instances_{split}.json"


def _data_opts(data: Path, train_json: Path | None = None) -> dict[str, list[str]]:
    """Command-line overrides pointing each tool at the generated dataset under ``data`` (detection training on
    ``train_json``, default the whole train split)."""
    ann, img, cls, sem = data / "annotations", data / "images", data / "classification", data / "semantic"
    register = [["shapes_train", str(train_json or ann / "instances_train.json"), str(img / "train")],
                ["shapes_val", str(ann / "instances_val.json"), str(img / "val")]]
    register_sem = [[f"shapes_sem_{split}", str(img / split), str(sem / split), str(sem / "classes.txt")]
                    for split in ("train", "val")]
    knn = ["MONITOR.KNN.TRAIN_ROOT", str(cls / "train"), "MONITOR.KNN.VAL_ROOT", str(cls / "val")]
    return {
        "mae": ["DATA.PATH", str(img / "pool"), *knn],
        "supervised": ["DATA.SOURCE", "coco", "DATA.PATH", str(ann / "instances_pool.json"),
                       "DATA.IMAGE_ROOT", str(img / "pool"), *knn],
        "finetune": ["DATASETS.REGISTER", repr(register)],
        "semantic": ["DATASETS.REGISTER_SEM_SEG", repr(register_sem)],
    }


def holds_dataset(data: Path, cfg: ShapesConfig) -> bool:
    """Whether ``data`` holds exactly the dataset of ``cfg``, as its ``dataset_info.json`` records it (the folder
    may be shared with other output folders, profiles and ``tools/generate_shapes.py``)."""
    wanted = {k: v for k, v in asdict(cfg).items() if k != "workers"}
    try:
        return json.loads((data / "dataset_info.json").read_text(encoding="utf-8")).get("config") == wanted
    except (OSError, json.JSONDecodeError):
        return False


# What generate_shapes and write_semantic_split write under a dataset root, atomic writes' temporaries included:
# a generation interrupted before its dataset_info.json leaves only these.
_SPLITS, _CLS = "|".join(DETECTION_SPLITS), f"({'|'.join(CLASSIFICATION_SPLITS)})/({'|'.join(CLASS_NAMES)})"
_SHAPES_FILES = re.compile(rf"dataset_info\.json|annotations/instances_({_SPLITS})\.json|semantic/classes\.txt"
                           rf"|(images|semantic)/({_SPLITS})/\d{{6}}\.png|classification/{_CLS}/\d{{6}}\.png"
                           r"|([^/]+/)*\.[^/]+\.tmp")


def is_shapes_root(data: Path) -> bool:
    """Whether the dataset stage may replace what ``data`` holds: nothing, a dataset whose ``dataset_info.json``
    names mae_det's shapes generator, or a generation of it that was interrupted (no other files)."""
    try:
        info = json.loads((data / "dataset_info.json").read_text(encoding="utf-8"))
        return info.get("generator") == generate_shapes.__module__  # what generate_shapes writes there
    except FileNotFoundError:
        return all(_SHAPES_FILES.fullmatch(p.relative_to(data).as_posix()) for p in data.rglob("*") if p.is_file())
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
        return False


def _generate(data: Path, cfg: ShapesConfig, log: Callable[[str], None]) -> None:
    """Generate the dataset unless ``data`` already holds exactly this one; another shapes dataset there is
    replaced, other files are an error (``generate_shapes`` would delete them)."""
    if holds_dataset(data, cfg):
        log(f"[demo] {data} already holds this dataset")
        return
    if not is_shapes_root(data):
        raise DemoError(f"{data} holds files that are not a shapes dataset; pick another --data-root")
    generate_shapes(data, cfg, overwrite=True, log=log)


def _pct(fraction: float) -> str:
    return f"{round(100 * fraction)}"


def nested_subsets(coco_json: Path, out_dir: Path, fractions: Sequence[float], seed: int) -> dict[float, Path]:
    """Nested labeled subsets of a COCO split: one permutation of its images drawn with ``seed``, subset ``f`` its
    first ``max(1, round(f * N))`` images (so 25 % is inside 50 %, inside 100 %), written as
    ``<out_dir>/instances_train_<pct>pct_seed<seed>.json`` with the images' annotations."""
    import numpy as np

    data = json.loads(coco_json.read_text(encoding="utf-8"))
    order = np.random.default_rng(seed).permutation(len(data["images"]))
    out = {}
    for f in fractions:
        keep = {data["images"][i]["id"] for i in order[:max(1, round(f * len(order)))]}
        subset = {**data, "images": [im for im in data["images"] if im["id"] in keep],
                  "annotations": [a for a in data["annotations"] if a["image_id"] in keep]}
        out[f] = out_dir / f"instances_train_{_pct(f)}pct_seed{seed}.json"
        atomic_write_text(out[f], json.dumps(subset, separators=(",", ":")))
    return out


def _average_precision(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Non-interpolated AP of one class: mean precision at the rank of each positive (scores sorted down)."""
    ranked = [pos for _, pos in sorted(zip(scores, positives), key=lambda sp: -sp[0])]
    hits, precisions = 0, []
    for rank, pos in enumerate(ranked, 1):
        if pos:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions) if precisions else float("nan")


def class_counts(coco: dict) -> dict[int, list[int]]:
    """Image id -> instances of each category (in sorted category-id order) of a COCO dict."""
    index = {cid: k for k, cid in enumerate(sorted(c["id"] for c in coco["categories"]))}
    per = {im["id"]: [0] * len(index) for im in coco["images"]}
    for a in coco["annotations"]:
        per[a["image_id"]][index[a["category_id"]]] += 1
    return per


def count_frequencies(fit: Sequence[Sequence[int]], cap: int) -> list[list[float]]:
    """The constant prediction fitted on the per-class counts ``fit`` (images x classes): each class's frequency
    of each count 0..``cap`` (counts capped at ``cap``; 1 = presence). A count never seen gets the frequency of
    one image, so that its cross-entropy stays finite."""
    return [[max(sum(min(c[k], cap) == b for c in fit), 1) / len(fit) for b in range(cap + 1)]
            for k in range(len(fit[0]))]


def constant_image_losses(fit: Sequence[Sequence[int]], held: Sequence[Sequence[int]], cap: int) -> list[float]:
    """Per image of ``held``: the cross-entropy of the constant prediction fitted on ``fit``, averaged over classes
    (with ``cap`` 1 the BCE of presence)."""
    freq = count_frequencies(fit, cap)
    return [-sum(math.log(f[min(n, cap)]) for f, n in zip(freq, c)) / len(freq) for c in held]


def constant_loss(fit: Sequence[Sequence[int]], held: Sequence[Sequence[int]], cap: int) -> float:
    """Cross-entropy on ``held`` of the constant prediction fitted on ``fit`` (:func:`count_frequencies`), averaged
    over images and classes: what a model that learned only the label frequencies scores."""
    losses = constant_image_losses(fit, held, cap)
    return sum(losses) / len(losses)


def bootstrap_interval(values: Sequence[float], level: float = 0.95, resamples: int = 10000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement, fixed seed)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    means = v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


@torch.no_grad()
def evaluate_supervised(run_dir: Path, coco_json: Path, image_dir: Path, train_json: Path) -> dict[str, float]:
    """The supervised baseline's own task on held-out images: per-class instance-count accuracy and the count
    cross-entropy (its training loss; count targets), multi-label presence mAP (%), from the run's last checkpoint;
    for reference, the best constant prediction's accuracy (each class's most frequent count on ``train_json``)
    and cross-entropy (the count frequencies on ``train_json``) with a 95 % bootstrap interval (over images) of the
    model's cross-entropy minus the constant's, and the presence mAP of a random ranking (the mean class frequency
    on the held-out images)."""
    import numpy as np
    from PIL import Image

    from .checkpoint import load_checkpoint
    from .config.pretrain import load_pretrain_cfg
    from .engine.pretrain import build_pretrain_model

    cfg = load_pretrain_cfg(run_dir / "config.yaml")
    state = load_checkpoint(last_checkpoint(run_dir))
    data = json.loads(coco_json.read_text(encoding="utf-8"))
    cat_ids = sorted(c["id"] for c in data["categories"])
    model = build_pretrain_model(cfg, len(cat_ids))
    model.load_state_dict(state["model"])
    model.eval()

    true = class_counts(data)
    mean, std = np.array(cfg.DATA.MEAN, np.float32), np.array(cfg.DATA.STD, np.float32)
    size = cfg.MODEL.IMG_SIZE
    scores, hits, losses = [], [], []
    cap = max(cfg.MODEL.MAX_COUNT, 1)
    for im in data["images"]:
        with Image.open(image_dir / im["file_name"]) as pil:
            x = np.asarray(pil.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255.0
        x = torch.from_numpy(((x - mean) / std).transpose(2, 0, 1).copy())[None]  # (1, 3, S, S)
        logits = model.head(model.pooled_features(x, model.pool)).float()[0]
        if cfg.MODEL.MAX_COUNT:
            log_probs = logits.view(len(cat_ids), cfg.MODEL.MAX_COUNT + 1).log_softmax(-1)  # (K, C + 1)
            scores.append((1 - log_probs[:, 0].exp()).tolist())
            hits += [int(p) == min(c, cap) for p, c in zip(log_probs.argmax(-1).tolist(), true[im["id"]])]
            losses.append(-sum(float(lp[min(c, cap)]) for lp, c in zip(log_probs, true[im["id"]])) / len(cat_ids))
        else:
            scores.append(logits.sigmoid().tolist())
    truth = [true[im["id"]] for im in data["images"]]
    aps = [_average_precision([s[k] for s in scores], [c[k] > 0 for c in truth]) for k in range(len(cat_ids))]
    # A random ranking's AP is the class's frequency: the level presence mAP has to beat to show any learning.
    prevalence = [np.mean([c[k] > 0 for c in truth]) for k in range(len(cat_ids))]
    result = {"presence_map": 100 * float(np.nanmean(aps)), "presence_map_chance": 100 * float(np.mean(prevalence)),
              "num_images": len(truth)}
    if cfg.MODEL.MAX_COUNT:
        train = list(class_counts(json.loads(train_json.read_text(encoding="utf-8"))).values())
        mode = [max(range(cap + 1), key=[min(c[k], cap) for c in train].count) for k in range(len(cat_ids))]
        result["count_accuracy"] = 100 * sum(hits) / len(hits)
        result["count_accuracy_constant"] = 100 * sum(min(c[k], cap) == mode[k] for c in truth
                                                      for k in range(len(cat_ids))) / len(hits)
        constant = constant_image_losses(train, truth, cap)
        result["count_loss"] = sum(losses) / len(losses)
        result["count_loss_constant"] = sum(constant) / len(constant)
        result["count_loss_difference_interval"] = bootstrap_interval([m - c for m, c in zip(losses, constant)])
    return result


def _supervised_result(path: Path) -> str:
    r = json.loads(path.read_text(encoding="utf-8"))
    count = (f"count accuracy {r['count_accuracy']:.1f} % (constant prediction {r['count_accuracy_constant']:.1f} %), "
             if "count_accuracy" in r else "")
    if "count_loss" in r:  # held-out files of earlier runs lack it
        lo, hi = r["count_loss_difference_interval"]
        count += (f"count cross-entropy {r['count_loss']:.3f} (constant prediction {r['count_loss_constant']:.3f}; "
                  f"difference {r['count_loss'] - r['count_loss_constant']:+.3f}, 95 % interval {lo:+.3f} to "
                  f"{hi:+.3f} over images), ")
    chance = f" (random ranking {r['presence_map_chance']:.1f} %)" if "presence_map_chance" in r else ""
    return f"held-out {count}presence mAP {r['presence_map']:.1f} %{chance} on {r['num_images']} images"


PARTIAL_BLOCKS = 2  # partial fine-tuning trains the last 2 of the 6 blocks (+ norm and head)
# ... for twice the full fine-tuning's epochs and warmup, as the MAE paper's partial fine-tuning gives fewer tuned
# blocks a longer schedule (its App. A). Chosen on the independent split (p96: every init gained, MAE 40.2 -> 43.4 %);
# on make demo's own split MAE then reaches 42.5 % instead of 38.8 (p100).
PARTIAL_EPOCH_SCALE = 2
# Its base lr per init: each init at its best rate of 8e-3 (the config's), 3.2e-2 and 6.4e-2 at these 40 epochs
# (MAE also 1.6e-2 and 1.28e-1), mean top-1 over 3 seeds on an independent classification split
# (tools/generate_shapes.py --seed 7), so that neither the choice nor any baseline's rate was picked on the reported
# split: MAE 42.3 / 43.9 / 45.3 / 41.7 % at 1.6e-2 / 3.2e-2 / 6.4e-2 / 1.28e-1, supervised 41.9 / 39.8 / 40.4 % and
# random init 24.4 / 22.7 / 20.6 % at 8e-3 / 3.2e-2 / 6.4e-2 (pilot p116, docs/demo_pilots.md; at 20 epochs p92
# had chosen 3.2e-2 for MAE the same way).
PARTIAL_BASE_LR = {"mae": "6.4e-2", "supervised": "8e-3", "scratch": "8e-3"}
# The tables read the last epoch's top-1 only. Scoring the 600 val images after every epoch took about a third of
# each fine-tuning stage, and each epoch reseeds its randomness, so evaluating once leaves the top-1 unchanged.
LAST_EPOCH_EVAL = ("TEST.EVAL_PERIOD", "0")
# check -> (tool, its extra overrides, the top-1 it writes into cls_results.json, column of demo_encoders.csv)
ENCODER_CHECKS: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "knn_eval": ("knn_eval", (), "knn_top1", "knn_top1"),
    # kNN on the mean of the patch tokens as well: the feature the kNN monitor of the pretraining reads
    # (configs/shapes/pretrain_*.yaml, since 2026-11-27) and the one both pretrainings train (MAE's fine-tuning
    # head and the supervised count head pool it), so the monitor's curve ends at a number of this table.
    "knn_eval_mean": ("knn_eval", ("KNN.POOL", "mean"), "knn_top1", "knn_mean_top1"),
    "linear_probe": ("linear_probe", (), "linear_top1", "linear_top1"),
    "finetune_cls": ("finetune_cls", LAST_EPOCH_EVAL, "finetune_top1", "finetune_top1"),
    "partial_finetune": ("finetune_cls", ("MODEL.TRAIN_BLOCKS", str(PARTIAL_BLOCKS), *LAST_EPOCH_EVAL),
                         "finetune_top1", "partial_finetune_top1"),
}
# kNN trains nothing: one run per init whatever the number of seeds (its value repeats on each seed's row). From a
# pretrained encoder it has no randomness; random init's encoder is drawn with SEED, and its one run is seed 0's.
ONE_RUN_CHECKS = frozenset({"knn_eval", "knn_eval_mean"})
ENCODER_COLUMNS = ("init", "seed", "knn_top1", "knn_mean_top1", "linear_top1", "finetune_top1",
                   "partial_finetune_top1", "heldout_count_accuracy", "heldout_presence_map", "heldout_count_loss",
                   "heldout_count_loss_constant")


def _feature(pool: str) -> str:
    """A kNN feature's name in the report: ``KNN.POOL`` "cls" or "mean"."""
    return "cls token" if pool == "cls" else "patch-token mean"


def encoder_seeds_note(seeds: int) -> str:
    """What the encoder table's cells are over ``seeds`` seeds (nothing to say for one)."""
    if seeds == 1:
        return ""
    return (f"; linear probe and fine-tunings: mean ± std over {seeds} seeds; kNN: one run per init, for random "
            "init the encoder drawn with seed 0 (`demo_encoders.csv` repeats it on every seed's row)")


def _seed_args(config: Path, args: Sequence[str], seed: int) -> list[str]:
    """``SEED`` override for a run of ``seed``: none where the config (with ``args``) already gives that seed, so
    that the seed-0 stages keep the commands, and hashes, that they had before seeds were added."""
    return [] if (_config_value(config, args, "SEED") or 0) == seed else ["SEED", str(seed)]


def check_key(kind: str, arm: str, seed: int = 0) -> str:
    """Stage key (and run directory) of one encoder check; seed 0 keeps the unseeded name of earlier runs."""
    return f"cls_{kind}_{arm}" + (f"_s{seed}" if seed and kind not in ONE_RUN_CHECKS else "")


def encoder_rows(paths: DemoPaths, seeds: int = 1) -> list[dict]:
    """Per init and seed: the classification checks' top-1 (%), and for the supervised baseline its held-out
    own-task metrics (%; one pretrained encoder, so the same on each of its rows)."""
    heldout = json.loads((paths.output / "supervised_heldout.json").read_text(encoding="utf-8"))
    rows = []
    for arm in ARMS:
        for seed in range(seeds):
            row = {"init": arm, "seed": seed}
            for kind, (_, _, metric, column) in ENCODER_CHECKS.items():
                result = paths.run(check_key(kind, arm, seed)) / "cls_results.json"
                row[column] = json.loads(result.read_text(encoding="utf-8"))[metric]
            for column, key in (("heldout_count_accuracy", "count_accuracy"), ("heldout_presence_map", "presence_map"),
                                ("heldout_count_loss", "count_loss"), ("heldout_count_loss_constant", "count_loss_constant")):
                row[column] = heldout.get(key, "") if arm == "supervised" else ""  # earlier runs lack the losses
            rows.append(row)
    return rows


def _counter(pattern: str, total: int = 0, offset: int = 0) -> Callable[[str], tuple[int, int] | None]:
    """A :attr:`Stage.progress` parser: group 1 of ``pattern`` (+ ``offset``) is done, group 2 (else ``total``) all."""
    regex = re.compile(pattern)

    def parse(line: str) -> tuple[int, int] | None:
        m = regex.search(line)
        if m is None:
            return None
        return int(m.group(1)) + offset, int(m.group(2)) if regex.groups > 1 else total

    return parse


def _config_value(config: Path, args: Sequence[str], key: str) -> Any:
    """``key`` (dotted, e.g. ``SOLVER.MAX_ITER``) of a run: the last command-line override, else the nearest config
    that sets it (None if neither does). Strings are parsed as yacs parses them: a Python literal if they are one."""
    def literal(value: Any) -> Any:
        try:
            return ast.literal_eval(value) if isinstance(value, str) else value
        except (ValueError, SyntaxError):
            return value

    for k, value in reversed(list(zip(args[::2], args[1::2]))):
        if k == key:
            return literal(value)
    *parents, leaf = key.split(".")
    for node in config_chain(config).values():  # the config itself first, then its bases
        for name in parents:
            node = node.get(name) or {}
        if leaf in node:
            return literal(node[leaf])
    return None


def _max_iter(config: Path, args: Sequence[str]) -> int:
    return int(_config_value(config, args, "SOLVER.MAX_ITER") or 0)


def _subset_schedule(config: Path, args: Sequence[str], fraction: float) -> list[str]:
    """Overrides that give a run on ``fraction`` of the labels the full run's epochs: iterations, warmup and the
    lr steps scaled by ``fraction`` (``args`` are the full run's overrides)."""
    def scaled(n: int) -> int:
        return max(1, round(n * fraction))

    steps = _config_value(config, args, "SOLVER.STEPS") or ()
    return ["SOLVER.MAX_ITER", str(scaled(_max_iter(config, args))),
            "SOLVER.WARMUP_ITERS", str(scaled(int(_config_value(config, args, "SOLVER.WARMUP_ITERS") or 0))),
            "SOLVER.STEPS", str(tuple(scaled(int(x)) for x in steps))]


def _scaled_epochs(config: Path, scale: int) -> list[str]:
    """``SOLVER.EPOCHS`` / ``SOLVER.WARMUP_EPOCHS`` overrides for ``scale`` times a pretraining config's schedule."""
    if scale == 1:
        return []
    from .config.pretrain import load_pretrain_cfg

    solver = load_pretrain_cfg(config, check_paths=False).SOLVER
    return ["SOLVER.EPOCHS", str(solver.EPOCHS * scale), "SOLVER.WARMUP_EPOCHS", str(solver.WARMUP_EPOCHS * scale)]


def _pretrain_result(run_dir: Path) -> str:
    s = pretrain_summary(run_dir)
    knn = "" if s["knn_top1"] is None else f", kNN top-1 {s['knn_top1']:.1f} %"
    return f"{s['epochs']} epochs, final loss {_num(s['loss'], 3)}{knn}"


def _ap_result(run_dir: Path) -> str:
    ap = json.loads((run_dir / "ap_results.json").read_text(encoding="utf-8"))
    return f"box AP {ap['bbox']['AP']:.1f}, mask AP {ap['segm']['AP']:.1f}"


def _pretrain_tag(pretrain_seed: int) -> str:
    """Name suffix of everything made from an encoder of ``pretrain_seed``; seed 0 keeps the untagged names of
    earlier runs."""
    return f"_p{pretrain_seed}" if pretrain_seed else ""


def pretrain_key(arm: str, pretrain_seed: int = 0) -> str:
    """Stage key (and run directory) of a pretraining run."""
    return f"pretrain_{arm}{_pretrain_tag(pretrain_seed)}"


def finetune_key(arm: str, seed: int, fraction: float = 1.0, pyramid: str | None = None,
                 pretrain_seed: int = 0) -> str:
    """Stage key (and run directory) of a Mask R-CNN run; the configs' pyramid and pretraining seed 0 have no tag."""
    return (f"finetune_{arm}" + (f"_{pyramid}" if pyramid else "") + _pretrain_tag(pretrain_seed) + f"_s{seed}" + ("" if fraction == 1.0 else f"_f{_pct(fraction)}"))


def subset_key(fraction: float) -> str:
    """Stage key of the nested labeled subset of ``fraction`` (< 1) of the train split."""
    return f"subset_f{_pct(fraction)}"


def heldout_file(paths: DemoPaths, pretrain_seed: int = 0) -> Path:
    """The supervised baseline's held-out own-task metrics of its encoder pretrained with ``pretrain_seed``."""
    return paths.output / f"supervised_heldout{_pretrain_tag(pretrain_seed)}.json"


def detection_pyramid(cfg_dir: Path) -> str:
    """``MODEL.VIT.PYRAMID`` of the demo's Mask R-CNN configs (one value: the inits differ only in their weights)."""
    values = {_config_value(cfg_dir / f"mask_rcnn_vit_{arm}.yaml", [], "MODEL.VIT.PYRAMID") for arm in ARMS}
    if len(values) != 1:
        raise DemoError(f"{cfg_dir}/mask_rcnn_vit_<init>.yaml: expected one MODEL.VIT.PYRAMID, got {sorted(values)}")
    return values.pop()


def build_stages(profile: Profile, paths: DemoPaths, seeds: int, log: Callable[[str], None] = print,
                 fractions: Sequence[float] = (1.0,), subset_seed: int = 0, semantic: bool = False,
                 precision: str = "auto", reference_pyramid: str | None = None,
                 pretrain_seeds: int = 1) -> list[Stage]:
    """The pipeline for ``profile`` with fine-tuning repeated over ``seeds`` seeds, on each labeled fraction of the
    train split (nested subsets drawn with ``subset_seed``; the same iterations for every fraction, or the same
    epochs with ``profile.subset_epochs``), with ``semantic`` UperNet on the semantic split from each init,
    ``seeds`` seeds each, and with ``reference_pyramid`` every init's Mask R-CNN again (every fraction, ``seeds``
    seeds) with that pyramid instead of the configs' one. With ``pretrain_seeds`` > 1 both pretrainings are
    repeated with ``SEED`` 1, 2, ..., each followed by its held-out check (supervised) and the all-label Mask
    R-CNN runs (``seeds`` seeds each); every other stage reads the seed-0 encoders. ``precision`` other than
    "auto" is forced on every training stage (the configs say "auto")."""
    if precision not in PRECISIONS:
        raise DemoError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if pretrain_seeds < 1:
        raise DemoError(f"--pretrain-seeds must be >= 1, got {pretrain_seeds}")
    if subset_seed < 0:  # numpy's generators take no negative seed
        raise DemoError(f"--subset-seed must be >= 0, got {subset_seed}")
    by_pct: dict[str, float] = {}
    for f in sorted(set(fractions) | {1.0}):  # a fraction's runs, subset file and report rows go by its percent
        if (first := by_pct.setdefault(_pct(f), f)) != f:
            raise DemoError(f"--label-fractions: {first:g} and {f:g} both round to {_pct(f)} %, which names their "
                            "runs; give fractions that differ in whole percent")
    cfg_dir = REPO / "configs" / "shapes"
    if reference_pyramid is not None:
        configured = detection_pyramid(cfg_dir)
        if reference_pyramid not in PYRAMIDS or reference_pyramid == configured:
            raise DemoError(f"--reference-pyramid: expected one of {sorted(set(PYRAMIDS) - {configured})} (the "
                            f"configs use {configured}), got {reference_pyramid!r}")
    opts = _data_opts(paths.data)
    knn = ["MONITOR.KNN.ENABLED", str(profile.knn_monitor)]
    # Appended only when forced, so that "auto" keeps the stage hashes (and finished outputs) of earlier runs.
    forced = [] if precision == "auto" else ["PRECISION", precision]
    forced_det = [] if precision == "auto" else ["SOLVER.PRECISION", precision]
    # The demo runs on CPU (README): the other tools' shapes configs say so, the pretraining configs leave "auto"
    # (cuda where visible). Not hashed: where no GPU is visible "auto" was cpu, and runs from then stay up to date.
    on_cpu = ["DEVICE", "cpu"]
    stages = [Stage(
        key="dataset", title=f"generate the shapes dataset ({paths.data})",
        params={"shapes": asdict(replace(profile.shapes, workers=0)), "root": str(paths.data)},
        outputs=[paths.data / "dataset_info.json"], run=lambda: _generate(paths.data, profile.shapes, log),
        current=lambda: holds_dataset(paths.data, profile.shapes),
    )]
    def pretrain(arm: str, pretrain_seed: int = 0) -> Stage:
        out = paths.run(pretrain_key(arm, pretrain_seed))
        config = cfg_dir / f"pretrain_{arm}.yaml"
        args = [*opts[arm], *knn, *_scaled_epochs(config, profile.pretrain_scale), *profile.pretrain_opts,
                *forced, *(["SEED", str(pretrain_seed)] if pretrain_seed else []), "OUTPUT_DIR", str(out)]
        return Stage(
            key=pretrain_key(arm, pretrain_seed),
            title=f"{'MAE' if arm == 'mae' else 'supervised'} pretraining"
            + (f", seed {pretrain_seed}" if pretrain_seed else ""),
            params={"config": config_chain(config), "args": args}, deps=["dataset"],
            outputs=[out / "encoder.pth", out / "metrics.jsonl", out / "run_info.json"],
            command=["tools/pretrain.py", "--config-file", str(config), *on_cpu, *args], resumable=True, out_dir=out,
            progress=_counter(r"epoch (\d+)/(\d+) done"), result=lambda: _pretrain_result(out),
        )

    subsets = paths.output / "subsets"

    def check(kind: str, arm: str, seed: int = 0) -> Stage:
        out = paths.run(check_key(kind, arm, seed))
        config = REPO / "configs" / "classification" / "shapes_finetune.yaml"
        cls = paths.data / "classification"
        weights = str(paths.run(f"pretrain_{arm}") / "encoder.pth") if arm != "scratch" else ""
        tool, extra, metric, _ = ENCODER_CHECKS[kind]
        args = ["DATA.TRAIN_ROOT", str(cls / "train"), "DATA.VAL_ROOT", str(cls / "val"), "DATA.NUM_WORKERS", "0",
                "MODEL.WEIGHTS", weights, *extra, *profile.cls_opts, *forced]
        if kind == "partial_finetune":
            schedule = {k: _config_value(config, args, k) * PARTIAL_EPOCH_SCALE
                        for k in ("SOLVER.EPOCHS", "SOLVER.WARMUP_EPOCHS")}
            args += [*(x for k, v in schedule.items() for x in (k, str(v))), "SOLVER.BASE_LR", PARTIAL_BASE_LR[arm]]
        args += [*_seed_args(config, args, seed), "OUTPUT_DIR", str(out)]
        params = {"config": config_chain(config), "args": args}
        if tool == "finetune_cls":
            # Its augmentation draws come per sample from (SEED, epoch, index) since 2026-12-04 (they came from the
            # loading process's stream before): outputs of earlier code are not this stage's result, so they rerun.
            params["augmentation_draws"] = "per_sample"
        return Stage(
            key=check_key(kind, arm, seed),
            title=f"{kind} on the classification split, {arm} init" + (f", seed {seed}" if seed else ""),
            params=params,
            deps=["dataset"] + ([f"pretrain_{arm}"] if arm != "scratch" else []),
            outputs=[out / "cls_results.json"],
            command=[f"tools/{tool}.py", "--config-file", str(config), *args],
            resumable=tool == "finetune_cls", out_dir=out,  # kNN and the linear probe have no --resume
            progress=_counter(r"epoch (\d+)/(\d+)") if tool == "finetune_cls" else None,
            result=lambda: f"{metric} {json.loads((out / 'cls_results.json').read_text())[metric]:.1f} %",
        )

    def train_net(key: str, title: str, config: Path, arm: str, seed: int, data_opts: list[str],
                  tool_opts: Sequence[str], deps: list[str], result_file: str, result: Callable[[Path], str],
                  pretrain_seed: int = 0) -> Stage:
        """A tools/train_net.py run from ``arm``'s encoder of ``pretrain_seed`` (none for scratch), after ``deps``."""
        out = paths.run(key)
        pretrained = arm != "scratch"
        encoder = pretrain_key(arm, pretrain_seed)
        weights = ["MODEL.WEIGHTS", str(paths.run(encoder) / "encoder.pth")] if pretrained else []
        args = [*data_opts, *weights, *tool_opts, *forced_det, "SEED", str(seed), "OUTPUT_DIR", str(out)]
        return Stage(
            key=key, title=title, params={"config": config_chain(config), "args": args},
            deps=deps[:1] + ([encoder] if pretrained else []) + deps[1:],
            outputs=[out / result_file, out / "run_info.json"],
            command=["tools/train_net.py", "--config-file", str(config), *args], resumable=True, out_dir=out,
            progress=_counter(r"\biter: (\d+)", total=_max_iter(config, args), offset=1),
            result=lambda: result(out),
        )

    def finetune(arm: str, seed: int, fraction: float = 1.0, pyramid: str | None = None,
                 pretrain_seed: int = 0) -> Stage:
        train_json = None if fraction == 1.0 else subsets / f"instances_train_{_pct(fraction)}pct_seed{subset_seed}.json"
        # Each run depends on its own subset only: another fraction added to the list leaves it up to date.
        deps = ["dataset"] + ([subset_key(fraction)] if fraction != 1.0 else [])
        data_opts = opts["finetune"] if train_json is None else _data_opts(paths.data, train_json)["finetune"]
        share = "" if fraction == 1.0 else f", {_pct(fraction)} % of the labels"
        config = cfg_dir / f"mask_rcnn_vit_{arm}.yaml"
        tool_opts = list(profile.finetune_opts)
        if profile.subset_epochs and fraction != 1.0:
            tool_opts += _subset_schedule(config, tool_opts, fraction)
        if pyramid is not None:
            tool_opts += ["MODEL.VIT.PYRAMID", pyramid]
        return train_net(
            finetune_key(arm, seed, fraction, pyramid, pretrain_seed),
            f"Mask R-CNN from {arm} init" + (f" (pretraining seed {pretrain_seed})" if pretrain_seed else "")
            + f", seed {seed}{share}" + (f", {pyramid} pyramid" if pyramid else "") + " (train + COCO eval)", config,
            arm, seed, data_opts, tool_opts, deps, "ap_results.json", _ap_result, pretrain_seed,
        )

    def segment(arm: str, seed: int) -> Stage:
        return train_net(
            f"semseg_{arm}_s{seed}", f"UperNet semantic segmentation from {arm} init, seed {seed}",
            cfg_dir / f"sem_seg_vit_{arm}.yaml", arm, seed, opts["semantic"], profile.semantic_opts,
            ["semantic_split"], SEG_FILE,
            lambda out: f"mIoU {json.loads((out / SEG_FILE).read_text())['sem_seg']['mIoU']:.1f}",
        )

    # List order is start priority: the random-init runs need no pretraining, so they fill the second core while
    # MAE pretrains, and the two pretrainings do not both hold the cores while nothing else can start.
    partial = sorted(f for f in set(fractions) if f != 1.0)

    def subset(fraction: float) -> Stage:
        # One permutation per subset seed: each subset written alone is the same file as written with the others.
        return Stage(
            key=subset_key(fraction), title=f"nested labeled subset {_pct(fraction)} % (subset seed {subset_seed})",
            params={"fraction": fraction, "seed": subset_seed}, deps=["dataset"],
            outputs=[subsets / f"instances_train_{_pct(fraction)}pct_seed{subset_seed}.json"],
            run=lambda: nested_subsets(paths.annotations("train"), subsets, [fraction], subset_seed),
        )

    stages += [subset(f) for f in partial]
    stages += [pretrain("mae"), *(finetune("scratch", s) for s in range(seeds)), pretrain("supervised")]
    stages += [finetune(arm, s) for s in range(seeds) for arm in PRETRAINED_ARMS]

    def supervised_eval(pretrain_seed: int = 0) -> Stage:
        heldout, encoder = heldout_file(paths, pretrain_seed), pretrain_key("supervised", pretrain_seed)
        return Stage(
            key=f"supervised_eval{_pretrain_tag(pretrain_seed)}",
            title="the supervised baseline's own task on the held-out val images"
            + (f", pretraining seed {pretrain_seed}" if pretrain_seed else ""),
            params={}, deps=[encoder], outputs=[heldout],
            run=lambda: atomic_write_text(heldout, json.dumps(evaluate_supervised(
                paths.run(encoder), paths.annotations("val"),
                paths.data / "images" / "val", paths.annotations("pool")), indent=1)),
            result=lambda: _supervised_result(heldout),
        )

    stages.append(supervised_eval())
    stages += [check(kind, arm) for arm in ARMS for kind in ENCODER_CHECKS]
    stages += [check(kind, arm, s) for s in range(1, seeds) for arm in ARMS for kind in ENCODER_CHECKS
               if kind not in ONE_RUN_CHECKS]
    stages += [finetune(arm, s, f) for f in reversed(partial) for s in range(seeds) for arm in ARMS]
    if reference_pyramid is not None:
        stages += [finetune(arm, s, f, pyramid=reference_pyramid) for f in [1.0, *reversed(partial)]
                   for s in range(seeds) for arm in ARMS]
    for p in range(1, pretrain_seeds):
        stages += [pretrain("mae", p), pretrain("supervised", p), supervised_eval(p)]
        stages += [finetune(arm, s, pretrain_seed=p) for s in range(seeds) for arm in PRETRAINED_ARMS]
    if semantic:
        stages.append(Stage(
            key="semantic_split", title="semantic label maps of the train and val splits",
            params={}, deps=["dataset"], outputs=[paths.data / "semantic" / "classes.txt"],
            run=lambda: write_semantic_split(paths.data, log=log),
        ))
        stages += [segment(arm, s) for s in range(seeds) for arm in ARMS]
    detections = paths.output / "detections.png"
    stages.append(Stage(
        key="detections", title="detections of each initialization on validation images",
        params={"n": profile.reconstructions}, deps=[f"finetune_{arm}_s0" for arm in ARMS], outputs=[detections],
        run=lambda: detections_figure(paths, paths.data / "images" / "val", detections, profile.reconstructions),
    ))
    recon = paths.output / "mae_reconstruction.png"
    stages.append(Stage(
        key="reconstruction", title="MAE reconstructions of validation images",
        params={"n": profile.reconstructions}, deps=["pretrain_mae"], outputs=[recon],
        run=lambda: reconstruction_figure(paths.run("pretrain_mae"), paths.data / "images" / "val", recon,
                                          profile.reconstructions),
    ))
    for stage in stages:
        stage.params = portable(stage.params, paths.roots)
    return stages


# ---------------------------------------------------------------------------------------------------- figures
DETECTION_SCORE = 0.5  # the figure draws detections from this score (COCO AP uses every detection)


def detections_figure(paths: DemoPaths, image_dir: Path, out: Path, n: int,
                      threshold: float = DETECTION_SCORE) -> None:
    """The first ``n`` validation images: ground truth, then the detections of each seed-0 model, one column each."""
    from .engine.predictor import side_by_side_detections  # builds Detectron2 models: import only when drawing

    runs = [(arm, str(paths.run(f"finetune_{arm}_s0") / "config.yaml"),
             str(paths.run(f"finetune_{arm}_s0") / "model_final.pth")) for arm in ARMS]
    side_by_side_detections(runs, sorted(image_dir.glob("*.png"))[:n], out, confidence_threshold=threshold,
                            ground_truth=paths.annotations("val"),
                            title=f"detections with score >= {threshold}, seed 0")


def operating_point_lines(paths: DemoPaths, seeds: int, score: float = DETECTION_SCORE) -> list[str]:
    """The report's table of what the figure shows, measured on every val image: objects found, found with the
    right class, and detections that are right, at the figure's score threshold (mean ± std over seeds)."""
    gt = json.loads(paths.annotations("val").read_text(encoding="utf-8"))
    points = {arm: [operating_point(gt, json.loads((paths.run(finetune_key(arm, s)) / "inference" /
                                                    "coco_instances_results.json").read_text(encoding="utf-8")),
                                    score=score) for s in range(seeds)] for arm in ARMS}
    first = points[ARMS[0]][0]

    def cell(arm: str, key: str) -> str:
        values = [p[key] for p in points[arm]]
        return "none" if None in values else _mean_std(values)

    return [
        f"The detector at the figure's threshold, on all {len(gt['images'])} val images ({first['objects']} "
        f"objects): detections with score >= {score}, matched to objects at box IoU >= {first['iou']} as COCOeval "
        f"matches them ({seeds} seed(s); `mae_det.evaluation.operating_point`):", "",
        "| init | objects found (%) | found with the right class (%) | detections that are right (%) | "
        "detections per image |", "|---|---:|---:|---:|---:|",
        *[f"| {arm} | {cell(arm, 'found')} | {cell(arm, 'found_right_class')} | {cell(arm, 'precision')} | "
          f"{_mean_std([p['detections'] / len(gt['images']) for p in points[arm]])} |" for arm in ARMS], "",
    ]


def last_checkpoint(pretrain_dir: Path) -> Path:
    """The full checkpoint (encoder + decoder) named by a pretraining run's ``last_checkpoint`` pointer."""
    pointer = pretrain_dir / "last_checkpoint"
    if not pointer.is_file():
        raise DemoError(f"{pointer} not found: the pretraining run in {pretrain_dir} wrote no checkpoint")
    return pretrain_dir / pointer.read_text(encoding="utf-8").strip()


def reconstruction_figure(pretrain_dir: Path, image_dir: Path, out: Path, n: int) -> None:
    """Reconstruction grids (original | masked | reconstruction | + visible) of the first ``n`` images of
    ``image_dir`` by the last checkpoint of a pretraining run, stacked into one PNG.

    The model is rebuilt from the run's resolved ``config.yaml``, so size overrides (patch 8, a narrow
    decoder) are honoured exactly, and images are masked at the ratio the run trained with; the drawing is
    :mod:`mae_det.utils.visualize`'s.
    """
    import tempfile

    from PIL import Image

    from .checkpoint import load_checkpoint
    from .config.pretrain import load_pretrain_cfg
    from .engine.pretrain import build_pretrain_model
    from .utils.visualize import load_image, reconstruct, save_grid

    ckpt_path = last_checkpoint(pretrain_dir)
    cfg = load_pretrain_cfg(pretrain_dir / "config.yaml")
    model = build_pretrain_model(cfg)
    model.load_state_dict(load_checkpoint(ckpt_path)["model"])
    model.eval()
    size = (cfg.MODEL.IMG_SIZE, cfg.MODEL.IMG_SIZE)
    mask_ratio = cfg.MODEL.MASK_RATIO
    generator = torch.Generator().manual_seed(0)
    target = "norm-pix: de-normalized with each patch's own mean/std" if cfg.MODEL.NORM_PIX_LOSS else "pixel targets"
    grids = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(sorted(image_dir.glob("*.png"))[:n]):
            noise = torch.rand(1, model.patch_embed.num_patches, generator=generator)
            panels = reconstruct(model, load_image(path, size, cfg.MODEL.IN_CHANS), mask_ratio, noise,
                                 cfg.DATA.MEAN, cfg.DATA.STD)
            grid_path = Path(tmp) / f"{i}.png"
            save_grid(panels, grid_path, f"{path.name} | {ckpt_path.name} | mask {mask_ratio:.0%} | "
                                         f"loss {panels['loss']:.3f} | {target}")
            grids.append(Image.open(grid_path).convert("RGB"))
    if not grids:
        raise DemoError(f"no PNG images in {image_dir} to reconstruct")
    canvas = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white")
    y = 0
    for g in grids:
        canvas.paste(g, (0, y))
        y += g.height
    canvas.save(out)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a pretraining ``metrics.jsonl`` (lines cut short by a kill are ignored)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def curves_figure(runs: dict[str, Path], out: Path) -> bool:
    """Pretraining loss (left) and kNN top-1 of the monitor (right) per epoch, for each run; False if no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(11, 4))
    any_knn, lines = False, []
    for name, d in runs.items():
        records = read_metrics(d / "metrics.jsonl")
        train = [r for r in records if r.get("type") == "train" and "loss" in r]
        epochs = [r for r in records if r.get("type") == "epoch"]
        ax = ax_loss if name == "mae" else ax_loss.twinx()  # the two losses have different scales
        lines += ax.plot([r["epoch"] for r in train], [r["loss"] for r in train],
                         color="C0" if name == "mae" else "C1", label=f"{name} loss")
        ax.set_ylabel("MAE loss (norm-pix MSE)" if name == "mae" else "supervised loss (cross-entropy)")
        knn = [(r["epoch"], r["knn_top1"]) for r in epochs if r.get("knn_top1") is not None]
        if knn:
            any_knn = True
            ax_knn.plot(*zip(*knn), marker="o", color="C0" if name == "mae" else "C1", label=name)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("pretraining loss")
    ax_loss.legend(lines, [line.get_label() for line in lines], fontsize=8)
    ax_knn.set_xlabel("epoch")
    ax_knn.set_ylabel("kNN top-1 (%)")
    ax_knn.set_title("kNN top-1 on the classification split (monitor)")
    ax_knn.grid(alpha=0.3)
    if any_knn:
        ax_knn.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return any_knn


# ----------------------------------------------------------------------------------------------------- report
def chance_loss(coco_json: Path, max_count: int = 0) -> float:
    """Loss of the best constant prediction on the labels of a COCO json: what a supervised run that learned
    nothing reaches. Multi-hot labels (``max_count`` 0): the BCE of each class's image frequency; count labels: the
    cross-entropy of each class's count distribution (counts capped at ``max_count``); averaged over classes."""
    per_image = list(class_counts(json.loads(coco_json.read_text(encoding="utf-8"))).values())  # (images, K)
    return constant_loss(per_image, per_image, max_count or 1)  # presence is a count capped at 1


def pretrain_summary(run_dir: Path) -> dict[str, Any]:
    """Epochs, final epoch loss and last kNN top-1 (None without monitor) of a pretraining run."""
    epochs = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("type") == "epoch"]
    knn = [r["knn_top1"] for r in epochs if r.get("knn_top1") is not None]
    return {"epochs": epochs[-1]["epoch"] if epochs else 0, "loss": epochs[-1]["loss"] if epochs else None,
            "knn_top1": knn[-1] if knn else None}


def _verdict(groups: list, metric: str, name: str) -> str:
    """One honest sentence: MAE against the other arms on ``metric``, with the seed spread when there is one."""
    by = {g.group: g for g in groups}
    mae = by.get("mae")
    if mae is None or mae.stats.get(metric) is None:
        return f"- {name}: no MAE result."
    parts = []
    for other in ("scratch", "supervised"):
        g = by.get(other)
        if g is None or g.stats.get(metric) is None:
            continue
        d = mae.stats[metric].mean - g.stats[metric].mean
        spread = max((s.std or 0.0) for s in (mae.stats[metric], g.stats[metric]))
        if mae.stats[metric].n < 2 or g.stats[metric].n < 2:
            note = "; one seed: no spread measured"
        elif abs(d) <= spread:
            note = f"; within the seed std {spread:.1f}: not a clear difference"
        else:
            note = f"; seed std {spread:.1f}"
        word = "tied with" if format_delta(d) == "+0.0" else "beat" if d > 0 else "did not beat"
        parts.append(f"MAE {word} {other} init ({format_delta(d)} AP{note})")
    return f"- {name} ({header(metric)}): " + "; ".join(parts) + "."


def _mean_std(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}"
    m = sum(values) / len(values)
    return f"{m:.1f} ± {math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)):.1f}"


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


EXPERIMENT_COLUMNS = ("init", "seed", "label_fraction", "num_labeled", "box_AP", "box_AP50", "mask_AP", "mask_AP50")


def _num_labeled(paths: DemoPaths, fraction: float, subset_seed: int) -> int:
    """Labeled train images behind ``fraction`` (the whole split, or its nested subset)."""
    coco = paths.annotations("train") if fraction == 1.0 else (
        paths.output / "subsets" / f"instances_train_{_pct(fraction)}pct_seed{subset_seed}.json")
    return len(json.loads(coco.read_text())["images"])


def experiment_rows(paths: DemoPaths, seeds: int, fractions: Sequence[float], subset_seed: int) -> list[dict]:
    """One row per init x seed x label fraction (COCO AP in %), in :data:`EXPERIMENT_COLUMNS` order."""
    rows = []
    for f in sorted(set(fractions), reverse=True):
        n = _num_labeled(paths, f, subset_seed)
        for arm in ARMS:
            for s in range(seeds):
                ap = json.loads((paths.run(finetune_key(arm, s, f)) / "ap_results.json").read_text())
                rows.append(dict(zip(EXPERIMENT_COLUMNS, (
                    arm, s, f, n, ap["bbox"]["AP"], ap["bbox"]["AP50"], ap["segm"]["AP"], ap["segm"]["AP50"]))))
    return rows


def _margin(mine: Sequence[float], theirs: Sequence[float], unit: str) -> str:
    """MAE's mean margin over another arm's runs, and whether every MAE ``unit`` (seed, run) beats every one of
    theirs."""
    every = f"every MAE {unit} above every {unit}" if min(mine) > max(theirs) else f"not every MAE {unit} above"
    return f"{format_delta(sum(mine) / len(mine) - sum(theirs) / len(theirs))}, {every}"


PYRAMID_COLUMNS = ("init", "pyramid", "seed", "label_fraction", "num_labeled", "box_AP", "mask_AP")


def pyramid_rows(paths: DemoPaths, seeds: int, fractions: Sequence[float], subset_seed: int, configured: str,
                 reference: str) -> list[dict]:
    """One row per label fraction x init x pyramid x seed of the Mask R-CNN runs (COCO AP in %)."""
    rows = []
    for f in sorted(set(fractions), reverse=True):
        n = _num_labeled(paths, f, subset_seed)
        for arm in ARMS:
            for pyramid, tag in ((configured, None), (reference, reference)):
                for s in range(seeds):
                    ap = json.loads((paths.run(finetune_key(arm, s, f, pyramid=tag)) / "ap_results.json").read_text())
                    rows.append(dict(zip(PYRAMID_COLUMNS,
                                         (arm, pyramid, s, f, n, ap["bbox"]["AP"], ap["segm"]["AP"]))))
    return rows


def _pyramid_section(paths: DemoPaths, rows: list[dict], seeds: int, configured: str, reference: str) -> list[str]:
    """The report's check of the pyramid choice from :func:`pyramid_rows`: every init with both pyramids at every
    label fraction, and MAE's margin when each init gets its best one (per fraction and metric); writes
    ``demo_pyramid.csv``."""
    write_csv(paths.output / "demo_pyramid.csv", PYRAMID_COLUMNS, rows)
    labeled = {r["label_fraction"]: r["num_labeled"] for r in rows}

    def values(f: float, arm: str, pyramid: str, metric: str) -> list[float]:
        return [r[metric] for r in rows
                if r["label_fraction"] == f and r["init"] == arm and r["pyramid"] == pyramid]

    def best(f: float, arm: str, metric: str) -> str:
        return max((configured, reference), key=lambda p: sum(values(f, arm, p, metric)))

    margins = []
    for f, n in labeled.items():
        for metric, name in (("box_AP", "box AP"), ("mask_AP", "mask AP")):
            mae = best(f, "mae", metric)
            mine = values(f, "mae", mae, metric)
            parts = []
            for other in ("scratch", "supervised"):
                theirs = values(f, other, best(f, other, metric), metric)
                parts.append(f"{other} init ({best(f, other, metric)}, {_mean_std(theirs)}): "
                             f"{_margin(mine, theirs, 'seed')}")
            margins.append(f"- {n} labels, {name}: MAE ({mae}, {_mean_std(mine)}) against " + "; ".join(parts) + ".")
    cell = " | ".join(f"{p} box AP | {p} mask AP" for p in (configured, reference))
    return [
        "## Pyramid check", "",
        f"The same Mask R-CNN runs with the `{reference}` pyramid instead of the configs' `{configured}`, at every "
        f"label fraction, {seeds} seed(s) each, so that no init is compared through a design that suits only MAE. "
        "Rows: `demo_pyramid.csv`.", "",
        f"| labeled images | init | {cell} |", "|---:|---|---:|---:|---:|---:|",
        *[f"| {n} | {arm} | " + " | ".join(_mean_std(values(f, arm, p, m)) for p in (configured, reference)
                                           for m in ("box_AP", "mask_AP")) + " |"
          for f, n in labeled.items() for arm in ARMS], "",
        "Each init with its best pyramid (by mean, per label fraction and metric):", "", *margins, "",
    ]


PRETRAIN_SEED_COLUMNS = ("init", "pretrain_seed", "seed", "box_AP", "mask_AP")


def pretrain_seed_rows(paths: DemoPaths, seeds: int, pretrain_seeds: int) -> list[dict]:
    """One row per init x pretraining seed x fine-tuning seed of the all-label Mask R-CNN runs (COCO AP in %);
    random init has no pretraining seed (empty)."""
    rows = []
    for arm in ARMS:
        for p in range(pretrain_seeds) if arm in PRETRAINED_ARMS else [""]:
            for s in range(seeds):
                ap = json.loads((paths.run(finetune_key(arm, s, pretrain_seed=p or 0)) / "ap_results.json").read_text())
                rows.append(dict(zip(PRETRAIN_SEED_COLUMNS, (arm, p, s, ap["bbox"]["AP"], ap["segm"]["AP"]))))
    return rows


def _pretrain_seed_section(paths: DemoPaths, seeds: int, pretrain_seeds: int) -> list[str]:
    """The report's spread over pretraining seeds: each encoder's Mask R-CNN runs, MAE's margin over all runs of
    the other arms, and the supervised baseline's held-out metrics per encoder; writes ``demo_pretrain_seeds.csv``."""
    rows = pretrain_seed_rows(paths, seeds, pretrain_seeds)
    write_csv(paths.output / "demo_pretrain_seeds.csv", PRETRAIN_SEED_COLUMNS, rows)

    def values(arm: str, metric: str, p: int | str | None = None) -> list[float]:
        return [r[metric] for r in rows if r["init"] == arm and p in (None, r["pretrain_seed"])]

    table = [f"| {arm} | {'all' if p is None else p} | {_mean_std(values(arm, 'box_AP', p))} | "
             f"{_mean_std(values(arm, 'mask_AP', p))} |" for arm in PRETRAINED_ARMS for p in [*range(pretrain_seeds), None]]
    return [
        "## Pretraining seeds", "",
        f"Both pretrainings repeated with `SEED` 0 to {pretrain_seeds - 1} (weight init, masks, data order), each "
        f"encoder fine-tuned on all labels with {seeds} seed(s); random init has no pretraining. Rows: "
        "`demo_pretrain_seeds.csv`.", "",
        "| init | pretraining seed | box AP | mask AP |", "|---|---|---:|---:|",
        *table,
        f"| scratch | - | {_mean_std(values('scratch', 'box_AP'))} | {_mean_std(values('scratch', 'mask_AP'))} |", "",
        "MAE over all its runs against every run of the other inits:", "",
        *[f"- {name}: " + "; ".join(f"{other} init {_margin(values('mae', metric), values(other, metric), 'run')}"
                                    for other in ("scratch", "supervised")) + "."
          for metric, name in (("box_AP", "box AP"), ("mask_AP", "mask AP"))], "",
        "The supervised baseline on its own task, per pretraining seed:", "",
        *[f"- seed {p}: {_supervised_result(heldout_file(paths, p))}." for p in range(pretrain_seeds)], "",
    ]


SEMANTIC_COLUMNS = ("init", "seed", "mIoU", "pixel_acc")


def semantic_rows(paths: DemoPaths, seeds: int) -> list[dict]:
    """One row per init x seed of the UperNet runs (mIoU and pixel accuracy in %, background included)."""
    rows = []
    for arm in ARMS:
        for s in range(seeds):
            seg = json.loads((paths.run(f"semseg_{arm}_s{s}") / SEG_FILE).read_text())["sem_seg"]
            rows.append(dict(zip(SEMANTIC_COLUMNS, (arm, s, seg["mIoU"], seg["pACC"]))))
    return rows


def _semantic_section(paths: DemoPaths, seeds: int, profile: Profile) -> list[str]:
    """The report's semantic-segmentation section; writes ``demo_semantic.csv`` and ``sem_seg_table.*``."""
    rows = semantic_rows(paths, seeds)
    write_csv(paths.output / "demo_semantic.csv", SEMANTIC_COLUMNS, rows)
    labels = {str(paths.run(f"semseg_{arm}_s{s}")): arm for arm in ARMS for s in range(seeds)}
    table = compare(list(labels), paths.output, labels=labels,
                    baseline="scratch", name="sem_seg_table", title="UperNet on the shapes semantic split")
    classes = (paths.data / "semantic" / "classes.txt").read_text(encoding="utf-8").split()
    return [
        "## Semantic segmentation (UperNet)", "",
        f"The same three encoders under UperNet on the semantic split ({len(classes)} classes, background = class 0 "
        f"and counted in mIoU), `configs/shapes/sem_seg_vit_<init>.yaml` + `{' '.join(profile.semantic_opts) or '-'}`, "
        f"{seeds} seed(s) each; per-class IoU in each run's `{SEG_FILE}`. Rows: `demo_semantic.csv`.", "",
        "| init | mIoU (%) | pixel accuracy (%) |", "|---|---:|---:|",
        *[f"| {arm} | {_mean_std([r['mIoU'] for r in rows if r['init'] == arm])} | "
          f"{_mean_std([r['pixel_acc'] for r in rows if r['init'] == arm])} |" for arm in ARMS], "",
        *([f"![mIoU chart]({table['chart'].name})", ""] if "chart" in table else []),  # no chart: no mIoU at all
    ]


def write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:  # percentages to 2 decimals, losses (nats, below 1 here) to 3
        w.writerow({k: (f"{v:.3f}" if "loss" in k else f"{v:.2f}") if isinstance(v, float) and k != "label_fraction"
                    else v for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def label_efficiency_figure(rows: list[dict], out: Path, reference: Sequence[dict] = ()) -> list[str]:
    """Box and mask AP against the number of labeled images, one line per init, mean and std over seeds; with
    ``reference`` (:func:`pyramid_rows` of the other pyramid) a dashed line per init for it too. Returns the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lines = [(rows, "-", "o", "")] + [([r for r in reference if r["pyramid"] == p], "--", "s", f", {p} pyramid")
                                      for p in sorted({r["pyramid"] for r in reference})]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, name in zip(axes, ("box_AP", "mask_AP"), ("box AP", "mask AP")):
        for k, arm in enumerate(ARMS):
            for runs, style, marker, tag in lines:
                ns = sorted({r["num_labeled"] for r in runs if r["init"] == arm})
                vals = [[r[metric] for r in runs if r["init"] == arm and r["num_labeled"] == n] for n in ns]
                ax.errorbar(ns, [np.mean(v) for v in vals], capsize=4, color=f"C{k}", linestyle=style, marker=marker,
                            yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals], label=f"{arm} init{tag}",
                            markerfacecolor="none" if tag else f"C{k}")
        ns = sorted({r["num_labeled"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("labeled training images (nested subsets)")
        ax.set_ylabel(f"{name} (COCO, %)")
        ax.set_title(f"{name} vs labels (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7 if reference else 8)
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return legend


def _augmentation(input_cfg: dict) -> str:
    """The training augmentation of a detection run's saved config, in words."""
    flip = input_cfg.get("RANDOM_FLIP", "horizontal")
    flips = "no flips" if flip == "none" else f"{flip} flips"
    lsj = input_cfg.get("LSJ", {})
    if lsj.get("ENABLED"):
        return f"Large Scale Jitter {lsj['MIN_SCALE']}-{lsj['MAX_SCALE']} of {lsj['IMAGE_SIZE']} px, {flips}"
    return f"shortest-edge resize to {input_cfg['MIN_SIZE_TRAIN']} px, {flips}"


def _efficiency_section(paths: DemoPaths, rows: list[dict], pyramids: list[dict], reference: str | None,
                        seeds: int, subset_seed: int, schedule: str) -> list[str]:
    """The report's label-efficiency section from :func:`experiment_rows` (``schedule``: the fine-tuning's
    iterations in words) and its figure, with the ``reference`` pyramid's :func:`pyramid_rows` dashed (the
    pyramid check's section comes before this one)."""
    label_efficiency_figure(rows, paths.output / "label_efficiency.png",
                            [r for r in pyramids if r["pyramid"] == reference])
    return [
        "## Label efficiency", "",
        f"Each init fine-tuned on nested subsets of the train split (subset seed {subset_seed}, separate from the "
        f"fine-tuning seeds; {schedule}), {seeds} seed(s) each. Rows: `demo_experiment.csv`.", "",
        "| init | labeled images | box AP | mask AP |", "|---|---:|---:|---:|",
        *[f"| {arm} | {n} | {_mean_std([r['box_AP'] for r in g])} | {_mean_std([r['mask_AP'] for r in g])} |"
          for arm in ARMS for n in sorted({r['num_labeled'] for r in rows}, reverse=True)
          if (g := [r for r in rows if r["init"] == arm and r["num_labeled"] == n])], "",
        "![Label efficiency](label_efficiency.png)", "",
        *([f"Dashed: the same runs with the `{reference}` pyramid (the pyramid check above).", ""]
          if pyramids else []),
    ]


def _machine_words(machine: dict[str, Any], torch_version: str) -> str:
    return (f"{machine['cpu']} (torch CPU kernels {machine['cpu_capability']}, bf16 "
            f"{'native' if machine['cpu_bf16_native'] else 'not native'}) with {machine['cpu_count']} CPU cores, "
            f"torch {torch_version}")


def trained_on(run_dirs: Iterable[Path]) -> str:
    """The machine(s) that trained the runs in ``run_dirs``, in words, from the ``run_info.json`` each tool wrote
    (a resumed run's names the machine that finished it), with the number of runs on each where they differ; this
    machine where no run has one. The runs' numbers depend on it (bf16 kernels differ between CPU kinds), and a
    report rewritten on another machine must still name theirs."""
    machines: dict[str, int] = {}
    for d in run_dirs:
        try:
            info = json.loads((d / "run_info.json").read_text(encoding="utf-8"))
            words = _machine_words(info["machine"], info["versions"]["torch"])
        except (OSError, ValueError, KeyError, TypeError):  # no run there (in-process stages), or not one of ours
            continue
        machines[words] = machines.get(words, 0) + 1
    if len(machines) < 2:
        return next(iter(machines), None) or _machine_words(machine_info(), torch.__version__)
    return "; ".join(f"{words} ({n} run{'s' if n > 1 else ''})" for words, n in machines.items())


def write_report(
    profile: Profile, paths: DemoPaths, runner: StageRunner, seeds: int, argv: Sequence[str], total_s: float,
    fractions: Sequence[float] = (1.0,), subset_seed: int = 0, semantic: bool = False, precision: str = "auto",
    reference_pyramid: str | None = None, pretrain_seeds: int = 1,
) -> Path:
    """Comparison table and chart, curves and label-efficiency figures, ``demo_experiment.csv`` and ``REPORT.md``
    in the output directory."""
    run_dirs = [paths.run(f"finetune_{arm}_s{s}") for s in range(seeds) for arm in ARMS]
    labels = {str(d): arm for s in range(seeds) for arm, d in zip(ARMS, run_dirs[s * 3:(s + 1) * 3])}
    table = compare(run_dirs, paths.output, labels=labels, baseline="scratch",
                    title=f"Mask R-CNN on the shapes dataset, {profile.name} profile")
    groups = aggregate(collect_runs(run_dirs, labels)[0])
    curves = paths.output / "pretrain_curves.png"
    has_knn = curves_figure({arm: paths.run(f"pretrain_{arm}") for arm in PRETRAINED_ARMS}, curves)
    pre_cfg = yaml.safe_load((paths.run("pretrain_mae") / "config.yaml").read_text(encoding="utf-8"))
    det_cfg = yaml.safe_load((run_dirs[0] / "config.yaml").read_text(encoding="utf-8"))
    info = json.loads((paths.data / "dataset_info.json").read_text(encoding="utf-8"))
    table_md = table["markdown"].read_text(encoding="utf-8").split("\n", 2)[2]  # without its title line
    # The supervised run's own config: its label kind (MODEL.MAX_COUNT) is not in the MAE config.
    sup_cfg = yaml.safe_load((paths.run("pretrain_supervised") / "config.yaml").read_text(encoding="utf-8"))
    sup_model = sup_cfg["MODEL"]
    M, S, V = pre_cfg["MODEL"], pre_cfg["SOLVER"], det_cfg["MODEL"]["VIT"]
    D = det_cfg["SOLVER"]
    mae, sup = (pretrain_summary(paths.run(f"pretrain_{arm}")) for arm in PRETRAINED_ARMS)
    rows = experiment_rows(paths, seeds, fractions, subset_seed)
    write_csv(paths.output / "demo_experiment.csv", EXPERIMENT_COLUMNS, rows)
    encoders = encoder_rows(paths, seeds)
    write_csv(paths.output / "demo_encoders.csv", ENCODER_COLUMNS, encoders)
    one_run = {ENCODER_CHECKS[kind][3] for kind in ONE_RUN_CHECKS}

    def encoder_cell(arm: str, column: str) -> str:
        values = [r[column] for r in encoders if r["init"] == arm]
        return _mean_std(values[:1] if column in one_run else values)  # repeated on every seed's row: no spread

    pyramids = (pyramid_rows(paths, seeds, fractions, subset_seed, V["PYRAMID"], reference_pyramid)
                if reference_pyramid else [])
    efficiency = []
    if len(set(fractions)) > 1:
        epochs = D["MAX_ITER"] * D["IMS_PER_BATCH"] / info["counts"]["train"]
        schedule = (f"{epochs:g} epochs whatever the subset size: " + ", ".join(
            f"{max(1, round(D['MAX_ITER'] * f))} iterations on {_pct(f)} %" for f in sorted(set(fractions), reverse=True))
            if profile.subset_epochs else f"{D['MAX_ITER']} iterations whatever the subset size")
        efficiency = _efficiency_section(paths, rows, pyramids, reference_pyramid, seeds, subset_seed, schedule)
    max_count = sup_model.get("MAX_COUNT", 0)
    sup_loss = (f"{'cross-entropy over per-class counts' if max_count else 'BCE'}; a constant prediction scores "
                f"{chance_loss(paths.annotations('pool'), max_count):.3f}")
    trained_in = ("auto (bf16 where the CPU has it natively, else fp32)" if precision == "auto"
                  else f"{precision} (forced)")
    lines = [
        f"# mae_det embedded demo: {profile.name} profile", "",
        f"Command: `{' '.join(['python', 'tools/demo.py', *argv])}`  ",
        f"Finished {datetime.now(timezone.utc).isoformat(timespec='seconds')} ({runner.jobs} training runs at a time, "
        f"{os.environ.get('OMP_NUM_THREADS', runner.threads)} thread(s) each); trained on "
        f"{trained_on(paths.run(key) for key in runner.wall)}, training precision {trained_in}.  ",
        f"Total wall time of this invocation: {_fmt_time(total_s)} (stages skipped as up to date count 0).", "",
        "## Result", "",
        f"Mask R-CNN fine-tuned on the train split ({info['counts']['train']} labeled images) from three "
        f"initializations of the same ViT, same schedule; COCO AP on the val split over {seeds} seed(s):", "",
        _verdict(groups, "bbox/AP", "boxes"), _verdict(groups, "segm/AP", "masks"), "",
        table_md.replace("## ", "### "),
        "![AP chart](ap_table.png)", "",
        f"The supervised baseline on its own task, {_supervised_result(paths.output / 'supervised_heldout.json')} "
        "(val images it never saw).", "",
        *(_pyramid_section(paths, pyramids, seeds, V["PYRAMID"], reference_pyramid) if reference_pyramid else []),
        *(_pretrain_seed_section(paths, seeds, pretrain_seeds) if pretrain_seeds > 1 else []),
        *efficiency,
        *(_semantic_section(paths, seeds, profile) if semantic else []),
        "## Encoder checks on the classification split", "",
        f"Single-object images, {len(info['classes'])} classes (chance {100 / len(info['classes']):.1f} %), "
        f"{info['counts']['cls_train']} train / {info['counts']['cls_val']} val; "
        "`configs/classification/shapes_finetune.yaml`"
        + (f" + `{' '.join(profile.cls_opts)}`" if profile.cls_opts else "")
        + encoder_seeds_note(seeds)
        + ". Rows: `demo_encoders.csv`.", "",
        f"| init | kNN top-1, {_feature('cls')} (%) | kNN top-1, {_feature('mean')} (%) | linear top-1 (%) | "
        f"fine-tune top-1 (%) | partial fine-tune, last {PARTIAL_BLOCKS} blocks (%) |", "|---|---:|---:|---:|---:|---:|",
        *["| " + " | ".join([arm, *(encoder_cell(arm, c) for *_, c in ENCODER_CHECKS.values())]) + " |"
          for arm in ARMS], "",
        "## Detections", "",
        *operating_point_lines(paths, seeds),
        f"The ground truth and the first validation images through the seed-0 model of each initialization "
        f"(detections with score >= {DETECTION_SCORE}; one color per class).", "",
        "![Detections](detections.png)", "",
        "## MAE reconstructions", "",
        f"Validation images the pretraining never saw: original | {M['MASK_RATIO'] * 100:g} % masked (the "
        "pretraining's ratio) | reconstruction | reconstruction with the visible patches pasted back.", "",
        "![MAE reconstructions](mae_reconstruction.png)", "",
        "## Pretraining curves", "",
        "Loss of both pretraining runs" + (" and the kNN top-1 of the monitor on the single-object classification "
                                           f"split ({_feature(pre_cfg['MONITOR']['KNN']['POOL'])} of a center "
                                           "crop)" if has_knn else " (the kNN monitor was off)") + ".", "",
        "| run | epochs | final loss | last kNN top-1 (%) |", "|---|---:|---:|---:|",
        f"| MAE | {mae['epochs']} | {_num(mae['loss'], 3)} (norm-pix MSE) | {_num(mae['knn_top1'], 1)} |",
        f"| supervised | {sup['epochs']} | {_num(sup['loss'], 3)} ({sup_loss}) | {_num(sup['knn_top1'], 1)} |", "",
        f"kNN chance level: {100 / len(info['classes']):.1f} %.", "",
        "![Pretraining curves](pretrain_curves.png)", "",
        "## Settings", "",
        "| what | value |", "|---|---|",
        f"| dataset | {info['image_size']} px, {len(info['classes'])} classes; pool {info['counts']['pool']} images "
        f"(unlabeled for MAE), train {info['counts']['train']} images / {info['instances']['train']} instances, val "
        f"{info['counts']['val']} / {info['instances']['val']}; seed {info['seed']} |",
        f"| encoder | ViT {V['EMBED_DIM']}-d, {V['DEPTH']} blocks, {V['NUM_HEADS']} heads, patch {V['PATCH_SIZE']} |",
        f"| MAE pretraining | {S['EPOCHS']} epochs, batch {S['BATCH_SIZE']}, base lr {S['BASE_LR']}, mask ratio "
        f"{M['MASK_RATIO']}, norm-pix {M['NORM_PIX_LOSS']}, decoder {M['DECODER_EMBED_DIM']}-d x "
        f"{M['DECODER_DEPTH']} |",
        f"| supervised pretraining | same encoder, images and optimizer (AdamW), {sup['epochs']} epochs (about the MAE "
        f"run's compute), batch {sup_cfg['SOLVER']['BATCH_SIZE']}, base lr {sup_cfg['SOLVER']['BASE_LR']}; "
        + (f"per-class instance counts of each pool image (softmax over 0..{max_count}), never boxes or masks |"
           if max_count else "multi-label BCE on the per-image multi-hot shape labels |"),
        f"| Mask R-CNN | {D['MAX_ITER']} iterations, batch {D['IMS_PER_BATCH']}, AdamW lr {D['BASE_LR']}, layer decay "
        f"{D['LAYER_DECAY']}, {V['PYRAMID']} pyramid ({V['OUT_CHANNELS']} channels), "
        f"{det_cfg['MODEL']['ROI_HEADS']['BATCH_SIZE_PER_IMAGE']} RoIs/image, {_augmentation(det_cfg['INPUT'])} |",
        f"| configs | `configs/shapes/*.yaml`, pretraining epochs x {profile.pretrain_scale}, profile overrides "
        f"`{' '.join(profile.pretrain_opts) or '-'}` / "
        f"`{' '.join(profile.finetune_opts) or '-'}` |", "",
        "## Time per stage", "",
        f"Up to {runner.jobs} training runs overlap, so the stages add up to more than the total "
        f"({_fmt_time(total_s)}). CPU time is the stage's processes' user + system time: on a machine shared with "
        "other work it stays close to what an idle machine needs, while wall time grows.", "",
        "| stage | this invocation | wall time | CPU time |", "|---|---|---:|---:|",
    ]
    lines += [f"| {title} | {status} | {_fmt_time(wall)} | {_fmt_time(cpu)} |"
              for title, wall, cpu, status in runner.wall.values()]
    lines += ["", f"Logs: `{paths.output / 'logs'}`; per-run outputs: `{paths.output}/<stage>/`.", ""]
    report = paths.output / "REPORT.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def demo_paths(profile_name: str, output: str | os.PathLike | None = None,
               data_root: str | os.PathLike | None = None) -> DemoPaths:
    """The folders of a run: ``output`` and ``data_root`` relative to the working directory, their defaults
    (``output/demo`` for "full", else ``output/demo_<profile>``; ``datasets/shapes/<profile>``) in the checkout.

    Raises:
        DemoError: a folder, or a folder above it, exists as something else (a file).
    """
    default_out = "output/demo" if profile_name == "full" else f"output/demo_{profile_name}"
    folders = []
    for flag, value, default in (("--output", output, default_out),
                                 ("--data-root", data_root, f"datasets/shapes/{profile_name}")):
        path = Path(value).resolve() if value else (REPO / default).resolve()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise DemoError(f"{flag}: {existing} exists and is not a folder")
        folders.append(path)
    return DemoPaths(*folders)


def run_demo(profile_name: str, seeds: int = 1, output: str | os.PathLike | None = None,
             data_root: str | os.PathLike | None = None, jobs: int = 2, argv: Sequence[str] = (),
             fractions: Sequence[float] = (1.0,), subset_seed: int = 0, semantic: bool = False,
             precision: str = "auto", reference_pyramid: str | None = None, pretrain_seeds: int = 1) -> Path:
    """Run (or resume) the whole demo; returns the path of ``REPORT.md``.

    Args:
        profile_name: A key of :data:`PROFILES`.
        seeds: Fine-tuning runs per initialization.
        output: Report directory, relative to the working directory (default ``output/demo`` for "full",
            ``output/demo_<profile>`` otherwise, in the checkout).
        data_root: Dataset directory, relative to the working directory (default ``datasets/shapes/<profile>`` in
            the checkout); holding anything but a shapes dataset it is an error, never overwritten.
        jobs: Tool stages run at once; each gets ``cpu_count // jobs`` threads (unless OMP_NUM_THREADS is set).
        argv: The command line, for the report.
        fractions: Labeled fractions of the train split to fine-tune on (1.0 always included).
        subset_seed: Seed of the nested subsets (independent of the fine-tuning seeds).
        semantic: Also train UperNet on the semantic split from each init, ``seeds`` seeds each.
        precision: One of :data:`PRECISIONS`, forced on every training stage unless "auto".
        reference_pyramid: Also fine-tune every init (every label fraction, ``seeds`` seeds) with this pyramid
            instead of the configs' one, and report MAE's margin with each init at its best pyramid.
        pretrain_seeds: Pretrain each arm this many times (``SEED`` 0, 1, ...) and fine-tune every encoder on all
            labels, ``seeds`` seeds each; the report adds the spread over pretraining seeds.

    Raises:
        DemoError: an argument is invalid (nothing is written then), or a stage failed (the message names it and its
            log).
        Interrupted: SIGTERM or SIGHUP (the running tools stopped; a re-run resumes them).
    """
    if profile_name not in PROFILES:
        raise DemoError(f"unknown profile {profile_name!r}; expected one of {', '.join(PROFILES)}")
    for flag, value in (("--seeds", seeds), ("--jobs", jobs)):
        if value < 1:
            raise DemoError(f"{flag} must be >= 1, got {value}")
    if any(not 0 < f <= 1 for f in fractions):
        raise DemoError(f"--label-fractions must lie in (0, 1], got {list(fractions)}")
    profile = PROFILES[profile_name]
    paths = demo_paths(profile_name, output, data_root)
    fractions = sorted(set(fractions) | {1.0})
    # Every argument is checked (here and in build_stages) before anything is written.
    stages = build_stages(profile, paths, seeds, fractions=fractions, subset_seed=subset_seed, semantic=semantic,
                          precision=precision, reference_pyramid=reference_pyramid, pretrain_seeds=pretrain_seeds)
    t0 = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with contextlib.ExitStack() as stack:
        try:  # a second demo into this folder would run (and clear) the same stages as the first
            stack.enter_context(output_dir_lock(paths.output, argv))
        except ConfigError as e:
            raise DemoError(str(e).replace("OUTPUT_DIR: ", "--output: ", 1)) from None
        runner = StageRunner(paths.output, jobs=jobs, threads=threads, roots=paths.roots)
        print(f"[demo] profile {profile_name}: {len(stages)} stages, {seeds} fine-tuning seed(s), {jobs} at a time "
              f"with {os.environ.get('OMP_NUM_THREADS', threads)} thread(s) each; output {paths.output}")
        runner.run_all(stages)
        report = write_report(profile, paths, runner, seeds, argv, time.perf_counter() - t0, fractions,
                              subset_seed, semantic, precision, reference_pyramid, pretrain_seeds)
    print(f"\n[demo] done in {_fmt_time(time.perf_counter() - t0)}: {report}")
    print(report.read_text(encoding="utf-8").split("## MAE reconstructions")[0])
    return report
