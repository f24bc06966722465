import importlib.util
import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from mae_det.evaluation.compare import (
    ResultError,
    aggregate,
    collect_runs,
    compare,
    deltas,
    format_stat,
    load_run,
    render_csv,
    render_markdown,
    summarize,
)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _ap(box: list, mask: list) -> dict:
    return {"bbox": dict(zip(METRICS, box)), "segm": dict(zip(METRICS, mask)), "bbox-per-class": {"AP-ring": 3.0}}


def _run(root: Path, name: str, init: str | None, seed: int, ap: dict | None = None, cls: dict | None = None,
         **info) -> str:
    d = root / name
    d.mkdir(parents=True)
    (d / "run_info.json").write_text(json.dumps({"init_type": init, "seed": seed, "config_sha256": "x", **info}))
    if ap is not None:
        (d / "ap_results.json").write_text(json.dumps(ap))
    if cls is not None:
        (d / "cls_results.json").write_text(json.dumps(cls))
    return str(d)


@pytest.fixture
def runs(tmp_path) -> list[str]:
    return [
        _run(tmp_path, "mae_s0", "mae", 0, _ap([40, 60, 42, 20, 45, None], [35, 55, 36, 15, 40, None])),
        _run(tmp_path, "scratch_s1", "scratch", 1, _ap([31, 50, 30, 10, 35, None], [28, 45, 27, 8, 30, None])),
        _run(tmp_path, "mae_s1", "mae", 1, _ap([42, 61, 44, 21, 47, None], [36, 56, 38, 16, 42, None])),
        _run(tmp_path, "scratch_s0", "scratch", 0, _ap([30, 50, 29, 11, 34, None], [27, 44, 26, 9, 30, None])),
        _run(tmp_path, "sup_s0", "supervised", 0, _ap([36, 55.55, 37, 14, 41, 70], [31, 50, 32, 12, 36, None])),
    ]


def test_known_runs_give_known_markdown(runs):
    groups = aggregate(collect_runs(runs)[0])
    md = render_markdown(groups, baseline="scratch").splitlines()
    # No run has a mask APl: the column is left out and named; box APl stays (one run has it).
    cols = ("box AP | box AP50 | box AP75 | box APs | box APm | box APl | mask AP | mask AP50 | mask AP75 | mask APs "
            "| mask APm")
    assert f"| init | det runs | {cols} |" in md
    assert md[2].endswith("\"-\" = not available. Left out, no value in any run: mask APl.")
    assert "| mae | 2 | 41.0 ± 1.4 | 60.5 ± 0.7 | 43.0 ± 1.4 | 20.5 ± 0.7 | 46.0 ± 1.4 | - | 35.5 ± 0.7 | " \
           "55.5 ± 0.7 | 37.0 ± 1.4 | 15.5 ± 0.7 | 41.0 ± 1.4 |" in md
    assert "| scratch | 2 | 30.5 ± 0.7 | 50.0 ± 0.0 | 29.5 ± 0.7 | 10.5 ± 0.7 | 34.5 ± 0.7 | - | 27.5 ± 0.7 | " \
           "44.5 ± 0.7 | 26.5 ± 0.7 | 8.5 ± 0.7 | 30.0 ± 0.0 |" in md
    # One run: no std. The float 55.55 is 55.5499..., so one decimal gives 55.5.
    assert "| supervised | 1 | 36.0 | 55.5 | 37.0 | 14.0 | 41.0 | 70.0 | 31.0 | 50.0 | 32.0 | 12.0 | 36.0 |" in md
    assert "## Δ vs scratch (difference of means)" in md
    assert f"| init | {cols} |" in md
    assert "| mae | +10.5 | +10.5 | +13.5 | +10.0 | +11.5 | - | +8.0 | +11.0 | +10.5 | +7.0 | +11.0 |" in md
    assert "| supervised | +5.5 | +5.5 | +7.5 | +3.5 | +6.5 | - | +3.5 | +5.5 | +5.5 | +3.5 | +6.0 |" in md
    assert not any(line.startswith("| scratch | +") for line in md)
    # Runs: grouped in first-appearance order, sorted by seed inside a group.
    run_rows = [line for line in md if line.startswith("| ") and "/" in line]
    assert [r.split(" | ")[2].rsplit("/", 1)[1] for r in run_rows] == [
        "mae_s0", "mae_s1", "scratch_s0", "scratch_s1", "sup_s0"]
    assert run_rows[0] == f"| mae | 0 | {runs[0]} | 40.0 | 60.0 | 42.0 | 20.0 | 45.0 | - | 35.0 | 55.0 | 36.0 | " \
                          "15.0 | 40.0 |"
    assert "Published" not in "\n".join(md) and "Skipped" not in "\n".join(md)


