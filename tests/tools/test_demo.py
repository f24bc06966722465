import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mae_det.evaluation.operating_point import operating_point
from mae_det.utils.provenance import cpu_model

ARMS = ("mae", "supervised", "scratch")


@pytest.mark.slow
def test_quick_demo_end_to_end_and_resume(tmp_path, repo_root):
    out, data = tmp_path / "demo", tmp_path / "data"
    cmd = [sys.executable, str(repo_root / "tools/demo.py"), "--profile", "quick", "--output", str(out),
           "--data-root", str(data)]
    done = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "stage 1/24" in done.stdout and "stage 24/24" in done.stdout
    # The console holds progress bars and result lines, not the tools' output (that is in the logs).
    assert "d2.utils.events" not in done.stdout and "Warning" not in done.stdout + done.stderr
    assert re.search(r"\[demo\] finetune_mae_s0: done in \d+:\d\d wall, \d+:\d\d CPU: box AP \d+\.\d, mask AP", done.stdout)

    report = (out / "REPORT.md").read_text()
    head = next(line for line in report.splitlines() if line.startswith("| init | seed | run | "))
    columns = [c.strip() for c in head.strip("|").split("|")]
    for arm in ARMS:
        row = next(line for line in report.splitlines() if line.startswith(f"| {arm} | 0 | "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        box_ap, mask_ap = cells[columns.index("box AP")], cells[columns.index("mask AP")]
        assert cells[columns.index("iter")] == str(json.loads(
            (out / f"finetune_{arm}_s0" / "ap_results.json").read_text())["iteration"])
        assert math.isfinite(float(box_ap)) and math.isfinite(float(mask_ap)), row
        ap = json.loads((out / f"finetune_{arm}_s0" / "ap_results.json").read_text())
        assert f"{ap['bbox']['AP']:.1f}" == box_ap and f"{ap['segm']['AP']:.1f}" == mask_ap
        assert json.loads((out / f"finetune_{arm}_s0" / "run_info.json").read_text())["init_type"] == arm
    assert re.search(r"\| MAE pretraining \| ran \| \d+:\d\d \| \d+:\d\d \|", report)
    # The numbers depend on the CPU's bf16 kernels, so the report names the machine they came from.
    assert f" on {cpu_model()} (" in report and "torch CPU kernels " in report
    # The supervised baseline's own held-out metric and the encoder checks, also as CSV rows.
    m = re.search(r"held-out count accuracy (\d+\.\d) % \(constant prediction (\d+\.\d) %\), count cross-entropy "
                  r"(\d+\.\d{3}) \(constant prediction (\d+\.\d{3}); difference ([+-]\d+\.\d{3}), 95 % interval "
                  r"([+-]\d+\.\d{3}) to ([+-]\d+\.\d{3}) over images\), presence mAP (\d+\.\d) % \(random ranking "
                  r"(\d+\.\d) %\)", report)
    assert m and all(0 <= float(m.group(i)) <= 100 for i in (1, 2, 3, 4, 8, 9)), report
    heldout = json.loads((out / "supervised_heldout.json").read_text())
    assert m.group(3) == f"{heldout['count_loss']:.3f}" and heldout["count_loss"] > 0
    assert float(m.group(6)) <= float(m.group(5)) <= float(m.group(7)), report
    (val_json,) = data.rglob("instances_val.json")
    val = json.loads(val_json.read_text())
    has = {(a["image_id"], a["category_id"]) for a in val["annotations"]}
    freq = [sum((im["id"], c["id"]) in has for im in val["images"]) / len(val["images"]) for c in val["categories"]]
    assert m.group(9) == f"{100 * sum(freq) / len(freq):.1f}"
    # Its label kind and reference loss come from its own config (counts), not from the MAE config.
    (pool_json,) = data.rglob("instances_pool.json")
    assert "per-class instance counts of each pool image (softmax over 0..3)" in report
    assert "RoIs/image, Large Scale Jitter 0.8-1.25 of 64 px, horizontal flips |" in report  # from the run's config
    train = json.loads(next(data.rglob("instances_train.json")).read_text())
    assert f"fine-tuned on the train split ({len(train['images'])} labeled images)" in report
    ratio = yaml.safe_load((out / "pretrain_mae" / "config.yaml").read_text())["MODEL"]["MASK_RATIO"]
    assert f"original | {ratio * 100:g} % masked (the pretraining's ratio) |" in report  # not a fixed 75 %
    assert (f"(cross-entropy over per-class counts; a constant prediction scores "
            f"{chance_loss(pool_json, 3):.3f})") in report
    encoders = (out / "demo_encoders.csv").read_text().splitlines()
    assert encoders[0] == ("init,seed,knn_top1,knn_mean_top1,linear_top1,finetune_top1,partial_finetune_top1,"
                           "heldout_count_accuracy,heldout_presence_map,heldout_count_loss,heldout_count_loss_constant")
    for arm, line in zip(ARMS, encoders[1:]):
        fields = line.split(",")
        assert fields[:2] == [arm, "0"] and all(0 <= float(v) <= 100 for v in fields[2:7]), line
        assert f"| {arm} | " + " | ".join(f"{float(v):.1f}" for v in fields[2:7]) + " |" in report
        assert fields[9:] == ([f"{heldout['count_loss']:.3f}", f"{heldout['count_loss_constant']:.3f}"]
                              if arm == "supervised" else ["", ""]), line
    rows = (out / "demo_experiment.csv").read_text().splitlines()
    assert rows[0].startswith("init,seed,label_fraction,num_labeled,box_AP,box_AP50,mask_AP,mask_AP50") and len(rows) == 4
    for png in ("ap_table.png", "mae_reconstruction.png", "pretrain_curves.png", "detections.png"):
        with Image.open(out / png) as img:
            assert img.width > 200 and img.height > 100, png
    with Image.open(out / "detections.png") as img:
        assert img.width >= 4 * 256  # ground truth + three inits, panels of at least 256 px
    # What the figure shows, measured on every val image at the figure's threshold.
    assert f"on all {len(val['images'])} val images ({len(val['annotations'])} objects)" in report
    for arm in ARMS:
        results = json.loads((out / f"finetune_{arm}_s0" / "inference" / "coco_instances_results.json").read_text())
        op = operating_point(val, results, score=0.5)
        assert f"| {arm} | {op['found']:.1f} | {op['found_right_class']:.1f} | " in report
    assert (out / "ap_table.csv").read_text().startswith("kind,init,seed,run,")
    assert (out / "logs" / "finetune_mae_s0.log").stat().st_size > 0

    # A second invocation finds every stage up to date and only rewrites the report.
    again = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count(": up to date (ran in") == 24
    assert "| MAE pretraining | skipped |" in (out / "REPORT.md").read_text()

    # A second pretraining seed adds only its own stages: both encoders, the held-out check, two Mask R-CNN runs.
    more = subprocess.run(cmd + ["--pretrain-seeds", "2"], cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert more.stdout.count(": up to date (ran in") == 24 and "stage 29/29" in more.stdout
    report = (out / "REPORT.md").read_text()
    assert "## Pretraining seeds" in report and re.search(r"\| mae \| 1 \| \d+\.\d \| \d+\.\d \|", report)
    assert re.search(r"- seed 1: held-out count accuracy \d+\.\d %", report)
    rows = (out / "demo_pretrain_seeds.csv").read_text().splitlines()
    assert rows[0] == "init,pretrain_seed,seed,box_AP,mask_AP" and len(rows) == 1 + 5
    ap = json.loads((out / "finetune_supervised_p1_s0" / "ap_results.json").read_text())
    assert f"supervised,1,0,{ap['bbox']['AP']:.2f},{ap['segm']['AP']:.2f}" in rows

    # Half the labels and the pyramid check: the subsets, each init on them, and each init with the simple pyramid
    # at both fractions; the label-efficiency figure and the pyramid check's rows come from those runs.
    more = subprocess.run(cmd + ["--pretrain-seeds", "2", "--label-fractions", "0.5", "--reference-pyramid", "simple"],
                          cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert more.stdout.count(": up to date (ran in") == 29 and "stage 39/39" in more.stdout
    report = (out / "REPORT.md").read_text()
    n = len(train["images"])
    assert "## Label efficiency" in report and "Dashed: the same runs with the `simple` pyramid" in report
    assert f"| {n} | scratch | " in report and f"| {n // 2} | mae | " in report
    assert re.search(rf"- {n // 2} labels, mask AP: MAE \((multi_tap|simple), ", report)
    rows = (out / "demo_pyramid.csv").read_text().splitlines()
    assert rows[0] == "init,pyramid,seed,label_fraction,num_labeled,box_AP,mask_AP" and len(rows) == 1 + 12
    ap = json.loads((out / "finetune_scratch_simple_s0_f50" / "ap_results.json").read_text())
    assert f"scratch,simple,0,0.5,{n // 2},{ap['bbox']['AP']:.2f},{ap['segm']['AP']:.2f}" in rows
    with Image.open(out / "label_efficiency.png") as img:
        assert img.width > 200 and img.height > 100


# ---- the stage machinery (fast) ----------------------------------------------------------------------------
from mae_det.demo import (  # noqa: E402
    PROFILES,
    REPO,
    DemoError,
    DemoPaths,
    Stage,
    StageRunner,
    _augmentation,
    _verdict,
    bootstrap_interval,
    build_stages,
    chance_loss,
    config_chain,
    constant_loss,
)
from mae_det.evaluation.compare import RunResult, aggregate  # noqa: E402

TOOL = """import sys, pathlib
out = pathlib.Path(sys.argv[sys.argv.index("OUT") + 1])
out.mkdir(parents=True, exist_ok=True)
print("tool says hello", flush=True)
for k in range(1, 4):
    print(f"work {k}/3", flush=True)
sum(i * i for i in range(300000))  # some CPU time to measure
(out / "args.txt").write_text(" ".join(sys.argv[1:]))
if "FAIL" in sys.argv:
    sys.exit(3)
(out / "result.txt").write_text("ok")
"""


def _tool_stage(tmp_path, *extra, key="train", params=None, resumable=True):
    script = tmp_path / "tool.py"
    script.write_text(TOOL)
    out = tmp_path / "out" / key
    return Stage(key=key, title=f"train {key}", params=params or {"lr": 1}, outputs=[out / "result.txt"],
                 command=[str(script), "OUT", str(out), *extra], resumable=resumable, out_dir=out)


def _quiet_runner(tmp_path):
    lines = []
    return StageRunner(tmp_path / "out", log=lines.append), lines


def test_in_process_stage_runs_once_then_is_skipped(tmp_path):
    calls = []
    target = tmp_path / "made.txt"

    def work():
        calls.append(1)
        target.write_text("x")

    stage = Stage(key="make", title="make it", params={"a": 1}, outputs=[target], run=work)
    runner, lines = _quiet_runner(tmp_path)
    runner.run_all([stage])
    assert calls == [1] and runner.wall["make"][3] == "ran"
    assert any("stage 1/1: make it" in line for line in lines)
    runner2, lines2 = _quiet_runner(tmp_path)
    runner2.run_all([stage])
    assert calls == [1] and runner2.wall["make"][3] == "skipped" and any("up to date" in x for x in lines2)
    target.unlink()  # a done stage whose output vanished runs again
    _quiet_runner(tmp_path)[0].run_all([stage])
    assert calls == [1, 1]


def test_changed_settings_restart_in_a_clean_directory_and_propagate(tmp_path):
    stage = _tool_stage(tmp_path)
    calls = []
    after = Stage(key="after", title="after", params={}, outputs=[tmp_path / "after.txt"], deps=["train"],
                  run=lambda: (calls.append(1), (tmp_path / "after.txt").write_text("y")))
    _quiet_runner(tmp_path)[0].run_all([stage, after])
    stale = stage.out_dir / "stale.txt"
    stale.write_text("from the old settings")
    changed = _tool_stage(tmp_path, params={"lr": 2})
    runner, lines = _quiet_runner(tmp_path)
    runner.run_all([changed, after])
    assert not stale.exists() and (changed.out_dir / "result.txt").exists()
    assert any("settings changed" in line for line in lines)
    assert calls == [1, 1]  # its input changed, so the dependent stage ran again
    assert runner.wall["train"][3] == "ran"


def test_interrupted_tool_stage_is_resumed_with_the_flag(tmp_path):
    stage = _tool_stage(tmp_path, "FAIL")
    with pytest.raises(DemoError) as e:
        _quiet_runner(tmp_path)[0].run_all([stage])
    log = tmp_path / "out" / "logs" / "train.log"
    assert "stage 1/1 'train train' failed with exit code 3" in str(e.value) and str(log) in str(e.value)
    assert "tool says hello" in str(e.value) and "tool says hello" in log.read_text()
    ok = _tool_stage(tmp_path)  # same settings (the flag is not a setting here): continues the started run
    ok.params = stage.params
    ok.command = [c for c in stage.command if c != "FAIL"]
    stage_state = json.loads((tmp_path / "out" / ".stages" / "train.json").read_text())
    assert stage_state["status"] == "started"
    runner, _ = _quiet_runner(tmp_path)
    runner.run_all([ok])
    assert (ok.out_dir / "args.txt").read_text().startswith("--resume OUT ")
    assert runner.wall["train"][3] == "resumed"


def test_a_stage_whose_tool_cannot_resume_starts_over_when_unfinished_or_its_output_is_lost(tmp_path):
    stage = _tool_stage(tmp_path, "FAIL", resumable=False)
    with pytest.raises(DemoError):
        _quiet_runner(tmp_path)[0].run_all([stage])
    stale = stage.out_dir / "partial.txt"
    stale.write_text("from the interrupted run")
    stage.command = [c for c in stage.command if c != "FAIL"]
    runner, lines = _quiet_runner(tmp_path)
    runner.run_all([stage])
    assert (stage.out_dir / "args.txt").read_text().startswith("OUT ") and not stale.exists()
    assert runner.wall["train"][3] == "ran"
    assert f"[demo] train: unfinished, and its tool cannot resume, starting {stage.out_dir} over" in lines
    # Done, but its result file is gone: run again from a clean directory, not continued.
    (stage.out_dir / "result.txt").unlink()
    stale.write_text("x")
    runner, lines = _quiet_runner(tmp_path)
    runner.run_all([stage])
    assert (stage.out_dir / "args.txt").read_text().startswith("OUT ") and not stale.exists()
    assert runner.wall["train"][3] == "ran" and (stage.out_dir / "result.txt").exists()


def test_only_tools_that_take_resume_are_resumed(tmp_path, repo_root):
    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    stages = build_stages(PROFILES["quick"], paths, seeds=2, log=lambda _: None, fractions=[0.5, 1.0], semantic=True)
    tools = {}
    for s in stages:
        if s.command is not None:
            tools.setdefault(s.command[0], set()).add(s.resumable)
    assert tools == {"tools/pretrain.py": {True}, "tools/train_net.py": {True}, "tools/finetune_cls.py": {True},
                     "tools/knn_eval.py": {False}, "tools/linear_probe.py": {False}}
    # ... as the tools' own command lines say: each exits 2 at once, on the flag or on the missing config.
    procs = {tool: subprocess.Popen([sys.executable, tool, "--resume", "--config-file", str(tmp_path / "none.yaml")],
                                    cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for tool in tools}
    for tool, proc in procs.items():
        output = proc.communicate(timeout=120)[0]
        assert proc.returncode == 2, (tool, output)
        assert ("unrecognized arguments: --resume" not in output) == tools[tool].pop(), (tool, output)


def test_resuming_with_another_thread_count_says_it_is_not_bit_exact(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    stage = _tool_stage(tmp_path, "FAIL")
    with pytest.raises(DemoError):
        StageRunner(tmp_path / "out", threads=2, log=lambda line: None).run_all([stage])
    assert json.loads((tmp_path / "out" / ".stages" / "train.json").read_text())["threads"] == "2"
    stage.command = [c for c in stage.command if c != "FAIL"]
    lines = []
    runner = StageRunner(tmp_path / "out", threads=1, log=lines.append)
    runner.run_all([stage])
    assert runner.wall["train"][3] == "resumed"
    assert [line for line in lines if "thread" in line] == [
        f"[demo] train: resuming with 1 thread(s) per tool, started with 2: its numbers will differ from an "
        f"uninterrupted run's, rounding grows over training (delete {stage.out_dir} to start it over)"]
    # The same count says nothing.
    (tmp_path / "b").mkdir()
    again = _tool_stage(tmp_path / "b", "FAIL")
    with pytest.raises(DemoError):
        StageRunner(tmp_path / "b" / "out", threads=1, log=lambda line: None).run_all([again])
    again.command = [c for c in again.command if c != "FAIL"]
    lines.clear()
    StageRunner(tmp_path / "b" / "out", threads=1, log=lines.append).run_all([again])
    assert not [line for line in lines if "thread" in line]


def test_tool_output_goes_to_the_log_and_the_console_gets_a_bar_and_a_result(tmp_path):
    import re as re_

    stage = _tool_stage(tmp_path)
    stage.progress = lambda line: tuple(map(int, m.groups())) if (m := re_.match(r"work (\d+)/(\d+)", line)) else None
    stage.result = lambda: "answer 42"
    runner = StageRunner(tmp_path / "out", log=lambda _: None, bar_every=0.0)
    printed = []
    import mae_det.demo as demo_module

    real = demo_module._console
    demo_module._console = printed.append
    lines = []
    runner.log = lines.append
    try:
        runner.run_all([stage])
    finally:
        demo_module._console = real
    assert "tool says hello" in (tmp_path / "out" / "logs" / "train.log").read_text()
    assert not any("hello" in line for line in printed + lines)
    assert [line.split("| ")[1].split()[0] for line in printed] == ["33%", "67%", "100%"]
    assert printed[-1].startswith("[train] |########################| 100% (3/3)")
    done = next(line for line in lines if "done in" in line)
    assert ": answer 42 (elapsed" in done
    title, wall, cpu, status = runner.wall["train"]
    assert status == "ran" and 0 < cpu and wall > 0


def test_missing_outputs_name_the_stage_and_log(tmp_path):
    stage = _tool_stage(tmp_path)
    stage.outputs = [stage.out_dir / "never_written.pth"]
    with pytest.raises(DemoError, match=r"stage 1/1 'train train' finished without writing .*never_written.pth; "
                                        r"log: .*train.log"):
        _quiet_runner(tmp_path)[0].run_all([stage])


def test_config_chain_follows_bases(repo_root):
    chain = config_chain(repo_root / "configs/shapes/mask_rcnn_vit_mae.yaml")
    names = sorted(p.rsplit("/", 1)[1] for p in chain)
    assert names == ["Base-MaskRCNN-ViT.yaml", "mask_rcnn_vit_mae.yaml", "mask_rcnn_vit_scratch.yaml"]


def test_config_chain_ignores_comments_and_layout_but_not_values(tmp_path):
    def write(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text, encoding="utf-8")
        return tmp_path / name

    write("base.yaml", "SOLVER:\n  MAX_ITER: 100\n")
    run = write("run.yaml", '_BASE_: "base.yaml"\nSOLVER:\n  BASE_LR: 0.1\n')
    before = config_chain(run)
    write("base.yaml", "# 100 iterations: measured in pilot p1\nSOLVER: {MAX_ITER: 100}  # flow style\n")
    assert config_chain(run) == before
    write("base.yaml", "SOLVER:\n  MAX_ITER: 200\n")
    assert config_chain(run) != before
    assert config_chain(run)[str(tmp_path / "base.yaml")] == {"SOLVER": {"MAX_ITER": 200}}


def test_stages_of_a_three_seed_experiment(tmp_path):
    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    stages = build_stages(PROFILES["full"], paths, seeds=3, log=lambda _: None)
    keys = [s.key for s in stages]
    assert keys[:6] == ["dataset", "pretrain_mae", "finetune_scratch_s0", "finetune_scratch_s1",
                        "finetune_scratch_s2", "pretrain_supervised"]
    assert keys[6:12] == [f"finetune_{a}_s{s}" for s in range(3) for a in ("mae", "supervised")]
    checks = [f"cls_{k}_{a}" for a in ARMS
              for k in ("knn_eval", "knn_eval_mean", "linear_probe", "finetune_cls", "partial_finetune")]
    # The linear probe and fine-tunings repeat over the seeds; kNN (either feature) trains nothing and runs once.
    seeded = [f"cls_{k}_{a}_s{s}" for s in (1, 2) for a in ARMS for k in ("linear_probe", "finetune_cls",
                                                                          "partial_finetune")]
    assert keys[12:] == ["supervised_eval", *checks, *seeded, "detections", "reconstruction"]
    by = {s.key: s for s in stages}
    assert by["finetune_scratch_s1"].deps == ["dataset"]
    assert by["finetune_mae_s2"].deps == ["dataset", "pretrain_mae"]
    cmd = by["finetune_supervised_s1"].command
    assert cmd[cmd.index("SEED") + 1] == "1"
    assert cmd[cmd.index("MODEL.WEIGHTS") + 1] == str(paths.output / "pretrain_supervised" / "encoder.pth")
    assert "MODEL.WEIGHTS" not in by["finetune_scratch_s0"].command
    sup = by["pretrain_supervised"].command
    assert sup[sup.index("DATA.PATH") + 1] == str(paths.data / "annotations" / "instances_pool.json")
    assert by["cls_knn_eval_scratch"].deps == ["dataset"]
    assert by["cls_finetune_cls_mae"].deps == ["dataset", "pretrain_mae"]
    knn = by["cls_knn_eval_scratch"].command
    assert knn[0] == "tools/knn_eval.py" and knn[knn.index("MODEL.WEIGHTS") + 1] == ""
    # The second kNN reads the patch-token mean, the pretraining monitor's feature; the first the config's cls token.
    assert "KNN.POOL" not in knn
    mean = by["cls_knn_eval_mean_mae"].command
    assert mean[0] == "tools/knn_eval.py" and mean[mean.index("KNN.POOL") + 1] == "mean"
    assert mean[mean.index("OUTPUT_DIR") + 1] == str(paths.output / "cls_knn_eval_mean_mae")
    partial = by["cls_partial_finetune_mae"].command
    assert partial[0] == "tools/finetune_cls.py" and partial[partial.index("MODEL.TRAIN_BLOCKS") + 1] == "2"
    # Partial fine-tuning's base lr is per init (p116); the full fine-tuning keeps the config's.
    assert partial[partial.index("SOLVER.BASE_LR") + 1] == "6.4e-2"
    for arm in ("supervised", "scratch"):
        other = by[f"cls_partial_finetune_{arm}"].command
        assert other[other.index("SOLVER.BASE_LR") + 1] == "8e-3"
    assert "SOLVER.BASE_LR" not in by["cls_finetune_cls_mae"].command
    # ... and twice the full fine-tuning's epochs and warmup (the config's 20 and 2), in every profile.
    assert [partial[partial.index(k) + 1] for k in ("SOLVER.EPOCHS", "SOLVER.WARMUP_EPOCHS")] == ["40", "4"]
    assert "SOLVER.EPOCHS" not in by["cls_finetune_cls_mae"].command
    quick = {s.key: s for s in build_stages(PROFILES["quick"], paths, seeds=1, log=lambda _: None)}
    q_partial, q_full = quick["cls_partial_finetune_mae"].command, quick["cls_finetune_cls_mae"].command
    assert q_partial[len(q_partial) - 1 - q_partial[::-1].index("SOLVER.EPOCHS") + 1] == "2"
    assert q_full[len(q_full) - 1 - q_full[::-1].index("SOLVER.EPOCHS") + 1] == "1"
    # The tables read the last epoch's top-1: both fine-tunings score the val images once, after the last epoch.
    full = by["cls_finetune_cls_scratch"].command
    assert partial[partial.index("TEST.EVAL_PERIOD") + 1] == full[full.index("TEST.EVAL_PERIOD") + 1] == "0"
    # Seed 0 keeps the command of a one-seed run (its outputs stay up to date); the others set SEED.
    assert "SEED" not in partial
    seed2 = by["cls_partial_finetune_mae_s2"].command
    assert seed2[seed2.index("SEED") + 1] == "2" and seed2[seed2.index("OUTPUT_DIR") + 1].endswith("_s2")
    assert by["cls_partial_finetune_mae_s2"].deps == ["dataset", "pretrain_mae"]
    # Progress bars: epochs of pretraining, iterations (Detectron2 counts from 0) of fine-tuning.
    assert by["pretrain_mae"].progress("INFO epoch 3/24 done: loss 0.5") == (3, 24)
    assert by["pretrain_mae"].progress("epoch 3/24:  49%|") is None
    quick = {s.key: s for s in build_stages(PROFILES["quick"], paths, seeds=1, log=lambda _: None)}
    assert quick["finetune_mae_s0"].progress(" eta: 0:00:31  iter: 19  total_loss: 2.1") == (20, 30)


def test_experiment_profile_doubles_both_pretrainings_and_fine_tunes_2000_iterations(tmp_path, repo_root):
    from mae_det.config.pretrain import load_pretrain_cfg

    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    full = {s.key: s for s in build_stages(PROFILES["full"], paths, seeds=1, log=lambda _: None)}
    exp = {s.key: s for s in build_stages(PROFILES["experiment"], paths, seeds=1, log=lambda _: None)}
    assert full.keys() == exp.keys()
    for arm in ("mae", "supervised"):
        solver = load_pretrain_cfg(repo_root / f"configs/shapes/pretrain_{arm}.yaml", check_paths=False).SOLVER
        assert "SOLVER.EPOCHS" not in full[f"pretrain_{arm}"].command
        cmd = exp[f"pretrain_{arm}"].command
        assert cmd[cmd.index("SOLVER.EPOCHS") + 1] == str(2 * solver.EPOCHS)
        assert cmd[cmd.index("SOLVER.WARMUP_EPOCHS") + 1] == str(2 * solver.WARMUP_EPOCHS)
        # A changed pretraining re-runs its stage (and, through the hash, everything fine-tuned from it).
        assert exp[f"pretrain_{arm}"].params != full[f"pretrain_{arm}"].params
    # Mask R-CNN: make demo's very run (the configs' 2000 iterations and 64 sampled RoIs per image), on other data.
    assert exp["finetune_scratch_s0"].command == full["finetune_scratch_s0"].command
    config = full["finetune_scratch_s0"].command[full["finetune_scratch_s0"].command.index("--config-file") + 1]
    det_cfg = yaml.safe_load(Path(config).read_text())
    assert (det_cfg["SOLVER"]["MAX_ITER"], det_cfg["MODEL"]["ROI_HEADS"]["BATCH_SIZE_PER_IMAGE"]) == (2000, 64)
    assert PROFILES["experiment"].subset_epochs and not PROFILES["full"].subset_epochs
    # make demo labels 640 train images (2000 iterations, the configs'); make experiment keeps the label-scarce 160
    # (the first 160 of them), on which its fractions are 40 / 80 / 160 images. Nothing else of the data differs.
    assert (PROFILES["full"].shapes.num_train, PROFILES["experiment"].shapes.num_train) == (640, 160)
    assert replace(PROFILES["experiment"].shapes, num_train=640) == PROFILES["full"].shapes
    assert exp["dataset"].params != full["dataset"].params


def test_verdict_states_the_difference_and_its_spread():
    def run(group, seed, ap):
        return RunResult(f"/r/{group}{seed}", group, seed, {"bbox/AP": ap})

    one = aggregate([run("mae", 0, 12.0), run("scratch", 0, 10.0), run("supervised", 0, 15.0)])
    assert _verdict(one, "bbox/AP", "boxes") == (
        "- boxes (box AP): MAE beat scratch init (+2.0 AP; one seed: no spread measured); "
        "MAE did not beat supervised init (-3.0 AP; one seed: no spread measured).")
    noisy = aggregate([run("mae", 0, 12.0), run("mae", 1, 14.0), run("scratch", 0, 12.0), run("scratch", 1, 13.0)])
    assert _verdict(noisy, "bbox/AP", "boxes") == (
        "- boxes (box AP): MAE beat scratch init (+0.5 AP; within the seed std 1.4: not a clear difference).")
    clear = aggregate([run("mae", 0, 12.0), run("mae", 1, 12.2), run("scratch", 0, 10.0), run("scratch", 1, 10.4)])
    assert _verdict(clear, "bbox/AP", "boxes") == "- boxes (box AP): MAE beat scratch init (+1.9 AP; seed std 0.3)."


def test_chance_loss_is_the_mean_entropy_of_each_class_label_distribution(tmp_path):
    coco = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1}, {"id": 2}, {"id": 3}],
            "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": 2, "category_id": 1},
                            {"image_id": 2, "category_id": 1}, {"image_id": 1, "category_id": 2}]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(coco))
    assert chance_loss(path) == pytest.approx(math.log(2) / 3)  # p = 1, 1/2, 0 -> entropies 0, ln 2, 0
    # Counts: class 1 has 1 and 2 instances (two equally frequent bins: ln 2), class 2 has 1 and 0 (ln 2), class 3
    # none (0); capped at 1 class 1 is always present (0).
    assert chance_loss(path, max_count=3) == pytest.approx(2 * math.log(2) / 3)
    assert chance_loss(path, max_count=1) == pytest.approx(chance_loss(path))


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible():
    assert bootstrap_interval([0.5] * 20) == (0.5, 0.5)
    values = [float(v) for v in range(-10, 31)]  # mean 10
    lo, hi = bootstrap_interval(values)
    assert lo < 10 < hi and (lo, hi) == bootstrap_interval(values)
    # The interval narrows as the level drops, and a 95 % interval of 41 values with std ~12 spans about +-3.7.
    lo80, hi80 = bootstrap_interval(values, level=0.8)
    assert lo < lo80 < hi80 < hi and 6 < hi - lo < 9


def test_constant_loss_is_the_cross_entropy_of_the_fitted_frequencies_on_held_out_counts():
    fit = [[0, 2], [1, 0], [1, 0], [3, 0]]  # class 0: counts 0, 1, 1, 3+ (cap 2); class 1: 0, 0, 0, 2
    held = [[1, 0], [2, 1]]
    # class 0: p(1) = 2/4, p(2+) = 1/4; class 1: p(0) = 3/4, count 1 never seen -> the frequency of one image, 1/4
    expected = (-(math.log(2 / 4) + math.log(1 / 4)) / 2 - (math.log(3 / 4) + math.log(1 / 4)) / 2) / 2
    assert constant_loss(fit, held, cap=2) == pytest.approx(expected)
    # Fitted and scored on the same labels: the mean entropy of each class's count distribution.
    assert constant_loss(fit, fit, cap=1) == pytest.approx(
        (-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) * 2) / 2)


