"""Checks of a repgeo store: its JSON Schema, its own consistency, the data of its done prompts, and (deep) every
chunk and the digests recorded at creation.

:func:`require_consistent` runs the cheap checks (metadata, listing keys, reading small arrays; never the hidden
states), which every job runs before computing; :func:`validate_store` is ``repgeo validate``. An activation store
from before digests were recorded (no ``digests`` attribute) is checked without them: its texts, labels and
lengths are then covered only by their chunks' checksums, where it has them.
"""

from __future__ import annotations

import json
import os

import numpy as np
import zarr

from ..errors import UserError
from . import activations, lens_results, results, sae_results
from .activations import PER_PROMPT
from .zarr_io import (UnreadableGroup, array_digest, chunk_key, describe_error, open_repgeo_group, open_zarr_group,
                      repgeo_kind, stored_keys)

#: The JSON Schemas ship inside the package (the top-level schemas/ of the repository links here).
SCHEMA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "schemas")
SCHEMA_FILES = {"activations": "activation-store.schema.json", "results": "results.schema.json",
                "sae_cooccurrence": "sae-cooccurrence.schema.json", "lens": "lens-results.schema.json",
                "relations": "relations-results.schema.json", "markov": "markov-results.schema.json"}
#: Each store kind's own layout checks, kept in the module that owns its names and dtypes.
LAYOUTS = {"activations": activations.layout_problems, "results": results.layout_problems,
           "lens": lens_results.layout_problems, "sae_cooccurrence": sae_results.layout_problems}
#: Arrays written once whose size grows with the prompts' lengths: only ``--deep`` reads them for their digests.
GROWING = {"text", "input_ids"}
#: Prompts named in one problem line; the rest are counted.
LISTED = 10
#: Problems of the chunk-by-chunk reading listed before the rest are summarised.
LIMIT = 20


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


def _describe(attributes: dict, arrays: dict) -> dict:
    description = {}
    for name, array in arrays.items():
        meta = array.metadata.to_dict()
        data_type = meta["data_type"]
        description[name] = {
            "dimension_names": list(meta.get("dimension_names") or []),
            "data_type": data_type if isinstance(data_type, str) else data_type.get("name"),
            "shape": list(array.shape),
            "chunks": list(array.chunks),
            "shards": list(array.shards) if array.shards else None,
            "codecs": _codec_names(array),
        }
    return {"attributes": attributes, "arrays": description}


def describe_store(group) -> dict:
    """The JSON document a schema checks: root attributes plus, per array, its dims, dtype, shape and chunking."""
    return _describe(dict(group.attrs), dict(group.arrays()))


def open_store(path: str) -> tuple:
    """(group, kind) of the repgeo store at ``path``, whatever its kind; :class:`UserError` if it is none."""
    group = open_zarr_group(path, "repgeo store")
    kind = repgeo_kind(group)
    if kind not in SCHEMA_FILES:
        raise UserError(f"{path} is a Zarr store but not a repgeo store (no repgeo.kind attribute); give the path of "
                        f"a store written by repgeo")
    return group, kind


def require_consistent(path: str, kind: str, mode: str = "r") -> zarr.Group:
    """The store at ``path``, opened (``mode`` "r" or "r+") once it passed the cheap checks; else :class:`UserError`.

    ``kind``: "activations", "results" or "sae_cooccurrence". Checks the schema (so every root attribute a job
    reads has its type), shapes against each other and the model, the consolidated metadata against each array's
    own, that ``done`` and the small arrays read (checksums) and match their digests, and that every done prompt's
    chunks exist. Reads no hidden states: about 0.3 s for 1000 prompts and 1–2 s for 5000 on two cores, mostly
    reading ``done`` (one chunk per prompt, which the jobs read anyway) and listing the chunk keys.
    """
    group = open_repgeo_group(path, kind, mode)
    problems = store_problems(path, group, kind)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{path} is damaged: {problems[0]}{more}; run repgeo validate {path} for the full list, then "
                        f"restore the store from a copy or compute it again")
    return group


def validate_store(path: str, deep: bool = False) -> list:
    """Problems found in the store at ``path`` (empty when valid). Raises :class:`UserError` if it is no store.

    ``deep`` also reads every chunk (checksums, NaN padding, bfloat16 bits) and compares every array written at
    creation with its recorded digest.
    """
    try:
        group, kind = open_store(path)
    except UnreadableGroup as e:  # a store with a damaged root: the finding itself, not a wrong path
        return [str(e)]
    return store_problems(path, group, kind, deep)


