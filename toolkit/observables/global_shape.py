"""Global shape of one point cloud: norms, cosine similarities, anisotropy."""

import numpy as np

# Fixed start vector seed: the power method must be deterministic.
_POWER_SEED = 0


def norm_mean(X):
    """Mean Euclidean norm of the rows of X: (token, dim) float array. Returns a float (units of X)."""
    return float(np.linalg.norm(np.asarray(X, dtype=np.float64), axis=1).mean())


def cosine_stats(X):
    """Mean and standard deviation (ddof=0) of the cosine similarity over all pairs i != j.

    X: (token, dim) float array with nonzero rows and token >= 2 (computed in float64).
    Returns (mean, std) floats.
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    if n < 2:
        raise ValueError("need at least 2 points")
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    C = U @ U.T
    diag = np.diagonal(C)
    pairs = n * (n - 1)
    mean = (C.sum() - diag.sum()) / pairs
    # Two-pass variance (sum of squared deviations), stable even when all cosines are close to 1.
    var = (np.square(C - mean).sum() - np.square(diag - mean).sum()) / pairs
    return float(mean), float(np.sqrt(max(var, 0.0)))


def anisotropy(X, tol=1e-10, max_iter=300):
    """Share of the variance along the first principal axis: sigma_1^2 / sum_i sigma_i^2.

    X: (token, dim) float array; sigma_i are the singular values of the centred cloud (float64).
    sigma_1^2 is the top eigenvalue of the Gram matrix G, (dim, dim) or (token, token) whichever is
    smaller, found by the power method from a fixed random start.

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
    G = Xc.T @ Xc if Xc.shape[1] <= Xc.shape[0] else Xc @ Xc.T
    total = np.trace(G)
    if total == 0:
        return float("nan")
    v = np.random.default_rng(_POWER_SEED).standard_normal(G.shape[0])
    v /= np.linalg.norm(v)
    for _ in range(max_iter):
        w = G @ v
        rho = v @ w
        if np.linalg.norm(w - rho * v) <= tol * total:
            return float(rho / total)
        v = w / np.linalg.norm(w)
    return float(np.linalg.eigvalsh(G)[-1] / total)
