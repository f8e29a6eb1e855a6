"""Stage 1: validate a Hugging Face model folder, read what the later stages need, fingerprint it."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_slmdeploy.errors import SourceError, first_line

# Architectures the model builder of onnxruntime-genai 0.18.0 converts (its `builder.py`);
# tests/test_source.py checks this list against the installed builder.
SUPPORTED_ARCHITECTURES = frozenset(
    {
        "ChatGLMForConditionalGeneration", "ChatGLMModel", "Ernie4_5ForCausalLM",
        "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration",
        "Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration",
        "GemmaForCausalLM", "GptOssForCausalLM", "GraniteForCausalLM", "GraniteMoeHybridForCausalLM",
        "HunYuanDenseV1ForCausalLM", "InternLM2ForCausalLM", "Lfm2AudioForConditionalGeneration",
        "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "Lfm2VlForConditionalGeneration",
        "LlamaForCausalLM", "Mistral3ForConditionalGeneration", "MistralForCausalLM",
        "NemotronForCausalLM", "OlmoForCausalLM", "Phi3ForCausalLM", "Phi3SmallForCausalLM",
        "Phi3VForCausalLM", "Phi4MMForCausalLM", "PhiForCausalLM", "PhiMoEForCausalLM",
        "Qwen2ForCausalLM", "Qwen2_5_VLForConditionalGeneration", "Qwen3ForCausalLM",
        "Qwen3VLForConditionalGeneration", "Qwen3_5ForConditionalGeneration",
        "Qwen3_5MoeForConditionalGeneration", "SmolLM3ForCausalLM",
        "VideoChatFlashQwenForCausalLM",
    }
)  # fmt: skip

_IGNORED_PARTS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}
STAT_CACHE_NAME = "fingerprints.json"


@dataclass(frozen=True)
class SourceModel:
    """A checked Hugging Face model folder."""

    path: Path
    config: dict[str, Any]
    architecture: str
    weight_files: tuple[str, ...]
    chat_template: str | None
    tokenizer_config: dict[str, Any] = field(default_factory=dict)

    @property
    def context_length(self) -> int | None:
        value = self.config.get("max_position_embeddings")
        return int(value) if isinstance(value, int) else None

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in build_inputs(self.path))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path} cannot be read ({exc}): {what}") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path} must hold a JSON object: {what}")
    return data


def _check_safetensors(path: Path) -> dict[str, Any]:
    """A safetensors file's header says how long its data is: a shorter file was truncated. Returns the header."""
    try:
        info = path.stat()
    except OSError as exc:
        raise SourceError(f"weights file {path} cannot be read ({exc.strerror}): copy the model again") from None
    if not stat.S_ISREG(info.st_mode):
        raise SourceError(f"weights file {path} is not a regular file (a pipe, socket or folder): copy the model again")
    size = info.st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header longer than file")
            header: dict[str, Any] = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except OSError as exc:
        raise SourceError(f"weights file {path} cannot be read ({exc.strerror}): copy the model again") from None
    except (struct.error, ValueError, KeyError, TypeError):
        raise SourceError(
            f"weights file {path} is damaged or not safetensors: re-save the model with "
            "save_pretrained(..., safe_serialization=True)"
        ) from None
    if 8 + header_len + end > size:
        raise SourceError(
            f"weights file {path} is truncated: {size} bytes, its header needs {8 + header_len + end}; "
            "copy the model again"
        )
    return header


