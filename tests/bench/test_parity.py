"""Training parity with Detectron2's own ViTDet (LazyConfig model, optimizer recipe, schedule, SimpleTrainer)."""
import pytest
import torch

from mae_det.bench.parity import (
    DELIBERATE_DEVIATIONS, channels_first_norm_params, parity_cfg, run_parity, tiny_parity_cfg,
)
from mae_det.config.pretrain import ConfigError
from mae_det.engine.det_trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_matches_vitdet_to_fp_tolerance():
    cfg = tiny_parity_cfg()
    report = run_parity(cfg, iters=3)
    assert report.ok, report.failures
    # item 2 of the parity: the same seed gives our whole Mask R-CNN exactly ViTDet's initial weights
    assert report.init_max_diff == 0.0
    # the only optimizer difference is the deliberate one, on exactly the channels-first LayerNorms
    assert {d.kind for d in report.param_group_differences} == set(DELIBERATE_DEVIATIONS)
    cf_norms = channels_first_norm_params(Trainer.build_model(cfg))
    assert {d.name for d in report.param_group_differences} == cf_norms and len(cf_norms) == 30
    assert len(report.loss_rows) == 3 and set(report.loss_rows[0]) == {
        "loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    for row in report.loss_rows:
        for ours, theirs in row.values():
            assert ours == pytest.approx(theirs, rel=1e-5)
    assert report.schedule_max_diff == 0.0
    assert report.inference_max_diff is not None and report.inference_max_diff < 1e-3  # px / score / mask pixel


@pytest.mark.parametrize("key,value,expected", [
    # a yacs default that the LazyConfig does not share -> losses differ
    ("MODEL.RPN.SMOOTH_L1_BETA", 0.5, "loss_rpn_loc ours"),
    # an optimizer choice of ours that ViTDet does not make -> named per parameter
    ("SOLVER.BIAS_NO_DECAY", True, "weight_decay: backbone.net.blocks.0.attn.qkv.bias: ours 0.0 vs ViTDet 0.1"),
    # a schedule that differs (our warmup method is not passed to the ViTDet side)
    ("SOLVER.WARMUP_METHOD", "constant", "lr schedules differ"),
])
def test_a_difference_fails_the_parity(key, value, expected):
    cfg = tiny_parity_cfg()
    cfg.merge_from_list([key, value])
    report = run_parity(cfg, iters=2)
    assert not report.ok
    assert any(expected in f for f in report.failures), report.failures


def test_an_optimizer_that_never_steps_fails_the_weight_check_in_a_long_warmup(monkeypatch):
    # The tolerance was 1 % of BASE_LR x iters: 250 warmup iterations from 0.001 move a weight by far less, and an
    # optimizer of ours that skipped every update passed the weight check.
    import types

    build = Trainer.__dict__["build_optimizer"].__func__

    def never_steps(cls, cfg, model):
        opt = build(cls, cfg, model)
        opt.step = types.MethodType(lambda self, *a, **k: None, opt)
        return opt

    monkeypatch.setattr(Trainer, "build_optimizer", classmethod(never_steps))
    cfg = parity_cfg("", ["SOLVER.WARMUP_ITERS", "250", "SOLVER.MAX_ITER", "300", "SOLVER.STEPS", "(200, 280)"])
    report = run_parity(cfg, iters=3)
    # the lrs of the 3 steps: 1e-3 x (0.001, 0.001396, 0.001792), per the ViTDet schedule
    weights = [f for f in report.failures if f.startswith("weights after 3 updates differ by ")]
    assert len(weights) == 1 and weights[0].endswith("; tolerance 4.19e-08: 1 % of the summed lr)"), report.failures


def _tool(*args, timeout=600):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, str(root / "tools" / "benchmark_det.py"), *args], cwd=root,
                          capture_output=True, text=True, timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow  # two interpreter starts, ~20 s
