from __future__ import annotations

from pathlib import Path

import pytest

from pytest_slmdeploy.cli import main


def test_ls_verify_rm(warm_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--cache", str(warm_cache), "ls"]) == 0
    listing = capsys.readouterr().out
    assert "faq-int4" in listing
    assert "int4" in listing.splitlines()[1]
    assert main(["--cache", str(warm_cache), "verify", "faq-int4"]) == 0
    assert "faq-int4: ok" in capsys.readouterr().out
    assert main(["--cache", str(tmp_path), "verify", "nothing"]) == 1
    assert "DAMAGED: not installed" in capsys.readouterr().out
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
