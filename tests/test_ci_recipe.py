"""The example workflow's logic, run for real: its steps' commands in a temporary repository, three times.

GitHub's side is simulated only where it must be: the ``${{ }}`` expressions (a small evaluator below),
step ``if:`` conditions and job status, ``$GITHUB_OUTPUT``/``$GITHUB_STEP_SUMMARY``, and ``actions/cache``
as a key -> folder store. Every ``run:`` step except installing and training runs as GitHub runs it
(``bash -eo pipefail``), in the workflow's working directory, with its ``env:``.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

BUSY = "not decided: other processes used"  # a timing gate's reason when other processes kept the machine busy

WORKFLOW = Path(__file__).parents[1] / "example_project" / ".github" / "workflows" / "slm-deploy.yml"
NOT_RUN = ("Install", "Make the model")  # the test's environment and its tiny model stand in for them
MAIN, PULL_REQUEST = "refs/heads/main", "refs/pull/7/merge"
# Wide gates: only the injected regression (decode x20 in the baseline) may fail, not a loaded machine's noise.
PROJECT_PYPROJECT = """
[tool.pytest.ini_options]
slm_model = "model"
slm_name = "faq-int4"
slm_cache = ".slmdeploy-cache"
slm_bench_history = ".slmdeploy/history"
slm_suite = false
slm_benchmark_rounds = "5"
slm_bench_gate = "decode_tps:-75% ttft_ms:+400% peak_rss_mb:+100%"
"""
BENCHMARK_TEST = """
import pytest

@pytest.mark.slm_benchmark
def test_speed(slm_benchmark):
    assert slm_benchmark("Do you ship abroad?", new_tokens=32).decode_tps > 0
"""


# -- GitHub expressions: literals, contexts, ! == != && || ( ), and the status functions ------------------------
_TOKEN = re.compile(r"\s*(?:('(?:[^']|'')*')|(\d+(?:\.\d+)?)|([A-Za-z_][\w-]*)|(==|!=|&&|\|\||[!().\[\],]))")


def _tokens(text: str) -> list[str]:
    tokens, position = [], 0
    while text[position:].strip():
        match = _TOKEN.match(text, position)
        assert match, f"cannot read the expression {text!r} at {text[position:]!r}"
        tokens.append(match.group().strip())
        position = match.end()
    return tokens


def _truthy(value: Any) -> bool:
    return value not in (None, False, 0, "")


class Expression:
    """Evaluates one expression as GitHub does (strings compare case-insensitively, && and || yield values)."""

    def __init__(self, text: str, context: dict[str, Any], functions: dict[str, Callable[..., Any]]) -> None:
        self.tokens, self.context, self.functions = _tokens(text), context, functions

    def value(self) -> Any:
        result = self._or()
        assert not self.tokens, f"unexpected {self.tokens}"
        return result

    def _take(self, expected: str | None = None) -> str:
        token = self.tokens.pop(0)
        assert expected is None or token == expected, f"expected {expected}, got {token}"
        return token

    def _or(self) -> Any:
        left = self._and()
        while self.tokens[:1] == ["||"]:
            self._take()
            right = self._and()
            left = left if _truthy(left) else right
        return left

    def _and(self) -> Any:
        left = self._compare()
        while self.tokens[:1] == ["&&"]:
            self._take()
            right = self._compare()
            left = right if _truthy(left) else left
        return left

    def _compare(self) -> Any:
        left = self._unary()
        if self.tokens[:1] in (["=="], ["!="]):
            equal = self._take() == "=="
            right = self._unary()
            same = str(left).casefold() == str(right).casefold() if isinstance(left, str) else left == right
            return same if equal else not same
        return left

    def _unary(self) -> Any:
        if self.tokens[:1] == ["!"]:
            self._take()
            return not _truthy(self._unary())
        return self._primary()

    def _primary(self) -> Any:
        token = self._take()
        if token == "(":
            value = self._or()
            self._take(")")
            return value
        if token.startswith("'"):
            return token[1:-1].replace("''", "'")
        if token[0].isdigit():
            return float(token)
        if token in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[token]
        if self.tokens[:1] == ["("]:
            self._take()
            args = []
            while self.tokens[0] != ")":
                args.append(self._or())
                if self.tokens[0] == ",":
                    self._take()
            self._take(")")
            return self.functions[token](*args)
        value = self.context[token]
        while self.tokens[:1] in (["."], ["["]):
            key = self._take() if self._take() == "." else self._bracket()
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def _bracket(self) -> Any:
        key = self._or()
        self._take("]")
        return key


def _as_text(value: Any) -> str:
    return "" if value is None else ("true" if value is True else "false" if value is False else str(value))


# -- one job run -------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What a simulated workflow run left behind."""

    steps: dict[str, str] = field(default_factory=dict)  # name -> success | failure | skipped | stand-in
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    logs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    summary: str = ""
    project: Path = Path()


