"""Render the pictures in docs/img/ (run after a change to what the plugin prints).

    .venv/bin/python scripts/docs_images.py TERMINAL_OUTPUT.txt HISTORY_DIR

- ``checklist.png``: the slmdeploy section of a real ``pytest --slm-model`` run
  (the text file holds it as pytest printed it), with pytest's colours;
- ``history.png``: ``slmdeploy bench plot`` of a benchmark history folder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
COLOURS = {"pass": "#2e7d32", "FAIL": "#c62828", "inconclusive": "#b58900", "skipped": "#b58900"}


def checklist_png(text: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = text.rstrip("\n").splitlines()
    width = max(len(line) for line in lines)
    fig = plt.figure(figsize=(width * 0.075, len(lines) * 0.2 + 0.3), facecolor="#1e1e1e")
    for i, line in enumerate(lines):
        colour = next((c for word, c in COLOURS.items() if line.startswith(word)), "#dddddd")
        fig.text(0.01, 1 - (i + 1) / (len(lines) + 1), line, family="monospace", fontsize=9, color=colour)
    fig.savefig(out, dpi=110, facecolor=fig.get_facecolor())
    plt.close(fig)
    return out


def main() -> int:
    terminal, history = Path(sys.argv[1]), Path(sys.argv[2])
    IMG.mkdir(parents=True, exist_ok=True)
    print(checklist_png(terminal.read_text(), IMG / "checklist.png"))
    plot = [sys.executable, "-m", "pytest_slmdeploy.cli", "bench", "--history", str(history), "plot"]
    subprocess.run([*plot, "--out", str(IMG / "history.png")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
