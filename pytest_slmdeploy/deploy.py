"""The model's whole path as one call: source -> build -> cache (-> foundry).

``plugin.py`` and ``cli.py`` both call :func:`deploy`; neither knows the stages.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pytest_slmdeploy import build, template
from pytest_slmdeploy.cache import INFERENCE_MODEL_NAME, EntryState, Manifest, ModelCache, record_files
from pytest_slmdeploy.errors import SourceError
from pytest_slmdeploy.foundry import inference_model_json
from pytest_slmdeploy.measure import Stopwatch
from pytest_slmdeploy.runtime.probe import check_loads
from pytest_slmdeploy.settings import Settings
from pytest_slmdeploy.source import SourceModel, check_tokenizer, check_weights_match, fingerprint, inspect_source

Progress = Callable[[str], None]
RecipeHook = Callable[[dict[str, Any]], dict[str, Any]]
TOOL_PACKAGES = ("olive-ai", "onnxruntime-genai", "onnxruntime", "transformers", "torch", "pytest-slmdeploy")
BUILD_SCHEMA = 2  # 2: recipes (recipes.py) through onnxruntime-genai 0.18's builder


def tool_versions() -> dict[str, str]:
    """Versions that shape the built model, read from metadata (no imports)."""
    found = {}
    for package in TOOL_PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "missing"
    return found


@dataclass(frozen=True)
class Deployment:
    """A model built (or found built) and installed in the cache."""

    name: str
    entry_dir: Path
    manifest: Manifest
    cache_hit: bool
    stage_seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def precision(self) -> str:
        return self.manifest.precision


def resolve_chat_template(source: SourceModel, choice: str) -> str:
    """The model's own template, or the one the user chose explicitly (``chatml`` or a file)."""
    if choice == "auto":
        if source.chat_template is None:
            raise SourceError(
                f"{source.path} has no chat template (chat_template.jinja or tokenizer_config.json "
                "chat_template), so the prompt format cannot be derived; add one, or pass "
                "--slm-chat-template chatml or --slm-chat-template path/to/template.jinja"
            )
        return source.chat_template
    if choice == "chatml":
        return template.CHATML_TEMPLATE
    path = Path(choice)
    if not path.is_file():
        raise SourceError(f"--slm-chat-template {choice}: no such file (use auto, chatml or a .jinja file)")
    return path.read_text(encoding="utf-8")