class Actions:
    """Runs one job of the workflow in ``workspace`` (its only one unless ``job`` names it); ``caches`` plays
    GitHub's cache service across runs, ``artifacts`` its artifact store within one workflow run."""

    def __init__(self, workflow: dict[str, Any], caches: dict[str, Path], store: Path, job: str | None = None) -> None:
        self.workflow, self.caches, self.store = workflow, caches, store
        (self.job,) = workflow["jobs"].values() if job is None else (workflow["jobs"][job],)
        self.artifacts: dict[str, Path] = {}

    def run(
        self,
        workspace: Path,
        *,
        ref: str,
        run_id: int,
        inputs: dict[str, str],
        before: Callable[[str, Path], None] = lambda step, project: None,
        matrix: dict[str, str] | None = None,
        needs: dict[str, dict[str, str]] | None = None,
    ) -> Run:
        result = Run()
        failed = False
        context: dict[str, Any] = {
            "github": {"ref": ref, "run_id": str(run_id), "run_attempt": "1"},
            "runner": {"os": platform.system(), "arch": {"x86_64": "X64", "aarch64": "ARM64"}.get(platform.machine())},
            "inputs": inputs,
            "steps": {},
            "matrix": matrix or {},
            "needs": needs or {},
        }
        functions: dict[str, Callable[..., Any]] = {
            "always": lambda: True,
            "success": lambda: not failed,
            "failure": lambda: failed,
            "cancelled": lambda: False,
        }

        def evaluate(text: str) -> Any:
            return Expression(text, context, functions).value()

        def interpolate(text: str) -> str:
            return re.sub(r"\$\{\{(.*?)\}\}", lambda m: _as_text(evaluate(m.group(1))), text)

        context["env"] = {k: interpolate(str(v)) for k, v in self.workflow.get("env", {}).items()}
        directory = interpolate(self.job.get("defaults", {}).get("run", {}).get("working-directory", "."))
        result.project = project = workspace / directory
        tag = "-".join([str(run_id), *(matrix or {}).values()])
        summary_file, post_saves = workspace.parent / f"summary-{tag}.md", []
        for step in self.job["steps"]:
            name = step.get("name") or step["uses"]
            condition = str(step.get("if", "success()")).removeprefix("${{").removesuffix("}}")
            if not re.search(r"\b(always|success|failure|cancelled)\(", condition):
                condition = f"success() && ({condition})"
            if not _truthy(evaluate(condition)):
                result.steps[name] = "skipped"
                continue
            before(name, project)
            with_ = {k: interpolate(str(v)) for k, v in step.get("with", {}).items()}
            ok, done_here = True, True
            if "run" in step and name not in NOT_RUN:
                output_file = workspace.parent / f"output-{tag}-{len(result.steps)}"
                output_file.write_text("")
                env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "GITHUB_"))}
                env |= context["env"] | {k: interpolate(str(v)) for k, v in step.get("env", {}).items()}
                env |= {
                    "CI": "true",
                    "GITHUB_STEP_SUMMARY": str(summary_file),
                    "GITHUB_OUTPUT": str(output_file),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
                }
                done = subprocess.run(
                    ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", interpolate(step["run"])],
                    cwd=project, env=env, capture_output=True, text=True, timeout=300,
                )  # fmt: skip
                result.logs[name] = done
                ok = done.returncode == 0
                outputs = dict(line.split("=", 1) for line in output_file.read_text().splitlines() if "=" in line)
                if "id" in step:
                    context["steps"][step["id"]] = {"outputs": outputs}
                    result.outputs[step["id"]] = outputs
            elif step.get("uses", "").startswith("actions/cache"):
                action = step["uses"].split("@")[0]
                path = workspace / with_["path"]
                if action in ("actions/cache", "actions/cache/restore"):
                    hit = self._restore(with_["key"], with_.get("restore-keys", ""), path)
                    if action == "actions/cache" and hit != with_["key"]:  # its post step saves a miss
                        post_saves.append((with_["key"], path))
                else:
                    self._save(with_["key"], path)
            elif step.get("uses", "").startswith("actions/upload-artifact"):
                source = workspace / with_["path"]
                if source.is_dir():
                    self.artifacts[with_["name"]] = Path(shutil.copytree(source, self.store / f"artifact-{tag}"))
            elif step.get("uses", "").startswith("actions/download-artifact"):
                pattern = with_["pattern"].replace("*", ".*")
                for name, folder in self.artifacts.items():
                    if re.fullmatch(pattern, name):
                        shutil.copytree(folder, workspace / with_["path"] / name)
            else:  # checkout, setup-python, and the run steps in NOT_RUN
                done_here = False
            result.steps[name] = ("success" if ok else "failure") if done_here else "stand-in"
            failed |= not ok
        for key, path in post_saves if not failed else ():
            self._save(key, path)
        result.summary = summary_file.read_text() if summary_file.exists() else ""
        return result

    def _restore(self, key: str, restore_keys: str, path: Path) -> str | None:
        prefixes = [line.strip() for line in restore_keys.splitlines() if line.strip()]
        found = key if key in self.caches else None
        for prefix in prefixes if found is None else ():
            found = next((k for k in reversed(list(self.caches)) if k.startswith(prefix)), None)
            if found:
                break
        if found:
            shutil.copytree(self.caches[found], path, dirs_exist_ok=True)
        return found

    def _save(self, key: str, path: Path) -> None:
        if key not in self.caches and path.is_dir():  # a cache key, once saved, is never overwritten
            self.caches[key] = Path(shutil.copytree(path, self.store / f"{len(self.caches)}"))


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    loaded = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _checkout(root: Path, tiny_model: Path, pyproject: str = PROJECT_PYPROJECT) -> Path:
    """A fresh clone of a repository whose project sits in app/ (so the working-directory input matters)."""
    project = root / "app"
    (project / "tests").mkdir(parents=True)
    (project / "pyproject.toml").write_text(pyproject)
    (project / "tests" / "test_speed.py").write_text(BENCHMARK_TEST)
    shutil.copytree(tiny_model, project / "model")
    return root