def store_problems(path: str, group: zarr.Group, kind: str, deep: bool = False) -> list:
    """Problems of ``group`` (opened from ``path``), the first the most basic: later checks trust earlier ones."""
    arrays, problems = _own_arrays(path, group)
    if problems:
        return problems
    description = _describe(dict(group.attrs), arrays)
    problems = _schema_problems(description, kind)
    if problems:  # the checks below rely on the types and arrays the schema pins
        return problems
    problems = _dimension_problems(description["arrays"])
    problems += LAYOUTS.get(kind, lambda _: [])(description)
    if problems:
        return problems
    if kind == "activations":
        return _activation_data(group, description["attributes"].get("digests"), deep)
    problems = _read_done(group)[1] if "done" in arrays else []  # stores written whole at once have no done
    return problems + (_unreadable_chunks(group) if deep else [])


def _own_arrays(path: str, group: zarr.Group) -> tuple:
    """(name → array opened from its own zarr.json, problems): unreadable metadata, and consolidated metadata (what
    zarr and xarray read by default) that differs from the arrays' own (what a reader without it gets)."""
    consolidated = group.metadata.consolidated_metadata
    try:
        own = zarr.open_group(path, mode="r", zarr_format=3, use_consolidated=False)
        names = sorted(consolidated.metadata) if consolidated else sorted(own.array_keys())
    except Exception as e:
        return {}, [f"the arrays cannot be listed ({describe_error(e)})"]
    arrays, problems = {}, []
    for name in names:
        try:
            arrays[name] = own[name]
        except Exception as e:
            problems.append(f"{name}/zarr.json is missing or unreadable ({describe_error(e)})")
            continue
        copy = consolidated.metadata[name].to_dict() if consolidated else None
        if copy is not None and _as_json(copy) != _as_json(arrays[name].metadata.to_dict()):
            problems.append(f"{name}/zarr.json differs from its copy in the consolidated metadata of zarr.json "
                            f"(one of them was edited)")
    return arrays, problems


def _as_json(metadata: dict) -> str:
    return json.dumps(metadata, sort_keys=True, default=str)  # default=str: enums, NaN fill values alike


