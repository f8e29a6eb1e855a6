"""``slmdeploy``: the cache from the shell (build, ls, verify, rm), as ``foundry cache`` does."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pytest_slmdeploy.cache import ModelCache
from pytest_slmdeploy.errors import SettingsError, SlmDeployError
from pytest_slmdeploy.foundry import is_foundry_entry
from pytest_slmdeploy.settings import PRECISIONS, Settings, check_model_name, default_cache_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slmdeploy", description=__doc__)
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache folder (default $SLMDEPLOY_CACHE or ~/.cache/slmdeploy)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="convert, quantize and install a Hugging Face model folder")
    build.add_argument("model", type=Path, help="Hugging Face model folder")
    build.add_argument("--precision", choices=PRECISIONS, default="int4", help="default int4")
    build.add_argument("--name", default=None, help="name in the cache (default <folder>-<precision>)")
    build.add_argument("--rebuild", action="store_true", help="build even if an identical build is installed")
    build.add_argument("--chat-template", default="auto", help="auto (default), chatml, or a .jinja file")
    build.add_argument("--trust-remote-code", action="store_true", help="allow models with their own code")

    commands.add_parser("ls", help="list installed models (like `foundry cache ls`)")
    fingerprint = commands.add_parser("fingerprint", help="print a model folder's content hash (for CI cache keys)")
    fingerprint.add_argument("model", type=Path)
    verify = commands.add_parser("verify", help="re-hash an installed model's files against its manifest")
    verify.add_argument("name")
    remove = commands.add_parser("rm", help="remove an installed model")
    remove.add_argument("name")

    bench = commands.add_parser("bench", help="benchmark history: table, compare, plot")
    bench.add_argument("--history", type=Path, default=Path(".slmdeploy/history"), help="history folder")
    bench.add_argument("--model", default=None, help="model name (default: every model in the history)")
    actions = bench.add_subparsers(dest="action", required=True)
    actions.add_parser("history", help="every run as a Markdown table, with the last change")
    compare = actions.add_parser("compare", help="two runs side by side (default: the last two)")
    compare.add_argument("runs", nargs="*", help="run names (or 'last'), at most two")
    plot = actions.add_parser("plot", help="draw the history as a PNG")
    plot.add_argument("--out", type=Path, default=Path("slmdeploy-history.png"))
    plot.add_argument("--metric", action="append", help="metric to draw (repeatable; default decode_tps, ttft_ms)")
    return parser


def _bench(args: argparse.Namespace) -> int:
    from pytest_slmdeploy import bench

    history = bench.History(args.history)
    records = history.records(args.model)
    if not records:
        print(f"no benchmark history in {args.history}" + (f" for {args.model}" if args.model else ""))
        return 1
    if args.action == "history":
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


def _ls(cache: ModelCache) -> int:
    names = cache.names()
    if not names:
        print(f"no models in {cache.custom_dir}")
        return 0
    print(f"{'NAME':<32} {'PRECISION':<9} {'SIZE':>10} {'x SOURCE':>8}  {'BUILT':<16} FOUNDRY")
    for name in names:
        manifest = cache.read_manifest(name)
        foundry = "yes" if is_foundry_entry(cache.entry_dir(name)) else "no"
        if manifest is None:
            print(f"{name:<32} {'?':<9} {'?':>10} {'?':>8}  {'(no manifest)':<16} {foundry}")
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
    print(f"{name}: DAMAGED: {state.reason}; rebuild (slmdeploy build --rebuild) or remove (slmdeploy rm {name})")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cache_dir = (args.cache or default_cache_dir()).resolve()
    cache = ModelCache(cache_dir)
    try:
        if args.command == "build":
            return _build(args, cache_dir)
        if args.command == "ls":
            return _ls(cache)
        if args.command == "verify":
            return _verify(cache, check_model_name(args.name))
        if args.command == "fingerprint":
            from pytest_slmdeploy.source import fingerprint as content_hash
            from pytest_slmdeploy.source import inspect_source

            print(content_hash(inspect_source(args.model).path))
            return 0
        if args.command == "bench":
            return _bench(args)
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
