"""What ``repgeo summarize`` computes: observable names, their variables, and the parameters that shape them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError

#: Per-prompt observables (per (prompt, layer) but bpc and contributions) → the results variables they fill.
PROMPT_OBSERVABLES = {
    "gride": ("gride_id", "gride_err", "gride_scale", "n_unique"),
    "twonn": ("twonn_id", "n_unique"),
    "overlap": ("overlap",),
    "cosine": ("cosine_mean", "cosine_std"),
    "anisotropy": ("anisotropy",),
    "reciprocity": ("nn_reciprocity", "nn_cosine"),
    "norm": ("norm_mean",),
    "bpc": ("bpc",),  # per prompt, not per layer: the client computes it from the store's losses and texts
    "contributions": ("contrib_corr", "contrib_corr_p", "head_norm_mean"),
}
#: Per-(group, layer) observables, computed with --groupby.
GROUP_OBSERVABLES = {
    "group_gride": ("group_gride_id", "group_gride_err", "group_gride_scale"),
    "group_anisotropy": ("group_anisotropy",),
    "group_kl": ("group_kl", "group_n_shared"),
}


@dataclass(frozen=True)
class SummarizeParams:
    """Every parameter that decides the numbers in a results store (recorded in it; a resume must match)."""

    observables: tuple = tuple(PROMPT_OBSERVABLES)
    overlap_k: int = 32  # overlap for k = 1..overlap_k
    gride_range_max: int = 256  # GRIDE scales n2 = 2, 4, …, ≤ range_max
    gride_maxk: int = 300  # neighbours used for GRIDE and TwoNN (dadapy's maxk), capped at n - 1
    anisotropy_tol: float = 1e-10
    save_knn: bool = False  # keep overlap_k nearest neighbours of every point
    distance_dtype: str | None = None  # "float16" or "float32": keep every cloud's distance matrix
    groupby: str | None = None
    reference: str | None = None
    group_size: int = 2000  # tokens pooled per group (subsampled with seed)
    kl_k: int = 5  # neighbour rank of the k-NN KL estimator
    seed: int = 0
    skip_tokens: int = 0  # positions 0 … skip_tokens-1 of every prompt are left out of every cloud and pool
    contrib_span: int = 10  # contributions: correlations over the first and the last contrib_span tokens

    @property
    def ks(self) -> np.ndarray:
        return np.arange(1, self.overlap_k + 1)

    @property
    def n2(self) -> np.ndarray:
        """The GRIDE scale coordinate: 2, 4, … up to range_max (small clouds leave the largest ones NaN)."""
        return 2 ** np.arange(1, int(self.gride_range_max).bit_length(), dtype=np.int64)

    def wants(self, name: str) -> bool:
        return name in self.observables

    def recorded(self) -> dict:
        return dict(asdict(self), observables=list(self.observables))


def parse_observables(text: str | None, groupby: str | None, reference: str | None) -> tuple:
    """The ``--observables`` list (default: every per-prompt one but contributions, plus the group ones with
    --groupby)."""
    known = list(PROMPT_OBSERVABLES) + list(GROUP_OBSERVABLES)
    if text is None:
        chosen = [name for name in PROMPT_OBSERVABLES if name != "contributions"]  # needs a store that has them
        if groupby:
            chosen += ["group_gride", "group_anisotropy"] + (["group_kl"] if reference is not None else [])
        return tuple(chosen)
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise UserError(f"unknown observable {unknown[0]!r}; choose from {', '.join(known)}")
    if not groupby and any(name in GROUP_OBSERVABLES for name in chosen):
        raise UserError("group observables need --groupby LABEL")
    if "group_kl" in chosen and reference is None:
        raise UserError("group_kl needs --reference VALUE: the group the others are compared with")
    return tuple(dict.fromkeys(chosen))
