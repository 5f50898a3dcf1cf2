"""Analogies and crystals of one representation space: the vocabulary's embedding rows, or one layer's states.

A space is a matrix of candidate vectors (the whole vocabulary in an embedding space, the file's words in the
hidden space) and, per pair, the rows of its subject and object. Everything a store holds about the space comes
from `analyse_space`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..observables.lens import unit_rows
from ..observables.relations import (PREDICTORS, analogy_queries, cosine_top_k, crystal_statistics,
                                     distractor_correlation, hits_at, parallelogram_cosines)


@dataclass(frozen=True)
class SpacePairs:
    """The pairs as rows of a space's candidate matrix.

    subject, object: (pair,) row indices; relation: (pair,) relation index; used: (pair,) bool (embedding
    spaces: both words one token); in_fit: (pair,) bool, the LDA's fitting pairs; length_difference: (pair,)
    len(object) - len(subject) in characters; token_difference: (pair,) the same in tokens after a space, or None
    (embedding spaces use one-token words only); n_relations: size of the relation dim.
    """

    subject: np.ndarray
    object: np.ndarray
    relation: np.ndarray
    used: np.ndarray
    in_fit: np.ndarray
    length_difference: np.ndarray
    token_difference: np.ndarray | None
    n_relations: int


def analyse_space(candidates, pairs: SpacePairs, ks, lda_components: int) -> dict:
    """Analogies and crystals in one space.

    candidates: (candidate, dim) torch tensor (float32, on the device the searches run on); ks: accuracy sizes,
    sorted (the largest is how many neighbours are searched). Returns name → array, named as the store's
    embedding-space variables without their space dim: analogy_accuracy (relation, predictor, k),
    analogy_prediction (pair, predictor) (candidate index, -1 for pairs not used), parallelogram_cosine[_other]
    (relation), silhouette[_lda] (relation), silhouette[_lda]_all (), crystal_pca (pair, 2), crystal_lda (pair,
    lda_components), distractor_length_corr () and, with token differences, distractor_token_corr ().
    """
    n_pairs, R = len(pairs.subject), pairs.n_relations
    vectors = candidates.double().cpu().numpy()
    unit = unit_rows(candidates)
    out = {"analogy_accuracy": np.full((R, len(PREDICTORS), len(ks)), np.nan),
           "analogy_prediction": np.full((n_pairs, len(PREDICTORS)), -1, dtype=np.int64)}
    queries, meta = [], []
    for r in range(R):
        members = np.flatnonzero((pairs.relation == r) & pairs.used)
        if len(members) < 3:
            continue
        q, predictor, local, other = analogy_queries(vectors[pairs.subject[members]], vectors[pairs.object[members]])
        queries.append(q)
        meta.append((r, members, predictor, local, other))
    if queries:
        # One search for all relations: the candidate matrix is read once per block of queries.
        allq = np.concatenate(queries)
        exclude = np.concatenate([pairs.subject[m[1][m[3]]] for m in meta])
        top = cosine_top_k(allq, unit, exclude, max(ks))
        start = 0
        for r, members, predictor, local, other in meta:
            stop = start + len(predictor)
            mine = top[start:stop]
            hits = hits_at(mine, pairs.object[members[local]], ks)
            for p in range(len(PREDICTORS)):
                out["analogy_accuracy"][r, p] = hits[predictor == p].mean(axis=0)
            # The stored single_delta prediction is the one with the next pair's delta (cyclically).
            shown = (predictor != 1) | (other == (local + 1) % len(members))
            out["analogy_prediction"][members[local[shown]], predictor[shown]] = mine[shown, 0]
            start = stop
    used = pairs.used
    differences = vectors[pairs.object[used]] - vectors[pairs.subject[used]]
    labels = pairs.relation[used]
    out["parallelogram_cosine"], out["parallelogram_cosine_other"] = parallelogram_cosines(differences, labels, R)
    crystal = crystal_statistics(differences, labels, R, pairs.in_fit[used], lda_components)
    for name in ("silhouette", "silhouette_lda", "silhouette_all", "silhouette_lda_all"):
        out[name] = crystal[name]
    for name in ("pca", "lda"):
        full = np.full((n_pairs, crystal[name].shape[1]), np.nan)
        full[used] = crystal[name]
        out[f"crystal_{name}"] = full
    out["distractor_length_corr"] = distractor_correlation(differences, pairs.length_difference[used])
    if pairs.token_difference is not None:
        out["distractor_token_corr"] = distractor_correlation(differences, pairs.token_difference[used])
    return out
