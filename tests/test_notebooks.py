"""Every notebook in notebooks/ runs top to bottom on the shipped nano model, as a reader would run it, and its
stored outputs are what it prints and draws today.

Each runs in a fresh kernel in a temporary folder with MINISD_WEIGHTS unset (minisd.notebooks.execute, the same run
`python -m minisd.notebooks` stores); a cell that raises fails the test with the cell's error. Then the fresh outputs
are compared with the stored ones (minisd.notebooks.stale_outputs): text equal, pictures of the same size within a
mean absolute difference of PIXEL_BAR (2 of 255 per channel). A stale notebook fails with the line that differs;
`python -m minisd.notebooks` stores them again. The wall time of each is printed at the end of the run (the budget
is 3 minutes a notebook on 2 CPU cores; a cell taking more than 5 minutes fails as hung).
"""

import base64
import copy
import io
import time
from pathlib import Path

import nbformat
import pytest
from PIL import Image

from minisd.notebooks import NOTEBOOK_DIR, PIXEL_BAR, execute, png_distance, stale_outputs

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["00", "01", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11"]
TIMES: list[tuple[str, float]] = []


def test_every_lesson_has_its_notebook():
    assert [p.name[:2] for p in NOTEBOOKS] == EXPECTED, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_and_its_stored_outputs_are_current(path: Path):
    stored = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    fresh = execute(path)
    TIMES.append((path.name, time.perf_counter() - start))
    errors = [o for cell in fresh.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    assert any(cell.get("outputs") for cell in stored.cells), f"{path.name} is stored without outputs"
    problems = stale_outputs(stored, fresh)
    assert not problems, f"{path.name} is stale (python -m minisd.notebooks {path.name[:2]}):\n" + "\n".join(problems)


def png(color: tuple[int, int, int], size=(8, 8)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_staleness_check_catches_changed_text_and_pictures():
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(1)")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="1\n"),
        nbformat.v4.new_output("display_data", data={"image/png": png((10, 20, 30)), "text/plain": "<Figure>"}),
    ]
    notebook.cells = [cell]
    same = copy.deepcopy(notebook)
    same.cells[0].outputs[1].data["image/png"] = png((11, 21, 31))  # within the bar: 1 of 255
    assert png_distance(png((10, 20, 30)), png((11, 21, 31))) == 1.0 <= PIXEL_BAR
    assert stale_outputs(notebook, same) == []
    text = copy.deepcopy(notebook)
    text.cells[0].outputs[0].text = "2\n"
    assert "stored" in stale_outputs(notebook, text)[0]
    rounding = copy.deepcopy(notebook)  # another CPU's float32 rounding in a printed error: still current
    notebook.cells[0].outputs[0].text, rounding.cells[0].outputs[0].text = "error 3.58e-07\n", "error 4.1e-07\n"
    assert stale_outputs(notebook, rounding) == []
    rounding.cells[0].outputs[0].text = "error 2.3e-03\n"  # an error 6,000 times larger is a change
    assert "stored" in stale_outputs(notebook, rounding)[0]
    notebook.cells[0].outputs[0].text = "1\n"
    picture = copy.deepcopy(notebook)
    picture.cells[0].outputs[1].data["image/png"] = png((10, 20, 60))  # 10 of 255 on average
    assert "picture differs by 10.00" in stale_outputs(notebook, picture)[0]
    resized = copy.deepcopy(notebook)
    resized.cells[0].outputs[1].data["image/png"] = png((10, 20, 30), size=(8, 9))
    assert "inf" in stale_outputs(notebook, resized)[0]
    assert stale_outputs(notebook, nbformat.v4.new_notebook())  # a cell fewer
    split = copy.deepcopy(notebook)  # one print that reached the notebook in two messages
    split.cells[0].outputs[0].text = "1"
    split.cells[0].outputs.insert(1, nbformat.v4.new_output("stream", name="stdout", text="\n"))
    assert stale_outputs(notebook, split) == []
