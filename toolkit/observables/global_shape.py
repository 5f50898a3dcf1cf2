"""Global shape of one point cloud: norms, cosine similarities, anisotropy."""

import numpy as np

# Fixed start vector seed: the power method must be deterministic.
_POWER_SEED = 0
# Entries of the (token, token) cosine matrix formed at once: a block of 512 KB stays in cache.
_BLOCK_ENTRIES = 2**16


def norm_mean(X):
    """Mean Euclidean norm of the rows of X: (token, dim) float array. Returns a float (units of X)."""
    return float(np.linalg.norm(np.asarray(X, dtype=np.float64), axis=1).mean())


def cosine_stats(X, squared_distances=None):
    """Mean and standard deviation (ddof=0) of the cosine similarity over all pairs i != j.

    X: (token, dim) float array with nonzero rows and token >= 2 (computed in float64).
    squared_distances: optional (token, token) squared Euclidean distances between the rows of X, accurate
        to ~2e-13 relative (`squared_distances(X)`). Given, the cosines come from them by the law of cosines,
        cos_ij = (|x_i|^2 + |x_j|^2 - D2_ij) / (2 |x_i| |x_j|), instead of from a second (token, token)
        matrix product; their absolute error is then ~1e-13 (|x_i| / |x_j| + |x_j| / |x_i|).
    The mean is (|sum_i u_i|^2 - token) / (token (token - 1)) with u_i = x_i / |x_i|; the variance is the mean
    squared deviation from it over the pairs (two passes: stable even when all cosines are close to 1).
    Returns (mean, std) floats.
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if n < 2:
        raise ValueError("need at least 2 points")
    squared_norms = np.einsum("ij,ij->i", X, X)
    inverse_norms = 1.0 / np.sqrt(squared_norms)
    pairs = n * (n - 1)
    total = inverse_norms @ X  # the sum of the unit vectors; each has |u_i|^2 = 1 to rounding
    mean = (total @ total - n) / pairs
    if squared_distances is None:
        U = X * inverse_norms[:, None]
        deviations = U @ U.T
        deviations -= mean
        np.fill_diagonal(deviations, 0.0)
        return float(mean), float(np.sqrt(max(np.vdot(deviations, deviations) / pairs, 0.0)))
    D2 = np.asarray(squared_distances, dtype=np.float64)
    if D2.shape != (n, n):
        raise ValueError(f"squared_distances must be ({n}, {n}), got {D2.shape}")
    half_inverse = 0.5 * inverse_norms
    squares = 0.0
    step = max(1, _BLOCK_ENTRIES // n)
    for start in range(0, n, step):  # row blocks that stay in cache
        block = np.subtract(squared_norms, D2[start:start + step])
        block += squared_norms[start:start + step, None]
        block *= half_inverse[start:start + step, None]
        block *= inverse_norms
        block -= mean
        on_diagonal = np.arange(len(block))
        block[on_diagonal, on_diagonal + start] = 0.0
        squares += np.vdot(block, block)
    return float(mean), float(np.sqrt(max(squares / pairs, 0.0)))


def anisotropy(X, tol=1e-10, max_iter=300):
    """Share of the variance along the first principal axis: sigma_1^2 / sum_i sigma_i^2.

    X: (token, dim) float array; sigma_i are the singular values of the centred cloud Xc (float64).
    sigma_1^2 is the top eigenvalue of the Gram matrix G, Xc^T Xc (dim, dim) or Xc Xc^T (token, token)
    whichever is smaller, found by the power method from a fixed random start. G is applied as two
    matrix-vector products with Xc; only when the method is slow to converge is G formed (after
    min(token, dim) / 10 iterations, when forming it becomes the cheaper way), and the iterations go on with it.

    Stopping rule: the residual |G v - rho v| of the Rayleigh quotient rho = v^T G v (|v| = 1) is at most
    tol * trace(G). For symmetric G some eigenvalue then lies within tol * trace(G) of rho, and from a
    random start a residual that small is only reached next to the top eigenvalue, so the ratio is
    accurate to ~tol. The residual shrinks like (sigma_2 / sigma_1)^(2 iter): with the defaults the
    method converges when (sigma_2 / sigma_1)^2 <~ 0.93; otherwise (nearly isotropic clouds) after
    max_iter iterations the exact top eigenvalue from `numpy.linalg.eigvalsh` is used instead, which
    costs about as much as those iterations.
    Returns a float in [1 / rank, 1]; nan for a cloud of identical points.
    """
    X = np.asarray(X, dtype=np.float64)
    Xc = X - X.mean(axis=0)
    in_dim = Xc.shape[1] <= Xc.shape[0]  # G in the space of the smaller side
    total = np.vdot(Xc, Xc)  # trace(G)
    if total == 0:
        return float("nan")
    v = np.random.default_rng(_POWER_SEED).standard_normal(min(Xc.shape))
    v /= np.linalg.norm(v)
    form_gram_at = min(Xc.shape) // 10
    G = None
    for iteration in range(max_iter):
        if iteration == form_gram_at:
            G = Xc.T @ Xc if in_dim else Xc @ Xc.T
        if G is not None:
            w = G @ v
        else:
            w = Xc.T @ (Xc @ v) if in_dim else Xc @ (Xc.T @ v)
        rho = v @ w
        if np.linalg.norm(w - rho * v) <= tol * total:
            return float(rho / total)
        v = w / np.linalg.norm(w)
    if G is None:
        G = Xc.T @ Xc if in_dim else Xc @ Xc.T
    return float(np.linalg.eigvalsh(G)[-1] / total)
