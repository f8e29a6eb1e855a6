from __future__ import annotations

import os
import re
import time
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
    monkeypatch.setattr(source, "_SETTLED_NS", 0)  # the copy is seconds old: trust it at once
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


def _counting_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = source.sha256_file
    monkeypatch.setattr(source, "sha256_file", lambda path: calls.append(path) or real(path))
    return calls


def _small_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    return folder


def test_fingerprint_sees_a_byte_changed_with_the_mtime_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source, "_SETTLED_NS", 0)
    folder, stats = _small_folder(tmp_path), tmp_path / "stats"
    weights = folder / "model.safetensors"
    first = fingerprint(folder, stat_cache_dir=stats)
    calls = _counting_hashes(monkeypatch)
    assert fingerprint(folder, stat_cache_dir=stats) == first
    assert calls == []  # the stamps were recorded and are trusted
    before = weights.stat()
    time.sleep(0.02)  # past a coarse clock tick, so the change gets its own ctime
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # touch -r
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert fingerprint(folder, stat_cache_dir=stats) == fingerprint(folder) != first
    assert calls[0] == weights


def test_fingerprint_does_not_trust_a_file_changed_a_moment_ago(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, stats = _small_folder(tmp_path), tmp_path / "stats"
    first = fingerprint(folder, stat_cache_dir=stats)
    calls = _counting_hashes(monkeypatch)
    # Changed within the same timestamp tick as its hash, it could change again unseen: hash it until settled.
    assert fingerprint(folder, stat_cache_dir=stats) == first
    assert sorted(calls) == sorted(folder.iterdir())


def test_a_damaged_stat_cache_only_costs_hashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source, "_SETTLED_NS", 0)
    folder, stats = _small_folder(tmp_path), tmp_path / "stats"
    first = fingerprint(folder, stat_cache_dir=stats)
    for damaged in ("not json", "[1, 2]", '{"%s": {"stat": 5, "sha256": 7}}' % (folder / "config.json")):
        (stats / source.STAT_CACHE_NAME).write_text(damaged)
        assert fingerprint(folder, stat_cache_dir=stats) == first


def _edit_config(model: Path, **changes: object) -> Path:
    import json

    config = json.loads((model / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_weights_match_their_architecture(tiny_model: Path) -> None:
    source.check_weights_match(inspect_source(tiny_model))  # raises on any mismatch


def test_missing_layers_are_named(model_copy: Path) -> None:
    _edit_config(model_copy, num_hidden_layers=4, layer_types=None)  # an older config a user edited by hand
    with pytest.raises(SourceError, match=re.escape("lack 24 tensors") + ".*" + re.escape("model.layers.{2, 3}.*")):
        source.check_weights_match(inspect_source(model_copy))


def test_a_config_transformers_refuses_is_one_line(model_copy: Path) -> None:
    _edit_config(model_copy, num_hidden_layers=4)  # layer_types still lists 2 layers
    with pytest.raises(SourceError, match=r"config.json does not describe a model .*num_hidden_layers. \(4\)") as info:
        source.check_weights_match(inspect_source(model_copy))
    assert "\n" not in str(info.value)


def test_wrong_shapes_and_wrong_model_type_are_named(model_copy: Path) -> None:
    _edit_config(model_copy, intermediate_size=256)
    with pytest.raises(SourceError, match=r"mlp.gate_proj.weight \[128, 64\] \(config.json needs \[256, 64\]\)"):
        source.check_weights_match(inspect_source(model_copy))
    _edit_config(model_copy, intermediate_size=128, model_type="bert")  # architectures still say Qwen2
    with pytest.raises(SourceError, match=r"the weights lack \d+ tensors .*bert\.embeddings"):
        source.check_weights_match(inspect_source(model_copy))


def test_only_what_the_build_reads_is_fingerprinted(model_copy: Path) -> None:
    before = fingerprint(model_copy)
    (model_copy / "README.md").write_text("# our fine-tune\n")
    (model_copy / "slm_cases.yaml").write_text("cases: []\n")
    (model_copy / "loss.png").write_bytes(b"\x89PNG")
    assert fingerprint(model_copy) == before
    (model_copy / "generation_config.json").write_text('{"temperature": 0.2}')
    assert fingerprint(model_copy) != before


def test_a_damaged_tokenizer_is_named_before_the_build(model_copy: Path) -> None:
    source.check_tokenizer(inspect_source(model_copy))
    (model_copy / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(SourceError, match=r"tokenizer.json cannot be loaded as a tokenizer \(.*\): save the tokenizer"):
        source.check_tokenizer(inspect_source(model_copy))
