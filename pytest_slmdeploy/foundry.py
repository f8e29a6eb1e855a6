"""Stage 4: what Foundry Local needs: ``inference_model.json``, and registration through its SDK.

The SDK (``foundry-local-sdk``, the ``foundry`` extra) is imported only when
registration or the Foundry backend runs. Its public catalog goes to the
network and is never touched: models are registered from the local cache.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The tutorial's generation settings, used where the model's generation_config.json says nothing.
TUTORIAL_MODEL_CONFIG: dict[str, float] = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}
TUTORIAL_MAX_LENGTH = 2048
INFERENCE_MODEL_VERSION = "1"


def model_config(context_length: int | None, generation_config: Mapping[str, Any]) -> dict[str, float | int]:
    """``ModelConfig``: the model's own generation defaults where it has them, else the tutorial's."""
    config: dict[str, float | int] = {"max_length": min(context_length or TUTORIAL_MAX_LENGTH, TUTORIAL_MAX_LENGTH)}
    for key, default in TUTORIAL_MODEL_CONFIG.items():
        value = generation_config.get(key)
        config[key] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default
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
