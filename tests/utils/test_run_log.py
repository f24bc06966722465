"""Per-run logging of the training tools: nothing of one run survives into the next one in the same process."""
from __future__ import annotations

import io
import logging
import subprocess
import sys

from mae_det.utils.run_log import run_logging


def test_a_run_logs_to_the_current_stderr_and_its_file_then_restores_the_logger(tmp_path, monkeypatch):
    logger = logging.getLogger("mae_det")
    before = list(logger.handlers), logger.level, logger.propagate
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    with run_logging(tmp_path / "a", propagate=False):
        logging.getLogger("mae_det.pretrain").info("epoch 1 done")
        first.close()  # what a caller that captured stderr does when it is finished with it
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("mae_det.pretrain").warning("slow step")
    assert second.getvalue().count("\n") == 1 and "WARNING slow step" in second.getvalue()
    assert (list(logger.handlers), logger.level, logger.propagate) == before
    log = (tmp_path / "a" / "log.txt").read_text().splitlines()
    assert [ln.split("] ", 1)[1] for ln in log] == ["INFO epoch 1 done", "WARNING slow step"]

    third = io.StringIO()
    monkeypatch.setattr(sys, "stderr", third)
    with run_logging(None, level=logging.WARNING):
        logging.getLogger("mae_det.pretrain").info("not shown on other ranks")
        logging.getLogger("mae_det.pretrain").warning("shown once")
    assert third.getvalue().count("shown once") == 1 and "not shown" not in third.getvalue()
    assert not (tmp_path / "log.txt").exists()


def test_log_txt_is_utf8_whatever_the_locale(tmp_path, repo_root):
    # -X warn_default_encoding turns a file opened in the locale's encoding into an error (PEP 597).
    module = str(repo_root / "mae_det/utils/run_log.py")
    code = (f"import importlib.util, logging\n"
            f"spec = importlib.util.spec_from_file_location('run_log', {module!r})\n"
            f"m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"with m.run_logging({str(tmp_path)!r}, propagate=False):\n"
            f"    logging.getLogger('mae_det').info('Δ vs scratch')\n")
    proc = subprocess.run([sys.executable, "-X", "warn_default_encoding", "-W", "error::EncodingWarning", "-c", code],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "log.txt").read_bytes().decode("utf-8").endswith("INFO Δ vs scratch\n")
