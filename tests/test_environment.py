"""The environment the setup script builds: imports, versions, and that tools/ is the project's."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_core_imports_and_versions():
    import detectron2
    import timm

    import mae_det

    assert mae_det.__version__ == "0.1.0"
    assert int(timm.__version__.split(".")[0]) >= 1
    assert detectron2.__version__


def test_collect_env_reports_versions():
    out = subprocess.run(
        [sys.executable, "-m", "mae_det.collect_env"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for name in ("mae_det", "detectron2", "detectron2 compiled ops", "torch", "timm", "CPU bf16 native", "CUDA available"):
        assert name in out, out
    assert "0.1.0" in out


def test_no_stray_tools_package_in_site_packages():
    # sal-detectron2 ships Detectron2's scripts as a top-level `tools` package; the setup removes it.
    purelib = Path(sysconfig.get_paths()["purelib"])
    assert not (purelib / "tools").exists()


def test_tools_resolves_to_project_folder():
    code = "import tools, sys; print(list(tools.__path__)[0])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).resolve() == (ROOT / "tools").resolve()


def test_missing_detectron2_message(tmp_path):
    # A shadowing module that fails to import stands in for an absent Detectron2.
    (tmp_path / "detectron2").mkdir()
    (tmp_path / "detectron2" / "__init__.py").write_text("raise ImportError('no detectron2 here')\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import mae_det"], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "PATH": ""},  # with or without pip -e
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "mae_det needs Detectron2" in last and "make setup" in last
    # the environment report still runs there, and says what is wrong (it raised the same ImportError)
    report = subprocess.run(
        [sys.executable, "-m", "mae_det.collect_env"], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "PATH": ""},
    )
    assert report.returncode == 0, report.stderr
    rows = {line.split("  ")[0]: line.split("  ", 1)[1].strip() for line in report.stdout.splitlines()}
    assert rows["detectron2"] == "not importable (ImportError: no detectron2 here)" and rows["torch"]


@pytest.mark.parametrize("target", ["setup", "test", "demo"])
def test_makefile_targets_exist(target):
    assert f"\n{target}:" in (ROOT / "Makefile").read_text()


def test_setup_second_run_is_a_no_op():
    venv = Path(sys.prefix)
    if not (venv / ".mae_det_setup_stamp").exists():
        pytest.skip("not running inside the environment built by scripts/setup_env.sh")
    env = {"PATH": "/usr/bin:/bin", "MAE_DET_VENV": str(venv), "PYTHON": sys.executable}
    # --check installs nothing: a suite run straight after an edit of setup.py must not rebuild its own environment
    check = subprocess.run(["bash", "scripts/setup_env.sh", "--check"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env=env)
    if check.returncode == 1:
        pytest.skip(check.stdout.strip())
    proc = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"[setup] environment up to date: {venv}\n"


def test_setup_refuses_to_stamp_an_environment_with_another_interpreter(tmp_path):
    # The environment keeps the interpreter it was built with; the stamp used to record the other one's version.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for path, version in ((venv / "bin" / "python", "3.11.7"), (tmp_path / "other_python", "3.12.1")):
        path.write_text(f"#!/bin/sh\necho {version}\n")
        path.chmod(0o755)
    proc = subprocess.run(
        ["bash", "scripts/setup_env.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "MAE_DET_VENV": str(venv), "PYTHON": str(tmp_path / "other_python")},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"[setup] error: {venv} runs Python 3.11.7, not {tmp_path / 'other_python'}'s "
                                   f"3.12.1: remove {venv} to rebuild it with that interpreter")
    assert not (venv / ".mae_det_setup_stamp").exists()


def test_make_runs_in_the_environment_mae_det_venv_names():
    proc = subprocess.run(["make", "-n", "test-fast"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "MAE_DET_VENV": "/opt/venvs/mae"})
    assert proc.returncode == 0, proc.stderr
    assert '"/opt/venvs/mae/bin/python" -m pytest tests' in proc.stdout


def _report(tmp_path, *flags, env=()):
    """``python FLAGS -m mae_det.collect_env`` in ``tmp_path``, whose sitecustomize hides BLOCK_MODULES: its rows."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        "BLOCK = set(os.environ.get('BLOCK_MODULES', '').split(','))\n"
        "class Blocker:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCK:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Blocker())\n")
    proc = subprocess.run(
        [sys.executable, *flags, "-m", "mae_det.collect_env"], cwd=tmp_path, capture_output=True, text=True,
        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "PATH": "", **dict(env)}, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return {line.split("  ")[0]: line.split("  ", 1)[1].strip() for line in proc.stdout.splitlines()}


@pytest.mark.parametrize("flags", [["-u"], ["-W", "ignore"], ["-X", "faulthandler"]])
def test_collect_env_with_interpreter_options_runs_without_detectron2(tmp_path, flags):
    rows = _report(tmp_path, *flags, env={"BLOCK_MODULES": "detectron2"})
    assert rows["detectron2"] == "not importable (ModuleNotFoundError: No module named 'detectron2')"
    assert rows["mae_det"].startswith("0.1.0 @ ")


@pytest.mark.parametrize("missing", ["timm", "torch"])
def test_collect_env_reports_a_missing_timm_or_torch(tmp_path, missing):
    rows = _report(tmp_path, env={"BLOCK_MODULES": missing})
    assert rows[missing] == f"not importable (ModuleNotFoundError: No module named '{missing}')"
    if missing == "torch":
        assert rows["hardware"] == "not read (ModuleNotFoundError: No module named 'torch')" and "CPU" not in rows
    else:
        import torch

        assert rows["torch"].startswith(f"{torch.__version__} @ ") and rows["CUDA available"] in ("True", "False")


def test_the_package_installs_editable_only(tmp_path):
    # a wheel would leave out configs/ and tools/, which the package reads from the clone
    build = f"from setuptools import build_meta; build_meta.build_wheel({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", build], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "mae_det installs editable only, from its clone: `pip install -e .` (make setup does it); a wheel or "
        "`pip install .` would leave out the configs/ and tools/ the package reads")
    assert not list(tmp_path.glob("*.whl"))
    version = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert version.stdout.strip() == "0.1.0"