def _history(folder: Path) -> list[dict[str, Any]]:
    path = folder / "faq-int4.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_workflow_bootstraps_then_gates_then_catches_a_regression(
    workflow: dict[str, Any], tiny_model: Path, warm_cache: Path, tmp_path: Path
) -> None:
    caches: dict[str, Path] = {}
    actions = Actions(workflow, caches, tmp_path / "cache-service")
    inputs = {"working-directory": "app"}
    # A model cache saved by an earlier workflow run (this test builds nothing), under the step's own key.
    key = subprocess.run(
        [Path(sys.executable).parent / "slmdeploy", "fingerprint", "--cache-key"],
        cwd=_checkout(tmp_path / "key", tiny_model) / "app", capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    caches[key] = warm_cache
    gate_step, plot_step, save_step = (
        "Build, install and check", "Benchmark history table and plot", "Save the benchmark history (main only)"
    )  # fmt: skip

    first = actions.run(_checkout(tmp_path / "run1", tiny_model), ref=MAIN, run_id=1, inputs=inputs)
    check = first.logs[gate_step].stdout
    assert [first.steps[name] for name in NOT_RUN] == ["stand-in"] * len(NOT_RUN)
    assert first.outputs["model"]["key"] == key
    assert first.steps[gate_step] == "success", check + first.logs[gate_step].stderr
    bootstrap = "no baseline yet for faq-int4: this run becomes the baseline (saved with --slm-bench-save)"
    assert bootstrap in check
    assert bootstrap in first.summary
    assert "reused from the cache (no build)" in check, "the cache key restored a build the plugin reuses"
    assert first.steps[plot_step] == "success", first.logs[plot_step].stderr
    assert (first.project / "reports" / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert "| run | commit |" in first.summary
    assert first.steps[save_step] == "success"
    assert len(_history(first.project / ".slmdeploy" / "history")) == 1

    second = actions.run(_checkout(tmp_path / "run2", tiny_model), ref=MAIN, run_id=2, inputs=inputs)
    check = second.logs[gate_step].stdout
    assert second.steps[gate_step] == "success", check
    if BUSY in check:  # other processes kept the machine busy: the timing gates are not decided, the memory one is
        gates = re.search(r"benchmark gates not decided against .*: peak_rss_mb [-+]\S+% \(limit \+100%\)", check)
    else:
        gates = re.search(
            r"benchmark gates passed against '[^']+' \(.+\): decode_tps [-+]\S+% \(limit -75%\), .*", check
        )
    assert gates, check
    assert gates.group() in second.summary
    junit = (second.project / "reports" / "junit.xml").read_text()
    assert 'failures="0"' in junit
    assert '<testcase classname="slmdeploy" name="benchmark_gates"' in junit
    assert len(_history(second.project / ".slmdeploy" / "history")) == 2, "gated against the first, then saved"

    def regress(step: str, project: Path) -> None:
        """The last main run, as restored, was 20 times faster at decoding than this machine can be, and used a
        twentieth of the memory (which a busy machine cannot hide)."""
        if step == gate_step:
            history = project / ".slmdeploy" / "history"
            (last,) = _history(history)[-1:]
            last["metrics"]["decode_tps"] *= 20
            last["metrics"]["peak_rss_mb"] /= 20
            with (history / "faq-int4.jsonl").open("a") as fh:
                fh.write(json.dumps(dict(last, name="fast", created_at=time.time())) + "\n")

    third = actions.run(_checkout(tmp_path / "run3", tiny_model), ref=MAIN, run_id=3, inputs=inputs, before=regress)
    check = third.logs[gate_step].stdout
    assert third.logs[gate_step].returncode == 1, check
    metric = "peak_rss_mb grew" if BUSY in check else "decode_tps dropped"  # the first reason: a decided gate's
    reason = re.search(rf"{metric} [\d.]+%: .* \(limit [-+]\d+%\); baseline run 'fast' of .*", check)
    assert reason, check
    assert f"FAILED slmdeploy::benchmark_gates - {reason.group()}" in check  # the short summary (CI: untrimmed)
    assert re.search(r"= 1 failed, 1 passed in .* =", check)
    junit = (third.project / "reports" / "junit.xml").read_text()
    assert 'failures="1"' in junit
    assert re.search(rf'name="benchmark_gates".*<failure message="{metric}', junit, re.S)
    assert "benchmark gates FAILED against 'fast'" in third.summary
    assert f"- {reason.group()}" in third.summary
    assert third.steps[plot_step] == "success", "always(): the plot shows the failed run too"
    assert third.steps[save_step] == "success", "always(): main's history keeps the failed run"
    newest = list(caches)[-1]
    assert newest.startswith("slmdeploy-history-")
    saved = [record["name"] for record in _history(caches[newest])]
    assert saved[2:] == ["fast", _history(third.project / ".slmdeploy" / "history")[-1]["name"]]


def test_pull_requests_are_gated_but_never_save(workflow: dict[str, Any], tmp_path: Path) -> None:
    """The branch logic alone (no model): a pull request's run neither saves to nor caches the history."""
    (job,) = workflow["jobs"].values()
    steps = {step.get("name"): step for step in job["steps"]}
    gate, save = steps["Build, install and check"], steps["Save the benchmark history (main only)"]
    for ref, failed, saves in [(MAIN, False, True), (MAIN, True, True), (PULL_REQUEST, False, False)]:
        context = {"github": {"ref": ref}}
        functions = {"always": lambda: True, "success": lambda f=failed: not f}
        flag = Expression(gate["env"]["SAVE"].strip("${} "), context, functions).value()
        assert flag == ("--slm-bench-save" if saves else "")
        assert _truthy(Expression(save["if"], context, functions).value()) is saves
    assert "--slm-bench-baseline=last" in gate["run"]


def test_no_step_hides_a_failure(workflow: dict[str, Any]) -> None:
    (job,) = workflow["jobs"].values()
    commands = [step["run"] for step in job["steps"] if "run" in step]
    assert not [c for c in commands if "|| true" in c or "continue-on-error" in c]
    assert not [step for step in job["steps"] if step.get("continue-on-error")]


def test_the_history_step_without_history(workflow: dict[str, Any], tmp_path: Path) -> None:
    """A pull request before main's first run has no history: the step says so and passes."""
    actions = Actions({**workflow, "jobs": {"j": {**workflow["jobs"]["check-model"], "steps": [
        s for s in workflow["jobs"]["check-model"]["steps"] if s.get("name") == "Benchmark history table and plot"
    ]}}}, {}, tmp_path / "store")  # fmt: skip
    (tmp_path / "repo").mkdir()
    run = actions.run(tmp_path / "repo", ref=PULL_REQUEST, run_id=1, inputs={})
    assert run.steps == {"Benchmark history table and plot": "success"}
    assert "No benchmark history yet" in run.summary


def test_cache_key(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_slmdeploy.cli import main
    from pytest_slmdeploy.deploy import tool_versions
    from pytest_slmdeploy.source import fingerprint

    assert main(["fingerprint", str(tiny_model), "--cache-key"]) == 0
    key = capsys.readouterr().out.strip()
    python = "py{}.{}".format(*sys.version_info[:2])
    versions = "-".join(f"{package}_{found}" for package, found in tool_versions().items())
    system = f"{platform.system()}-{platform.machine()}"
    assert key == f"slmdeploy-{fingerprint(tiny_model)}-int4-{versions}-{python}-{system}"
    assert {"olive-ai", "onnxruntime-genai", "onnxruntime"} <= set(tool_versions())
    assert "," not in key  # actions/cache refuses commas
    assert len(key) <= 512  # and longer keys
    assert main(["fingerprint", str(tiny_model), "--cache-key", "--precision", "int8"]) == 0
    assert capsys.readouterr().out.strip() == key.replace("-int4-", "-int8-")
    # Without MODEL: slm_model and slm_precision from the project's pytest configuration, as pytest reads them.
    copy = shutil.copytree(tiny_model, tmp_path / "project" / "weights")
    (tmp_path / "project" / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\nslm_model = "weights"\nslm_precision = "fp32"\n'
    )
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ' , "note": 1}', 1))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path / "project")
        assert main(["fingerprint", "--cache-key"]) == 0
    changed = capsys.readouterr().out.strip()
    assert changed.split("-")[1] == fingerprint(copy) != fingerprint(tiny_model)
    assert "-fp32-" in changed
    assert main(["fingerprint", str(tiny_model), "--precision", "int8"]) == 2
    assert "--precision is part of the --cache-key only" in capsys.readouterr().err


