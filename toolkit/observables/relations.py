"""Geometry of relations between concepts: analogies, concept crystals and first-order Markov statistics.

Pure math: arrays in, arrays out. A *pair* is (subject, object) of one relation (France → Paris); its *difference
vector* is object − subject. Nearest-neighbour searches use torch's float32 kernels on the device of the candidate
matrix (the model's whole vocabulary: up to 262,144 rows), in blocks of queries so that the (query, candidate)
score matrices stay near 64 MiB each; everything else is numpy float64.

- Analogies (`analogy_queries`, `cosine_top_k`, `hits_at`): subject + delta, nearest neighbour by cosine.
- Crystals (`parallelogram_cosines`, `fit_split`, `crystal_statistics`, `distractor_correlation`): whether the
  difference vectors of a relation are parallel, and whether relations form clusters before and after linear
  discriminant analysis (Li et al. 2024, "The Geometry of Concepts").
- Markov (`bigram_counts`, `most_frequent`, `top_successors`, `bigram_kl`, `agreement`): the corpus statistics
  that a model's direct path (input embedding → unembedding) is compared with.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .lens import unit_rows

#: The analogy predictors: leave-one-out mean delta, one other pair's delta (3CosAdd), no delta at all.
PREDICTORS = ("averaged_delta", "single_delta", "subject_only")
#: Entries of one (query, candidate) float32 score matrix: 64 MiB.
BLOCK_ENTRIES = 2**24


# ---------------------------------------------------------------------------------------------------- analogies

def analogy_queries(subjects: np.ndarray, objects: np.ndarray) -> tuple:
    """The analogy queries of one relation's pairs.

    subjects, objects: (pair, dim) vectors of the relation's n ≥ 3 pairs, in pair order. Queries, in this order:

    - ``averaged_delta``, one per pair i: subject_i + mean over j ≠ i of (object_j − subject_j) (leave-one-out, so
      that pair i's own object is not in its query);
    - ``single_delta``, n − 1 per pair i (3CosAdd): subject_i + object_j − subject_j for every other pair j,
      i-major, j ascending;
    - ``subject_only``, one per pair i: subject_i alone (the baseline: is the object simply the subject's nearest
      neighbour?).

    Returns (queries (query, dim) float64, predictor (query,) index into PREDICTORS, pair (query,) the subject's
    pair i, other (query,) the pair j whose delta was added, -1 for the other predictors).
    """
    S, O = np.asarray(subjects, dtype=np.float64), np.asarray(objects, dtype=np.float64)
    n = len(S)
    if n < 3:
        raise ValueError(f"analogies need at least 3 pairs of a relation (got {n})")
    D = O - S
    averaged = S + (D.sum(axis=0) - D) / (n - 1)
    i, j = np.nonzero(~np.eye(n, dtype=bool))  # row-major: i-major, j ascending
    single = S[i] + D[j]
    queries = np.concatenate([averaged, single, S])
    predictor = np.repeat(np.arange(3), [n, len(i), n])
    pair = np.concatenate([np.arange(n), i, np.arange(n)])
    other = np.concatenate([np.full(n, -1), j, np.full(n, -1)])
    return queries, predictor, pair, other


def dot_top_k(queries, candidates, k: int, exclude=None) -> np.ndarray:
    """The k candidates of largest dot product with each query, best first; identical candidates tie, and ties go
    to the lower index.

    queries: (query, dim) array or tensor; candidates: (candidate, dim) torch tensor (the search runs on its
    device, float32); exclude: optional (query,) candidate index each query may not return. Returns (query, k)
    int64 candidate indices.

    Identical candidates are real: at the embedding layer, two words whose last tokens are the same token ("12"
    and "2") have the same state, and embedding matrices hold identical rows (SmolLM2's de-quantised GGUF
    embedding has 11 duplicated rows). A matrix product does not
    give identical rows bit-identical scores (its kernel treats rows differently by position), so the scores
    are computed once per distinct row and shared; then the order of a tie no longer depends on the kernel.
    """
    import torch

    device = candidates.device
    distinct, shared = torch.unique(candidates, dim=0, return_inverse=True)
    q = torch.as_tensor(queries, dtype=torch.float32, device=device)
    if exclude is not None:
        exclude = torch.as_tensor(np.asarray(exclude, dtype=np.int64), device=device)
    out = np.empty((len(q), k), dtype=np.int64)
    step = max(1, BLOCK_ENTRIES // max(1, candidates.shape[0]))
    for start in range(0, len(q), step):
        stop = min(len(q), start + step)
        scores = (q[start:stop] @ distinct.T)[:, shared]
        if exclude is not None:
            scores[torch.arange(stop - start, device=device), exclude[start:stop]] = -torch.inf
        out[start:stop] = _top_k_lower_index_first(scores, k)
    return out


def _top_k_lower_index_first(scores, k: int) -> np.ndarray:
    """torch.topk of each row of (row, candidate) ``scores``, with equal scores ordered by index (torch.topk
    orders them as its kernel happens to), inside the top k and at its boundary. Returns (row, k) int64."""
    import torch

    values, indices = torch.topk(scores, k, dim=1)
    values, indices = values.cpu().numpy(), indices.cpu().numpy()
    out = np.take_along_axis(indices, np.lexsort((indices, -values), axis=1), axis=1)
    reaching = (scores >= torch.as_tensor(values[:, -1:], device=scores.device)).sum(dim=1).cpu().numpy()
    for row in np.flatnonzero(reaching > k):  # a tie at the k-th value: every tied candidate competes
        tied = torch.nonzero(scores[row] >= float(values[row, -1])).ravel()
        tied_values = scores[row, tied].cpu().numpy()
        tied = tied.cpu().numpy()
        out[row] = tied[np.lexsort((tied, -tied_values))[:k]]
    return out


def cosine_top_k(queries, unit_candidates, exclude: np.ndarray, k: int) -> np.ndarray:
    """The k candidates of highest cosine similarity with each query, best first, one candidate left out per query.

    queries: (query, dim) array; unit_candidates: (candidate, dim) torch tensor of unit rows (`unit_rows`; zero rows
    have cosine 0 with everything); exclude: (query,) the candidate index each query may not return (the analogy's
    subject). Returns (query, k) int64 candidate indices.
    """
    import torch

    q = unit_rows(torch.as_tensor(queries, dtype=torch.float32, device=unit_candidates.device))
    return dot_top_k(q, unit_candidates, k, exclude)


def hits_at(top: np.ndarray, targets: np.ndarray, ks) -> np.ndarray:
    """Whether each query's target is among its first k predictions: top (query, K) ids, best first; targets
    (query,) ids; ks: sizes ≤ K. Returns (query, len(ks)) bool."""
    found = top == np.asarray(targets)[:, None]
    return np.stack([found[:, :k].any(axis=1) for k in ks], axis=1)


# ----------------------------------------------------------------------------------------------------- crystals

def unit_rows_np(X: np.ndarray) -> np.ndarray:
    """Rows of a (row, dim) array scaled to unit Euclidean norm, float64 (zero rows stay zero)."""
    X = np.asarray(X, dtype=np.float64)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def parallelogram_cosines(differences: np.ndarray, labels: np.ndarray, n_labels: int) -> tuple:
    """How parallel the difference vectors of each relation are, against those of the other relations.

    differences: (pair, dim) object − subject; labels: (pair,) relation index in 0..n_labels-1. Returns
    (within (label,), across (label,)) float64: the mean cosine over unordered pairs of distinct pairs of the same
    relation (NaN with fewer than 2), and the mean cosine of the relation's pairs with every pair of another
    relation (NaN where there is none). A relation whose pairs form parallelograms has within near 1.
    """
    U = unit_rows_np(differences)
    C = U @ U.T
    labels = np.asarray(labels)
    within, across = np.full(n_labels, np.nan), np.full(n_labels, np.nan)
    for r in range(n_labels):
        mine = labels == r
        n = int(mine.sum())
        if n >= 2:
            block = C[np.ix_(mine, mine)]
            within[r] = (block.sum() - np.trace(block)) / (n * (n - 1))
        if n and (~mine).any():
            across[r] = C[np.ix_(mine, ~mine)].mean()
    return within, across


def fit_split(labels: np.ndarray, n_labels: int, seed: int) -> np.ndarray:
    """The pairs that fit the crystals' LDA; the others score it (out of sample).

    Each relation's pairs are permuted with ``numpy.random.default_rng([seed, relation])`` and the first
    ceil(n / 2) fit. Returns (pair,) bool.
    """
    labels = np.asarray(labels)
    in_fit = np.zeros(len(labels), dtype=bool)
    for r in range(n_labels):
        members = np.flatnonzero(labels == r)
        order = np.random.default_rng([seed, r]).permutation(len(members))
        in_fit[members[order[: (len(members) + 1) // 2]]] = True
    return in_fit


def relation_silhouettes(X: np.ndarray, labels: np.ndarray, n_labels: int) -> tuple:
    """Silhouette of each relation's points and of all points (Euclidean, scikit-learn's silhouette_samples).

    X: (point, dim); labels: (point,) relation index. Returns ((label,) mean silhouette of the relation's points,
    NaN for a relation without points; overall mean over points). All NaN with fewer than 2 relations present.
    """
    from sklearn.metrics import silhouette_samples

    labels = np.asarray(labels)
    per = np.full(n_labels, np.nan)
    if len(np.unique(labels)) < 2 or len(labels) <= len(np.unique(labels)):
        return per, float("nan")
    s = silhouette_samples(np.asarray(X, dtype=np.float64), labels)
    for r in np.unique(labels):
        per[r] = s[labels == r].mean()
    return per, float(s.mean())


def lda_projection(differences: np.ndarray, labels: np.ndarray, in_fit: np.ndarray, n_components: int) -> np.ndarray:
    """Project every difference vector onto the LDA directions fitted on the ``in_fit`` rows.

    LDA (scikit-learn's LinearDiscriminantAnalysis, eigen solver with Ledoit-Wolf shrinkage) finds the directions
    of largest between-relation over within-relation variance: signal-to-noise directions, which leave out
    directions that vary as much inside a relation as between relations (e.g. word length). Shrinkage, because a
    relation file has far fewer pairs than a model has dimensions (a few hundred against 576 or more): the plain
    within-relation covariance is singular there, and LDA without shrinkage separates the fitted pairs perfectly
    along directions that do not generalise to held-out pairs. Measured on SmolLM2-135M with the bundled file
    (held-out silhouette, 2 / 11 directions): layer 12, 0.08 / 0.34 with scikit-learn's default SVD solver
    against 0.27 / 0.57 with shrinkage; the input embeddings, -0.03 / 0.21 against 0.08 / 0.55.

    differences: (pair, dim); labels: (pair,) relation index; in_fit: (pair,) bool. Returns (pair, n_components).
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    X = np.asarray(differences, dtype=np.float64)
    lda = LinearDiscriminantAnalysis(n_components=n_components, solver="eigen", shrinkage="auto")
    lda.fit(X[in_fit], np.asarray(labels)[in_fit])
    return lda.transform(X)


def pca_scores(X: np.ndarray, n_components: int) -> np.ndarray:
    """Scores of the rows of (row, dim) ``X`` on its first principal components (of the centered rows), (row,
    n_components) float64; the sign of each component makes its largest-magnitude score positive."""
    X = np.asarray(X, dtype=np.float64)
    centered = X - X.mean(axis=0)
    U, s, _ = np.linalg.svd(centered, full_matrices=False)
    scores = U[:, :n_components] * s[:n_components]
    signs = np.sign(scores[np.abs(scores).argmax(axis=0), np.arange(scores.shape[1])])
    return scores * np.where(signs == 0, 1.0, signs)


def crystal_statistics(differences: np.ndarray, labels: np.ndarray, n_labels: int, in_fit: np.ndarray,
                       n_components: int) -> dict:
    """Relation clusters of difference vectors before and after LDA, scored out of sample.

    differences: (pair, dim) object − subject; labels: (pair,) relation index in 0..n_labels-1; in_fit: (pair,)
    bool from `fit_split`. Only relations with at least 2 fitting and 2 scoring pairs take part (a silhouette
    needs two points of a cluster); the others get NaN. LDA is fitted on the fitting pairs of the relations that
    take part and needs at least ``n_components`` + 1 of them; the silhouettes are computed on the scoring pairs,
    in the original space (``silhouette``) and in the LDA space (``silhouette_lda``). Returns a dict:

    - ``silhouette``, ``silhouette_lda``: (label,) mean silhouette of the relation's scoring pairs;
    - ``silhouette_all``, ``silhouette_lda_all``: float, mean over all scoring pairs that take part;
    - ``pca``: (pair, 2) scores on the first two principal components of all the differences;
    - ``lda``: (pair, n_components) every pair projected on the LDA directions (NaN for relations left out).
    """
    X = np.asarray(differences, dtype=np.float64)
    labels, in_fit = np.asarray(labels), np.asarray(in_fit, dtype=bool)
    taking_part = crystal_relations(labels, in_fit, n_labels)
    member = taking_part[labels]
    score = member & ~in_fit
    out = {"pca": np.full((len(X), 2), np.nan), "lda": np.full((len(X), n_components), np.nan)}
    if len(X) >= 2:
        width = min(2, len(X) - 1, X.shape[1])
        out["pca"][:, :width] = pca_scores(X, width)
    out["silhouette"], out["silhouette_all"] = relation_silhouettes(X[score], labels[score], n_labels)
    out["silhouette_lda"], out["silhouette_lda_all"] = np.full(n_labels, np.nan), float("nan")
    if taking_part.sum() >= n_components + 1:
        projected = lda_projection(X[member], labels[member], in_fit[member], n_components)
        out["lda"][member] = projected
        out["silhouette_lda"], out["silhouette_lda_all"] = relation_silhouettes(
            out["lda"][score], labels[score], n_labels)
    return out


def crystal_relations(labels: np.ndarray, in_fit: np.ndarray, n_labels: int) -> np.ndarray:
    """The relations that take part in `crystal_statistics`: at least 2 fitting and 2 scoring pairs, (label,)
    bool."""
    labels, in_fit = np.asarray(labels), np.asarray(in_fit, dtype=bool)
    return ((np.bincount(labels[in_fit], minlength=n_labels) >= 2)
            & (np.bincount(labels[~in_fit], minlength=n_labels) >= 2))


def distractor_correlation(differences: np.ndarray, length_differences: np.ndarray) -> float:
    """|Pearson r| between the first principal component of the difference vectors and a length difference.

    differences: (pair, dim) object − subject, all relations pooled; length_differences: (pair,) e.g.
    len(object) − len(subject) in characters or tokens. The absolute value, because a principal component's sign
    is arbitrary. NaN with fewer than 3 pairs or a constant side.
    """
    X, length = np.asarray(differences, dtype=np.float64), np.asarray(length_differences, dtype=np.float64)
    if len(X) < 3 or np.ptp(length) == 0:
        return float("nan")
    pc1 = pca_scores(X, 1)[:, 0]
    if np.ptp(pc1) == 0:
        return float("nan")
    return float(abs(np.corrcoef(pc1, length)[0, 1]))


# ------------------------------------------------------------------------------------------------------- Markov

def bigram_counts(sequences, vocab_size: int, special_ids=()) -> tuple:
    """Unigram and bigram counts of token sequences, special tokens left out.

    sequences: iterable of (token,) int arrays (each prompt or text on its own: no bigram spans two of them);
    special_ids: ids never counted, as a token or as either side of a bigram (a BOS is not a corpus token, and a
    special token in the middle must not join its neighbours into a bigram). Returns (unigram (vocab,) int64,
    bigram (vocab, vocab) scipy CSR int64: [x, y] = occurrences of x directly followed by y).
    """
    special = np.asarray(sorted(special_ids), dtype=np.int64)
    unigram = np.zeros(vocab_size, dtype=np.int64)
    rows, cols = [], []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        ordinary = ~np.isin(seq, special)
        unigram += np.bincount(seq[ordinary], minlength=vocab_size)
        both = ordinary[:-1] & ordinary[1:]
        rows.append(seq[:-1][both])
        cols.append(seq[1:][both])
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    bigram = sp.coo_matrix((np.ones(len(rows), dtype=np.int64), (rows, cols)), shape=(vocab_size, vocab_size))
    return unigram, bigram.tocsr()  # CSR conversion sums repeated (x, y) entries


def most_frequent(counts: np.ndarray, n: int) -> np.ndarray:
    """The ids of the n largest counts (zero counts never), largest first, ties to the lower id: (≤ n,) int64."""
    counts = np.asarray(counts)
    order = np.lexsort((np.arange(len(counts)), -counts))
    return order[: min(n, int(np.count_nonzero(counts)))].astype(np.int64)


def top_successors(bigram, xs: np.ndarray, k: int) -> np.ndarray:
    """The k most frequent successors y of each x (argmax_y count("x y")), ties to the lower id.

    bigram: (vocab, vocab) CSR counts from `bigram_counts`; xs: (x,) ids. Returns (x, k) int64, -1 where x has
    fewer than k distinct successors.
    """
    out = np.full((len(xs), k), -1, dtype=np.int64)
    for row, x in enumerate(xs):
        start, stop = bigram.indptr[x], bigram.indptr[x + 1]
        ys, counts = bigram.indices[start:stop], bigram.data[start:stop]
        best = np.lexsort((ys, -counts))[:k]
        out[row, : len(best)] = ys[best]
    return out


def bigram_kl(bigram, xs: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(bigram ‖ q) in nats for each x: Σ_y P(y | x) log(P(y | x) / q(y)), P(y | x) = count("x y") / count("x ·").

    bigram: (vocab, vocab) CSR counts; xs: (x,) ids; log_q: (x, vocab) the model's next-token log-probabilities
    after x (natural log). NaN where x has no successor.
    """
    out = np.full(len(xs), np.nan)
    for row, x in enumerate(xs):
        start, stop = bigram.indptr[x], bigram.indptr[x + 1]
        counts = bigram.data[start:stop].astype(np.float64)
        if counts.sum() == 0:
            continue
        p = counts / counts.sum()
        out[row] = float(np.sum(p * (np.log(p) - np.asarray(log_q[row], dtype=np.float64)[bigram.indices[start:stop]])))
    return out


def agreement(predicted: np.ndarray, targets: np.ndarray, ks) -> np.ndarray:
    """Share of rows whose target is among the first k predictions, for each k.

    predicted: (x, K) ids best first; targets: (x,) ids, -1 where a row has no target (left out). Returns
    (len(ks),) float64, NaN when no row has a target.
    """
    targets = np.asarray(targets)
    have = targets >= 0
    if not have.any():
        return np.full(len(ks), np.nan)
    return hits_at(np.asarray(predicted)[have], targets[have], ks).mean(axis=0).astype(np.float64)
