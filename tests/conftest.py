import atexit
import os
import shutil
import tempfile

import pytest
import torch

from tests.parity import REPORT

# minisd's hash cache (minisd/hashes.py) in a folder of the test run's own, never the user's ~/.cache; the CLI tests'
# subprocesses inherit it.
os.environ["MINISD_CACHE"] = tempfile.mkdtemp(prefix="minisd-cache-")
atexit.register(shutil.rmtree, os.environ["MINISD_CACHE"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """GPU tests carry @pytest.mark.gpu; without CUDA they skip with that reason, and run with `pytest -m gpu`."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """Print every parity measurement (the numbers the closing notes quote) and each notebook's wall time."""
    from tests.test_notebooks import TIMES

    if TIMES:
        terminalreporter.section("notebooks: wall time, top to bottom (budget 180 s each)")
        for name, seconds in TIMES:
            terminalreporter.write_line(f"{seconds:7.1f} s  {name}")
    if not REPORT:
        return
    terminalreporter.section("parity: max |minisd − reference| / max |reference|")
    for test, component, err, tol in REPORT:
        terminalreporter.write_line(f"{err:10.3g}  (bar {tol:g})  {component}  [{test}]")