def test_the_docs_show_the_workflows_steps(workflow: dict[str, Any]) -> None:
    """docs/ci.md quotes steps of the workflow: each quoted step is the workflow's, as it is."""
    (job,) = workflow["jobs"].values()
    steps = {step.get("name"): step for step in job["steps"]}
    text = (Path(__file__).parents[1] / "docs" / "ci.md").read_text()
    quoted = [step for block in re.findall(r"```yaml\n(.*?)```", text, re.S) for step in yaml.safe_load(block)]
    assert len(quoted) >= 4
    for step in quoted:
        assert step == steps.get(step["name"]), step["name"]


# -- the matrix recipe: a job per model, then one merge --------------------------------------------------------
MATRIX_WORKFLOW = WORKFLOW.with_name("slm-deploy-matrix.yml")
MATRIX_PYPROJECT = """
[tool.pytest.ini_options]
slm_cache = ".slmdeploy-cache"
slm_bench_history = ".slmdeploy/history"
slm_suite = false
slm_benchmark_rounds = "5"
slm_bench_gate = "decode_tps:-75% ttft_ms:+400% peak_rss_mb:+100%"
slm_models = [
  {name = "shop-faq-int4", path = "model", precision = "int4"},
  {name = "shop-faq-int8", path = "model", precision = "int8"},
]
"""


