"""The SAE co-occurrence results store: an xarray-readable Zarr v3 group written by ``repgeo sae cooccurrence``.

Dims: ``feature`` and ``feature_b`` (the same SAE features, as rows and columns of pair matrices), ``metric``
(the five affinities), ``eig`` (eigenvalue rank, 1 = largest), ``n_clusters`` (lobe counts), ``cloud``
(decoder directions, feature activations) and ``rank`` (covariance eigenvalue rank). Pair matrices are chunked
in 1024 × 1024 tiles, so a reader can take any block of features. Specified in
``schemas/sae-cooccurrence.schema.json``. Built at ``path + ".partial"`` and renamed into place when complete.
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from ..observables import AFFINITIES
from .zarr_io import quiet_zarr, write_1d

KIND = "sae_cooccurrence"
SCHEMA_VERSION = "1.0"
TILE = 1024
CLOUDS = ("decoder", "activations")

#: name → (dims, dtype, description).
VARIABLES = {
    "n_blocks": ((), "int64", "number of complete blocks counted"),
    "cooccurrence": (("feature", "feature_b"), "int64",
                     "blocks where both features occur; diagonal: blocks where the feature occurs"),
    "affinity": (("metric", "feature", "feature_b"), "float64", "co-occurrence affinity (NaN where undefined)"),
    "affinity_spectrum": (("metric", "eig"), "float64",
                          "eigenvalues of the affinity over features whose self-affinity is defined, largest "
                          "first; NaN for the others"),
    "lobe": (("metric", "n_clusters", "feature"), "int64",
             "spectral-clustering lobe (-1: not clustered: never occurs or no positive affinity)"),
    "lobe_ami": (("metric", "n_clusters"), "float64",
                 "adjusted mutual information of lobes and k-means clusters of unit decoder directions"),
    "lobe_ami_null_mean": (("metric", "n_clusters"), "float64", "lobe_ami with permuted lobe labels: mean"),
    "lobe_ami_null_std": (("metric", "n_clusters"), "float64", "lobe_ami with permuted lobe labels: std"),
    "lobe_ami_z": (("metric", "n_clusters"), "float64", "(lobe_ami - null mean) / null std"),
    "lobe_logreg_accuracy": (("metric", "n_clusters"), "float64",
                             "cross-validated balanced accuracy predicting the lobe from the decoder direction"),
    "lobe_logreg_random_accuracy": (("metric", "n_clusters"), "float64", "the same from random directions"),
    "galaxy_eigenvalues": (("cloud", "rank"), "float64", "covariance eigenvalues, largest first (NaN past dim)"),
    "galaxy_isotropic_eigenvalues": (("cloud", "rank"), "float64",
                                     "the same for an isotropic Gaussian cloud of the same shape"),
    "galaxy_slope": (("cloud",), "float64", "power-law slope of eigenvalue against rank over the fit range"),
    "galaxy_isotropic_slope": (("cloud",), "float64", "the same for the isotropic Gaussian"),
    "galaxy_fit_first": (("cloud",), "int64", "first rank of the power-law fit (1-based)"),
    "galaxy_fit_last": (("cloud",), "int64", "last rank of the power-law fit (inclusive)"),
}


def create_sae_results_store(directory: str, *, d_sae: int, clusters, galaxy_width: int, attrs: dict) -> zarr.Group:
    """Create the store's arrays (fill values: NaN, -1) in ``directory`` (the job's partial directory)."""
    quiet_zarr()
    sizes = {"feature": d_sae, "feature_b": d_sae, "metric": len(AFFINITIES), "eig": d_sae,
             "n_clusters": len(clusters), "cloud": len(CLOUDS), "rank": galaxy_width}
    group = zarr.create_group(directory, zarr_format=3)
    group.attrs.update(dict(attrs, repgeo={"kind": KIND, "schema_version": SCHEMA_VERSION}))
    for name, (dims, dtype, description) in VARIABLES.items():
        shape = tuple(sizes[d] for d in dims)
        chunks = tuple(1 if d in ("metric", "n_clusters") else min(TILE, sizes[d]) for d in dims)
        group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                           fill_value=-1 if dtype == "int64" else np.nan, dimension_names=list(dims),
                           compressors=[ZstdCodec(level=3), Crc32cCodec()], attributes={"description": description})
    write_1d(group, "feature", np.arange(d_sae, dtype=np.int64), "feature")
    write_1d(group, "feature_b", np.arange(d_sae, dtype=np.int64), "feature_b")
    write_1d(group, "metric", np.array(AFFINITIES, dtype=object), "metric")
    write_1d(group, "eig", np.arange(1, d_sae + 1, dtype=np.int64), "eig")
    write_1d(group, "n_clusters", np.asarray(clusters, dtype=np.int64), "n_clusters")
    write_1d(group, "cloud", np.array(CLOUDS, dtype=object), "cloud")
    write_1d(group, "rank", np.arange(1, galaxy_width + 1, dtype=np.int64), "rank")
    return group


def layout_problems(description: dict) -> list:
    """Problems of an SAE co-occurrence store's layout against its SAE and parameters."""
    arrays, attrs = description["arrays"], description["attributes"]
    problems = []
    d_sae = attrs["sae"]["d_sae"]
    for name in ("feature", "feature_b", "eig"):
        if arrays[name]["shape"] != [d_sae]:
            problems.append(f"{name} has {arrays[name]['shape'][0]} values, but the SAE has {d_sae} features")
    if arrays["n_clusters"]["shape"] != [len(attrs["parameters"]["clusters"])]:
        problems.append(f"n_clusters has {arrays['n_clusters']['shape'][0]} values, but clusters are "
                        f"{attrs['parameters']['clusters']}")
    if attrs["layer"] != attrs["parameters"]["layer"]:
        problems.append(f"layer is {attrs['layer']} but parameters.layer {attrs['parameters']['layer']}")
    return problems
