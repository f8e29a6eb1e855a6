from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

import pytest

from pytest_slmdeploy.bench import History, RunRecord
from pytest_slmdeploy.cli import PLOT_NEEDS_MATPLOTLIB, _parser, main


def test_ls_verify_rm(warm_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cache", str(warm_cache), "ls"]) == 0
    listing = capsys.readouterr().out
    assert "faq-int4" in listing
    assert "int4" in listing.splitlines()[1]
    assert main(["--cache", str(warm_cache), "verify", "faq-int4"]) == 0
    assert "faq-int4: ok" in capsys.readouterr().out
    assert main(["--cache", str(tmp_path), "verify", "nothing"]) == 1
    not_installed = capsys.readouterr().out
    assert not_installed.startswith("nothing: ")
    assert "not installed" in not_installed
    assert main(["--cache", str(tmp_path), "rm", "nothing"]) == 1
    assert main(["--cache", str(tmp_path), "ls"]) == 0
    assert "no models in" in capsys.readouterr().out


def test_build_reuses_and_errors_are_one_line(
    tiny_model: Path, warm_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--cache", str(warm_cache), "build", str(tiny_model)]) == 0
    assert "faq-int4: reused (already installed)" in capsys.readouterr().out
    assert main(["--cache", str(warm_cache), "build", str(tiny_model / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slmdeploy: error: model folder ")
    assert err.count("\n") == 1
    assert main(["--cache", str(warm_cache), "verify", "../etc"]) == 2


def test_bench_history_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    history = History(tmp_path / "h")
    for i, tps in enumerate((30.0, 33.0, 27.0)):
        history.append(RunRecord(f"run{i}", "m", "f", "int4", {"decode_tps": tps, "ttft_ms": 100.0}, created_at=i))
    base = ["bench", "--history", str(tmp_path / "h")]
    assert main([*base, "history"]) == 0
    table = capsys.readouterr().out
    assert table.count("| run") == 4  # header + three runs
    assert "-18.2% ⚠️" in table
    assert main([*base, "compare", "run0", "run1"]) == 0
    assert "+10.0% ✅" in capsys.readouterr().out
    assert main([*base, "compare", "nope"]) == 2
    assert main(["bench", "--history", str(tmp_path / "empty"), "history"]) == 1


def test_fingerprint_is_the_build_keys_source_hash(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_slmdeploy.source import fingerprint

    assert main(["fingerprint", str(tiny_model)]) == 0
    assert capsys.readouterr().out.strip() == fingerprint(tiny_model)


def _history(folder: Path) -> Path:
    history = History(folder)
    for i, tps in enumerate((30.0, 33.0, 27.0)):
        history.append(RunRecord(f"run{i}", "m", "f", "int4", {"decode_tps": tps, "ttft_ms": 100.0}, created_at=i))
    return folder


def test_bench_plot_makes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default metrics, one panel each: an 880 x 528 PNG (8 x 4.8 inches at 110 dpi)."""
    history = _history(tmp_path / "h")
    out = tmp_path / "plots" / "history.png"
    assert main(["bench", "plot", "--history", str(history), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (880, 528)


def test_bench_plot_without_matplotlib_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the plot extra looks like
    out = tmp_path / "p.png"
    assert main(["bench", "plot", "--history", str(_history(tmp_path / "h")), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == PLOT_NEEDS_MATPLOTLIB + "\n"
    assert captured.out == ""
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--cache", "{cache}", "ls"],
        ["ls", "--cache", "{cache}"],
        ["--cache", "{elsewhere}", "ls", "--cache", "{cache}"],  # the last one wins, as with any option
        ["rm", "nothing", "--cache", "{cache}"],
        ["verify", "--cache", "{cache}", "nothing"],
    ],
    ids=["before", "after", "both", "rm", "verify"],
)
def test_cache_option_before_or_after_the_command(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    (cache / "custom" / "orphan").mkdir(parents=True)  # an entry without a manifest: ls lists it by name
    main([arg.format(cache=cache, elsewhere=tmp_path / "elsewhere") for arg in argv])
    out = capsys.readouterr().out
    if argv[0] == "rm" or "ls" not in argv:
        assert "nothing: " in out
    else:
        assert "orphan" in out


def test_bench_options_before_or_after_the_action(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    history = _history(tmp_path / "h")
    assert main(["bench", "--history", str(history), "--model", "m", "history"]) == 0
    before = capsys.readouterr().out
    assert main(["bench", "history", "--history", str(history), "--model", "m"]) == 0
    assert capsys.readouterr().out == before
    assert main(["bench", "compare", "run0", "run1", "--history", str(history)]) == 0
    assert "+10.0%" in capsys.readouterr().out


def _project(root: Path, config: str, name: str = "pyproject.toml") -> Path:
    """A project folder with a pytest configuration file, and a subfolder to run the CLI in."""
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(config)
    (root / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
    return root / "sub" / "deeper"


def test_cache_from_pyproject_relative_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """CLI > slm_cache in the nearest pyproject.toml (relative to it) > $SLMDEPLOY_CACHE > default."""
    project = tmp_path / "project"
    monkeypatch.setenv("SLMDEPLOY_CACHE", str(tmp_path / "from-env"))
    monkeypatch.chdir(_project(project, '[tool.pytest.ini_options]\nslm_cache = ".slm-cache"\n'))

    def listed() -> str:
        assert main(["ls"]) == 0
        return capsys.readouterr().out.strip()

    assert listed() == f"no models in {project / '.slm-cache' / 'custom'}"
    assert main(["ls", "--cache", "here"]) == 0  # a command-line path is relative to the current folder
    assert capsys.readouterr().out.strip() == f"no models in {project / 'sub' / 'deeper' / 'here' / 'custom'}"

    # Without slm_cache (the pyproject still stops the search upward), the environment, then the default.
    (project / "pyproject.toml").write_text('[tool.pytest.ini_options]\naddopts = "-q"\n')
    assert listed() == f"no models in {tmp_path / 'from-env' / 'custom'}"
    monkeypatch.delenv("SLMDEPLOY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert listed() == f"no models in {tmp_path / 'xdg' / 'slmdeploy' / 'custom'}"


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("pyproject.toml", '[tool.pytest.ini_options]\nslm_cache = "c"\n'),
        ("pyproject.toml", '[tool.pytest]\nslm_cache = "c"\n'),  # pytest 9's native TOML table
        ("pytest.ini", "[pytest]\nslm_cache = c\n"),
        ("tox.ini", "[tox]\n[pytest]\nslm_cache = c\n"),
        ("setup.cfg", "[metadata]\nname = x\n[tool:pytest]\nslm_cache = c\n"),
    ],
    ids=["pyproject", "pyproject-native", "pytest.ini", "tox.ini", "setup.cfg"],
)
def test_cache_from_each_pytest_configuration_file(
    name: str, config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(_project(tmp_path / "project", config, name))
    assert main(["ls"]) == 0
    assert capsys.readouterr().out.strip() == f"no models in {tmp_path / 'project' / 'c' / 'custom'}"


def test_the_nearest_configuration_wins_as_in_pytest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    outer = tmp_path / "outer"
    inner = outer / "inner"
    _project(outer, '[tool.pytest.ini_options]\nslm_cache = "outer-cache"\n')
    # In one folder pytest.ini comes before pyproject.toml; a pyproject.toml without pytest settings is skipped.
    (inner / "pytest.ini").parent.mkdir(parents=True)
    (inner / "pytest.ini").write_text("[pytest]\nslm_cache = inner-cache\n")
    (inner / "pyproject.toml").write_text('[tool.pytest.ini_options]\nslm_cache = "ignored"\n')
    monkeypatch.chdir(inner)
    assert main(["ls"]) == 0
    assert capsys.readouterr().out.strip() == f"no models in {inner / 'inner-cache' / 'custom'}"
    (inner / "pytest.ini").unlink()
    (inner / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert main(["ls"]) == 0
    assert capsys.readouterr().out.strip() == f"no models in {outer / 'outer-cache' / 'custom'}"


def test_bench_history_from_pyproject(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """slm_bench_history as the plugin reads it; without it, .slmdeploy/history beside the pyproject.toml."""
    project = tmp_path / "project"
    monkeypatch.chdir(_project(project, '[tool.pytest.ini_options]\nslm_bench_history = "bench/h"\n'))
    _history(project / "bench" / "h")
    assert main(["bench", "history"]) == 0
    assert capsys.readouterr().out.count("| run") == 4
    (project / "pyproject.toml").write_text('[tool.pytest.ini_options]\naddopts = "-q"\n')
    assert main(["bench", "history"]) == 1
    assert capsys.readouterr().out.strip() == f"no benchmark history in {project / '.slmdeploy' / 'history'}"
    _history(project / ".slmdeploy" / "history")
    assert main(["bench", "history"]) == 0


def test_a_broken_pyproject_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(_project(tmp_path / "project", "[tool.pytest.ini_options\n"))
    assert main(["ls"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"slmdeploy: error: {tmp_path / 'project' / 'pyproject.toml'} is not valid TOML")
    assert err.count("\n") == 1


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


def test_every_command_and_argument_has_help() -> None:
    parsers = _parsers(_parser())
    assert len(parsers) == 13  # slmdeploy, its 8 commands, bench's 3 actions, report's 1
    for parser in parsers:
        assert parser.description, parser.prog
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                assert all(choice.help for choice in action._choices_actions), parser.prog
            else:
                assert action.help, (parser.prog, action.dest)
                assert action.help != argparse.SUPPRESS, (parser.prog, action.dest)


@pytest.mark.parametrize("argv", [["--help"], ["ls", "--help"], ["bench", "plot", "--help"]], ids=" ".join)
def test_help_is_plain_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text  # reST markup, as the module docstring has
    assert "`" not in text
    assert "--cache DIR" in text or "--history DIR" in text
    if argv == ["--help"]:
        assert "slm_cache" in " ".join(text.split())  # where the cache comes from
