"""Exact float64 Euclidean distances and nearest-neighbour tables of one point cloud."""

import numpy as np

# A squared distance below this fraction of |a|^2 + |b|^2 (after centring) lost too many digits to
# cancellation in the Gram-matrix formula and is recomputed from the difference vector.
_CANCELLATION_RATIO = 1e-2
# Pairs recomputed directly per chunk: bounds the (pairs, dim) scratch array to ~20 MB at dim=576.
_PAIRS_PER_CHUNK = 4096


def _first_copies(X):
    """For every row of X (token, dim), the index of the first row equal to it (itself when unique).

    Rows are compared bitwise after mapping -0.0 to +0.0, i.e. two rows are copies exactly when their
    Euclidean distance is 0 (NaN rows are not expected). Returns (token,) int64.
    """
    # Adding 0.0 turns -0.0 into +0.0 so that the byte comparison below equals float equality.
    rows = np.ascontiguousarray(X + X.dtype.type(0))
    as_bytes = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, inverse = np.unique(as_bytes, return_index=True, return_inverse=True)
    return first[inverse.ravel()]


def unique_rows(X):
    """Remove exact duplicate rows, keeping the first occurrence of each and the original order.

    X: (token, dim) float array; duplicates are rows at Euclidean distance 0 (see `_first_copies`).
    Returns (X_unique, n_unique): X_unique is (n_unique, dim) with the dtype of X.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be a (token, dim) array, got shape {X.shape}")
    keep = np.unique(_first_copies(X))
    return X[keep], keep.size


def _distances(A, B=None):
    """Euclidean distances between the rows of A, (a, dim), and of B, (b, dim) (B=None: A with itself).

    Gram-matrix formula on centred float64 data, then the pairs where that formula cancels badly
    (near-duplicates, the diagonal) are recomputed exactly from A[i] - B[j]. The result is accurate to
    ~1e-13 relative and never negative; for B=None it is exactly symmetric with an exactly zero diagonal.
    Returns an (a, b) float64 array.
    """
    A = np.asarray(A, dtype=np.float64)
    same = B is None
    B = A if same else np.asarray(B, dtype=np.float64)
    shift = (A.sum(axis=0) + (0 if same else B.sum(axis=0))) / (A.shape[0] + (0 if same else B.shape[0]))
    Ac = A - shift
    Bc = Ac if same else B - shift
    a2 = np.einsum("ij,ij->i", Ac, Ac)
    b2 = a2 if same else np.einsum("ij,ij->i", Bc, Bc)
    scale = a2[:, None] + b2[None, :]
    d2 = Ac @ Bc.T  # for same, numpy uses syrk: bitwise symmetric
    d2 *= -2.0
    d2 += scale
    rows, cols = np.nonzero(d2 < _CANCELLATION_RATIO * scale)
    for start in range(0, rows.size, _PAIRS_PER_CHUNK):
        r, c = rows[start:start + _PAIRS_PER_CHUNK], cols[start:start + _PAIRS_PER_CHUNK]
        diff = A[r] - B[c]  # (i, j) and (j, i) give bitwise equal sums: symmetry is kept
        d2[r, c] = np.einsum("ij,ij->i", diff, diff)
    return np.sqrt(d2, out=d2)


def pairwise_distances(X):
    """Euclidean distances between all rows of X.

    X: (token, dim) float array (float16/32/64; computed in float64).
    Returns D: (token, token) float64, symmetric, D[i, i] == 0 exactly, relative error ~1e-13 even for
    near-duplicate rows (cancellation-prone pairs of the Gram formula are recomputed directly). Copies of a
    row (repeated tokens) get bitwise-equal rows and columns, so that ties among them break by index.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be a (token, dim) array, got shape {X.shape}")
    D = _distances(X)
    first = _first_copies(X)
    # The Gram formula can differ in the last bit between identical columns: give copies the first's values.
    return D if (first == np.arange(len(first))).all() else D[np.ix_(first, first)]


def sorted_neighbors(D, k):
    """The k nearest neighbours of every point, self excluded, nearest first.

    D: (token, token) distance matrix (e.g. from `pairwise_distances`). Ties are broken by the lower
    neighbour index, as a stable sort of each row would.
    Returns (indices, distances): (token, k) int64 neighbour indices and (token, k) float64 distances.
    """
    D = np.array(D, dtype=np.float64)  # a copy: the diagonal is overwritten
    n = D.shape[0]
    if D.shape != (n, n):
        raise ValueError(f"D must be square, got shape {D.shape}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in 1..{n - 1}, got {k}")
    np.fill_diagonal(D, np.inf)
    # Candidates: entries not above the k-th smallest value. np.nonzero lists them in index order and the
    # stable sort keeps that order among equal distances, which is the lower-index tie-break.
    kth = np.partition(D, k - 1, axis=1)[:, k - 1]
    candidate = D <= kth[:, None]
    n_candidates = candidate.sum(axis=1)
    indices = np.empty((n, k), dtype=np.int64)
    plain = n_candidates == k
    cols = np.nonzero(candidate[plain])[1].reshape(-1, k)
    order = np.argsort(np.take_along_axis(D[plain], cols, axis=1), axis=1, kind="stable")
    indices[plain] = np.take_along_axis(cols, order, axis=1)
    # Rows with ties straddling the k-th distance: a full stable sort settles which tied points are kept.
    tied = ~plain
    indices[tied] = np.argsort(D[tied], axis=1, kind="stable")[:, :k]
    return indices, np.take_along_axis(D, indices, axis=1)
