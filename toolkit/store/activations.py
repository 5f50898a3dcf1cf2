"""The activation store: ``hidden[prompt, layer, token, dim]`` and what belongs to it, as a Zarr v3 group.

Layout (specified in ``schemas/activation-store.schema.json``):

- ``hidden`` (prompt, layer, token, dim): layer 0 is the embedding output, layer i the output of block i, as in
  transformers' ``hidden_states``. One chunk per (prompt, layer) slab, one shard per prompt, so ranks that own
  disjoint prompts never share a shard. Blosc-zstd with byte shuffle, then a crc32c checksum per chunk.
  Positions at or past ``n_tokens`` hold NaN. bfloat16 is kept exactly as float32 values whose low 16 bits
  are zero (the shuffle lets the compressor drop them), so every reader gets float32 without conversion.
- ``input_ids`` (prompt, token) int32 (-1 past ``n_tokens``), ``n_tokens`` (prompt) int32.
- ``token_loss`` (prompt, token) float32: −log p(token t | tokens < t) in nats; NaN at t = 0 and past n_tokens.
- ``loss`` (prompt) float32: mean of ``token_loss`` over the prompt.
- ``done`` (prompt) bool: set only after the prompt's other data is completely written.
- ``prompt``, ``layer``: index coordinates; ``text`` (or ``text_sha256``) and one array per label on ``prompt``.

Every array but the four written prompt by prompt (``PER_PROMPT``) is written once, at creation; the root attribute
``digests`` keeps the sha256 of each (:func:`~toolkit.store.zarr_io.array_digest`), so that ``repgeo validate``
catches a text, label, length or token id changed afterwards, even one changed consistently through zarr.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from ..errors import UserError
from ..runtime.partial import Partial
from .zarr_io import (CHECKSUM, array_digest, consolidate, eager_labels, is_url, label_array, open_repgeo_group,
                      quiet_zarr, write_1d)

KIND = "activations"
SCHEMA_VERSION = "1.0"
STORED_DTYPES = {"float16": "float16", "bfloat16": "float32", "float32": "float32"}
#: Arrays of the layout; every other array on ``prompt`` is a label.
#: Arrays of ``extract --contributions``: name → (dims, description). ``block`` b reads layer b, writes layer b + 1.
CONTRIBUTIONS = {
    "head_norm": (("prompt", "block", "head", "token"), "L2 norm of each head's write into the residual stream"),
    "head_cosine": (("prompt", "block", "head", "token"),
                    "cosine of each head's write with the residual stream entering the block"),
    "resid_norm": (("prompt", "block", "token"), "L2 norm of the residual stream entering the block"),
    "attn_norm": (("prompt", "block", "token"), "L2 norm of the attention's write"),
    "mlp_norm": (("prompt", "block", "token"), "L2 norm of the MLP's write"),
    "attn_share": (("prompt", "block", "token"), "|attn| / (|attn| + |stream entering the block|)"),
    "mlp_share": (("prompt", "block", "token"), "|mlp| / (|mlp| + |stream after the attention|)"),
    "flow": (("prompt", "target", "layer", "token"),
             "importance of each (layer, token) node for the target token; sums to 1 over token"),
    "grad_norm": (("prompt", "target", "layer", "token"),
                  "L2 norm of the gradient of the target's predicted-token log-probability w.r.t. each hidden state"),
}
LAYOUT = {"hidden", "input_ids", "n_tokens", "token_loss", "loss", "done", "prompt", "layer", "text", "text_sha256",
          "block", "head", "flow_target", *CONTRIBUTIONS}
#: Arrays the ranks write prompt by prompt; all others are written once, at creation, with a digest.
PER_PROMPT = ("hidden", "token_loss", "loss", "done", *CONTRIBUTIONS)


def reserved_names() -> set:
    """Names labels may not take: the activation store's arrays and dims, and every name of the stores derived
    from it (results, lens), which carry every label as a coordinate on ``prompt``."""
    from .lens_results import NAMES as LENS_NAMES
    from .results import NAMES as RESULTS_NAMES

    return LAYOUT | {"token", "dim", "target"} | RESULTS_NAMES | LENS_NAMES


def _compressors(dtype: str):
    itemsize = np.dtype(STORED_DTYPES[dtype]).itemsize
    return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=itemsize), CHECKSUM]


def label_arrays(plan_prompts: list) -> dict:
    """Label name → 1-D array over the planned prompts, in first-seen order of names."""
    names = []
    for p in plan_prompts:
        names.extend(k for k in p.labels if k not in names)
    reserved = reserved_names()
    clash = sorted(set(names) & reserved)
    if clash:
        raise UserError(f"label {clash[0]!r} collides with an array of the activation store or of the stores made "
                        f"from it; rename that field in the prompt file (reserved: {', '.join(sorted(reserved))})")
    return {name: label_array([p.labels.get(name) for p in plan_prompts]) for name in names}


def create_activation_store(path: str, plan, *, n_layers: int, d_model: int, dtype: str, attrs: dict,
                            withhold_texts: bool, contributions: dict | None = None) -> zarr.Group:
    """Create the store with its plan (ids, lengths, labels, texts) written and no prompt done.

    contributions: for ``extract --contributions``, {"heads": H, "targets": positions per prompt (list of
    arrays), "gradients": bool}; the arrays of :data:`CONTRIBUTIONS` are added (grad_norm with gradients).

    It is built in a partial directory this job owns (:class:`~toolkit.runtime.partial.Partial`) and renamed
    into place only when complete, so a store at ``path`` always has its full metadata, whatever moment a run is
    killed at.
    """
    quiet_zarr()
    with Partial(path, "repgeo extract") as partial:
        _build_activation_store(partial.path, plan, n_layers=n_layers, d_model=d_model, dtype=dtype, attrs=attrs,
                                withhold_texts=withhold_texts, contributions=contributions)
        partial.finish()
    return zarr.open_group(path, mode="r+", zarr_format=3)


def _build_activation_store(partial: str, plan, *, n_layers, d_model, dtype, attrs, withhold_texts, contributions):
    build_activation_store(partial, input_ids=[p.input_ids for p in plan.prompts],
                           texts=prompt_texts([p.text for p in plan.prompts], withhold_texts),
                           labels=label_arrays(plan.prompts), layers=np.arange(n_layers, dtype=np.int64),
                           d_model=d_model, dtype=dtype, attrs=attrs, contributions=contributions)


def prompt_texts(texts: list, withhold: bool) -> dict:
    """The store's texts over prompts: {"text": (prompt,) strings}, or {"text_sha256": their sha256} when withheld."""
    if withhold:
        return {"text_sha256": np.array([hashlib.sha256(t.encode()).hexdigest() for t in texts], dtype=object)}
    return {"text": np.array(texts, dtype=object)}


