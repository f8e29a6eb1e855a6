from __future__ import annotations

import copy
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_slmdeploy import build
from pytest_slmdeploy.deploy import deploy, prepare
from pytest_slmdeploy.errors import BuildError
from pytest_slmdeploy.settings import Settings
from pytest_slmdeploy.source import inspect_source


@pytest.mark.parametrize(
    ("hidden", "intermediate", "block"), [(896, 4864, 128), (64, 128, 64), (96, 160, 32), (4096, 11008, 128)]
)
def test_int4_block_size(tiny_model: Path, hidden: int, intermediate: int, block: int) -> None:
    source = inspect_source(tiny_model)
    config = {**source.config, "hidden_size": hidden, "intermediate_size": intermediate}
    assert build.int4_block_size(type(source)(**{**vars(source), "config": config})) == block


def test_passes_per_precision(tiny_model: Path) -> None:
    source = inspect_source(tiny_model)
    int4 = build.olive_passes(source, "int4")["builder"]
    assert int4 == {"type": "ModelBuilder", "precision": "int4", "int4_block_size": 64, "int4_is_symmetric": False}
    assert [p["type"] for p in build.olive_passes(source, "int8").values()] == [
        "ModelBuilder",
        "OnnxDynamicQuantization",
    ]
    assert build.olive_passes(source, "fp32") == {"builder": {"type": "ModelBuilder", "precision": "fp32"}}
    with pytest.raises(BuildError, match="fp16 is refused by the CPU execution provider"):
        build.olive_passes(source, "fp16")


def test_olive_reason_reaches_the_error(tiny_model: Path, tmp_path: Path) -> None:
    recipe = build.olive_config(inspect_source(tiny_model), "fp32")
    recipe["passes"]["builder"]["precision"] = "fp16"  # forced past our own check: Olive prunes the pass
    with pytest.raises(BuildError) as info:
        build.run_olive(recipe, tmp_path / "out", tmp_path / "work", log_path=tmp_path / "build.log")
    message = str(info.value)
    assert "FP16 is not supported on CPU" in message
    assert str(tmp_path / "build.log") in message
    assert "\n" not in message
    assert (tmp_path / "build.log").stat().st_size > 0


def test_a_failed_pass_names_its_cause(model_copy: Path, tmp_path: Path) -> None:
    config = json.loads((model_copy / "config.json").read_text())
    config["hidden_act"] = "nope_act"  # the builder fails inside the pass; Olive logs only "Pass run failed."
    (model_copy / "config.json").write_text(json.dumps(config))
    recipe = build.olive_config(inspect_source(model_copy), "int4")
    with pytest.raises(BuildError) as info:
        build.run_olive(recipe, tmp_path / "out", tmp_path / "work", log_path=tmp_path / "build.log")
    assert "Pass run failed. KeyError: 'nope_act'" in str(info.value)
    assert "\n" not in str(info.value)


