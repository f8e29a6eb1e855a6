"""pytest imports the plugin in every run of the environment: without --slm-model it must stay light.

The module list is the assertion; the time is a figure (``record_property``, and a pytest-benchmark
benchmark), held only to a bound no healthy run comes near.
"""

from __future__ import annotations

import json
import subprocess
import sys
from statistics import median
from typing import Any

import pytest

HEAVY = (
    "jsonschema", "yaml", "psutil", "numpy", "hypothesis", "filelock",
    "onnxruntime", "onnxruntime_genai", "olive", "torch", "transformers",
)  # fmt: skip
# What the plugin itself may load at import: its options, hooks and case-file node classes.
LIGHT = {
    "pytest_slmdeploy",
    "pytest_slmdeploy.errors",
    "pytest_slmdeploy.hookspecs",
    "pytest_slmdeploy.items",
    "pytest_slmdeploy.plugin",
    "pytest_slmdeploy.settings",
    "pytest_slmdeploy.stash",
}
GENEROUS_MS = 100.0  # about 15 ms measured on a loaded 2-core runner without bytecode caches; 90-120 ms before
PROBE = """
import json, sys
import pytest
before = set(sys.modules)
import pytest_slmdeploy.plugin
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def _cumulative_ms(importtime: str, module: str) -> float:
    """A module's cumulative import time from ``-X importtime`` output (microseconds there)."""
    found = [int(line.split("|")[1]) for line in importtime.splitlines() if line.rstrip().endswith(f"| {module}")]
    assert len(found) == 1, f"{module} not imported once:\n{importtime[-2000:]}"
    return found[0] / 1000


def import_plugin() -> tuple[float, float, list[str]]:
    """In a fresh interpreter, after pytest: (plugin ms, pytest ms, the modules the plugin's import added)."""
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    return (
        _cumulative_ms(run.stderr, "pytest_slmdeploy.plugin"),
        _cumulative_ms(run.stderr, "pytest"),
        json.loads(run.stdout),
    )


def test_importing_the_plugin_loads_nothing_heavy(record_property: pytest.RecordProperty) -> None:
    runs = [import_plugin() for _ in range(3)]
    added = runs[0][2]
    assert not [m for m in added if m.split(".")[0] in HEAVY], added
    assert {m for m in added if m.startswith("pytest_slmdeploy")} <= LIGHT
    plugin_ms = min(ms for ms, _, _ in runs)  # the least disturbed of three: load adds, it never subtracts
    record_property("plugin_import_ms", round(plugin_ms, 1))
    record_property("pytest_import_ms", round(min(ms for _, ms, _ in runs), 1))
    assert plugin_ms < GENEROUS_MS


HEAVY_PROBE = f"""
import json, sys
def pytest_sessionfinish(session):
    with open("heavy.json", "w") as fh:
        json.dump(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})), fh)
"""


def test_a_run_without_a_model_imports_what_it_would_without_the_plugin(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(HEAVY_PROBE)
    pytester.makepyfile("def test_plain():\n    pass\n")
    heavy = {}
    for name, extra in (("with", ()), ("without", ("-p", "no:slmdeploy"))):
        pytester.runpytest_subprocess("-p", "no:cacheprovider", *extra).assert_outcomes(passed=1)
        heavy[name] = json.loads((pytester.path / "heavy.json").read_text())
    assert heavy["with"] == heavy["without"]


def test_benchmark_plugin_import(benchmark: Any, record_property: pytest.RecordProperty) -> None:
    """The project's figure: a fresh interpreter importing pytest then the plugin (the time measured by pytest-
    benchmark), and the plugin's own cumulative import time in ``extra_info``."""
    plugin_ms: list[float] = []

    def once() -> None:
        plugin_ms.append(import_plugin()[0])

    benchmark.pedantic(once, rounds=5, iterations=1, warmup_rounds=1)
    figure = round(median(plugin_ms), 1)
    benchmark.extra_info["plugin_import_ms"] = figure
    record_property("plugin_import_ms_median", figure)
    assert plugin_ms, "no import measured"
