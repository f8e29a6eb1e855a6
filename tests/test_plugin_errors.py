"""Bad input gets one clear line, no traceback, and nothing half-written in the cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

PRECISION_CHOICES = "int4, int4-mixed, int8, fp32, fp16, auto"

Damage = Callable[[Path], Path]


def _break_config(model: Path) -> Path:
    (model / "config.json").write_text("{not json")
    return model


def _no_config(model: Path) -> Path:
    (model / "config.json").unlink()
    return model


def _unsupported(model: Path) -> Path:
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    return model


def _remote_code(model: Path) -> Path:
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    return model


def _no_tokenizer(model: Path) -> Path:
    (model / "tokenizer.json").unlink()
    return model


def _no_weights(model: Path) -> Path:
    (model / "model.safetensors").unlink()
    return model


def _truncated(model: Path) -> Path:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model


def _no_chat_template(model: Path) -> Path:
    (model / "chat_template.jinja").unlink()
    return model


def _fifo_weights(model: Path) -> Path:
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")
    return model


def _dangling_weights(model: Path) -> Path:
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(model / "gone.safetensors")
    return model


def _a_file(model: Path) -> Path:
    return model / "config.json"


def _missing(model: Path) -> Path:
    return model / "nowhere"


def _empty(model: Path) -> Path:
    empty = model.parent / "empty"
    empty.mkdir()
    return empty


CASES: list[tuple[str, Damage, str]] = [
    ("missing", _missing, "*model folder */nowhere does not exist*"),
    ("a-file", _a_file, "*config.json is a file: --slm-model takes a Hugging Face model folder*"),
    ("empty", _empty, "*model folder */empty is empty*"),
    ("no-config", _no_config, "*has no config.json*"),
    ("corrupt-config", _break_config, "*config.json is not valid JSON*line 1*"),
    ("unsupported", _unsupported, "*architecture GPT2LMHeadModel * is not supported by the ONNX Runtime GenAI*"),
    ("remote-code", _remote_code, "*needs its own Python code (config.json auto_map)*--slm-trust-remote-code*"),
    ("no-tokenizer", _no_tokenizer, "*has no tokenizer (tokenizer.json or tokenizer.model)*"),
    ("no-weights", _no_weights, "*has no weights*"),
    ("truncated", _truncated, "*model.safetensors is truncated*copy the model again*"),
    ("no-template", _no_chat_template, "*has no chat template*--slm-chat-template chatml*"),
    (
        "fifo-weights",
        _fifo_weights,
        "*weights file */model.safetensors is not a regular file (a pipe, socket or folder)*",
    ),
    (
        "dangling-weights",
        _dangling_weights,
        "*weights file */model.safetensors cannot be read (No such file or directory)*",
    ),
]


def _assert_one_line_error(result: pytest.RunResult, pattern: str, cache: Path) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: slmdeploy: {pattern}"])
    output = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in output
    assert len([line for line in result.stderr.lines if line.strip()]) == 1, result.stderr.lines
    assert not list((cache / "custom").glob("*")), "nothing may be installed"


@pytest.mark.parametrize(("damage", "pattern"), [(d, p) for _, d, p in CASES], ids=[c[0] for c in CASES])
def test_bad_model_folder(pytester: pytest.Pytester, model_copy: Path, damage: Damage, pattern: str) -> None:
    cache = pytester.path / "cache"
    result = pytester.runpytest("--slm-model", str(damage(model_copy)), "--slm-cache", str(cache))
    _assert_one_line_error(result, pattern, cache)


# (id, arguments, the one-line error): each a case of test_bad_options and a row of the docs' matrix.
BAD_OPTIONS: list[tuple[str, list[str], str]] = [
    (
        "fp16",
        ["--slm-precision", "fp16"],
        "*precision fp16 is refused by the CPU execution provider*int4, int8 or fp32*",
    ),
    ("dotdot-name", ["--slm-name", "../escape"], "*model name '../escape' is not allowed*"),
    ("slash-name", ["--slm-name", "a/b"], "*model name 'a/b' is not allowed*"),
    ("empty-name", ["--slm-name", ""], "*model name '' is not allowed*"),
    ("empty-cache", ["--slm-cache", ""], "*slm_cache is empty: give a path, or leave the option out for the default*"),
    ("bad-timeout", ["--slm-lock-timeout", "soon"], "*slm_lock_timeout = 'soon' is not a number of seconds*"),
    (
        "nan-timeout",
        ["--slm-lock-timeout", "nan"],
        "*slm_lock_timeout = nan must be a finite number of seconds, 0 or more*",
    ),
    ("threads-word", ["--slm-threads", "many"], "*slm_threads = 'many' is not auto or a whole number*"),
    (
        "vacuous-soak",
        ["-o", "slm_memory_generations=0"],
        "*slm_memory_generations = 0 is out of range: use a whole number at least 10*",
    ),
    (
        "impossible-rate",
        ["-o", "slm_format_min_stop_rate=2"],
        "*slm_format_min_stop_rate = 2 is out of range: use a number from 0 to 1*",
    ),
    ("nan-limit", ["-o", "slm_lengths_decode_band=nan"], "*slm_lengths_decode_band = nan must be a finite number*"),
    (
        "rounds-below-minimum",
        ["-o", "slm_lengths_min_rounds=5", "-o", "slm_lengths_max_rounds=4"],
        "*slm_lengths_max_rounds = 4 is below slm_lengths_min_rounds = 5*",
    ),
    ("maybe-bool", ["-o", "slm_rebuild=maybe"], "*slm_rebuild: invalid truth value 'maybe': use true or false*"),
    ("int3-ini", ["-o", "slm_precision=int3"], f"*slm_precision = 'int3' is not one of {PRECISION_CHOICES}*"),
]


@pytest.mark.parametrize(("args", "pattern"), [(a, p) for _, a, p in BAD_OPTIONS], ids=[c[0] for c in BAD_OPTIONS])
def test_bad_options(pytester: pytest.Pytester, tiny_model: Path, args: list[str], pattern: str) -> None:
    cache = pytester.path / "cache"
    result = pytester.runpytest("--slm-model", str(tiny_model), "--slm-cache", str(cache), *args)
    _assert_one_line_error(result, pattern, cache)


def test_bad_ini_value(pytester: pytest.Pytester, tiny_model: Path) -> None:
    pytester.makeini(f"[pytest]\nslm_model = {tiny_model}\nslm_precision = int3\n")
    result = pytester.runpytest("--slm-cache", str(pytester.path / "cache"))
    _assert_one_line_error(result, f"*slm_precision = 'int3' is not one of {PRECISION_CHOICES}*", pytester.path)


def test_cache_not_writable(pytester: pytest.Pytester, tiny_model: Path) -> None:
    blocker = pytester.path / "a-file"
    blocker.write_text("not a folder")
    result = pytester.runpytest("--slm-model", str(tiny_model), "--slm-cache", str(blocker / "cache"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: slmdeploy: cache folder */a-file/cache is not writable (*--slm-cache DIR*"])


def test_chatml_option_makes_a_template_less_model_work(pytester: pytest.Pytester, model_copy: Path) -> None:
    model = _no_chat_template(model_copy)
    pytester.makepyfile("def test_a(slm_model):\n    assert slm_model.generate('Where is the office?').text\n")
    cache = pytester.path / "cache"
    args = ("--slm-model", str(model), "--slm-cache", str(cache), "--slm-chat-template", "chatml", "--slm-no-suite")
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    assert (cache / "custom" / "model-int4" / "chat_template.jinja").is_file()


HOLD_LOCK = """
import sys, time
from pathlib import Path
from pytest_slmdeploy.cache import ModelCache
with ModelCache(Path(sys.argv[1])).lock(sys.argv[2], 60):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_run_while_first_builds(pytester: pytest.Pytester, tiny_model: Path) -> None:
    cache = pytester.path / "cache"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(cache), "faq-int4"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        pytester.makepyfile("def test_a(slm_deployment):\n    pass\n")
        result = pytester.runpytest(
            "--slm-model", str(tiny_model), "--slm-cache", str(cache), "--slm-lock-timeout", "1", "--slm-no-suite"
        )
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(
            [f"*another process (pid {holder.pid}) is building 'faq-int4' in *; gave up after 1s (--slm-lock-timeout)*"]
        )
        assert "Traceback" not in result.stdout.str()
        assert not (cache / "custom" / "faq-int4").exists()
    finally:
        holder.kill()
        holder.communicate()  # waits and closes the pipe


