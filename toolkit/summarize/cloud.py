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
    if params.distance_dtype:
        out["distances"] = np.full((L, width, width), np.nan, dtype=params.distance_dtype)
    return out


def _distance_columns(params, n_unique: int, gride: bool) -> int:
    """Sorted neighbour distances read in a cloud of n_unique distinct points: TwoNN's first two and, with
    gride, GRIDE's up to its largest rank (capped at gride_maxk, as dadapy's maxk)."""
    ranks = obs.gride_ranks(n_unique, params.gride_range_max) if gride else ()
    return min(max(2, *ranks), max(params.gride_maxk, 2), n_unique - 1)


def prompt_observables(layers, params, n_layers: int, width: int) -> dict:
    """All per-(prompt, layer) observables of one prompt.

    layers: iterable of (token, dim) arrays, layer 0 first (the prompt's vectors at each layer: positions
    ``params.skip_tokens`` … n_tokens-1; the knn tables keep positions, so their rows and indices are shifted
    back by skip_tokens).
    Overlap at layer l compares layers l and l+1 on all points (self excluded, ties to the lower index);
    GRIDE, TwoNN and the nearest-neighbour statistics use the cloud with exact duplicates removed
    (``n_unique`` points). One squared-distance matrix per cloud serves every observable (the de-duplicated
    cloud's is a submatrix of it; square roots only for the neighbour distances used). Returns name → array,
    NaN where a cloud is too small for an observable.
    """
    out = empty_prompt_results(params, n_layers, width)
    ks = params.ks
    need_knn = params.wants("overlap") or params.save_knn
    dedup = params.wants("gride") or params.wants("twonn") or params.wants("reciprocity")
    k_unique = 2 if params.wants("reciprocity") else 1  # neighbours in the index table of distinct points
    previous = None
    for layer, X in enumerate(layers):
        X = np.asarray(X, dtype=np.float64)
        n = len(X)
        if n < 3:
            continue
        D2 = obs.squared_distances(X)
        if params.distance_dtype:
            at = slice(params.skip_tokens, params.skip_tokens + n)
            out["distances"][layer, at, at] = np.sqrt(D2)
        if need_knn or dedup:
            # One table for everything; redone below on the distinct points only where there are duplicates.
            k = min(params.overlap_k, n - 1) if need_knn else 0
            columns = _distance_columns(params, n, params.wants("gride")) if dedup else 0
            idx, dist = obs.sorted_neighbors(D2, max(k, k_unique), max(k, k_unique, columns))
            dist = np.sqrt(dist)
        if need_knn:
            if params.wants("overlap") and previous is not None:
                valid = ks[ks <= k]
                out["overlap"][layer - 1, : len(valid)] = obs.neighborhood_overlap(previous, idx[:, :k], valid)
            previous = idx[:, :k]
            if params.save_knn:
                at = slice(params.skip_tokens, params.skip_tokens + n)
                out["knn_index"][layer, at, :k] = idx[:, :k] + params.skip_tokens
                out["knn_distance"][layer, at, :k] = dist[:, :k]
        if dedup:
            D2u, n_unique = D2, n
            if not dist[:, 0].all():  # a zero nearest-neighbour distance: duplicates (D == 0 only for copies)
                keep = obs.first_occurrences(X)
                D2u, n_unique = D2[np.ix_(keep, keep)], keep.size
                if n_unique >= 3:
                    columns = _distance_columns(params, n_unique, params.wants("gride"))
                    idx, dist = obs.sorted_neighbors(D2u, k_unique, columns)
                    dist = np.sqrt(dist)
            if "n_unique" in out:
                out["n_unique"][layer] = n_unique
            if n_unique >= 3:
                if params.wants("reciprocity"):  # on distinct points: a duplicate's twin is no neighbour
                    out["nn_reciprocity"][layer] = obs.nn_reciprocity(idx)
                    out["nn_cosine"][layer] = obs.nn_cosine(D2u, idx)
                if params.wants("gride"):
                    _place_gride(out["gride_id"][layer], out["gride_err"][layer], out["gride_scale"][layer],
                                 params.n2, dist, n_unique, params.gride_range_max)
                if params.wants("twonn"):
                    out["twonn_id"][layer] = obs.twonn_id(dist)
        if params.wants("cosine"):
            out["cosine_mean"][layer], out["cosine_std"][layer] = obs.cosine_stats(X, D2)
        if params.wants("anisotropy"):
            out["anisotropy"][layer] = obs.anisotropy(X, tol=params.anisotropy_tol)
        if params.wants("norm"):
            out["norm_mean"][layer] = obs.norm_mean(X)
    return out


def contribution_observables(head_cosine, head_norm, params) -> dict:
    """Per block of one prompt: contrib_corr and contrib_corr_p (block, stat, span) between the heads' write
    cosine and norm (`cosine_norm_correlation` over the first and last ``params.contrib_span`` tokens), and
    head_norm_mean (block, head). head_cosine, head_norm: (block, head, token) over the prompt's tokens."""
    pairs = [obs.cosine_norm_correlation(c, n, params.contrib_span) for c, n in zip(head_cosine, head_norm)]
    return {"contrib_corr": np.stack([c for c, _ in pairs]), "contrib_corr_p": np.stack([p for _, p in pairs]),
            "head_norm_mean": np.asarray(head_norm, np.float64).mean(axis=-1)}


def group_observables(pools: dict, params) -> dict:
    """Per-group observables at one layer. pools: group name → (token, dim) pooled sample of that group.

    Returns name → (group,) or (group, n2) arrays in the order of ``pools``. ``group_kl`` is
    KL(group || reference) by the k-NN estimator on the distinct vectors of each pool that the other pool does
    not hold: vectors found in both (identical tokens at the embedding layer; identical openings of documents
    at every layer of a model without BOS) would put a zero distance into the estimator's logarithm. Their count
    is ``group_n_shared`` (-1 for the reference). NaN where fewer than k + 1 distinct unshared vectors remain.
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
        out["group_n_shared"] = np.full(G, -1, dtype=np.int32)
    unique = {g: obs.unique_rows(np.asarray(X, dtype=np.float64))[0] for g, X in pools.items()}
    for i, g in enumerate(names):
        Xu = unique[g]
        if params.wants("group_gride") and len(Xu) >= 3:
            _, du2 = obs.sorted_neighbors(obs.squared_distances(Xu), 1, _distance_columns(params, len(Xu), True))
            _place_gride(out["group_gride_id"][i], out["group_gride_err"][i], out["group_gride_scale"][i],
                         params.n2, np.sqrt(du2), len(Xu), params.gride_range_max)
        if params.wants("group_anisotropy") and len(pools[g]) >= 2:
            out["group_anisotropy"][i] = obs.anisotropy(np.asarray(pools[g], dtype=np.float64),
                                                        tol=params.anisotropy_tol)
        if params.wants("group_kl") and g == params.reference:
            out["group_kl"][i] = 0.0  # by definition; the estimator on a sample against itself is biased
        elif params.wants("group_kl"):
            in_ref, in_group = obs.shared_rows(Xu, unique[params.reference])
            out["group_n_shared"][i] = in_ref.sum()
            own, ref = Xu[~in_ref], unique[params.reference][~in_group]
            if min(len(own) - 1, len(ref)) >= params.kl_k:
                out["group_kl"][i] = obs.knn_kl_divergence(own, ref, k=params.kl_k)
    return out
