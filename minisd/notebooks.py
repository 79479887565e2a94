"""Run the lesson notebooks and store them with their outputs: `python -m minisd.notebooks [NAME ...]`.

Each notebook in the repository's notebooks/ folder runs top to bottom in a fresh kernel, on the shipped nano model
(MINISD_WEIGHTS unset), in a temporary folder, with fixed settings (KERNEL_ENV: the agg plot backend, one CPU
thread, no progress bars), and is written back with its outputs, so a reader sees the pictures without running
anything. The outputs are deterministic: the notebooks fix their seeds and print no wall-clock times or memory
addresses, the run records no timings, and paths inside the checkout are written from its root
(minisd/data/nano.safetensors).

tests/test_notebooks.py executes every notebook the same way and compares its fresh outputs with the stored ones
(`stale_outputs`): text must be equal (its numbers up to float32 rounding, `same_text`), pictures close (same size,
mean absolute difference at most PIXEL_BAR of 255 per channel). When the library or the model changes, run this
command again and commit the notebooks.

Needs the test extra (nbclient, nbformat, ipykernel, matplotlib); imported only when used.
"""

import argparse
import base64
import copy
import io
import os
import re
import sys
import tempfile
from pathlib import Path

from PIL import Image

from minisd.errors import MinisdError

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT = 300  # seconds: a guard against hangs (the budget is 3 minutes a notebook; a loaded machine is slower)
PIXEL_BAR = 2.0  # mean |stored − fresh| per channel on 0…255; a changed model or sampler moves pictures by 10+
# Numbers in printed text: another CPU (AVX2 vs AVX-512 kernels) rounds float32 differently, so a printed error of
# 3.6e-07 may read 4.1e-07 there. Both at or below ROUNDING_LEVEL: the same (float32 rounding noise); otherwise they
# must agree to NUMBER_RTOL (so "98%", "1.3 dB" or a changed count still fail).
ROUNDING_LEVEL = 1e-4
NUMBER_RTOL = 1e-3
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
# 1 thread: reproducible (and faster than 2 on a shared 2-core machine); tqdm off where its caller leaves the default
# (the pipelines' own bars are cut out of the outputs: without_progress_bars)
KERNEL_ENV = {"MPLBACKEND": "agg", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "TQDM_DISABLE": "1"}