def build_key(fingerprint_: str, precision: str, recipe: dict[str, Any], chat_template: str) -> str:
    """What the built model depends on: source content, precision, recipe, template and tool versions."""
    text = json.dumps(recipe)
    source_path = recipe.get("input_model", {}).get("model_path")
    if source_path:  # the content counts, not where it lies (passes name the folder too: GPTQ's calibration)
        text = text.replace(json.dumps(str(source_path))[1:-1], "<source>")
    # Nor where this package is installed (GPTQ's calibration names its user_script by path): the same build from
    # another virtual environment or checkout is the same build.
    text = text.replace(json.dumps(str(Path(__file__).parent))[1:-1], "<pytest_slmdeploy>")
    portable = json.loads(text)
    payload = {
        "schema": BUILD_SCHEMA,
        "source": fingerprint_,
        "precision": precision,
        "recipe": portable,
        "chat_template": chat_template,
        "versions": tool_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _install_files(staging: Path, plan: Plan) -> None:
    """Add what Foundry Local and the runtimes need next to Olive's output."""
    source = plan.source
    if plan.chat_template != source.chat_template:
        (staging / "chat_template.jinja").write_text(plan.chat_template, encoding="utf-8")
    genai = json.loads((staging / "genai_config.json").read_text())
    generation_path = source.path / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    info = inference_model_json(
        plan.name,
        plan.prompt_template.parts,
        context_length=int(genai["model"]["context_length"]),
        generation_config=generation,
        description=f"{source.path.name} ({source.architecture}), built by pytest-slmdeploy",
    )
    (staging / INFERENCE_MODEL_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Plan:
    """Everything decided before building: checked source, template, recipe, name and build key."""

    settings: Settings
    source: SourceModel
    chat_template: str
    recipe: dict[str, Any]
    cache: ModelCache
    source_fingerprint: str
    key: str
    prompt_template: template.PromptTemplate
    notes: tuple[str, ...] = ()  # what the user should know about this deployment, shown on every run

    @property
    def name(self) -> str:
        return self.settings.model_name

    def state(self) -> EntryState:
        """Whether the cache already holds this exact build."""
        return self.cache.check(self.name, self.key)


def prepare(settings: Settings, *, adjust_recipe: RecipeHook | None = None) -> Plan:
    """Check the source and the settings and compute the build key; cheap, never imports Olive."""
    assert settings.model is not None, "prepare() needs settings.model"
    source = inspect_source(settings.model, trust_remote_code=settings.trust_remote_code)
    chat_template = resolve_chat_template(source, settings.chat_template)
    try:
        prompt_template = template.derive_prompt_template(chat_template, source.tokenizer_config)
    except template.TemplateError as exc:
        raise SourceError(f"{source.path}: {exc}") from None
    notes = [f"PromptTemplate: {note}" for note in prompt_template.notes]
    if source.chat_template is not None and chat_template != source.chat_template:
        notes.insert(
            0,
            f"--slm-chat-template {settings.chat_template} replaces the model's own chat template: "
            "a model answers best in the format it was fine-tuned on (use auto to keep it)",
        )
    replaced = chat_template if chat_template != source.chat_template else None
    recipe = build.olive_config(
        source, settings.precision, trust_remote_code=settings.trust_remote_code, chat_template=replaced
    )
    if adjust_recipe is not None:
        recipe = adjust_recipe(recipe)
    cache = ModelCache(settings.cache_dir)
    cache.ensure_writable()
    source_fingerprint = fingerprint(source.path, stat_cache_dir=cache.root)
    key = build_key(source_fingerprint, settings.precision, recipe, chat_template)
    return Plan(settings, source, chat_template, recipe, cache, source_fingerprint, key, prompt_template, tuple(notes))


def deploy(plan: Plan, *, progress: Progress = lambda message: None) -> Deployment:
    """Build the planned model unless an identical build is installed; install it; say where it is."""
    watch = Stopwatch()
    settings, source, cache, name, key = plan.settings, plan.source, plan.cache, plan.name, plan.key
    state = plan.state()
    if state.usable and not settings.rebuild:
        assert state.manifest is not None
        return Deployment(name, cache.entry_dir(name), state.manifest, True, watch.seconds, plan.notes)

    notes = list(plan.notes)
    with cache.lock(name, settings.lock_timeout, waiting=progress):
        state = plan.state()  # another process may have built it while we waited
        if state.usable and not (settings.rebuild and not _built_since(state.manifest, watch)):
            assert state.manifest is not None
            return Deployment(name, cache.entry_dir(name), state.manifest, True, watch.seconds, plan.notes)
        if state.reason not in ("ok", "not installed"):
            notes.append(f"rebuilt {name}: {state.reason}")
            progress(f"rebuilding {name!r}: {state.reason}")
        cache.clean_stale_staging()
        progress("checking the tokenizer, and the weights against config.json")
        check_tokenizer(source)
        check_weights_match(source, trust_remote_code=settings.trust_remote_code)
        with cache.staging(name) as staging:  # removed on the way out, built or not
            log_path = cache.logs_dir / f"{name}.build.log"  # kept after a failure: errors point to it
            result = build.run_olive(
                plan.recipe, staging.model, staging.work, log_path=log_path, progress=progress,
                calibration_cache=(cache.root / ".calibration", plan.source_fingerprint),
            )  # fmt: skip
            _install_files(staging.model, plan)
            progress("checking that the built model loads and generates")
            check_loads(staging.model)
            manifest = Manifest(
                name=name,
                build_key=key,
                source_path=str(source.path),
                source_fingerprint=plan.source_fingerprint,
                source_bytes=source.size_bytes,
                precision=settings.precision,
                recipe=plan.recipe,
                versions=tool_versions(),
                build_seconds=round(result.seconds, 3),
                build_peak_rss_bytes=result.peak_rss_bytes,
                created_at=time.time(),
                files=record_files(staging.model),
            )
            entry = cache.publish(staging, name, manifest)
    progress(f"installed {entry} ({manifest.model_bytes / 1e6:.1f} MB, {manifest.size_ratio:.2f} of the source)")
    return Deployment(name, entry, manifest, False, watch.seconds, tuple(notes))


def _built_since(manifest: Manifest | None, watch: Stopwatch) -> bool:
    """True when another process finished the build after we started (``--slm-rebuild`` under xdist)."""
    return manifest is not None and manifest.created_at >= time.time() - watch.seconds
