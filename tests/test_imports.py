"""Every module of minisd and weights_convert imports alone in a fresh interpreter: no import loop hides behind a
package's `__init__.py` (a loop that the usual import order happens to avoid breaks a reader's first
`import weights_convert.keymap_ldm`)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("minisd", "weights_convert")

# One fresh interpreter imports the third-party libraries once (torch alone takes a second), then forks a child per
# module: each child starts with no minisd or weights_convert module loaded and imports just the one it is given.
# The third-party libraries import nothing of ours, so loading them first hides no loop.
DRIVER = """
import importlib, os, sys, traceback
import einops, huggingface_hub, PIL.Image, safetensors, tokenizers, torch  # run-time dependencies, never ours
for name in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException:
            os.write(write, traceback.format_exc().strip().splitlines()[-1].encode())
            os._exit(1)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    _, status = os.waitpid(pid, 0)
    print(f"{name}\\t{os.waitstatus_to_exitcode(status)}\\t{message}")
"""


def module_names() -> list[str]:
    """Every module of both packages, as dotted names (packages by their __init__)."""
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = module_names()


@pytest.fixture(scope="module")
def import_results() -> dict[str, tuple[int, str]]:
    """{module: (exit code, last line of the error)} from importing each module alone."""
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, *MODULES], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    results = {}
    for line in run.stdout.splitlines():
        name, code, message = line.split("\t", 2)
        results[name] = (int(code), message)
    return results


def test_every_module_is_listed():
    assert {"minisd", "minisd.errors", "weights_convert.keymap_ldm", "weights_convert.__main__"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module, import_results):
    code, message = import_results[module]
    assert code == 0, f"`python -c 'import {module}'` fails in a fresh interpreter: {message}"
