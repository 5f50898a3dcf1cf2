"""The lens results store: what every layer's hidden states read as through the model's embeddings (Zarr v3).

Per-prompt variables have ``prompt`` as their first dim after ``decoder``, one chunk per prompt: the client
writes prompt after prompt and sets ``done`` last, so a run resumes per prompt. Self-contained: the vocabulary
(token id → text) and the prompts' token ids travel with the readings, and every label of the activation store
is a coordinate on ``prompt``. Specified in ``schemas/lens-results.schema.json``.
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from ..runtime.partial import Partial
from .activations import LAYOUT
from .zarr_io import consolidate, eager_labels, open_repgeo_group, quiet_zarr, source_prompt_problems, write_1d

KIND = "lens"
SCHEMA_VERSION = "1.0"
DECODERS = ("output", "input")

#: name → (dims, dtype, description). "output" decoder only: entropy, KL, next-token variables.
VARIABLES = {
    "lens_top_ids": (("decoder", "prompt", "layer", "token", "top"), "int32",
                     "token ids of the top readings, best first (-1 past n_tokens)"),
    "lens_top_scores": (("decoder", "prompt", "layer", "token", "top"), "float32",
                        "probability (output decoder) or cosine with the input embedding (input decoder)"),
    "lens_entropy": (("prompt", "layer", "token"), "float32", "entropy of the output decoder's distribution, bits"),
    "lens_kl_final": (("prompt", "layer", "token"), "float32",
                      "KL(final layer's distribution || this layer's), nats (0 at the final layer)"),
    "lens_next_logprob": (("prompt", "layer", "token"), "float32",
                          "output decoder's log-probability of the token that comes next, nats (NaN at the last "
                          "position)"),
    "lens_next_rank": (("prompt", "layer", "token"), "int32",
                       "vocabulary entries with a strictly greater logit than the next token (0 = top; -1 at the "
                       "last position)"),
    "lens_next_accuracy": (("prompt", "layer", "k"), "float64",
                           "share of positions whose next token is among the output decoder's top k"),
}
#: Every name of a lens store but the labels it carries: variables and coordinates.
NAMES = set(VARIABLES) | {"input_ids", "done", "prompt", "n_tokens", "decoder", "layer", "top", "k", "vocab",
                          "vocab_id"}
OUTPUT_ONLY = ("lens_entropy", "lens_kl_final", "lens_next_logprob", "lens_next_rank", "lens_next_accuracy")


def _fill(dtype: str):
    return -1 if dtype.startswith("int") else np.nan


def lens_variables(decoders) -> list:
    """The variables a lens run with these decoders writes."""
    return [name for name in VARIABLES if "output" in decoders or name not in OUTPUT_ONLY]


def create_lens_store(path: str, *, source, decoders, layers, top_k: int, ks, vocab, attrs: dict):
    """Create the lens store for ``source`` (the activation store's zarr group) with empty variables.

    decoders: names from DECODERS; layers: the store's layer numbers read (the ``layer`` coordinate); ks: the
    accuracy sizes; vocab: (vocab_id,) token texts. Built in a partial directory this job owns.
    """
    quiet_zarr()
    with Partial(path, "repgeo lens") as partial:
        _build(partial.path, source=source, decoders=decoders, layers=layers, top_k=top_k, ks=ks, vocab=vocab,
               attrs=attrs)
        partial.finish()


def _build(directory: str, *, source, decoders, layers, top_k, ks, vocab, attrs):
    n_prompts, _, width, _ = source["hidden"].shape
    sizes = {"decoder": len(decoders), "prompt": n_prompts, "layer": len(layers), "token": width, "top": top_k,
             "k": len(ks)}
    labels = [name for name, _ in source.arrays() if name not in LAYOUT]
    coords = " ".join(["n_tokens", *labels])
    group = zarr.create_group(directory, zarr_format=3)
    group.attrs.update(dict(attrs, repgeo={"kind": KIND, "schema_version": SCHEMA_VERSION}))
    for name in lens_variables(decoders):
        dims, dtype, description = VARIABLES[name]
        shape = tuple(sizes[d] for d in dims)
        chunks = tuple(1 if d in ("decoder", "prompt") else sizes[d] for d in dims)
        group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=_fill(dtype),
                           dimension_names=list(dims), compressors=[ZstdCodec(level=3), Crc32cCodec()],
                           attributes={"description": description, "coordinates": coords})
    group.create_array("input_ids", shape=(n_prompts, width), chunks=(1, width), dtype="int32", fill_value=-1,
                       dimension_names=["prompt", "token"], compressors=[ZstdCodec(level=3), Crc32cCodec()],
                       attributes={"description": "token ids of the prompt (from the activation store); -1 past "
                                                  "n_tokens"})
    group["input_ids"][:] = source["input_ids"][:]
    group.create_array("done", shape=(n_prompts,), chunks=(n_prompts,), dtype="bool", fill_value=False,
                       dimension_names=["prompt"], attributes={"description": "true once the prompt is written"})
    for name in ["prompt", "n_tokens", *labels]:
        write_1d(group, name, source[name][:], "prompt")
    write_1d(group, "decoder", np.array(decoders, dtype=object), "decoder")
    write_1d(group, "layer", np.asarray(layers, dtype=np.int64), "layer",
             {"description": "layer of the activation store (0 = embeddings)"})
    write_1d(group, "top", np.arange(1, top_k + 1, dtype=np.int64), "top")
    write_1d(group, "k", np.asarray(ks, dtype=np.int64), "k")
    write_1d(group, "vocab", np.asarray(vocab, dtype=object), "vocab_id",
             {"description": "token text as the tokenizer decodes the id alone"})
    write_1d(group, "vocab_id", np.arange(len(vocab), dtype=np.int64), "vocab_id")
    consolidate(directory)


def open_lens_group(path: str, mode: str = "r") -> zarr.Group:
    return open_repgeo_group(path, KIND, mode)


def write_prompt_lens(group: zarr.Group, prompt: int, values: dict):
    """Write one prompt's readings (name → array without the prompt dim, over its n_tokens positions), then mark
    it done. Positions past n_tokens keep the fill values."""
    for name, value in values.items():
        array = group[name]
        dims = array.metadata.dimension_names
        if dims[0] == "decoder":
            n = value.shape[2]
            array[:, prompt, :, :n] = value
        elif "token" in dims:
            array[prompt, :, : value.shape[1]] = value
        else:
            array[prompt] = value
    group["done"][prompt] = True


def open_lens(path: str):
    """Open a lens store as a lazy xarray Dataset, labels in memory as coordinates on ``prompt``."""
    import xarray as xr

    open_lens_group(path)
    quiet_zarr()
    return eager_labels(xr.open_zarr(path))


def layout_problems(description: dict) -> list:
    """Problems of a lens store's layout against its source and parameters (description: `describe_store`)."""
    arrays, attrs = description["arrays"], description["attributes"]
    params, problems = attrs["parameters"], source_prompt_problems(arrays, attrs)
    expected = {"decoder": len(params["decoders"]), "layer": len(params["layers"]), "top": params["top_k"],
                "k": len(params["ks"])}
    problems += [f"{name} has {arrays[name]['shape'][0]} values, but the parameters say {size}"
                 for name, size in expected.items() if arrays[name]["shape"] != [size]]
    return problems