def _matrix_run(
    workflow: dict[str, Any], caches: dict[str, Path], root: Path, tiny_model: Path, run_id: int,
    before: Callable[[str, str, Path], None] = lambda model, step, project: None,
) -> tuple[dict[str, Run], Run]:  # fmt: skip
    """One workflow run: each matrix job in a fresh checkout, then the merge job with their artifacts."""
    jobs = Actions(workflow, caches, root / "cache-service", job="check-model")
    runs = {}
    for model in workflow["jobs"]["check-model"]["strategy"]["matrix"]["model"]:
        checkout = _checkout(root / f"run{run_id}-{model}", tiny_model, MATRIX_PYPROJECT)
        runs[model] = jobs.run(checkout, ref=MAIN, run_id=run_id, inputs={"working-directory": "app"},
                               matrix={"model": model}, before=functools.partial(before, model))  # fmt: skip
    result = "success" if all("failure" not in run.steps.values() for run in runs.values()) else "failure"
    merge = Actions(workflow, caches, root / "cache-service", job="merge")
    merge.artifacts = jobs.artifacts
    (root / f"run{run_id}-merge").mkdir()
    merged = merge.run(root / f"run{run_id}-merge", ref=MAIN, run_id=run_id, inputs={},
                       needs={"check-model": {"result": result}})  # fmt: skip
    return runs, merged


