"""Pure-math observables of one point cloud X: (token, dim) of hidden states (numpy in, numpy out).

Typical order for one (prompt, layer) cloud::

    X, n = unique_rows(hidden)                       # ids and neighbour statistics need distinct points
    indices, distances = sorted_neighbors(pairwise_distances(X), min(300, n - 1))
    ids, errs, scales = gride_scaling(distances)     # at ranks gride_ranks(n)
    twonn = twonn_id(distances)
"""

from .distances import pairwise_distances, sorted_neighbors, unique_rows
from .divergence import gaussian_kl_divergence, knn_kl_divergence
from .global_shape import anisotropy, cosine_stats, norm_mean
from .intrinsic_dimension import gride_ranks, gride_scaling, twonn_id
from .neighborhoods import neighborhood_overlap, nn_cosine, nn_reciprocity

__all__ = [
    "anisotropy",
    "cosine_stats",
    "gaussian_kl_divergence",
    "gride_ranks",
    "gride_scaling",
    "knn_kl_divergence",
    "neighborhood_overlap",
    "nn_cosine",
    "nn_reciprocity",
    "norm_mean",
    "pairwise_distances",
    "sorted_neighbors",
    "twonn_id",
    "unique_rows",
]

# SAE feature geometry (Li et al. 2024, "The Geometry of Concepts"): brain scale (co-occurrence lobes) and galaxy
# scale (covariance spectra).
from .cooccurrence import (
    AFFINITIES,
    affinities,
    affinity_spectrum,
    block_occurrence,
    cooccurrence_counts,
    spectral_lobes,
)
from .galaxy import covariance_spectrum, default_fit_range, isotropic_reference, power_law_slope
from .lobes import direction_clusters, lobe_ami, lobe_logreg_accuracy

__all__ += [
    "AFFINITIES",
    "affinities",
    "affinity_spectrum",
    "block_occurrence",
    "cooccurrence_counts",
    "covariance_spectrum",
    "default_fit_range",
    "direction_clusters",
    "isotropic_reference",
    "lobe_ami",
    "lobe_logreg_accuracy",
    "power_law_slope",
    "spectral_lobes",
]
