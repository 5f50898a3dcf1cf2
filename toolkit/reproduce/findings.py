"""Findings: a claim, the numbers measured for it, a verdict by a rule fixed before measuring, and the analysis
choices (GRIDE scale, first token) under which the verdict changes.

Verdicts: "holds", "does not hold", or "not enough data" (too few prompts, layers or groups for the rule), never a
finding left out. The statistical rules are two-sided tests at the 5 % level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

HOLDS, FAILS, NO_DATA = "holds", "does not hold", "not enough data"
ALPHA = 0.05


@dataclass
class Finding:
    """claim: as the study states it; numbers: what was measured (primary variant first, then every variant);
    depends_on: the analysis choices whose change flips the verdict (e.g. "n2", "first token")."""

    claim: str
    verdict: str
    numbers: dict
    depends_on: list = field(default_factory=list)
    rule: str = ""

    def as_json(self) -> dict:
        return {"claim": self.claim, "verdict": self.verdict, "numbers": self.numbers, "depends_on": self.depends_on,
                "rule": self.rule}


def verdict_of(condition: bool) -> str:
    return HOLDS if condition else FAILS


def clean(value):
    """A JSON-safe number: floats rounded to 4 significant digits, NaN as None; containers recursively."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if not math.isfinite(value) else float(f"{value:.4g}")
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def correlation(x, y, minimum: int = 5) -> dict | None:
    """Pearson and Spearman correlation of the finite pairs (x, y) with two-sided p-values; None below ``minimum``
    pairs or when either side is constant."""
    from scipy import stats

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < minimum or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
    return {"n": len(x), "pearson_r": pearson.statistic, "pearson_p": pearson.pvalue,
            "spearman_rho": spearman.statistic, "spearman_p": spearman.pvalue}


#: Pairs a two-sided Wilcoxon signed-rank test needs before p can fall below 5 % (with n = 5 the least p is 0.0625).
WILCOXON_MINIMUM = 6


def paired_greater(a, b) -> dict | None:
    """Is ``a`` greater than ``b`` pair by pair? Mean difference, pairs with a > b, Wilcoxon signed-rank p (two
    sided); None below WILCOXON_MINIMUM finite pairs."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < WILCOXON_MINIMUM:
        return None
    difference = a - b
    p = 1.0 if not difference.any() else stats.wilcoxon(a, b).pvalue
    return {"n": len(a), "mean_difference": difference.mean(), "pairs_greater": int((difference > 0).sum()), "p": p}


def decided_greater(test: dict | None) -> str:
    """The verdict of :func:`paired_greater`: holds when the mean difference is positive and p < ALPHA."""
    if test is None:
        return NO_DATA
    return verdict_of(test["mean_difference"] > 0 and test["p"] < ALPHA)


def decided_positive(corr: dict | None) -> str:
    """The verdict of :func:`correlation` for a positive correlation: Pearson and Spearman both > 0, p < ALPHA."""
    if corr is None:
        return NO_DATA
    return verdict_of(corr["pearson_r"] > 0 and corr["pearson_p"] < ALPHA and corr["spearman_rho"] > 0
                      and corr["spearman_p"] < ALPHA)


def no_data(claim: str, rule: str, reason: str) -> Finding:
    """A finding the data cannot decide under any variant, with the reason as its numbers."""
    return Finding(claim, NO_DATA, {"reason": reason}, [], rule)


def across_variants(claim: str, rule: str, outcomes: dict, primary, axes: dict) -> Finding:
    """One finding from its outcome under every analysis variant.

    outcomes: variant → (verdict, numbers); primary: the variant the study itself used (its verdict is the
    finding's); axes: axis name → function(variant) giving that variant's value on the axis (e.g. "n2" →
    lambda v: v[0]). ``depends_on`` names each axis along which some variant, differing from the primary in that
    axis alone, has another verdict.
    """
    verdict, numbers = outcomes[primary]
    depends_on = []
    for axis, value_of in axes.items():
        others = [v for v in outcomes if v != primary and value_of(v) != value_of(primary)
                  and all(f(v) == f(primary) for a, f in axes.items() if a != axis)]
        if any(outcomes[v][0] != verdict and NO_DATA not in (outcomes[v][0], verdict) for v in others):
            depends_on.append(axis)
    by_variant = {variant_name(v, axes): dict(verdict=o[0], **o[1]) for v, o in outcomes.items()}
    return Finding(claim, verdict, clean({"variant": variant_name(primary, axes), **numbers,
                                          "by_variant": by_variant}), depends_on, rule)


def variant_name(variant, axes: dict) -> str:
    return ", ".join(f"{axis} {value_of(variant)}" for axis, value_of in axes.items())