def weight_shapes(source: SourceModel) -> dict[str, tuple[int, ...]]:
    """Every tensor in the weight files and its shape, from the safetensors headers (no tensor is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in source.weight_files:
        for tensor, info in _check_safetensors(source.path / name).items():
            if tensor != "__metadata__":
                shapes[tensor] = tuple(int(d) for d in info["shape"])
    return shapes


def architecture_shapes(source: SourceModel, *, trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """The tensors the architecture in config.json needs, and their shapes (an empty model on the meta device).

    Tied weights (an LM head sharing the embedding) are needed once. Imports torch and transformers:
    call it only on the way to a build.
    """
    import logging

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its advice about other model classes is noise here
    try:
        config = AutoConfig.from_pretrained(str(source.path), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many kinds for a bad config; the last line says why
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        raise SourceError(
            f"{source.path / 'config.json'} does not describe a model transformers can build: {lines[-1]}"
        ) from None
    finally:
        quiet.setLevel(level)
    seen: dict[int, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # tied to a tensor already listed
            continue
        seen[id(tensor)] = name
        shapes[name] = tuple(tensor.shape)
    return shapes


def _grouped(names: list[str], limit: int = 6) -> str:
    """``model.layers.{2, 3}.*`` for many tensors of a few layers; the first few names otherwise."""
    layers: dict[str, set[str]] = {}
    others: list[str] = []
    for name in sorted(names):
        prefix, sep, rest = name.partition(".layers.")
        index = rest.split(".", 1)[0]
        if sep and index.isdigit():
            layers.setdefault(prefix, set()).add(index)
        else:
            others.append(name)
    groups = [f"{prefix}.layers.{{{', '.join(sorted(ix, key=int))}}}.*" for prefix, ix in layers.items()]
    shown = groups + others[:limit]
    return ", ".join(shown) + (f" and {len(others) - limit} more" if len(others) > limit else "")


def check_tokenizer(source: SourceModel) -> None:
    """Load ``tokenizer.json`` as the runtimes will; a damaged one is named here, not deep inside Olive."""
    path = source.path / "tokenizer.json"
    if not path.is_file():
        return  # a SentencePiece tokenizer.model: transformers converts it during the build
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception subclass with the parser's text
        reason = first_line(str(exc)) or type(exc).__name__
        raise SourceError(f"{path} cannot be loaded as a tokenizer ({reason}): save the tokenizer again") from None


def check_weights_match(source: SourceModel, *, trust_remote_code: bool = False) -> None:
    """Fail, naming the tensors, when the weights lack what config.json's architecture needs or differ in shape.

    Olive's builder fills a missing tensor silently (only its log says ``MISSING``), so a config that
    claims more layers than the weights hold would build a model that answers nonsense.
    """
    needed = architecture_shapes(source, trust_remote_code=trust_remote_code)
    present = weight_shapes(source)
    missing = [name for name in needed if name not in present]
    wrong = [
        f"{name} {list(present[name])} (config.json needs {list(shape)})"
        for name, shape in needed.items()
        if name in present and present[name] != shape
    ]
    if missing:
        raise SourceError(
            f"{source.path}: the weights lack {len(missing)} tensors that config.json's architecture needs: "
            f"{_grouped(missing)}; fix config.json (e.g. num_hidden_layers) or save the complete model again"
        )
    if wrong:
        raise SourceError(
            f"{source.path}: weights do not match config.json: {'; '.join(wrong[:3])}"
            + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
            + "; fix config.json or save the model again"
        )


def _weight_files(path: Path) -> tuple[str, ...]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "the safetensors shard index").get("weight_map", {})
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        missing = [s for s in shards if not (path / s).is_file()]
        if not shards or missing:
            raise SourceError(f"{index} lists weight shards that are missing: {', '.join(missing) or '(none listed)'}")
        files = shards
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            if any(path.glob("pytorch_model*.bin")):
                raise SourceError(
                    f"{path} has only pytorch_model*.bin weights; save them as safetensors "
                    "(model.save_pretrained(dir, safe_serialization=True)) so nothing unpickles code"
                )
            raise SourceError(f"{path} has no weights: expected model.safetensors (or shards with an index)")
    for name in files:
        _check_safetensors(path / name)
    return tuple(files)


def _chat_template(path: Path, tokenizer_config: dict[str, Any]) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"{jinja} cannot be read ({exc}): fix or remove the chat template file") from None
    template = tokenizer_config.get("chat_template")
    if template is None and (path / "chat_template.json").is_file():
        template = _read_json(path / "chat_template.json", "the chat template").get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def read_chat_template(folder: Path) -> tuple[str | None, dict[str, Any]]:
    """A model folder's chat template (as transformers finds it) and its tokenizer_config.json."""
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path, "the tokenizer config") if config_path.is_file() else {}
    return _chat_template(folder, config), config


def inspect_source(path: str | Path, *, trust_remote_code: bool = False) -> SourceModel:
    """Check that ``path`` is a convertible Hugging Face causal-LM folder, or raise :class:`SourceError`."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise SourceError(f"model folder {folder} does not exist: pass the path of a Hugging Face model folder")
    if not folder.is_dir():
        raise SourceError(
            f"{folder} is a file: --slm-model takes a Hugging Face model folder (config.json, weights, tokenizer)"
        )
    folder = folder.resolve()
    if not any(folder.iterdir()):
        raise SourceError(f"model folder {folder} is empty: expected config.json, *.safetensors and tokenizer files")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{folder} has no config.json: is it a Hugging Face model folder (save_pretrained)?")
    config = _read_json(config_path, "the model config")
    architectures = config.get("architectures") or []
    architecture = str(architectures[0]) if isinstance(architectures, list) and architectures else ""
    if not config.get("model_type") or not architecture:
        raise SourceError(f"{config_path} has no model_type/architectures: it is not a transformers model config")
    if config.get("auto_map") and not trust_remote_code:
        raise SourceError(
            f"{folder} needs its own Python code (config.json auto_map); it is not run unless you trust it: "
            "pass --slm-trust-remote-code"
        )
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise SourceError(
            f"architecture {architecture} ({folder}) is not supported by the ONNX Runtime GenAI model builder; "
            f"supported include LlamaForCausalLM, MistralForCausalLM, Phi3ForCausalLM, Qwen2ForCausalLM, "
            "Qwen3ForCausalLM, GemmaForCausalLM"
        )
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise SourceError(
            f"{folder} has no tokenizer (tokenizer.json or tokenizer.model): save it with tokenizer.save_pretrained"
        )
    tokenizer_config_path = folder / "tokenizer_config.json"
    tokenizer_config = (
        _read_json(tokenizer_config_path, "the tokenizer config") if tokenizer_config_path.is_file() else {}
    )
    return SourceModel(
        path=folder,
        config=config,
        architecture=architecture,
        weight_files=_weight_files(folder),
        chat_template=_chat_template(folder, tokenizer_config),
        tokenizer_config=tokenizer_config,
    )


def iter_files(folder: Path) -> Iterator[Path]:
    """Files of a model folder in a stable order, leaving out VCS and tool caches."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _IGNORED_PARTS)
        for name in sorted(files):
            yield Path(root) / name


