"""``slmdeploy``: the cache from the shell (build, ls, verify, rm), as ``foundry cache`` does."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pytest_slmdeploy.cache import ModelCache
from pytest_slmdeploy.errors import SlmDeployError
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
    verify = commands.add_parser("verify", help="re-hash an installed model's files against its manifest")
    verify.add_argument("name")
    remove = commands.add_parser("rm", help="remove an installed model")
    remove.add_argument("name")
    return parser


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
