"""Verdicts under load: two CPU-bound processes compete for the cores while the built-in suite runs.

A healthy model must pass every run and a defective one must still fail its family
(scripts/under_load.py; the closing figures of issue 9 come from its 20-run form).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "under_load.py"


def _under_load(model: Path, cache: Path, runs: int, expect: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCRIPT), str(model), "--cache", str(cache), "--runs", str(runs),
               "--burn-seconds", "300", "--expect", expect]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def test_healthy_model_passes_with_two_cpu_hogs(tiny_model: Path, warm_cache: Path) -> None:
    done = _under_load(tiny_model, warm_cache, runs=2, expect="pass")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2/2 runs as expected (pass) with 2 CPU-bound processes competing" in done.stdout


def test_silent_model_still_fails_lengths_with_two_cpu_hogs(silent_on_long_model: Path, tmp_path: Path) -> None:
    done = _under_load(silent_on_long_model, tmp_path / "cache", runs=1, expect="fail:lengths")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "failed families ['lengths']" in done.stdout
