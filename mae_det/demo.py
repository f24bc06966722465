"""The embedded demo behind ``make demo``: shapes dataset -> MAE and supervised pretraining -> Mask R-CNN from MAE,
supervised and random init -> AP tables -> ``REPORT.md``.

Every stage is resumable. A stage records ``<output>/.stages/<key>.json`` with a hash of everything that defines
its result (tool, config files with their ``_BASE_`` chain, command-line overrides, and the hashes of the stages
it consumes). On a re-run a stage whose record says "done" with the same hash, and whose outputs exist, is
skipped; one that was started with the same hash but not finished is continued with ``--resume``; one whose hash
changed starts over in a clean directory. Training stages run as subprocesses of the same interpreter, their
output shown live and kept in ``<output>/logs/<key>.log``, so a failure names the stage and its log.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from .data.shapes import ShapesConfig, generate_shapes
from .evaluation.compare import aggregate, collect_runs, compare, deltas, format_delta, format_stat, header

REPO = Path(__file__).resolve().parents[1]
ARMS: tuple[str, ...] = ("mae", "supervised", "scratch")
STATE_DIR = ".stages"


class DemoError(RuntimeError):
    """A stage failed; the message names the stage and where its log is."""


# ------------------------------------------------------------------------------------------------ profiles
@dataclass(frozen=True)
class Profile:
    """One demo size. The YAML configs under ``configs/shapes/`` hold the full settings; a profile adds
    command-line overrides on top of them (the same for every arm, so the comparison stays fair).

    Attributes:
        name: "quick" or "full".
        shapes: The dataset to generate.
        pretrain_opts: ``KEY VALUE`` overrides for both pretraining runs.
        finetune_opts: ``KEY VALUE`` overrides for every Mask R-CNN run.
        knn_monitor: Log the kNN top-1 during pretraining (the accuracy curve of the report).
        reconstructions: Number of validation images shown in the reconstruction figure.
    """

    name: str
    shapes: ShapesConfig
    pretrain_opts: tuple[str, ...] = ()
    finetune_opts: tuple[str, ...] = ()
    knn_monitor: bool = True
    reconstructions: int = 4


PROFILES: dict[str, Profile] = {
    "full": Profile(
        name="full",
        shapes=ShapesConfig(image_size=64, num_pool=4000, num_train=160, num_val=300, num_cls_train=600,
                            num_cls_val=300, max_objects=5),
    ),
    "quick": Profile(
        name="quick",
        shapes=ShapesConfig(image_size=64, num_pool=384, num_train=48, num_val=48, num_cls_train=120,
                            num_cls_val=60, max_objects=4),
        pretrain_opts=("SOLVER.EPOCHS", "2", "SOLVER.WARMUP_EPOCHS", "1", "MONITOR.KNN.PERIOD", "1"),
        finetune_opts=("SOLVER.MAX_ITER", "30", "SOLVER.WARMUP_ITERS", "5", "SOLVER.STEPS", "(25,)"),
    ),
}


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
        command: For tool stages: the argument list after ``sys.executable`` (``--resume`` is added to continue).
        run: For in-process stages: the function doing the work.
        out_dir: Directory the stage owns (wiped when its hash changes).
    """

    key: str
    title: str
    params: dict[str, Any]
    outputs: list[Path]
    deps: list[str] = field(default_factory=list)
    command: list[str] | None = None
    run: Callable[[], None] | None = None
    out_dir: Path | None = None


def config_chain(path: str | os.PathLike) -> dict[str, str]:
    """The text of a YAML config and of every ``_BASE_`` it inherits from (path -> text)."""
    out: dict[str, str] = {}
    todo = [Path(path)]
    while todo:
        p = todo.pop()
        text = p.read_text(encoding="utf-8")
        out[str(p)] = text
        base = (yaml.safe_load(text) or {}).get("_BASE_")
        for b in [base] if isinstance(base, str) else base or []:
            todo.append(p.parent / b)
    return out


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


