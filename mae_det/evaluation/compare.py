"""Comparison tables: AP, mIoU and classification top-1 of many runs, grouped by initialization, as Markdown/CSV/PNG.

A run directory is what ``tools/train_net.py`` leaves behind: ``ap_results.json`` (``{"bbox": {"AP", "AP50",
"AP75", "APs", "APm", "APl"}, "segm": {...}}``, values in %, ``null`` where COCOeval had nothing to measure) and
``run_info.json`` (``init_type``, ``seed``); ``ap_results.json`` also names its ``dataset`` and the ``iteration`` of the
evaluated weights. A directory may instead (or also) hold ``cls_results.json`` with
``*_top1`` accuracies in % (kNN, linear probe, fine-tuning), and a semantic-segmentation run holds
``sem_seg_results.json`` (``{"sem_seg": {"mIoU", "fwIoU", "mACC", "pACC", "IoU": {class: IoU}}}``) - those become
extra columns of the same table (``seg mIoU``, ..., ``seg IoU-<class>``).
Runs are grouped by ``init_type`` unless a label is given for the directory; a group whose runs started from
different checkpoints (``run_info.json``'s ``init_checkpoint_sha256``, else ``init_checkpoint``) is split by
checkpoint, since a shared label (e.g. the ``"pretrained"`` of classification runs) does not make two encoders one.
A directory given twice counts once. A group whose runs were evaluated on different test sets or after different
numbers of iterations (a run stopped after a periodic evaluation) is refused. A run whose model predicted nothing
(Detectron2: "No predictions from the model!", every AP null) counts as AP 0 and is flagged, while a metric COCOeval
leaves undefined (``APl`` without large objects) stays out of the mean. Problems with a file are errors that name the
file; with ``skip_invalid`` they are collected and listed in the report instead, never dropped silently.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

TASKS: dict[str, str] = {"bbox": "box", "segm": "mask"}
METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# COCOeval measures these over every object, so they exist wherever the test set has one; APs/APm/APl only where it
# has objects of that size.
ALL_OBJECTS_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75")
PREDICTED_NOTHING = "predicted nothing"
CLS_HEADERS: dict[str, str] = {"knn_top1": "kNN top-1", "linear_top1": "linear top-1",
                               "finetune_top1": "fine-tune top-1"}
AP_FILE, INFO_FILE, CLS_FILE = "ap_results.json", "run_info.json", "cls_results.json"
SEG_FILE, SEG_TASK = "sem_seg_results.json", "sem_seg"
SEG_METRICS: tuple[str, ...] = ("mIoU", "fwIoU", "mACC", "pACC")

# Published COCO val2017 Mask R-CNN results (box AP, mask AP), reported, not measured by this toolkit.
PUBLISHED: tuple[tuple[str, str, str, float, float], ...] = (
    ("MAE paper Table 4", "ViT-B", "supervised IN-1K", 47.9, 42.9),
    ("MAE paper Table 4", "ViT-B", "MoCo v3", 47.9, 42.7),
    ("MAE paper Table 4", "ViT-B", "BEiT", 49.8, 44.4),
    ("MAE paper Table 4", "ViT-B", "MAE", 50.3, 44.9),
    ("MAE paper Table 4", "ViT-L", "supervised IN-1K", 49.3, 43.9),
    ("MAE paper Table 4", "ViT-L", "MoCo v3", 49.3, 44.0),
    ("MAE paper Table 4", "ViT-L", "BEiT", 53.3, 47.1),
    ("MAE paper Table 4", "ViT-L", "MAE", 53.3, 47.2),
    ("ViTDet README", "ViT-B", "MAE", 51.6, 45.9),
    ("ViTDet README", "ViT-L", "MAE", 55.5, 49.2),
)


# Published ADE20K val UperNet results (mIoU, single scale), reported, not measured by this toolkit.
PUBLISHED_SEG: tuple[tuple[str, str, str, float], ...] = (
    ("MAE paper Table 5", "ViT-B", "MAE", 48.1),
    ("MAE paper Table 5", "ViT-L", "MAE", 53.6),
    ("mmsegmentation (MAE ViT-B recipe)", "ViT-B", "MAE", 48.1),
)

logger = logging.getLogger(__name__)


def kind_of(key: str) -> str:
    """What a column measures: "seg" (``sem_seg/...``), "det" (``bbox/...``, ``segm/...``) or "cls"."""
    if key.startswith(f"{SEG_TASK}/"):
        return "seg"
    return "det" if "/" in key else "cls"


class ResultError(ValueError):
    """A missing or malformed result file; the message names the file and what was expected."""


@dataclass(frozen=True)
class RunResult:
    """The results of one run directory.

    Attributes:
        path: The directory as given.
        group: Its initialization label (``init_type`` or the user's label).
        seed: The run's seed from ``run_info.json``.
        values: Column key (``"bbox/AP"``, ``"segm/APl"``, ``"knn_top1"`` ...) -> value in % or None.
        init_checkpoint: The checkpoint its weights started from (``run_info.json``), None for random init.
        init_checkpoint_sha256: That file's sha256 when the run recorded it.
        dataset: The test set of its ``ap_results.json`` (else ``sem_seg_results.json``), None when not recorded.
        iteration: The training iterations behind the evaluated weights (same file), None when not recorded.
        predicted_nothing: The tasks (``"bbox"``, ``"segm"``) whose results are null because the model predicted
            nothing; :func:`collect_runs` counts their metrics as 0.
    """

    path: str
    group: str
    seed: int
    values: dict[str, float | None]
    init_checkpoint: str | None = None
    init_checkpoint_sha256: str | None = None
    dataset: str | None = None
    iteration: int | None = None
    predicted_nothing: tuple[str, ...] = ()

    @property
    def init_key(self) -> str | None:
        """What identifies the starting weights: the checkpoint's hash, else its path; None without one."""
        return self.init_checkpoint_sha256 or self.init_checkpoint


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (None below two values) of the ``n`` non-null values of a column."""

    mean: float
    std: float | None
    n: int


@dataclass(frozen=True)
class GroupSummary:
    """All runs of one initialization and the statistics of each column over them.

    Attributes:
        group: The initialization label.
        runs: Its runs, sorted by seed, then path.
        stats: Column key -> statistics of the non-null values (None when there are none).
        reported: Column key -> number of runs whose result files hold that column (null or not).
    """

    group: str
    runs: tuple[RunResult, ...]
    stats: dict[str, Stat | None]
    reported: dict[str, int]

    def count(self, kind: str) -> int:
        """Runs with detection (``kind="det"``), semantic segmentation ("seg") or classification ("cls") results."""
        return sum(1 for r in self.runs if any(kind_of(k) == kind for k in r.values))


# ------------------------------------------------------------------------------------------------- loading
def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ResultError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultError(f"{path}: not valid JSON ({e})") from None


def _number(path: Path, key: str, value: Any) -> float | None:
    # COCOeval's "no objects of this size" is -1 -> NaN in Detectron2 -> null in the json; NaN may survive as well.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isinf(value):
        raise ResultError(f"{path}: {key} must be a finite number or null, got {value!r}")
    return float(value)


def _evaluated(path: Path, data: dict) -> tuple[str | None, int | None]:
    """The ``dataset`` and ``iteration`` a results file records (None where it does not)."""
    dataset, iteration = data.get("dataset"), data.get("iteration")
    if dataset is not None and (not isinstance(dataset, str) or not dataset):
        raise ResultError(f"{path}: 'dataset' must be a non-empty string or null, got {dataset!r}")
    if iteration is not None and (isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0):
        raise ResultError(f"{path}: 'iteration' must be a non-negative integer or null, got {iteration!r}")
    return dataset, iteration


def _read_ap(path: Path) -> tuple[dict[str, float | None], tuple[str, ...], str | None, int | None]:
    """The metrics, the tasks whose model predicted nothing (an evaluated task with a null ``AP``: Detectron2 writes
    NaN for every metric then, and COCOeval leaves ``AP`` undefined only for a test set without objects), and
    :func:`_evaluated`."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ResultError(f"{path}: expected a JSON object with 'bbox' and/or 'segm', got {type(data).__name__}")
    if not any(task in data for task in TASKS):
        raise ResultError(f"{path}: expected key 'bbox' and/or 'segm', found {sorted(data)}")
    values: dict[str, float | None] = {}
    for task in TASKS:
        if task not in data:
            values.update({f"{task}/{m}": None for m in METRICS})
            continue
        if not isinstance(data[task], dict):
            raise ResultError(f"{path}: '{task}' must be an object of AP metrics, got {type(data[task]).__name__}")
        for m in METRICS:
            if m not in data[task]:
                raise ResultError(f"{path}: '{task}' lacks metric '{m}' (expected {', '.join(METRICS)})")
            values[f"{task}/{m}"] = _number(path, f"{task}.{m}", data[task][m])
    nothing = tuple(t for t in TASKS if t in data and values[f"{t}/AP"] is None)
    return values, nothing, *_evaluated(path, data)


def _read_cls(path: Path) -> dict[str, float | None]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ResultError(f"{path}: expected a JSON object with *_top1 keys, got {type(data).__name__}")
    keys = [k for k in data if k.endswith("_top1")]
    if not keys:
        raise ResultError(f"{path}: no *_top1 key (expected e.g. {', '.join(CLS_HEADERS)})")
    return {k: _number(path, k, data[k]) for k in keys}


def _read_seg(path: Path) -> tuple[dict[str, float | None], str | None, int | None]:
    data = _read_json(path)
    res = data.get(SEG_TASK) if isinstance(data, dict) else None
    if not isinstance(res, dict):
        raise ResultError(f"{path}: expected a JSON object with a '{SEG_TASK}' object")
    missing = [m for m in SEG_METRICS if m not in res]
    if missing:
        raise ResultError(f"{path}: '{SEG_TASK}' lacks {', '.join(missing)} (expected {', '.join(SEG_METRICS)})")
    per_class = res.get("IoU", {})
    if not isinstance(per_class, dict):
        raise ResultError(f"{path}: '{SEG_TASK}.IoU' must be an object of class -> IoU")
    values = {f"{SEG_TASK}/{m}": _number(path, f"{SEG_TASK}.{m}", res[m]) for m in SEG_METRICS}
    values.update({f"{SEG_TASK}/IoU-{c}": _number(path, f"{SEG_TASK}.IoU.{c}", v) for c, v in per_class.items()})
    return values, *_evaluated(path, data)


def load_run(run_dir: str | os.PathLike, label: str | None = None) -> RunResult:
    """Read one run directory.

    Args:
        run_dir: A directory with ``run_info.json`` and at least one of ``ap_results.json``,
            ``sem_seg_results.json``, ``cls_results.json``.
        label: Group name overriding ``run_info.json``'s ``init_type``.

    Raises:
        ResultError: a file is missing or malformed; the message names it.
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise ResultError(f"{d}: run directory not found")
    info_path = d / INFO_FILE
    info = _read_json(info_path)
    if not isinstance(info, dict):
        raise ResultError(f"{info_path}: expected a JSON object, got {type(info).__name__}")
    seed = info.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ResultError(f"{info_path}: 'seed' must be an integer, got {seed!r}")
    group = label if label is not None else info.get("init_type")
    if not isinstance(group, str) or not group:
        raise ResultError(f"{info_path}: 'init_type' must be a non-empty string, got {group!r} "
                          f"(or pass a label: --label {d}=NAME)")
    checkpoint = {k: info.get(k) for k in ("init_checkpoint", "init_checkpoint_sha256")}
    for key, value in checkpoint.items():
        if value is not None and (not isinstance(value, str) or not value):
            raise ResultError(f"{info_path}: '{key}' must be a non-empty string or null, got {value!r}")
    if not any((d / f).exists() for f in (AP_FILE, SEG_FILE, CLS_FILE)):
        raise ResultError(f"{d / AP_FILE}: file not found (and no {SEG_FILE} or {CLS_FILE} either)")
    values: dict[str, float | None] = {}
    nothing: tuple[str, ...] = ()
    evaluated: tuple[str | None, int | None] | None = None  # the AP file's, else the sem_seg file's
    if (d / AP_FILE).exists():
        ap, nothing, *found = _read_ap(d / AP_FILE)
        values.update(ap)
        evaluated = tuple(found)
    if (d / SEG_FILE).exists():
        seg, *found = _read_seg(d / SEG_FILE)
        values.update(seg)
        evaluated = evaluated or tuple(found)
    if (d / CLS_FILE).exists():
        values.update(_read_cls(d / CLS_FILE))
    dataset, iteration = evaluated or (None, None)
    return RunResult(path=str(run_dir), group=group, seed=seed, values=values, **checkpoint, dataset=dataset,
                     iteration=iteration, predicted_nothing=nothing)


def collect_runs(
    run_dirs: Iterable[str | os.PathLike], labels: dict[str, str] | None = None, skip_invalid: bool = False
) -> tuple[list[RunResult], list[str]]:
    """Read many run directories.

    A directory given more than once (overlapping globs, a trailing slash, a symlink) is read once, where it first
    appears. Runs grouped by their ``init_type`` that started from different checkpoints are split into one group
    per checkpoint, ``"<init_type> (<checkpoint>)"``; a label given for a directory is kept as it is (labelling
    runs alike is how runs of different checkpoints, e.g. pretraining seeds, are averaged on purpose). A run whose
    model predicted nothing gets 0.0 for every metric of that task that the test set defines (see
    :func:`_count_predicted_nothing`). Each of these is logged in one line.

    Args:
        run_dirs: The directories, in the order they should appear.
        labels: Directory -> group name overrides (matched on the resolved path).
        skip_invalid: Collect problems instead of raising on the first one.

    Returns:
        The runs and the problems (one ``ResultError`` message per skipped directory).

    Raises:
        ResultError: a directory is invalid and ``skip_invalid`` is False, a label names no given directory or gives
            one two names, or a group mixes test sets or iterations (:func:`_check_same_evaluation`).
    """
    by_path: dict[str, str] = {}  # resolved -> as first given
    repeated: list[str] = []
    for d in run_dirs:
        resolved = str(Path(d).resolve())
        if resolved in by_path:
            repeated.append(str(d) if str(d) == by_path[resolved] else f"{d} (= {by_path[resolved]})")
        else:
            by_path[resolved] = str(d)
    if repeated:
        logger.warning("run directories given more than once, counted once: %s", ", ".join(repeated))
    resolved_labels = resolve_labels((labels or {}).items())
    unknown = [k for k in resolved_labels if k not in by_path]
    if unknown:
        raise ResultError(f"--label names a directory that is not among the runs: {', '.join(unknown)}")
    runs, skipped, labelled = [], [], []
    for resolved, d in by_path.items():
        try:
            runs.append(load_run(d, resolved_labels.get(resolved)))
        except ResultError as e:
            if not skip_invalid:
                raise
            skipped.append(str(e))
            continue
        labelled.append(resolved in resolved_labels)
    runs = _split_by_checkpoint(runs, labelled)
    _check_seeds_differ(runs, labelled)
    _check_same_evaluation(runs)
    return _count_predicted_nothing(runs), skipped


def resolve_labels(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``(directory, name)`` pairs as resolved directory -> name.

    Raises:
        ResultError: one directory (under any spelling) is given two different names.
    """
    out: dict[str, str] = {}
    for d, name in pairs:
        first = out.setdefault(str(Path(d).resolve()), name)
        if first != name:
            raise ResultError(f"--label gives {d} two names, {first!r} and {name!r}: label each directory once")
    return out


def _check_same_evaluation(runs: list[RunResult]) -> None:
    """Refuses a group whose runs name different test sets or iterations (where recorded): a run stopped after a
    periodic evaluation (iteration 5000 of 90000) or tested on another set would pass for a seed. Only a
    difference is refused, not a value: ``ap_results.json`` cannot tell a finished run (the schedule is in the
    config, and an evaluation-only run has its checkpoint's iteration), and runs that agree are shown with their
    ``iter`` in the Runs table."""
    groups: dict[str, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    for group, members in groups.items():
        for field, what in (("dataset", "on different test sets"),
                            ("iteration", "after different numbers of training iterations")):
            by_value: dict[Any, list[str]] = {}
            for r in members:
                if getattr(r, field) is not None:
                    by_value.setdefault(getattr(r, field), []).append(r.path)
            if len(by_value) > 1:
                found = "; ".join(f"{v}: {', '.join(paths)}" for v, paths in by_value.items())
                raise ResultError(f"group '{group}' holds runs evaluated {what} ({found}), which are not seeds "
                                  f"of one result: compare like runs, or --label DIR=NAME them apart")


def _count_predicted_nothing(runs: list[RunResult]) -> list[RunResult]:
    """``runs`` with the null metrics of each task whose model predicted nothing set to 0.0: AP, AP50 and AP75,
    and each of APs/APm/APl that another run on the same test set measured (COCOeval leaves a size range without
    objects undefined for every model, and such a metric stays null). Logged in one line."""
    measured = {(r.dataset, k) for r in runs for k, v in r.values.items() if v is not None}
    out, flagged = [], []
    for r in runs:
        if r.predicted_nothing:
            zero = {f"{t}/{m}" for t in r.predicted_nothing for m in METRICS
                    if m in ALL_OBJECTS_METRICS or (r.dataset, f"{t}/{m}") in measured}
            r = dataclasses.replace(r, values={k: 0.0 if k in zero and v is None else v for k, v in r.values.items()})
            flagged.append(f"{r.path} ({', '.join(TASKS[t] for t in r.predicted_nothing)})")
        out.append(r)
    if flagged:
        logger.warning("runs whose model predicted nothing, counted as AP 0: %s", ", ".join(flagged))
    return out


def _check_seeds_differ(runs: list[RunResult], labelled: list[bool]) -> None:
    """Refuses an unlabelled group in which two runs of one seed report the same metric: they are other recipes
    (another pyramid, ViT size or head, a kNN of the other pooling, partial vs full fine-tuning) or one run twice,
    and their mean and std would pass for a spread over seeds."""
    seen: dict[tuple[str, int, str], str] = {}
    for r, fixed in zip(runs, labelled):
        if fixed:  # labelled alike on purpose, e.g. runs of several pretraining seeds
            continue
        for metric in r.values:
            other = seen.setdefault((r.group, r.seed, metric), r.path)
            if other != r.path:
                raise ResultError(
                    f"{other} and {r.path} are both seed {r.seed} of '{r.group}' and report {metric}: averaging "
                    f"them would count other recipes (or one run twice) as seeds; compare one recipe's runs, or "
                    f"--label DIR=NAME them on purpose")


def _split_by_checkpoint(runs: list[RunResult], labelled: list[bool]) -> list[RunResult]:
    """``runs`` with each unlabelled group that holds several starting checkpoints split into one group per
    checkpoint (see :func:`collect_runs`)."""
    keys: dict[str, dict[str | None, list[int]]] = {}
    for i, (r, fixed) in enumerate(zip(runs, labelled)):
        if not fixed:
            keys.setdefault(r.group, {}).setdefault(r.init_key, []).append(i)
    runs = list(runs)
    for group, by_key in keys.items():
        if len(by_key) < 2:
            continue
        names = _checkpoint_names({k: runs[idx[0]] for k, idx in by_key.items()})
        for key, idx in by_key.items():
            for i in idx:
                runs[i] = dataclasses.replace(runs[i], group=f"{group} ({names[key]})")
        logger.warning("group '%s' holds runs of %d different init checkpoints (run_info.json), which are not "
                       "averaged together: split into %s (--label DIR=NAME groups runs explicitly)", group,
                       len(by_key), ", ".join(f"'{group} ({names[k]})'" for k in by_key))
    return runs


def _checkpoint_names(first: dict[str | None, RunResult]) -> dict[str | None, str]:
    """A short, distinct name per starting checkpoint: its folder and file name, with its hash (or whole path)
    added where two checkpoints share those."""
    shorts = {k: "no checkpoint" if r.init_checkpoint is None else "/".join(Path(r.init_checkpoint).parts[-2:])
              for k, r in first.items()}
    counts = Counter(shorts.values())
    names = {}
    for key, name in shorts.items():
        r = first[key]
        if counts[name] > 1:
            name = f"{name} {r.init_checkpoint_sha256[:8]}" if r.init_checkpoint_sha256 else r.init_checkpoint or name
        names[key] = name
    return names


# ------------------------------------------------------------------------------------------------ statistics
def summarize(values: Iterable[float | None]) -> Stat | None:
    """Mean and sample std of the non-null values; None when there are none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Stat(statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None, len(present))


def columns(runs: Iterable[RunResult]) -> list[str]:
    """Column keys present in any run: box and mask metrics first, then mIoU & co. and per-class IoU (in order of
    appearance), then the known top-1 keys, then other ones."""
    runs = list(runs)
    present = {k for r in runs for k in r.values}
    ap = [f"{t}/{m}" for t in TASKS for m in METRICS if f"{t}/{m}" in present]
    seg = [f"{SEG_TASK}/{m}" for m in SEG_METRICS if f"{SEG_TASK}/{m}" in present]
    seg += list(dict.fromkeys(k for r in runs for k in r.values if kind_of(k) == "seg" and k not in seg))
    cls = [k for k in CLS_HEADERS if k in present] + sorted(present - set(ap) - set(seg) - set(CLS_HEADERS))
    return ap + seg + cls


def header(key: str) -> str:
    """Human column name: ``bbox/AP50`` -> ``box AP50``, ``sem_seg/mIoU`` -> ``seg mIoU``, ``knn_top1`` -> ``kNN top-1``."""
    if kind_of(key) == "seg":
        return f"seg {key.split('/', 1)[1]}"
    if "/" in key:
        task, metric = key.split("/")
        return f"{TASKS[task]} {metric}"
    return CLS_HEADERS.get(key, key)


def aggregate(runs: Iterable[RunResult]) -> list[GroupSummary]:
    """Group runs (in order of first appearance; runs sorted by seed, then path) with per-column statistics."""
    runs = list(runs)
    cols = columns(runs)
    groups: dict[str, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    out = []
    for name, members in groups.items():
        members.sort(key=lambda r: (r.seed, r.path))
        stats = {c: summarize(r.values.get(c) for r in members) for c in cols}
        reported = {c: sum(1 for r in members if c in r.values) for c in cols}
        out.append(GroupSummary(name, tuple(members), stats, reported))
    return out


def deltas(groups: list[GroupSummary], baseline: str) -> dict[str, dict[str, float | None]]:
    """Difference of means against the ``baseline`` group, per other group and column (None where undefined).

    Raises:
        ResultError: no group is called ``baseline``.
    """
    base = next((g for g in groups if g.group == baseline), None)
    if base is None:
        raise ResultError(f"baseline group {baseline!r} not among the runs' groups: "
                          f"{', '.join(g.group for g in groups) or 'none'}")
    out = {}
    for g in groups:
        if g is base:
            continue
        out[g.group] = {c: (s.mean - base.stats[c].mean if s is not None and base.stats[c] is not None else None)
                        for c, s in g.stats.items()}
    return out


# ------------------------------------------------------------------------------------------------- rendering
def format_value(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def format_stat(s: Stat | None, reported: int) -> str:
    """``mean ± std``; ``-`` when no value; ``(n=k)`` when only k of the ``reported`` runs have a non-null value."""
    if s is None:
        return "-"
    text = f"{s.mean:.1f}" if s.std is None else f"{s.mean:.1f} ± {s.std:.1f}"
    return text if s.n == reported else f"{text} (n={s.n})"


def format_delta(d: float | None) -> str:
    """``+1.2`` / ``-0.3``; a difference that rounds to zero is ``+0.0`` whatever its sign."""
    return "-" if d is None else f"{round(d, 1) + 0.0:+.1f}"


def format_delta_n(d: float | None, s: Stat | None, reported: int) -> str:
    """:func:`format_delta` with the group's ``(n=k)`` where only k of its ``reported`` runs have a value, as in the
    summary: a difference of means over fewer runs than the group shows must not pass for one over all."""
    return format_delta(d) if d is None or s is None or s.n == reported else f"{format_delta(d)} (n={s.n})"


def _md(text: str) -> str:
    """``text`` as one Markdown table cell or line: ``|`` escaped, line breaks as spaces (a label or folder name
    holding either would otherwise shift every later cell or end the table)."""
    return " ".join(str(text).splitlines()).replace("|", "\\|")


def _md_table(head: list[str], rows: list[list[str]], n_left: int) -> list[str]:
    lines = ["| " + " | ".join(map(_md, head)) + " |",
             "|" + "|".join("---" if i < n_left else "---:" for i in range(len(head))) + "|"]
    return lines + ["| " + " | ".join(map(_md, r)) + " |" for r in rows]


def _run_note(r: RunResult) -> str:
    """What a run's row needs said: the tasks whose model predicted nothing (their AP counted as 0)."""
    return f"{PREDICTED_NOTHING}: {', '.join(TASKS[t] for t in r.predicted_nothing)}" if r.predicted_nothing else ""


def _shown_path(path: str, base: str | os.PathLike | None) -> str:
    """``path`` relative to ``base`` when it lies inside it (a report next to its runs stays readable and can be
    moved with them), else as given."""
    if base is None:
        return path
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def render_markdown(
    groups: list[GroupSummary], baseline: str | None = None, skipped: Iterable[str] = (), published: bool = False,
    title: str = "AP comparison", paths_relative_to: str | os.PathLike | None = None,
) -> str:
    """The Markdown report: summary (mean ± std), deltas against ``baseline``, every run, skips, published rows.
    Columns without a value in any run are left out and named (the CSV keeps every column); run folders inside
    ``paths_relative_to`` are shown relative to it."""
    skipped = list(skipped)
    runs = [r for g in groups for r in g.runs]
    cols = columns(runs)
    # COCOeval gives APm / APl no value when no val object is that large (the shapes demo): dash-only columns.
    empty = [c for c in cols if all(r.values.get(c) is None for r in runs)]
    cols = [c for c in cols if c not in empty]
    heads = [header(c) for c in cols]
    kinds = [k for k in ("det", "seg", "cls") if any(kind_of(c) == k for c in cols + empty)]
    lines = [f"# {_md(title)}", "",
             f"Measured: {len(runs)} runs in {len(groups)} groups. Values in %; mean ± sample std over the runs of a "
             "group (\"(n=k)\": only k of them have a value); \"-\" = not available."
             + (f" Left out, no value in any run: {', '.join(header(c) for c in empty)}." if empty else ""), ""]
    lines += ["## Summary", ""]
    lines += _md_table(["init"] + [f"{k} runs" for k in kinds] + heads,
                       [[g.group] + [str(g.count(k)) for k in kinds]
                        + [format_stat(g.stats[c], g.reported[c]) for c in cols] for g in groups], 1)
    nothing = [r for r in runs if r.predicted_nothing]
    if nothing:
        shown = [f"{_md(_shown_path(r.path, paths_relative_to))} ({', '.join(TASKS[t] for t in r.predicted_nothing)})"
                 for r in nothing]
        lines += ["", f"AP counted as 0, not left out, for the runs whose model {PREDICTED_NOTHING} (Detectron2: \"No "
                  f"predictions from the model!\"): {', '.join(shown)}."]
    if baseline is not None:
        diff = deltas(groups, baseline)
        lines += ["", f"## Δ vs {_md(baseline)} (difference of means)", ""]
        lines += _md_table(["init"] + heads, [[g.group] + [format_delta_n(diff[g.group][c], g.stats[c], g.reported[c])
                                                           for c in cols] for g in groups if g.group in diff], 1)
    with_iter = any(r.iteration is not None for r in runs)  # not recorded by hand-made or classification results
    rows = []
    for r in runs:
        shown = _shown_path(r.path, paths_relative_to) + (f" ({_run_note(r)})" if r.predicted_nothing else "")
        rows.append([r.group, str(r.seed), shown] + ["-" if r.iteration is None else str(r.iteration)] * with_iter
                    + [format_value(r.values.get(c)) for c in cols])
    lines += ["", "## Runs", ""]
    lines += _md_table(["init", "seed", "run"] + ["iter"] * with_iter + heads, rows, 3)
    if skipped:
        lines += ["", f"## Skipped: {len(skipped)} run directories with missing or malformed results", ""]
        lines += [f"- {' '.join(s.splitlines())}" for s in skipped]
    if published:
        lines += ["", "## Published reference (COCO val2017, Mask R-CNN; reported by the papers, not measured here)",
                  ""]
        lines += _md_table(["source", "model", "init", "box AP", "mask AP"],
                           [[s, m, i, f"{b:.1f}", f"{k:.1f}"] for s, m, i, b, k in PUBLISHED], 3)
        if "seg" in kinds:
            lines += ["", "## Published reference (ADE20K val, UperNet, single scale; reported, not measured here)", ""]
            lines += _md_table(["source", "model", "init", "mIoU"],
                               [[s, m, i, f"{v:.1f}"] for s, m, i, v in PUBLISHED_SEG], 3)
    return "\n".join(lines) + "\n"


def _csv_number(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def render_csv(groups: list[GroupSummary], baseline: str | None = None, published: bool = False) -> str:
    """One CSV: a row per run, then per group its mean, std, n and delta rows, then (optionally) published rows.

    Metric columns are named like the Markdown headers with ``_`` for spaces (``box_AP50``, ``kNN_top-1``);
    ``kind`` says what a row is (run, mean, std, n = non-null values, delta_vs_<baseline>, published); ``iter`` is
    a run's evaluated iteration and ``note`` says "predicted nothing: box, mask" where its AP was counted as 0;
    empty cells are unavailable.
    """
    runs = [r for g in groups for r in g.runs]
    cols = columns(runs)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    fixed = ["kind", "init", "seed", "run", "iter", "note", "source", "model"]
    w.writerow(fixed + [header(c).replace(" ", "_") for c in cols])
    blank = [""] * (len(fixed) - 2)
    for r in runs:
        w.writerow(["run", r.group, r.seed, r.path, "" if r.iteration is None else r.iteration, _run_note(r), "", ""]
                   + [_csv_number(r.values.get(c)) for c in cols])
    diff = deltas(groups, baseline) if baseline is not None else {}
    for g in groups:
        stats = [g.stats[c] for c in cols]
        w.writerow(["mean", g.group, *blank] + [_csv_number(s.mean if s else None) for s in stats])
        w.writerow(["std", g.group, *blank] + [_csv_number(s.std if s else None) for s in stats])
        w.writerow(["n", g.group, *blank] + [s.n if s else 0 for s in stats])
        if g.group in diff:
            w.writerow([f"delta_vs_{baseline}", g.group, *blank] + [_csv_number(diff[g.group][c]) for c in cols])
    if published:
        for source, model, init, box, mask in PUBLISHED:
            row = {"bbox/AP": box, "segm/AP": mask}
            w.writerow(["published", init, *blank[:-2], source, model] + [_csv_number(row.get(c)) for c in cols])
        if any(kind_of(c) == "seg" for c in cols):
            for source, model, init, miou in PUBLISHED_SEG:
                row = {f"{SEG_TASK}/mIoU": miou}
                w.writerow(["published", init, *blank[:-2], source, model] + [_csv_number(row.get(c)) for c in cols])
    return buf.getvalue()


def plot_bars(groups: list[GroupSummary], path: str | os.PathLike, title: str = "") -> bool:
    """Bar chart, one panel per task (box, mask, segmentation, classification), bars per group with std error
    bars; the segmentation panel shows the summary metrics (mIoU, fwIoU, mACC, pACC), not per-class IoU.

    Returns:
        False, writing nothing, when no metric has a value in any run (e.g. only runs that detected nothing).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = columns([r for g in groups for r in g.runs])
    cols = [c for c in cols if any(g.stats[c] is not None for g in groups)]  # no empty bar slots (e.g. APl)
    panels = [(TASKS[t], [c for c in cols if c.startswith(f"{t}/")]) for t in TASKS]
    panels.append(("segmentation", [c for c in cols if c in {f"{SEG_TASK}/{m}" for m in SEG_METRICS}]))
    panels.append(("classification", [c for c in cols if kind_of(c) == "cls"]))
    panels = [(name, cs) for name, cs in panels if cs]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    width = 0.8 / max(len(groups), 1)
    for ax, (name, cs) in zip(axes[0], panels):
        kind = {"classification": "cls", "segmentation": "seg"}.get(name, "det")
        x = np.arange(len(cs))
        for i, g in enumerate(groups):
            means = [g.stats[c].mean if g.stats[c] else np.nan for c in cs]
            errs = [(g.stats[c].std or 0.0) if g.stats[c] else 0.0 for c in cs]
            ax.bar(x + (i - (len(groups) - 1) / 2) * width, means, width, yerr=errs, capsize=3,
                   label=f"{g.group} (n={g.count(kind)})")
        ax.set_xticks(x, [header(c).split(" ", 1)[1] if kind != "cls" else header(c) for c in cs])
        ax.set_title(name)
        ax.set_ylabel("%")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def compare(
    run_dirs: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    labels: dict[str, str] | None = None,
    baseline: str | None = "scratch",
    published: bool = False,
    skip_invalid: bool = False,
    name: str = "ap_table",
    title: str = "AP comparison",
) -> dict[str, Path]:
    """Read the runs and write ``<name>.md``, ``<name>.csv`` and ``<name>.png`` into ``out_dir``.

    Without a value to draw (every metric of every run null) there is no chart: that is logged in one line, a
    chart of an earlier comparison under the same name is removed, and the result has no ``"chart"``.

    Returns:
        ``"markdown"``, ``"csv"`` and (when drawn) ``"chart"`` -> the file written.

    Raises:
        ResultError: ``name`` is not a plain file name or ``out_dir`` is a file; a run's results are missing or
            malformed (without ``skip_invalid``); no valid run is left; a group mixes test sets or iterations; the
            baseline group does not exist.
    """
    out = Path(out_dir)
    if name in ("", os.pardir) or Path(name).name != name:
        raise ResultError(f"output name {name!r} must be a file name without a folder (the folder is {out})")
    if out.exists() and not out.is_dir():
        raise ResultError(f"{out}: the output folder is a file")
    runs, skipped = collect_runs(run_dirs, labels, skip_invalid)
    if not runs:
        raise ResultError("no valid run directory" + (f"; skipped: {'; '.join(skipped)}" if skipped else ""))
    groups = aggregate(runs)
    markdown = render_markdown(groups, baseline, skipped, published, title, paths_relative_to=out_dir)
    table = render_csv(groups, baseline, published)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / f"{name}.md", "csv": out / f"{name}.csv", "chart": out / f"{name}.png"}
    paths["markdown"].write_text(markdown, encoding="utf-8")
    paths["csv"].write_text(table, encoding="utf-8")
    if not plot_bars(groups, paths["chart"], title):
        paths.pop("chart").unlink(missing_ok=True)  # a stale chart would contradict the new tables
        logger.warning("no chart: no metric has a value in any run (the tables list the runs)")
    return paths
