"""Pure-math observables of one point cloud X: (token, dim) of hidden states (numpy in, numpy out).

Typical order for one (prompt, layer) cloud::

    D2 = squared_distances(X)                     # exact float64: one matrix serves everything below
    indices, d2 = sorted_neighbors(D2, 32, 256)   # stable 32-NN table, the 256 nearest squared distances
    distances = np.sqrt(d2)
    overlap = neighborhood_overlap(indices, indices_of_the_next_layer)
    # ids and neighbour statistics need distinct points; where X has duplicates (distances[:, 0] == 0):
    #     keep = first_occurrences(X); D2 = D2[np.ix_(keep, keep)]; indices, d2 = sorted_neighbors(D2, 2, 256)
    ids, errs, scales = gride_scaling(distances)  # at ranks gride_ranks(number of distinct points)
    twonn = twonn_id(distances)
    reciprocity, nn_cos = nn_reciprocity(indices), nn_cosine(D2, indices)
    mean, std = cosine_stats(X, D2)
"""

from .distances import (first_occurrences, pairwise_distances, shared_rows, sorted_neighbors, squared_distances,
                        unique_rows)
from .divergence import gaussian_kl_divergence, knn_kl_divergence
from .global_shape import anisotropy, cosine_stats, norm_mean
from .heads import cosine_norm_correlation
from .intrinsic_dimension import gride_ranks, gride_scaling, twonn_id
from .neighborhoods import neighborhood_overlap, nn_cosine, nn_reciprocity

__all__ = [
    "anisotropy",
    "cosine_norm_correlation",
    "cosine_stats",
    "first_occurrences",
    "gaussian_kl_divergence",
    "gride_ranks",
    "gride_scaling",
    "knn_kl_divergence",
    "neighborhood_overlap",
    "nn_cosine",
    "nn_reciprocity",
    "norm_mean",
    "pairwise_distances",
    "shared_rows",
    "sorted_neighbors",
    "squared_distances",
    "twonn_id",
    "unique_rows",
]

# SAE feature geometry (Li et al. 2024, "The Geometry of Concepts"): brain scale (co-occurrence lobes) and galaxy
# scale (covariance spectra).
from .cooccurrence import (
    AFFINITIES,
    affinities,
    affinity,
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
    "affinity",
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
