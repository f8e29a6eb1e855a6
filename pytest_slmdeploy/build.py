"""Stage 2: convert and quantize with Olive, in-process and offline, into a staging folder.

Olive is imported only here and only when a build really runs, so warm runs
(and ``pytest --help``) never pay for it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_slmdeploy import buildlog
from pytest_slmdeploy.errors import BuildError, describe
from pytest_slmdeploy.measure import PeakRss, Stopwatch
from pytest_slmdeploy.source import SourceModel

Progress = Callable[[str], None]

REQUIRED_OUTPUTS = ("genai_config.json", "model.onnx")
_OLIVE_BOOKKEEPING = ("footprint.json", "output_footprint.json", "run_history.txt", "model_config.json")
_INT4_BLOCK_SIZES = (128, 64, 32, 16)
# Olive's telemetry honours these CI markers (olive/telemetry/telemetry.py); outside CI it
# sends a heartbeat and waits 10-20 s at exit for a network that is not there.
_OLIVE_CI_MARKER = "CI"


def int4_block_size(source: SourceModel) -> int:
    """The tutorial's block size 128 where the shapes allow, else the largest that divides them."""
    dims = [source.config.get(k) for k in ("hidden_size", "intermediate_size")]
    known = [d for d in dims if isinstance(d, int) and d > 0]
    for block in _INT4_BLOCK_SIZES:
        if all(d % block == 0 for d in known):
            return block
    return _INT4_BLOCK_SIZES[-1]


def olive_passes(source: SourceModel, precision: str) -> dict[str, Any]:
    """The Olive passes for a precision (CPU execution provider)."""
    if precision == "fp16":
        raise BuildError(
            "precision fp16 is refused by the CPU execution provider (Olive: 'FP16 is not supported on CPU'); "
            "use --slm-precision int4, int8 or fp32"
        )
    if precision == "int4":
        return {
            "builder": {
                "type": "ModelBuilder",
                "precision": "int4",
                "int4_block_size": int4_block_size(source),
                "int4_is_symmetric": False,
            }
        }
    if precision == "int8":
        # ModelBuilder's own int8 raises KeyError on CPU: build fp32, then quantize weights to int8.
        return {
            "builder": {"type": "ModelBuilder", "precision": "fp32"},
            "int8": {
                "type": "OnnxDynamicQuantization",
                "precision": "int8",
                # A scale per output channel, so outlier weights do not coarsen a whole tensor; 7-bit weights,
                # so the u8 x s8 pairwise sums of x86 CPUs without VNNI do not saturate (8-bit per-channel was
                # less faithful than per-tensor there). Measured against per-tensor (issue 12): mean KLD 5x
                # lower on the tiny outlier model, 35x on the healthy one; same size and decode speed at 0.5B.
                "per_channel": True,
                "reduce_range": True,
            },
        }
    if precision == "fp32":
        return {"builder": {"type": "ModelBuilder", "precision": "fp32"}}
    raise BuildError(f"unknown precision {precision!r}: use int4, int8, fp32 or fp16")


def olive_config(source: SourceModel, precision: str, *, trust_remote_code: bool = False) -> dict[str, Any]:
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
        "passes": olive_passes(source, precision),
        "host": "local_system",
        "target": "local_system",
        "log_severity_level": 1,
    }


@dataclass(frozen=True)
class BuildResult:
    """What a build took."""

    seconds: float
    peak_rss_bytes: int
    log_path: Path


@contextlib.contextmanager
def _offline_env() -> Iterator[None]:
    overrides = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
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
) -> BuildResult:
    """Run an Olive workflow (see :func:`olive_config`) into ``output_dir``; raise :class:`BuildError`."""
    # A deep copy: olive.run() rewrites the config it is given, and the recipe goes into the manifest.
    config = {**copy.deepcopy(recipe), "cache_dir": str(work_dir / "olive-cache"), "output_dir": str(output_dir)}
    work_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or work_dir / "olive.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_bytes(b"")  # this build's log only
    passes = " + ".join(p["type"] for p in config["passes"].values())
    progress(f"converting with Olive ({passes})")
    watch = Stopwatch()
    handler = buildlog.Records()
    olive_logger = logging.getLogger("olive")
    with PeakRss() as rss, _offline_env(), _ticker(progress, "converting"):
        olive_logger.addHandler(handler)
        try:
            with buildlog.output_to_log(log_path), warnings.catch_warnings():
                # Olive's imports warn about their own dependencies, and it leaves temporary
                # directories for the garbage collector (a ResourceWarning each): not the user's concern.
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", ResourceWarning)
                with _olive_telemetry_off():
                    import olive

                    outcome = olive.run(config)
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