def build_activation_store(partial: str, *, input_ids: list, texts: dict, labels: dict, layers: np.ndarray,
                           d_model: int, dtype: str, attrs: dict, contributions: dict | None):
    """Create an activation store with no prompt done in the new directory ``partial`` (of a
    :class:`~toolkit.runtime.partial.Partial`), from arrays: what extract derives from its plan, and what
    ``repgeo subset`` and ``merge`` copy from their sources.

    input_ids: one (token,) int array per prompt (their lengths are ``n_tokens``; the token dim is the longest);
    texts: as :func:`prompt_texts` gives; labels: name → (prompt,) array, in the order of the ``coordinates``
    attribute; layers: the model's layer numbers the store holds, the ``layer`` coordinate (0 … n_layers for
    extract; fewer in a subset, then without contributions); contributions: as for :func:`create_activation_store`.
    """
    n_prompts = len(input_ids)
    n_tokens = np.array([len(row) for row in input_ids], dtype=np.int32)
    n_layers = len(layers)
    width = int(n_tokens.max())
    coords = " ".join(["n_tokens", *texts, *labels])

    group = zarr.create_group(partial, zarr_format=3)
    group.attrs.update(dict(attrs, repgeo={"kind": KIND, "schema_version": SCHEMA_VERSION}))
    group.create_array(
        "hidden", shape=(n_prompts, n_layers, width, d_model), dtype=STORED_DTYPES[dtype],
        chunks=(1, 1, width, d_model), shards=(1, n_layers, width, d_model), compressors=_compressors(dtype),
        fill_value=np.nan, dimension_names=["prompt", "layer", "token", "dim"],
        attributes={"coordinates": coords, "stored_dtype": dtype, "long_name": "hidden states",
                    "description": "layer 0 = embedding output, layer i = output of block i (transformers "
                                   "hidden_states); NaN past n_tokens"},
    )
    ids = np.full((n_prompts, width), -1, dtype=np.int32)
    for i, row in enumerate(input_ids):
        ids[i, : len(row)] = row
    group.create_array("input_ids", shape=ids.shape, chunks=(min(n_prompts, 256), width), dtype="int32",
                       fill_value=-1, dimension_names=["prompt", "token"], compressors=_compressors("float32"),
                       attributes={"description": "token ids; -1 past n_tokens"})[...] = ids
    group.create_array("token_loss", shape=(n_prompts, width), chunks=(1, width), dtype="float32",
                       fill_value=np.nan, dimension_names=["prompt", "token"], compressors=[CHECKSUM],
                       attributes={"units": "nats", "coordinates": coords,
                                   "description": "-log p(token t | tokens < t); NaN at t=0 and past n_tokens"})
    # One chunk per prompt: each is written by the rank that owns the prompt, never by two.
    group.create_array("loss", shape=(n_prompts,), chunks=(1,), dtype="float32", fill_value=np.nan,
                       dimension_names=["prompt"], compressors=[CHECKSUM],
                       attributes={"units": "nats", "description": "mean token_loss of the prompt"})
    group.create_array("done", shape=(n_prompts,), chunks=(1,), dtype="bool", fill_value=False,
                       dimension_names=["prompt"], compressors=[CHECKSUM],
                       attributes={"description": "true once the prompt's data is completely written"})
    write_1d(group, "layer", layers, "layer", {"description": "0 = embeddings, i = output of block i"})
    written_once = {}
    if contributions:
        written_once = _contribution_arrays(group, contributions, n_prompts, n_layers, width, coords)
    on_prompt = {"n_tokens": n_tokens, "prompt": np.arange(n_prompts, dtype=np.int64), **texts, **labels}
    for name, values in on_prompt.items():
        write_1d(group, name, values, "prompt")
    group.attrs["digests"] = {name: array_digest(values) for name, values in
                              {"input_ids": ids, "layer": layers, **written_once, **on_prompt}.items()}
    consolidate(partial)


