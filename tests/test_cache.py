from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_slmdeploy import source
from pytest_slmdeploy.cache import IN_PROGRESS_MARKER, MANIFEST_NAME, Manifest, ModelCache, Staging, record_files
from pytest_slmdeploy.cli import main
from pytest_slmdeploy.errors import CacheError
from pytest_slmdeploy.foundry import is_foundry_entry


def _manifest(folder: Path, key: str = "k1") -> Manifest:
    return Manifest(
        name="m", build_key=key, source_path="/src", source_fingerprint="f", source_bytes=100, precision="int4",
        recipe={}, versions={}, build_seconds=1.0, build_peak_rss_bytes=1, created_at=time.time(),
        files=record_files(folder),
    )  # fmt: skip


@contextlib.contextmanager
def _staged(cache: ModelCache, content: bytes = b"onnx") -> Iterator[Staging]:
    with cache.staging("m") as staging:
        (staging.model / "genai_config.json").write_text("{}")
        (staging.model / "model.onnx").write_bytes(content)
        (staging.model / "inference_model.json").write_text('{"Name": "m"}')
        yield staging


def _install(cache: ModelCache, content: bytes = b"onnx", key: str = "k1") -> Path:
    with _staged(cache, content) as staging:
        return cache.publish(staging, "m", _manifest(staging.model, key))


