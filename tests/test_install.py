"""The wheel installs into a project's environment without replacing what the project already has.

pyproject.toml declares ranges; exact pins belong in requirements/lock.txt. These tests build the wheel
and read its own metadata, then let pip resolve it, offline, in a fresh environment that holds other
allowed versions of the heavy dependencies beside the rest of the locked set.
"""

from __future__ import annotations

import email
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[1]
# No upper bound is known today: the builder is driven through its public entry points (olive_genai.py).
BOUNDED_ABOVE: set[str] = set()
# Allowed versions other than the locked ones, as a project may already have them (pip reads an installed
# package's record, so a record is all it takes to stand for one: nothing multi-GB is downloaded).
OTHER_ALLOWED = {"transformers": "5.2.0", "tokenizers": "0.22.1", "torch": "2.9.1", "onnxruntime": "1.32.0"}
EXTRAS = ("foundry", "plot", "test")


def _pip_env() -> dict[str, str]:
    """No pip configuration from this machine (indexes, find-links, constraints): only what a test passes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def _pip(*args: str, python: Path | None = None) -> subprocess.CompletedProcess[str]:
    target = ["--python", str(python)] if python else []
    command = [sys.executable, "-m", "pip", *target, *args]
    return subprocess.run(command, capture_output=True, text=True, env=_pip_env(), timeout=120, check=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built offline from a copy of the sources (the build writes build/ and egg-info beside them)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "pytest_slmdeploy", src / "pytest_slmdeploy", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet", "-w", str(dist), str(src))
    assert built.returncode == 0, built.stderr
    (found,) = dist.glob("pytest_slmdeploy-*.whl")
    return found


def _requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(name))
    return [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]


def _extras(requirement: Requirement) -> list[str | None]:
    """The extras under which ``requirement`` applies (None: always)."""
    if requirement.marker is None:
        return [None]
    return [extra for extra in EXTRAS if requirement.marker.evaluate({"extra": extra})]


def _pyproject_line(requirement: Requirement) -> tuple[str, str]:
    """The line of pyproject.toml that declares ``requirement``, and the line before it."""
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        if f'"{requirement.name}' in line and any(spec.version in line for spec in requirement.specifier):
            return line, lines[i - 1]
    raise AssertionError(f"{requirement} is not in pyproject.toml as written")


def test_requirements_are_ranges_bounded_above_only_where_known(wheel: Path) -> None:
    requirements = _requirements(wheel)
    assert {canonicalize_name(r.name) for r in requirements} >= {"torch", "transformers", "matplotlib"}
    for requirement in requirements:
        operators = {spec.operator for spec in requirement.specifier}
        if operators & {"==", "==="}:  # an exact pin needs its reason written beside it
            line, before = _pyproject_line(requirement)
            assert "#" in line or before.strip().startswith("#"), f"{requirement}: an exact pin without a reason"
        elif operators & {"<", "<=", "~="}:
            assert canonicalize_name(requirement.name) in BOUNDED_ABOVE, f"{requirement}: an upper bound"
    by_name = {canonicalize_name(r.name): r.specifier for r in requirements}
    assert "0.18.0" in by_name["onnxruntime-genai"]
    assert "0.14.1" not in by_name["onnxruntime-genai"]  # its builder's entry points take other arguments
    assert "0.13.0" in by_name["olive-ai"]
    assert "4.57.1" not in by_name["transformers"]  # measured: onnxruntime-genai 0.18's builder cannot import with it
    assert "5.2.0" in by_name["transformers"]


def test_the_lock_file_satisfies_every_requirement(wheel: Path) -> None:
    """requirements/lock.txt (what scripts/setup-venv.sh installs) is one of the sets the ranges allow."""
    lock = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[canonicalize_name(name)] = version
    assert lock["torch"] == "2.13.0"  # the CPU build on local disk: another torch would be a CUDA download
    for requirement in _requirements(wheel):
        if not _extras(requirement):
            continue
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement} ({_extras(requirement)}) is not in the lock file"
        assert requirement.specifier.contains(lock[name], prereleases=True), f"{requirement} vs lock {lock[name]}"


@pytest.fixture(scope="module")
def project_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding OTHER_ALLOWED and, for the rest, this environment's packages (their records)."""
    env = tmp_path_factory.mktemp("project-env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    (site,) = env.glob("lib/python*/site-packages")
    seen = {"pytest-slmdeploy"}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        metadata = dist.read_text("METADATA")
        if name in seen or metadata is None:
            continue
        seen.add(name)
        version = OTHER_ALLOWED.get(name, dist.version)
        if name in OTHER_ALLOWED:
            assert version != dist.version, "pick a version other than the installed one"
            metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        record = site / f"{name.replace('-', '_')}-{version}.dist-info"
        record.mkdir()
        (record / "METADATA").write_text(metadata)
    assert set(OTHER_ALLOWED) <= seen
    return env / "bin" / "python"


@pytest.mark.parametrize("extra", ["", "[plot]"], ids=["plain", "plot"])
def test_installing_the_wheel_keeps_the_projects_versions(
    extra: str, wheel: Path, project_env: Path, tmp_path: Path
) -> None:
    """pip, offline, must install the wheel alone: every requirement is met by what the project has."""
    report = tmp_path / "report.json"
    requirement = f"pytest-slmdeploy{extra} @ {wheel.as_uri()}"
    offline = ["--dry-run", "--no-index", "--find-links", str(wheel.parent)]
    resolved = _pip("install", *offline, "--report", str(report), requirement, python=project_env)
    assert resolved.returncode == 0, resolved.stdout + resolved.stderr
    installs = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert installs == ["pytest-slmdeploy"]


def test_the_project_env_would_catch_a_pin(project_env: Path, wheel: Path) -> None:
    """The check above is not vacuous: an exact pin on the locked transformers cannot keep the project's."""
    offline = ["--dry-run", "--no-index", "--find-links", str(wheel.parent)]
    resolved = _pip("install", *offline, "transformers==5.24.0", python=project_env)
    assert resolved.returncode != 0
    assert "transformers==5.24.0" in resolved.stderr
