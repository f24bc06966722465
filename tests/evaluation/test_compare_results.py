"""compare: a seed that predicted nothing counts as AP 0, the evaluated test set and iteration are checked and shown,
Markdown cells are escaped, and compare_ap's argument mistakes are one line."""
import importlib.util
import json
import logging
from pathlib import Path

import pytest

from mae_det.evaluation.compare import (
    ResultError,
    aggregate,
    collect_runs,
    compare,
    load_run,
    render_csv,
    render_markdown,
)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _run(root: Path, name: str, init: str, seed: int, ap: dict | None, **extra) -> str:
    """A run folder as tools/train_net.py leaves it (write_ap_results' format: dataset and iteration included)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "run_info.json").write_text(json.dumps({"init_type": init, "seed": seed}))
    results = {"dataset": "coco_2017_val", "iteration": 90000, **extra}
    if ap is not None:
        results |= {"bbox": ap, "segm": ap}
    (d / "ap_results.json").write_text(json.dumps(results))
    return str(d)


def _ap(ap: float, aps: float | None = 20.0) -> dict:
    """No large val objects: APl undefined (null) for every model, as COCOeval gives it."""
    return dict(zip(METRICS, [ap, ap + 20, ap + 2, aps, ap + 5, None]))


def _predicted_nothing(tmp_path: Path) -> dict:
    """What Detectron2's COCOEvaluator returns for a model without a single prediction, through write_ap_results."""
    from detectron2.evaluation import COCOEvaluator

    from mae_det.engine.det_trainer import write_ap_results

    ev = COCOEvaluator.__new__(COCOEvaluator)  # _derive_coco_results only needs the logger
    ev._logger = logging.getLogger("detectron2")
    results = {task: ev._derive_coco_results(None, task) for task in ("bbox", "segm")}
    out = write_ap_results(str(tmp_path / "written.json"), results, dataset="coco_2017_val", iteration=90000)
    assert out["bbox"] == dict.fromkeys(METRICS)  # every AP null, as for "no objects of this size"
    return out["bbox"]


def _md_row(md: str, start: str) -> list[str]:
    return [c.strip() for c in next(line for line in md.splitlines() if line.startswith(start)).split(" | ")]


def test_a_seed_that_predicted_nothing_counts_as_ap_zero_and_is_flagged(tmp_path, caplog):
    dirs = [_run(tmp_path, "mae_s0", "mae", 0, _ap(40)), _run(tmp_path, "mae_s1", "mae", 1, _ap(42, aps=None)),
            _run(tmp_path, "mae_s2", "mae", 2, _predicted_nothing(tmp_path)),
            *(_run(tmp_path, f"scratch_s{s}", "scratch", s, _ap(30)) for s in range(3))]
    runs, _ = collect_runs(dirs)
    nothing = runs[2].values
    # AP, AP50, AP75 and the APs/APm other runs on the test set have count as 0; APl, undefined for all, stays null.
    assert [nothing[f"bbox/{m}"] for m in METRICS] == [0.0, 0.0, 0.0, 0.0, 0.0, None]
    assert f"runs whose model predicted nothing, counted as AP 0: {dirs[2]} (box, mask)" in caplog.text
    assert runs[2].predicted_nothing == ("bbox", "segm") and load_run(dirs[2]).values["bbox/AP"] is None
    groups = aggregate(runs)
    md = render_markdown(groups, baseline="scratch", paths_relative_to=tmp_path)
    # Mean of 40, 42, 0 (was 41.0 ± 1.4 (n=2), the collapsed seed dropped); APs: seed 1 has none, so n=2 of 3.
    assert _md_row(md, "| mae | 3 |")[2:9] == ["27.3 ± 23.7", "40.7 ± 35.2", "28.7 ± 24.8", "10.0 ± 14.1 (n=2)",
                                              "30.7 ± 26.6", "27.3 ± 23.7", "40.7 ± 35.2"]
    assert "mask APl" in md.splitlines()[2] and "box APl" in md.splitlines()[2]  # left out: no value in any run
    # The difference of means carries the group's (n=k) too.
    assert _md_row(md, "| mae | -")[1:6] == ["-2.7", "-9.3", "-3.3", "-10.0 (n=2)", "-4.3"]
    assert ("AP counted as 0, not left out, for the runs whose model predicted nothing (Detectron2: \"No predictions "
            "from the model!\"): mae_s2 (box, mask).") in md
    assert _md_row(md, "| mae | 2 |")[2:5] == ["mae_s2 (predicted nothing: box, mask)", "90000", "0.0"]
    lines = render_csv(groups, baseline="scratch").splitlines()
    assert lines[3].startswith(f"run,mae,2,{dirs[2]},90000,\"predicted nothing: box, mask\",,,0.0000,0.0000,")
    assert lines[3].endswith(",0.0000,0.0000,")
    assert next(line for line in lines if line.startswith("n,mae,")) == "n,mae,,,,,,,3,3,3,2,3,0,3,3,3,2,3,0"


