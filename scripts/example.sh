#!/usr/bin/env bash
# The main job: set up .venv, make the example project's fine-tuned model, then check it with
# `pytest --slm-model` (build + quantize + install into the cache + the checklist). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
cd example_project
../.venv/bin/python make_model.py
../.venv/bin/python -m pytest --slm-model model "$@"
