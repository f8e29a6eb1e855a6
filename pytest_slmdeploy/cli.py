"""``slmdeploy``: the cache from the shell (build, ladder, ls, verify, rm), as ``foundry cache`` does."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pytest_slmdeploy.cache import ManifestError, ModelCache
from pytest_slmdeploy.errors import SettingsError, SlmDeployError
from pytest_slmdeploy.foundry import is_foundry_entry
from pytest_slmdeploy.settings import (
    AUTO_PRECISION,
    PRECISIONS,
    Settings,
    check_model_name,
    default_cache_dir,
    ini_path,
)

DESCRIPTION = (
    "Manage the slmdeploy model cache from the shell, as 'foundry cache' does for Foundry Local: "
    "build a Hugging Face model folder into it, list, verify and remove installed models, "
    "and read the benchmark history that pytest runs recorded."
)
EPILOG = (
    "Where the cache is: --cache DIR, else slm_cache from the pytest configuration that pytest would read here "
    "(the nearest pyproject.toml with [tool.pytest.ini_options], pytest.ini, tox.ini or setup.cfg, from the "
    "current folder upward; relative paths are relative to that file), else $SLMDEPLOY_CACHE, else "
    "~/.cache/slmdeploy. 'slmdeploy bench' reads slm_bench_history the same way. "
    "Options can come before or after the command; 'slmdeploy COMMAND --help' lists a command's options."
)
PLOT_NEEDS_MATPLOTLIB = "slmdeploy bench plot needs matplotlib: pip install 'pytest-slmdeploy[plot]'"
# pytest's own order: the first of these in the nearest folder that holds a pytest configuration wins.
_CONFIG_FILES = ("pytest.toml", ".pytest.toml", "pytest.ini", ".pytest.ini", "pyproject.toml", "tox.ini", "setup.cfg")


@dataclass(frozen=True)
class ProjectConfig:
    """The configuration file pytest would read when run in a folder (``path`` None: none), and its values."""

    path: Path | None = None
    values: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def find(cls, start: Path) -> ProjectConfig:
        """Walk from ``start`` upward as pytest does; a pyproject.toml without pytest settings is the fallback."""
        fallback: Path | None = None
        for folder in (start, *start.parents):
            for name in _CONFIG_FILES:
                path = folder / name
                if not path.is_file():
                    continue
                values = _read_config(path)
                if values is not None:
                    return cls(path, values)
                if name == "pyproject.toml" and fallback is None:
                    fallback = path
        return cls(fallback)

    def path_value(self, key: str) -> Path | None:
        """``key`` as a path; a relative one is relative to the configuration file's folder."""
        value = self.values.get(key)
        if value in (None, "") or self.path is None:
            return None
        return ini_path(value, self.path.parent)

    def cache_dir(self, given: Path | None) -> Path:
        """--cache, else ``slm_cache``, else $SLMDEPLOY_CACHE or the default."""
        if given is not None:
            return given.expanduser().resolve()
        return (self.path_value("slm_cache") or default_cache_dir()).resolve()

    def history_dir(self, given: Path | None) -> Path:
        """--history, else ``slm_bench_history``, else ``.slmdeploy/history`` beside the file (as the plugin)."""
        if given is not None:
            return given.expanduser().resolve()
        folder = self.path.parent if self.path else Path.cwd()
        return (self.path_value("slm_bench_history") or folder / ".slmdeploy" / "history").resolve()


def _read_config(path: Path) -> dict[str, object] | None:
    """The pytest settings in ``path``, or None when the file holds none (pytest then looks further)."""
    if path.suffix == ".toml":
        import tomllib

        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{path} is not valid TOML: {exc}") from None
        if path.name != "pyproject.toml":
            table = document.get("pytest", {})
            return dict(table) if isinstance(table, dict) else {}
        tool = document.get("tool", {}).get("pytest")
        if not isinstance(tool, dict):
            return None
        native = {key: value for key, value in tool.items() if key != "ini_options"}
        return native or dict(tool.get("ini_options", {}))
    import iniconfig  # pytest's own ini parser, so values read as pytest reads them

    try:
        parsed = iniconfig.IniConfig(str(path))
    except iniconfig.ParseError as exc:
        raise SettingsError(f"{path}: {exc}") from None
    section = "tool:pytest" if path.name == "setup.cfg" else "pytest"
    if section in parsed:
        return dict(parsed[section].items())
    return {} if path.name in ("pytest.ini", ".pytest.ini") else None