def test_only_the_ap_key_marks_a_run_that_predicted_nothing(tmp_path):
    # a box-only model has no "segm"; a run with AP but no APl is a run without large objects, not a collapse
    d = _run(tmp_path, "box_only", "mae", 0, None, bbox=_ap(40))
    alone = _run(tmp_path, "alone", "other", 0, None, bbox=_predicted_nothing(tmp_path), dataset="other_val")
    box_only, collapsed = collect_runs([d, alone])[0]
    # Nothing else measured that test set: its size ranges are unknown and stay null; AP, AP50, AP75 are 0.
    assert [collapsed.values[f"bbox/{m}"] for m in METRICS] == [0.0, 0.0, 0.0, None, None, None]
    assert box_only.values["bbox/APl"] is None and box_only.values["segm/AP"] is None
    assert box_only.predicted_nothing == () and collapsed.predicted_nothing == ("bbox",)


def test_a_group_mixing_test_sets_or_iterations_is_refused(tmp_path):
    done = [_run(tmp_path, f"mae_s{s}", "mae", s, _ap(50 + s)) for s in range(2)]
    stopped = _run(tmp_path, "mae_s2", "mae", 2, _ap(12), iteration=5000)  # killed after a periodic evaluation
    other = _run(tmp_path, "mae_s3", "mae", 3, _ap(70), dataset="shapes_val")
    with pytest.raises(ResultError) as e:
        collect_runs([*done, stopped])
    assert str(e.value) == (f"group 'mae' holds runs evaluated after different numbers of training iterations "
                            f"(90000: {done[0]}, {done[1]}; 5000: {stopped}), which are not seeds of one result: "
                            f"compare like runs, or --label DIR=NAME them apart")
    with pytest.raises(ResultError, match=f"different test sets \\(coco_2017_val: {done[0]}, {done[1]}; shapes_val: "
                                          f"{other}\\)"):
        collect_runs([*done, other])
    with pytest.raises(ResultError, match="group 'mine' holds runs evaluated after different numbers of training"):
        collect_runs([*done, stopped], labels={d: "mine" for d in [*done, stopped]})  # a label does not excuse it
    # Apart, or with the iteration not recorded, they are tabled; the iteration is shown per run.
    runs, _ = collect_runs([*done, stopped], labels={stopped: "mae_5k"})
    assert [r.iteration for r in runs] == [90000, 90000, 5000] and runs[0].dataset == "coco_2017_val"
    unknown = _run(tmp_path, "mae_old", "mae", 4, _ap(51), iteration=None)
    md = render_markdown(aggregate(collect_runs([*done, unknown])[0]))
    assert "| init | seed | run | iter | box AP |" in md
    assert f"| mae | 0 | {done[0]} | 90000 | 50.0 |" in md and f"| mae | 4 | {unknown} | - | 51.0 |" in md
    lines = render_csv(aggregate(collect_runs([*done, unknown])[0])).splitlines()
    assert lines[0].startswith("kind,init,seed,run,iter,note,source,model,box_AP,")
    assert lines[1].startswith(f"run,mae,0,{done[0]},90000,,,,50.0000,") and lines[3].startswith(
        f"run,mae,4,{unknown},,,,,51.0000,")


