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


def test_bench_history_compare_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_slmdeploy.bench import History, RunRecord

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
    assert main([*base, "plot", "--out", str(tmp_path / "p.png"), "--metric", "decode_tps"]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert main(["bench", "--history", str(tmp_path / "empty"), "history"]) == 1


def test_fingerprint_is_the_build_keys_source_hash(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_slmdeploy.source import fingerprint

    assert main(["fingerprint", str(tiny_model)]) == 0
    assert capsys.readouterr().out.strip() == fingerprint(tiny_model)
