"""The results store: observables of an activation store as an xarray-readable Zarr v3 group.

Per-prompt variables have ``prompt`` first, in chunks of 256 prompts: one writer (the Dask client) writes
prompt after prompt, and ``done`` is set after a prompt's variables, so a run can resume per prompt. Group
variables, written once all prompts are done, have dims (group, layer, …). Every label of
the activation store is a coordinate on ``prompt``. Specified in ``schemas/results.schema.json``.
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from ..observables.heads import SPANS, STATISTICS
from ..runtime.partial import Partial
from .activations import LAYOUT
from .zarr_io import consolidate, eager_labels, open_repgeo_group, quiet_zarr, source_prompt_problems, write_1d

KIND = "results"
SCHEMA_VERSION = "1.0"
PROMPTS_PER_CHUNK = 256

#: name → (dims, dtype, units/description). Shapes come from the sizes of the dims.
VARIABLES = {
    "gride_id": (("prompt", "layer", "n2"), "float64", "GRIDE intrinsic dimension at scale n2 (dadapy 0.3.4)"),
    "gride_err": (("prompt", "layer", "n2"), "float64", "GRIDE error bar"),
    "gride_scale": (("prompt", "layer", "n2"), "float64", "distance scale of the n2 estimate (hidden-state units)"),
    "n_unique": (("prompt", "layer"), "int32", "distinct vectors of the cloud (-1: not computed)"),
    "twonn_id": (("prompt", "layer"), "float64", "TwoNN intrinsic dimension (dadapy compute_id_2NN)"),
    "overlap": (("prompt", "layer", "k"), "float64",
                "mean |N_k(layer) ∩ N_k(layer+1)| / k over all points; NaN at the last layer"),
    "cosine_mean": (("prompt", "layer"), "float64", "mean cosine similarity over pairs i≠j"),
    "cosine_std": (("prompt", "layer"), "float64", "std of the cosine similarity over pairs i≠j"),
    "anisotropy": (("prompt", "layer"), "float64", "σ1² / Σσi² of the centered cloud"),
    "nn_reciprocity": (("prompt", "layer"), "float64", "share of points that are their nearest neighbour's"),
    "nn_cosine": (("prompt", "layer"), "float64", "mean cosine between the vectors to the two nearest neighbours"),
    "norm_mean": (("prompt", "layer"), "float64", "mean Euclidean norm (hidden-state units)"),
    "bpc": (("prompt",), "float64",
            "bits per character: sum of token_loss / ln 2 over the predicted text tokens (positions 1 … n_tokens-1) "
            "divided by the characters of the text they cover; NaN where the text or the tokenizer is unavailable"),
    "knn_index": (("prompt", "layer", "token", "neighbor"), "int32", "nearest neighbours, self excluded (-1: none)"),
    "knn_distance": (("prompt", "layer", "token", "neighbor"), "float64", "float64 Euclidean distance"),
    "distances": (("prompt", "layer", "token", "token_b"), None,
                  "Euclidean distance between every two tokens of the cloud (hidden-state units; NaN past n_tokens "
                  "and at skipped positions), from float64, stored at --distance-dtype"),
    "contrib_corr": (("prompt", "block", "stat", "span"), "float64",
                     "correlation of the heads' write cosine and write norm over heads x tokens of the first / last "
                     "--contrib-span tokens"),
    "contrib_corr_p": (("prompt", "block", "stat", "span"), "float64", "p-value of contrib_corr"),
    "head_norm_mean": (("prompt", "block", "head"), "float64", "mean L2 norm of each head's write over the tokens"),
    "group_gride_id": (("group", "layer", "n2"), "float64", "GRIDE id of the group's pooled tokens"),
    "group_gride_err": (("group", "layer", "n2"), "float64", "GRIDE error bar"),
    "group_gride_scale": (("group", "layer", "n2"), "float64", "distance scale"),
    "group_anisotropy": (("group", "layer"), "float64", "anisotropy of the group's pooled tokens"),
    "group_kl": (("group", "layer"), "float64",
                 "KL(group || reference), k-NN estimator (Wang-Kulkarni-Verdú) on the distinct vectors that the two "
                 "pools do not share, nats"),
    "group_n_shared": (("group", "layer"), "int32",
                       "distinct vectors of the group's pool that the reference pool holds too, left out of group_kl "
                       "(-1: the reference itself)"),
}


#: Every name of a results store but the labels it carries: variables and coordinates.
NAMES = set(VARIABLES) | {"loss", "done", "prompt", "n_tokens", "layer", "n2", "k", "neighbor", "group", "block",
                          "head", "stat", "span", "token_b"}


def _fill(dtype: str):
    return -1 if dtype.startswith("int") else np.nan


def create_results_store(path: str, *, source, params, variables: list, groups: list | None, attrs: dict):
    """Create the results store for ``source`` (the activation store's zarr group) with NaN-filled variables.

    Built in a partial directory this job owns and renamed into place when complete (like the activation store).
    """
    quiet_zarr()
    with Partial(path, "repgeo summarize") as partial:
        _build_results_store(partial.path, source=source, params=params, variables=variables, groups=groups,
                             attrs=attrs)
        partial.finish()


def _build_results_store(partial: str, *, source, params, variables, groups, attrs):
    n_prompts, n_layers, width, _ = source["hidden"].shape
    sizes = {"prompt": n_prompts, "layer": n_layers, "n2": len(params.n2), "k": params.overlap_k,
             "token": width, "token_b": width, "neighbor": params.overlap_k, "group": len(groups or []),
             "block": n_layers - 1,
             "head": source["head_norm"].shape[2] if "head_norm" in source else 0, "stat": len(STATISTICS),
             "span": len(SPANS)}
    labels = [name for name, _ in source.arrays() if name not in LAYOUT]
    coords = " ".join(["n_tokens", *labels])

    group = zarr.create_group(partial, zarr_format=3)
    group.attrs.update(dict(attrs, repgeo={"kind": KIND, "schema_version": SCHEMA_VERSION}))
    for name in variables:
        dims, dtype, description = VARIABLES[name]
        dtype = dtype or params.distance_dtype
        shape = tuple(sizes[d] for d in dims)
        attributes = {"description": description}
        if name == "distances":  # one (prompt, layer) matrix per chunk: the worker of that prompt writes it
            chunks = (1, 1) + shape[2:]
            attributes["coordinates"] = coords
        elif dims[0] == "prompt":
            # knn tables are large: a chunk per prompt; the small variables: many prompts per chunk (unsharded:
            # zarr-python 3.1 mis-reads sharded arrays under mixed array/integer indexing).
            chunks = ((1,) if "token" in dims else (min(PROMPTS_PER_CHUNK, n_prompts),)) + shape[1:]
            attributes["coordinates"] = coords
        else:
            chunks = shape
        group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=_fill(dtype),
                           dimension_names=list(dims), compressors=[ZstdCodec(level=3), Crc32cCodec()],
                           attributes=attributes)
    group.create_array("loss", shape=(n_prompts,), chunks=(n_prompts,), dtype="float32", fill_value=np.nan,
                       dimension_names=["prompt"], attributes={"units": "nats", "coordinates": coords,
                                                               "description": "mean token loss (from the store)"})
    group["loss"][:] = source["loss"][:]
    group.create_array("done", shape=(n_prompts,), chunks=(min(PROMPTS_PER_CHUNK, n_prompts),),
                       dtype="bool", fill_value=False, dimension_names=["prompt"],
                       attributes={"description": "true once the prompt's variables are written"})
    for name in ["prompt", "n_tokens", *labels]:
        write_1d(group, name, source[name][:], "prompt")
    write_1d(group, "layer", source["layer"][:], "layer")  # the model's layer numbers (a subset holds some)
    write_1d(group, "n2", params.n2, "n2", {"description": "GRIDE neighbour rank n2 (n1 = n2/2)"})
    write_1d(group, "k", params.ks, "k", {"description": "neighbourhood size of the overlap"})
    if params.save_knn:
        write_1d(group, "neighbor", np.arange(1, params.overlap_k + 1), "neighbor")
    if params.wants("contributions"):
        write_1d(group, "block", np.arange(n_layers - 1, dtype=np.int64), "block",
                 {"description": "block b reads layer b and writes layer b + 1"})
        write_1d(group, "stat", np.array(STATISTICS, dtype=object), "stat")
        write_1d(group, "span", np.array(SPANS, dtype=object), "span", {"tokens": params.contrib_span})
    if groups:
        write_1d(group, "group", np.array([str(g) for g in groups], dtype=object), "group",
                 {"label": params.groupby})
    consolidate(partial)


def open_results_group(path: str, mode: str = "r") -> zarr.Group:
    return open_repgeo_group(path, KIND, mode)


def write_prompt_results(group: zarr.Group, prompt: int, results: dict):
    """Write one prompt's arrays (name → array without the prompt dim), then mark it done."""
    for name, values in results.items():
        group[name][prompt] = values
    group["done"][prompt] = True


def open_results(path: str):
    """Open a results store as a lazy xarray Dataset, labels in memory as coordinates on ``prompt``."""
    import xarray as xr

    open_results_group(path)
    quiet_zarr()
    return eager_labels(xr.open_zarr(path))


def layout_problems(description: dict) -> list:
    """Problems of a results store's layout against its source and parameters (description: `describe_store`)."""
    arrays, attrs = description["arrays"], description["attributes"]
    params, problems = attrs["parameters"], source_prompt_problems(arrays, attrs)
    if arrays["k"]["shape"] != [params["overlap_k"]]:
        problems.append(f"k has {arrays['k']['shape'][0]} values, but overlap_k is {params['overlap_k']}")
    if params["save_knn"] != ("knn_index" in arrays and "knn_distance" in arrays):
        problems.append(f"save_knn is {params['save_knn']} but knn_index and knn_distance are "
                        f"{'absent' if params['save_knn'] else 'present'}")
    return problems