def test_independent_tool_stages_run_in_parallel_with_one_thread_each(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    script = tmp_path / "sleepy.py"
    # Each stage records when it ran: overlapping intervals prove parallelism without a wall-time bound that a
    # loaded machine could break.
    script.write_text("import os, sys, time, pathlib\nout = pathlib.Path(sys.argv[1])\nout.mkdir(parents=True)\n"
                      "start = time.time()\ntime.sleep(1.5)\n(out / 'span.txt').write_text(f'{start} {time.time()}')\n"
                      "(out / 'threads.txt').write_text(os.environ['OMP_NUM_THREADS'])\n")
    stages = [Stage(key=k, title=k, params={}, outputs=[tmp_path / "out" / k / "threads.txt"],
                    command=[str(script), str(tmp_path / "out" / k)], out_dir=tmp_path / "out" / k)
              for k in ("a", "b")]
    order = []
    stages.append(Stage(key="c", title="c", params={}, outputs=[], deps=["a", "b"],
                        run=lambda: order.append((tmp_path / "out/a/threads.txt").exists())))
    runner = StageRunner(tmp_path / "out", jobs=2, threads=1, log=lambda _: None)
    runner.run_all(stages)
    (a0, a1), (b0, b1) = ([float(t) for t in (tmp_path / "out" / k / "span.txt").read_text().split()] for k in "ab")
    assert a0 < b1 and b0 < a1, ((a0, a1), (b0, b1))
    assert (tmp_path / "out/b/threads.txt").read_text() == "1" and order == [True]


def test_a_failing_parallel_stage_stops_the_other_which_resumes_later(tmp_path):
    fail = _tool_stage(tmp_path, "FAIL", key="bad")
    slow = tmp_path / "slow.py"
    slow.write_text("import sys, time, pathlib\npathlib.Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)\n"
                    "time.sleep(30)\n")
    other = Stage(key="long", title="long", params={}, outputs=[], command=[str(slow), str(tmp_path / "out/long")],
                  out_dir=tmp_path / "out" / "long")
    runner = StageRunner(tmp_path / "out", jobs=2, log=lambda _: None)
    with pytest.raises(DemoError, match="'train bad' failed with exit code 3"):
        runner.run_all([other, fail])
    assert json.loads((tmp_path / "out/.stages/long.json").read_text())["status"] == "started"


def test_verdict_calls_a_difference_that_rounds_to_zero_a_tie():
    one = aggregate([RunResult("/r/m", "mae", 0, {"segm/AP": 2.01}), RunResult("/r/s", "scratch", 0, {"segm/AP": 2.04})])
    assert _verdict(one, "segm/AP", "masks") == (
        "- masks (mask AP): MAE tied with scratch init (+0.0 AP; one seed: no spread measured).")


def test_label_fractions_add_nested_subsets_and_their_runs(tmp_path):
    from mae_det.demo import nested_subsets

    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    stages = build_stages(PROFILES["full"], paths, seeds=2, log=lambda _: None, fractions=[0.25, 0.5, 1.0],
                          subset_seed=7)
    by = {s.key: s for s in stages}
    assert by["subset_f25"].deps == ["dataset"] and by["subset_f25"].params == {"fraction": 0.25, "seed": 7}
    assert by["subset_f50"].outputs == [paths.output / "subsets" / "instances_train_50pct_seed7.json"]
    subset_runs = [k for k in by if k.startswith("finetune") and k.endswith(("_f25", "_f50"))]
    assert len(subset_runs) == 2 * 2 * 3  # fractions x seeds x inits
    run = by["finetune_mae_s1_f25"]
    assert run.deps == ["dataset", "pretrain_mae", "subset_f25"]
    register = run.command[run.command.index("DATASETS.REGISTER") + 1]
    assert "instances_train_25pct_seed7.json" in register and "instances_val.json" in register
    assert "instances_train.json" in by["finetune_mae_s1"].command[by["finetune_mae_s1"].command.index(
        "DATASETS.REGISTER") + 1]

    images = [{"id": i, "file_name": f"{i:06d}.png", "width": 8, "height": 8} for i in range(1, 11)]
    anns = [{"id": 100 + i, "image_id": i, "category_id": 1} for i in range(1, 11) for _ in range(i % 3)]
    src = tmp_path / "train.json"
    src.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    out = nested_subsets(src, tmp_path / "subsets", [0.25, 0.5, 1.0], seed=7)
    sets = {f: json.loads(p.read_text()) for f, p in out.items()}
    ids = {f: {im["id"] for im in s["images"]} for f, s in sets.items()}
    assert [len(ids[f]) for f in (0.25, 0.5, 1.0)] == [2, 5, 10]  # round(2.5) = 2
    assert ids[0.25] < ids[0.5] < ids[1.0]
    for f, s in sets.items():
        assert sorted(a["id"] for a in s["annotations"]) == sorted(a["id"] for a in anns if a["image_id"] in ids[f])
    other = nested_subsets(src, tmp_path / "other", [0.5], seed=8)
    assert {im["id"] for im in json.loads(other[0.5].read_text())["images"]} != ids[0.5]
    assert nested_subsets(src, tmp_path / "again", [0.5], seed=7)[0.5].read_text() == out[0.5].read_text()


def test_subset_epochs_scale_iterations_warmup_and_steps_by_the_label_fraction(tmp_path):
    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")

    def schedule(profile, key):
        stage = {s.key: s for s in build_stages(profile, paths, seeds=1, log=lambda _: None,
                                                  fractions=[0.25, 0.5, 1.0])}[key]
        args = stage.command
        last = {k: v for k, v in zip(args[3::2], args[4::2])}  # after tools/train_net.py --config-file PATH
        return last.get("SOLVER.MAX_ITER"), last.get("SOLVER.WARMUP_ITERS"), last.get("SOLVER.STEPS"), stage.progress

    # The config's own schedule (2000 iterations, warmup 50, steps 1600 / 1867): kept, or scaled by the fraction.
    assert schedule(PROFILES["full"], "finetune_mae_s0_f25")[:3] == (None, None, None)
    epochs = replace(PROFILES["full"], subset_epochs=True)
    assert schedule(epochs, "finetune_mae_s0_f25")[:3] == ("500", "12", "(400, 467)")
    assert schedule(epochs, "finetune_scratch_s0_f50")[:3] == ("1000", "25", "(800, 934)")
    assert schedule(epochs, "finetune_mae_s0")[:3] == (None, None, None)
    # A profile's own overrides are what gets scaled, and the progress bar counts the scaled iterations.
    longer = replace(epochs, finetune_opts=("SOLVER.MAX_ITER", "2400", "SOLVER.STEPS", "(1920, 2240)"))
    *values, progress = schedule(longer, "finetune_supervised_s0_f25")
    assert values == ["600", "12", "(480, 560)"]
    assert progress("[12/02 18:24:05 d2.utils.events]:  eta: 0:03:26  iter: 99  total_loss: 2.4") == (100, 600)


def test_average_precision_of_a_ranking():
    from mae_det.demo import _average_precision

    assert _average_precision([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert _average_precision([0.9, 0.8, 0.1], [False, True, True]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert math.isnan(_average_precision([0.5], [False]))


def test_semantic_rows_are_opt_in_stages_with_their_own_label_maps(tmp_path):
    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    plain = [s.key for s in build_stages(PROFILES["full"], paths, seeds=3, log=lambda _: None)]
    assert not [k for k in plain if k.startswith(("semseg", "semantic"))]
    by = {s.key: s for s in build_stages(PROFILES["full"], paths, seeds=3, log=lambda _: None, semantic=True)}
    assert set(by) - set(plain) == {"semantic_split", *(f"semseg_{a}_s{s}" for a in ARMS for s in range(3))}
    assert by["semantic_split"].deps == ["dataset"]
    assert by["semseg_scratch_s2"].deps == ["semantic_split"]
    assert by["semseg_mae_s1"].deps == ["semantic_split", "pretrain_mae"]
    cmd = by["semseg_supervised_s1"].command
    assert cmd[:3] == ["tools/train_net.py", "--config-file", str(REPO / "configs/shapes/sem_seg_vit_supervised.yaml")]
    assert cmd[cmd.index("SEED") + 1] == "1" and cmd[cmd.index("SOLVER.MAX_ITER") + 1] == "1200"
    assert cmd[cmd.index("MODEL.WEIGHTS") + 1] == str(paths.output / "pretrain_supervised" / "encoder.pth")
    register = cmd[cmd.index("DATASETS.REGISTER_SEM_SEG") + 1]
    assert str(paths.data / "semantic" / "val") in register and str(paths.data / "images" / "train") in register
    assert "MODEL.WEIGHTS" not in by["semseg_scratch_s0"].command
    assert by["semseg_mae_s0"].progress(" eta: 0:00:31  iter: 99  total_loss: 1.1") == (100, 1200)


def test_reference_pyramid_adds_one_run_per_init_seed_and_fraction_and_leaves_the_others_alone(tmp_path):
    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    exp = PROFILES["experiment"]
    plain = {s.key: s for s in build_stages(exp, paths, seeds=2, log=lambda _: None, fractions=[0.5, 1.0])}
    by = {s.key: s for s in build_stages(exp, paths, seeds=2, log=lambda _: None, fractions=[0.5, 1.0],
                                         reference_pyramid="simple")}
    assert set(by) - set(plain) == {f"finetune_{a}_simple_s{s}{f}" for a in ARMS for s in range(2) for f in ("", "_f50")}
    # The existing stages keep their hashes, so a finished experiment resumes with only the new runs.
    assert all(by[k].params == stage.params for k, stage in plain.items())
    run = by["finetune_mae_simple_s1"]
    cmd = run.command
    assert cmd[:3] == ["tools/train_net.py", "--config-file", str(REPO / "configs/shapes/mask_rcnn_vit_mae.yaml")]
    assert cmd[cmd.index("MODEL.VIT.PYRAMID") + 1] == "simple" and cmd[cmd.index("SEED") + 1] == "1"
    # The profile's run on all labels (the configs' schedule, no subset), from the MAE encoder, into its own directory.
    assert "SOLVER.MAX_ITER" not in cmd and "subsets" not in " ".join(cmd)
    plain_cmd = plain["finetune_mae_s1"].command
    assert cmd[:cmd.index("MODEL.VIT.PYRAMID")] == plain_cmd[:plain_cmd.index("SEED")]
    assert cmd[cmd.index("OUTPUT_DIR") + 1] == str(paths.output / "finetune_mae_simple_s1")
    assert run.deps == ["dataset", "pretrain_mae"] and "MODEL.WEIGHTS" not in by["finetune_scratch_simple_s0"].command
    assert run.progress(" eta: 0:00:31  iter: 99  total_loss: 1.1") == (100, 2000)
    # On a subset: the plain run's subset and schedule (constant epochs: half the iterations), plus the pyramid.
    sub = by["finetune_scratch_simple_s0_f50"]
    sub_cmd, plain_sub = sub.command, plain["finetune_scratch_s0_f50"].command
    assert sub_cmd[:sub_cmd.index("MODEL.VIT.PYRAMID")] == plain_sub[:plain_sub.index("SEED")]
    assert sub_cmd[sub_cmd.index("MODEL.VIT.PYRAMID") + 1] == "simple"
    assert sub_cmd[sub_cmd.index("SOLVER.MAX_ITER") + 1] == "1000" and "instances_train_50pct_seed0.json" in " ".join(sub_cmd)
    assert sub.deps == ["dataset", "subset_f50"]
    assert sub_cmd[sub_cmd.index("OUTPUT_DIR") + 1] == str(paths.output / "finetune_scratch_simple_s0_f50")
    for bad in ("multi_tap", "fpn"):  # the configs' own pyramid, or none at all
        with pytest.raises(DemoError, match=r"--reference-pyramid: expected one of \['simple'\] \(the configs use "
                                            rf"multi_tap\), got '{bad}'"):
            build_stages(exp, paths, seeds=1, log=lambda _: None, reference_pyramid=bad)


def test_pyramid_section_gives_each_init_its_best_pyramid_per_fraction_and_writes_the_rows(tmp_path):
    from mae_det.demo import _pyramid_section, finetune_key, label_efficiency_figure, pyramid_rows

    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    train = paths.annotations("train")
    train.parent.mkdir(parents=True)
    train.write_text(json.dumps({"images": [{"id": i} for i in range(8)]}))
    (paths.output / "subsets").mkdir(parents=True)
    (paths.output / "subsets" / "instances_train_50pct_seed3.json").write_text(
        json.dumps({"images": [{"id": i} for i in range(4)]}))
    # (box, mask) AP per seed on all labels: random init is better with the reference pyramid on boxes, not on masks.
    ap = {("mae", None): [(33.0, 27.0), (32.0, 28.0)], ("mae", "simple"): [(28.0, 22.0), (29.0, 23.0)],
          ("supervised", None): [(19.0, 15.0), (20.0, 16.0)], ("supervised", "simple"): [(18.0, 14.0), (18.0, 14.0)],
          ("scratch", None): [(25.0, 22.0), (26.0, 22.0)], ("scratch", "simple"): [(30.0, 21.0), (33.0, 21.0)]}
    for (arm, pyramid), runs in ap.items():
        for s, (box, mask) in enumerate(runs):
            for f, drop in ((1.0, 0.0), (0.5, 10.0)):  # on half the labels every run 10 AP lower, MAE's simple 20
                run = paths.run(finetune_key(arm, s, f, pyramid=pyramid))
                run.mkdir(parents=True)
                drop += 10.0 if (f, arm, pyramid) == (0.5, "mae", "simple") else 0.0
                (run / "ap_results.json").write_text(json.dumps({"bbox": {"AP": box - drop}, "segm": {"AP": mask - drop}}))
    rows = pyramid_rows(paths, 2, [0.5, 1.0], 3, "multi_tap", "simple")
    lines = _pyramid_section(paths, rows, 2, "multi_tap", "simple")
    assert "| labeled images | init | multi_tap box AP | multi_tap mask AP | simple box AP | simple mask AP |" in lines
    assert "| 8 | scratch | 25.5 ± 0.7 | 22.0 ± 0.0 | 31.5 ± 2.1 | 21.0 ± 0.0 |" in lines
    assert "| 4 | mae | 22.5 ± 0.7 | 17.5 ± 0.7 | 8.5 ± 0.7 | 2.5 ± 0.7 |" in lines
    assert ("- 8 labels, box AP: MAE (multi_tap, 32.5 ± 0.7) against scratch init (simple, 31.5 ± 2.1): +1.0, not "
            "every MAE seed above; supervised init (multi_tap, 19.5 ± 0.7): +13.0, every MAE seed above every seed.") in lines
    assert ("- 8 labels, mask AP: MAE (multi_tap, 27.5 ± 0.7) against scratch init (multi_tap, 22.0 ± 0.0): +5.5, "
            "every MAE seed above every seed; supervised init (multi_tap, 15.5 ± 0.7): +12.0, every MAE seed above "
            "every seed.") in lines
    assert ("- 4 labels, box AP: MAE (multi_tap, 22.5 ± 0.7) against scratch init (simple, 21.5 ± 2.1): +1.0, not "
            "every MAE seed above; supervised init (multi_tap, 9.5 ± 0.7): +13.0, every MAE seed above every seed.") in lines
    # The larger fraction first, as in the label-efficiency rows.
    assert [x[:9] for x in lines if x.startswith("- ")] == ["- 8 label"] * 2 + ["- 4 label"] * 2
    csv_rows = (paths.output / "demo_pyramid.csv").read_text().splitlines()
    assert csv_rows[0] == "init,pyramid,seed,label_fraction,num_labeled,box_AP,mask_AP" and len(csv_rows) == 1 + 24
    assert csv_rows[1:3] == ["mae,multi_tap,0,1.0,8,33.00,27.00", "mae,multi_tap,1,1.0,8,32.00,28.00"]
    assert "scratch,simple,1,1.0,8,33.00,21.00" in csv_rows and "mae,simple,0,0.5,4,8.00,2.00" in csv_rows
    # The label-efficiency figure draws the configs' pyramid solid and the reference pyramid dashed, per init.
    plain = [r for r in rows if r["pyramid"] == "multi_tap"]
    legend = label_efficiency_figure(plain, tmp_path / "eff.png", [r for r in rows if r["pyramid"] == "simple"])
    assert legend == [x for a in ARMS for x in (f"{a} init", f"{a} init, simple pyramid")]
    assert (tmp_path / "eff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert label_efficiency_figure(plain, tmp_path / "eff.png") == [f"{a} init" for a in ARMS]


def test_semantic_section_tables_mean_and_spread_and_writes_the_rows(tmp_path):
    from mae_det.demo import _semantic_section

    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    (paths.data / "semantic").mkdir(parents=True)
    (paths.data / "semantic" / "classes.txt").write_text("background\ncircle\nsquare\n")
    miou = {"mae": (30.0, 32.0, 34.0), "supervised": (20.0, 21.0, 22.0), "scratch": (18.0, 18.0, 18.0)}
    for arm, values in miou.items():
        for s, v in enumerate(values):
            run = paths.run(f"semseg_{arm}_s{s}")
            run.mkdir(parents=True)
            (run / "sem_seg_results.json").write_text(json.dumps({"sem_seg": {
                "mIoU": v, "fwIoU": v, "mACC": v, "pACC": 90.0 + s, "IoU": {"circle": v, "square": v}}}))
            (run / "run_info.json").write_text(json.dumps({"init_type": arm, "seed": s}))
    lines = _semantic_section(paths, 3, PROFILES["full"])
    assert "| mae | 32.0 ± 2.0 | 91.0 ± 1.0 |" in lines and "| scratch | 18.0 ± 0.0 | 91.0 ± 1.0 |" in lines
    assert any("3 classes" in line for line in lines)
    rows = (paths.output / "demo_semantic.csv").read_text().splitlines()
    assert rows[0] == "init,seed,mIoU,pixel_acc" and rows[1] == "mae,0,30.00,90.00" and len(rows) == 10
    assert (paths.output / "sem_seg_table.md").exists() and (paths.output / "sem_seg_table.png").exists()


def test_forced_precision_reaches_every_training_stage_and_auto_keeps_the_hashes(tmp_path, repo_root):
    from mae_det.config.pretrain import load_pretrain_cfg

    def last_value(cmd, flag):  # yacs keeps the last value given for a key
        return cmd[len(cmd) - cmd[::-1].index(flag)]

    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    auto = {s.key: s for s in build_stages(PROFILES["full"], paths, seeds=1, log=lambda _: None, semantic=True)}
    fp32 = {s.key: s for s in build_stages(PROFILES["full"], paths, seeds=1, log=lambda _: None, semantic=True,
                                           precision="fp32")}
    assert auto.keys() == fp32.keys()
    trained = [k for k, s in auto.items() if s.command]
    assert {k.split("_")[0] for k in trained} == {"pretrain", "cls", "finetune", "semseg"}
    for key in trained:
        flag = "SOLVER.PRECISION" if key.startswith(("finetune", "semseg")) else "PRECISION"
        assert last_value(fp32[key].command, flag) == "fp32", key  # after the profile's "SOLVER.PRECISION auto"
        assert "fp32" not in auto[key].command and fp32[key].params != auto[key].params, key
    # "auto" adds nothing: the stages (and outputs) of runs made before the option stay up to date.
    assert "PRECISION" not in auto["pretrain_mae"].command
    cmd = fp32["pretrain_mae"].command
    cfg = load_pretrain_cfg(repo_root / "configs/shapes/pretrain_mae.yaml", check_paths=False)
    cfg.merge_from_list(cmd[cmd.index("PRECISION"):cmd.index("PRECISION") + 2])
    assert cfg.PRECISION == "fp32"
    with pytest.raises(DemoError, match="--precision: expected one of auto, fp32, bf16, got 'fp16'"):
        build_stages(PROFILES["full"], paths, seeds=1, log=lambda _: None, precision="fp16")


def test_encoder_rows_one_per_init_and_seed_with_the_seedless_knn_repeated(tmp_path):
    from mae_det.demo import encoder_rows

    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    paths.output.mkdir(parents=True)
    (paths.output / "supervised_heldout.json").write_text(json.dumps(
        {"count_accuracy": 66.0, "presence_map": 50.0, "count_loss": 0.75, "count_loss_constant": 0.82}))
    metric = {"knn_eval": "knn_top1", "knn_eval_mean": "knn_top1", "linear_probe": "linear_top1",
              "finetune_cls": "finetune_top1", "partial_finetune": "finetune_top1"}
    for a, arm in enumerate(ARMS):
        for k, (kind, key) in enumerate(metric.items()):
            for s in range(1 if kind.startswith("knn_eval") else 2):
                run = paths.run(f"cls_{kind}_{arm}" + (f"_s{s}" if s else ""))
                run.mkdir(parents=True)
                (run / "cls_results.json").write_text(json.dumps({key: 10.0 * a + k + 0.5 * s}))
    rows = encoder_rows(paths, seeds=2)
    assert [(r["init"], r["seed"]) for r in rows] == [(arm, s) for arm in ARMS for s in (0, 1)]
    assert rows[1] == {"init": "mae", "seed": 1, "knn_top1": 0.0, "knn_mean_top1": 1.0, "linear_top1": 2.5,
                       "finetune_top1": 3.5, "partial_finetune_top1": 4.5, "heldout_count_accuracy": "", "heldout_presence_map": "",
                       "heldout_count_loss": "", "heldout_count_loss_constant": ""}
    assert rows[3]["knn_top1"] == 10.0 and rows[3]["heldout_count_accuracy"] == 66.0  # supervised, seed 1
    assert rows[3]["heldout_count_loss"] == 0.75 and rows[3]["heldout_count_loss_constant"] == 0.82
    with pytest.raises(FileNotFoundError, match="cls_linear_probe_mae_s2"):
        encoder_rows(paths, seeds=3)


def test_pretrain_seeds_add_seeded_encoders_and_their_runs_and_leave_the_others_alone(tmp_path):
    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    exp = PROFILES["experiment"]
    plain = {s.key: s for s in build_stages(exp, paths, seeds=2, log=lambda _: None, fractions=[0.5, 1.0])}
    stages = build_stages(exp, paths, seeds=2, log=lambda _: None, fractions=[0.5, 1.0], pretrain_seeds=3)
    by = {s.key: s for s in stages}
    assert set(by) - set(plain) == {
        *(f"pretrain_{a}_p{p}" for a in ("mae", "supervised") for p in (1, 2)),
        *(f"supervised_eval_p{p}" for p in (1, 2)),
        *(f"finetune_{a}_p{p}_s{s}" for a in ("mae", "supervised") for p in (1, 2) for s in range(2))}
    # The seed-0 stages keep their hashes, so a finished experiment resumes with only the new runs.
    assert all(by[k].params == stage.params for k, stage in plain.items())
    # A seeded pretraining differs from seed 0 only by its SEED and its directory.
    cmd, cmd0 = by["pretrain_supervised_p2"].command, by["pretrain_supervised"].command
    assert cmd[cmd.index("SEED") + 1] == "2" and "SEED" not in cmd0
    assert cmd[cmd.index("OUTPUT_DIR") + 1] == str(paths.output / "pretrain_supervised_p2")
    assert [a for a in cmd if a not in ("SEED", "2")][:-1] == cmd0[:-1]
    run = by["finetune_mae_p1_s1"]
    assert run.deps == ["dataset", "pretrain_mae_p1"]
    assert run.command[run.command.index("MODEL.WEIGHTS") + 1] == str(paths.output / "pretrain_mae_p1" / "encoder.pth")
    assert run.command[run.command.index("SEED") + 1] == "1"
    assert "SOLVER.MAX_ITER" not in run.command and "subsets" not in " ".join(run.command)
    ev = by["supervised_eval_p2"]
    assert ev.deps == ["pretrain_supervised_p2"] and ev.outputs == [paths.output / "supervised_heldout_p2.json"]
    # Every stage comes after the stages it reads.
    seen = set()
    for s in stages:
        assert set(s.deps) <= seen, s.key
        seen.add(s.key)
    with pytest.raises(DemoError, match=r"--pretrain-seeds must be >= 1, got 0"):
        build_stages(exp, paths, seeds=1, log=lambda _: None, pretrain_seeds=0)


def test_pretrain_seed_section_spreads_over_encoders_and_writes_the_rows(tmp_path):
    from mae_det.demo import _pretrain_seed_section, finetune_key, heldout_file

    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    # (box, mask) AP per fine-tuning seed, per pretraining seed; random init has one set of runs.
    ap = {("mae", 0): [(33.0, 27.0), (31.0, 27.0)], ("mae", 1): [(30.0, 26.0), (30.0, 24.0)],
          ("supervised", 0): [(24.0, 20.0), (24.0, 20.0)], ("supervised", 1): [(22.0, 19.0), (26.0, 21.0)],
          ("scratch", 0): [(25.0, 22.0), (31.0, 22.0)]}
    for (arm, p), runs in ap.items():
        for s, (box, mask) in enumerate(runs):
            run = paths.run(finetune_key(arm, s, pretrain_seed=p))
            run.mkdir(parents=True)
            (run / "ap_results.json").write_text(json.dumps({"bbox": {"AP": box}, "segm": {"AP": mask}}))
    for p in range(2):
        heldout_file(paths, p).write_text(json.dumps({"presence_map": 50.0 + p, "num_images": 300}))
    lines = _pretrain_seed_section(paths, 2, 2)
    assert "| mae | 0 | 32.0 ± 1.4 | 27.0 ± 0.0 |" in lines and "| mae | 1 | 30.0 ± 0.0 | 25.0 ± 1.4 |" in lines
    assert "| mae | all | 31.0 ± 1.4 | 26.0 ± 1.4 |" in lines
    assert "| supervised | all | 24.0 ± 1.6 | 20.0 ± 0.8 |" in lines and "| scratch | - | 28.0 ± 4.2 | 22.0 ± 0.0 |" in lines
    assert ("- box AP: scratch init +3.0, not every MAE run above; supervised init +7.0, every MAE run above every "
            "run.") in lines
    assert "- mask AP: scratch init +4.0, every MAE run above every run; supervised init +6.0, every MAE run above every run." in lines
    assert "- seed 1: held-out presence mAP 51.0 % on 300 images." in lines
    rows = (paths.output / "demo_pretrain_seeds.csv").read_text().splitlines()
    assert rows[0] == "init,pretrain_seed,seed,box_AP,mask_AP" and len(rows) == 1 + 10
    assert rows[1] == "mae,0,0,33.00,27.00" and "supervised,1,1,26.00,21.00" in rows and rows[-1] == "scratch,,1,31.00,22.00"


def test_augmentation_words_follow_the_saved_config():
    lsj = {"LSJ": {"ENABLED": True, "MIN_SCALE": 0.8, "MAX_SCALE": 1.25, "IMAGE_SIZE": 64}, "RANDOM_FLIP": "none"}
    assert _augmentation(lsj) == "Large Scale Jitter 0.8-1.25 of 64 px, no flips"
    plain = {"LSJ": {"ENABLED": False}, "MIN_SIZE_TRAIN": [640, 672], "RANDOM_FLIP": "horizontal"}
    assert _augmentation(plain) == "shortest-edge resize to [640, 672] px, horizontal flips"


def _stage_hashes(stages):
    """The hash each stage gets in :class:`StageRunner` (its params with its dependencies' hashes)."""
    from mae_det.demo import _hash

    hashes = {}
    for s in stages:
        hashes[s.key] = _hash({"params": s.params, "deps": [hashes[d] for d in s.deps]})
    return hashes


def test_a_new_label_fraction_leaves_the_runs_of_the_others_up_to_date(tmp_path):
    from mae_det.demo import nested_subsets

    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    before = _stage_hashes(build_stages(PROFILES["experiment"], paths, seeds=2, log=lambda _: None,
                                        fractions=[0.25, 0.5, 1.0], reference_pyramid="simple"))
    after = _stage_hashes(build_stages(PROFILES["experiment"], paths, seeds=2, log=lambda _: None,
                                       fractions=[0.1, 0.25, 0.5, 1.0], reference_pyramid="simple"))
    assert set(after) - set(before) == {"subset_f10", *(f"finetune_{a}{p}_s{s}_f10" for a in ARMS
                                                        for p in ("", "_simple") for s in range(2))}
    assert all(after[k] == h for k, h in before.items()), [k for k, h in before.items() if after[k] != h]
    # ... which holds because a subset written alone is the file written with the others.
    images = [{"id": i, "file_name": f"{i:06d}.png", "width": 8, "height": 8} for i in range(1, 21)]
    src = tmp_path / "train.json"
    src.write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    together = nested_subsets(src, tmp_path / "together", [0.1, 0.25, 0.5], seed=0)
    for f in (0.1, 0.25, 0.5):
        assert nested_subsets(src, tmp_path / f"alone{f}", [f], seed=0)[f].read_bytes() == together[f].read_bytes()


def test_fractions_that_round_to_the_same_percent_are_rejected(tmp_path):
    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    with pytest.raises(DemoError, match=r"^--label-fractions: 0\.333 and 0\.334 both round to 33 %, which names "
                                        r"their runs; give fractions that differ in whole percent$"):
        build_stages(PROFILES["quick"], paths, seeds=1, log=lambda _: None, fractions=[0.333, 0.334, 1.0])
    with pytest.raises(DemoError, match=r"0\.996 and 1 both round to 100 %"):
        build_stages(PROFILES["quick"], paths, seeds=1, log=lambda _: None, fractions=[0.996])
    keys = [s.key for s in build_stages(PROFILES["quick"], paths, seeds=1, log=lambda _: None,
                                        fractions=[0.33, 0.34, 0.33, 1.0])]
    assert len(keys) == len(set(keys)) and {"subset_f33", "subset_f34"} <= set(keys)


def test_the_dataset_stage_regenerates_a_shared_folder_that_another_run_changed(tmp_path):
    from mae_det.data.shapes import ShapesConfig, generate_shapes

    tiny = ShapesConfig(image_size=32, num_pool=4, num_train=6, num_val=4, num_cls_train=6, num_cls_val=6, workers=1)
    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    stages = [s for s in build_stages(replace(PROFILES["quick"], shapes=tiny), paths, 1, log=lambda _: None)
              if s.key == "dataset"]

    def run():
        runner, lines = StageRunner(paths.output, log=lambda _: None), []
        runner.log = lines.append
        runner.run_all(stages)
        info = json.loads((paths.data / "dataset_info.json").read_text())
        return runner.wall["dataset"][3], info["config"]["num_train"], lines

    assert run()[:2] == ("ran", 6)
    assert run()[:2] == ("skipped", 6)
    generate_shapes(paths.data, replace(tiny, num_train=2), overwrite=True, log=lambda _: None)  # another profile's
    status, num_train, lines = run()
    assert (status, num_train) == ("ran", 6)
    assert (f"[demo] dataset: its outputs were replaced since it ran ({paths.data / 'dataset_info.json'}), running "
            "it again") in lines
    assert run()[:2] == ("skipped", 6)


def test_encoder_checks_name_their_seed_where_the_config_does_not_give_it(tmp_path, repo_root):
    from mae_det.demo import _config_value, _seed_args, encoder_seeds_note

    base = tmp_path / "base.yaml"
    base.write_text("SEED: 3\n")
    config = tmp_path / "run.yaml"
    config.write_text('_BASE_: "base.yaml"\nSOLVER:\n  EPOCHS: 1\n')
    assert _seed_args(config, [], 0) == ["SEED", "0"] and _seed_args(config, [], 3) == []
    assert _seed_args(config, ["SEED", "0"], 0) == [] and _seed_args(config, [], 1) == ["SEED", "1"]
    # The demo's config gives seed 0: the one kNN run per init keeps its command (and its committed numbers), and
    # random init's encoder in it is the one of seed 0.
    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    by = {s.key: s for s in build_stages(PROFILES["full"], paths, seeds=3, log=lambda _: None)}
    for key in ("cls_knn_eval_scratch", "cls_knn_eval_mean_scratch", "cls_linear_probe_scratch"):
        cmd = by[key].command
        assert "SEED" not in cmd and _config_value(Path(cmd[2]), cmd[3:], "SEED") == 0, key
    assert not [k for k in by if k.startswith("cls_knn_eval") and k.endswith(("_s1", "_s2"))]
    note = encoder_seeds_note(3)
    assert "for random init the encoder drawn with seed 0" in note and "no seed" not in note
    assert encoder_seeds_note(1) == ""


# ---- stopping, moving and refusing ------------------------------------------------------------------------
SLEEPER = """import os, pathlib, sys, time
out = pathlib.Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
(out / "pid").write_text(str(os.getpid()))
time.sleep(60)
"""
DRIVER = """import pathlib, sys
sys.path.insert(0, sys.argv[3])
from mae_det.demo import Stage, StageRunner
out = pathlib.Path(sys.argv[1])
stage = Stage(key="train", title="train", params={}, outputs=[out / "train" / "done"], resumable=True,
              command=[sys.argv[2], str(out / "train")], out_dir=out / "train")
StageRunner(out, log=print).run_all([stage])
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie that its reaper has not collected yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _driver_with_a_running_tool(tmp_path, repo_root):
    """A process running the real StageRunner on one tool stage that sleeps; returns it and the tool's pid."""
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    (tmp_path / "driver.py").write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "out"),
                               str(tmp_path / "sleeper.py"), str(repo_root)], cwd=repo_root, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    pid_file = tmp_path / "out" / "train" / "pid"
    for _ in range(600):
        if pid_file.exists() and pid_file.read_text():
            return driver, int(pid_file.read_text())
        time.sleep(0.1)
    driver.kill()
    raise AssertionError(driver.communicate()[0])


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_to_the_demo_stops_its_tools_as_ctrl_c_does(tmp_path, repo_root, signum):
    driver, tool = _driver_with_a_running_tool(tmp_path, repo_root)
    try:
        driver.send_signal(signum)  # the demo process alone, as `kill PID` or a batch system sends it
        output = driver.communicate(timeout=60)[0]
        assert f"Interrupted: {signal.Signals(signum).name}" in output, output
        assert not _alive(tool)  # stopped and reaped before the demo returned
        record = json.loads((tmp_path / "out" / ".stages" / "train.json").read_text())
        assert record["status"] == "started"  # a re-run resumes it
    finally:
        if _alive(tool):
            os.kill(tool, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_tools_die_with_a_killed_demo(tmp_path, repo_root):
    driver, tool = _driver_with_a_running_tool(tmp_path, repo_root)
    try:
        driver.kill()  # SIGKILL: no handler, no finally
        driver.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _alive(tool) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(tool)
    finally:
        if _alive(tool):
            os.kill(tool, signal.SIGKILL)


def test_the_demo_tool_reports_a_signal_in_one_line_with_the_shells_exit_code(repo_root, monkeypatch, capsys):
    import importlib.util

    from mae_det.demo import Interrupted

    spec = importlib.util.spec_from_file_location("demo_tool", repo_root / "tools" / "demo.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def stopped(*args, **kwargs):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(tool, "run_demo", stopped)
    with pytest.raises(SystemExit) as e:
        tool.main(["--profile", "quick"])
    assert e.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == ("demo: stopped by SIGTERM; running it again resumes the unfinished stages\n")


def test_the_dataset_stage_replaces_only_a_shapes_dataset(tmp_path):
    from mae_det.data.shapes import ShapesConfig
    from mae_det.demo import is_shapes_root

    tiny = ShapesConfig(image_size=32, num_pool=2, num_train=2, num_val=2, num_cls_train=6, num_cls_val=6, workers=1)
    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "mine")
    (paths.data / "images").mkdir(parents=True)
    (paths.data / "annotations").mkdir()
    (paths.data / "images" / "precious_0001.jpg").write_bytes(b"user data")
    (paths.data / "annotations" / "instances_train2017.json").write_text("{}")
    stages = [s for s in build_stages(replace(PROFILES["quick"], shapes=tiny), paths, 1, log=lambda _: None)
              if s.key == "dataset"]
    with pytest.raises(DemoError, match=f"^{re.escape(str(paths.data))} holds files that are not a shapes dataset; "
                                        "pick another --data-root$"):
        StageRunner(paths.output, log=lambda _: None).run_all(stages)
    assert (paths.data / "images" / "precious_0001.jpg").read_bytes() == b"user data"
    assert (paths.data / "annotations" / "instances_train2017.json").exists()
    # Another generator's dataset_info.json is no licence either; the one of mae_det's generator is.
    (paths.data / "dataset_info.json").write_text(json.dumps({"generator": "someone else"}))
    assert not is_shapes_root(paths.data)
    (paths.data / "dataset_info.json").write_text("[]")
    assert not is_shapes_root(paths.data)
    (paths.data / "dataset_info.json").write_text(json.dumps({"generator": "mae_det.data.shapes"}))
    assert is_shapes_root(paths.data)
    # Missing, empty, or what an interrupted generation left (its files only, no dataset_info.json): generated.
    (tmp_path / "empty").mkdir()
    assert is_shapes_root(tmp_path / "nothing") and is_shapes_root(tmp_path / "empty")
    partial = tmp_path / "partial"
    (partial / "images" / "pool").mkdir(parents=True)
    (partial / "images" / "pool" / "000001.png").write_bytes(b"half")
    (partial / "annotations").mkdir()
    (partial / "annotations" / ".instances_pool.json.k2j3.tmp").write_text("{")
    (partial / "classification" / "train" / "circle").mkdir(parents=True)
    (partial / "classification" / "train" / "circle" / "000000.png").write_bytes(b"x")
    assert is_shapes_root(partial)
    paths = DemoPaths(output=tmp_path / "o2", data=partial)
    stages = [s for s in build_stages(replace(PROFILES["quick"], shapes=tiny), paths, 1, log=lambda _: None)
              if s.key == "dataset"]
    StageRunner(paths.output, log=lambda _: None).run_all(stages)
    assert json.loads((partial / "dataset_info.json").read_text())["config"]["num_train"] == 2
    assert not (partial / "annotations" / ".instances_pool.json.k2j3.tmp").exists()


def test_portable_params_name_paths_from_their_folders_and_expand_back():
    from mae_det.demo import expand, portable

    def params(out, data, repo):
        return {"config": {f"{repo}/configs/a.yaml": {"_BASE_": "b.yaml"}, f"{repo}/configs/../b.yaml": {}},
                "args": ["OUTPUT_DIR", f"{out}/pretrain_mae", "DATASETS.REGISTER",
                         f"[['shapes_train', '{data}/annotations/instances_train.json', '{data}/images/train']]",
                         "DATA.PATH", Path(f"{data}/images/pool"), "N", 3],
                "root": str(data)}

    a = {"<output>": Path("/w/repo/output/demo"), "<data>": Path("/w/repo/output/demo/data"), "<repo>": Path("/w/repo")}
    b = {"<output>": Path("/elsewhere/out"), "<data>": Path("/d"), "<repo>": Path("/checkout")}
    pa, pb = (portable(params(r["<output>"], r["<data>"], r["<repo>"]), r) for r in (a, b))
    assert pa == pb == {
        "config": {"<repo>/configs/a.yaml": {"_BASE_": "b.yaml"}, "<repo>/configs/../b.yaml": {}},
        "args": ["OUTPUT_DIR", "<output>/pretrain_mae", "DATASETS.REGISTER",
                 "[['shapes_train', '<data>/annotations/instances_train.json', '<data>/images/train']]",
                 "DATA.PATH", "<data>/images/pool", "N", 3],
        "root": "<data>"}
    # The innermost folder names a path; "demox" is not under "demo".
    assert portable(["/w/repo/output/demox/f", "/w/repo/output/demo"], a) == ["<repo>/output/demox/f", "<output>"]
    raw = params(a["<output>"], a["<data>"], a["<repo>"])
    raw["args"][5] = str(raw["args"][5])
    assert expand(pa, a) == raw


def _noop_pretraining(tmp_path, paths, tiny):
    """The dataset and MAE pretraining stages of ``paths``, the pretraining a script writing its outputs."""
    script = tmp_path / "fake_pretrain.py"
    script.write_text("import pathlib, sys\nout = pathlib.Path(sys.argv[sys.argv.index('OUTPUT_DIR') + 1])\n"
                      "out.mkdir(parents=True, exist_ok=True)\n"
                      "for name in ('encoder.pth', 'metrics.jsonl', 'run_info.json'):\n"
                      "    (out / name).write_text('trained')\n")
    by = {s.key: s for s in build_stages(replace(PROFILES["quick"], shapes=tiny), paths, 1, log=lambda _: None)}
    pre = by["pretrain_mae"]
    pre.command, pre.result = [str(script), *pre.command[1:]], None
    return [by["dataset"], pre]


def test_a_finished_output_moved_with_its_data_stays_up_to_date(tmp_path):
    import shutil

    from mae_det.data.shapes import ShapesConfig

    tiny = ShapesConfig(image_size=32, num_pool=2, num_train=2, num_val=2, num_cls_train=6, num_cls_val=6, workers=1)
    old = DemoPaths(output=tmp_path / "a" / "out", data=tmp_path / "a" / "data")
    runner = StageRunner(old.output, log=lambda _: None, roots=old.roots)
    runner.run_all(_noop_pretraining(tmp_path, old, tiny))
    assert runner.wall["pretrain_mae"][3] == "ran"
    (old.run("pretrain_mae") / "encoder.pth").write_text("hours of pretraining")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    new = DemoPaths(output=tmp_path / "b" / "out", data=tmp_path / "b" / "data")
    lines = []
    runner = StageRunner(new.output, log=lines.append, roots=new.roots)
    runner.run_all(_noop_pretraining(tmp_path, new, tiny))
    assert [runner.wall[k][3] for k in ("dataset", "pretrain_mae")] == ["skipped", "skipped"], lines
    assert (new.run("pretrain_mae") / "encoder.pth").read_text() == "hours of pretraining"
    # The checkout's own paths (configs, tools) are named from it as well.
    assert all("/" + tmp_path.name not in json.dumps(s.params) and str(REPO) not in json.dumps(s.params)
               for s in build_stages(PROFILES["full"], new, 2, log=lambda _: None, fractions=[0.5], semantic=True))


def test_records_hashed_with_absolute_paths_stay_up_to_date_and_get_the_portable_hash(tmp_path):
    from mae_det.demo import _hash, expand, portable

    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    target = paths.output / "made.txt"
    upstream = Stage(key="up", title="up", params=portable({"root": str(paths.data)}, paths.roots), outputs=[target],
                     run=lambda: target.write_text("x"))
    stage = Stage(key="make", title="make", deps=["up"], outputs=[target], run=lambda: 1 / 0,
                  params=portable({"args": ["OUTPUT_DIR", str(paths.output / "make")]}, paths.roots))
    # What the code before portable params wrote: the hash of the absolute paths, with its dependency's.
    StageRunner(paths.output, log=lambda _: None).run_all([upstream])
    old_up = _hash({"params": expand(upstream.params, paths.roots), "deps": []})
    old = _hash({"params": {"args": ["OUTPUT_DIR", str(paths.output / "make")]}, "deps": [old_up]})
    for key, h in (("up", old_up), ("make", old)):
        (paths.output / ".stages" / f"{key}.json").write_text(json.dumps({"hash": h, "status": "done", "wall_s": 5.0}))
    runner = StageRunner(paths.output, log=lambda _: None, roots=paths.roots)
    runner.run_all([upstream, stage])  # would divide by zero if it ran
    assert runner.wall["make"][3] == "skipped"
    new = json.loads((paths.output / ".stages" / "make.json").read_text())
    assert new == {"hash": runner.hashes["make"], "status": "done", "wall_s": 5.0} and new["hash"] != old


def test_a_stage_folder_without_a_record_is_an_error_and_kept(tmp_path):
    stage = _tool_stage(tmp_path)
    stage.out_dir.mkdir(parents=True)
    (stage.out_dir / "encoder.pth").write_text("hours of pretraining")
    record = tmp_path / "out" / ".stages" / "train.json"
    with pytest.raises(DemoError, match=f"^{re.escape(str(stage.out_dir))} exists but has no record in "
                                        f"{re.escape(str(record))}: delete it or restore the record$"):
        _quiet_runner(tmp_path)[0].run_all([stage])
    assert (stage.out_dir / "encoder.pth").read_text() == "hours of pretraining"
    (stage.out_dir / "encoder.pth").unlink()  # an empty folder holds nothing to lose
    runner = _quiet_runner(tmp_path)[0]
    runner.run_all([stage])
    assert runner.wall["train"][3] == "ran"


def test_every_training_stage_runs_on_cpu(tmp_path):
    from mae_det.demo import _config_value

    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    stages = build_stages(PROFILES["experiment"], paths, 2, log=lambda _: None, fractions=[0.5], semantic=True,
                          reference_pyramid="simple", pretrain_seeds=2)
    devices = {}
    for s in stages:
        if s.command is not None:
            key = "MODEL.DEVICE" if s.command[0] == "tools/train_net.py" else "DEVICE"
            devices[s.key] = _config_value(Path(s.command[2]), s.command[3:], key)
    assert {k.split("_")[0] for k in devices} == {"pretrain", "finetune", "cls", "semseg"}
    assert set(devices.values()) == {"cpu"}, devices


def test_bad_arguments_are_one_line_errors_before_anything_is_written(tmp_path, monkeypatch):
    import mae_det.demo as demo

    monkeypatch.setattr(demo, "StageRunner", None)  # nothing may run
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "out"
    for kwargs, message in (
            ({"jobs": 0}, "--jobs must be >= 1, got 0"),
            ({"seeds": 0}, "--seeds must be >= 1, got 0"),
            ({"subset_seed": -1}, "--subset-seed must be >= 0, got -1"),
            ({"pretrain_seeds": 0}, "--pretrain-seeds must be >= 1, got 0"),
            ({"precision": "fp16"}, "--precision: expected one of auto, fp32, bf16, got 'fp16'"),
            ({"output": a_file}, f"--output: {a_file} exists and is not a folder"),
            ({"output": a_file / "sub"}, f"--output: {a_file} exists and is not a folder"),
            ({"data_root": a_file}, f"--data-root: {a_file} exists and is not a folder")):
        with pytest.raises(DemoError) as e:
            demo.run_demo("quick", **{"output": out, "data_root": tmp_path / "data", **kwargs})
        assert str(e.value) == message
        assert not out.exists() and not (tmp_path / "data").exists()
    # Relative folders are the working directory's (as any command's), the defaults the checkout's.
    monkeypatch.chdir(tmp_path)
    here = Path.cwd()
    assert demo.demo_paths("quick", "rel/out", "rel/data") == DemoPaths(here / "rel/out", here / "rel/data")
    assert demo.demo_paths("full") == DemoPaths(REPO / "output/demo", REPO / "datasets/shapes/full")


def test_the_label_efficiency_section_points_up_to_the_pyramid_check(tmp_path):
    from mae_det.demo import _efficiency_section

    paths = DemoPaths(output=tmp_path / "o", data=tmp_path / "d")
    paths.output.mkdir(parents=True)
    rows = [{"init": arm, "seed": 0, "num_labeled": n, "box_AP": 10.0 + n, "mask_AP": 5.0 + n}
            for arm in ARMS for n in (4, 8)]
    pyramids = [{**r, "pyramid": "simple"} for r in rows]
    lines = _efficiency_section(paths, rows, pyramids, "simple", 1, 0, "30 iterations whatever the subset size")
    assert "Dashed: the same runs with the `simple` pyramid (the pyramid check above)." in lines
    assert "| mae | 8 | 18.0 | 13.0 |" in lines and (paths.output / "label_efficiency.png").exists()
    assert not [x for x in _efficiency_section(paths, rows, [], None, 1, 0, "-") if x.startswith("Dashed")]


def test_the_report_names_the_machines_that_trained_the_runs(tmp_path):
    from mae_det.demo import _bar, trained_on
    from mae_det.utils.provenance import machine_info

    def run(name, cpu, native):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run_info.json").write_text(json.dumps({"versions": {"torch": "2.9.0"}, "machine": {
            "cpu": cpu, "cpu_count": 2, "cpu_capability": "AVX512", "cpu_bf16_native": native, "gpus": []}}))
        return tmp_path / name

    intel = "Intel Xeon (torch CPU kernels AVX512, bf16 native) with 2 CPU cores, torch 2.9.0"
    assert trained_on([run("a", "Intel Xeon", True), run("b", "Intel Xeon", True), tmp_path / "no_run"]) == intel
    assert trained_on([tmp_path / "a", run("c", "AMD EPYC", False), tmp_path / "b"]) == (
        f"{intel} (2 runs); AMD EPYC (torch CPU kernels AVX512, bf16 not native) with 2 CPU cores, torch 2.9.0 (1 run)")
    assert trained_on([tmp_path / "no_run"]).startswith(f"{machine_info()['cpu']} (torch CPU kernels ")
    # A resumed Detectron2 run logs "iter: MAX_ITER + 1": the bar stops at its total.
    assert _bar(32, 30).endswith("| 100% (30/30)")