def test_the_matrix_checks_each_model_in_its_job_and_the_merge_names_a_regression(
    tiny_model: Path, tmp_path: Path
) -> None:
    workflow = yaml.safe_load(MATRIX_WORKFLOW.read_text())
    caches: dict[str, Path] = {}
    gate, merge_step = "Build, install and check", "One summary for every model"

    first, merged = _matrix_run(workflow, caches, tmp_path, tiny_model, 1)
    for model, run in first.items():
        check = run.logs[gate].stdout
        assert run.steps[gate] == "success", check + run.logs[gate].stderr
        assert f"no baseline yet for {model}: this run becomes the baseline" in check
        assert f"{model} [{model[-4:]}]: built in" in check  # its own build, under its own cache key
        assert run.outputs["model"]["key"].split("-")[2] == model[-4:]
        report = json.loads((run.project / "reports" / "checklist.json").read_text())
        assert report["model"]["name"] == model  # --slm-only: this job's model alone, as a one-model run
    assert {key.split("-Linux")[0] for key in caches if key.startswith("slmdeploy-history-")} == {
        "slmdeploy-history-shop-faq-int4", "slmdeploy-history-shop-faq-int8"
    }  # fmt: skip
    assert merged.steps[merge_step] == "success", merged.logs[merge_step].stderr
    assert "## pytest-slmdeploy: 2 models, all passed" in merged.summary
    assert "| shop-faq-int4 | int4 |" in merged.summary
    assert "| shop-faq-int8 | int8 |" in merged.summary

    def regress(model: str, step: str, project: Path) -> None:
        """shop-faq-int8's last main run, as restored, used a quarter of the memory this run's model needs."""
        if model == "shop-faq-int8" and step == gate:
            history = project / ".slmdeploy" / "history" / f"{model}.jsonl"
            last = json.loads(history.read_text().splitlines()[-1])
            last["metrics"]["peak_rss_mb"] /= 4
            with history.open("a") as fh:
                fh.write(json.dumps(dict(last, name="lean", created_at=time.time())) + "\n")

    second, merged = _matrix_run(workflow, caches, tmp_path, tiny_model, 2, before=regress)
    assert second["shop-faq-int4"].steps[gate] == "success", second["shop-faq-int4"].logs[gate].stdout
    check = second["shop-faq-int8"].logs[gate].stdout
    assert second["shop-faq-int8"].steps[gate] == "failure", check
    assert "reused from the cache (no build)" in check
    assert re.search(r"FAILED slmdeploy::benchmark_gates - peak_rss_mb grew [\d.]+%: .*baseline run 'lean'", check)
    assert merged.steps[merge_step] == "failure"
    assert "## pytest-slmdeploy: 2 models, 1 of 2 FAILED (shop-faq-int8)" in merged.summary
    assert "- peak_rss_mb grew" in merged.summary


def test_the_matrix_lists_the_example_projects_models() -> None:
    """The matrix and the example project's slm_models table name the same models."""
    import tomllib

    workflow = yaml.safe_load(MATRIX_WORKFLOW.read_text())
    project = tomllib.loads((WORKFLOW.parents[2] / "pyproject.toml").read_text())
    table = project["tool"]["pytest"]["ini_options"]["slm_models"]
    assert workflow["jobs"]["check-model"]["strategy"]["matrix"]["model"] == [entry["name"] for entry in table]
    assert workflow["jobs"]["merge"]["if"] == "always()"
