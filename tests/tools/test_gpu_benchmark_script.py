"""scripts/gpu_benchmark.sh --dry-run: every section of the one GPU run goes through on a CPU with tiny sizes."""
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.bench.test_official import checkout  # noqa: F401  (the stand-in facebookresearch/mae clone)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_runs_every_section(checkout, tmp_path):  # noqa: F811
    env = dict(os.environ, MAE_CHECKOUT=str(checkout), PYTHON=str(ROOT / ".venv" / "bin" / "python"))
    r = subprocess.run(["bash", "scripts/gpu_benchmark.sh", "--dry-run", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = list(tmp_path.glob("gpu_benchmark_*.txt"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert text == r.stdout
    sections = re.findall(r"^\[(\d)\. .*?: exit (\d+) after \d+ s", text, re.M)
    assert sections == [("1", "0"), ("2", "0"), ("3", "0"), ("4", "0"), ("5", "0")]
    assert "ours bf16 compiled" in text or "ours fp32 compiled" in text
    assert "[jpeg] / its step-only" in text and "ratio ours" in text
    assert "D2 loader + LSJ" in text and "ours compiled" in text and "not comparable" in text
    assert "speed-up visible-only vs all-tokens" in text


@pytest.mark.slow
def test_followup_dry_run_runs_its_sections_with_cuda_graph_rows(checkout, tmp_path):  # noqa: F811
    env = dict(os.environ, MAE_CHECKOUT=str(checkout), PYTHON=str(ROOT / ".venv" / "bin" / "python"))
    r = subprocess.run(["bash", "scripts/gpu_benchmark.sh", "--followup", "--dry-run", str(tmp_path)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (log,) = tmp_path.glob("gpu_followup_*.txt")
    text = log.read_text()
    assert text.startswith("# scripts/gpu_benchmark.sh --followup --dry-run ")
    sections = re.findall(r"^\[(\d)\. .*?: exit (\d+) after \d+ s", text, re.M)
    assert sections == [("1", "0"), ("2", "0"), ("3", "0"), ("4", "0")]
    assert "/dev/shm" in text and "ours bf16 compiled+cudagraphs" in text
    assert "torch.compile mode reduce-overhead" in text and "[jpeg] / its step-only" in text
    assert "detection" not in text  # the first run's sections are not repeated


def test_unknown_argument_exits_2(tmp_path):
    r = subprocess.run(["bash", "scripts/gpu_benchmark.sh", "--dry", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == ("scripts/gpu_benchmark.sh: unknown argument '--dry' "
                                                      "(expected --followup and/or --dry-run DIR)")
