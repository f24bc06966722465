"""git_state records the commit of the mae_det sources only, and keeps what git could read when a step fails;
log.txt, the other record of a run, is UTF-8."""
import subprocess
from pathlib import Path

import pytest

from mae_det.utils import provenance
from mae_det.utils.provenance import git_state

NULLS = {"commit": None, "dirty": None, "untracked": None}


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def user_repo(tmp_path) -> Path:
    """Someone else's project, committed, with an edit of its own and a git-ignored virtual environment."""
    _git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n")
    (tmp_path / "train.py").write_text("print(1)\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "user project")
    (tmp_path / "train.py").write_text("print(2)\n")
    return tmp_path


@pytest.mark.parametrize("folder", [".venv/lib/site-packages/mae_det/utils", "vendored/mae_det/utils"])
def test_mae_det_installed_inside_another_work_tree_records_no_commit(user_repo, monkeypatch, folder):
    installed = user_repo / folder / "provenance.py"  # ignored (a venv) or untracked (copied in)
    installed.parent.mkdir(parents=True)
    installed.write_text("# a copy of mae_det\n")
    monkeypatch.setattr(provenance, "__file__", str(installed))
    assert git_state() == NULLS
    assert git_state(installed.parent) == NULLS
    # The same project's own tracked file does give its state.
    assert git_state(user_repo / "train.py") == {"commit": _git(user_repo, "rev-parse", "HEAD"), "dirty": True,
                                                 "untracked": 0 if folder.startswith(".venv") else 1}


def test_a_failed_or_timed_out_git_status_keeps_the_commit(user_repo, monkeypatch):
    run = subprocess.run
    head = _git(user_repo, "rev-parse", "HEAD")

    def status_times_out(cmd, *args, **kwargs):
        if "status" in cmd:
            raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))
        return run(cmd, *args, **kwargs)

    monkeypatch.setattr(provenance.subprocess, "run", status_times_out)
    assert git_state(user_repo) == {"commit": head, "dirty": None, "untracked": None}

    def status_fails(cmd, *args, **kwargs):
        return run([*cmd, "--no-such-option"] if "status" in cmd else cmd, *args, **kwargs)

    monkeypatch.setattr(provenance.subprocess, "run", status_fails)
    assert git_state(user_repo) == {"commit": head, "dirty": None, "untracked": None}


def test_a_repository_without_a_commit_still_reports_its_work_tree(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    assert git_state(tmp_path) == NULLS  # nothing tracked (not even added): not these sources' repository
    _git(tmp_path, "add", "a.py")
    assert git_state(tmp_path) == {"commit": None, "dirty": True, "untracked": 1}
    assert git_state(tmp_path / "a.py") == git_state(tmp_path)  # a file names its work tree as well as a folder