def _parser() -> argparse.ArgumentParser:
    # Each shared option is on the top-level parser and again on every subcommand that uses it, so it may
    # come before or after the command. SUPPRESS keeps a subcommand's unset copy from overwriting the other.
    cache_help = "cache folder (default: slm_cache from the pytest configuration, $SLMDEPLOY_CACHE, ~/.cache/slmdeploy)"
    history_help = "benchmark history folder (default: slm_bench_history, else .slmdeploy/history)"

    def cache(default: object) -> argparse.ArgumentParser:
        parent = argparse.ArgumentParser(add_help=False)
        parent.add_argument("--cache", type=Path, default=default, metavar="DIR", help=cache_help)
        return parent

    def history(default: object) -> argparse.ArgumentParser:
        parent = argparse.ArgumentParser(add_help=False)
        parent.add_argument("--history", type=Path, default=default, metavar="DIR", help=history_help)
        parent.add_argument("--model", default=default, metavar="NAME", help="model in the history (default: all)")
        return parent

    def command(
        group: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        text: str,
        parents: Sequence[argparse.ArgumentParser] = (),
    ) -> argparse.ArgumentParser:
        return group.add_parser(name, parents=list(parents), help=text, description=text)

    parser = argparse.ArgumentParser(prog="slmdeploy", description=DESCRIPTION, epilog=EPILOG, parents=[cache(None)])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    on_cache = [cache(argparse.SUPPRESS)]

    build = command(commands, "build", "convert, quantize and install a Hugging Face model folder", on_cache)
    build.add_argument("model", type=Path, help="Hugging Face model folder (config.json, tokenizer, safetensors)")
    build.add_argument("--precision", choices=PRECISIONS, default="int4", help="weight precision (default int4)")
    build.add_argument("--name", default=None, help="name in the cache (default <folder>-<precision>)")
    build.add_argument("--rebuild", action="store_true", help="build even if an identical build is installed")
    build.add_argument(
        "--chat-template", default="auto", help="auto (the model's own, default), chatml, or a .jinja file"
    )
    build.add_argument("--trust-remote-code", action="store_true", help="allow models with their own code")

    ladder = command(
        commands,
        "ladder",
        "the precision ladder: build int4, int8, fp32 in turn, judge each against the source model (fidelity and "
        "domain cases) and choose the first that passes; prints the table of size, speed, memory and fidelity",
        on_cache,
    )
    ladder.add_argument("model", type=Path, help="Hugging Face model folder (config.json, tokenizer, safetensors)")
    ladder.add_argument("--json", type=Path, metavar="FILE", help="write the ladder as JSON: {chosen, rungs: [...]}")
    ladder.add_argument("--all", action="store_true", help="measure every rung, not only up to the first that passes")
    ladder.add_argument(
        "--cases",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a domain case file (repeatable; default: the model folder's own slm_cases.yaml/yml/toml)",
    )
    ladder.add_argument("--no-speed", action="store_true", help="do not measure decode tok/s, TTFT and peak RSS")
    ladder.add_argument("--name", default=None, help="name in the cache (default <folder>); rungs add -<precision>")
    ladder.add_argument(
        "--chat-template", default="auto", help="auto (the model's own, default), chatml, or a .jinja file"
    )
    ladder.add_argument("--trust-remote-code", action="store_true", help="allow models with their own code")

    command(commands, "ls", "list installed models (like 'foundry cache ls')", on_cache)
    fingerprint = command(
        commands, "fingerprint", "print a model folder's content hash, or with --cache-key a CI cache key for its build"
    )
    fingerprint.add_argument(
        "model",
        type=Path,
        nargs="?",
        help="Hugging Face model folder (default: slm_model from the pytest configuration)",
    )
    fingerprint.add_argument(
        "--cache-key",
        action="store_true",
        help="print a cache key for the built model instead: the content hash, the precision, the versions of the "
        "packages that shape the build (olive-ai, onnxruntime-genai, onnxruntime, transformers, torch, "
        "pytest-slmdeploy), the Python version and the OS/architecture",
    )
    fingerprint.add_argument(
        "--name",
        help="a model of the slm_models table, by name: its folder and precision (a table of several needs it)",
    )
    fingerprint.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="precision in the cache key (default: slm_precision from the pytest configuration, else int4)",
    )
    report = command(commands, "report", "the checklist reports of pytest runs (--slm-report files)")
    report_actions = report.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    merge = command(
        report_actions,
        "merge",
        "one Markdown summary of several reports (e.g. a CI matrix's jobs, a model each); exit 1 if any model "
        "failed, 2 if a report is missing or unreadable",
    )
    merge.add_argument("reports", type=Path, nargs="+", metavar="FILE", help="--slm-report JSON files")
    verify = command(commands, "verify", "re-hash an installed model's files against its manifest", on_cache)
    verify.add_argument("name", help="installed model name (see slmdeploy ls)")
    remove = command(commands, "rm", "remove an installed model", on_cache)
    remove.add_argument("name", help="installed model name (see slmdeploy ls)")

    bench = command(commands, "bench", "benchmark history: table, compare, plot", [history(None)])
    actions = bench.add_subparsers(dest="action", required=True, metavar="ACTION", title="actions")
    on_history = [history(argparse.SUPPRESS)]
    command(actions, "history", "every run as a Markdown table, with the last change", on_history)
    compare = command(actions, "compare", "two runs side by side (default: the last two)", on_history)
    compare.add_argument("runs", nargs="*", help="run names (or 'last'), at most two")
    plot = command(actions, "plot", "draw the history as a PNG (needs the plot extra: matplotlib)", on_history)
    plot.add_argument(
        "--out", type=Path, default=Path("slmdeploy-history.png"), help="PNG file (default slmdeploy-history.png)"
    )
    plot.add_argument("--metric", action="append", help="metric to draw (repeatable; default decode_tps, ttft_ms)")
    return parser


