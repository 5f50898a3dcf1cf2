"""Intrinsic-dimension estimators from nearest-neighbour distances: GRIDE scaling curve and TwoNN.

Both reproduce dadapy 0.3.4 (`Data.return_id_scaling_gride`, `Data.compute_id_2NN` with default
arguments), including its outlier filter, zero-distance regularisation and root-finding tolerance, so
results can be compared with published dadapy numbers.
"""

import numpy as np

_EPS = np.finfo(np.float64).eps
# Bisection bracket and precision of the maximum-likelihood id, as dadapy's defaults (d0, d1, eps).
_ID_MIN, _ID_MAX, _ID_PRECISION = 1e-3, 1e3, 1e-7


def gride_ranks(n_points, range_max=256):
    """Neighbour ranks n2 = 2, 4, 8, ... of the GRIDE scales for a cloud of n_points distinct points.

    The largest rank is the largest power of two <= min(range_max, n_points - 1). (dadapy uses
    min(range_max, n_points) and fails when that is a power of two <= range_max, e.g. n_points=128:
    there is no 128-th neighbour among 127 others; for every other n_points the ranks are the same.)
    Each scale compares the n1 = n2/2-th and n2-th neighbour distances.
    Returns (scale,) int64 array, empty when n_points < 3.
    """
    largest = min(int(range_max), int(n_points) - 1)
    if largest < 2:
        return np.zeros(0, dtype=np.int64)
    return 2 ** np.arange(1, largest.bit_length(), dtype=np.int64)