def test_publish_is_a_rename_and_replaces_the_old_entry(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    with _staged(cache) as staging:
        assert (staging.model / IN_PROGRESS_MARKER).exists()
        assert not is_foundry_entry(staging.model), "Foundry must skip a folder still being written"
        entry = cache.publish(staging, "m", _manifest(staging.model))
        assert not staging.model.exists()
    assert entry == tmp_path.resolve() / "custom" / "m"
    assert is_foundry_entry(entry)
    assert cache.check("m", "k1").usable
    _install(cache, b"new model", "k2")
    assert (entry / "model.onnx").read_bytes() == b"new model"
    assert cache.check("m", "k2").usable
    assert cache.check("m", "k1").reason == "the source, precision, recipe or tool versions changed"
    assert cache.names() == ["m"]
    assert list(cache.staging_dir.iterdir()) == [], "the staging folder and the replaced entry are gone"


def _counting_hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = source.sha256_file
    monkeypatch.setattr(source, "sha256_file", lambda path: calls.append(path) or real(path))
    return calls


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
    _install(cache)
    assert cache.remove("m")
    assert not cache.remove("m")
    assert cache.names() == []
    assert list(cache.staging_dir.iterdir()) == []


HOLD_STAGING = (
    "import sys, time; from pathlib import Path; from pytest_slmdeploy.cache import ModelCache\n"
    "with ModelCache(Path(sys.argv[1])).staging(sys.argv[2]) as staging:\n"
    "    staging.work.mkdir(); (staging.work / 'olive.log').write_text('converting')\n"
    "    print(staging.folder, flush=True); time.sleep(60)\n"
)


@contextlib.contextmanager
def _building(cache_root: Path, name: str, prefix: Sequence[str] = ()) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Another process in the middle of a build of ``name``: it holds a staging folder with Olive's work folder."""
    args = [*prefix, sys.executable, "-c", HOLD_STAGING, str(cache_root), name]
    holder = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline().strip()
        assert line, f"the holder did not start (exit {holder.poll()})"
        yield holder, Path(line)
    finally:
        holder.kill()
        holder.communicate()  # waits and closes the pipe


def test_cleaning_spares_other_live_builds_and_removes_dead_ones(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    cache.ensure_writable()
    legacy = cache.staging_dir / f"m.{os.getpid()}.abcd1234.work"  # an old-style name with a live pid: no owner
    legacy.mkdir()
    with _building(tmp_path, "a") as (holder, theirs), cache.staging("b") as mine:
        removed = cache.clean_stale_staging()
        assert (theirs / "work" / "olive.log").is_file(), "another name's live build lost its work folder"
        assert mine.model.is_dir()
        assert removed == [legacy]
        holder.kill()
        holder.wait()
        assert cache.clean_stale_staging() == [theirs], "a killed build's folder goes (the kernel freed its lock)"
        assert mine.model.is_dir()
    assert list(cache.staging_dir.iterdir()) == []
    assert list((tmp_path / ".locks" / "staging").iterdir()) == [], "no lock file is left behind"


def _pid_namespace() -> list[str]:
    prefix = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child"]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("unprivileged PID namespaces are not available here")
    return prefix


def test_cleaning_decides_by_lock_across_pid_namespaces(tmp_path: Path) -> None:
    """A CI container sharing the cache: its pids mean nothing here, its locks do."""
    cache = ModelCache(tmp_path)
    with _building(tmp_path, "a", _pid_namespace()) as (holder, theirs):
        assert cache.clean_stale_staging() == []
        assert (theirs / "work" / "olive.log").is_file()
        holder.kill()  # unshare; --kill-child then kills the build, which the kernel reaps in its own time
        holder.wait()
        deadline = time.monotonic() + 10
        while (removed := cache.clean_stale_staging()) == [] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert removed == [theirs]


def test_a_build_killed_before_its_folder_leaves_no_lock_file(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    cache.ensure_writable()
    orphan = tmp_path / ".locks" / "staging" / "m.0123456789ab.lock"
    orphan.write_text("")
    assert cache.clean_stale_staging() == []
    assert not orphan.exists()


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
    with _staged(ModelCache(tmp_path)) as staging:
        manifest = _manifest(staging.model)
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.model_bytes == sum(f.size for f in manifest.files.values())
    assert manifest.size_ratio == manifest.model_bytes / 100


def _edit(change: Callable[[dict[str, Any]], object]) -> Callable[[str], str]:
    def edit(text: str) -> str:
        data = json.loads(text)
        change(data)
        return json.dumps(data)

    return edit


def _record(data: dict[str, Any]) -> dict[str, Any]:
    return dict(data["files"]["model.onnx"])


MALFORMED: dict[str, tuple[Callable[[str], str], str]] = {
    "files is a number": (_edit(lambda d: d.update(files=5)), "is invalid at files: 5 is not of type 'object'"),
    "a key missing": (_edit(lambda d: d.pop("build_key")), "invalid at top level: 'build_key' is a required property"),
    "a wrong type": (_edit(lambda d: d.update(created_at="yesterday")), "at created_at: 'yesterday' is not of type"),
    "a file record damaged": (
        _edit(lambda d: d["files"]["model.onnx"].update(size="4")),
        "at files/model.onnx/size: '4' is not of type 'integer'",
    ),
    "a model file unlisted": (
        _edit(lambda d: d["files"].pop("model.onnx")),
        "at files: 'model.onnx' is a required property",
    ),
    "a path outside the entry": (
        _edit(lambda d: d["files"].update({"../../../etc/hostname": _record(d)})),
        "at files: '../../../etc/hostname' is not a path inside the entry",
    ),
    "an unknown key": (_edit(lambda d: d.update(extra=1)), "Additional properties are not allowed ('extra'"),
    "another schema": (_edit(lambda d: d.update(schema=2)), "at schema: 1 was expected"),
    "another name": (_edit(lambda d: d.update(name="other")), "is for 'other', not 'm' (a copied entry)"),
    "not JSON": (lambda text: text[:40], "is not valid JSON (Unterminated string"),
    "NaN": (lambda text: text.replace('"build_seconds": 1.0', '"build_seconds": NaN'), "NaN is not a JSON number"),
    "a JSON list": (lambda text: "[]", "at top level: [] is not of type 'object'"),
    "empty": (lambda text: "", "is not valid JSON (Expecting value"),
    "nested too deep": (lambda text: "[" * 200_000, "is not valid JSON (maximum recursion depth exceeded"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_manifest_means_not_installed(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    change, expected = MALFORMED[case]
    cache = ModelCache(tmp_path)
    path = _install(cache) / MANIFEST_NAME
    path.write_text(change(path.read_text()))
    state = cache.check("m")
    assert not state.usable
    assert state.reason.startswith(MANIFEST_NAME)
    assert expected in state.reason
    assert "\n" not in state.reason
    assert cache.read_manifest("m") is None
    assert main(["--cache", str(tmp_path), "ls"]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.startswith("m ")
    assert row.endswith(f"not usable: {state.reason}")
    assert main(["--cache", str(tmp_path), "verify", "m"]) == 1
    assert (
        capsys.readouterr().out
        == f"m: DAMAGED: {state.reason}; rebuild (slmdeploy build --rebuild) or remove (slmdeploy rm m)\n"
    )


def test_a_manifest_that_is_not_utf8_or_missing(tmp_path: Path) -> None:
    cache = ModelCache(tmp_path)
    path = _install(cache) / MANIFEST_NAME
    path.write_bytes(b"\xff\xfe{")
    assert cache.check("m").reason == f"{MANIFEST_NAME} is not valid JSON (not UTF-8 text)"
    path.unlink()
    assert cache.check("m").reason == f"no {MANIFEST_NAME}"


def test_verify_of_a_name_never_installed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cache", str(tmp_path), "verify", "nothing"]) == 1
    out = capsys.readouterr().out
    assert out == f"nothing: not installed in {tmp_path.resolve() / 'custom'} (slmdeploy ls lists what is)\n"


def test_ls_gives_every_folder_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = ModelCache(tmp_path)
    _install(cache)
    (cache.custom_dir / "bare").mkdir()
    (cache.custom_dir / "not a name").mkdir()
    assert main(["--cache", str(tmp_path), "ls"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 4
    assert rows[1].startswith("bare ")
    assert rows[1].endswith(f"not usable: no {MANIFEST_NAME}")
    assert rows[2].startswith("m ")
    assert rows[2].endswith(" yes")  # the FOUNDRY column, and nothing after it
    assert rows[3].startswith("not a name ")
    assert "not usable: model name 'not a name' is not allowed" in rows[3]


def test_an_invalid_manifest_is_rebuilt(
    tiny_model: Path, warm_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through deploy, as pytest and ``slmdeploy build`` run it (a stand-in for Olive: only the cache counts)."""
    from pytest_slmdeploy import build
    from pytest_slmdeploy.deploy import deploy, prepare
    from pytest_slmdeploy.settings import Settings

    def olive(recipe: object, output_dir: Path, work_dir: Path, **kwargs: object) -> build.BuildResult:
        work_dir.mkdir()
        built = warm_cache / "custom" / "faq-int4"  # a real build's output: it must load before it is installed
        runtime_files = ("genai_config.json", "model.onnx", "model.onnx.data", "chat_template.jinja", "tokenizer.json")
        for name in (*runtime_files, "tokenizer_config.json"):
            shutil.copy2(built / name, output_dir / name)
        return build.BuildResult(seconds=0.1, peak_rss_bytes=1, log_path=work_dir / "olive.log")

    monkeypatch.setattr(build, "run_olive", olive)
    settings = Settings(model=tiny_model, cache_dir=tmp_path)
    first = deploy(prepare(settings))
    assert not first.cache_hit
    path = first.entry_dir / MANIFEST_NAME
    path.write_text(_edit(lambda d: d.update(files=5))(path.read_text()))
    second = deploy(prepare(settings))
    assert not second.cache_hit
    assert second.notes == (f"rebuilt {first.name}: {MANIFEST_NAME} is invalid at files: 5 is not of type 'object'",)
    assert ModelCache(tmp_path).check(first.name, deep=True).usable
