"""Stage 2 (what to build): the recipes, each a chain of Olive passes for one precision, and the ladder's order.

Measured on a real trained model, SmolLM2-135M-Instruct, against transformers fp32 (docs/recipes.md has the
tables and the recipes that lost):

- ``int8``: onnxruntime-genai's builder at fp32, then Olive's block-wise RTN to 8 bits (block 32, symmetric,
  weight-only: MatMulNBits), and the embedding quantized to 8 bits and shared with the LM head when the model
  ties them. KLD 0.005 at 154 MB, as faithful as llama.cpp's Q8_0; the former int8 (fp32 + dynamic
  quantization of activations) had KLD 0.19 at 166 MB.
- ``int4``: Olive's GPTQ (4 bits, group 64, asymmetric; q, k and v at 8 bits), calibrated on the source's own
  answers to built-in instructions, then the builder, then the 8-bit shared embedding. KLD 0.14 at 104 MB;
  plain RTN int4 (the former default) had 0.50 at 193 MB.
- ``int4-mixed``: as int4 with the up and down projections at 8 bits too: KLD 0.04 at 131 MB.
- ``fp32``: the builder alone; the faithful end of the ladder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_slmdeploy.errors import BuildError
from pytest_slmdeploy.source import SourceModel, weight_shapes

EMBEDDING_GATHER = "/model/embed_tokens/Gather"
CALIBRATION_DATASET = "slmdeploy_calibration"  # olive_data.py registers it under this name
# How a build hands olive_data.py (inside Olive) the cache of calibration answers and the source's fingerprint.
CALIBRATION_CACHE_ENV = "SLMDEPLOY_CALIBRATION_CACHE"
CALIBRATION_SOURCE_ENV = "SLMDEPLOY_CALIBRATION_SOURCE"
# ONNX passes after the builder: weights beside the graph, as the builder writes them (a protobuf stops at 2 GB).
_EXTERNAL_DATA = {
    "save_as_external_data": True,
    "all_tensors_to_one_file": True,
    "external_data_name": "model.onnx.data",
}
_BLOCKS = (64, 32, 16)
# Instructions the source answers to make GPTQ's calibration data (olive_data.py). None is a prompt the suite
# judges a build on: fidelity and the domain cases stay out-of-sample.
CALIBRATION_INSTRUCTIONS = (
    "Describe how a bicycle works.",
    "List four kinds of fruit.",
    "Write a short poem about autumn leaves.",
    "Explain what a computer program is to a child.",
    "Give three reasons to learn a second language.",
    "Summarize the plot of a fairy tale you know.",
    "What should I pack for a weekend camping trip?",
    "Explain the difference between weather and climate.",
    "Write a polite email declining a meeting invitation.",
    "How do I make a cup of tea?",
    "Name three famous scientists and what they discovered.",
    "What is a healthy breakfast?",
    "Explain why exercise is good for you.",
    "Write a haiku about the city at night.",
    "How do airplanes stay in the air?",
    "Give me a recipe for pancakes.",
    "What are the planets in the solar system?",
    "Describe the water cycle.",
    "Tell me a fun fact about elephants.",
    "How can I save money on groceries?",
    "Translate 'where is the train station' into German.",
    "Explain what a noun is, with examples.",
    "Write a two-sentence horror story.",
    "What is the Pythagorean theorem?",
    "Suggest a name for a friendly robot.",
    "How do I reset a forgotten password on most websites?",
    "List the days of the week in French.",
    "What causes the seasons on Earth?",
    "Write a thank-you note to a teacher.",
    "Explain how vaccines work in simple words.",
    "Give five tips for better sleep.",
    "What is the difference between a virus and a bacterium?",
    "Convert 5 kilometres to miles and show the steps.",
    "Describe a sunset over the ocean.",
    "Write Python code that prints the numbers 1 to 10.",
    "What does a librarian do?",
    "Explain the rules of chess briefly.",
    "Why do leaves change color in autumn?",
    "Plan a one-day visit to a museum.",
    "What is inflation in economics?",
)


@dataclass(frozen=True)
class BuildChoices:
    """What the user chose that a recipe's passes must follow."""

    trust_remote_code: bool = False
    chat_template: str | None = None  # a template replacing the model's own (--slm-chat-template), else None


