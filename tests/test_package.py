"""Guards of the design: run-time imports, file sizes a learner can read, the layout README promises."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_PACKAGES = ("minisd", "weights_convert")
# Run-time dependencies (pyproject.toml) and minisd's own packages. Anything else at run time is a bug:
# diffusers and transformers are references for the tests, never imported by minisd.
ALLOWED_IMPORTS = {"torch", "einops", "safetensors", "huggingface_hub", "tokenizers", "PIL", "tqdm", *RUNTIME_PACKAGES}
# Optional features import their optional extra inside a function (only when used), never at module level.
OPTIONAL_EXTRAS = {"minisd/explain.py": {"gradio"}, "minisd/notebooks.py": {"nbformat", "nbclient"}}
# A core file is read in one sitting (STYLE.md); these budgets are generous ceilings, not targets.
LINE_BUDGET = 450


def runtime_files():
    return sorted(p for pkg in RUNTIME_PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def imported_modules(tree: ast.AST) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", runtime_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_runtime_imports_only_the_declared_dependencies(path):
    rel = str(path.relative_to(ROOT))
    tree = ast.parse(path.read_text())
    optional = OPTIONAL_EXTRAS.get(rel, set())
    foreign = {n for n in imported_modules(tree) if n not in ALLOWED_IMPORTS | optional}
    foreign -= set(sys.stdlib_module_names)
    assert not foreign, f"{rel} imports {sorted(foreign)}, which are not run-time dependencies"
    top_imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]  # module level
    at_top = optional & imported_modules(ast.Module(body=top_imports, type_ignores=[]))
    assert not at_top, f"{rel} imports the optional {sorted(at_top)} at module level: import it where it is used"


@pytest.mark.parametrize(
    "path", [*runtime_files(), *sorted((ROOT / "benchmarks").rglob("*.py"))], ids=lambda p: str(p.relative_to(ROOT))
)
def test_core_files_stay_readable(path):
    n = len(path.read_text().splitlines())
    assert n <= LINE_BUDGET, f"{path.relative_to(ROOT)} has {n} lines; split it by idea (budget {LINE_BUDGET})"


def test_design_layout_is_there():
    for name in ["pyproject.toml", "README.md", "LICENSE", "minisd", "notebooks", "tests", "weights_convert"]:
        assert (ROOT / name).exists(), f"{name} is missing from the top level"


def test_vocabulary_ships_with_its_notice():
    data = ROOT / "minisd" / "data"
    assert (data / "bpe_simple_vocab_16e6.txt.gz").stat().st_size > 1_000_000
    assert "Permission is hereby granted" in (data / "LICENSE-bpe_vocab").read_text()
