"""Exact float64 Euclidean distances and nearest-neighbour tables of one point cloud."""

import numpy as np

# A squared distance below this fraction of |a|^2 + |b|^2 (after centring) lost too many digits to
# cancellation in the Gram-matrix formula and is recomputed from the difference vector.
_CANCELLATION_RATIO = 1e-2
# Pairs recomputed directly per chunk: bounds the (pairs, dim) scratch array to ~20 MB at dim=576.
_PAIRS_PER_CHUNK = 4096
# Entries of the distance matrix transformed at once: a block of 512 KB stays in cache across its passes.
_BLOCK_ENTRIES = 2**16


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


def first_occurrences(X):
    """Indices of the distinct rows of X: the first occurrence of each, increasing.

    X: (token, dim) float array; duplicates are rows at Euclidean distance 0 (see `_first_copies`).
    Returns (n_unique,) int64; `unique_rows` keeps exactly these rows.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be a (token, dim) array, got shape {X.shape}")
    return np.unique(_first_copies(X))


def unique_rows(X):
    """Remove exact duplicate rows, keeping the first occurrence of each and the original order.

    X: (token, dim) float array; duplicates are rows at Euclidean distance 0 (see `_first_copies`).
    Returns (X_unique, n_unique): X_unique is (n_unique, dim) with the dtype of X.
    """
    keep = first_occurrences(X)
    return np.asarray(X)[keep], keep.size


def _distances_and_zeros(A, B=None):
    """Euclidean distances between the rows of A, (a, dim), and of B, (b, dim) (B=None: A with itself).

    Gram-matrix formula on centred float64 data, then the pairs where that formula cancels badly
    (near-duplicates) are recomputed exactly from A[i] - B[j]. The result is accurate to ~1e-13 relative
    and never negative; for B=None it is exactly symmetric (the pairs i > j are copied from j < i) with an
    exactly zero diagonal. The matrix is transformed in row blocks that stay in cache.
    Returns (D, rows, cols): the (a, b) float64 distances and the pairs (rows[p], cols[p]) at distance
    exactly 0 (equal rows), the diagonal excluded for B=None.
    """
    A = np.asarray(A, dtype=np.float64)
    same = B is None
    B = A if same else np.asarray(B, dtype=np.float64)
    shift = (A.sum(axis=0) + (0 if same else B.sum(axis=0))) / (A.shape[0] + (0 if same else B.shape[0]))
    Ac = A - shift
    Bc = Ac if same else B - shift
    a2 = np.einsum("ij,ij->i", Ac, Ac)
    b2 = a2 if same else np.einsum("ij,ij->i", Bc, Bc)
    D = Ac @ Bc.T  # for same, numpy uses syrk: bitwise symmetric
    zero_rows, zero_cols = [], []
    step = max(1, _BLOCK_ENTRIES // max(D.shape[1], 1))
    for start in range(0, D.shape[0], step):
        d2 = D[start:start + step]  # a view: D becomes the squared distances, then the distances
        scale = a2[start:start + step, None] + b2[None, :]  # a2_i + a2_j: the same bits for (i, j) and (j, i)
        d2 *= -2.0
        d2 += scale
        scale *= _CANCELLATION_RATIO
        close = d2 <= scale  # <=: a pair of points both at the centroid has scale 0
        if same:
            on_diagonal = np.arange(len(d2))
            close[on_diagonal, on_diagonal + start] = False
            d2[on_diagonal, on_diagonal + start] = 0.0
        # Usually no pair off the diagonal is close: skip the (slower) listing of the entries then.
        rows, cols = np.nonzero(close) if close.any() else (np.zeros(0, np.intp), np.zeros(0, np.intp))
        rows += start
        if same:  # the candidates are symmetric: compute i < j, copy i > j from the finished transpose
            lower = rows > cols
            rows, cols, lower_rows, lower_cols = rows[~lower], cols[~lower], rows[lower], cols[lower]
            d2[lower_rows - start, lower_cols] = 0.0  # overwritten below; no sqrt of a negative meanwhile
        for first in range(0, rows.size, _PAIRS_PER_CHUNK):
            r, c = rows[first:first + _PAIRS_PER_CHUNK], cols[first:first + _PAIRS_PER_CHUNK]
            diff = A[r] - B[c]
            d2[r - start, c] = np.einsum("ij,ij->i", diff, diff)
            equal = ~diff.any(axis=1)
            zero_rows.append(r[equal])
            zero_cols.append(c[equal])
        np.sqrt(d2, out=d2)
        if same:
            d2[lower_rows - start, lower_cols] = D[lower_cols, lower_rows]
    rows = np.concatenate([np.zeros(0, dtype=np.intp)] + zero_rows)
    cols = np.concatenate([np.zeros(0, dtype=np.intp)] + zero_cols)
    return (D, np.concatenate([rows, cols]), np.concatenate([cols, rows])) if same else (D, rows, cols)


def _distances(A, B=None):
    """Euclidean distances between the rows of A, (a, dim), and of B, (b, dim) (B=None: A with itself).

    See `_distances_and_zeros`. Returns an (a, b) float64 array.
    """
    return _distances_and_zeros(A, B)[0]


def pairwise_distances(X):
    """Euclidean distances between all rows of X.

    X: (token, dim) float array (float16/32/64; computed in float64).
    Returns D: (token, token) float64, symmetric, D[i, i] == 0 exactly, relative error ~1e-13 even for
    near-duplicate rows (cancellation-prone pairs of the Gram formula are recomputed directly). D[i, j] == 0
    exactly when rows i and j are equal. Copies of a row (repeated tokens) get bitwise-equal rows and
    columns, so that ties among them break by index.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be a (token, dim) array, got shape {X.shape}")
    D, rows, cols = _distances_and_zeros(X)
    if rows.size == 0:
        return D
    # The Gram formula can differ in the last bit between identical columns: give copies the first's values.
    # Every pair of copies is listed (both ways), so the lowest partner of a row is its first copy.
    first = np.arange(len(X))
    np.minimum.at(first, cols, rows)
    return D[np.ix_(first, first)]


