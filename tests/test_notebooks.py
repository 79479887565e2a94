"""Every notebook in notebooks/ runs top to bottom on the shipped nano model, as a reader would run it.

Each runs in a fresh kernel in a temporary folder (what a notebook writes lands there, not in the repository), with
MINISD_WEIGHTS unset so the nano model is used; a cell that raises fails the test with the cell's error. The wall
time of each is printed at the end of the run (the budget is 3 minutes a notebook on 2 CPU cores; a cell taking
more than 3 minutes fails).
"""

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["00", "01", "02", "03", "04", "05", "06", "07", "08"]
TIMES: list[tuple[str, float]] = []


def test_every_lesson_has_its_notebook():
    assert [p.name[:2] for p in NOTEBOOKS] == EXPECTED, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.delenv("MINISD_WEIGHTS", raising=False)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    client.execute(env={**os.environ, "MPLBACKEND": "agg"})
    TIMES.append((path.name, time.perf_counter() - start))
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