def test_killed_build_leaves_no_entry(pytester: pytest.Pytester, tiny_model: Path) -> None:
    cache = pytester.path / "cache"
    pytester.makepyfile("def test_a(slm_deployment):\n    assert slm_deployment.entry_dir.is_dir()\n")
    args = [sys.executable, "-m", "pytest", "--slm-model", str(tiny_model), "--slm-cache", str(cache), "--slm-no-suite"]
    build = subprocess.Popen(args, cwd=pytester.path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    staging = cache / ".staging"
    while time.monotonic() < deadline and not (staging.is_dir() and any(staging.iterdir())):
        if build.poll() is not None:
            pytest.fail("the build finished before it could be killed")
        time.sleep(0.05)
    os.kill(build.pid, signal.SIGKILL)
    build.wait()
    assert any(staging.iterdir()), "the killed build's staging folder is there"
    assert not (cache / "custom" / "faq-int4").exists(), "a killed build must not leave an entry"

    result = pytester.runpytest_subprocess("--slm-model", str(tiny_model), "--slm-cache", str(cache), "--slm-no-suite")
    result.assert_outcomes(passed=1)
    assert not [p for p in staging.iterdir()], "the next build removed the dead build's leftovers"


def test_changed_entry_is_rebuilt_and_reported(pytester: pytest.Pytester, tiny_model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    pytester.makepyfile("def test_a(slm_deployment):\n    pass\n")
    args = ("--slm-model", str(tiny_model), "--slm-cache", str(cache), "--slm-no-suite")
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=1)
    onnx = cache / "custom" / "faq-int4" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"tampered")
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*will build (model.onnx changed since install)*", "*note: rebuilt faq-int4*"])