def _schema_problems(description: dict, kind: str) -> list:
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema(kind))
    problems = []
    for error in sorted(validator.iter_errors(description), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        problems.append(f"schema: {where}: {error.message}")
    return problems


def _dimension_problems(arrays: dict) -> list:
    """Every dim has one size across arrays, and no chunk (or shard) exceeds its array: repgeo never writes one,
    so it means a shape was edited (zarr would crop or pad the chunk's values silently)."""
    problems, sizes = [], {}
    for name in sorted(arrays, key=lambda n: -len(arrays[n]["shape"])):  # the largest arrays name the sizes
        spec = arrays[name]
        for dim, size in zip(spec["dimension_names"], spec["shape"]):
            first, first_size = sizes.setdefault(dim, (name, size))
            if size != first_size:
                problems.append(f"{name} has {size} along {dim}, {first} has {first_size}")
        if any(c > max(s, 1) for c, s in zip(spec["shards"] or spec["chunks"], spec["shape"])):
            problems.append(f"{name} has shape {spec['shape']} but chunks of {spec['shards'] or spec['chunks']}")
    return problems


def _prompts(indices) -> str:
    indices = [int(p) for p in indices]
    shown = ", ".join(map(str, indices[:LISTED]))
    return shown + (f" and {len(indices) - LISTED} more" if len(indices) > LISTED else "")


def _read_done(group: zarr.Group) -> tuple:
    """(done, problems): every chunk of ``done`` read; a chunk that fails its checksum counts as not done."""
    array = group["done"]
    try:
        return array[...], []
    except Exception:  # find the chunks at fault, one at a time
        pass
    done, bad, error = np.zeros(array.shape, dtype=bool), [], None
    step = array.chunks[0]
    for c in range(array.cdata_shape[0]):
        try:
            done[c * step: (c + 1) * step] = array.get_block_selection((c,))
        except Exception as e:
            bad.append(c * step)
            error = e
    where = "prompt" if step == 1 else "chunk starting at prompt"
    return done, [f"done is corrupted at {where} {_prompts(bad)} ({describe_error(error)})"]


def _activation_data(group: zarr.Group, digests, deep: bool) -> list:
    done, problems = _read_done(group)
    try:
        n_tokens = group["n_tokens"][...]
    except Exception as e:
        return problems + [f"n_tokens is unreadable ({describe_error(e)})"]
    width = group["hidden"].shape[2]
    outside = (n_tokens < 1) | (n_tokens > width)
    if outside.any():
        problems.append(f"n_tokens must lie in 1..{width}, but not at prompts {_prompts(np.flatnonzero(outside))}")
    problems += _written_once(group, digests, deep)
    problems += _layer_problems(group)
    problems += _missing_chunks(group, done, n_tokens)
    if deep and not problems:
        problems += _activation_chunks(group, n_tokens, done)
    return problems


def _layer_problems(group: zarr.Group) -> list:
    """The ``layer`` coordinate holds the layer numbers the store has: all the model's, or those its ``layers``
    attribute names."""
    try:
        layers = group["layer"][...]
    except Exception as e:
        return [f"layer is unreadable ({describe_error(e)})"]
    held = group.attrs.get("layers", list(range(len(layers))))
    if layers.tolist() != held:
        return [f"layer holds {layers.tolist()[:LISTED]}, but the store's layers are {held[:LISTED]}"]
    return []


def _written_once(group: zarr.Group, digests, deep: bool) -> list:
    """Arrays written at creation against their sha256 digests: the cheap check reads those with one value per
    prompt (labels, lengths, text digests), ``deep`` also texts and token ids, and reads arrays without a digest
    (all, in an older store; any added later) for their checksums."""
    problems = []
    for name, array in group.arrays():
        recorded = (digests or {}).get(name)
        if name in PER_PROMPT or (not deep and (recorded is None or name in GROWING)):
            continue
        try:
            values = array[...]
        except Exception as e:
            problems.append(f"{name} is unreadable ({describe_error(e)})")
            continue
        if recorded is not None and array_digest(values) != recorded:
            problems.append(f"{name} differs from the digest recorded when the store was created: its values were "
                            f"changed afterwards")
    return problems


def _missing_chunks(group: zarr.Group, done: np.ndarray, n_tokens: np.ndarray) -> list:
    """Done prompts whose chunks are absent from the store (listing keys only; nothing is read).

    zarr writes no chunk that is entirely the fill value (NaN): a done prompt's ``hidden`` shard always exists, but
    ``token_loss`` and ``loss`` only when the prompt has more than one token (the first token has no loss).
    """
    problems = []
    several = done & (n_tokens > 1)
    for name, needed in (("hidden", done), ("token_loss", several), ("loss", several)):
        array = group[name]
        present = stored_keys(array)
        rest = (0,) * (array.ndim - 1)  # one chunk (shard) per prompt spans the other dims
        missing = [p for p in np.flatnonzero(needed) if chunk_key(array, (int(p), *rest)) not in present]
        if missing:
            problems.append(f"{name} has no data for done prompts {_prompts(missing)} (chunk files deleted?)")
    return problems


def _activation_chunks(group: zarr.Group, n_tokens: np.ndarray, done: np.ndarray) -> list:
    """Read every prompt's data (one shard at a time: bounded memory) and check values against the layout."""
    problems = []
    bf16 = group.attrs["dtype"] == "bfloat16"
    for p in range(len(n_tokens)):
        if len(problems) >= LIMIT:
            problems.append("… more problems not listed")
            break
        n = int(n_tokens[p])
        try:
            hidden = group["hidden"][p]
            ids = group["input_ids"][p]
            token_loss = group["token_loss"][p]
            group["loss"][p]
        except Exception as e:  # a checksum mismatch or an unreadable chunk
            problems.append(f"prompt {p}: unreadable ({describe_error(e)})")
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


def _unreadable_chunks(group: zarr.Group) -> list:
    """Every chunk of every array read, one at a time (bounded memory): those failing their checksum."""
    problems = []
    for name, array in group.arrays():
        for block in np.ndindex(*array.cdata_shape):
            if len(problems) >= LIMIT:
                return problems + ["… more problems not listed"]
            try:
                array.get_block_selection(block)
            except Exception as e:
                problems.append(f"{name} chunk {block} is unreadable ({describe_error(e)})")
    return problems
