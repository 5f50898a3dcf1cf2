"""Local-neighbourhood observables from nearest-neighbour index tables."""

import numpy as np


def neighborhood_overlap(indices_a, indices_b, ks=None):
    """Mean neighbourhood overlap of the same points in two representations (e.g. two layers).

    indices_a, indices_b: (token, >=max(ks)) int nearest-neighbour indices (0 <= index), nearest first, self
        excluded (e.g. from `sorted_neighbors`), rows describing the same points in the same order.
    ks: neighbourhood sizes, default 1..32.

    For every k in ks returns mean_i |N_k^a(i) ∩ N_k^b(i)| / k, where N_k(i) is the set of the first k
    neighbours of i (dadapy's `return_data_overlap`). All k at once: a neighbour at position p in list a
    and q in list b is shared by every N_k with k > max(p, q), so a histogram of max(p, q) over matches,
    cumulated, counts the shared neighbours of all k. The positions q come from a (token, index) lookup table
    of one byte per entry (two from k = 255 on).
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
    points = np.arange(n)[:, None]
    # position_in_b[i, j]: where j stands in the list b[i], k_max where it is absent
    dtype = np.uint8 if k_max < 255 else np.uint16
    position_in_b = np.full((n, int(max(a.max(), b.max())) + 1), k_max, dtype=dtype)
    position_in_b[points, b] = np.arange(k_max)
    q = position_in_b[points, a]  # (token, k_max): position in b of the p-th neighbour in a
    p = np.broadcast_to(np.arange(k_max), q.shape)
    shared_from = np.maximum(p, q)[q < k_max]
    # shared[k - 1]: the sum over points of |N_k^a ∩ N_k^b|
    shared = np.cumsum(np.bincount(shared_from, minlength=k_max))
    return shared[ks - 1] / (n * ks)


def nn_reciprocity(nn_indices):
    """Share of points that are the nearest neighbour of their own nearest neighbour.

    nn_indices: (token, >=1) int nearest-neighbour indices, self excluded; column 0 is used.
    Returns a float in [0, 1].
    """
    nn = np.asarray(nn_indices)[:, 0]
    return float(np.mean(nn[nn] == np.arange(nn.size)))


def nn_cosine(squared_distances, nn_indices):
    """Mean over points of the cosine between the vectors to the first and second nearest neighbour.

    squared_distances: (token, token) squared Euclidean distances D2 of a cloud of distinct points, accurate to
    ~2e-13 relative (e.g. `squared_distances` of the de-duplicated cloud); nn_indices: (token, >=2) int
    neighbour indices in it, self excluded, nearest first. For point i with neighbours a and b the cosine of
    X[a] - X[i] and X[b] - X[i] follows from the law of cosines, (D2_ia + D2_ib - D2_ab) / (2 sqrt(D2_ia D2_ib)),
    with an absolute error ~1e-13 (D_ia / D_ib + D_ib / D_ia). Returns a float in [-1, 1].
    """
    D2 = np.asarray(squared_distances, dtype=np.float64)
    nn = np.asarray(nn_indices)
    points = np.arange(len(nn))
    to_first, to_second, between = D2[points, nn[:, 0]], D2[points, nn[:, 1]], D2[nn[:, 0], nn[:, 1]]
    cosines = (to_first + to_second - between) / (2 * np.sqrt(to_first * to_second))
    return float(np.mean(np.clip(cosines, -1.0, 1.0)))