def sorted_neighbors(D, k, k_distances=None):
    """The k nearest neighbours of every point, self excluded, nearest first, and their distances.

    D: (token, token) distance matrix: non-negative, with a zero diagonal (e.g. from `pairwise_distances`).
    k: neighbours in the index table; k_distances: neighbours in the distance table (default k).
    Ties in the index table are broken by the lower neighbour index, as a stable sort of each row would.
    Returns (indices, distances): (token, k) int64 neighbour indices and (token, k_distances) float64
    sorted distances to the k_distances nearest neighbours (column j: the (j+1)-th). The distances are
    order statistics of each row, which do not depend on how ties are broken: their first k columns are
    the distances of `indices`.
    """
    D = np.ascontiguousarray(D, dtype=np.float64)  # contiguous: entries are gathered by flat index below
    n = D.shape[0]
    k_distances = k if k_distances is None else k_distances
    if D.shape != (n, n):
        raise ValueError(f"D must be square, got shape {D.shape}")
    if not (1 <= k <= n - 1 and 1 <= k_distances <= n - 1):
        raise ValueError(f"k and k_distances must be in 1..{n - 1}, got {k} and {k_distances}")
    if np.diagonal(D).any():
        raise ValueError("D must have a zero diagonal")
    # One partition serves both tables. Self is one of the zeros of its row (D >= 0): dropping the smallest
    # value of each row drops self from the multiset of distances, whichever zero it was. Non-negative
    # doubles order as their bit patterns read as int64, and integers partition and sort faster.
    largest = max(k, k_distances)
    nearest = np.partition(D.view(np.int64), largest, axis=1)[:, : largest + 1]
    nearest.sort(axis=1)
    nearest = nearest.view(np.float64)
    distances = np.ascontiguousarray(nearest[:, 1 : k_distances + 1])

    # Index table: the k smallest entries of each row under the order (distance, index), self excluded: all
    # entries below the k-th distance and the lowest-index ones equal to it.
    kth = nearest[:, k, None]
    candidate = D <= kth
    np.fill_diagonal(candidate, False)
    excess = np.count_nonzero(candidate, axis=1) - k
    tied = np.flatnonzero(excess)  # ties straddle the k-th distance
    if tied.size:
        chosen = candidate[tied]
        at_kth = chosen & (D[tied] == kth[tied])
        keep = np.count_nonzero(at_kth, axis=1) - excess[tied]
        chosen &= ~(at_kth & (np.cumsum(at_kth, axis=1) > keep[:, None]))
        candidate[tied] = chosen
    # np.flatnonzero lists each row's k entries in index order, and the stable sort keeps that order among
    # equal distances.
    flat = np.flatnonzero(candidate).reshape(n, k)
    order = np.argsort(D.ravel()[flat], axis=1, kind="stable")
    return np.take_along_axis(flat, order, axis=1) % n, distances