MISSING_WEIGHTS = "*slmdeploy: * the weights lack 24 tensors * model.layers.{2, 3}.*; fix config.json*"
DISK_FULL = "*slmdeploy: building faq-int4 failed: OSError: * No space left on device*"


def test_missing_weights_fail_the_build_with_their_names(pytester: pytest.Pytester, model_copy: Path) -> None:
    config = json.loads((model_copy / "config.json").read_text())
    config["num_hidden_layers"] = 4
    config.pop("layer_types", None)
    (model_copy / "config.json").write_text(json.dumps(config))
    cache = pytester.path / "cache"
    pytester.makepyfile("def test_a(slm_model):\n    pass\n\ndef test_b(slm_model):\n    pass\n")
    result = pytester.runpytest_subprocess("--slm-model", str(model_copy), "--slm-cache", str(cache), "--slm-no-suite")
    result.assert_outcomes(errors=2)  # the fixture fails: each test that needs the model errors, one line each
    result.stdout.fnmatch_lines([MISSING_WEIGHTS])
    assert "Traceback" not in result.stdout.str()
    assert not list((cache / "custom").glob("*")), "nothing may be installed"


UNEXPECTED_FAULT = """
import errno
from pytest_slmdeploy import build, cache

calls = []
real_run_olive = build.run_olive

def counted_run_olive(*args, **kwargs):
    calls.append(1)
    with open("olive-runs.txt", "a") as fh:
        fh.write("run\\n")
    return real_run_olive(*args, **kwargs)

def full_disk(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

build.run_olive = counted_run_olive
cache.ModelCache.publish = full_disk
"""


def test_an_unexpected_fault_is_one_clear_failure_and_one_build(pytester: pytest.Pytester, tiny_model: Path) -> None:
    pytester.makeconftest(UNEXPECTED_FAULT)
    pytester.makepyfile("\n".join(f"def test_{i}(slm_model):\n    pass\n" for i in range(3)))
    cache = pytester.path / "cache"
    result = pytester.runpytest_subprocess("--slm-model", str(tiny_model), "--slm-cache", str(cache), "--slm-no-suite")
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines([DISK_FULL])
    assert "Traceback" not in result.stdout.str()
    assert (pytester.path / "olive-runs.txt").read_text().count("run") == 1, "the build is attempted once per session"
    assert not list((cache / "custom").glob("*")), "nothing may be installed"


# -- the bad-input matrix of docs/troubleshooting.md, generated from the cases above ------------------
FOLDER_INPUTS = {
    "missing": "a model path that does not exist",
    "a-file": "a file instead of the model folder",
    "empty": "an empty folder",
    "no-config": "no config.json",
    "corrupt-config": "config.json that is not JSON",
    "unsupported": "an architecture ModelBuilder cannot convert",
    "remote-code": "a model with its own code (auto_map), not trusted",
    "no-tokenizer": "no tokenizer",
    "no-weights": "no weights",
    "truncated": "truncated model.safetensors",
    "no-template": "no chat template",
    "fifo-weights": "a FIFO in place of the weights",
    "dangling-weights": "a dangling symlink in place of the weights",
}
BUILD_INPUTS = [  # (input, message, exit code): build-time faults, reported by every test that needs the model
    ("config.json claims 4 layers, the weights hold 2", MISSING_WEIGHTS),
    ("the disk fills up while installing (ENOSPC)", DISK_FULL),
]
MATRIX_START, MATRIX_END = "<!-- bad-input-matrix:start -->", "<!-- bad-input-matrix:end -->"


