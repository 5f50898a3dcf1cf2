"""How attention heads write into the residual stream: correlation of write direction and size (pure math)."""

from __future__ import annotations

import numpy as np

STATISTICS = ("pearson", "spearman", "kendall")
SPANS = ("first", "last")


def cosine_norm_correlation(cosine, norm, span: int) -> tuple:
    """Correlations between the heads' write cosine (with the stream) and write norm, over heads × tokens.

    cosine, norm: (head, token) of one block of one prompt; span: N, the first N and the last N tokens (the whole
    prompt when it is shorter). Returns (correlation, p-value), each (statistic, span) float64 for STATISTICS ×
    SPANS; NaN where a side is constant.
    """
    from scipy import stats

    cosine, norm = np.asarray(cosine, np.float64), np.asarray(norm, np.float64)
    n = cosine.shape[1]
    windows = {"first": slice(0, min(span, n)), "last": slice(max(n - span, 0), n)}
    corr = np.full((len(STATISTICS), len(SPANS)), np.nan)
    p = np.full_like(corr, np.nan)
    tests = {"pearson": stats.pearsonr, "spearman": stats.spearmanr, "kendall": stats.kendalltau}
    for j, name in enumerate(SPANS):
        x, y = cosine[:, windows[name]].ravel(), norm[:, windows[name]].ravel()
        if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        for i, statistic in enumerate(STATISTICS):
            result = tests[statistic](x, y)
            corr[i, j], p[i, j] = result.statistic, result.pvalue
    return corr, p