@pytest.mark.parametrize("results, message", [
    ({"iteration": "5000"}, "'iteration' must be a non-negative integer or null, got '5000'"),
    ({"iteration": True}, "'iteration' must be a non-negative integer or null, got True"),
    ({"dataset": 3}, "'dataset' must be a non-empty string or null, got 3"),
])
def test_malformed_dataset_or_iteration_names_the_file(tmp_path, results, message):
    d = _run(tmp_path, "r", "mae", 0, _ap(40), **results)
    with pytest.raises(ResultError, match=f"{d}/ap_results.json: {message}"):
        load_run(d)


def test_markdown_escapes_pipes_and_line_breaks(tmp_path):
    a = _run(tmp_path, "a|b", "mae", 0, _ap(50))
    b = _run(tmp_path, "s", "scratch", 0, _ap(40))
    groups = aggregate(collect_runs([a, b], labels={a: "mae|800ep\nlong"})[0])
    md = render_markdown(groups, baseline="scratch", title="AP | demo\nsecond line")
    tables = [block.splitlines() for block in md.split("\n\n") if block.startswith("|")]
    assert len(tables) == 3  # summary, deltas, runs
    for table in tables:  # every row as many cells as its header: no label or folder shifted a column
        assert {line.replace("\\|", "").count("|") for line in table} == {table[0].count("|")}
    assert md.splitlines()[0] == "# AP \\| demo second line"
    escaped = a.replace("|", "\\|")
    assert _md_row(md, "| mae\\|800ep long | 1 |")[2] == "50.0"
    assert f"| mae\\|800ep long | 0 | {escaped} | 90000 | 50.0 |" in md


def _tool(repo_root: Path):
    spec = importlib.util.spec_from_file_location("compare_ap_tool", repo_root / "tools/compare_ap.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture
def two_runs(tmp_path) -> list[str]:
    return [_run(tmp_path, "a", "mae", 0, _ap(50)), _run(tmp_path, "b", "scratch", 0, _ap(40))]


def test_tool_refuses_two_names_for_one_folder(two_runs, tmp_path, repo_root):
    tool, (a, b), out = _tool(repo_root), two_runs, ["--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=f"^compare_ap: --label gives {b}/ two names, 'scratch_v1' and 'scratch': "
                                         f"label each directory once$"):
        tool.main([a, b, *out, "--label", f"{b}=scratch_v1", "--label", f"{b}/=scratch"])
    with pytest.raises(SystemExit, match="two names, 'scratch_v1' and 'scratch'"):
        tool.main([a, b, *out, "--label", f"{b}=scratch_v1", "--label", f"{b}=scratch"])
    tool.main([a, b, *out, "--label", f"{b}=base", "--label", f"{b}=base", "--baseline", "base"])  # the same twice


def test_tool_refuses_a_name_with_a_folder_in_one_line(two_runs, tmp_path, repo_root):
    with pytest.raises(SystemExit, match=f"^compare_ap: output name 'tables/ap' must be a file name without a "
                                         f"folder \\(the folder is {tmp_path / 'out'}\\)$"):
        _tool(repo_root).main([*two_runs, "--output", str(tmp_path / "out"), "--name", "tables/ap"])
    assert compare(two_runs, tmp_path / "out", name="ap_v2")["markdown"] == tmp_path / "out" / "ap_v2.md"


def test_tool_refuses_a_file_as_output_folder_in_one_line(two_runs, tmp_path, repo_root):
    (tmp_path / "file.md").write_text("")
    with pytest.raises(SystemExit, match=f"^compare_ap: {tmp_path / 'file.md'}: the output folder is a file$"):
        _tool(repo_root).main([*two_runs, "--output", str(tmp_path / "file.md")])
