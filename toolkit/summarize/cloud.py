"""Observables of one prompt across layers, and of pooled groups at one layer: compositions of pure functions.

No I/O here: the callers hand in arrays (one (token, dim) slab per layer) and get arrays back.
"""

from __future__ import annotations

import numpy as np

from .. import observables as obs


def _place_gride(row_id, row_err, row_scale, n2, distances, n_unique, range_max):
    ids, errs, scales = obs.gride_scaling(distances, range_max=range_max)
    at = np.searchsorted(n2, obs.gride_ranks(n_unique, range_max))
    row_id[at], row_err[at], row_scale[at] = ids, errs, scales


def empty_prompt_results(params, n_layers: int, width: int) -> dict:
    """NaN-filled per-prompt result arrays: (layer,), (layer, n2), (layer, k), knn (layer, token, neighbor)."""
    nan = lambda *shape: np.full(shape, np.nan)  # noqa: E731
    L, S, K = n_layers, len(params.n2), params.overlap_k
    out = {}
    if params.wants("gride"):
        out.update(gride_id=nan(L, S), gride_err=nan(L, S), gride_scale=nan(L, S))
    if params.wants("gride") or params.wants("twonn"):
        out["n_unique"] = np.full(L, -1, dtype=np.int32)
    if params.wants("twonn"):
        out["twonn_id"] = nan(L)
    if params.wants("overlap"):
        out["overlap"] = nan(L, K)
    if params.wants("cosine"):
        out.update(cosine_mean=nan(L), cosine_std=nan(L))
    if params.wants("anisotropy"):
        out["anisotropy"] = nan(L)
    if params.wants("reciprocity"):
        out.update(nn_reciprocity=nan(L), nn_cosine=nan(L))
    if params.wants("norm"):
        out["norm_mean"] = nan(L)
    if params.save_knn:
        out.update(knn_index=np.full((L, width, K), -1, dtype=np.int32), knn_distance=nan(L, width, K))
    return out


def prompt_observables(layers, params, n_layers: int, width: int) -> dict:
    """All per-(prompt, layer) observables of one prompt.

    layers: iterable of (token, dim) arrays, layer 0 first (the prompt's n_tokens vectors at each layer).
    Overlap at layer l compares layers l and l+1 on all points (self excluded, ties to the lower index);
    GRIDE, TwoNN and the nearest-neighbour statistics use the cloud with exact duplicates removed
    (``n_unique`` points). Returns name → array, NaN where a cloud is too small for an observable.
    """
    out = empty_prompt_results(params, n_layers, width)
    ks = params.ks
    previous = None
    for layer, X in enumerate(layers):
        X = np.asarray(X, dtype=np.float64)
        n = len(X)
        if n < 3:
            continue
        D = obs.pairwise_distances(X)
        dedup = params.wants("gride") or params.wants("twonn") or params.wants("reciprocity")
        Xu, n_unique = obs.unique_rows(X) if dedup else (X, n)
        k_unique = min(max(params.gride_maxk, 2), n_unique - 1)
        need_knn = params.wants("overlap") or params.save_knn
        unique_table = None
        if need_knn:
            k = min(params.overlap_k, n - 1)
            if dedup and n_unique == n and n_unique >= 3:
                # no duplicates: one stable sort serves both tables (its first k columns are the k-table)
                unique_table = obs.sorted_neighbors(D, max(k, k_unique))
                idx, dist = unique_table[0][:, :k], unique_table[1][:, :k]
            else:
                idx, dist = obs.sorted_neighbors(D, k)
            if params.wants("overlap") and previous is not None:
                valid = ks[ks <= idx.shape[1]]
                out["overlap"][layer - 1, : len(valid)] = obs.neighborhood_overlap(previous, idx, valid)
            previous = idx
            if params.save_knn:
                out["knn_index"][layer, :n, : idx.shape[1]] = idx
                out["knn_distance"][layer, :n, : idx.shape[1]] = dist
        if dedup:
            if "n_unique" in out:
                out["n_unique"][layer] = n_unique
            if n_unique >= 3:
                if unique_table is None:
                    Du = D if n_unique == n else obs.pairwise_distances(Xu)
                    unique_table = obs.sorted_neighbors(Du, k_unique)
                iu, du = unique_table[0][:, :k_unique], unique_table[1][:, :k_unique]
                if params.wants("reciprocity"):  # on distinct points: a duplicate's twin is no neighbour
                    out["nn_reciprocity"][layer] = obs.nn_reciprocity(iu)
                    out["nn_cosine"][layer] = obs.nn_cosine(Xu, iu)
                if params.wants("gride"):
                    _place_gride(out["gride_id"][layer], out["gride_err"][layer], out["gride_scale"][layer],
                                 params.n2, du, n_unique, params.gride_range_max)
                if params.wants("twonn"):
                    out["twonn_id"][layer] = obs.twonn_id(du)
        if params.wants("cosine"):
            out["cosine_mean"][layer], out["cosine_std"][layer] = obs.cosine_stats(X)
        if params.wants("anisotropy"):
            out["anisotropy"][layer] = obs.anisotropy(X, tol=params.anisotropy_tol)
        if params.wants("norm"):
            out["norm_mean"][layer] = obs.norm_mean(X)
    return out


def group_observables(pools: dict, params) -> dict:
    """Per-group observables at one layer. pools: group name → (token, dim) pooled sample of that group.

    Returns name → (group,) or (group, n2) arrays in the order of ``pools``. ``group_kl`` is
    KL(group || reference) by the k-NN estimator on de-duplicated pools (NaN where it is undefined, e.g.
    when the two pools share a vector, as identical tokens do at the embedding layer).
    """
    names = list(pools)
    G, S = len(names), len(params.n2)
    out = {}
    if params.wants("group_gride"):
        out.update(group_gride_id=np.full((G, S), np.nan), group_gride_err=np.full((G, S), np.nan),
                   group_gride_scale=np.full((G, S), np.nan))
    if params.wants("group_anisotropy"):
        out["group_anisotropy"] = np.full(G, np.nan)
    if params.wants("group_kl"):
        out["group_kl"] = np.full(G, np.nan)
    unique = {g: obs.unique_rows(np.asarray(X, dtype=np.float64))[0] for g, X in pools.items()}
    for i, g in enumerate(names):
        Xu = unique[g]
        if params.wants("group_gride") and len(Xu) >= 3:
            _, du = obs.sorted_neighbors(obs.pairwise_distances(Xu), min(params.gride_maxk, len(Xu) - 1))
            _place_gride(out["group_gride_id"][i], out["group_gride_err"][i], out["group_gride_scale"][i],
                         params.n2, du, len(Xu), params.gride_range_max)
        if params.wants("group_anisotropy") and len(pools[g]) >= 2:
            out["group_anisotropy"][i] = obs.anisotropy(np.asarray(pools[g], dtype=np.float64),
                                                        tol=params.anisotropy_tol)
        if params.wants("group_kl") and g == params.reference:
            out["group_kl"][i] = 0.0  # by definition; the estimator on a sample against itself is biased
        elif params.wants("group_kl"):
            ref = unique[params.reference]
            k = min(params.kl_k, len(Xu) - 1, len(ref))
            if k >= 1:
                out["group_kl"][i] = obs.knn_kl_divergence(Xu, ref, k=k)
    return out
