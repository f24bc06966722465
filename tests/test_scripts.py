"""scripts/setup_env.sh, wheelhouse.sh and gpu_benchmark.sh on stand-in interpreters (no venv is built, no network).

The stand-in ``python`` logs each call to ``calls.log`` next to its ``bin/`` folder, answers the version probe with
``state/version``, fails ``-m pip`` while ``state/no_pip`` exists (more such switches below), and runs any other
``-c`` code with the real interpreter without site-packages (``-S``) on ``state/site``, where a test puts a stand-in
detectron2.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STUB = '''#!{python}
import os, subprocess, sys
home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
state = os.path.join(home, "state")
args = sys.argv[1:]
with open(os.path.join(home, "calls.log"), "a") as f:
    f.write(os.getcwd() + " | " + " ".join(args) + "\\n")
has = lambda name: os.path.exists(os.path.join(state, name))
if args[:1] == ["-m"] and args[1] in ("pip", "ensurepip") and has("no_pip"):
    if args[1] == "ensurepip" and has("ensurepip_works"):
        os.remove(os.path.join(state, "no_pip"))
        sys.exit(0)
    sys.exit("No module named " + args[1])
if args[:2] == ["-m", "venv"]:
    os.makedirs(os.path.join(args[2], "bin"))
    os.makedirs(os.path.join(args[2], "state", "site"))
    with open(__file__) as src, open(os.path.join(args[2], "bin", "python"), "w") as dst:
        dst.write(src.read())
    os.chmod(os.path.join(args[2], "bin", "python"), 0o755)
    with open(os.path.join(args[2], "state", "version"), "w") as f:
        f.write(open(os.path.join(state, "version")).read())
    sys.exit(0)
if "--target" in args and has("target_fails"):
    sys.exit("KeyboardInterrupt")
if args[:1] != ["-c"]:
    sys.exit(0)
code = args[1]
if "sys.version" in code:
    print(open(os.path.join(state, "version")).read().strip())
elif code == "import torch":
    sys.exit(0 if has("torch") else 1)
elif "pip.__version__" in code:  # the version check: old while state/old_pip exists
    sys.exit(1 if has("old_pip") else 0)
elif "sysconfig" in code:
    print(os.path.join(state, "site"))
elif "[setup] ok" in code:
    print("[setup] ok: stand-in")
else:
    env = dict(os.environ, PYTHONPATH=os.path.join(state, "site"))
    sys.exit(subprocess.call([sys.executable, "-S", "-c", *args[1:]], env=env))
'''


def stub_python(home: Path, version: str = "3.11.7", name: str = "python") -> Path:
    """A stand-in interpreter ``home/bin/NAME`` with its state folder; returns its path."""
    (home / "bin").mkdir(parents=True, exist_ok=True)
    (home / "state" / "site").mkdir(parents=True, exist_ok=True)
    (home / "state" / "version").write_text(version + "\n")
    exe = home / "bin" / name
    exe.write_text(STUB.format(python=sys.executable))
    exe.chmod(0o755)
    return exe


def calls(home: Path) -> list[str]:
    log = home / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def pip_calls(home: Path) -> list[str]:
    return [c.split(" | ", 1)[1] for c in calls(home) if " | -m pip install" in c]


def clone(tmp_path: Path, name: str = "clone") -> Path:
    """The files setup_env.sh reads, copied: their folder is the clone it sets up."""
    root = tmp_path / name
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup_env.sh", root / "scripts")
    shutil.copy(ROOT / "setup.py", root)
    return root


def setup(root: Path, venv: Path, python: Path | None | str = "venv's", path: str = "/usr/bin:/bin"):
    """setup_env.sh of ``root`` for ``venv`` with PYTHON ``python`` (default: the environment's own; None: unset)."""
    python = venv / "bin" / "python" if python == "venv's" else python
    env = {"PATH": path, "MAE_DET_VENV": str(venv), **({"PYTHON": str(python)} if python else {})}
    return subprocess.run(["bash", str(root / "scripts" / "setup_env.sh")], capture_output=True, text=True,
                          timeout=120, env=env)


def fake_detectron2(site: Path, broken: str = "", ours: bool = False) -> None:
    """A stand-in detectron2 in ``site``; ``broken``: what its ``config`` module raises; ``ours``: sal-detectron2's
    distribution metadata next to it."""
    (site / "detectron2").mkdir(parents=True)
    (site / "detectron2" / "__init__.py").write_text("__version__ = '0.6'\n")
    (site / "detectron2" / "config.py").write_text(f"raise ModuleNotFoundError({broken!r})\n" if broken else "")
    (site / "detectron2" / "engine.py").write_text("")
    if ours:
        (site / "sal_detectron2-0.7.2.dist-info").mkdir()
        (site / "sal_detectron2-0.7.2.dist-info" / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: sal-detectron2\nVersion: 0.7.2\n")


def test_setup_keeps_the_interpreter_an_environment_was_built_with(tmp_path):
    # Built with PYTHON=python3.12; the make targets then run setup without PYTHON while python3 is 3.11.
    root, venv = clone(tmp_path), tmp_path / "venv312"
    stub_python(venv, "3.12.1")
    stub_python(tmp_path / "base", "3.11.7", name="python3")
    r = setup(root, venv, None, path=f"{tmp_path / 'base' / 'bin'}:/usr/bin:/bin")
    assert r.returncode == 0, r.stderr
    assert (venv / ".mae_det_setup_stamp").read_text().strip().endswith("-3.12.1")
    assert not calls(tmp_path / "base")  # python3 is not even asked
    # an explicit PYTHON of the same X.Y (another patch release) is fine; another X.Y is refused
    (venv / ".mae_det_setup_stamp").unlink()
    assert setup(root, venv, stub_python(tmp_path / "py3129", "3.12.9")).returncode == 0
    r = setup(root, venv, tmp_path / "base" / "bin" / "python3")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"[setup] error: {venv} runs Python 3.12.1, not {tmp_path / 'base' / 'bin' / 'python3'}'s 3.11.7: "
        f"remove {venv} to rebuild it with that interpreter")


def test_setup_repairs_an_environment_left_without_pip(tmp_path):
    root, venv = clone(tmp_path), tmp_path / "venv"
    stub_python(venv)
    (venv / "state" / "no_pip").touch()
    r = setup(root, venv)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"[setup] error: {venv} has no pip and ensurepip cannot install it: remove {venv} (on Debian/Ubuntu install "
        "python3-venv) and re-run")
    (venv / "state" / "ensurepip_works").touch()
    r = setup(root, venv)
    assert r.returncode == 0, r.stderr
    assert f"[setup] {venv} has no pip: installing it with ensurepip" in r.stdout
    assert sum(c.endswith("| -m ensurepip --upgrade --default-pip") for c in calls(venv)) == 2
    assert any("-e .[dev,cluster]" in c for c in pip_calls(venv))


