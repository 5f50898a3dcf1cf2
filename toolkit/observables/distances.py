"""Exact float64 Euclidean distances (or their squares) and nearest-neighbour tables of one point cloud."""

import numpy as np

# A squared distance below this fraction of |a|^2 + |b|^2 (after centring) lost too many digits to
# cancellation in the Gram-matrix formula and is recomputed from the difference vector.
_CANCELLATION_RATIO = 1e-2
# Pairs recomputed directly per chunk: bounds the (pairs, dim) scratch array to ~20 MB at dim=576.
_PAIRS_PER_CHUNK = 4096
# Entries of the distance matrix transformed at once: a block of 512 KB stays in cache across its passes.
_BLOCK_ENTRIES = 2**16


def _row_hash(rows):
    """A 64-bit hash of the bits of each row of a (token, dim) array: equal rows, equal hashes.

    Integer arithmetic that wraps around: exact, and the same whatever the summation order. Returns (token,)
    uint64.
    """
    words = rows.view(np.dtype(f"u{rows.dtype.itemsize}")).astype(np.uint64, copy=False)
    multipliers = np.random.default_rng(0).integers(1, 2**63, size=rows.shape[1], dtype=np.uint64) | np.uint64(1)
    return words @ multipliers


def _first_copies(X):
    """For every row of X (token, dim), the index of the first row equal to it (itself when unique).

    Rows are compared bitwise after mapping -0.0 to +0.0, i.e. two rows are copies exactly when their
    Euclidean distance is 0 (NaN rows are not expected). Returns (token,) int64.
    """
    # Adding 0.0 turns -0.0 into +0.0 so that bitwise equality below equals float equality.
    rows = np.ascontiguousarray(X + X.dtype.type(0))
    # Rows grouped by hash, then each checked against its group's first: far cheaper than sorting rows.
    _, first_of_hash, inverse = np.unique(_row_hash(rows), return_index=True, return_inverse=True)
    first = first_of_hash[inverse.ravel()]
    copies = np.flatnonzero(first != np.arange(len(rows)))
    if np.array_equal(rows[copies], rows[first[copies]]):
        return first
    # Two distinct rows share a hash (odds ~2^-64 per pair): sort the rows' bytes instead.
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


def shared_rows(X, Y):
    """Which rows of X are also rows of Y, and which rows of Y are also rows of X (exact copies, compared as in
    `first_occurrences`: at Euclidean distance 0).

    X: (n, dim), Y: (m, dim) float arrays. Returns ((n,) bool, (m,) bool).
    """
    X, Y = np.asarray(X), np.asarray(Y)
    n = len(X)
    first = _first_copies(np.concatenate([X, Y.astype(X.dtype, copy=False)]))
    first_x, first_y = first[:n], first[n:]
    # A row of Y is shared when its first copy lies in X; a row of X when it is the first copy of such a row
    # (or a copy of the same first row within X).
    in_y = first_y < n
    in_x = np.isin(first_x, first_y[in_y])
    return in_x, in_y


def _squared_distances(A, B=None):
    """Squared Euclidean distances between the rows of A, (a, dim), and of B, (b, dim) (B=None: A with itself).

    Gram-matrix formula on centred float64 data, then the pairs where that formula cancels badly
    (near-duplicates) are recomputed exactly from A[i] - B[j]. The result is accurate to ~2e-13 relative
    and never negative; for B=None it is exactly symmetric (the pairs i > j are copied from j < i) with an
    exactly zero diagonal. The matrix is transformed in row blocks that stay in cache.
    Returns the (a, b) float64 squared distances.
    """
    A = np.asarray(A, dtype=np.float64)
    same = B is None
    B = A if same else np.asarray(B, dtype=np.float64)
    shift = (A.sum(axis=0) + (0 if same else B.sum(axis=0))) / (A.shape[0] + (0 if same else B.shape[0]))
    Ac = A - shift
    Bc = Ac if same else B - shift
    a2 = np.einsum("ij,ij->i", Ac, Ac)
    b2 = a2 if same else np.einsum("ij,ij->i", Bc, Bc)
    D2 = Ac @ Bc.T  # for same, numpy uses syrk: bitwise symmetric
    step = max(1, _BLOCK_ENTRIES // max(D2.shape[1], 1))
    for start in range(0, D2.shape[0], step):
        d2 = D2[start:start + step]  # a view: D2 becomes the squared distances in place
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
        if not close.any():
            continue
        rows, cols = np.nonzero(close)
        rows += start
        if same:  # the candidates are symmetric: compute i < j, copy i > j from the finished transpose
            lower = rows > cols
            rows, cols, lower_rows, lower_cols = rows[~lower], cols[~lower], rows[lower], cols[lower]
        for first in range(0, rows.size, _PAIRS_PER_CHUNK):
            r, c = rows[first:first + _PAIRS_PER_CHUNK], cols[first:first + _PAIRS_PER_CHUNK]
            diff = A[r] - B[c]
            d2[r - start, c] = np.einsum("ij,ij->i", diff, diff)
        if same:
            d2[lower_rows - start, lower_cols] = D2[lower_cols, lower_rows]
    return D2


def _distances(A, B=None):
    """Euclidean distances between the rows of A, (a, dim), and of B, (b, dim) (B=None: A with itself).

    See `_squared_distances`. Returns an (a, b) float64 array, accurate to ~1e-13 relative.
    """
    return np.sqrt(_squared_distances(A, B))


def squared_distances(X):
    """Squared Euclidean distances between all rows of X.

    X: (token, dim) float array (float16/32/64; computed in float64).
    Returns D2: (token, token) float64 in squared units of X, symmetric, D2[i, i] == 0 exactly, relative
    error ~2e-13 even for near-duplicate rows (cancellation-prone pairs of the Gram formula are recomputed
    directly). D2[i, j] == 0 exactly when rows i and j are equal. Copies of a row (repeated tokens) get
    bitwise-equal rows and columns, so that ties among them break by index. Nearest neighbours need no
    square root: `sorted_neighbors` orders D2 as it would order the distances.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be a (token, dim) array, got shape {X.shape}")
    first = _first_copies(X)
    keep = np.unique(first)
    if keep.size == len(X):
        return _squared_distances(X)
    # Copies (frequent at the embedding layer): the distinct rows only, then each copy takes its first's
    # row and column.
    at = np.searchsorted(keep, first)
    return _squared_distances(X[keep])[np.ix_(at, at)]


def pairwise_distances(X):
    """Euclidean distances between all rows of X: the square root of `squared_distances(X)`.

    X: (token, dim) float array. Returns D: (token, token) float64 in units of X, with the properties of
    `squared_distances` (relative error ~1e-13).
    """
    return np.sqrt(squared_distances(X))


def sorted_neighbors(D, k, k_distances=None):
    """The k nearest neighbours of every point, self excluded, nearest first, and their distances.

    D: (token, token) distances or squared distances (`pairwise_distances`, `squared_distances`): non-negative,
        with a zero diagonal. Squares order the neighbours as the distances do and save a square root per
        entry; the returned values are then squared distances too.
    k: neighbours in the index table; k_distances: neighbours in the distance table (default k).
    Ties in the index table (equal entries of D) are broken by the lower neighbour index, as a stable sort of
    each row would.
    Returns (indices, distances): (token, k) int64 neighbour indices and (token, k_distances) float64
    sorted entries of D for the k_distances nearest neighbours (column j: the (j+1)-th). They are order
    statistics of each row, which do not depend on how ties are broken: their first k columns are the
    entries of `indices`.
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