def _contribution_arrays(group, spec: dict, n_prompts: int, n_layers: int, width: int, coords: str) -> dict:
    """Create the arrays of :data:`CONTRIBUTIONS` (one chunk per prompt: each written by the rank that owns it)
    and write the coordinates; returns those written once (name → values) for the digests."""
    n_targets = max(1, max(len(t) for t in spec["targets"]))
    sizes = {"block": n_layers - 1, "head": spec["heads"], "token": width, "target": n_targets, "layer": n_layers}
    for name, (dims, description) in CONTRIBUTIONS.items():
        if name == "grad_norm" and not spec["gradients"]:
            continue
        shape = (n_prompts, *(sizes[d] for d in dims[1:]))
        group.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype="float32", fill_value=np.nan,
                           dimension_names=list(dims), compressors=_compressors("float32"),
                           attributes={"description": description, "coordinates": coords})
    positions = np.full((n_prompts, n_targets), -1, dtype=np.int32)
    for i, targets in enumerate(spec["targets"]):
        positions[i, : len(targets)] = targets
    group.create_array("flow_target", shape=positions.shape, chunks=positions.shape, dtype="int32", fill_value=-1,
                       dimension_names=["prompt", "target"], compressors=_compressors("float32"),
                       attributes={"description": "token position of each flow target (-1: none)"})[...] = positions
    blocks, heads = np.arange(n_layers - 1, dtype=np.int64), np.arange(spec["heads"], dtype=np.int64)
    write_1d(group, "block", blocks, "block", {"description": "block b reads layer b and writes layer b + 1"})
    write_1d(group, "head", heads, "head")
    return {"flow_target": positions, "block": blocks, "head": heads}


