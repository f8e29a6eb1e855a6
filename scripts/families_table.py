"""Deploy a tiny model of each published family and run the built-in suite through both backends.

    .venv/bin/python scripts/families_table.py [--out docs/families-table.md] [FAMILY ...]

Trains each family's tiny FAQ model (pytest_slmdeploy.testing.tinyfamilies), then runs
``pytest --slm-model`` on it once per backend (ORT GenAI, then the Foundry SDK,
which reuses the build) and prints one Markdown row per family: build seconds,
PromptTemplate's parts and notes, built-in suite n/m and FAQ n/12 per backend.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from under_load import run_suite  # the same subprocess run of the suite (scripts/ is on sys.path)

from pytest_slmdeploy.testing.tinyfamilies import FAMILIES
from pytest_slmdeploy.testing.tinymodel import FAQ, family_spec, make_tiny_chat_model

BACKENDS = ("ort-genai", "foundry")


def run_one(model: Path, cache: Path, backend: str, workdir: Path) -> dict[str, object]:
    _, data, _, _ = run_suite(model, cache, workdir / f"report-{backend}.json", [f"--slm-backend={backend}"])
    return dict(data)


def counts(report: dict[str, object]) -> tuple[str, str]:
    families = {row["family"]: row for row in report["families"]}  # type: ignore[attr-defined]
    passed = sum(row["passed"] for row in families.values())
    total = sum(row["passed"] + row["failed"] for row in families.values())
    domain = families.get("domain", {"passed": 0})
    return f"{passed}/{total}", f"{domain['passed']}/{len(FAQ)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    header = (
        "| family | train s | build s | PromptTemplate parts | suite ORT GenAI | FAQ ORT GenAI "
        "| suite Foundry | FAQ Foundry | notes |"
    )
    lines = [header, "|" + "---|" * 9]
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.families:
            workdir = Path(tmp) / key
            workdir.mkdir()
            started = time.perf_counter()
            model = make_tiny_chat_model(workdir / f"tiny-{key}", family_spec(key))
            train_s = time.perf_counter() - started
            cache = workdir / "cache"
            reports = {backend: run_one(model, cache, backend, workdir) for backend in BACKENDS}
            entry = next((cache / "custom").iterdir())
            parts = json.loads((entry / "inference_model.json").read_text())["PromptTemplate"]
            build_s = reports["ort-genai"]["model"].get("build_s", "?")  # type: ignore[attr-defined]
            notes = "; ".join(n.removeprefix("PromptTemplate: ") for n in reports["ort-genai"]["notes"])  # type: ignore[attr-defined]
            cells = [key, f"{train_s:.1f}", str(build_s), ", ".join(parts)]
            for backend in BACKENDS:
                cells += counts(reports[backend])
            cells.append(notes or "-")
            for backend in BACKENDS:
                for row in reports[backend]["families"]:  # type: ignore[attr-defined]
                    for failure in row["failures"]:
                        print(f"{key} {backend}: FAILED {failure}", file=sys.stderr)
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