def test_statistics_are_mean_and_sample_std():
    s = summarize([40.0, None, 42.0, 47.0])
    assert s.n == 3 and s.mean == pytest.approx(43.0) and s.std == pytest.approx(math.sqrt(13.0))
    assert summarize([None, None]) is None
    one = summarize([5.0])
    assert one.mean == 5.0 and one.std is None and one.n == 1
    assert format_stat(s, 3) == "43.0 ± 3.6"
    assert format_stat(s, 4) == "43.0 ± 3.6 (n=3)"
    assert format_stat(one, 1) == "5.0" and format_stat(None, 2) == "-"


def test_deltas_are_differences_of_means(runs):
    groups = aggregate(collect_runs(runs)[0])
    d = deltas(groups, "supervised")
    assert set(d) == {"mae", "scratch"}
    assert d["mae"]["bbox/AP"] == pytest.approx(5.0) and d["scratch"]["segm/AP"] == pytest.approx(-3.5)
    assert d["mae"]["bbox/APl"] is None  # supervised has box APl, mae has none
    with pytest.raises(ResultError, match="baseline group 'random' not among the runs' groups: mae, scratch"):
        deltas(groups, "random")


def test_nulls_render_as_dash_and_partial_counts_are_shown(tmp_path):
    dirs = [_run(tmp_path, "a", "mae", 0, _ap([10, 20, 30, None, 5, None], [1, 2, 3, None, None, None])),
            _run(tmp_path, "b", "mae", 1, _ap([12, 20, 30, 7, 5, None], [1, 2, 3, None, None, None]))]
    md = render_markdown(aggregate(collect_runs(dirs)[0]))
    assert ("| init | det runs | box AP | box AP50 | box AP75 | box APs | box APm | mask AP | mask AP50 | "
            "mask AP75 |") in md
    assert "Left out, no value in any run: box APl, mask APs, mask APm, mask APl." in md
    assert "| mae | 2 | 11.0 ± 1.4 | 20.0 ± 0.0 | 30.0 ± 0.0 | 7.0 (n=1) | 5.0 ± 0.0 | 1.0 ± 0.0 | 2.0 ± 0.0 | " \
           "3.0 ± 0.0 |" in md
    assert f"| mae | 0 | {dirs[0]} | 10.0 | 20.0 | 30.0 | - | 5.0 | 1.0 | 2.0 | 3.0 |" in md
    # The CSV keeps every column, empty ones included.
    assert render_csv(aggregate(collect_runs(dirs)[0])).splitlines()[0].endswith("mask_APs,mask_APm,mask_APl")
    assert "Δ" not in md


def test_missing_task_is_null_and_nan_is_null(tmp_path):
    d = tmp_path / "r"
    _run(tmp_path, "r", "mae", 0)
    (d / "ap_results.json").write_text('{"bbox": {"AP": 1, "AP50": 2, "AP75": 3, "APs": NaN, "APm": 5, "APl": 6}}')
    r = load_run(d)
    assert r.values["bbox/APs"] is None and r.values["bbox/AP"] == 1.0 and r.values["segm/AP"] is None


