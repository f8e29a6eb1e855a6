"""An Olive pass that runs the model builder of the installed onnxruntime-genai, through its public entry points.

Olive 0.13's own ``ModelBuilder`` pass patches internals of onnxruntime-genai 0.14 and fails with every later
release ("No module named 'onnxruntime_genai.models.quantized_model'", then "Hugging Face details not found in
extra_options"). This pass calls the builder as its command line does (``parse_extra_options``, then
``create_model``), so Olive still orchestrates the workflow (its passes after this one, their logs and the output
model) while the model is built by the same onnxruntime-genai release that runs it, and that the Foundry Local
SDK ships.

Olive imports this module (``build.package_config`` names it); nothing else should, as it imports Olive.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from olive.hardware.accelerator import AcceleratorSpec
from olive.model import HfModelHandler, ONNXModelHandler
from olive.passes import Pass
from olive.passes.olive_pass import PassConfigParam
from olive.passes.pass_config import BasePassConfig

from pytest_slmdeploy.hf_compat import builder_ready_config

MODEL_FILE = "model.onnx"
CPU_PRECISIONS = ("int4", "int8", "fp32")
# Under Olive's logger, like Olive's own passes: a build captures it (buildlog) and names its reason from it.
logger = logging.getLogger("olive.passes.slmdeploy")


def _option_text(value: Any) -> str:
    """The builder parses ``KEY=VALUE`` strings, as on its command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


class GenAIModelBuilder(Pass):  # type: ignore[misc]  # Olive is untyped
    """Convert a Hugging Face causal LM into an ONNX Runtime GenAI model (CPU) with onnxruntime-genai's builder."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {
            "precision": PassConfigParam(
                type_=str, required=True, description="Weight precision: int4, int8 (weight-only) or fp32."
            ),
            "extra_options": PassConfigParam(
                type_=dict,
                default_value=None,
                description="The builder's --extra_options (block_size, is_symmetric, algo_config, ...).",
            ),
        }

    @classmethod
    def validate_config(cls, config: type[BasePassConfig], accelerator_spec: AcceleratorSpec) -> bool:
        if not super().validate_config(config, accelerator_spec):
            return False
        if config.precision not in CPU_PRECISIONS:  # the builder's CPU combinations
            logger.info("%s is not supported on CPU.", str(config.precision).upper())
            return False
        return True

    def _run_for_config(
        self, model: HfModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        from onnxruntime_genai.models.builder import create_model, parse_extra_options

        if not isinstance(model, HfModelHandler):
            raise ValueError("GenAIModelBuilder builds a Hugging Face model (HfModel input) only")
        output_dir = Path(output_model_path)
        output_dir.mkdir(parents=True, exist_ok=True)
        # The builder keeps intermediate files in its cache_dir (Olive's own pass gives it the Hugging Face hub
        # cache): a folder of this pass's own, removed afterwards.
        cache_dir = output_dir.with_name(output_dir.name + "-builder-cache")
        source = str(model.model_name_or_path)
        trusted = bool(model.get_load_kwargs().get("trust_remote_code", False))  # the user's explicit choice only
        options = {"hf_token": False, "hf_remote": trusted, "filename": MODEL_FILE, **(config.extra_options or {})}
        try:
            prepared = parse_extra_options(
                source,
                source,
                str(output_dir),
                config.precision,
                "cpu",
                str(cache_dir),
                [f"{key}={_option_text(value)}" for key, value in options.items()],
            )
            hf_config = prepared["hf_details"]["hf_config"]
            prepared["hf_details"]["hf_config"] = builder_ready_config(hf_config)
            create_model(source, source, str(output_dir), config.precision, "cpu", str(cache_dir), **prepared)
        finally:
            shutil.rmtree(cache_dir, ignore_errors=True)
        model.save_metadata(output_dir)  # config.json (and generation_config.json) beside the model, as Olive's does
        extra = sorted(str(p) for p in output_dir.iterdir() if p.name not in (MODEL_FILE, MODEL_FILE + ".data"))
        return ONNXModelHandler(output_dir, onnx_file_name=MODEL_FILE, model_attributes={"additional_files": extra})
