#!/usr/bin/env bash
# Set up minisd in .venv/ beside this repository: README's two quick-start commands both start with it.
# Idempotent: a second run only checks (about a second), so either command works first from a fresh clone.
#
#   bash tests/setup.sh                                                      torch's CPU build (any machine)
#   TORCH_INDEX=https://download.pytorch.org/whl/cu130 bash tests/setup.sh   torch's CUDA 13.0 build instead
#
# It lives in tests/ because it makes the environment the tests run in; CI (.ci/run) runs README's commands.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
python="$venv/bin/python"

# 1. torch first, pinned to the version minisd is tested with, from the CPU build's index (`pip install torch`
#    alone would pull the latest release with multi-GB CUDA libraries); then its dependencies from PyPI.
if ! "$python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    "$python" -m pip install -q --no-deps torch==2.13.0 --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    "$python" -m pip install -q torch==2.13.0
fi

# 2. minisd itself, editable, with its test extras (the references diffusers and transformers, pytest, ruff, the
#    notebook runner) and web extras (gradio, for `minisd explain`); again whenever pyproject.toml has changed.
stamp="$venv/minisd-installed-pyproject.toml"
if ! cmp -s pyproject.toml "$stamp"; then
    "$python" -m pip install -q -e ".[test,web]"
    cp pyproject.toml "$stamp"
fi
