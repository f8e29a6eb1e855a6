"""Write the bad-input matrix of docs/troubleshooting.md from the cases of tests/test_plugin_errors.py.

    .venv/bin/python scripts/bad_input_matrix.py

The table is generated, never edited by hand, so it cannot drift from what the
tests check (tests/test_plugin_errors.py fails when they differ).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    import test_plugin_errors as cases

    docs = ROOT / "docs" / "troubleshooting.md"
    text = docs.read_text()
    before, _, rest = text.partition(cases.MATRIX_START)
    _, _, after = rest.partition(cases.MATRIX_END)
    docs.write_text(f"{before}{cases.MATRIX_START}\n{cases.bad_input_matrix()}{cases.MATRIX_END}{after}")
    print(f"updated {docs.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
