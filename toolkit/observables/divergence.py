"""KL divergence between two point clouds X ~ P and Y ~ Q in the same space."""

import numpy as np
from scipy.linalg import solve_triangular

from .distances import _distances


def knn_kl_divergence(X, Y, k=1):
    """k-NN estimate of KL(P || Q) from samples X ~ P and Y ~ Q (Wang, Kulkarni, Verdu 2009).

    X: (n, dim), Y: (m, dim) float arrays (computed in float64), 1 <= k <= min(n - 1, m).

        KL(P || Q) ~= dim / n * sum_i log(nu_k(i) / rho_k(i)) + log(m / (n - 1))

    rho_k(i): distance from X[i] to its k-th nearest neighbour among the other rows of X;
    nu_k(i): distance from X[i] to its k-th nearest neighbour among the rows of Y; dim is the ambient
    dimension (the estimator assumes P and Q have densities in R^dim). Consistent as n, m -> inf.
    Returns a float in nats; nan when some rho_k or nu_k is 0 (duplicate rows within X, or a row of X
    repeated in Y), where the estimator is undefined.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    n, dim = X.shape
    m = Y.shape[0]
    if Y.shape[1] != dim or not 1 <= k <= min(n - 1, m):
        raise ValueError(f"need X (n, dim), Y (m, dim) and 1 <= k <= min(n - 1, m); got {X.shape}, {Y.shape}, k={k}")
    within = _distances(X)
    np.fill_diagonal(within, np.inf)
    rho = np.partition(within, k - 1, axis=1)[:, k - 1]
    nu = np.partition(_distances(X, Y), k - 1, axis=1)[:, k - 1]
    if np.any(rho == 0) or np.any(nu == 0):
        return float("nan")
    return float(dim * np.mean(np.log(nu / rho)) + np.log(m / (n - 1)))


def gaussian_kl_divergence(X, Y, ridge=1e-6):
    """KL(N_P || N_Q) between Gaussians fitted to X: (n, dim) and Y: (m, dim) (float64), in nats.

    Means and unbiased covariances S_P, S_Q (n, m >= 2), each regularised to S + lam I with the shared
    ridge lam = ridge * (trace(S_P) + trace(S_Q)) / (2 dim), so covariances of rank < dim (always the
    case when n or m <= dim) stay positive definite. Closed form:

        KL = 1/2 [tr(S_Q^-1 S_P) + (mu_Q - mu_P)^T S_Q^-1 (mu_Q - mu_P) - dim + log det S_Q - log det S_P]

    With rank-deficient covariances the value is dominated by directions where only one cloud varies and
    scales like variance / lam: compare values only at the same ridge. Returns a float >= 0.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    dim = X.shape[1]
    if Y.shape[1] != dim or min(X.shape[0], Y.shape[0]) < 2:
        raise ValueError(f"need X (n>=2, dim), Y (m>=2, dim); got {X.shape}, {Y.shape}")
    cov_p = np.atleast_2d(np.cov(X, rowvar=False))
    cov_q = np.atleast_2d(np.cov(Y, rowvar=False))
    lam = ridge * (np.trace(cov_p) + np.trace(cov_q)) / (2 * dim)
    cov_p[np.diag_indices(dim)] += lam
    cov_q[np.diag_indices(dim)] += lam
    chol_p = np.linalg.cholesky(cov_p)
    chol_q = np.linalg.cholesky(cov_q)
    whitened_p = solve_triangular(chol_q, chol_p, lower=True)  # |L_Q^-1 L_P|_F^2 = tr(S_Q^-1 S_P)
    whitened_shift = solve_triangular(chol_q, Y.mean(axis=0) - X.mean(axis=0), lower=True)
    logdet_ratio = 2 * (np.log(np.diagonal(chol_q)).sum() - np.log(np.diagonal(chol_p)).sum())
    return float(0.5 * (np.square(whitened_p).sum() + np.square(whitened_shift).sum() - dim + logdet_ratio))
