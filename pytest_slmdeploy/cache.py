"""Stage 3: the Foundry Local-style model cache (``<cache>/custom/<name>/``).

Builds go to ``<cache>/.staging/`` and are renamed into place, so a killed
build never leaves a half-installed entry; a manifest records hashes, sizes,
versions and timings so a changed entry is detected. Each staging folder is
owned through its own file lock, never through a pid.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import filelock

from pytest_slmdeploy.errors import CacheError
from pytest_slmdeploy.settings import check_model_name
from pytest_slmdeploy.source import STAT_CACHE_NAME, HashCache, iter_files, sha256_file

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

MANIFEST_NAME = "slmdeploy_manifest.json"
INFERENCE_MODEL_NAME = "inference_model.json"
# Foundry Local skips a folder holding this file while it is being written (its own download marker).
IN_PROGRESS_MARKER = "download.tmp"
MANIFEST_SCHEMA = 1
NOT_INSTALLED = "not installed"
# Files every build installs (build.REQUIRED_OUTPUTS): a manifest without them vouches for nothing.
_REQUIRED_FILES = ("genai_config.json", "model.onnx")
_FILE_RECORD_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "size": {"type": "integer", "minimum": 0},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "mtime_ns": {"type": "integer"},
    },
    "required": ["size", "sha256", "mtime_ns"],
    "additionalProperties": False,
}
MANIFEST_JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "schema": {"const": MANIFEST_SCHEMA},
        "name": {"type": "string", "minLength": 1},
        "build_key": {"type": "string", "minLength": 1},
        "source_path": {"type": "string"},
        "source_fingerprint": {"type": "string"},
        "source_bytes": {"type": "integer", "minimum": 0},
        "precision": {"type": "string"},
        "recipe": {"type": "object"},
        "versions": {"type": "object", "additionalProperties": {"type": "string"}},
        "build_seconds": {"type": "number", "minimum": 0},
        "build_peak_rss_bytes": {"type": "integer", "minimum": 0},
        "created_at": {"type": "number", "minimum": 0, "maximum": 253402300799},  # up to 9999: what ls can show
        "files": {
            "type": "object",
            "additionalProperties": _FILE_RECORD_JSON_SCHEMA,
            "required": list(_REQUIRED_FILES),
        },
    },
    "required": [
        "schema", "name", "build_key", "source_path", "source_fingerprint", "source_bytes", "precision",
        "recipe", "versions", "build_seconds", "build_peak_rss_bytes", "created_at", "files",
    ],
    "additionalProperties": False,
}  # fmt: skip


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or invalid: the entry counts as not installed."""


@functools.cache
def _manifest_validator() -> Validator:
    import jsonschema  # only where a manifest is read: about 0.1 s to import

    return jsonschema.Draft202012Validator(MANIFEST_JSON_SCHEMA)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _one_line(text: str) -> str:
    """One short line: the manifest's own values can be long."""
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str
    mtime_ns: int


