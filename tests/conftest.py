import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

# Before the first mae_det import: `pytest` (not `python -m pytest`) puts only tests/ on the path.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mae_det.utils.known_warnings import filter_known_warnings  # noqa: E402

# Two cores: keep intra-op threads bounded and identical between runs that are compared bit for bit. Under
# pytest-xdist (`make test` runs one worker per core) each worker and the tools it starts get one thread, so that
# the workers do not oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


# pytest resets the warning filters for collection and for every test: install the tools' own filters in each, so
# that the summary lists only warnings nobody has explained yet (test modules import Detectron2 while collected).
@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session):
    filter_known_warnings()
    yield


@pytest.fixture(autouse=True)
def _known_warnings_filtered():
    filter_known_warnings()


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tiny models: on a loaded 2-core machine, OpenMP hand-offs between two threads cost more than the math."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One intra-op thread for a whole module: the kernels of the one-thread subprocesses that bit-exact
    comparisons run against."""
    with _torch_threads(1):
        yield