def layer_position(group: zarr.Group, layer: int, path: str, option: str = "--layer") -> int:
    """Where the model's layer number ``layer`` sits along ``hidden``'s layer dim (a subset store holds only some
    layers; its ``layer`` coordinate names them); UserError naming the layers held when it is not there."""
    held = group["layer"][:].tolist()
    if layer not in held:
        shown = f"{held[0]}..{held[-1]}" if held == list(range(held[0], held[-1] + 1)) else ", ".join(map(str, held))
        raise UserError(f"{option} {layer} is out of range: {path} holds layers {shown} (0 = embeddings); choose one "
                        f"of them")
    return held.index(layer)


def read_done_slab(group: zarr.Group, path: str, prompt: int, position: int, start: int, stop: int) -> np.ndarray:
    """hidden[prompt, position, start:stop] as float32 (token, dim), refused when it is not all finite.

    A prompt marked done always has finite values within n_tokens; NaN there means a chunk is missing or was
    overwritten, and computing on it would store NaN (or garbage) as if it were a result.
    """
    X = np.asarray(group["hidden"][prompt, position, start:stop], dtype=np.float32)
    if not np.isfinite(X).all():
        layer = int(group["layer"][position])
        raise UserError(f"{path}: prompt {prompt} is marked done but its hidden states at layer {layer} are missing "
                        f"or not finite; run repgeo validate {path} and re-extract that store")
    return X


def open_activation_group(path: str, mode: str = "r") -> zarr.Group:
    """The store's Zarr group, after checking that it is a repgeo activation store of a known schema version."""
    group = open_repgeo_group(path, KIND, mode)
    version = group.attrs["repgeo"].get("schema_version")
    if str(version).split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise UserError(f"{path} has activation-store schema {version}, this toolkit reads {SCHEMA_VERSION}; "
                        f"use a matching repgeo version")
    return group


def source_identity(path: str, group: zarr.Group) -> dict:
    """What identifies an activation store (``group``, opened from ``path``) that a derived store was computed from."""
    a = dict(group.attrs)
    return {"path": path if is_url(path) else os.path.abspath(path), "created": a["created"], "model": a["model"]["id"],
            "weights_sha256": a["model"].get("weights_sha256"), "prompts_sha256": a["prompts"]["sha256"],
            "settings": a["settings"], "dtype": a["dtype"], "n_prompts": int(group["hidden"].shape[0])}


def open_activations(path: str):
    """Open an activation store as a lazy xarray Dataset with dims (prompt, layer, token, dim), hidden as float32.

    Labels, texts and ``n_tokens`` are coordinates on ``prompt``. Nothing is loaded until used.
    """
    import xarray as xr

    open_activation_group(path)
    quiet_zarr()
    ds = eager_labels(xr.open_zarr(path))
    if ds.hidden.dtype != np.float32:
        ds["hidden"] = ds.hidden.astype(np.float32)
    return ds