@dataclass(frozen=True)
class Manifest:
    """What is installed, how it was made, and how to tell whether it changed."""

    name: str
    build_key: str
    source_path: str
    source_fingerprint: str
    source_bytes: int
    precision: str
    recipe: dict[str, Any]
    versions: dict[str, str]
    build_seconds: float
    build_peak_rss_bytes: int
    created_at: float
    files: dict[str, FileRecord] = field(default_factory=dict)
    schema: int = MANIFEST_SCHEMA

    @property
    def model_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @property
    def size_ratio(self) -> float:
        return self.model_bytes / self.source_bytes if self.source_bytes else 0.0

    def figures(self) -> dict[str, float]:
        """The build's key figures, named as the reports and the benchmark history name them."""
        return {
            "model_mb": round(self.model_bytes / 1e6, 3),
            "size_ratio": round(self.size_ratio, 4),
            "build_s": self.build_seconds,
            "build_peak_rss_mb": round(self.build_peak_rss_bytes / 1e6, 1),
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and validate a manifest, or raise :class:`ManifestError` saying what is wrong in one line."""
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise ManifestError(f"{MANIFEST_NAME} is not valid JSON ({_one_line(str(exc))})") from None
        from jsonschema.exceptions import best_match

        error = best_match(_manifest_validator().iter_errors(data))
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path) or "top level"
            raise ManifestError(f"{MANIFEST_NAME} is invalid at {where}: {_one_line(error.message)}")
        for rel in data["files"]:
            pure = PurePosixPath(rel)
            if pure.is_absolute() or pure.as_posix() != rel or not pure.parts or ".." in pure.parts:
                raise ManifestError(f"{MANIFEST_NAME} is invalid at files: {rel!r} is not a path inside the entry")
        data["files"] = {k: FileRecord(**v) for k, v in data["files"].items()}
        return cls(**data)


def record_files(folder: Path) -> dict[str, FileRecord]:
    """Size, hash and mtime of every file in ``folder`` except the manifest."""
    records = {}
    for path in iter_files(folder):
        rel = path.relative_to(folder).as_posix()
        if rel in (MANIFEST_NAME, IN_PROGRESS_MARKER):
            continue
        st = path.stat()
        records[rel] = FileRecord(size=st.st_size, sha256=sha256_file(path), mtime_ns=st.st_mtime_ns)
    return records


@dataclass(frozen=True)
class EntryState:
    """Whether an installed entry can be reused, and if not, why."""

    usable: bool
    reason: str
    manifest: Manifest | None = None

    @property
    def installed(self) -> bool:
        return self.reason != NOT_INSTALLED


@dataclass(frozen=True)
class Staging:
    """One build's folder ``.staging/<name>.<id>/``: ``model/`` (published by a rename) and ``work/`` (Olive's)."""

    folder: Path

    @property
    def model(self) -> Path:
        return self.folder / "model"

    @property
    def work(self) -> Path:
        return self.folder / "work"


class ModelCache:
    """A cache folder laid out as Foundry Local's: ``custom/<name>/`` per model."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    @property
    def custom_dir(self) -> Path:
        return self.root / "custom"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def staging_dir(self) -> Path:
        return self.root / ".staging"

    @property
    def _staging_locks(self) -> Path:
        # Beside the folders, not in .staging/: a lock file must outlive the folder it guards.
        return self.root / ".locks" / "staging"

    def entry_dir(self, name: str) -> Path:
        return self.custom_dir / check_model_name(name)

    def ensure_writable(self) -> None:
        """Create the cache folders, or say clearly why they cannot be written."""
        probe = self.root / f".write-probe-{os.getpid()}"
        try:
            for folder in (self.custom_dir, self.staging_dir, self._staging_locks, self.logs_dir):
                folder.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise CacheError(
                f"cache folder {self.root} is not writable ({exc.strerror or exc}); "
                "pass --slm-cache DIR or set SLMDEPLOY_CACHE to a writable folder"
            ) from None

    def load_manifest(self, name: str) -> Manifest:
        """The entry's manifest, or :class:`ManifestError` saying in one line why it cannot be trusted."""
        path = self.entry_dir(name) / MANIFEST_NAME
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise ManifestError(f"no {MANIFEST_NAME}") from None
        except OSError as exc:
            raise ManifestError(f"{MANIFEST_NAME} cannot be read ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise ManifestError(f"{MANIFEST_NAME} is not valid JSON (not UTF-8 text)") from None
        manifest = Manifest.from_json(text)
        if manifest.name != name:
            raise ManifestError(f"{MANIFEST_NAME} is for {manifest.name!r}, not {name!r} (a copied entry)")
        return manifest

    def read_manifest(self, name: str) -> Manifest | None:
        try:
            return self.load_manifest(name)
        except ManifestError:
            return None

    def check(self, name: str, build_key: str | None = None, *, deep: bool = False) -> EntryState:
        """Is ``custom/<name>`` complete, built for ``build_key``, and unchanged since install?

        The quick check costs a stat per file: a file is re-hashed only when its inode, ctime,
        size or mtime differ from when it was last hashed (``fingerprints.json``); ``deep`` hashes every file.
        """
        folder = self.entry_dir(name)
        if not folder.is_dir():
            return EntryState(False, NOT_INSTALLED)
        try:
            manifest = self.load_manifest(name)
        except ManifestError as exc:
            return EntryState(False, str(exc))
        if build_key is not None and manifest.build_key != build_key:
            return EntryState(False, "the source, precision, recipe or tool versions changed", manifest)
        if (folder / IN_PROGRESS_MARKER).exists():
            return EntryState(False, f"{IN_PROGRESS_MARKER} present (incomplete install)", manifest)
        hashes = HashCache(self.root / STAT_CACHE_NAME)
        try:
            for rel, record in manifest.files.items():
                problem = _file_problem(folder / rel, record, hashes, deep=deep)
                if problem:
                    return EntryState(False, f"{rel} {problem}", manifest)
        finally:
            hashes.save()
        return EntryState(True, "ok", manifest)

    @contextlib.contextmanager
    def staging(self, name: str) -> Iterator[Staging]:
        """A fresh staging folder next to ``custom/`` (same filesystem, so publishing is a rename).

        It is this process's while the block runs (its lock is held) and removed when the block ends.
        """
        with self._claim(check_model_name(name)) as folder:
            staging = Staging(folder)
            staging.model.mkdir()
            (staging.model / IN_PROGRESS_MARKER).write_text("slmdeploy build in progress\n")
            yield staging

    @contextlib.contextmanager
    def _claim(self, prefix: str) -> Iterator[Path]:
        """A new folder in ``.staging/``, locked before it exists and until after it is removed."""
        folder = self.staging_dir / f"{prefix}.{uuid.uuid4().hex[:12]}"
        lock = self._staging_lock(folder)
        lock.acquire(timeout=60)  # a fresh name: only a cleaner probing it can hold it, for an instant
        try:
            folder.mkdir(parents=True)
            yield folder
        finally:
            self._remove_locked(folder, lock)

    def _staging_lock(self, folder: Path) -> filelock.BaseFileLock:
        self._staging_locks.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(self._staging_locks / f"{folder.name}.lock"))

    def _remove_locked(self, folder: Path, lock: filelock.BaseFileLock) -> None:
        """Remove ``folder`` and its lock file, then release the lock (a waiter on the old file retries)."""
        try:
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                folder.unlink(missing_ok=True)
            Path(lock.lock_file).unlink(missing_ok=True)
        finally:
            lock.release()

    def publish(self, staging: Staging, name: str, manifest: Manifest) -> Path:
        """Write the manifest and move ``staging.model`` into ``custom/<name>``, replacing any old entry."""
        final = self.entry_dir(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        (staging.model / MANIFEST_NAME).write_text(manifest.to_json())
        (staging.model / IN_PROGRESS_MARKER).unlink(missing_ok=True)
        if final.exists() or final.is_symlink():
            os.replace(final, staging.folder / "replaced")  # removed with the staging folder
        os.replace(staging.model, final)
        return final

    def remove(self, name: str) -> bool:
        folder = self.entry_dir(name)
        if not folder.exists():
            return False
        with self._claim(f"{name}.removed") as trash:
            os.replace(folder, trash / name)
        return True

    def names(self) -> list[str]:
        if not self.custom_dir.is_dir():
            return []
        return sorted(p.name for p in self.custom_dir.iterdir() if p.is_dir())

    def clean_stale_staging(self) -> list[Path]:
        """Remove staging folders that no live process holds (killed builds), whoever made them.

        A folder's owner holds its lock from before the folder exists until after it is gone, so a
        lock that can be taken at once has no owner. The kernel drops a killed process's lock, and
        the test needs no pid, so it holds across PID namespaces (containers sharing a cache).
        """
        removed: list[Path] = []
        if self.staging_dir.is_dir():
            for folder in sorted(self.staging_dir.iterdir()):
                if self._try_remove(folder):
                    removed.append(folder)
        if self._staging_locks.is_dir():  # lock files of builds killed before their folder was made
            for lock_file in sorted(self._staging_locks.glob("*.lock")):
                folder = self.staging_dir / lock_file.name.removesuffix(".lock")
                if not folder.exists():
                    self._try_remove(folder)
        return removed

    def _try_remove(self, folder: Path) -> bool:
        lock = self._staging_lock(folder)
        try:
            lock.acquire(blocking=False)
        except filelock.Timeout:
            return False  # a live build owns it
        self._remove_locked(folder, lock)
        return True

    @contextlib.contextmanager
    def lock(
        self, name: str, timeout: float, *, waiting: Callable[[str], None] = lambda message: None
    ) -> Iterator[None]:
        """Hold the build lock for ``name`` (across processes: xdist workers and concurrent runs)."""
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        owner_file = locks / f"{name}.owner"
        lock = filelock.FileLock(str(locks / f"{name}.lock"))
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                lock.acquire(timeout=min(5.0, max(0.0, deadline - time.monotonic())))
                break
            except filelock.Timeout:
                owner = _read_owner(owner_file)
                if time.monotonic() >= deadline:
                    raise CacheError(
                        f"another process ({owner}) is building {name!r} in {self.root}; gave up after "
                        f"{timeout:g}s (--slm-lock-timeout); wait for it or raise the timeout"
                    ) from None
                if not announced:
                    waiting(f"waiting for {owner} to finish building {name!r}")
                    announced = True
        try:
            owner_file.write_text(json.dumps({"pid": os.getpid(), "since": time.time()}))
            yield
        finally:
            owner_file.unlink(missing_ok=True)
            lock.release()


def _file_problem(path: Path, record: FileRecord, hashes: HashCache, *, deep: bool) -> str | None:
    """Why an installed file no longer matches its record, or None."""
    try:
        st = path.stat()
    except OSError:
        return "is missing"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"  # and reading a FIFO would block forever
    if st.st_size != record.size:
        return "changed since install"
    try:
        digest = hashes.sha256(path, st, reuse=not deep)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None if digest == record.sha256 else "changed since install"


def _read_owner(owner_file: Path) -> str:
    try:
        return f"pid {json.loads(owner_file.read_text())['pid']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"
