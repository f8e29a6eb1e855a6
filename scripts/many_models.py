"""Measure runs of several models: each model alone, both in one run, and both under ``pytest -n 2``.

    .venv/bin/python scripts/many_models.py [WORKDIR] [--model DIR] [--precisions int4,int8] [--json FILE]

Without ``--model`` it makes the Qwen2.5-0.5B-shaped model of ``bench_0p5b.py`` (random weights, 1.98 GB fp32).
Every run is a whole ``pytest`` run of the built-in suite on a project whose ``slm_models`` table holds the model
at each precision, with a cache of its own (cold: every run builds). For each run: wall time, the largest
process's peak RSS (the pytest process, or the largest xdist worker), the disk the builds take, and each model's
own figures from its report (build time and peak RSS, size, the model alone's peak RSS). docs/many-models.md
has the table this prints.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _project(folder: Path, model: Path, precisions: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = ",\n".join(f'  {{name = "m-{p}", path = "{model}", precision = "{p}"}}' for p in precisions)
    (folder / "pyproject.toml").write_text(
        f'[tool.pytest.ini_options]\nslm_models = [\n{entries},\n]\nslm_report = "report.json"\nslm_foundry = "no"\n'
    )
    return folder


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def run(project: Path, cache: Path, *args: str) -> dict[str, Any]:
    """One cold ``pytest`` run in ``project``: wall time, peak RSS of its largest process, disk, the report."""
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    # GNU time's %M: the largest process of the run (the pytest process, or an xdist worker), in kB.
    done = subprocess.run(
        ["/usr/bin/time", "-f", "peak_kb=%M", sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
         f"--slm-cache={cache}", "-q", *args],
        cwd=project, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    peak = int(done.stderr.rpartition("peak_kb=")[2].split()[0])
    report = json.loads((project / "report.json").read_text()) if (project / "report.json").exists() else {}
    models = report.get("models", [report] if report else [])
    return {
        "args": " ".join(args) or "(none)",
        "exit": done.returncode,
        "last_line": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:],
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak / 1024),
        "disk_mb": round(_du(cache) / 1e6, 1),
        "models": [
            {
                "name": m["model"].get("name"),
                "build_s": m["model"].get("build_s"),
                "build_peak_rss_mb": m["model"].get("build_peak_rss_mb"),
                "model_mb": m["model"].get("model_mb"),
                "alone_peak_rss_mb": next(
                    (f["figures"].get("peak_rss_mb") for f in m["families"] if f["family"] == "benchmark"), None
                ),
            }
            for m in models
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path, nargs="?", default=Path("/tmp/slmdeploy-many-models"))
    parser.add_argument("--model", type=Path, help="a Hugging Face model folder (default: the 0.5B-shaped one)")
    parser.add_argument("--precisions", default="int4,int8")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    if args.model is None:
        from bench_0p5b import make_model

        args.model = make_model(args.workdir / "qwen2.5-0.5b-shaped")
    precisions = args.precisions.split(",")
    runs = []
    for precision in precisions:  # each alone: the table's entry, --slm-only
        project = _project(args.workdir / f"alone-{precision}", args.model.resolve(), precisions)
        runs.append(run(project, args.workdir / f"cache-alone-{precision}", f"--slm-only=m-{precision}"))
        print(json.dumps(runs[-1]), flush=True)
    together = _project(args.workdir / "together", args.model.resolve(), precisions)
    runs.append(run(together, args.workdir / "cache-together"))
    print(json.dumps(runs[-1]), flush=True)
    runs.append(run(together, args.workdir / "cache-together-n2", "-n", str(len(precisions))))
    print(json.dumps(runs[-1]), flush=True)
    print("| run | exit | wall s | largest process peak RSS MB | builds on disk MB | per model |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        models = "; ".join(
            f"{m['name']}: build {m['build_s']} s at {m['build_peak_rss_mb']} MB, {m['model_mb']} MB, "
            f"alone {m['alone_peak_rss_mb']} MB"
            for m in r["models"]
        )
        print(f"| {r['args']} | {r['exit']} | {r['wall_s']} | {r['peak_rss_mb']} | {r['disk_mb']} | {models} |")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
