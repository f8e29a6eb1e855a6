"""Before anything is published: does the built model load in ONNX Runtime GenAI and generate a token?

Runs in a child process, so a native crash of a broken model cannot take the build
(or the pytest run around it) down, and the parent keeps no runtime state.

    python -m pytest_slmdeploy.runtime.probe MODEL_DIR
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pytest_slmdeploy.errors import BuildError, describe

TIMEOUT_S = 600


def _probe(model_dir: Path) -> None:
    """Load, render a one-turn chat, generate one token (raises on any failure)."""
    from pytest_slmdeploy.runtime.ortgenai import OrtGenaiBackend
    from pytest_slmdeploy.runtime.protocol import GenerationOptions

    backend = OrtGenaiBackend(model_dir)
    try:
        backend.generate("Hello", GenerationOptions(max_new_tokens=1))
    finally:
        backend.close()


def check_loads(model_dir: Path, *, timeout_s: float = TIMEOUT_S) -> float:
    """Raise :class:`BuildError` (one line, the runtime's reason) unless the model loads and generates.

    Returns the seconds it took.
    """
    import time

    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest_slmdeploy.runtime.probe", str(model_dir)],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise BuildError(
            f"the built model did not load and generate a token within {timeout_s:g}s in ONNX Runtime GenAI; "
            "nothing was installed"
        ) from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"the loader exited with code {done.returncode}"
        raise BuildError(
            f"the built model does not load and generate in ONNX Runtime GenAI ({reason}); nothing was installed"
        )
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    try:
        _probe(Path(argv[0]))
    except Exception as exc:  # one line for the parent: the runtime's own reason
        print(describe(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
