"""The ``mae_det`` logger's handlers for one run of a training tool."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_LOG_FORMAT = "[%(asctime)s %(name)s] %(levelname)s %(message)s"
_LOG_DATEFMT = "%m/%d %H:%M:%S"


class _CurrentStderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record, not as it was when the run started."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


@contextmanager
def run_logging(output_dir: str | os.PathLike | None, *, level: int = logging.INFO,
                propagate: bool = True) -> Iterator[None]:
    """Console and ``output_dir/log.txt`` handlers on the ``mae_det`` logger for the length of one run.

    Everything is undone on exit (handlers, level, propagation), so a second run in the same process (a notebook,
    the test suite) neither prints its lines twice nor writes to a stream that an earlier caller has since closed.

    Args:
        output_dir: folder of ``log.txt``; None for no file (the other ranks of a distributed run).
        level: the logger's level during the run.
        propagate: whether records also reach the root logger's handlers.
    """
    logger = logging.getLogger("mae_det")
    saved = logger.level, logger.propagate
    fmt = logging.Formatter(_LOG_FORMAT, _LOG_DATEFMT)
    handlers: list[logging.Handler] = [_CurrentStderr()]
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        # UTF-8 whatever the locale: a C/Latin-1 locale would fail on (or garble) a non-ASCII path or label
        handlers.append(logging.FileHandler(Path(output_dir) / "log.txt", encoding="utf-8"))
    logger.setLevel(level)
    logger.propagate = propagate
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
