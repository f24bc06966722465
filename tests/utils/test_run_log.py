"""Per-run logging of the training tools: nothing of one run survives into the next one in the same process."""
from __future__ import annotations

import io
import logging
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
