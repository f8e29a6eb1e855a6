from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_slmdeploy import source
from pytest_slmdeploy.errors import SourceError
from pytest_slmdeploy.source import SUPPORTED_ARCHITECTURES, fingerprint, inspect_source


def test_reads_the_tiny_model(tiny_model: Path) -> None:
    model = inspect_source(tiny_model)
    assert model.architecture == "Qwen2ForCausalLM"
    assert model.weight_files == ("model.safetensors",)
    assert model.chat_template is not None
    assert "<|im_start|>" in model.chat_template
    assert model.context_length == 512
    assert model.size_bytes > 500_000


def test_supported_architectures_match_the_installed_builder() -> None:
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai")
    assert spec is not None
    assert spec.origin is not None
    builder = Path(spec.origin).parent / "models" / "builder.py"
    found = set(re.findall(r'config\.architectures\[0\] == "(\w+)"', builder.read_text()))
    assert found - {"WhisperForConditionalGeneration"} == SUPPORTED_ARCHITECTURES


def test_trusting_remote_code_is_explicit(model_copy: Path) -> None:
    import json

    config = json.loads((model_copy / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "x.Y"}
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="--slm-trust-remote-code"):
        inspect_source(model_copy)
    assert inspect_source(model_copy, trust_remote_code=True).architecture == "Qwen2ForCausalLM"


def test_shard_index_naming_a_missing_shard(model_copy: Path) -> None:
    (model_copy / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-00002.safetensors"}}')
    with pytest.raises(SourceError, match=r"missing: model-00002\.safetensors"):
        inspect_source(model_copy)


def test_pickled_weights_are_refused(model_copy: Path) -> None:
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(SourceError, match="safe_serialization=True"):
        inspect_source(model_copy)


def test_fingerprint_follows_content_and_reuses_hashes(
    model_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats = tmp_path / "stats"
    first = fingerprint(model_copy, stat_cache_dir=stats)
    assert first == fingerprint(model_copy)  # the stat cache changes nothing
    calls: list[Path] = []
    real = source.sha256_file
    monkeypatch.setattr(source, "sha256_file", lambda path: calls.append(path) or real(path))
    assert fingerprint(model_copy, stat_cache_dir=stats) == first
    assert calls == []  # warm: one stat per file, no hashing
    (model_copy / "tokenizer_config.json").write_text('{"changed": true}')
    assert fingerprint(model_copy, stat_cache_dir=stats) != first
    assert calls == [model_copy / "tokenizer_config.json"]


def test_fingerprint_ignores_where_the_folder_lies(model_copy: Path, tmp_path: Path) -> None:
    moved = model_copy.rename(tmp_path / "elsewhere")
    assert fingerprint(moved) == fingerprint(Path(__file__).parent / ".." / moved)