def _bench(args: argparse.Namespace) -> int:
    from pytest_slmdeploy import bench

    if args.action == "plot" and importlib.util.find_spec("matplotlib") is None:
        print(PLOT_NEEDS_MATPLOTLIB, file=sys.stderr)
        return 2

    history = bench.History(args.history)
    records = history.records(args.model)
    if not records:
        print(f"no benchmark history in {args.history}" + (f" for {args.model}" if args.model else ""))
        return 1
    models = sorted({record.model for record in records})
    if args.action == "history" and len(models) > 1:  # several models: a table each, each against its own last run
        for model in models:
            print(f"#### {model}\n\n{bench.markdown_table([r for r in records if r.model == model])}")
    elif args.action == "history":
        print(bench.markdown_table(records), end="")
    elif args.action == "compare":
        if len(args.runs) > 2:
            raise SettingsError("slmdeploy bench compare takes at most two runs")
        if args.runs:
            found = [history.baseline(records[-1].model, run) for run in args.runs]
            missing = [run for run, record in zip(args.runs, found, strict=True) if record is None]
            if missing:
                raise SettingsError(f"no run named {', '.join(missing)} in {args.history}")
            chosen = [r for r in found if r is not None]
        else:
            chosen = records[-2:]
        print(bench.markdown_table(chosen), end="")
    else:
        metrics = args.metric or ["decode_tps", "ttft_ms"]
        unknown = [m for m in metrics if m not in bench.METRICS]
        if unknown:
            raise SettingsError(f"unknown metric {unknown[0]!r}: use {', '.join(bench.METRICS)}")
        print(bench.plot_history(records, metrics, args.out))
    return 0


