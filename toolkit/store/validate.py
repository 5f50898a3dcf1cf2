"""``repgeo validate``: check a store against its JSON Schema, its own consistency, and (deep) every chunk."""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import UserError
from .zarr_io import quiet_zarr

SCHEMA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "schemas")
SCHEMA_FILES = {"activations": "activation-store.schema.json", "results": "results.schema.json",
                "sae_cooccurrence": "sae-cooccurrence.schema.json"}


def load_schema(kind: str) -> dict:
    path = os.path.join(SCHEMA_DIR, SCHEMA_FILES[kind])
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _codec_names(array) -> list:
    """Names of all codecs of an array, including those inside a sharding codec."""
    names = []
    for codec in array.metadata.to_dict().get("codecs", []):
        names.append(codec["name"])
        names.extend(inner["name"] for inner in codec.get("configuration", {}).get("codecs", []))
    return names


def describe_store(group) -> dict:
    """The JSON document a schema checks: root attributes plus, per array, its dims, dtype, shape and chunking."""
    arrays = {}
    for name, array in group.arrays():
        meta = array.metadata.to_dict()
        data_type = meta["data_type"]
        arrays[name] = {
            "dimension_names": list(meta.get("dimension_names") or []),
            "data_type": data_type if isinstance(data_type, str) else data_type.get("name"),
            "shape": list(array.shape),
            "chunks": list(array.chunks),
            "shards": list(array.shards) if array.shards else None,
            "codecs": _codec_names(array),
        }
    return {"attributes": dict(group.attrs), "arrays": arrays}


def _schema_problems(description: dict, kind: str) -> list:
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema(kind))
    problems = []
    for error in sorted(validator.iter_errors(description), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        problems.append(f"schema: {where}: {error.message}")
    return problems


def _activation_consistency(group, description: dict) -> list:
    arrays, attrs = description["arrays"], description["attributes"]
    problems = []
    if "hidden" not in arrays:
        return problems
    n_prompts, n_layers, width, d_model = arrays["hidden"]["shape"]
    for name, spec in arrays.items():
        if spec["dimension_names"][:1] == ["prompt"] and spec["shape"][0] != n_prompts:
            problems.append(f"{name} has {spec['shape'][0]} prompts, hidden has {n_prompts}")
    for name in ("input_ids", "token_loss"):
        if name in arrays and arrays[name]["shape"][1:] != [width]:
            problems.append(f"{name} has {arrays[name]['shape'][1:]} tokens, hidden has {width}")
    model = attrs.get("model", {})
    if model.get("n_layers") is not None and model["n_layers"] + 1 != n_layers:
        problems.append(f"hidden has {n_layers} layers, the model {model['n_layers']} blocks + embeddings")
    if model.get("d_model") is not None and model["d_model"] != d_model:
        problems.append(f"hidden has dim {d_model}, the model d_model {model['d_model']}")
    expected = {"float16": "float16", "bfloat16": "float32", "float32": "float32"}.get(attrs.get("dtype"))
    if expected and arrays["hidden"]["data_type"] != expected:
        problems.append(f"hidden is {arrays['hidden']['data_type']} but dtype says {attrs['dtype']}")
    if ("text" in arrays) == ("text_sha256" in arrays):
        problems.append("exactly one of text and text_sha256 must be present")
    if attrs.get("prompts", {}).get("n_stored") not in (None, n_prompts):
        problems.append(f"prompts.n_stored is {attrs['prompts']['n_stored']} but the store has {n_prompts} prompts")
    if "n_tokens" in arrays:
        n_tokens = group["n_tokens"][:]
        if n_tokens.min() < 1 or n_tokens.max() > width:
            problems.append(f"n_tokens must lie in 1..{width}")
    return problems


def _activation_chunks(group, limit: int = 20) -> list:
    """Read every prompt's data (one shard at a time: bounded memory) and check values against the layout."""
    problems = []
    n_tokens, done = group["n_tokens"][:], group["done"][:]
    bf16 = group.attrs.get("dtype") == "bfloat16"
    for p in range(len(n_tokens)):
        if len(problems) >= limit:
            problems.append("… more problems not listed")
            break
        n = int(n_tokens[p])
        try:
            hidden = group["hidden"][p]
            ids = group["input_ids"][p]
            token_loss = group["token_loss"][p]
            group["loss"][p]
        except Exception as e:  # a checksum mismatch or an unreadable chunk
            problems.append(f"prompt {p}: unreadable ({type(e).__name__}: {e})")
            continue
        if not done[p]:
            continue
        if not np.isfinite(hidden[:, :n]).all():
            problems.append(f"prompt {p}: non-finite hidden states within n_tokens")
        if not np.isnan(hidden[:, n:]).all():
            problems.append(f"prompt {p}: hidden past n_tokens is not NaN padding")
        if (ids[:n] < 0).any() or (ids[n:] != -1).any():
            problems.append(f"prompt {p}: input_ids padding is not -1 past n_tokens")
        if n > 1 and not np.isfinite(token_loss[1:n]).all():
            problems.append(f"prompt {p}: token_loss is not finite within n_tokens")
        if bf16 and (hidden[:, :n].view(np.uint32) & 0xFFFF).any():
            problems.append(f"prompt {p}: bfloat16 store holds values that are not bfloat16")
    return problems


def validate_store(path: str, deep: bool = False) -> list:
    """Problems found in the store at ``path`` (empty when valid). Raises :class:`UserError` if it is no store."""
    import zarr

    quiet_zarr()
    if not os.path.isfile(os.path.join(path, "zarr.json")):
        raise UserError(f"{path} is not a Zarr v3 store (no zarr.json); give the path of a repgeo store")
    group = zarr.open_group(path, mode="r", zarr_format=3)
    kind = dict(group.attrs).get("repgeo", {}).get("kind")
    if kind not in SCHEMA_FILES:
        raise UserError(f"{path} is a Zarr store but not a repgeo store (no repgeo.kind attribute)")
    description = describe_store(group)
    problems = _schema_problems(description, kind)
    if kind == "activations" and not problems:
        problems += _activation_consistency(group, description)
        if deep and not problems:
            problems += _activation_chunks(group)
    return problems