@dataclass(frozen=True)
class Recipe:
    """One way to build a model: its name (what ``--slm-precision`` takes), its weight precision, a one-line
    summary, and the Olive passes it runs for a source."""

    name: str
    precision: str
    summary: str
    passes: Callable[[SourceModel, BuildChoices], dict[str, Any]]

    def olive_passes(self, source: SourceModel, choices: BuildChoices = BuildChoices()) -> dict[str, Any]:
        return self.passes(source, choices)


def block_size(source: SourceModel, sizes: Sequence[int] = _BLOCKS) -> int:
    """The largest quantization block that divides every matrix's input size (hidden and intermediate size)."""
    dims = [source.config.get(k) for k in ("hidden_size", "intermediate_size")]
    known = [d for d in dims if isinstance(d, int) and d > 0]
    for block in sizes:
        if all(d % block == 0 for d in known):
            return block
    return sizes[-1]


def tied_embeddings(source: SourceModel) -> bool:
    """Whether the model's LM head is its embedding table (transformers' default is to tie)."""
    config = source.config
    text_config = config.get("text_config")
    if isinstance(text_config, dict) and "tie_word_embeddings" in text_config:
        return bool(text_config["tie_word_embeddings"])
    return bool(config.get("tie_word_embeddings", True))


def _builder(precision: str, **options: Any) -> dict[str, Any]:
    # A sliding-window model (Gemma 3) exported with windowed KV caches refuses any generator shorter than its
    # window: "KV cache capacity (42) must be at least local_window_size (512)". Full caches cost memory only.
    return {
        "type": "GenAIModelBuilder",
        "precision": precision,
        "extra_options": {"windowed_kv_cache": False, **options},
    }


def _embedding_8bit(source: SourceModel, rename_logits: str | None = None) -> dict[str, Any]:
    """The embedding table to 8 bits (block 32, symmetric), read by the LM head too when the model ties them."""
    surgeries: list[dict[str, Any]] = []
    if rename_logits:  # Olive's RTN renames the LM head's output (the graph's "logits") to "logits_Q8"
        surgeries.append({"surgeon": "RenameOutputs", "old_names": [rename_logits], "new_names": ["logits"]})
    surgeries.append({"surgeon": "QuantizeEmbeddingInt8"})
    if tied_embeddings(source):
        surgeries.append({"surgeon": "ShareEmbeddingLmHead"})
    return {"type": "GraphSurgeries", "surgeries": surgeries, **_EXTERNAL_DATA}


def calibration(source: SourceModel, choices: BuildChoices) -> dict[str, Any]:
    """Olive's data config for GPTQ: the source's answers to :data:`CALIBRATION_INSTRUCTIONS` (olive_data.py)."""
    return {
        "name": "slmdeploy_calibration",
        "type": "DataContainer",
        # A path, not an import: olive_data imports Olive, and planning a build (warm runs) must not.
        "user_script": str(Path(__file__).with_name("olive_data.py")),
        "load_dataset_config": {
            "type": CALIBRATION_DATASET,
            "params": {
                "source": str(source.path),
                "instructions": list(CALIBRATION_INSTRUCTIONS),
                "trust_remote_code": choices.trust_remote_code,
                "chat_template": choices.chat_template,
            },
        },
        "pre_process_data_config": {"type": "skip_pre_process"},
        "post_process_data_config": {"type": "skip_post_process"},
        "dataloader_config": {"type": "default_dataloader", "batch_size": 1},
    }