def test_run_olive_leaves_the_recipe_alone(tiny_model: Path, tmp_path: Path) -> None:
    recipe = build.olive_config(inspect_source(tiny_model), "int4")
    before = copy.deepcopy(recipe)
    result = build.run_olive(recipe, tmp_path / "out", tmp_path / "work")
    assert recipe == before
    assert {"genai_config.json", "model.onnx"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert not (tmp_path / "out" / "footprint.json").exists()
    assert result.seconds > 0
    assert result.peak_rss_bytes > 0


WARM_PROCESS = """
import sys
from pathlib import Path
from pytest_slmdeploy.deploy import deploy, prepare
from pytest_slmdeploy.settings import Settings
d = deploy(prepare(Settings(model=Path(sys.argv[1]), cache_dir=Path(sys.argv[2]))))
print(d.cache_hit, "olive" in sys.modules, "torch" in sys.modules)
"""


def test_warm_deploy_does_not_import_olive(tiny_model: Path, warm_cache: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", WARM_PROCESS, str(tiny_model), str(warm_cache)], capture_output=True, text=True
    )
    assert out.stdout.split() == ["True", "False", "False"], out.stderr


def test_manifest_and_rebuild(tiny_model: Path, warm_cache: Path) -> None:
    settings = Settings(model=tiny_model, cache_dir=warm_cache)
    deployment = deploy(prepare(settings))
    manifest = deployment.manifest
    assert deployment.cache_hit
    assert manifest.precision == "int4"
    assert manifest.build_seconds > 0
    assert manifest.build_peak_rss_bytes > 100e6
    assert manifest.versions["olive-ai"] == "0.13.0"
    assert manifest.versions["onnxruntime-genai"] == "0.14.1"
    assert {"model.onnx", "inference_model.json", "genai_config.json"} <= set(manifest.files)
    assert 0.2 < manifest.size_ratio < 1.0
    recorded = json.loads((deployment.entry_dir / "slmdeploy_manifest.json").read_text())
    assert recorded["build_key"] == prepare(settings).key


def test_remote_code_is_trusted_only_when_asked(tiny_model: Path) -> None:
    source = inspect_source(tiny_model)
    assert build.olive_config(source, "int4")["input_model"]["load_kwargs"] == {"trust_remote_code": False}
    trusted = build.olive_config(source, "int4", trust_remote_code=True)
    assert trusted["input_model"]["load_kwargs"] == {"trust_remote_code": True}


TWO_BUILDS = """
import json, logging, sys, threading
from pathlib import Path
from pytest_slmdeploy import build
from pytest_slmdeploy.errors import BuildError
from pytest_slmdeploy.source import inspect_source

def handlers():
    named = [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    return {(lg.name, id(h)): h for lg in [logging.getLogger(), *named] for h in lg.handlers}

source, out = inspect_source(Path(sys.argv[1])), Path(sys.argv[2])
handlers_before, threads_before = handlers(), set(threading.enumerate())
# The first build imports Olive (and torch, transformers) while the standard streams are this build's log.
build.run_olive(build.olive_config(source, "fp32"), out / "a", out / "work-a", log_path=out / "a.log")
recipe = build.olive_config(source, "fp32")
recipe["passes"]["builder"]["precision"] = "fp16"
try:
    build.run_olive(recipe, out / "b", out / "work-b", log_path=out / "b.log")
    reason = "built"
except BuildError as exc:
    reason = str(exc)
added = [h for key, h in handlers().items() if key not in handlers_before]
print(json.dumps({
    "reason": reason,
    "stream_handlers_added": [repr(h) for h in added if isinstance(h, logging.StreamHandler)],
    "threads_added": [t.name for t in set(threading.enumerate()) - threads_before],
}))
"""


def test_an_earlier_build_leaves_nothing_attached(tiny_model: Path, tmp_path: Path) -> None:
    """Issue 23: Olive's import-time StreamHandler(sys.stdout) was bound to the first build's log; the second
    build's messages hit the closed file and 'ValueError: I/O operation on closed file.' replaced its reason."""
    done = subprocess.run(
        [sys.executable, "-c", TWO_BUILDS, str(tiny_model), str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "FP16 is not supported on CPU" in result["reason"]
    assert "closed file" not in (tmp_path / "b.log").read_text()
    assert result["stream_handlers_added"] == []
    assert result["threads_added"] == []


def test_a_handler_on_a_closed_stream_does_not_hide_the_reason(tiny_model: Path, tmp_path: Path) -> None:
    """An application's own handler whose stream has closed: Python reports it into the build log as a
    '--- Logging error ---' traceback, which is about the handler, not the build."""
    closed = io.StringIO()
    stale = logging.StreamHandler(closed)
    closed.close()
    olive_logger = logging.getLogger("olive")
    olive_logger.addHandler(stale)
    recipe = build.olive_config(inspect_source(tiny_model), "fp32")
    recipe["passes"]["builder"]["precision"] = "fp16"
    try:
        with pytest.raises(BuildError) as info:
            build.run_olive(recipe, tmp_path / "out", tmp_path / "work", log_path=tmp_path / "build.log")
    finally:
        olive_logger.removeHandler(stale)
    assert "FP16 is not supported on CPU" in str(info.value)
    assert "--- Logging error ---" in (tmp_path / "build.log").read_text()