def _increasing_root(score, n_scales, start):
    """Roots in [1e-3, 1e3] of increasing functions of d, one per scale, to ~1e-10 relative.

    score: d (scale,) -> (value, slope) at d, each (scale,). Safeguarded Newton from `start`: a Newton step
    that leaves the bracket known so far becomes a bisection. GRIDE's minus log-likelihood derivative is
    increasing and concave, so from a start below the root Newton approaches it from below in a few steps.
    dadapy bisects to 1e-7 and returns the final midpoint, within 5e-8 of the root. Where [1e-3, 1e3] holds
    no sign change, that bisection ends next to 1e-3 whatever the side of the root, and so does this.
    """
    lo, hi = np.full(n_scales, _ID_MIN), np.full(n_scales, _ID_MAX)
    (value_lo, _), (value_hi, _) = score(lo), score(hi)
    bracketed = (value_lo < 0) & (value_hi > 0)
    # dadapy's bisection where there is no root: it always moves its upper end (the sign never changes).
    end = _ID_MAX
    while end - _ID_MIN > _ID_PRECISION:
        end = (_ID_MIN + end) / 2
    d = np.where(bracketed, np.clip(start, _ID_MIN, _ID_MAX), (_ID_MIN + end) / 2)
    active = bracketed.copy()
    for _ in range(200):
        if not active.any():
            break
        value, slope = score(d)
        lo = np.where(active & (value < 0), d, lo)
        hi = np.where(active & (value > 0), d, hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            newton_step = -value / slope
        # 1e-10: far below dadapy's own 5e-8, and above the rounding noise of the score near its root
        converged = (value == 0) | (np.abs(newton_step) <= 1e-10 * d) | (hi - lo <= 1e-10 * d)
        newton = d + newton_step
        active &= ~converged
        d = np.where(active, np.where((newton > lo) & (newton < hi), newton, (lo + hi) / 2), d)
    return d


def gride_scaling(distances, range_max=256):
    """GRIDE intrinsic dimension at the neighbour ranks n2 = 2, 4, 8, ... (Denti et al. 2022).

    distances: (token, k) sorted nearest-neighbour distances of a de-duplicated cloud, self excluded
        (column j holds the (j+1)-th neighbour, e.g. from `sorted_neighbors`); k must reach the largest
        rank of `gride_ranks(token, range_max)`.

    For each scale, mu_i = r_{n2}(i) / r_{n1}(i) with n1 = n2/2; the id d maximises the likelihood
    prod_i d (mu_i^d - 1)^(n1-1) / (B(n1, n1) mu_i^((n2-1)d+1)) over the mu_i below the outlier
    threshold q50 + 20 (q95 - q50) (q: percentiles of mu over points): the root of its derivative in
    [1e-3, 1e3], which dadapy bisects to 1e-7 and this finds by safeguarded Newton steps to ~1e-10 relative
    (within 5e-8 of dadapy's midpoint), all scales together.
    Distances below machine epsilon are raised to it and mu == 1 is nudged by 10 eps, as in dadapy.

    Returns (ids, errs, scales), each (scale,) float64: the id, its standard error 1/sqrt(Fisher
    information) over all points, and the scale in distance units: the mean over points of
    (r_{n1} + r_{n2}) / 2. The ranks are `gride_ranks(token, range_max)`.
    """
    r = np.asarray(distances, dtype=np.float64)
    n = r.shape[0]
    n2 = gride_ranks(n, range_max)
    needed = int(n2[-1]) if n2.size else 0
    if r.ndim != 2 or r.shape[1] < needed:
        raise ValueError(f"need (token, k>={needed}) neighbour distances, got {r.shape}")
    if n2.size == 0:
        empty = np.zeros(0)
        return empty, empty.copy(), empty.copy()
    n1 = n2 // 2
    r = np.maximum(r, _EPS)
    r1, r2 = r[:, n1 - 1], r[:, n2 - 1]  # (token, scale)
    scales = (r1.mean(axis=0) + r2.mean(axis=0)) / 2
    mus = r2 / r1
    mus[mus == 1] += 10 * _EPS
    log_mus = np.log(mus)

    q95, q50 = np.percentile(mus, [95, 50], axis=0)
    kept = mus < 20 * (q95 - q50) + q50  # drops mu's from near-overlapping points
    n_kept = kept.sum(axis=0)
    kept_log_mus = np.where(kept, log_mus, 0.0)

    def score(d):  # (scale,) -> (minus the derivative of the log-likelihood in d, its derivative in d)
        mu_d = np.exp(-d * log_mus)  # mu^-d; exp is cheaper than **
        one_minus = np.maximum(1.0 - mu_d, 2 * _ID_PRECISION)
        value = (((1 - n1) / one_minus + n2 - 1.0) * kept_log_mus).sum(axis=0) - (n_kept - 1) / d
        # The clamp above is flat: no slope there.
        slope = np.where(one_minus > 2 * _ID_PRECISION, kept_log_mus * log_mus * mu_d / one_minus**2, 0.0)
        return value, (n1 - 1) * slope.sum(axis=0) + (n_kept - 1) / d**2

    # Start below the root, at the larger root of two upper bounds of the score (1 / (1 - e^-x) >= 1 and
    # >= 1 / x + 1 / 2 for x > 0, and 1 - n1 <= 0): close to the root whether d log(mu) is large or small.
    sum_log_mus = np.maximum(kept_log_mus.sum(axis=0), _EPS)
    start = np.maximum((n_kept - 1) / ((n2 - n1) * sum_log_mus),
                       (n_kept * n1 - 1) / ((n2 - (n1 + 1) / 2) * sum_log_mus))
    ids = _increasing_root(score, n2.size, start)

    # Fisher information of the likelihood on all points (dadapy does not filter here).
    mu_d = mus ** -ids  # as dadapy: near mu = 1 the ratio below magnifies the last bits of mu^-d
    one_minus = np.maximum(1.0 - mu_d, 5 * _EPS)
    fisher = n / ids**2 + ((n1 - 1) * (log_mus / one_minus) ** 2 * mu_d).sum(axis=0)
    return ids, fisher**-0.5, scales


def twonn_id(distances, mu_fraction=0.9):
    """TwoNN intrinsic dimension (Facco et al. 2017), as dadapy's `compute_id_2NN()` with its defaults.

    distances: (token, k>=2) sorted nearest-neighbour distances of a de-duplicated cloud, self excluded.
    With mu_i = r_2(i) / r_1(i) sorted increasingly, the largest (1 - mu_fraction) share is discarded
    (n_eff = int(token * mu_fraction) kept) and the id is the least-squares slope through the origin of
    -log(1 - i/token) against log mu_(i), i = 1..n_eff.
    Returns the id (float). dadapy's error for this setting is identically 0 and is not returned;
    GRIDE's first scale (n2 = 2) is the maximum-likelihood 2NN id with a standard error.
    """
    if not 0 < mu_fraction < 1:
        raise ValueError(f"mu_fraction must be in (0, 1), got {mu_fraction}")
    r = np.asarray(distances, dtype=np.float64)
    n = r.shape[0]
    n_eff = int(n * mu_fraction)
    x = np.sort(np.log(r[:, 1] / r[:, 0]))[:n_eff]
    y = -np.log1p(-np.arange(1, n_eff + 1) / n)
    return float(x @ y / (x @ x))