class StageRunner:
    """Runs stages in order with headers, timing, state records, resume and skip (see the module docstring)."""

    def __init__(self, output: Path, log: Callable[[str], None] = print) -> None:
        self.output = output
        self.state_dir = output / STATE_DIR
        self.log_dir = output / "logs"
        self.log = log
        self.hashes: dict[str, str] = {}
        self.wall: dict[str, tuple[str, float, str]] = {}  # key -> (title, seconds, "ran" | "resumed" | "skipped")
        self.t0 = time.perf_counter()

    def _state(self, key: str) -> dict[str, Any] | None:
        path = self.state_dir / f"{key}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def _write_state(self, key: str, state: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / f".{key}.json.tmp"
        tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
        os.replace(tmp, self.state_dir / f"{key}.json")

    def run_all(self, stages: Sequence[Stage]) -> None:
        for k, stage in enumerate(stages, 1):
            self.run_stage(stage, k, len(stages))

    def run_stage(self, stage: Stage, k: int, n: int) -> None:
        h = _hash({"params": stage.params, "deps": [self.hashes[d] for d in stage.deps]})
        self.hashes[stage.key] = h
        self.log(f"\n[demo] ===== stage {k}/{n}: {stage.title} ===== (elapsed {_fmt_time(time.perf_counter() - self.t0)})")
        state = self._state(stage.key)
        same = state is not None and state.get("hash") == h
        if same and state.get("status") == "done" and all(p.exists() for p in stage.outputs):
            self.log(f"[demo] up to date (ran in {_fmt_time(state.get('wall_s', 0.0))}), skipped")
            self.wall[stage.key] = (stage.title, float(state.get("wall_s", 0.0)), "skipped")
            return
        resume = same and stage.command is not None and stage.out_dir is not None and stage.out_dir.exists()
        if not resume and stage.out_dir is not None and stage.out_dir.exists():
            if state is not None:
                self.log(f"[demo] settings changed since the last run: starting {stage.out_dir} over")
            shutil.rmtree(stage.out_dir)
        self._write_state(stage.key, {"hash": h, "status": "started", "title": stage.title})
        t0 = time.perf_counter()
        if stage.command is not None:
            self._run_tool(stage, resume)
        else:
            stage.run()
        missing = [str(p) for p in stage.outputs if not p.exists()]
        if missing:
            raise DemoError(f"stage {k}/{n} '{stage.title}' finished without writing {', '.join(missing)}"
                            + (f"; log: {self.log_dir / (stage.key + '.log')}" if stage.command else ""))
        wall = time.perf_counter() - t0
        self._write_state(stage.key, {"hash": h, "status": "done", "title": stage.title, "wall_s": wall})
        self.wall[stage.key] = (stage.title, wall, "resumed" if resume else "ran")
        self.log(f"[demo] {stage.title}: done in {_fmt_time(wall)}")

    def _run_tool(self, stage: Stage, resume: bool) -> None:
        # --resume goes before the KEY VALUE overrides, which are the remainder of the tools' argument parsers.
        cmd = [sys.executable, stage.command[0], *(["--resume"] if resume else []), *stage.command[1:]]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{stage.key}.log"
        self.log(f"[demo] {'resuming' if resume else 'running'}: {' '.join(cmd[1:])}")
        self.log(f"[demo] log: {log_path}")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "ab") as logf:
            logf.write(f"\n===== {datetime.now().isoformat(timespec='seconds')} {' '.join(cmd)}\n".encode())
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env)
            assert proc.stdout is not None
            out = sys.stdout.buffer
            while chunk := proc.stdout.read1(65536):
                logf.write(chunk)
                out.write(chunk)
                out.flush()
            code = proc.wait()
        if code != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            raise DemoError(f"stage '{stage.title}' failed with exit code {code}; log: {log_path}\n"
                            + "\n".join(f"    {line}" for line in tail))
