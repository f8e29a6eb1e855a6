"""Hugging Face configs as onnxruntime-genai's model builder reads them.

transformers 5 keeps RoPE settings per attention type (``rope_parameters = {"full_attention": {...},
"sliding_attention": {...}}``) for models that mix global and sliding-window layers (Gemma 3). The builder's
Gemma 3 class still reads the transformers 4 fields (``rope_theta``, ``rope_local_base_freq``, a flat
``rope_parameters`` with a ``rope_type``) and fails: "'Gemma3TextConfig' object has no attribute
'rope_local_base_freq'" (onnxruntime-genai 0.14), ``KeyError: 'rope_type'`` (0.18). Filling the old fields in
the builder's copy of the config, before it reads them, builds the same model (fp32 output matches transformers).
"""

from __future__ import annotations

from typing import Any

FULL = "full_attention"
SLIDING = "sliding_attention"
# Builders that read the per-layer-type form themselves (onnxruntime-genai 0.18's Gemma 4).
_READS_NESTED_ROPE = ("gemma4",)


def nested_rope(config: Any) -> dict[str, dict[str, Any]] | None:
    """``rope_parameters`` keyed by attention type, or None when the config has the flat form."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and FULL in rope and all(isinstance(v, dict) for v in rope.values()):
        return rope
    return None


def builder_ready_config(config: Any) -> Any:
    """``config`` with the transformers 4 RoPE fields the builder reads, where transformers 5 nests them."""
    rope = nested_rope(config)
    model_type = str(getattr(config, "model_type", ""))
    if rope is None or model_type.startswith(_READS_NESTED_ROPE):
        return config
    full = dict(rope[FULL])
    full.setdefault("rope_type", "default")
    config.rope_parameters = full
    config.rope_theta = full["rope_theta"]
    if SLIDING in rope and not hasattr(config, "rope_local_base_freq"):
        config.rope_local_base_freq = rope[SLIDING]["rope_theta"]
    return config