# What the build reads (Olive's HfModel, transformers, the tokenizer and chat template); a case file,
# a README or a picture in the model folder changes nothing that is built, so it does not count.
_BUILD_SUFFIXES = frozenset({".json", ".safetensors", ".model", ".jinja", ".tiktoken", ".py"})
_BUILD_NAMES = frozenset({"merges.txt", "vocab.txt"})


def is_build_input(relative: Path) -> bool:
    """Whether a file of the model folder is read by the build (and so belongs in the fingerprint)."""
    if relative.name.startswith("slm_cases"):
        return False
    return relative.suffix in _BUILD_SUFFIXES or relative.name in _BUILD_NAMES


def build_inputs(folder: Path) -> Iterator[Path]:
    """The files the build reads, in a stable order; a FIFO or device among them is an error, not a hang."""
    for file in iter_files(folder):
        if not is_build_input(file.relative_to(folder)):
            continue
        try:
            mode = file.stat().st_mode
        except OSError as exc:
            raise SourceError(f"{file} cannot be read ({exc.strerror}): fix or remove it") from None
        if not stat.S_ISREG(mode):
            raise SourceError(f"{file} is not a regular file (a pipe, socket or device): replace it with the file")
        yield file


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# A file changed this recently may change again within one timestamp tick (a second on some
# filesystems) without its stat showing it: its hash is reused only once it has been still this long.
_SETTLED_NS = 2_000_000_000


def _stamp(st: os.stat_result) -> list[int]:
    """What no one restores by accident: ``touch -r`` puts back the mtime, never the ctime (the kernel sets it)."""
    return [st.st_ino, st.st_ctime_ns, st.st_size, st.st_mtime_ns]


class HashCache:
    """SHA-256 of files, reused while their inode, ctime, size and mtime are unchanged (a JSON file keyed by path).

    Only a cache: a lost or damaged file costs a re-hash, never a wrong answer.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._known = self._load()
        self._updated = dict(self._known)

    def _load(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def sha256(self, file: Path, st: os.stat_result | None = None, *, reuse: bool = True) -> str:
        """The file's hash: the recorded one while its stamp is unchanged (and ``reuse``), else computed now."""
        st = st if st is not None else file.stat()
        key, stamp = str(file), _stamp(st)
        entry = self._known.get(key)
        if reuse and isinstance(entry, dict) and entry.get("stat") == stamp and isinstance(entry.get("sha256"), str):
            return str(entry["sha256"])
        started = time.time_ns()
        digest = sha256_file(file)
        if st.st_ctime_ns + _SETTLED_NS <= started:
            self._updated[key] = {"stat": stamp, "sha256": digest}
        else:
            self._updated.pop(key, None)
        return digest

    def save(self) -> None:
        """Write the hashes learnt (atomically); a cache that cannot be written is left as it was."""
        if self.path is None or self._updated == self._known:
            return
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self._updated))
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return
        self._known = dict(self._updated)


def fingerprint(folder: Path, *, stat_cache_dir: Path | None = None) -> str:
    """A content hash of what the build reads in the folder; file hashes are reused while a file's stat stamp
    is unchanged.

    The reuse makes a warm run cost one ``stat`` per file; a changed file is hashed again.
    """
    hashes = HashCache(stat_cache_dir / STAT_CACHE_NAME if stat_cache_dir else None)
    total = hashlib.sha256()
    for file in build_inputs(folder):
        try:
            digest = hashes.sha256(file)
        except OSError as exc:
            raise SourceError(f"{file} cannot be read ({exc.strerror}): fix its permissions or copy it again") from None
        total.update(f"{file.relative_to(folder).as_posix()}\0{digest}\n".encode())
    hashes.save()
    return total.hexdigest()