def test_setup_leaves_the_users_own_detectron2_and_its_torch_alone(tmp_path):
    root, venv = clone(tmp_path), tmp_path / "venv"
    stub_python(venv)
    (venv / "state" / "torch").touch()
    fake_detectron2(venv / "state" / "site")
    r = setup(root, venv)
    assert r.returncode == 0, r.stderr
    origin = venv / "state" / "site" / "detectron2" / "__init__.py"
    assert f"[setup] detectron2 at {origin} is not sal-detectron2 (your own build?): leaving it and torch alone" \
        in r.stdout.splitlines()
    assert pip_calls(venv) == ["-m pip install --quiet -e .[dev,cluster]"]


def test_setup_names_what_the_users_own_detectron2_lacks(tmp_path):
    root, venv = clone(tmp_path), tmp_path / "venv"
    stub_python(venv)
    fake_detectron2(venv / "state" / "site", broken="No module named 'omegaconf'")
    r = setup(root, venv)
    origin = venv / "state" / "site" / "detectron2" / "__init__.py"
    assert r.returncode == 1 and r.stderr.strip() == (
        f"[setup] error: detectron2 at {origin} (left alone) does not import: ModuleNotFoundError: No module named "
        f"'omegaconf'; install what it needs into {venv}, or remove it (or take it off PYTHONPATH) to let this script "
        "install sal-detectron2")
    assert pip_calls(venv) == [] and not (venv / ".mae_det_setup_stamp").exists()


