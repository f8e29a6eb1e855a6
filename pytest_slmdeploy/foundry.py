"""Stage 4: what Foundry Local needs: ``inference_model.json``, and registration through its SDK.

The SDK (``foundry-local-sdk``, the ``foundry`` extra) is imported only when
registration or the Foundry backend runs. Its public catalog goes to the
network and is never touched: models are registered from the local cache.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pytest_slmdeploy.errors import RuntimeBackendError

# The tutorial's sampling settings, used where the model's generation_config.json says nothing. A
# repetition penalty is not among them: it changes every answer (the tutorial's 1.1 penalises each token
# already in the prompt or the answer), so ModelConfig carries one only where the model itself defines it.
TUTORIAL_MODEL_CONFIG: dict[str, float] = {"temperature": 0.7, "top_p": 0.9}
TUTORIAL_MAX_LENGTH = 2048
INFERENCE_MODEL_VERSION = "1"


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def model_config(context_length: int | None, generation_config: Mapping[str, Any]) -> dict[str, float | int]:
    """``ModelConfig``: the model's own generation defaults where it has them, else the tutorial's sampling
    settings; ``repetition_penalty`` only when the model defines one."""
    config: dict[str, float | int] = {"max_length": min(context_length or TUTORIAL_MAX_LENGTH, TUTORIAL_MAX_LENGTH)}
    for key, default in TUTORIAL_MODEL_CONFIG.items():
        value = _number(generation_config.get(key))
        config[key] = default if value is None else value
    penalty = _number(generation_config.get("repetition_penalty"))
    if penalty is not None:
        config["repetition_penalty"] = penalty
    return config


def inference_model_json(
    name: str,
    prompt_template: Mapping[str, str],
    *,
    context_length: int | None,
    generation_config: Mapping[str, Any],
    description: str,
) -> dict[str, Any]:
    """The ``inference_model.json`` of the tutorial's step 3 (Foundry reads a string ``Name``)."""
    return {
        "Name": name,
        "Description": description,
        "Version": INFERENCE_MODEL_VERSION,
        "PromptTemplate": dict(prompt_template),
        "ModelConfig": model_config(context_length, generation_config),
    }


def is_foundry_entry(folder: Path) -> bool:
    """Foundry Local's own rule for a cached model folder (from its cache scanner)."""
    try:
        info = json.loads((folder / "inference_model.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        (folder / "genai_config.json").is_file()
        and isinstance(info, dict)
        and isinstance(info.get("Name"), str)
        and not (folder / "download.tmp").exists()
    )


def foundry_model_id(name: str) -> str:
    return f"{name}:{INFERENCE_MODEL_VERSION}"


@dataclass(frozen=True)
class FoundryRegistration:
    """The installed model as Foundry Local knows it."""

    model_id: str
    model_path: Path
    newly_registered: bool
    sdk_version: str


def sdk_available() -> bool:
    """Whether ``foundry-local-sdk`` is installed (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("foundry_local_sdk") is not None


def _manager(cache_root: Path) -> Any:
    """The SDK's process-wide manager, configured for our cache (re-made if another cache is asked for)."""
    # The SDK loads its own ONNX Runtime GenAI core (0.18); importing onnxruntime_genai (0.14) after it
    # fails on an unresolved symbol, while the other order works. Load ours first.
    with contextlib.suppress(ImportError):
        import onnxruntime_genai  # noqa: F401
    from foundry_local_sdk import Configuration, FoundryLocalManager

    current = FoundryLocalManager.instance
    if current is not None and Path(current.config.model_cache_dir or "") == cache_root:
        return current
    if current is not None:
        current.close()
    state = cache_root / "foundry"
    FoundryLocalManager.initialize(
        Configuration(
            app_name="pytest-slmdeploy",
            model_cache_dir=str(cache_root),
            app_data_dir=str(state / "app"),
            logs_dir=str(state / "logs"),
            disable_nonessential_telemetry=True,
        )
    )
    return FoundryLocalManager.instance


def close_manager() -> None:
    """Shut the SDK's manager down (unloads models), if this process started one."""
    import sys

    sdk = sys.modules.get("foundry_local_sdk")
    manager = getattr(getattr(sdk, "FoundryLocalManager", None), "instance", None)
    if manager is not None:
        manager.close()


def register(entry_dir: Path, name: str, cache_root: Path) -> tuple[FoundryRegistration, Any]:
    """Register ``entry_dir`` in Foundry Local's local catalog (idempotent); return it and the SDK model.

    Only the local catalog is used: the public one goes to the network.
    """
    from foundry_local_sdk import CatalogType, ModelInfoBuilder
    from foundry_local_sdk.exception import FoundryLocalException

    model_id = foundry_model_id(name)
    try:
        catalog = _manager(cache_root).get_catalog(CatalogType.LOCAL)
        model = catalog.get_model_variant(model_id)
        if model is not None and Path(model.get_path()).resolve() != entry_dir.resolve():
            catalog.unregister_model(model_id)  # the cache moved: point the registration at this entry
            model = None
        newly = model is None
        if model is None:
            with ModelInfoBuilder() as metadata:
                metadata.set_string_property("task", "chat-completion")
                metadata.set_string_property("display_name", name)
                model = catalog.register_model(model_path=str(entry_dir), model_id=model_id, metadata=metadata)
    except FoundryLocalException as exc:
        raise RuntimeBackendError(f"Foundry Local cannot register {entry_dir} as {model_id}: {exc}") from None
    return FoundryRegistration(model_id, entry_dir, newly, version("foundry-local-sdk")), model
