#!/usr/bin/env bash
# The test job: set up .venv, then lint, type-check and run the test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/mkdocs build --strict --quiet --site-dir .venv/site
status=0
.venv/bin/python -m pytest -p no:cacheprovider --durations=20 "$@" || status=$?  # the 20 slowest: where CI time goes
# Exit code 5 means the selection held no tests: not a failure of the code.
if [ "$status" -eq 5 ]; then exit 0; fi
exit "$status"