def execute(path: Path):
    """Run the notebook at `path` top to bottom in a fresh kernel; return it (an nbformat node) with its outputs."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "MINISD_WEIGHTS"} | KERNEL_ENV
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's minisd, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as folder:  # what a notebook writes lands here, not in the repository
        client = NotebookClient(
            notebook, timeout=CELL_TIMEOUT, kernel_name="python3", record_timing=False,
            resources={"metadata": {"path": folder}},
        )  # fmt: skip
        client.execute(env=env)
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)  # timestamps, when a kernel adds them anyway
        if cell.cell_type == "code":
            cell.outputs = without_progress_bars(merge_streams(cell.outputs))
        for output in cell.get("outputs", []):  # paths as from the repository root: the same in every checkout
            if output.output_type == "stream":
                output.text = output.text.replace(root + os.sep, "")
            elif "text/plain" in output.get("data", {}):
                output.data["text/plain"] = output.data["text/plain"].replace(root + os.sep, "")
    return notebook


# tqdm's bar as a kernel captures it: "\r 40%|████      | 10/25 [00:01<00:01, 9.8it/s]", redrawn after each "\r"
PROGRESS_BAR = re.compile(r"\r?[^\r\n]*\d+%\|[^|\r\n]*\| \d+/\d+ \[[^\]\r\n]*\][\r\n]*")


def without_progress_bars(cell_outputs: list) -> list:
    """The outputs with tqdm's progress bars cut out of stderr (the pipelines' bar of model calls: its rates and
    times are wall-clock, so they are neither stored nor compared); a stderr output left empty goes.

    >>> from nbformat.v4 import new_output
    >>> bar = "\\r 40%|████  | 10/25 [00:01<00:01, 9.8it/s]\\r100%|██████| 25/25 [00:02<00:00, 9.9it/s]\\n"
    >>> [o.text for o in without_progress_bars([new_output("stream", name="stderr", text=bar + "a warning\\n")])]
    ['a warning\\n']
    """
    kept = []
    for output in cell_outputs:
        if output.output_type == "stream" and output.name == "stderr":
            output.text = PROGRESS_BAR.sub("", output.text)
            if not output.text.strip():
                continue
        kept.append(output)
    return kept


def merge_streams(cell_outputs: list) -> list:
    """One output for each run of consecutive prints to the same stream: the kernel sends a print in one message
    or several depending on when it flushes, so the split is not part of what the cell printed."""
    merged = []
    for output in cell_outputs:
        last = merged[-1] if merged else None
        if output.output_type == "stream" and last is not None and last.output_type == "stream":
            if last.name == output.name:
                last.text += output.text
                continue
        merged.append(output)
    return merged


def outputs(notebook) -> list[list[tuple[str, str]]]:
    """Per code cell, its outputs as (kind, content): ("text", …) for streams, results and errors,
    ("png", base64) for pictures."""
    cells = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        found = []
        for output in without_progress_bars(merge_streams(copy.deepcopy(cell.get("outputs", [])))):
            if output.output_type == "stream":
                found.append(("text", f"{output.name}: {output.text}"))
            elif output.output_type == "error":
                found.append(("text", f"error: {output.ename}: {output.evalue}"))
            else:
                data = output.get("data", {})
                if "image/png" in data:
                    found.append(("png", data["image/png"]))
                elif "text/plain" in data:
                    found.append(("text", data["text/plain"]))
        cells.append(found)
    return cells


def same_text(a: str, b: str) -> bool:
    """Printed text equal, up to float32 rounding in its numbers (ROUNDING_LEVEL, NUMBER_RTOL).

    >>> same_text("error 3.58e-07, 98% right", "error 4.1e-07, 98% right"), same_text("98%", "97%")
    (True, False)
    """
    if NUMBER.split(a) != NUMBER.split(b):  # the words around the numbers
        return False
    for x, y in zip(map(float, NUMBER.findall(a)), map(float, NUMBER.findall(b)), strict=True):
        both_rounding = abs(x) <= ROUNDING_LEVEL and abs(y) <= ROUNDING_LEVEL
        if not both_rounding and abs(x - y) > NUMBER_RTOL * max(abs(x), abs(y)):
            return False
    return True


def png_distance(a: str, b: str) -> float:
    """Mean absolute difference per channel (0…255) of two base64 PNGs; infinity when their sizes differ."""
    images = [Image.open(io.BytesIO(base64.b64decode(x))).convert("RGB") for x in (a, b)]
    if images[0].size != images[1].size:
        return float("inf")
    pairs = zip(images[0].tobytes(), images[1].tobytes(), strict=True)
    return sum(abs(p - q) for p, q in pairs) / len(images[0].tobytes())


def stale_outputs(stored, fresh) -> list[str]:
    """What differs between a stored notebook's outputs and a fresh run's, one line each (empty: up to date)."""
    problems = []
    old_cells, new_cells = outputs(stored), outputs(fresh)
    if len(old_cells) != len(new_cells):
        return [f"{len(old_cells)} code cells stored, {len(new_cells)} run"]
    for i, (old, new) in enumerate(zip(old_cells, new_cells, strict=True)):
        if [kind for kind, _ in old] != [kind for kind, _ in new]:
            problems.append(f"code cell {i}: outputs {[k for k, _ in old]} stored, {[k for k, _ in new]} now")
            continue
        for (kind, before), (_, now) in zip(old, new, strict=True):
            if kind == "text" and not same_text(before, now):
                problems.append(f"code cell {i}: stored {before.strip()[:120]!r}, now {now.strip()[:120]!r}")
            elif kind == "png" and (distance := png_distance(before, now)) > PIXEL_BAR:
                problems.append(f"code cell {i}: picture differs by {distance:.2f} of 255 (bar {PIXEL_BAR})")
    return problems


def notebook_paths(names: list[str]) -> list[Path]:
    """The notebooks named (a prefix such as "03" or a file name), or all of them."""
    if not NOTEBOOK_DIR.is_dir():
        raise MinisdError(f"no notebooks folder at {NOTEBOOK_DIR}: run this from a checkout of the repository")
    paths = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    if not names:
        return paths
    chosen = [p for p in paths if any(p.name.startswith(n) or p.stem == n for n in names)]
    if not chosen:
        raise MinisdError(f"no notebook matches {names}; have {[p.name for p in paths]}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    import nbformat

    parser = argparse.ArgumentParser(prog="python -m minisd.notebooks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run, e.g. 03 (default: all)")
    args = parser.parse_args(argv)
    try:
        paths = notebook_paths(args.names)
    except MinisdError as error:
        print(f"python -m minisd.notebooks: error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        notebook = execute(path)
        nbformat.write(notebook, path)
        kb = path.stat().st_size / 1024
        print(f"{path.name}: {sum(len(o) for o in outputs(notebook))} outputs, {kb:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
