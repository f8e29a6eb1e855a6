from __future__ import annotations

import copy
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_slmdeploy import build, recipes
from pytest_slmdeploy.checklist.format import GENERIC_PROMPTS
from pytest_slmdeploy.deploy import deploy, prepare
from pytest_slmdeploy.errors import BuildError
from pytest_slmdeploy.settings import LADDER_RUNGS, PRECISIONS, Settings, allowed_cpus
from pytest_slmdeploy.source import SourceModel, inspect_source


@pytest.mark.parametrize(
    ("hidden", "intermediate", "block"),
    [(896, 4864, 64), (576, 1536, 64), (64, 128, 64), (96, 160, 32), (100, 300, 16)],
)
def test_block_size(tiny_model: Path, hidden: int, intermediate: int, block: int) -> None:
    source = inspect_source(tiny_model)
    config = {**source.config, "hidden_size": hidden, "intermediate_size": intermediate}
    assert recipes.block_size(type(source)(**{**vars(source), "config": config})) == block


def test_build_key_ignores_where_the_source_and_this_package_lie(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPTQ recipe names the source folder and this package's olive_data.py by path; the same build from another
    folder or virtual environment must reuse the cache (it did not: the int4 key differed between checkouts)."""
    from pytest_slmdeploy import deploy as deploy_module

    source = inspect_source(tiny_model)
    recipe = build.olive_config(source, "int4")
    here = str(Path(deploy_module.__file__).parent)
    assert here in json.dumps(recipe)  # the calibration's user_script
    key = deploy_module.build_key("f", "int4", recipe, "t")
    text = json.dumps(recipe).replace(here, "/venv2/site-packages/pytest_slmdeploy")
    elsewhere = json.loads(text.replace(str(source.path), "/other/copy"))
    monkeypatch.setattr(deploy_module, "__file__", "/venv2/site-packages/pytest_slmdeploy/deploy.py")
    assert deploy_module.build_key("f", "int4", elsewhere, "t") == key
    assert deploy_module.build_key("f", "int8", elsewhere, "t") != key


def _with_config(source: SourceModel, **config: object) -> SourceModel:
    return type(source)(**{**vars(source), "config": {**source.config, **config}})


def test_recipes_per_precision(tiny_model: Path) -> None:
    source = inspect_source(tiny_model)
    int4 = build.olive_passes(source, "int4")
    assert list(int4) == ["gptq", "builder", "embedding"]
    gptq = int4["gptq"]
    assert (gptq["type"], gptq["bits"], gptq["group_size"], gptq["sym"]) == ("Gptq", 4, 64, False)
    assert set(gptq["overrides"]) == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"}
    calibration = gptq["data_config"]["load_dataset_config"]["params"]
    assert calibration["source"] == str(source.path)
    assert not set(calibration["instructions"]) & set(GENERIC_PROMPTS)  # fidelity stays out-of-sample
    assert int4["builder"]["type"] == "GenAIModelBuilder"
    assert int4["builder"]["extra_options"]["matmul_mixed_precision"] == "last_matmul:int8"
    mixed = build.olive_passes(source, "int4-mixed")["gptq"]["overrides"]
    assert {name.split(".", 3)[3] for name in mixed} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"
    }  # fmt: skip

    int8 = build.olive_passes(source, "int8")
    assert [p["type"] for p in int8.values()] == ["GenAIModelBuilder", "OnnxBlockWiseRtnQuantization", "GraphSurgeries"]
    rtn = int8["rtn"]
    assert (rtn["bits"], rtn["block_size"], rtn["is_symmetric"], rtn["accuracy_level"]) == (8, 32, True, 4)
    assert rtn["nodes_to_exclude"] == [recipes.EMBEDDING_GATHER]
    assert build.olive_passes(source, "fp32") == {
        "builder": {"type": "GenAIModelBuilder", "precision": "fp32", "extra_options": {"windowed_kv_cache": False}}
    }
    with pytest.raises(BuildError, match="fp16 is refused by the CPU execution provider"):
        build.olive_passes(source, "fp16")
    with pytest.raises(BuildError, match="unknown precision 'int3'"):
        build.olive_passes(source, "int3")


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_the_lm_head_shares_the_embedding_only_when_tied(tiny_model: Path, precision: str) -> None:
    source = inspect_source(tiny_model)

    def surgeons(tied: bool) -> list[str]:
        passes = build.olive_passes(_with_config(source, tie_word_embeddings=tied), precision)
        return [s["surgeon"] for s in passes["embedding"]["surgeries"] if s["surgeon"] != "RenameOutputs"]

    assert surgeons(True) == ["QuantizeEmbeddingInt8", "ShareEmbeddingLmHead"]
    assert surgeons(False) == ["QuantizeEmbeddingInt8"]  # an untied head keeps its own (8-bit) weights


def test_every_recipe_is_a_precision_and_the_ladder_climbs_them() -> None:
    assert set(recipes.RECIPES) == set(PRECISIONS) - {"fp16"}
    assert set(recipes.LADDER) == set(recipes.RECIPES)
    assert recipes.LADDER[0] == "int4"
    assert recipes.LADDER[-1] == "fp32"
    assert recipes.LADDER == LADDER_RUNGS  # settings' copy, which refuses a rung's name taken by another model


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


@pytest.mark.parametrize(
    ("share", "cpus", "busy", "threads"),
    [(2, 2, 0.1, 2), (2, 2, 0.7, 1), (2, 2, 2.0, 1), (1, 2, 0.0, 1), (4, 8, 3.2, 4), (8, 8, 3.6, 4), (8, 8, 9.0, 1)],
)
def test_free_cpus(share: int, cpus: int, busy: float, threads: int) -> None:
    from pytest_slmdeploy.measure import free_cpus

    assert free_cpus(share, cpus, busy) == threads


def test_a_build_beside_busy_processes_runs_torch_on_the_free_cpus(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SmolLM2's GPTQ took 338 s on 2 threads beside two busy processes, 144 s on 1 (59 s on 2, quiet): torch's
    OpenMP threads wait at every step for threads the OS has set aside. The build takes the CPUs left free, and
    gives torch its threads back afterwards."""
    import contextlib
    from collections.abc import Iterator

    import torch

    from pytest_slmdeploy import measure

    before = torch.get_num_threads()
    cpus = len(allowed_cpus())
    monkeypatch.setattr(measure, "cpus_busy_elsewhere", lambda seconds=0.3: 2.0 * cpus)  # every CPU busy twice over
    threads, why = measure.threads_free_now()
    assert (threads, why) == (1, f"1 thread (of {cpus} CPUs; other processes use {2.0 * cpus:.1f} CPUs)")
    inside: list[int] = []

    @contextlib.contextmanager
    def spy(threads: int) -> Iterator[None]:  # what torch runs on while Olive builds
        with measure.torch_threads(threads):
            yield
            inside.append(torch.get_num_threads())

    monkeypatch.setattr(build, "torch_threads", spy)
    lines: list[str] = []
    recipe = build.olive_config(inspect_source(tiny_model), "int8")
    build.run_olive(recipe, tmp_path / "out", tmp_path / "work", progress=lines.append)
    assert inside == [1]
    assert (
        f"converting with Olive (GenAIModelBuilder + OnnxBlockWiseRtnQuantization + GraphSurgeries) on {why}" in lines
    )
    assert torch.get_num_threads() == before


WARM_PROCESS = """
import sys
from pathlib import Path
from pytest_slmdeploy.deploy import deploy, prepare
from pytest_slmdeploy.settings import PRECISIONS, Settings
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
    assert manifest.versions["onnxruntime-genai"] == "0.18.0"
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
from pytest_slmdeploy import build, recipes
from pytest_slmdeploy.checklist.format import GENERIC_PROMPTS
from pytest_slmdeploy.errors import BuildError
from pytest_slmdeploy.source import SourceModel, inspect_source

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


def test_calibration_answers_are_made_once_per_source(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPTQ's calibration data is the source's own answers (a minute of generation on a 135M model); the ladder's
    two GPTQ rungs, and any rebuild, read them back from the cache instead."""
    from pytest_slmdeploy import olive_data

    monkeypatch.setenv(olive_data.CACHE_ENV, str(tmp_path / "calibration"))
    monkeypatch.setenv(olive_data.SOURCE_ENV, "fingerprint-of-the-source")
    made: list[int] = []
    answers = olive_data._answers

    def counted(*args: object) -> list[str]:
        made.append(1)
        return answers(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(olive_data, "_answers", counted)
    instructions = list(recipes.CALIBRATION_INSTRUCTIONS[:3])
    first = olive_data.calibration_dataset(str(tiny_model), instructions, answer_tokens=8)
    again = olive_data.calibration_dataset(str(tiny_model), instructions, answer_tokens=8)
    assert made == [1]
    assert [row[1].tolist() for row in again] == [row[1].tolist() for row in first]
    olive_data.calibration_dataset(str(tiny_model), instructions, answer_tokens=9)  # other settings: made again
    assert made == [1, 1]
    for stored in (tmp_path / "calibration").glob("*.json"):
        stored.write_text('["cut short')  # an unreadable file is made anew, never a failed build
    olive_data.calibration_dataset(str(tiny_model), instructions, answer_tokens=8)
    assert made == [1, 1, 1]
    assert not list((tmp_path / "calibration").glob("*.partial"))
    monkeypatch.setenv(olive_data.SOURCE_ENV, "another-source-content")  # same folder, other weights
    olive_data.calibration_dataset(str(tiny_model), instructions, answer_tokens=8)
    assert made == [1, 1, 1, 1]
    monkeypatch.delenv(olive_data.CACHE_ENV)
    olive_data.calibration_dataset(str(tiny_model), instructions, answer_tokens=8)  # no cache: always made
    assert made == [1, 1, 1, 1, 1]
