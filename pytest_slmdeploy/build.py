"""Stage 2: convert and quantize with Olive, in-process and offline, into a staging folder.

Olive is imported only here and only when a build really runs, so warm runs
(and ``pytest --help``) never pay for it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_slmdeploy import buildlog, recipes
from pytest_slmdeploy.errors import BuildError, describe
from pytest_slmdeploy.measure import PeakRss, Stopwatch, threads_free_now, torch_threads
from pytest_slmdeploy.source import SourceModel

Progress = Callable[[str], None]

REQUIRED_OUTPUTS = ("genai_config.json", "model.onnx")
_OLIVE_BOOKKEEPING = ("footprint.json", "output_footprint.json", "run_history.txt", "model_config.json")
# Olive's telemetry honours these CI markers (olive/telemetry/telemetry.py); outside CI it
# sends a heartbeat and waits 10-20 s at exit for a network that is not there.
_OLIVE_CI_MARKER = "CI"


def olive_passes(
    source: SourceModel, precision: str, *, trust_remote_code: bool = False, chat_template: str | None = None
) -> dict[str, Any]:
    """The Olive passes of a precision's recipe (CPU execution provider); see :mod:`pytest_slmdeploy.recipes`.
    ``chat_template``: the template the user chose over the model's own (calibration renders with it)."""
    return recipes.recipe(precision).olive_passes(source, recipes.BuildChoices(trust_remote_code, chat_template))


def olive_config(
    source: SourceModel, precision: str, *, trust_remote_code: bool = False, chat_template: str | None = None
) -> dict[str, Any]:
    """An ``olive run`` workflow config, as in the tutorial's Method 2 (output folders added by :func:`run_olive`)."""
    return {
        "input_model": {
            "type": "HfModel",
            "model_path": str(source.path),
            "task": "text-generation",
            "load_kwargs": {"trust_remote_code": trust_remote_code},  # only ever the user's explicit choice
        },
        "systems": {
            "local_system": {
                "type": "LocalSystem",
                "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}],
            }
        },
        "passes": olive_passes(source, precision, trust_remote_code=trust_remote_code, chat_template=chat_template),
        "host": "local_system",
        "target": "local_system",
        "log_severity_level": 1,
    }


# The passes this project adds to Olive's own (Olive's "package config" is how a workflow names its own passes).
OWN_PASSES = {
    "GenAIModelBuilder": {
        "module_path": "pytest_slmdeploy.olive_genai.GenAIModelBuilder",
        "supported_providers": ["CPUExecutionProvider"],
        "supported_accelerators": ["cpu"],
        "supported_precisions": ["int4", "int8", "fp32"],
    },
}


def package_config() -> dict[str, Any]:
    """Olive's default package config plus :data:`OWN_PASSES` (it replaces the default, so both are given)."""
    from olive.package_config import OlivePackageConfig

    with open(OlivePackageConfig.get_default_config_path(), encoding="utf-8") as fh:
        config: dict[str, Any] = json.load(fh)
    config["passes"] = {**config["passes"], **OWN_PASSES}
    return config


@dataclass(frozen=True)
class BuildResult:
    """What a build took."""

    seconds: float
    peak_rss_bytes: int
    log_path: Path


@contextlib.contextmanager
def _offline_env(calibration_cache: tuple[Path, str] | None = None) -> Iterator[None]:
    overrides = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if calibration_cache is not None:  # read by olive_data.py, inside Olive (the recipe must not name them)
        overrides[recipes.CALIBRATION_CACHE_ENV] = str(calibration_cache[0])
        overrides[recipes.CALIBRATION_SOURCE_ENV] = calibration_cache[1]
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _olive_telemetry_off() -> Iterator[None]:
    """Create Olive's telemetry singleton as CI would, so it never sends or waits; stop its exporter thread
    afterwards. Disabled events never get their delivery callbacks, so shutdown is told not to wait for them
    (its default waits 2 s)."""
    from olive.telemetry import Telemetry

    had = os.environ.get(_OLIVE_CI_MARKER)
    os.environ[_OLIVE_CI_MARKER] = had or "1"
    try:
        telemetry = Telemetry()
        telemetry.disable_telemetry()
    finally:
        if had is None:
            os.environ.pop(_OLIVE_CI_MARKER, None)
    try:
        yield
    finally:
        telemetry.shutdown(callback_timeout_millis=0)


@contextlib.contextmanager
def _ticker(progress: Progress, what: str, every: float = 10.0) -> Iterator[None]:
    watch = Stopwatch()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every):
            progress(f"{what}: {watch.seconds:.0f}s elapsed")

    thread = threading.Thread(target=tick, name="slmdeploy-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def run_olive(
    recipe: dict[str, Any],
    output_dir: Path,
    work_dir: Path,
    *,
    log_path: Path | None = None,
    progress: Progress = lambda message: None,
    calibration_cache: tuple[Path, str] | None = None,
) -> BuildResult:
    """Run an Olive workflow (see :func:`olive_config`) into ``output_dir``; raise :class:`BuildError`.
    ``calibration_cache``: (folder, the source's content fingerprint): where the source's calibration answers are
    kept between builds (olive_data.py)."""
    # A deep copy: olive.run() rewrites the config it is given, and the recipe goes into the manifest.
    config = {**copy.deepcopy(recipe), "cache_dir": str(work_dir / "olive-cache"), "output_dir": str(output_dir)}
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or work_dir / "olive.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")  # this build's log only
    passes = " + ".join(p["type"] for p in config["passes"].values())
    watch = Stopwatch()
    handler = buildlog.Records()
    olive_logger = logging.getLogger("olive")
    threads, on = threads_free_now()
    progress(f"converting with Olive ({passes}) on {on}")
    with PeakRss() as rss, _offline_env(calibration_cache), _ticker(progress, "converting"):
        olive_logger.addHandler(handler)
        try:
            # torch_threads imports torch, as Olive would: while the standard streams are this build's log.
            with buildlog.output_to_log(log_path), warnings.catch_warnings(), torch_threads(threads):
                # Olive's imports warn about their own dependencies, and it leaves temporary
                # directories for the garbage collector (a ResourceWarning each): not the user's concern.
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", ResourceWarning)
                with _olive_telemetry_off():
                    from olive.workflows import run as olive_run

                    outcome = olive_run(config, package_config=package_config())
                gc.collect()  # finalize Olive's leftover temporary directories while warnings are ignored
        except Exception as exc:  # Olive raises anything; the user gets one line and the log.
            raise BuildError(f"Olive failed: {describe(exc)} (full log: {log_path})") from exc
        finally:
            olive_logger.removeHandler(handler)
    produced = outcome is not None and outcome.has_output_model()
    missing = [name for name in REQUIRED_OUTPUTS if not (output_dir / name).is_file()]
    if not produced or missing:
        raise BuildError(
            f"Olive produced no model ({handler.reason(log_path)}); missing {', '.join(missing) or 'output model'} "
            f"(full log: {log_path})"
        )
    for name in _OLIVE_BOOKKEEPING:
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(work_dir / "olive-cache", ignore_errors=True)
    progress(f"converted in {watch.seconds:.1f}s")
    return BuildResult(seconds=watch.seconds, peak_rss_bytes=rss.peak, log_path=log_path)
