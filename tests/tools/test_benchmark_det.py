"""tools/benchmark_det.py --quick: both detectors build, run, and the side-by-side table is printed."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_prints_both_columns_and_ratios():
    r = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools" / "benchmark_det.py"), "--quick"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("Mask R-CNN, ViT-quick(96d x4), 128 px, batch 1, fp32, median of 1, on CPU")
    rows = {m.group(1).strip(): m.groups()[1:] for m in (re.match(r"(.+?)\s+(\S+)\s+(\S+)\s+(\S+)$", ln) for ln in lines[2:])}
    assert set(rows) == {
        "backbone fwd+bwd (s/iter)", "train iteration (s/img)", "inference (s/img)",
        "peak memory, backbone fwd+bwd (MB)", "peak memory, train iteration (MB)", "peak memory, inference (MB)",
        "backbone params (M)", "model params (M)"}
    for name in ("backbone fwd+bwd (s/iter)", "train iteration (s/img)", "inference (s/img)"):
        ours, theirs, ratio = map(float, rows[name])
        assert ours > 0 and theirs > 0 and abs(ratio - ours / theirs) <= 0.01 * ratio + 1e-3
    # On CPU a process's resident size follows the order the models ran in, not the models: no memory figures.
    for name in ("backbone fwd+bwd", "train iteration", "inference"):
        assert rows[f"peak memory, {name} (MB)"] == ("n/a", "n/a", "n/a")
    # Same architecture on both sides: identical parameter counts.
    assert rows["backbone params (M)"][0] == rows["backbone params (M)"][1] and rows["backbone params (M)"][2] == "1"
    assert rows["model params (M)"][0] == rows["model params (M)"][1]


def test_a_sigterm_still_prints_the_phases_measured_so_far():
    """scripts/gpu_benchmark.sh runs it under `timeout` (SIGTERM at the limit): the measured rows are kept."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-W", "ignore", str(ROOT / "tools" / "benchmark_det.py"), "--quick"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        if "measured backbone fwd+bwd" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    lines = out.strip().splitlines()
    assert lines[0] == "STOPPED by a signal: the rows measured before it"
    assert any(ln.startswith("backbone fwd+bwd (s/iter)") for ln in lines)
    assert not any(ln.startswith("model params (M)") for ln in lines)  # the run did not reach its end


@pytest.mark.slow
def test_a_compile_failure_keeps_the_eager_comparison():
    """A compile error of our backbone (here a backend Dynamo does not know; on a GPU an Inductor or Triton
    failure) ends the compiled rows only: the eager rows are measured and the table names the failure."""
    env = {**os.environ, "MAE_DET_COMPILE_BACKEND": "no_such_backend"}
    r = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "tools" / "benchmark_det.py"), "--quick",
                        "--compile"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert any(ln.startswith("ours compiled FAILED: InvalidBackend") for ln in lines), lines
    assert any(ln.startswith("inference (s/img)") for ln in lines)
    assert not any("ours compiled (s" in ln for ln in lines)


@pytest.mark.slow
def test_roi_align_benchmark_times_both_kernels_and_finds_them_equal():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark_det.py"), "--roi-align"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("RoIAlign backward on CPU")
    rows = [re.match(r"  (box|mask) head, (\d+) RoIs \((\d+) samples\): torchvision ([\d.]+) ms, ours ([\d.]+) ms "
                     r"\(([\d.]+) x\); gradients bit for bit equal$", ln) for ln in lines[1:]]
    assert [m.group(1) for m in rows] == ["box", "mask"], lines
    for m in rows:
        theirs, ours, ratio = float(m.group(4)), float(m.group(5)), float(m.group(6))
        assert int(m.group(3)) >= int(m.group(2)) * 49 and theirs > 0 and ours > 0
        assert abs(ratio - ours / theirs) <= 0.01 + 0.01 * ratio


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_det_tool", ROOT / "tools" / "benchmark_det.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch: expected >= 1, got 0"),  # was "FAILED after the rows above: AssertionError: "
    (["--img-size", "0"], "--img-size: expected >= 1, got 0"),
    (["--workers", "-1"], "--workers: expected >= 0, got -1"),
])
def test_sizes_below_their_least_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        _tool().main(["--quick", *args])
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")