def test_setup_finishes_an_interrupted_sal_detectron2_install(tmp_path):
    root, venv = clone(tmp_path), tmp_path / "venv"
    stub_python(venv)
    (venv / "state" / "target_fails").touch()  # interrupted during the --target install
    assert setup(root, venv).returncode == 1
    assert (venv / ".mae_det_sal_detectron2").exists()
    # its files landed (without pip's record of them): the next run still installs Detectron2's runtime packages
    (venv / "state" / "target_fails").unlink()
    fake_detectron2(venv / "state" / "site")
    r = setup(root, venv)
    assert r.returncode == 0, r.stderr
    assert any("omegaconf>=2.1,<2.4" in c for c in pip_calls(venv)) and "leaving it" not in r.stdout
    # pip's record of sal-detectron2 tells the same without the marker
    (venv / ".mae_det_sal_detectron2").unlink()
    (venv / ".mae_det_setup_stamp").unlink()
    shutil.rmtree(venv / "state" / "site" / "detectron2")
    fake_detectron2(venv / "state" / "site", ours=True)
    r = setup(root, venv)
    assert r.returncode == 0 and "leaving it" not in r.stdout, r.stdout
    assert sum("omegaconf>=2.1,<2.4" in c for c in pip_calls(venv)) == 2


def test_setup_stamp_without_sha256sum(tmp_path):
    root, venv = clone(tmp_path), tmp_path / "venv"
    stub_python(venv)
    tools = tmp_path / "tools"  # the commands the script uses, sha256sum not among them
    tools.mkdir()
    for name in ("bash", "cat", "dirname", "df", "awk", "touch", "rm", "tail", "cut"):
        (tools / name).symlink_to(shutil.which(name))
    r = setup(root, venv, path=str(tools))
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"[0-9a-f]{16}-3\.11\.7\n", (venv / ".mae_det_setup_stamp").read_text())
    assert setup(root, venv, path=str(tools)).stdout == f"[setup] environment up to date: {venv}\n"
    with open(root / "setup.py", "a") as f:
        f.write("# a new dependency\n")
    assert "up to date" not in setup(root, venv, path=str(tools)).stdout


def test_setup_installs_each_clone_that_shares_an_environment(tmp_path):
    venv = tmp_path / "venv"
    stub_python(venv)
    for name in ("clone1", "clone2"):
        r = setup(clone(tmp_path, name), venv)
        assert r.returncode == 0 and "up to date" not in r.stdout, r.stdout
    editable = [c.split(" | ")[0] for c in calls(venv) if c.endswith("-m pip install --quiet -e .[dev,cluster]")]
    assert editable == [str(tmp_path / "clone1"), str(tmp_path / "clone2")]


def test_setup_checks_the_disk_before_any_pip_action(tmp_path):
    root, venv = clone(tmp_path), tmp_path / "venv"
    stub_python(venv)
    (venv / "state" / "no_pip").touch()  # pip, ensurepip and the venv would all come after the check
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "df").write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
                              "echo '/dev/sda1 1000000 900000 102400 90% /'\n")
    (tools / "df").chmod(0o755)
    for venv_now in (venv, tmp_path / "new" / "venv"):  # an environment without torch, and none yet
        r = setup(root, venv_now, stub_python(tmp_path / "base"), path=f"{tools}:/usr/bin:/bin")
        assert r.returncode == 1 and r.stderr.strip() == (
            f"[setup] error: {venv_now} needs ~6.5 GB free for torch and its CUDA libraries; its disk has 100 MB free")
    assert [c for c in calls(venv) + calls(tmp_path / "base") if " | -m " in c] == []
    assert not (tmp_path / "new").exists()


def test_setup_upgrades_pip_only_when_it_is_old(tmp_path):
    # a re-run whose pins are all installed needs no network
    root, venv = clone(tmp_path), tmp_path / "venv"
    stub_python(venv)
    (venv / "state" / "torch").touch()
    assert setup(root, venv).returncode == 0
    assert not any("--upgrade pip" in c for c in pip_calls(venv))
    (venv / "state" / "old_pip").touch()
    (venv / ".mae_det_setup_stamp").unlink()
    assert setup(root, venv).returncode == 0
    assert sum("--upgrade pip" in c for c in pip_calls(venv)) == 1