def _at_8_bits(source: SourceModel, projections: Sequence[str]) -> dict[str, dict[str, Any]]:
    """GPTQ overrides: every layer's modules named by ``projections`` (as the weights name them, so Phi-3's
    fused ``qkv_proj`` counts as attention) at 8 bits. Asymmetric, like the 4-bit rest: the builder fuses q, k
    and v into one matrix and needs zero points for all three."""
    modules = {name.removesuffix(".weight") for name in weight_shapes(source) if name.endswith(".weight")}
    return {
        module: {"bits": 8}
        for module in sorted(modules)
        if module.startswith("model.layers.") and module.split(".", 3)[-1] in projections
    }


ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_IN_OUT = ("mlp.up_proj", "mlp.down_proj")
# Fused projections (Phi-3) always at 8 bits: onnxruntime-genai 0.18's loader of Olive's format splits a fused
# module's 4-bit zero points at the wrong rows (it divides the split point by the packing factor, but Olive packs
# zero points along the groups, not the rows), and the model does not load: "MatMulNBits PrePack: zero_points
# initializer shape {192} does not match attribute-derived shape [128]". At 8 bits nothing is packed.
FUSED = ("self_attn.qkv_proj", "mlp.gate_up_proj")


def _gptq(projections_8bit: Sequence[str]) -> Callable[[SourceModel, BuildChoices], dict[str, Any]]:
    def passes(source: SourceModel, choices: BuildChoices) -> dict[str, Any]:
        group = block_size(source)
        return {
            "gptq": {
                "type": "Gptq",
                "bits": 4,
                "group_size": group,
                "sym": False,
                "overrides": _at_8_bits(source, (*projections_8bit, *FUSED)),
                "data_config": calibration(source, choices),
            },
            # An untied LM head at 8 bits too (a tied one becomes the 8-bit embedding's, below).
            "builder": _builder(
                "int4",
                block_size=group,
                is_symmetric=False,
                shared_embeddings=False,
                matmul_mixed_precision="last_matmul:int8",
            ),
            "embedding": _embedding_8bit(source),
        }

    return passes


def _int8(source: SourceModel, choices: BuildChoices) -> dict[str, Any]:
    return {
        # The builder ties an fp32 embedding to the LM head itself (a Transpose of it); the embedding surgery needs
        # the table as its own initializer, and shares it again, quantized.
        "builder": _builder("fp32", shared_embeddings=False),
        "rtn": {
            "type": "OnnxBlockWiseRtnQuantization",
            "bits": 8,
            "block_size": block_size(source, (32, 16)),
            "is_symmetric": True,
            "accuracy_level": 4,  # int8 activations inside MatMulNBits: the fast CPU kernel
            "nodes_to_exclude": [EMBEDDING_GATHER],
            **_EXTERNAL_DATA,
        },
        "embedding": _embedding_8bit(source, rename_logits="logits_Q8"),
    }


def _fp32(source: SourceModel, choices: BuildChoices) -> dict[str, Any]:
    return {"builder": _builder("fp32")}


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            "int4",
            "int4",
            "GPTQ 4-bit (group 64; q, k, v at 8 bits; calibrated on the source's own answers), 8-bit embedding",
            _gptq(ATTENTION),
        ),
        Recipe(
            "int4-mixed",
            "int4",
            "GPTQ 4-bit o and gate projections, 8-bit q, k, v, up and down (about 6 bits a weight), 8-bit embedding",
            _gptq(ATTENTION + MLP_IN_OUT),
        ),
        Recipe("int8", "int8", "RTN 8-bit weights (block 32, symmetric), 8-bit shared embedding", _int8),
        Recipe("fp32", "fp32", "fp32: the builder alone", _fp32),
    )
}
LADDER = ("int4", "int4-mixed", "int8", "fp32")  # cheapest first: the precision ladder climbs them in this order


def recipe(name: str) -> Recipe:
    if name == "fp16":
        raise BuildError(
            "precision fp16 is refused by the CPU execution provider (Olive: 'FP16 is not supported on CPU'); "
            "use --slm-precision int4, int8 or fp32"
        )
    try:
        return RECIPES[name]
    except KeyError:
        raise BuildError(f"unknown precision {name!r}: use {', '.join(RECIPES)} or fp16") from None
