"""Settings resolved once from the command line, then ini/pyproject, then defaults."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from pytest_slmdeploy.errors import SettingsError

NO_MODEL = "no model to test: pass --slm-model PATH or set slm_model in [tool.pytest.ini_options]"
# The recipes' names (recipes.RECIPES, checked by a test), and fp16, which the CPU provider refuses with a reason.
PRECISIONS = ("int4", "int4-mixed", "int8", "fp32", "fp16")
AUTO_PRECISION = "auto"  # the precision ladder: the smallest recipe that keeps the source's answers
BACKENDS = ("ort-genai", "foundry")
FOUNDRY_MODES = ("auto", "yes", "no")
SPINNING_MODES = ("auto", "on", "off")
CHAT_TEMPLATE_BUILTINS = ("auto", "chatml")
CACHE_ENV = "SLMDEPLOY_CACHE"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$SLMDEPLOY_CACHE``, else ``$XDG_CACHE_HOME/slmdeploy``, else ``~/.cache/slmdeploy``."""
    env = os.environ if env is None else env
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "slmdeploy"


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity: a container or ``taskset`` may allow fewer than the
    machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def auto_threads(env: Mapping[str, str] | None = None) -> int:
    """The CPUs this process may use, shared out among pytest-xdist workers (at least 1)."""
    env = os.environ if env is None else env
    cpus = len(allowed_cpus())
    workers = int(env.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, cpus // max(1, workers))


def check_model_name(name: str) -> str:
    """Return ``name`` if it is a safe single folder name for ``custom/<name>/``."""
    if not _NAME_RE.match(name) or ".." in name:
        raise SettingsError(
            f"model name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
            "(no path separators or '..', at most 128 characters), e.g. --slm-name my-model-int4"
        )
    return name


def default_model_name(model_path: Path, precision: str) -> str:
    """``<folder name>-<precision>``, reduced to the characters a cache entry may use."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", model_path.resolve().name).strip("-._") or "model"
    return f"{stem.lower()[:100]}-{precision}"


# Checklist limits: ini key suffix -> (default, help). A healthy model passes the defaults; each can
# also be set per test with marker keywords, e.g. @pytest.mark.slm_memory(max_mb_per_1k=5).
LIMITS: dict[str, tuple[float, str]] = {
    "format_min_stop_rate": (
        0.9,
        "share of answers that must end by themselves (finish reason stop), decided on its 95% interval",
    ),
    "format_max_new_tokens": (128, "token limit per answer in the format checks"),
    "memory_generations": (300, "most generations replayed, all kinds of request together (each kind: 5 at least)"),
    "memory_warmup": (20, "generations at the start of the session that are not judged"),
    "memory_seconds": (15, "time budget of the replay in seconds, shared by the kinds of request (past 5 each)"),
    "memory_max_mb_per_1k": (8.0, "allowed RSS growth in MB per 1,000 generations (robust slope)"),
    "memory_max_bytes_per_token": (100.0, "allowed RSS growth per token of a generation (prompt and answer)"),
    "memory_load_cycles": (6, "load/unload cycles in the reload check"),
    "memory_max_load_share": (0.005, "allowed RSS growth per load/unload cycle, as a share of the model's size"),
    "memory_load_slack_mb": (0.5, "absolute slack in MB per load/unload cycle for allocator noise"),
    "lengths_points": (3, "prompt lengths tried, from 16 tokens up to the context"),
    "lengths_max_tokens": (512, "longest prompt tried, in tokens (capped by the context)"),
    "lengths_ttft_tolerance": (1.0, "TTFT may grow up to linear x (1 + this) with prompt length"),
    "lengths_ttft_slack_ms": (20.0, "absolute TTFT slack in ms for timer noise on tiny models"),
    "lengths_decode_band": (0.5, "decode tok/s at any length may fall by at most this share of the shortest prompt's"),
    "lengths_decode_slack_ms": (0.5, "absolute slack in ms per decoded token for timer noise on tiny models"),
    "lengths_new_tokens": (32, "tokens generated per timed round at each length (as the benchmark: rounds are shared)"),
    "lengths_min_rounds": (3, "interleaved timing rounds before a verdict may be taken"),
    "lengths_max_rounds": (20, "most timing rounds; still undecided then means inconclusive"),
    "lengths_seconds": (30, "time budget of the timing rounds in seconds (after the minimum rounds)"),
    "edge_examples": (40, "hypothesis examples of unusual prompts"),
    "fidelity_min_top1_agreement": (0.95, "share of the source's greedy tokens the deployed model also ranks first"),
    "fidelity_max_mean_kld": (0.1, "mean KL divergence from the source's next-token distributions (nats/token)"),
    "fidelity_min_identical": (0.0, "share of answers that must be token for token the source's (0: not gated)"),
    "fidelity_max_new_tokens": (32, "length of the source's reference answers, in tokens"),
    "fidelity_max_prompts": (64, "prompts scored: the domain cases first, then the built-in prompts"),
    "benchmark_rounds": (3, "timed generations per benchmark at least (after warm-up; the length sweep's count)"),
    "benchmark_max_rounds": (20, "most timed generations per benchmark, while a gated figure's spread asks for more"),
    "benchmark_seconds": (20, "time budget in seconds of the rounds past the minimum, per benchmark"),
    "benchmark_warmup": (1, "untimed generations before a benchmark (none when the session ran as long a prompt)"),
    "benchmark_new_tokens": (32, "answer length of a benchmark generation (fixed: the end token is ignored)"),
}


# Ranges that keep a limit meaningful: (lowest, highest, whole number, why). A limit outside its range
# would make its check vacuous (a soak of 0 generations shows no trend) or impossible (a stop rate of 2).
_INF = float("inf")
LIMIT_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "format_min_stop_rate": (0, 1, False, "a share"),
    "format_max_new_tokens": (1, _INF, True, "tokens"),
    "memory_generations": (10, _INF, True, "fewer cannot show a trend"),
    "memory_warmup": (0, _INF, True, "generations"),
    "memory_seconds": (1, _INF, False, "seconds"),
    "memory_load_cycles": (3, _INF, True, "fewer cannot show a trend"),
    "lengths_points": (2, _INF, True, "one length compares nothing"),
    "lengths_max_tokens": (16, _INF, True, "the sweep starts at 16 tokens"),
    "lengths_decode_band": (0, 0.99, False, "a share of the speed"),
    "lengths_new_tokens": (2, _INF, True, "decode speed needs two tokens"),
    "lengths_min_rounds": (3, _INF, True, "fewer rounds cannot show a spread"),
    "lengths_max_rounds": (3, _INF, True, "rounds"),
    "lengths_seconds": (1, _INF, False, "seconds"),
    "edge_examples": (1, _INF, True, "examples"),
    "fidelity_min_top1_agreement": (0, 1, False, "a share"),
    "fidelity_min_identical": (0, 1, False, "a share"),
    "fidelity_max_new_tokens": (1, _INF, True, "tokens"),
    "fidelity_max_prompts": (1, _INF, True, "prompts"),
    "benchmark_rounds": (1, _INF, True, "rounds"),
    "benchmark_max_rounds": (1, _INF, True, "rounds"),
    "benchmark_seconds": (0, _INF, False, "seconds"),
    "benchmark_warmup": (0, _INF, True, "rounds"),
    "benchmark_new_tokens": (2, _INF, True, "decode speed needs two tokens"),
}


def check_limit(key: str, value: float) -> float:
    """``value`` if it is a finite number in the limit's range, else :class:`SettingsError` naming the range."""
    name = f"slm_{key}"
    if not math.isfinite(value):
        raise SettingsError(f"{name} = {value} must be a finite number")
    low, high, whole, why = LIMIT_RANGES.get(key, (0, _INF, False, ""))
    if not low <= value <= high or (whole and value != int(value)):
        kind = "a whole number" if whole else "a number"
        span = f"at least {low:g}" if high == _INF else f"from {low:g} to {high:g}"
        raise SettingsError(f"{name} = {value:g} is out of range: use {kind} {span}" + (f" ({why})" if why else ""))
    return value


@dataclass(frozen=True)
class Settings:
    """Everything the stages need to know, resolved and checked."""

    model: Path | None
    precision: str = "int4"
    cache_dir: Path = Path("~/.cache/slmdeploy")
    name: str | None = None
    rebuild: bool = False
    backend: str = "ort-genai"
    foundry: str = "auto"
    chat_template: str = "auto"
    trust_remote_code: bool = False
    lock_timeout: float = 1800.0
    threads: int = field(default_factory=auto_threads)  # ONNX Runtime GenAI intra-op threads (0: its own default)
    spinning: str = "auto"  # ONNX Runtime's intra-op spinning: auto (off on a busy machine), on, off
    suite: bool = True
    fail_inconclusive: bool = False
    report: Path | None = None
    bench_history: Path | None = None
    bench_save: bool = False
    bench_name: str = ""
    bench_baseline: str | None = None
    bench_gates: tuple[str, ...] = ()
    bench_export: Path | None = None
    limits: Mapping[str, float] = field(default_factory=lambda: {k: v for k, (v, _) in LIMITS.items()})
    case_files: tuple[Path, ...] = ()  # this model's own domain case files (an slm_models entry's ``cases``)

    @property
    def enabled(self) -> bool:
        return self.model is not None

    @property
    def model_name(self) -> str:
        assert self.model is not None
        return self.name or default_model_name(self.model, self.precision)


def _as_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{key} = {value!r} is not a boolean: use true or false")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise SettingsError(f"{key} = {value!r} is not one of {', '.join(choices)}")
    return value


def ini_path(value: object, ini_dir: Path) -> Path:
    """A path from an ini file: relative ones are relative to the file's folder."""
    candidate = Path(str(value)).expanduser()
    return candidate if candidate.is_absolute() else ini_dir / candidate


def resolve_settings(
    get: Callable[[str], object | None],
    *,
    ini_dir: Path,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Build :class:`Settings` from ``get(key)``, which answers CLI-or-ini per ini key.

    Relative paths from ini files are taken relative to ``ini_dir``; the caller
    resolves command-line paths against the invocation directory before this.
    """

    def text(key: str, default: str) -> str:
        value = get(key)
        return default if value in (None, "") else str(value).strip()

    def path(key: str) -> Path | None:
        value = get(key)
        return None if value in (None, "") else ini_path(value, ini_dir)

    for key in ("slm_model", "slm_cache", "slm_report", "slm_bench_history", "slm_bench_export"):
        if get(key) is not None and not str(get(key)).strip():  # "" on the command line: never the current folder
            raise SettingsError(f"{key} is empty: give a path, or leave the option out for the default")
    model = path("slm_model")
    precision = _choice("slm_precision", text("slm_precision", "int4").lower(), (*PRECISIONS, AUTO_PRECISION))
    name_value = get("slm_name")
    name = check_model_name(str(name_value).strip()) if name_value is not None else None
    timeout_text = text("slm_lock_timeout", "1800")
    try:
        lock_timeout = float(timeout_text)
    except ValueError:
        raise SettingsError(f"slm_lock_timeout = {timeout_text!r} is not a number of seconds") from None
    if not math.isfinite(lock_timeout) or lock_timeout < 0:
        raise SettingsError(f"slm_lock_timeout = {timeout_text} must be a finite number of seconds, 0 or more")
    threads = resolve_threads(get("slm_threads"), env)
    chat_template = text("slm_chat_template", "auto")
    if chat_template not in CHAT_TEMPLATE_BUILTINS:
        template_path = path("slm_chat_template")
        assert template_path is not None
        chat_template = str(template_path)
    return Settings(
        model=model,
        precision=precision,
        cache_dir=path("slm_cache") or default_cache_dir(env),
        name=name,
        rebuild=_as_bool("slm_rebuild", get("slm_rebuild") or False),
        backend=_choice("slm_backend", text("slm_backend", "ort-genai").lower(), BACKENDS),
        foundry=_choice("slm_foundry", text("slm_foundry", "auto").lower(), FOUNDRY_MODES),
        chat_template=chat_template,
        trust_remote_code=_as_bool("slm_trust_remote_code", get("slm_trust_remote_code") or False),
        lock_timeout=lock_timeout,
        threads=threads,
        spinning=_choice("slm_spinning", text("slm_spinning", "auto").lower(), SPINNING_MODES),
        suite=_as_bool("slm_suite", True if get("slm_suite") is None else get("slm_suite")),
        fail_inconclusive=_as_bool("slm_fail_inconclusive", get("slm_fail_inconclusive") or False),
        report=path("slm_report"),
        bench_history=path("slm_bench_history") or ini_dir / ".slmdeploy" / "history",
        bench_save=_as_bool("slm_bench_save", get("slm_bench_save") or False),
        bench_name=text("slm_bench_name", ""),
        bench_baseline=text("slm_bench_baseline", "") or None,
        bench_gates=tuple(_gates(get("slm_bench_gate"))),
        bench_export=path("slm_bench_export"),
        limits=resolve_limits(get),
    )


def resolve_limits(get: Callable[[str], object | None]) -> dict[str, float]:
    """The checklist limits from ``get("slm_<key>")`` (ini or command line), checked, with defaults."""
    limits = {
        key: check_limit(key, _number(f"slm_{key}", get(f"slm_{key}"), default)) for key, (default, _) in LIMITS.items()
    }
    if limits["lengths_max_rounds"] < limits["lengths_min_rounds"]:
        raise SettingsError(
            f"slm_lengths_max_rounds = {limits['lengths_max_rounds']:g} is below slm_lengths_min_rounds = "
            f"{limits['lengths_min_rounds']:g}: raise it or lower the minimum"
        )
    return limits


def resolve_threads(value: object | None, env: Mapping[str, str] | None = None) -> int:
    """``slm_threads``: ``auto`` (or unset) is the CPUs this process may use, shared among pytest-xdist
    workers; else a whole number (0: ONNX Runtime GenAI's own default)."""
    value = "auto" if value in (None, "") else str(value).strip()
    if value.lower() == "auto":
        return auto_threads(env)
    if not value.isdigit():
        raise SettingsError(f"slm_threads = {value!r} is not auto or a whole number (0: ONNX Runtime GenAI's default)")
    return int(value)


def _gates(value: object | None) -> list[str]:
    """Gates from repeated options (a list) or an ini value (whitespace separated)."""
    if value in (None, "", []):
        return []
    items = value if isinstance(value, list) else str(value).split()
    return [str(item) for item in items]


def _number(key: str, value: object | None, default: float) -> float:
    if value in (None, ""):
        return default
    try:
        number = float(str(value))
    except ValueError:
        raise SettingsError(f"{key} = {value!r} is not a number") from None
    if number < 0:
        raise SettingsError(f"{key} = {number:g} must be 0 or more")
    return number


# An ``slm_models`` entry's keys; ``path`` is the only one required.
LADDER_RUNGS = ("int4", "int4-mixed", "int8", "fp32")  # recipes.LADDER (this module imports no stage)
MODEL_ENTRY_KEYS = ("name", "path", "precision", "chat_template", "cases", "limits")


def resolve_models(
    get: Callable[[str], object | None],
    *,
    ini_dir: Path,
    cli_models: list[str] | None = None,
    only: list[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> list[Settings]:
    """The run's models, each with its own :class:`Settings`: one ``slm_model`` (today's run), a repeated
    ``--slm-model`` (``cli_models``, made absolute by the caller), or the ``slm_models`` table.

    The table is a list of entries (TOML inline tables in ``[tool.pytest.ini_options]``, or lines of
    ``key=value`` words in an ini file) with the keys of :data:`MODEL_ENTRY_KEYS`. One ``--slm-model PATH``
    runs the table's entries for that folder (all of them, with their names, precisions and limits), or PATH
    alone when no entry has it, as the command line overrides the ini."""
    entries = _entries(get("slm_models"))
    if entries and get("slm_model") not in (None, ""):
        raise SettingsError("slm_model and slm_models are both set: keep one (slm_models names several models)")
    where = [f"slm_models entry {i} ({entry.get('name') or entry.get('path') or 'no path'})"
             for i, entry in enumerate(entries, 1)]  # fmt: skip
    if entries and cli_models and len(cli_models) > 1:
        given = " ".join(f"--slm-model {m}" for m in cli_models)
        raise SettingsError(
            f"{given} and the slm_models table ({len(entries)} entr{'y' if len(entries) == 1 else 'ies'}) both "
            "name the run's models: keep one of them (-k NAME runs one model of the table)"
        )
    if entries and cli_models:
        folder = Path(cli_models[0]).resolve()
        chosen = [i for i, entry in enumerate(entries) if _entry_path(entry, ini_dir) == folder]
        entries, where = [entries[i] for i in chosen], [where[i] for i in chosen]
    if entries:
        cli_models = None  # the table's entries for the folder the command line named
    several_cli = cli_models is not None and len(cli_models) > 1
    first = cli_models[0] if cli_models and not several_cli else None
    if not entries and first is not None and "=" in first and not Path(first).is_absolute():  # one NAME=PATH
        entries, where, cli_models = [_named(first)], [f"--slm-model {first}"], None
    if not entries and not several_cli:
        single = resolve_settings(lambda key: first if key == "slm_model" and first is not None else get(key),
                                  ini_dir=ini_dir, env=env)  # fmt: skip
        if only and (not single.enabled or single.model_name not in only):
            found = single.model_name if single.enabled else "none"
            raise SettingsError(f"--slm-only {only[0]}: no such model in this run ({found})")
        return [single]
    if (len(entries) > 1 or several_cli) and get("slm_name") is not None:
        raise SettingsError("slm_name names one model: with several, name each in the slm_models table")
    base = resolve_settings(lambda key: None if key == "slm_model" else get(key), ini_dir=ini_dir, env=env)
    if several_cli:
        assert cli_models is not None
        entries = [_named(model) for model in cli_models]
        where = [f"--slm-model {model}" for model in cli_models]
    models = [_entry_settings(base, entry, label, ini_dir) for entry, label in zip(entries, where, strict=True)]
    seen: dict[str, str] = {}
    for settings, label in zip(models, where, strict=True):
        # The precision ladder installs each rung as <name>-<precision>: those names are taken too.
        rungs = [f"{settings.model_name}-{p}" for p in LADDER_RUNGS] if settings.precision == AUTO_PRECISION else []
        for name in (settings.model_name, *rungs):
            if name in seen:
                raise SettingsError(
                    f"{label} and {seen[name]} are both named {name!r}: give each its own name "
                    "(slm_models name = ..., or --slm-model NAME=PATH)"
                )
            seen[name] = label
    if only:
        names = [m.model_name for m in models]
        unknown = [name for name in only if name not in names]
        if unknown:
            raise SettingsError(f"--slm-only {unknown[0]}: no such model in this run ({', '.join(names)})")
        models = [m for m in models if m.model_name in only]
    return models


def _named(value: str) -> dict[str, object]:
    """A command-line model: ``PATH`` or ``NAME=PATH`` (the caller made the path absolute)."""
    name, sep, path = value.partition("=")
    if sep and not Path(value).is_absolute():
        return {"name": name, "path": path}
    return {"path": value}


def _entry_path(entry: dict[str, object], ini_dir: Path) -> Path | None:
    raw = entry.get("path")
    if not isinstance(raw, str) or not raw.strip():
        return None
    return ini_path(raw, ini_dir).resolve()


def _entries(table: object | None) -> list[dict[str, object]]:
    """``slm_models`` as a list of dicts: TOML tables as they are, ini lines ``key=value ...`` split."""
    if table in (None, "", []):
        return []
    items = table if isinstance(table, list) else [line for line in str(table).splitlines() if line.strip()]
    entries: list[dict[str, object]] = []
    for i, item in enumerate(items, 1):
        if isinstance(item, dict):
            entries.append(dict(item))
            continue
        entry: dict[str, object] = {}
        for word in str(item).split():
            key, sep, value = word.partition("=")
            if not sep:
                raise SettingsError(f"slm_models entry {i} ({item}): {word!r} is not key=value")
            entry[key] = value.split(",") if key == "cases" else value
        entries.append(entry)
    return entries


def _entry_settings(base: Settings, entry: dict[str, object], label: str, ini_dir: Path) -> Settings:
    """One model's settings: the run's, with the entry's path, name, precision, template, cases and limits."""
    unknown = [key for key in entry if key not in MODEL_ENTRY_KEYS]
    if unknown:
        raise SettingsError(f"{label}: unknown key {unknown[0]!r} (known: {', '.join(MODEL_ENTRY_KEYS)})")
    raw_path = entry.get("path")
    if raw_path in (None, "") or not str(raw_path).strip():
        raise SettingsError(f'{label}: no path: give the model folder, e.g. path = "models/faq"')

    try:
        precision = _choice("precision", str(entry.get("precision", base.precision)).lower(),
                            (*PRECISIONS, AUTO_PRECISION))  # fmt: skip
        name = check_model_name(str(entry["name"]).strip()) if "name" in entry else None
        limits = dict(base.limits)
        given = entry.get("limits") or {}
        if not isinstance(given, dict):
            raise SettingsError("limits must be a table of checklist limits, e.g. {fidelity_max_mean_kld = 0.05}")
        for key, value in given.items():
            limit = str(key).removeprefix("slm_")
            if limit not in LIMITS:
                raise SettingsError(f"unknown limit {key!r} (the slm_* checklist limits, e.g. fidelity_max_mean_kld)")
            limits[limit] = check_limit(limit, _number(f"slm_{limit}", value, 0.0))
        cases = entry.get("cases") or []
        case_list = [cases] if isinstance(cases, str) else list(cases) if isinstance(cases, list) else None
        if case_list is None:
            raise SettingsError("cases must be a case file or a list of them")
        template = str(entry.get("chat_template", base.chat_template))
    except SettingsError as exc:
        raise SettingsError(f"{label}: {exc}") from None
    if template not in CHAT_TEMPLATE_BUILTINS:
        template = str(ini_path(template, ini_dir))
    return replace(
        base,
        model=ini_path(raw_path, ini_dir),
        precision=precision,
        name=name,
        chat_template=template,
        limits=limits,
        case_files=tuple(ini_path(c, ini_dir) for c in case_list),
    )
