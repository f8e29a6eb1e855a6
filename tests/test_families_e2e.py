"""The model families users bring (Llama 3, Phi-3.5, Gemma 2 and 3, Mistral v0.3, Qwen2.5, SmolLM2), end to end.

Each is a tiny model trained on the fly with the family's real transformers class and published chat template
and special tokens. It is deployed as a user would (``pytest --slm-model``), passes the whole built-in suite
with its FAQ case file through ONNX Runtime GenAI and through the Foundry Local SDK, and the PromptTemplate
written for it gives, for a user-only request, the token ids of the model's own chat template.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_slmdeploy.testing.tinymodel import FAQ

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FAMILIES = ("qwen2.5", "llama3", "phi3", "gemma2", "gemma3", "mistral", "smollm2")
RUNTIME_ADDS_SPACE_AFTER_SPECIALS = ("mistral",)
FAMILY_ROWS = ("smoke", "domain", "format", "memory", "lengths", "edge", "benchmark")


def _cache(tmp_path_factory: pytest.TempPathFactory, key: str) -> Path:
    """One cache per family for the whole session: the second backend reuses the first one's build."""
    return tmp_path_factory.getbasetemp() / f"families-cache-{key}"


@pytest.mark.parametrize("backend", ["ort-genai", "foundry"])
@pytest.mark.parametrize("key", FAMILIES)
def test_family_passes_the_built_in_suite_and_its_faq(
    pytester: pytest.Pytester, family_models: Any, tmp_path_factory: pytest.TempPathFactory, key: str, backend: str
) -> None:
    model = family_models(key)
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        f"--slm-model={model}", f"--slm-cache={_cache(tmp_path_factory, key)}", f"--slm-backend={backend}",
        f"--slm-report={report}", "--rootdir", str(pytester.path), "-p", "no:cacheprovider", "-rfs",
    )  # fmt: skip
    output = result.stdout.str()
    assert result.ret == pytest.ExitCode.OK, output[-4000:]
    families = {row["family"]: row for row in json.loads(report.read_text())["families"]}
    failed = {name: row["failures"] for name, row in families.items() if row["status"] != "pass"}
    assert not failed, output[-4000:]
    assert set(FAMILY_ROWS) <= set(families), sorted(families)
    assert families["domain"]["passed"] == len(FAQ), families["domain"]
    assert families["smoke"]["passed"] == 3, families["smoke"]  # installed, loads and answers (both runtimes)


_ORT_ENCODE = """
import json, sys
from pathlib import Path
from pytest_slmdeploy.runtime.ortgenai import OrtGenaiBackend
runtime = OrtGenaiBackend(Path(sys.argv[1]))
print(json.dumps([runtime.encode(text) for text in json.loads(sys.stdin.read())]))
"""


def _ort_encode(entry: Path, texts: list[str]) -> list[list[int]]:
    """ONNX Runtime GenAI's token ids, in a child process (as the plugin's own probe loads a model)."""
    child = subprocess.run(
        [sys.executable, "-c", _ORT_ENCODE, str(entry)], input=json.dumps(texts), capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr[-2000:]
    ids: list[list[int]] = json.loads(child.stdout)
    return ids


@pytest.mark.parametrize("key", FAMILIES)
def test_prompt_template_gives_the_chat_templates_token_ids(
    family_models: Any, tmp_path_factory: pytest.TempPathFactory, key: str
) -> None:
    """Filled for a user-only request, PromptTemplate gives transformers' apply_chat_template ids."""
    from transformers import AutoTokenizer

    from pytest_slmdeploy import deploy
    from pytest_slmdeploy.settings import Settings
    from pytest_slmdeploy.template import FIXED_DATE, fill_prompt_template

    model = family_models(key)
    deployment = deploy.deploy(deploy.prepare(Settings(model=model, cache_dir=_cache(tmp_path_factory, key))))
    parts = json.loads((deployment.entry_dir / "inference_model.json").read_text())["PromptTemplate"]
    tokenizer = AutoTokenizer.from_pretrained(model)
    filled, expected = [], []
    for question, _ in FAQ[:3]:
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False, date_string=f"{FIXED_DATE:%d %b %Y}"
        )
        expected.append(list(ids))
        filled.append(fill_prompt_template(parts, messages))
    assert [tokenizer(text, add_special_tokens=False)["input_ids"] for text in filled] == expected
    runtime = _ort_encode(deployment.entry_dir, filled)
    if key in RUNTIME_ADDS_SPACE_AFTER_SPECIALS:
        # ONNX Runtime GenAI 0.14 (and the Foundry SDK) put a "▁" before every text segment that follows a
        # special token (Metaspace prepend_scheme "first"); transformers only at the start. Pinned, so that a
        # runtime which fixes it makes this fail and the docs get updated.
        space = tokenizer.convert_tokens_to_ids("▁")
        assert runtime != expected
        assert [[t for t in ids if t != space] for ids in runtime] == [
            [t for t in ids if t != space] for ids in expected
        ]
    else:
        assert runtime == expected, "ONNX Runtime GenAI tokenizes the prompt otherwise"


def test_replacing_the_models_own_template_is_noted(family_models: Any, tmp_path: Path) -> None:
    from pytest_slmdeploy import deploy
    from pytest_slmdeploy.settings import Settings

    own = deploy.prepare(Settings(model=family_models("phi3"), cache_dir=tmp_path))
    assert not any("replaces" in note for note in own.notes)
    replaced = deploy.prepare(Settings(model=family_models("phi3"), cache_dir=tmp_path, chat_template="chatml"))
    assert replaced.notes[0].startswith("--slm-chat-template chatml replaces the model's own chat template")
    assert replaced.prompt_template.parts["prompt"].startswith("<|im_start|>user")


def test_notes_reach_the_json_report_and_the_summary(
    pytester: pytest.Pytester, family_models: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = family_models("gemma2")
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess(
        f"--slm-model={model}", f"--slm-cache={_cache(tmp_path_factory, 'gemma2')}", f"--slm-report={report}",
        "-k", "test_model_loads_and_answers", "-p", "no:cacheprovider",
    )  # fmt: skip
    result.stdout.fnmatch_lines(["*note: PromptTemplate: system messages: the chat template refuses them*"])
    notes = json.loads(report.read_text())["notes"]
    assert any("System role not supported" in note for note in notes), notes