def _message(pattern: str) -> str:
    return pattern.replace("*slmdeploy: ", "").strip("*").strip().replace("|", "\\|")


def _shell(args: list[str]) -> str:
    return " ".join(arg or "''" for arg in args)


def bad_input_matrix() -> str:
    """The table: input, message, exit code (4: usage error before anything runs; 1: tests fail)."""
    rows = ["| input | message (`*` stands for what varies) | exit code |", "|---|---|---|"]
    rows += [f"| {FOLDER_INPUTS[i]} | `{_message(p)}` | 4 |" for i, _, p in CASES]
    rows += [f"| `{_shell(args)}` | `{_message(p)}` | 4 |" for _, args, p in BAD_OPTIONS]
    rows += [f"| {what} | `{_message(p)}` | 1 |" for what, p in BUILD_INPUTS]
    return "\n".join(rows) + "\n"


def test_the_docs_matrix_is_generated_from_these_cases() -> None:
    docs = (Path(__file__).parents[1] / "docs" / "troubleshooting.md").read_text()
    assert MATRIX_START in docs
    assert MATRIX_END in docs
    shown = docs.split(MATRIX_START)[1].split(MATRIX_END)[0].strip()
    assert shown == bad_input_matrix().strip(), "regenerate it: .venv/bin/python scripts/bad_input_matrix.py"
    assert set(FOLDER_INPUTS) == {case[0] for case in CASES}


@pytest.mark.parametrize("flag", ["--help", "--markers", "--fixtures", "--co"])
def test_information_runs_need_no_model_yet(pytester: pytest.Pytester, flag: str) -> None:
    # A fresh clone of a project whose model is made by a script: the ini already names it.
    pytester.makepyprojecttoml('[tool.pytest.ini_options]\nslm_model = "model"\n')
    result = pytester.runpytest(flag)
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
    assert "does not exist" not in result.stdout.str() + result.stderr.str()
    plain = pytester.runpytest()  # a real run still says what is wrong
    assert plain.ret == pytest.ExitCode.USAGE_ERROR
    plain.stderr.fnmatch_lines(["ERROR: slmdeploy: model folder */model does not exist*"])


def test_a_run_that_waited_for_another_build_says_so(pytester: pytest.Pytester, tiny_model: Path) -> None:
    cache = pytester.path / "cache"
    pytester.makepyfile("def test_a(slm_deployment):\n    assert slm_deployment.entry_dir.is_dir()\n")
    args = ["--slm-model", str(tiny_model), "--slm-cache", str(cache), "--slm-no-suite", "-p", "no:cacheprovider"]
    first = subprocess.Popen(
        [sys.executable, "-m", "pytest", *args], cwd=pytester.path, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    staging = cache / ".staging"
    while time.monotonic() < deadline and not (staging.is_dir() and any(staging.iterdir())):
        time.sleep(0.05)
    assert first.poll() is None, "the first build finished before the second run could wait for it"
    second = pytester.runpytest_subprocess(*args)
    out, _ = first.communicate(timeout=300)
    assert "faq-int4 [int4]: built in " in out
    second.assert_outcomes(passed=1)
    second.stdout.fnmatch_lines(
        ["faq-int4 [int4]: reused from the cache: another process built it while this run waited"]
    )


def test_a_marker_limit_is_checked_like_the_ini_key(
    pytester: pytest.Pytester, tiny_model: Path, warm_cache: Path
) -> None:
    pytester.makepyfile("import pytest\n\n@pytest.mark.slm_memory(generations=0)\ndef test_a(slm_limits):\n    pass\n")
    result = pytester.runpytest_subprocess(
        "--slm-model", str(tiny_model), "--slm-cache", str(warm_cache), "--slm-no-suite"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*@pytest.mark.slm_memory(generations=0): slm_memory_generations = 0 is out of range: use a whole number*"]
    )