def test_csv_is_exact(tmp_path):
    dirs = [_run(tmp_path, "m0", "mae", 0, _ap([40, 60, 42, 20, 45, None], [35, 55, 36, 15, 40, None])),
            _run(tmp_path, "m1", "mae", 1, _ap([42, 61, 44, 21, 47, None], [36, 56, 38, 16, 42, None])),
            _run(tmp_path, "s0", "scratch", 0, _ap([30, 50, 29, 11, 34, None], [27, 44, 26, 9, 30, None]))]
    text = render_csv(aggregate(collect_runs(dirs)[0]), baseline="scratch")
    lines = text.splitlines()
    assert lines[0] == ("kind,init,seed,run,iter,note,source,model,box_AP,box_AP50,box_AP75,box_APs,box_APm,box_APl,mask_AP,"
                        "mask_AP50,mask_AP75,mask_APs,mask_APm,mask_APl")
    assert lines[1] == (f"run,mae,0,{dirs[0]},,,,,40.0000,60.0000,42.0000,20.0000,45.0000,,35.0000,55.0000,36.0000,"
                        "15.0000,40.0000,")
    assert lines[4] == ("mean,mae,,,,,,,41.0000,60.5000,43.0000,20.5000,46.0000,,35.5000,55.5000,37.0000,15.5000,"
                        "41.0000,")
    assert lines[5] == "std,mae,,,,,,,1.4142,0.7071,1.4142,0.7071,1.4142,,0.7071,0.7071,1.4142,0.7071,1.4142,"
    assert lines[6] == "n,mae,,,,,,,2,2,2,2,2,0,2,2,2,2,2,0"
    assert lines[7] == ("delta_vs_scratch,mae,,,,,,,11.0000,10.5000,14.0000,9.5000,12.0000,,8.5000,11.5000,11.0000,"
                        "6.5000,11.0000,")
    assert lines[8].startswith("mean,scratch,,,,,,,30.0000,") and lines[9] == "std,scratch,,,,,,," + "," * 11
    assert lines[10] == "n,scratch,,,,,,,1,1,1,1,1,0,1,1,1,1,1,0"
    assert len(lines) == 11


def test_classification_columns_join_the_table(tmp_path):
    dirs = [_run(tmp_path, "m", "mae", 0, _ap([40] * 6, [30] * 6)),
            _run(tmp_path, "mcls", "mae", 0, cls={"knn_top1": 81.25, "linear_top1": 90.0, "pool": "cls", "k": 20}),
            _run(tmp_path, "s", "scratch", 0, _ap([20] * 6, [10] * 6), cls={"knn_top1": 41.25, "linear_top1": None})]
    md = render_markdown(aggregate(collect_runs(dirs)[0]), baseline="scratch")
    assert "| init | det runs | cls runs | box AP | box AP50 | box AP75 | box APs | box APm | box APl | mask AP | " \
           "mask AP50 | mask AP75 | mask APs | mask APm | mask APl | kNN top-1 | linear top-1 |" in md
    assert "| mae | 1 | 1 | " + " | ".join(["40.0"] * 6 + ["30.0"] * 6) + " | 81.2 | 90.0 |" in md
    assert "| scratch | 1 | 1 | " + " | ".join(["20.0"] * 6 + ["10.0"] * 6) + " | 41.2 | - |" in md
    assert "| mae | " + " | ".join(["+20.0"] * 12) + " | +40.0 | - |" in md
    with pytest.raises(ResultError, match=r"cls_results.json: no \*_top1 key"):
        load_run(_run(tmp_path, "bad", "mae", 0, cls={"pool": "cls"}))


@pytest.mark.parametrize(
    "ap_text, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object with 'bbox' and/or 'segm', got list"),
        ('{"box": {}}', "expected key 'bbox' and/or 'segm', found \\['box'\\]"),
        ('{"bbox": {"AP": 1, "AP50": 2, "AP75": 3, "APs": 4, "APm": 5}}', "'bbox' lacks metric 'APl'"),
        ('{"bbox": {"AP": "41.0", "AP50": 2, "AP75": 3, "APs": 4, "APm": 5, "APl": 6}}',
         "bbox.AP must be a finite number or null, got '41.0'"),
        ('{"segm": [1, 2]}', "'segm' must be an object of AP metrics, got list"),
    ],
)
def test_malformed_ap_results_name_the_file(tmp_path, ap_text, message):
    d = Path(_run(tmp_path, "r", "mae", 0))
    (d / "ap_results.json").write_text(ap_text)
    with pytest.raises(ResultError, match=str(d / "ap_results.json") + ": " + message):
        load_run(d)