def test_make_targets_run_in_an_environment_whose_path_has_a_space(tmp_path):
    venv = tmp_path / "my venvs" / "mae"
    stub_python(venv)
    (venv / "state" / "torch").touch()
    fake_detectron2(venv / "state" / "site", ours=True)
    r = subprocess.run(["make", "test-fast"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "MAE_DET_VENV": str(venv), "PYTHON": str(venv / "bin" / "python")})
    assert r.returncode == 0, r.stdout + r.stderr
    assert calls(venv)[-1] == f"{ROOT} | -m pytest tests -n auto --maxprocesses 4 -m not slow"


def test_setup_check_installs_nothing(tmp_path):
    root, venv = clone(tmp_path), tmp_path / "venv"
    stub_python(venv)
    check = ["bash", str(root / "scripts" / "setup_env.sh"), "--check"]
    env = {"PATH": "/usr/bin:/bin", "MAE_DET_VENV": str(venv), "PYTHON": str(venv / "bin" / "python")}
    r = subprocess.run(check, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and r.stdout == f"[setup] {venv} is not up to date with this clone: run make setup\n"
    assert pip_calls(venv) == []
    assert setup(root, venv).returncode == 0
    r = subprocess.run(check, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and r.stdout == f"[setup] environment up to date: {venv}\n"


GPU_STUB = """#!/bin/bash
printf '%s\\n' "$*" >> "$STUB_LOG"
if [[ "$*" == *benchmark_det* && -n "${STUB_DET_RC:-}" ]]; then echo "$STUB_DET_ERR" >&2; exit "$STUB_DET_RC"; fi
echo "stub ran"
"""


def gpu_benchmark(tmp_path: Path, *args: str, **env: str):
    """scripts/gpu_benchmark.sh run from ``tmp_path`` by a stand-in Python that logs to ``tmp_path/stub.log``."""
    stub = tmp_path / "stub_python"
    stub.write_text(GPU_STUB)
    stub.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(stub), "STUB_LOG": str(tmp_path / "stub.log"), **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_benchmark.sh"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)


def test_gpu_benchmark_dry_run_needs_its_folder(tmp_path):
    for args in (["--dry-run", "--followup"], ["--followup", "--dry-run"]):
        r = gpu_benchmark(tmp_path, *args)
        assert r.returncode == 2 and r.stderr == ("scripts/gpu_benchmark.sh: --dry-run needs an output folder "
                                                  "(--dry-run DIR)\n")
    assert not (tmp_path / "--followup").exists() and not (ROOT / "--followup").exists()


def test_gpu_benchmark_folders_are_relative_to_the_working_directory(tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "timm-1.0.31-py3-none-any.whl").touch()
    r = gpu_benchmark(tmp_path, "--dry-run", "out", WHEELHOUSE="wheels", MAE_CHECKOUT="mae",
                      GPU_BENCHMARK_LOG_DIR="logs")
    assert r.returncode == 0, r.stderr
    (log,) = (tmp_path / "out").glob("gpu_benchmark_*.txt")
    assert re.fullmatch(r"gpu_benchmark_\d{4}-\d\d-\d\d_\d{6}\.txt", log.name)
    assert (tmp_path / "out" / log.name.replace(".txt", ".stderr")).exists()
    stub_calls = (tmp_path / "stub.log").read_text()
    assert f"--find-links {tmp_path / 'wheels'} " in stub_calls
    assert f"--against-official {tmp_path / 'mae'} " in stub_calls
    assert not {"out", "logs", "wheels", "mae"} & {p.name for p in ROOT.iterdir()}


def test_gpu_benchmark_runs_keep_their_logs_and_tell_stopped_from_failed(tmp_path):
    logs = tmp_path / "logs"
    r = gpu_benchmark(tmp_path, GPU_BENCHMARK_LOG_DIR=str(logs), STUB_DET_RC="1", STUB_DET_ERR="RuntimeError: run 1")
    assert r.returncode == 1
    section4 = "4. detection ViT-B 1024 px, fp16, compiled backbone, D2 loader + LSJ"
    assert r.stderr.splitlines()[1:] == [f"failed: {section4} (exit 1)", "this run's errors:", "RuntimeError: run 1"]
    time.sleep(1.1)  # the logs' names hold the second they started
    # stopped at its limit (timeout's 124, which the stand-in returns itself): its figures are in the log
    r = gpu_benchmark(tmp_path, GPU_BENCHMARK_LOG_DIR=str(logs), STUB_DET_RC="124", STUB_DET_ERR="run 2")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[1:] == [f"stopped at its time limit (its figures so far are in the log): {section4}"]
    first, second = sorted(logs.glob("*.txt"))
    assert "RuntimeError: run 1" not in second.with_suffix(".stderr").read_text()
    assert "[4. detection" in first.read_text() and f"[{section4}: exit 124 after" in second.read_text()


def test_benchmark_det_without_cuda_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark_det.py"), "--device", "cuda", "--quick"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    assert r.returncode == 1 and r.stderr == "--device cuda: no CUDA device is available\n"


def test_benchmark_det_failure_prints_its_rows_without_asking_the_device_again(monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_det_tool", ROOT / "tools" / "benchmark_det.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    error = RuntimeError("CUDA error: an illegal memory access was encountered")

    def run_benchmark(s, log, results):
        results["backbone fwd+bwd s/img"] = {"ours": 0.5, "theirs": 0.6, "ratio": 0.5 / 0.6}
        raise error

    def device_name(device):  # a device in that state fails every later call as well
        raise error

    monkeypatch.setattr(tool, "run_benchmark", run_benchmark)
    monkeypatch.setattr(tool, "device_name", device_name)
    monkeypatch.setattr(tool, "stop_on_sigterm", lambda: None)
    with pytest.raises(SystemExit) as e:
        tool.main(["--quick"])
    assert e.value.code == f"benchmark_det: FAILED after the rows above: RuntimeError: {error}"
    out = capsys.readouterr().out
    assert "on cpu" in out and "backbone fwd+bwd s/img" in out


def wheelhouse(tmp_path: Path, *args: str):
    """scripts/wheelhouse.sh run from ``tmp_path`` by the stand-in Python of gpu_benchmark()."""
    stub = tmp_path / "stub_python"
    stub.write_text(GPU_STUB)
    stub.chmod(0o755)
    return subprocess.run(["bash", str(ROOT / "scripts" / "wheelhouse.sh"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ["PATH"], "PYTHON": str(stub),
                                                      "STUB_LOG": str(tmp_path / "stub.log")})


def test_wheelhouse_install_takes_this_pythons_wheels_by_name(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("cloudpickle-3.1.3-py3-none-any.whl", "torchcodec-0.17.0-cp311-cp311-manylinux_2_28_x86_64.whl",
                 "torchcodec-0.16.0-cp312-cp312-manylinux_2_28_x86_64.whl"):  # two Pythons' downloads
        (wheels / name).touch()
    r = wheelhouse(tmp_path, "install", "wheels", "site")  # relative to the working directory
    assert r.returncode == 0, r.stderr
    pip = (tmp_path / "stub.log").read_text().splitlines()[0].split()
    assert pip[:8] == ["-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--target"]
    assert pip[8:11] == [str(tmp_path / "site"), "--find-links", str(wheels)]
    assert "cloudpickle==3.1.3" in pip and pip[-2:] == ["pycocotools==2.0.11", "torchcodec"]
    assert not any(arg.endswith(".whl") for arg in pip)
    assert (tmp_path / "site").is_dir() and not (ROOT / "site").exists()


def test_wheelhouse_install_without_wheels_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in ("empty", "missing"):
        r = wheelhouse(tmp_path, "install", folder, "site")
        assert r.returncode == 1 and r.stderr == (
            f"[wheelhouse] error: {tmp_path / folder} holds no wheels: make them with "
            "`bash scripts/wheelhouse.sh download DIR`\n")
    assert not (tmp_path / "stub.log").exists()


def test_wheelhouse_downloads_cloudpickle(tmp_path):
    r = wheelhouse(tmp_path, "download", "wheels")
    assert r.returncode == 0, r.stderr
    first = (tmp_path / "stub.log").read_text().splitlines()[0]
    assert first.startswith(f"-m pip wheel --quiet --no-deps -w {tmp_path / 'wheels'} ")
    assert " cloudpickle==3.1.3 " in first
    header = (ROOT / "scripts" / "wheelhouse.sh").read_text().split("\nset ")[0]
    assert "cloudpickle" in header