class PromptWriter:
    """Writes one prompt's data into an open store; ``done`` is set last, only after everything else is written."""

    def __init__(self, group: zarr.Group):
        self.hidden = group["hidden"]
        self.token_loss = group["token_loss"]
        self.loss = group["loss"]
        self.done = group["done"]
        self.contributions = {name: group[name] for name in CONTRIBUTIONS if name in group}
        _, n_layers, self.width, d_model = self.hidden.shape
        self._slab = np.full((n_layers, self.width, d_model), np.nan, dtype=self.hidden.dtype)

    def write(self, prompt: int, hidden: np.ndarray, token_loss: np.ndarray, contributions: dict | None = None):
        """``hidden``: (layer, token, dim) of the prompt's n_tokens positions; ``token_loss``: (token,) nats;
        ``contributions``: name → array over the prompt's n_tokens positions (last dim), or None."""
        n = hidden.shape[1]
        self._slab[:, :n] = hidden
        self._slab[:, n:] = np.nan
        self.hidden[prompt] = self._slab  # the whole shard in one write
        row = np.full(self.width, np.nan, dtype=np.float32)
        row[:n] = token_loss
        self.token_loss[prompt] = row
        self.loss[prompt] = np.float32(np.nanmean(token_loss)) if n > 1 else np.float32(np.nan)
        for name, array in self.contributions.items():
            full = np.full(array.shape[1:], np.nan, dtype=np.float32)
            value = contributions[name]
            full[tuple(slice(0, s) for s in value.shape)] = value  # targets and tokens past the prompt stay NaN
            array[prompt] = full
        self.done[prompt] = True


def layout_problems(description: dict) -> list:
    """Problems of an activation store's layout: chunking, shapes against the model, dtype, texts, counts.

    description: what `toolkit.store.validate.describe_store` gives, after the schema check.
    """
    arrays, attrs = description["arrays"], description["attributes"]
    hidden = arrays["hidden"]
    n_prompts, n_layers, width, d_model = hidden["shape"]
    problems = []
    if hidden["chunks"] != [1, 1, width, d_model] or hidden["shards"] != [1, n_layers, width, d_model]:
        problems.append(f"hidden has shape {hidden['shape']} but chunks {hidden['chunks']} and shards "
                        f"{hidden['shards']}: not one (prompt, layer) slab per chunk and one prompt per shard")
    for name in ("input_ids", "token_loss"):
        if arrays[name]["chunks"][1] != width:
            problems.append(f"{name} has chunks of {arrays[name]['chunks'][1]} tokens, not all {width}")
    model = attrs["model"]
    held = attrs.get("layers")  # a layer subset (repgeo subset --layers) names the layers it holds
    if held is None and model["n_layers"] + 1 != n_layers:
        problems.append(f"hidden has {n_layers} layers, but the model has {model['n_layers']} blocks + embeddings")
    if held is not None and (len(held) != n_layers or held != sorted(set(held)) or held[-1] > model["n_layers"]):
        problems.append(f"the layers attribute {held} does not name hidden's {n_layers} layers, increasing, among "
                        f"the model's 0..{model['n_layers']}")
    if held is not None and "block" in arrays:
        problems.append("the store holds only some layers (layers attribute) but contribution arrays, which need "
                        "every layer")
    if model["d_model"] != d_model:
        problems.append(f"hidden has {d_model} along dim, but the model's d_model is {model['d_model']}")
    if hidden["data_type"] != STORED_DTYPES[attrs["dtype"]]:
        problems.append(f"hidden is {hidden['data_type']} but the dtype attribute says {attrs['dtype']}")
    if ("text" in arrays) == ("text_sha256" in arrays):
        problems.append("exactly one of text and text_sha256 must be present")
    if attrs["prompts"]["n_stored"] != n_prompts:
        problems.append(f"prompts.n_stored is {attrs['prompts']['n_stored']} but the store has {n_prompts} prompts")
    problems += [f"digests has an entry for {name}, which the store lacks"
                 for name in attrs.get("digests", {}) if name not in arrays]
    return problems