def test_missing_files_and_provenance_errors_name_the_path(tmp_path):
    with pytest.raises(ResultError, match=f"{tmp_path / 'nope'}: run directory not found"):
        load_run(tmp_path / "nope")
    d = tmp_path / "noinfo"
    d.mkdir()
    with pytest.raises(ResultError, match=f"{d / 'run_info.json'}: file not found"):
        load_run(d)
    empty = _run(tmp_path, "empty", "mae", 0)
    with pytest.raises(ResultError, match=f"{Path(empty) / 'ap_results.json'}: file not found"):
        load_run(empty)
    no_init = _run(tmp_path, "noinit", None, 0, _ap([1] * 6, [1] * 6))
    with pytest.raises(ResultError, match="'init_type' must be a non-empty string, got None .*--label"):
        load_run(no_init)
    assert load_run(no_init, label="custom").group == "custom"
    (tmp_path / "noinit" / "run_info.json").write_text('{"init_type": "mae", "seed": "0"}')
    with pytest.raises(ResultError, match="'seed' must be an integer, got '0'"):
        load_run(no_init)


def test_skip_invalid_lists_every_skip(tmp_path, runs):
    bad = _run(tmp_path, "bad", "mae", 2)
    (Path(bad) / "ap_results.json").write_text("{")
    with pytest.raises(ResultError, match="bad/ap_results.json"):
        collect_runs(runs + [bad])
    good, skipped = collect_runs(runs + [bad, str(tmp_path / "gone")], skip_invalid=True)
    assert len(good) == 5 and len(skipped) == 2
    md = render_markdown(aggregate(good), skipped=skipped)
    assert "## Skipped: 2 run directories with missing or malformed results" in md
    assert f"- {bad}/ap_results.json: not valid JSON" in md and f"- {tmp_path / 'gone'}: run directory not found" in md
    with pytest.raises(ResultError, match="no valid run directory; skipped: .*gone"):
        compare([str(tmp_path / "gone")], tmp_path / "out", skip_invalid=True)


def test_labels_override_grouping(runs):
    got, _ = collect_runs(runs, labels={runs[0]: "mae_long", runs[2]: "mae_long"})
    assert [g.group for g in aggregate(got)] == ["mae_long", "scratch", "supervised"]
    with pytest.raises(ResultError, match="--label names a directory that is not among the runs: .*elsewhere"):
        collect_runs(runs, labels={"/elsewhere": "x"})


def test_compare_writes_table_csv_chart_and_labelled_published_rows(runs, tmp_path):
    paths = compare(runs, tmp_path / "out", baseline="scratch", published=True, title="demo")
    md = paths["markdown"].read_text()
    summary, published = md.split("## Published reference")
    assert "50.3" not in summary and "MAE paper" not in summary
    assert "not measured here" in published.splitlines()[0]
    assert "| MAE paper Table 4 | ViT-B | MAE | 50.3 | 44.9 |" in published
    assert "| ViTDet README | ViT-L | MAE | 55.5 | 49.2 |" in published
    csv_lines = paths["csv"].read_text().splitlines()
    assert "published,MAE,,,,,MAE paper Table 4,ViT-B,50.3000,,,,,,44.9000,,,,," in csv_lines
    img = matplotlib.image.imread(paths["chart"])
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 200


def test_compare_shows_the_runs_inside_its_output_folder_by_relative_path(runs, tmp_path):
    md = compare(runs, tmp_path, baseline="scratch")["markdown"].read_text()  # the runs lie in tmp_path
    assert "| mae | 0 | mae_s0 | 40.0 |" in md and str(tmp_path) not in md
    md = compare(runs, tmp_path / "elsewhere", baseline="scratch")["markdown"].read_text()
    assert f"| mae | 0 | {runs[0]} | 40.0 |" in md  # outside the output folder: as given
    csv_text = compare(runs, tmp_path)["csv"].read_text()
    assert f",{runs[0]}," in csv_text and ",mae_s0," not in csv_text  # the CSV keeps the paths as given


