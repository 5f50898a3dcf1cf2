"""The relations results stores: ``repgeo relations analogies`` (kind "relations") and ``repgeo relations markov``
(kind "markov"), each an xarray Dataset on Zarr v3, written once, complete, by one process.

Relations dims: ``space`` (the embedding spaces computed: input, output), ``layer`` (hidden layers: 0 = embedding
output, as in an activation store), ``relation``, ``pair`` (the file's lines, in order), ``word`` (every distinct
word of the file), ``predictor`` (averaged_delta, single_delta, subject_only), ``k`` (top-k sizes: 1 and --top-k),
``pca_component`` (2), ``lda_component`` (--lda-components), ``vocab_id`` (the model's token ids). On ``pair``:
coordinates ``pair_relation``, ``subject``, ``object``; variables of the embedding spaces carry ``space``, those of
the hidden space are named ``hidden_*`` and carry ``layer``.

Markov dims: ``token_id`` (the --top most frequent tokens x, their ids as coordinate, ``token`` their text), ``top``
(ranks 1..5), ``comparison``, ``k`` (1 and 5), ``vocab_id``.
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .zarr_io import consolidate, eager_labels, quiet_zarr, write_1d

KIND = "relations"
MARKOV_KIND = "markov"
SCHEMA_VERSION = "1.0"
EMBEDDING_SPACES = ("input", "output")
SPACES = EMBEDDING_SPACES + ("hidden",)
COMPARISONS = ("direct_bigram", "model_bigram", "direct_identity", "unigram_bigram")

_E = ("space",)
_H = ("layer",)

#: name → (dims, dtype, description) of the "relations" store. Embedding-space variables are written when --spaces
#: holds input or output, hidden_* ones when it holds hidden.
RELATIONS_VARIABLES = {
    "n_pairs": (("relation",), "int64", "pairs of the relation in the file (all of them are used in the hidden space)"),
    "n_pairs_used": (_E + ("relation",), "int64",
                     "pairs whose subject and object are one token each: the pairs the embedding space uses"),
    "pair_used": (_E + ("pair",), "bool", "whether the embedding space uses the pair (both words one token)"),
    "in_fit": (("pair",), "bool", "the pair fits the crystals' LDA (else it is one of the held-out pairs scored)"),
    "word_tokens": (("word",), "int64", "tokens of the word after a space (\" France\")"),
    "word_token_id": (("word",), "int64", "the word's token id when it is one token after a space, else -1"),
    "analogy_accuracy": (_E + ("relation", "predictor", "k"), "float64",
                         "share of the relation's analogies whose object is among the k nearest tokens (cosine) of "
                         "the whole vocabulary to subject + delta, the subject excluded; single_delta: over every "
                         "(pair, other pair); NaN with fewer than 3 pairs used"),
    "analogy_prediction": (_E + ("pair", "predictor"), "int32",
                           "token id nearest to subject + delta (single_delta: the delta of the next pair of the "
                           "relation, cyclically); -1 where the pair is not used"),
    "hidden_analogy_accuracy": (_H + ("relation", "predictor", "k"), "float64",
                                "as analogy_accuracy among the hidden states of all the file's words at the layer"),
    "hidden_analogy_prediction": (_H + ("pair", "predictor"), "int32",
                                  "index on the word dim of the word nearest to subject + delta"),
    "parallelogram_cosine": (_E + ("relation",), "float64",
                             "mean cosine between difference vectors (object - subject) of two pairs of the relation"),
    "parallelogram_cosine_other": (_E + ("relation",), "float64",
                                   "mean cosine between the relation's difference vectors and those of other "
                                   "relations"),
    "hidden_parallelogram_cosine": (_H + ("relation",), "float64", "parallelogram_cosine in the hidden space"),
    "hidden_parallelogram_cosine_other": (_H + ("relation",), "float64",
                                          "parallelogram_cosine_other in the hidden space"),
    "silhouette": (_E + ("relation",), "float64",
                   "mean silhouette (Euclidean) of the relation's held-out difference vectors, relations as clusters"),
    "silhouette_lda": (_E + ("relation",), "float64",
                       "the same after projection on the LDA directions fitted on the other pairs"),
    "silhouette_all": (_E, "float64", "mean silhouette of all held-out difference vectors"),
    "silhouette_lda_all": (_E, "float64", "mean silhouette of all held-out difference vectors after LDA"),
    "hidden_silhouette": (_H + ("relation",), "float64", "silhouette in the hidden space"),
    "hidden_silhouette_lda": (_H + ("relation",), "float64", "silhouette_lda in the hidden space"),
    "hidden_silhouette_all": (_H, "float64", "silhouette_all in the hidden space"),
    "hidden_silhouette_lda_all": (_H, "float64", "silhouette_lda_all in the hidden space"),
    "distractor_length_corr": (_E, "float64",
                               "|Pearson r| of the first principal component of all difference vectors with "
                               "len(object) - len(subject) in characters"),
    "hidden_distractor_length_corr": (_H, "float64", "distractor_length_corr in the hidden space"),
    "hidden_distractor_token_corr": (_H, "float64",
                                     "|Pearson r| of that component with the difference in tokens after a space"),
    "crystal_pca": (_E + ("pair", "pca_component"), "float64",
                    "difference vector's scores on the first two principal components of all used pairs"),
    "crystal_lda": (_E + ("pair", "lda_component"), "float64",
                    "difference vector projected on the LDA directions (NaN for relations left out)"),
    "hidden_crystal_pca": (_H + ("pair", "pca_component"), "float64", "crystal_pca in the hidden space"),
    "hidden_crystal_lda": (_H + ("pair", "lda_component"), "float64", "crystal_lda in the hidden space"),
}

#: name → (dims, dtype, description) of the "markov" store.
MARKOV_VARIABLES = {
    "markov_direct": (("token_id",), "int32", "argmax_y of unembedding[y] · input_embedding[x] (the direct path)"),
    "markov_model": (("token_id",), "int32", "the model's most probable next token after the context x"),
    "markov_bigram": (("token_id",), "int32",
                      "argmax_y count(\"x y\") in the corpus, ties to the lower id; -1 where x has no successor"),
    "markov_direct_top": (("token_id", "top"), "int32", "the direct path's 5 best tokens, best first"),
    "markov_model_top": (("token_id", "top"), "int32", "the model's 5 most probable next tokens"),
    "markov_bigram_top": (("token_id", "top"), "int32",
                          "the 5 most frequent successors, ties to the lower id; -1 past the distinct successors"),
    "markov_count": (("token_id",), "int64", "occurrences of x in the corpus"),
    "markov_bigram_count": (("token_id",), "int64", "occurrences of x followed by a (non-special) token"),
    "markov_bigram_probability": (("token_id",), "float64", "P(markov_bigram | x) = its count / markov_bigram_count"),
    "markov_kl": (("token_id",), "float64",
                  "KL(bigram distribution after x ‖ the model's next-token distribution after x), nats; NaN where "
                  "markov_bigram_count < --min-count"),
    "markov_agreement": (("comparison", "k"), "float64",
                         "share of x whose target is among the predictor's first k: direct_bigram, model_bigram, "
                         "unigram_bigram (the corpus's k most frequent tokens): the bigram successor; direct_identity: "
                         "x itself; over the x with a successor (all x for direct_identity)"),
}

#: store kind → its VARIABLES table.
VARIABLES = {KIND: RELATIONS_VARIABLES, MARKOV_KIND: MARKOV_VARIABLES}
#: Non-index coordinates on a dim: attached to every variable with that dim.
COORDINATES = {"pair": ("pair_relation", "subject", "object"), "token_id": ("token",)}


def _fill(dtype: str):
    return False if dtype == "bool" else -1 if dtype.startswith("int") else np.nan


def write_store(directory: str, kind: str, coords: dict, values: dict, attrs: dict) -> None:
    """Write a complete store of ``kind`` into ``directory`` (the job's partial directory).

    coords: name → (dim, 1-D values, attributes): every dim's index coordinate and the non-index coordinates of
    COORDINATES; values: variable name (of VARIABLES[kind]) → array with that variable's dims, in order.
    """
    quiet_zarr()
    sizes = {dim: len(v) for name, (dim, v, _) in coords.items() if name == dim}
    group = zarr.create_group(directory, zarr_format=3)
    group.attrs.update(dict(attrs, repgeo={"kind": kind, "schema_version": SCHEMA_VERSION}))
    for name, value in values.items():
        dims, dtype, description = VARIABLES[kind][name]
        value = np.asarray(value).astype(dtype)
        expected = tuple(sizes[d] for d in dims)
        if value.shape != expected:
            raise ValueError(f"{name}: shape {value.shape}, dims {dims} of sizes {expected}")
        linked = " ".join(c for d in dims for c in COORDINATES.get(d, ()))
        group.create_array(name, shape=value.shape, chunks=value.shape or (1,), dtype=dtype, fill_value=_fill(dtype),
                           dimension_names=list(dims), compressors=[ZstdCodec(level=3), Crc32cCodec()],
                           attributes={"description": description, **({"coordinates": linked} if linked else {})})
        group[name][...] = value
    for name, (dim, value, coord_attrs) in coords.items():
        write_1d(group, name, np.asarray(value), dim, coord_attrs)
    consolidate(directory)


def open_relations_results(path: str):
    """Open a relations or markov store as an xarray Dataset (coordinates in memory); UserError for other stores."""
    import xarray as xr

    from ..errors import UserError
    from .zarr_io import open_zarr_group, repgeo_kind

    kind = repgeo_kind(open_zarr_group(path, "repgeo relations or markov store"))
    if kind not in VARIABLES:
        what = f"a repgeo {kind} store" if kind else "not a repgeo store"
        raise UserError(f"{path} is {what}, but a relations or markov store is needed here")
    quiet_zarr()
    return eager_labels(xr.open_zarr(path))
