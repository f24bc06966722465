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
