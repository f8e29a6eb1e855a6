from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_slmdeploy import source
from pytest_slmdeploy.cache import IN_PROGRESS_MARKER, Manifest, ModelCache, record_files
from pytest_slmdeploy.errors import CacheError
from pytest_slmdeploy.foundry import is_foundry_entry


def _manifest(folder: Path, key: str = "k1") -> Manifest:
    return Manifest(
        name="m", build_key=key, source_path="/src", source_fingerprint="f", source_bytes=100, precision="int4",
        recipe={}, versions={}, build_seconds=1.0, build_peak_rss_bytes=1, created_at=time.time(),
        files=record_files(folder),
    )  # fmt: skip


def _staged(cache: ModelCache, content: bytes = b"onnx") -> Path:
    staging = cache.new_staging("m")
    (staging / "genai_config.json").write_text("{}")
    (staging / "model.onnx").write_bytes(content)
    (staging / "inference_model.json").write_text('{"Name": "m"}')
    return staging


def test_publish_is_a_rename_and_replaces_the_old_entry(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    staging = _staged(cache)
    assert (staging / IN_PROGRESS_MARKER).exists()
    assert not is_foundry_entry(staging), "Foundry must skip a folder still being written"
    entry = cache.publish(staging, "m", _manifest(staging))
    assert not staging.exists()
    assert entry == tmp_path.resolve() / "custom" / "m"
    assert is_foundry_entry(entry)
    assert cache.check("m", "k1").usable
    second = _staged(cache, b"new model")
    cache.publish(second, "m", _manifest(second, "k2"))
    assert (entry / "model.onnx").read_bytes() == b"new model"
    assert cache.check("m", "k2").usable
    assert cache.check("m", "k1").reason == "the source, precision, recipe or tool versions changed"
    assert cache.names() == ["m"]


def _counting_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = source.sha256_file
    monkeypatch.setattr(source, "sha256_file", lambda path: calls.append(path) or real(path))
    return calls


def _install(cache: ModelCache) -> Path:
    staging = _staged(cache)
    return cache.publish(staging, "m", _manifest(staging))


def test_check_detects_changed_and_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source, "_SETTLED_NS", 0)  # trust the stamps of files written a moment ago
    cache = ModelCache(tmp_path)
    entry = _install(cache)
    assert cache.check("m").usable
    calls = _counting_hashes(monkeypatch)
    assert cache.check("m").usable
    assert calls == [], "the quick check of an unchanged entry is a stat per file"
    onnx = entry / "model.onnx"
    before = onnx.stat()
    time.sleep(0.02)  # past a coarse clock tick, so the change gets its own ctime
    onnx.write_bytes(b"ONNX")  # same size, new content, and the mtime put back (touch -r)
    os.utime(onnx, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (onnx.stat().st_size, onnx.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert cache.check("m").reason == "model.onnx changed since install"
    assert cache.check("m", deep=True).reason == "model.onnx changed since install"
    onnx.write_bytes(b"longer content")
    assert cache.check("m").reason == "model.onnx changed since install"
    onnx.unlink()
    assert cache.check("m").reason == "model.onnx is missing"
    os.mkfifo(onnx)  # a hash would block on it forever
    assert cache.check("m").reason == "model.onnx is not a regular file"
    assert cache.check("other").reason == "not installed"


def test_an_entry_moved_or_restored_is_hashed_once_then_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source, "_SETTLED_NS", 0)
    cache = ModelCache(tmp_path / "a")
    _install(cache)
    restored = ModelCache(Path(shutil.copytree(tmp_path / "a", tmp_path / "b")))  # as a CI cache restore does
    calls = _counting_hashes(monkeypatch)
    assert restored.check("m").usable
    assert len(calls) == 3  # new inodes and ctimes: hashed, then recorded
    assert restored.check("m").usable
    assert len(calls) == 3


def test_remove(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    staging = _staged(cache)
    cache.publish(staging, "m", _manifest(staging))
    assert cache.remove("m")
    assert not cache.remove("m")
    assert cache.names() == []


def test_stale_staging_of_dead_processes_is_cleaned(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    mine = cache.new_staging("m")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".staging" / f"m.{dead.stdout.strip()}.abcd1234"
    stale.mkdir()
    removed = cache.clean_stale_staging()
    assert removed == [stale.resolve()] or removed == [stale]
    assert mine.exists()


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from pytest_slmdeploy.cache import ModelCache\n"
        "with ModelCache(Path(sys.argv[1])).lock('m', 5):\n    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        waits: list[str] = []
        with pytest.raises(CacheError) as info, ModelCache(tmp_path).lock("m", 0.5, waiting=waits.append):
            pass
        assert f"another process (pid {holder.pid}) is building 'm'" in str(info.value)
        assert "--slm-lock-timeout" in str(info.value)
    finally:
        holder.kill()
        holder.communicate()  # waits and closes the pipe
    with ModelCache(tmp_path).lock("m", 5):
        pass  # free again once the holder is gone


def test_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CacheError, match="is not writable"):
        ModelCache(blocker / "cache").ensure_writable()


def test_manifest_round_trip(tmp_path: Path) -> None:
    staging = _staged(ModelCache(tmp_path))
    manifest = _manifest(staging)
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.model_bytes == sum(f.size for f in manifest.files.values())
    assert manifest.size_ratio == manifest.model_bytes / 100
