"""Galaxy scale (Li et al. 2024): the eigenvalue spectrum of a point cloud's covariance and its power-law slope.

A cloud of SAE decoder directions (feature, d_in) or feature activations (token, feature) is not isotropic: its
covariance eigenvalues fall off roughly as a power law λ_r ∝ r^slope over the middle ranks. An isotropic Gaussian
cloud of the same shape (`isotropic_reference`) gives the Marchenko–Pastur spectrum, nearly flat by comparison.
"""

import numpy as np

#: First rank of the default power-law fit: the top few eigenvalues are outlier directions, not the power law.
FIT_FIRST_RANK = 10


def covariance_spectrum(X):
    """Eigenvalues of the sample covariance (ddof=1) of the rows of X: (row, dim) float, largest first.

    Computed in float64 from the smaller Gram matrix of the centred rows, Xcᵀ Xc (dim, dim) or Xc Xcᵀ
    (row, row), which share their nonzero eigenvalues; the rest (rank < dim) are 0, and rounding below 0 is
    clipped to 0. Returns (dim,) float64, in units of X squared.
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    if n < 2:
        raise ValueError("need at least 2 rows")
    Xc = X - X.mean(axis=0)
    G = Xc.T @ Xc if d <= n else Xc @ Xc.T
    spectrum = np.zeros(d)
    top = np.linalg.eigvalsh(G)[::-1] / (n - 1)
    spectrum[: top.size] = np.clip(top, 0.0, None)
    return spectrum


def default_fit_range(eigenvalues):
    """Default ranks (first, last) of `power_law_slope`: from FIT_FIRST_RANK to half the numerical rank.

    The numerical rank counts eigenvalues above λ_1 · n · machine epsilon (n = number of eigenvalues). Stopping
    at half of it leaves out the tail, where a finite sample bends the spectrum down (the Marchenko–Pastur edge)
    and rounding dominates.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    rank = int((lam > lam.max() * lam.size * np.finfo(np.float64).eps).sum())
    return FIT_FIRST_RANK, rank // 2


def power_law_slope(eigenvalues, fit_range=None):
    """Slope of log λ_r against log r by least squares over the ranks r = first..last (1-based, inclusive).

    eigenvalues: (n,) float, largest first (rank r is eigenvalues[r − 1]); fit_range: (first, last), default
    `default_fit_range`. λ_r ∝ r^slope, so a power-law decay gives a negative slope (−α). The range must hold at
    least 2 ranks, all with positive eigenvalues (else ValueError). Returns a float.
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    first, last = default_fit_range(lam) if fit_range is None else fit_range
    if not 1 <= first < last <= lam.size:
        raise ValueError(f"fit range must satisfy 1 <= first < last <= {lam.size}, got ({first}, {last})")
    ranks = np.arange(first, last + 1)
    values = lam[first - 1:last]
    if not (values > 0).all():
        raise ValueError(f"eigenvalues at ranks {first}..{last} must be positive; choose a smaller fit range")
    return float(np.polyfit(np.log(ranks), np.log(values), 1)[0])


def isotropic_reference(n, d, seed):
    """`covariance_spectrum` of n points of a standard Gaussian in d dimensions (numpy Generator seeded with seed).

    The reference for a cloud of shape (n, d): unit variance in every direction, so any structure in its spectrum
    is finite-sample noise. Returns (d,) float64.
    """
    return covariance_spectrum(np.random.default_rng(seed).standard_normal((n, d)))