def test_parity_tool_exit_codes():
    ok = _tool("--parity", "--iters", "2")
    assert ok.returncode == 0 and "PARITY OK" in ok.stdout, ok.stderr[-2000:]
    assert "[deliberate] weight_decay of channels-first LayerNorm: 30 parameters" in ok.stdout
    bad = _tool("--parity", "--iters", "2", "SOLVER.BIAS_NO_DECAY", "True")
    assert bad.returncode == 1 and "PARITY FAILED" in bad.stdout
    assert "weight_decay: backbone.net.blocks.0.attn.qkv.bias: ours 0.0 vs ViTDet 0.1" in bad.stdout
    other = _tool("--side-by-side", "--config-file", "configs/shapes/mask_rcnn_vit_scratch.yaml")
    assert other.returncode == 2 and other.stderr.strip().splitlines()[-1] == (
        "benchmark_det: configs/shapes/mask_rcnn_vit_scratch.yaml: MODEL.VIT.PYRAMID is 'multi_tap'; the comparison "
        "with ViTDet needs 'simple' (e.g. configs/shapes/mask_rcnn_vit_parity.yaml)")


@pytest.mark.slow  # generates 12 images, trains and evaluates both sides for 4 iterations, ~40 s
def test_side_by_side_trains_and_evaluates_both_and_reuses_finished_runs(tmp_path):
    from mae_det.data.shapes import ShapesConfig, generate_shapes

    data = tmp_path / "shapes"
    generate_shapes(data, ShapesConfig(image_size=64, num_pool=2, num_train=8, num_val=4, num_cls_train=6,
                                       num_cls_val=6, max_objects=3, workers=1), log=lambda s: None)
    reg = (f"[['t','{data}/annotations/instances_train.json','{data}/images/train'],"
           f"['v','{data}/annotations/instances_val.json','{data}/images/val']]")
    args = ["--side-by-side", "--config-file", "configs/shapes/mask_rcnn_vit_parity.yaml", "--seeds", "1",
            "--sides", "ours,vitdet", "--output", str(tmp_path / "runs"), "DATASETS.REGISTER", reg, "DATASETS.TRAIN", "('t',)",
            "DATASETS.TEST", "('v',)", "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(3,)",
            "SOLVER.IMS_PER_BATCH", "2"]
    first = _tool(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [line for line in first.stdout.splitlines() if line.startswith("| ours") or line.startswith("| Detectron2")]
    assert len(rows) == 2 and all(row.split("|")[2].strip() == "1" for row in rows)
    assert "time per iteration, ours / ViTDet:" in first.stdout
    folders = sorted(p.name.rsplit("_", 1)[0] for p in (tmp_path / "runs").iterdir())
    assert folders == ["ours_seed0", "vitdet_seed0"]
    assert all((p / "result.json").is_file() for p in (tmp_path / "runs").iterdir())
    again = _tool(*args, timeout=120)  # finished runs are reused: same table, no training

    def table(out: str) -> str:
        return out[out.index("| | seeds"):]

    assert again.returncode == 0 and table(again.stdout) == table(first.stdout)


def _tool_main(argv):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "benchmark_det_tool", Path(__file__).resolve().parents[2] / "tools" / "benchmark_det.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main(argv)


@pytest.mark.parametrize("opts,message", [
    (["MODEL.NO_SUCH", "1"], "command line: unknown config key MODEL.NO_SUCH"),
    (["SOLVER.MAX_ITER", "abc"], "command line: Type mismatch"),
    (["SOLVER.MAX_ITER"], "command-line overrides must be KEY VALUE pairs"),
])
def test_bad_overrides_of_the_tiny_config_are_one_line_errors(opts, message, capsys):
    with pytest.raises(ConfigError, match=f"^{message}"):  # were yacs' AssertionError / ValueError tracebacks
        parity_cfg("", opts)
    with pytest.raises(SystemExit) as e:
        _tool_main(["--parity", *opts])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(f"benchmark_det: {message}")


def test_parity_with_no_iterations_is_refused(capsys):
    with pytest.raises(ValueError, match="iters: expected >= 1 training step to compare, got 0"):
        run_parity(tiny_parity_cfg(), iters=0)
    with pytest.raises(SystemExit) as e:  # was an IndexError after both models were built
        _tool_main(["--parity", "--iters", "0"])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: --iters: expected >= 1, got 0")
