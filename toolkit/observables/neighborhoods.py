"""Local-neighbourhood observables from nearest-neighbour index tables."""

import numpy as np

# Entries of the (point, k, k) equality block compared at once in `neighborhood_overlap` (~4 MB).
_OVERLAP_BLOCK = 2**22


def neighborhood_overlap(indices_a, indices_b, ks=None):
    """Mean neighbourhood overlap of the same points in two representations (e.g. two layers).

    indices_a, indices_b: (token, >=max(ks)) int nearest-neighbour indices, nearest first, self excluded
        (e.g. from `sorted_neighbors`), rows describing the same points in the same order.
    ks: neighbourhood sizes, default 1..32.

    For every k in ks returns mean_i |N_k^a(i) ∩ N_k^b(i)| / k, where N_k(i) is the set of the first k
    neighbours of i (dadapy's `return_data_overlap`). All k at once: a neighbour at position p in list a
    and q in list b is shared by every N_k with k > max(p, q), so a histogram of max(p, q) over matches,
    cumulated, counts the shared neighbours of all k.
    Returns (len(ks),) float64 in [0, 1].
    """
    ks = np.arange(1, 33) if ks is None else np.asarray(ks, dtype=np.int64).ravel()
    a = np.asarray(indices_a)
    b = np.asarray(indices_b)
    k_max = int(ks.max())
    if ks.min() < 1 or a.shape[0] != b.shape[0] or min(a.shape[1], b.shape[1]) < k_max:
        raise ValueError(f"need ks >= 1 and two (token, >={k_max}) tables of equal token count, "
                         f"got {a.shape} and {b.shape}")
    a, b = a[:, :k_max], b[:, :k_max]
    n = a.shape[0]
    matches_at = np.zeros(k_max, dtype=np.int64)
    step = max(1, _OVERLAP_BLOCK // (k_max * k_max))
    for start in range(0, n, step):
        _, p, q = np.nonzero(a[start:start + step, :, None] == b[start:start + step, None, :])
        matches_at += np.bincount(np.maximum(p, q), minlength=k_max)
    shared = np.cumsum(matches_at)  # shared[k - 1]: sum over points of |N_k^a ∩ N_k^b|
    return shared[ks - 1] / (n * ks)


def nn_reciprocity(nn_indices):
    """Share of points that are the nearest neighbour of their own nearest neighbour.

    nn_indices: (token, >=1) int nearest-neighbour indices, self excluded; column 0 is used.
    Returns a float in [0, 1].
    """
    nn = np.asarray(nn_indices)[:, 0]
    return float(np.mean(nn[nn] == np.arange(nn.size)))


def nn_cosine(D, nn_indices):
    """Mean over points of the cosine between the vectors to the first and second nearest neighbour.

    D: (token, token) Euclidean distances of a cloud of distinct points, accurate to ~1e-13 relative (e.g.
    `pairwise_distances` of the de-duplicated cloud); nn_indices: (token, >=2) int neighbour indices in it,
    self excluded, nearest first. For point i with neighbours a and b the cosine of X[a] - X[i] and
    X[b] - X[i] follows from the law of cosines, (D_ia^2 + D_ib^2 - D_ab^2) / (2 D_ia D_ib), with an absolute
    error ~1e-13 (D_ia / D_ib + D_ib / D_ia). Returns a float in [-1, 1].
    """
    D = np.asarray(D, dtype=np.float64)
    nn = np.asarray(nn_indices)
    points = np.arange(len(nn))
    to_first, to_second, between = D[points, nn[:, 0]], D[points, nn[:, 1]], D[nn[:, 0], nn[:, 1]]
    cosines = (to_first**2 + to_second**2 - between**2) / (2 * to_first * to_second)
    return float(np.mean(np.clip(cosines, -1.0, 1.0)))