def _build(args: argparse.Namespace, cache_dir: Path) -> int:
    from pytest_slmdeploy.deploy import deploy, prepare

    settings = Settings(
        model=args.model.resolve(),
        precision=args.precision,
        cache_dir=cache_dir,
        name=check_model_name(args.name) if args.name else None,
        rebuild=args.rebuild,
        chat_template=args.chat_template,
        trust_remote_code=args.trust_remote_code,
    )
    deployment = deploy(prepare(settings), progress=lambda message: print(f"slmdeploy: {message}", file=sys.stderr))
    how = "reused (already installed)" if deployment.cache_hit else f"built in {deployment.manifest.build_seconds:.1f}s"
    print(f"{deployment.name}: {how} -> {deployment.entry_dir}")
    return 0


def _ladder(args: argparse.Namespace, cache_dir: Path, config: ProjectConfig) -> int:
    import json

    from pytest_slmdeploy.checklist.cases import load_case_file
    from pytest_slmdeploy.checklist.format import GENERIC_PROMPTS
    from pytest_slmdeploy.fidelity import prompt_set
    from pytest_slmdeploy.items import model_case_files
    from pytest_slmdeploy.ladder import run_ladder
    from pytest_slmdeploy.settings import resolve_limits, resolve_threads

    model = args.model.resolve()
    settings = Settings(
        model=model,
        cache_dir=cache_dir,
        threads=resolve_threads(config.values.get("slm_threads")),  # as a pytest run here would use
        name=check_model_name(args.name) if args.name else None,
        chat_template=args.chat_template,
        trust_remote_code=args.trust_remote_code,
    )
    limits = resolve_limits(config.values.get)  # the slm_fidelity_* limits a pytest run here would use
    case_files = args.cases or model_case_files(model)
    cases = [case for path in case_files for case in load_case_file(path)]
    prompts = prompt_set([c.messages for c in cases], GENERIC_PROMPTS, limit=int(limits["fidelity_max_prompts"]))
    ladder, _ = run_ladder(
        settings,
        prompts=prompts,
        limits=limits,
        cases=cases,
        measure_speed=not args.no_speed,
        every_rung=args.all,
        progress=lambda message: print(f"slmdeploy: {message}", file=sys.stderr),
    )
    print("\n".join(ladder.table()))
    for rung in ladder.rungs:
        if not rung.passed:
            print(f"{rung.precision} rejected: {'; '.join(rung.reasons)}")
    print(f"chosen: {ladder.chosen or 'none (no precision passed)'}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(ladder.to_json(), indent=2) + "\n")
    return 0 if ladder.chosen else 1


def _ls(cache: ModelCache) -> int:
    names = cache.names()
    if not names:
        print(f"no models in {cache.custom_dir}")
        return 0
    print(f"{'NAME':<32} {'PRECISION':<9} {'SIZE':>10} {'x SOURCE':>8}  {'BUILT':<16} FOUNDRY")
    for name in names:
        foundry = "yes" if is_foundry_entry(cache.custom_dir / name) else "no"
        try:
            manifest = cache.load_manifest(name)
        except (ManifestError, SettingsError) as exc:  # one line per entry, whatever is wrong with it
            print(f"{name:<32} {'?':<9} {'?':>10} {'?':>8}  {'?':<16} {foundry:<7}  not usable: {exc}")
            continue
        built = time.strftime("%Y-%m-%d %H:%M", time.localtime(manifest.created_at))
        size = f"{manifest.model_bytes / 1e6:.1f} MB"
        print(f"{name:<32} {manifest.precision:<9} {size:>10} {manifest.size_ratio:>8.2f}  {built:<16} {foundry}")
    return 0


def _verify(cache: ModelCache, name: str) -> int:
    state = cache.check(name, deep=True)
    if state.usable:
        print(f"{name}: ok ({len(state.manifest.files) if state.manifest else 0} files match the manifest)")
        return 0
    if not state.installed:
        print(f"{name}: not installed in {cache.custom_dir} (slmdeploy ls lists what is)")
        return 1
    print(f"{name}: DAMAGED: {state.reason}; rebuild (slmdeploy build --rebuild) or remove (slmdeploy rm {name})")
    return 1


def cache_key(fingerprint: str, precision: str) -> str:
    """A CI cache key that changes whenever the build could: model content, precision, tool versions, platform.

    It holds every version the plugin's own build key holds, so an exact cache hit is a build the plugin reuses
    (a stale hit would be rebuilt on every run and, being an exact hit, never saved again).
    """
    from pytest_slmdeploy.deploy import tool_versions

    versions = [f"{package}_{found}" for package, found in tool_versions().items()]
    python = "py{}.{}".format(*sys.version_info[:2])
    return "-".join(["slmdeploy", fingerprint, precision, *versions, python, platform.system(), platform.machine()])


def _fingerprint(args: argparse.Namespace, config: ProjectConfig) -> int:
    from pytest_slmdeploy.source import fingerprint as content_hash
    from pytest_slmdeploy.source import inspect_source

    if args.precision and not args.cache_key:
        raise SettingsError("--precision is part of the --cache-key only: add --cache-key")
    if args.model is not None and args.name is not None:
        raise SettingsError("give MODEL or --name NAME, not both")
    if args.model is not None:
        configured = [(args.model, str(config.values.get("slm_precision") or "int4"))]
    else:
        configured = [(m.model, m.precision) for m in _configured_models(config, args.name)]
    if not configured or configured[0][0] is None:
        raise SettingsError("no model folder: pass MODEL, or set slm_model in the pytest configuration")
    keys = []
    for model, default in configured:
        assert model is not None
        digest = content_hash(inspect_source(model).path)
        if not args.cache_key:
            print(digest)
            continue
        precision = args.precision or default.strip().lower()
        if precision not in (*PRECISIONS, AUTO_PRECISION):  # auto: the key of a cache that holds the ladder's rungs
            raise SettingsError(f"slm_precision = {precision!r} is not one of {', '.join(PRECISIONS)}, auto")
        keys.append((digest, precision))
    if not keys:
        return 0
    if len(keys) == 1:
        print(cache_key(*keys[0]))
    else:  # one cache for the builds of every model in the table (a job that checks them all)
        import hashlib

        combined = hashlib.sha256(" ".join(f"{d}:{p}" for d, p in keys).encode()).hexdigest()
        print(cache_key(combined, f"{len(keys)}models"))
    return 0


def _configured_models(config: ProjectConfig, name: str | None) -> list[Settings]:
    """The models the pytest configuration names: ``slm_model``, the ``slm_models`` table, or its entry
    called ``name``."""
    from pytest_slmdeploy.settings import resolve_models

    folder = config.path.parent if config.path is not None else Path.cwd()
    models = resolve_models(config.values.get, ini_dir=folder)
    if name is None:
        return models
    found = [m for m in models if m.enabled and m.model_name == name]
    if not found:
        names = ", ".join(m.model_name for m in models if m.enabled)
        raise SettingsError(f"no model named {name!r} in the pytest configuration" + (f" ({names})" if names else ""))
    return found


def _report(args: argparse.Namespace) -> int:
    import json

    from pytest_slmdeploy.report import reports_in, write_runs_markdown

    reports = []
    for path in args.reports:
        try:
            reports += reports_in(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SettingsError(f"{path}: not a --slm-report file ({exc})") from None
    print(write_runs_markdown(reports), end="")
    return 0 if all(r.ok for r in reports) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = ProjectConfig.find(Path.cwd())
        if args.command == "bench":
            args.history = config.history_dir(args.history)
            return _bench(args)
        if args.command == "report":
            return _report(args)
        cache_dir = config.cache_dir(args.cache)
        cache = ModelCache(cache_dir)
        if args.command == "build":
            return _build(args, cache_dir)
        if args.command == "ladder":
            return _ladder(args, cache_dir, config)
        if args.command == "ls":
            return _ls(cache)
        if args.command == "verify":
            return _verify(cache, check_model_name(args.name))
        if args.command == "fingerprint":
            return _fingerprint(args, config)
        if args.command == "rm":
            removed = cache.remove(check_model_name(args.name))
            print(f"{args.name}: {'removed' if removed else 'not installed'}")
            return 0 if removed else 1
    except SlmDeployError as exc:
        print(f"slmdeploy: error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.command)  # argparse allows only the commands above


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