def test_tool_prints_table_and_fails_with_the_path(runs, tmp_path, repo_root, capsys):
    spec = importlib.util.spec_from_file_location("compare_ap_tool", repo_root / "tools/compare_ap.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(runs + ["--output", str(tmp_path / "o"), "--label", f"{runs[4]}=sup", "--baseline", "scratch"])
    out = capsys.readouterr().out
    assert "| sup | 1 | 36.0 |" in out and (tmp_path / "o/ap_table.png").is_file()
    (Path(runs[1]) / "ap_results.json").unlink()
    with pytest.raises(SystemExit, match=f"compare_ap: {runs[1]}/ap_results.json: file not found"):
        tool.main(runs + ["--output", str(tmp_path / "o")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse's usage error, before any run is read
        tool.main(runs + ["--label", "no-equals-sign"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: argument --label: --label expects DIR=NAME, got 'no-equals-sign'")


def test_delta_format_rounds_and_never_shows_minus_zero():
    from mae_det.evaluation.compare import format_delta

    assert format_delta(1.25) == "+1.2" and format_delta(-0.31) == "-0.3" and format_delta(None) == "-"
    assert format_delta(-0.004) == "+0.0" and format_delta(0.04) == "+0.0"


def _seg(d: str, miou: float, per_class: dict) -> str:
    (Path(d) / "sem_seg_results.json").write_text(json.dumps(
        {"sem_seg": {"mIoU": miou, "fwIoU": 80.0, "mACC": miou + 5, "pACC": 90.0, "IoU": per_class}, "iteration": 3}))
    return d


def test_miou_is_tabled_next_to_ap_with_mean_std_and_deltas(tmp_path):
    runs = [
        _seg(_run(tmp_path, "mae_s0", "mae", 0, _ap([40] * 6, [35] * 6)), 50.0, {"background": 90.0, "ring": None}),
        _seg(_run(tmp_path, "mae_s1", "mae", 1), 54.0, {"background": 92.0, "ring": 10.0}),
        _seg(_run(tmp_path, "scratch_s0", "scratch", 0), 41.0, {"background": 88.0, "ring": 2.0}),
    ]
    groups = aggregate(collect_runs(runs)[0])
    md = render_markdown(groups, baseline="scratch", published=True).splitlines()
    header = next(line for line in md if line.startswith("| init | det runs"))
    assert header.endswith("| seg mIoU | seg fwIoU | seg mACC | seg pACC | seg IoU-background | seg IoU-ring |")
    assert "| init | det runs | seg runs |" in header
    mae = next(line for line in md if line.startswith("| mae | 1 | 2 |"))
    assert mae.endswith("| 52.0 ± 2.8 | 80.0 ± 0.0 | 57.0 ± 2.8 | 90.0 ± 0.0 | 91.0 ± 1.4 | 10.0 (n=1) |")
    delta = next(line for line in md if line.startswith("| mae | ") and "+11.0" in line)
    assert delta.endswith("| +11.0 | +0.0 | +11.0 | +0.0 | +3.0 | +8.0 (n=1) |")  # one run of the group has it
    assert "| MAE paper Table 5 | ViT-B | MAE | 48.1 |" in md
    csv_text = render_csv(groups, baseline="scratch")
    assert csv_text.splitlines()[0].endswith("seg_mIoU,seg_fwIoU,seg_mACC,seg_pACC,seg_IoU-background,seg_IoU-ring")
    paths = compare(runs, tmp_path / "out", baseline="scratch")
    assert matplotlib.image.imread(paths["chart"]).shape[1] > 3 * 5.5 * 100  # box, mask, segmentation panels


def test_malformed_sem_seg_results_name_the_file(tmp_path):
    d = _run(tmp_path, "bad", "mae", 0)
    (Path(d) / "sem_seg_results.json").write_text(json.dumps({"sem_seg": {"mIoU": 1.0}}))
    with pytest.raises(ResultError, match=r"bad/sem_seg_results.json: 'sem_seg' lacks fwIoU, mACC, pACC"):
        load_run(d)


def test_a_run_folder_given_twice_counts_once(runs, tmp_path, caplog, monkeypatch):
    (tmp_path / "link").symlink_to(runs[0])
    monkeypatch.chdir(tmp_path)
    given = [*runs, runs[0] + "/", "mae_s0", str(tmp_path / "link"), runs[2]]
    got, _ = collect_runs(given)
    assert [r.path for r in got] == runs  # each folder once, as first given
    assert caplog.text.count("given more than once") == 1
    assert f"counted once: {runs[0]}/ (= {runs[0]}), mae_s0 (= {runs[0]}), {tmp_path / 'link'} (= {runs[0]}), " \
           f"{runs[2]}\n" in caplog.text
    md = compare(given, tmp_path / "out", baseline="scratch")["markdown"].read_text()
    assert "| mae | 2 | 41.0 ± 1.4 |" in md  # the mean and std of two runs, not of 40, 40, 40, 40, 42, 42


def test_no_chart_when_no_metric_has_a_value(tmp_path, repo_root, caplog, capsys):
    run = _run(tmp_path, "undefined", "mae", 0, cls={"knn_top1": None})  # (a run that detected nothing is AP 0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ap_table.png").write_bytes(b"an earlier comparison's chart")
    paths = compare([run], tmp_path / "out", baseline=None)
    assert set(paths) == {"markdown", "csv"} and not (tmp_path / "out" / "ap_table.png").exists()
    assert f"| mae | 0 | {run} |" in paths["markdown"].read_text() and paths["csv"].is_file()
    assert "no chart: no metric has a value in any run" in caplog.text
    spec = importlib.util.spec_from_file_location("compare_ap_tool", repo_root / "tools/compare_ap.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main([run, "--baseline", "none", "--output", str(tmp_path / "tool")])  # returns: exit code 0
    out = capsys.readouterr().out
    assert "[compare_ap] markdown:" in out and "[compare_ap] chart:" not in out


def _cls_run(root: Path, name: str, init: str, checkpoint: str | None, sha: str | None, top1: float,
             seed: int = 0) -> str:
    return _run(root, name, init, seed, cls={"knn_top1": top1}, init_checkpoint=checkpoint,
                init_checkpoint_sha256=sha)


def test_runs_of_different_checkpoints_are_not_averaged_under_one_init_type(tmp_path, caplog):
    # Classification runs recorded "pretrained" for every encoder before init_label read the checkpoint.
    mae = _cls_run(tmp_path, "knn_mae", "pretrained", "/o/pretrain_mae/encoder.pth", "a" * 64, 19.7)
    sup = _cls_run(tmp_path, "knn_sup", "pretrained", "/o/pretrain_supervised/encoder.pth", "b" * 64, 28.3)
    again = _cls_run(tmp_path, "knn_mae_again", "pretrained", "/elsewhere/pretrain_mae/encoder.pth", "a" * 64, 20.1,
                     seed=1)
    det = _run(tmp_path, "det_mae", "mae", 0, _ap([40] * 6, [30] * 6), init_checkpoint="/o/pretrain_mae/encoder.pth",
               init_checkpoint_sha256="a" * 64)
    scratch = _cls_run(tmp_path, "knn_random", "random", None, None, 17.0)
    groups = aggregate(collect_runs([mae, sup, again, det, scratch])[0])
    assert [(g.group, g.stats["knn_top1"] and round(g.stats["knn_top1"].mean, 1)) for g in groups] == [
        ("pretrained (pretrain_mae/encoder.pth)", 19.9),  # the same file (hash) under two paths: one encoder
        ("pretrained (pretrain_supervised/encoder.pth)", 28.3),
        ("mae", None), ("random", 17.0)]
    assert caplog.text.count("different init checkpoints") == 1
    assert "group 'pretrained' holds runs of 2 different init checkpoints" in caplog.text
    # A label is the user's grouping, e.g. fine-tunings of several pretraining seeds averaged on purpose.
    got, _ = collect_runs([mae, sup], labels={mae: "any", sup: "any"})
    assert {r.group for r in got} == {"any"}
    # Checkpoints that share folder and file name are told apart by hash, or by path where none was recorded.
    a = _cls_run(tmp_path, "a", "mae", "/x/run/encoder.pth", "c" * 64, 1.0)
    b = _cls_run(tmp_path, "b", "mae", "/y/run/encoder.pth", "d" * 64, 2.0)
    c = _cls_run(tmp_path, "c", "mae", "/z/run/encoder.pth", None, 3.0)
    none = _cls_run(tmp_path, "n", "mae", None, None, 4.0)
    assert [r.group for r in collect_runs([a, b, c, none])[0]] == [
        "mae (run/encoder.pth cccccccc)", "mae (run/encoder.pth dddddddd)", "mae (/z/run/encoder.pth)",
        "mae (no checkpoint)"]
    with pytest.raises(ResultError, match="knn_bad/run_info.json: 'init_checkpoint' must be a non-empty string or "
                                          "null, got 3"):
        load_run(_cls_run(tmp_path, "knn_bad", "mae", 3, None, 1.0))


def test_classification_runs_are_labelled_by_their_encoders_pretraining(tmp_path):
    from mae_det.checkpoint import atomic_save
    from mae_det.config.pretrain import get_pretrain_cfg
    from mae_det.engine.finetune_cls import run_knn
    from mae_det.engine.pretrain import export_encoder, model_meta
    from mae_det.modeling.vit import VisionTransformer
    from tests.engine.test_finetune_cls import TINY, color_folders, tiny_cfg

    color_folders(tmp_path / "data", 2, 1)
    pre = get_pretrain_cfg()
    pre.MODEL.ARCH, pre.MODEL.IMG_SIZE, pre.MODEL.NUM_CLASSES = "mae_vit_tiny_patch16", 32, 3
    pre.MODEL.EMBED_DIM, pre.MODEL.DEPTH, pre.MODEL.NUM_HEADS, pre.MODEL.PATCH_SIZE = 64, 2, 4, 8
    runs = []
    for name in ("mae", "supervised", "official"):
        weights = tmp_path / f"{name}.pth"
        state = VisionTransformer(img_size=32, **TINY).state_dict()
        if name == "official":  # a checkpoint that does not say how it was trained (official MAE, timm)
            atomic_save({"model": state}, weights)
        else:
            pre.MODEL.MODE = name
            export_encoder(state, model_meta(pre, pre.MODEL.NUM_CLASSES), weights)
        out = tmp_path / f"knn_{name}"
        res = run_knn(tiny_cfg(tmp_path / "data", out, **{"MODEL.WEIGHTS": str(weights)}), argv=[])
        info = json.loads((out / "run_info.json").read_text())
        assert res["init_type"] == info["init_type"] == {"official": "pretrained"}.get(name, name)
        runs.append(str(out))
    cfg = tiny_cfg(tmp_path / "data", tmp_path / "knn_set", **{"MODEL.WEIGHTS": str(tmp_path / "mae.pth"),
                                                               "MODEL.INIT_TYPE": "mae_800ep"})
    assert run_knn(cfg, argv=[])["init_type"] == "mae_800ep"  # a label set in the config wins
    assert [g.group for g in aggregate(collect_runs(runs)[0])] == ["mae", "supervised", "pretrained"]


def test_two_runs_of_one_seed_in_a_group_are_refused_unless_labelled(tmp_path):
    # the README's `compare_ap.py output/coco/*` averaged ViT-B, ViT-L, Cascade and _fpn scratch runs (all seed 0,
    # no init checkpoint) into one "scratch" row with a std, and kNN with the cls token and with the patch mean
    simple = _run(tmp_path, "scratch_simple", "scratch", 0, _ap([30] * 6, [25] * 6))
    multi_tap = _run(tmp_path, "scratch_multi_tap", "scratch", 0, _ap([34] * 6, [28] * 6))
    seed1 = _run(tmp_path, "scratch_simple_s1", "scratch", 1, _ap([31] * 6, [26] * 6))
    with pytest.raises(ResultError, match=r"scratch_simple and .*scratch_multi_tap are both seed 0 of 'scratch' and "
                                          r"report bbox/AP: averaging them would count other recipes"):
        collect_runs([simple, multi_tap, seed1])
    assert len(collect_runs([simple, seed1])[0]) == 2  # one recipe, two seeds
    labelled, _ = collect_runs([simple, multi_tap], labels={simple: "scratch", multi_tap: "scratch"})
    assert len(aggregate(labelled)[0].runs) == 2  # a label groups them on purpose
    cls_token = _cls_run(tmp_path, "knn_cls", "mae", "/o/encoder.pth", "e" * 64, 19.7)
    patch_mean = _cls_run(tmp_path, "knn_mean", "mae", "/o/encoder.pth", "e" * 64, 24.0)
    with pytest.raises(ResultError, match="report knn_top1"):
        collect_runs([cls_token, patch_mean])

