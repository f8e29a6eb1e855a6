"""Defects put into a trained tiny model on purpose, so tests can prove a check catches them.

:func:`add_outlier_channels` gives a model the outlier input channels real LLMs
have (a few hidden dimensions with activations far larger than the rest). The
full-precision model computes exactly the same function; only quantization,
which shares one scale over a row block or a whole tensor, feels the outliers.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Written by save_pretrained from the changed model; everything else in the folder is copied as it is.
_REWRITTEN = ("config.json", "generation_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")
# Gemma's RMSNorm multiplies by (1 + weight), the others by weight.
_OFFSET_NORM_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")


@dataclass(frozen=True)
class OutlierReport:
    """What :func:`add_outlier_channels` changed, and the proof that fp32 output did not change."""

    out_dir: Path
    scale: float
    channels: tuple[int, ...]
    projections: tuple[str, ...]  # every Linear whose input channels were scaled up
    max_abs_logit_diff: float  # fp32 logits before vs after, over a probe batch
    max_abs_logit: float


def default_channels(hidden_size: int, count: int = 4) -> tuple[int, ...]:
    """``count`` channels spread over the hidden size (fixed, so a test model is reproducible)."""
    step = max(1, hidden_size // count)
    return tuple(sorted({(3 + i * step) % hidden_size for i in range(count)}))


def add_outlier_channels(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    scale: float = 40.0,
    channels: Sequence[int] | None = None,
    include_lm_head: bool = False,
    probe_text: str = "What are your opening hours? Where is the office?",
) -> OutlierReport:
    """Write a copy of a trained model whose projections fed by an RMSNorm carry outlier input channels.

    For each ``channels`` index c, every Linear fed by an RMSNorm (q/k/v, gate/up, and the LM head when it
    is not tied to the embeddings) gets its input column c multiplied by ``scale``, and the norm's weight
    for c divided by ``scale``: the norm's output times the projection's weight is unchanged, so the fp32
    model is the same function (checked: the report holds the largest logit difference on a probe).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(src_dir), Path(out_dir)
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.eval()
    config = model.config
    hidden = int(config.hidden_size)
    chosen = tuple(default_channels(hidden) if channels is None else channels)
    if not chosen or any(not 0 <= c < hidden for c in chosen):
        raise ValueError(f"channels must be within 0..{hidden - 1}, got {chosen}")

    tokenizer = AutoTokenizer.from_pretrained(src)
    probe = tokenizer(probe_text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        before = model(input_ids=probe).logits

    offset = 1.0 if getattr(config, "model_type", "") in _OFFSET_NORM_TYPES else 0.0
    index = torch.tensor(chosen, dtype=torch.long)
    changed: list[str] = []
    with torch.no_grad():
        for norm_name, linear_names in _norm_feeds(model, include_lm_head):
            norm = model.get_submodule(norm_name)
            effective = norm.weight[index] + offset
            norm.weight[index] = effective / scale - offset
            for name in linear_names:
                model.get_submodule(name).weight[:, index] *= scale
                changed.append(name)
        after = model(input_ids=probe).logits

    _save_copy(model, src, out)
    return OutlierReport(
        out_dir=out,
        scale=scale,
        channels=chosen,
        projections=tuple(changed),
        max_abs_logit_diff=float((after - before).abs().max()),
        max_abs_logit=float(before.abs().max()),
    )


def _save_copy(model: Any, src: Path, out: Path) -> None:
    """Save ``model`` to ``out`` with the source's other files (tokenizer, chat template, cases) beside it."""
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and item.name not in _REWRITTEN and not item.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(item, out / item.name)
    model.save_pretrained(out, safe_serialization=True)


def _norm_feeds(model: Any, include_lm_head: bool) -> list[tuple[str, list[str]]]:
    """(RMSNorm module name, the Linear modules that read its output) for each decoder layer."""
    feeds: list[tuple[str, list[str]]] = []
    base = model.base_model_prefix  # "model"
    layers = model.get_submodule(f"{base}.layers")
    for i, layer in enumerate(layers):
        prefix = f"{base}.layers.{i}"
        attention = _present(layer, "self_attn", ("q_proj", "k_proj", "v_proj", "qkv_proj"))
        feeds.append((f"{prefix}.input_layernorm", [f"{prefix}.self_attn.{n}" for n in attention]))
        mlp = _present(layer, "mlp", ("gate_proj", "up_proj", "gate_up_proj"))
        # Gemma 2/3 normalize the attention output with post_attention_layernorm; the MLP reads
        # pre_feedforward_layernorm instead.
        mlp_norm = "pre_feedforward_layernorm" if hasattr(layer, "pre_feedforward_layernorm") else None
        mlp_norm = mlp_norm or "post_attention_layernorm"
        feeds.append((f"{prefix}.{mlp_norm}", [f"{prefix}.mlp.{n}" for n in mlp]))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if include_lm_head and not tied:
        feeds.append((f"{base}.norm", ["lm_head"]))
    for norm, linears in feeds:
        if not linears:
            raise ValueError(f"{type(model).__name__}: no projection found after {norm}")
    return feeds


def _present(layer: Any, block: str, names: Sequence[str]) -> list[str]:
    parent = getattr(layer, block)
    return [name for name in names if hasattr(parent, name)]


def flattened_copy(source: str | Path, out_dir: str | Path, temperature: float) -> Path:
    """Write a copy of a model whose next-token distributions are flattened: its final norm's weight divided by
    ``temperature`` divides every logit by it. Every greedy answer stays the source's (the ranking is unchanged),
    so only a check of the whole distribution can tell it from the source: a build that lost the scale of its
    logits, or an unrelated model that happens to rank alike."""
    import torch
    from transformers import AutoModelForCausalLM

    src, out = Path(source), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.get_decoder().norm.weight.div_(temperature)
    _save_copy(model, src, out)
    return out


def perturbed_copy(source: str | Path, out_dir: str | Path, relative_noise: float, *, seed: int = 0) -> Path:
    """Write a copy of a model whose every weight matrix carries Gaussian noise of ``relative_noise`` times its
    own RMS: another checkpoint of the same model, as near the source as the noise says (the wrong build installed
    by mistake, or a quantization a few points less faithful). Tokenizer and config are the source's."""
    import torch
    from transformers import AutoModelForCausalLM

    src, out = Path(source), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                rms = parameter.pow(2).mean().sqrt()
                parameter.add_(torch.randn(parameter.shape, generator=generator) * rms * relative_noise)
    _save_copy(model, src, out)
    return out
