"""``toolkit.observables.relations`` against independent references: loops, brute-force sorts, collections.Counter,
scipy's entropy, scikit-learn's PCA, and a synthetic embedding whose relations and distractor are planted."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import scipy.stats
import torch

from toolkit.observables import relations as rel
from toolkit.observables.lens import unit_rows


def brute_cosine_top_k(queries, candidates, exclude, k):
    """Float64 cosines, full sort, the excluded candidate pushed last."""
    Q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    C = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    scores = Q @ C.T
    if exclude is not None:
        scores[np.arange(len(Q)), exclude] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("block", [rel.BLOCK_ENTRIES, 700])  # 700 entries: blocks of 1 query
def test_cosine_top_k_equals_a_full_sort(monkeypatch, block):
    monkeypatch.setattr(rel, "BLOCK_ENTRIES", block)
    rng = np.random.default_rng(0)
    candidates, queries = rng.normal(size=(500, 16)), rng.normal(size=(37, 16))
    exclude = rng.integers(0, 500, size=37)
    unit = unit_rows(torch.from_numpy(candidates).float())
    got = rel.cosine_top_k(queries, unit, exclude, 7)
    np.testing.assert_array_equal(got, brute_cosine_top_k(queries, candidates, exclude, 7))
    assert not (got == exclude[:, None]).any()


def test_dot_top_k_equals_a_full_sort():
    rng = np.random.default_rng(1)
    candidates, queries = rng.normal(size=(300, 8)), rng.normal(size=(20, 8))
    got = rel.dot_top_k(queries, torch.from_numpy(candidates).float(), 5)
    np.testing.assert_array_equal(got, np.argsort(-(queries @ candidates.T), axis=1)[:, :5])


def test_analogy_queries_equal_loops():
    rng = np.random.default_rng(2)
    S, O = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    queries, predictor, pair, other = rel.analogy_queries(S, O)
    expected = []
    for i in range(4):
        others = [j for j in range(4) if j != i]
        expected.append((0, i, -1, S[i] + np.mean([O[j] - S[j] for j in others], axis=0)))
    for i in range(4):
        for j in range(4):
            if j != i:
                expected.append((1, i, j, S[i] + O[j] - S[j]))
    expected += [(2, i, -1, S[i]) for i in range(4)]
    assert predictor.tolist() == [e[0] for e in expected]
    assert pair.tolist() == [e[1] for e in expected] and other.tolist() == [e[2] for e in expected]
    np.testing.assert_allclose(queries, np.array([e[3] for e in expected]), atol=1e-12)
    with pytest.raises(ValueError):
        rel.analogy_queries(S[:2], O[:2])


def test_hits_at():
    top = np.array([[3, 1, 2], [0, 4, 5], [7, 8, 9]])
    np.testing.assert_array_equal(rel.hits_at(top, np.array([3, 4, 1]), (1, 2, 3)),
                                  [[True, True, True], [False, True, True], [False, False, False]])


def test_parallelogram_cosines_equal_loops():
    rng = np.random.default_rng(3)
    D = rng.normal(size=(9, 5))
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    within, across = rel.parallelogram_cosines(D, labels, 4)

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    for r in range(3):
        mine = np.flatnonzero(labels == r)
        rest = np.flatnonzero(labels != r)
        pairs = [cos(D[i], D[j]) for a, i in enumerate(mine) for j in mine[a + 1:]]
        assert within[r] == pytest.approx(np.mean(pairs), abs=1e-12)
        assert across[r] == pytest.approx(np.mean([cos(D[i], D[j]) for i in mine for j in rest]), abs=1e-12)
    assert np.isnan(within[3]) and np.isnan(across[3])  # a relation without pairs


def brute_silhouettes(X, labels):
    """Rousseeuw's silhouette by loops: a = mean distance to the own cluster's other points, b = smallest mean
    distance to another cluster, s = (b - a) / max(a, b) (0 for a point alone in its cluster)."""
    out = []
    for i in range(len(X)):
        d = np.linalg.norm(X - X[i], axis=1)
        own = (labels == labels[i]) & (np.arange(len(X)) != i)
        if not own.any():
            out.append(0.0)
            continue
        a = d[own].mean()
        b = min(d[labels == other].mean() for other in set(labels.tolist()) - {labels[i]})
        out.append((b - a) / max(a, b))
    return np.array(out)


def test_relation_silhouettes_equal_loops():
    rng = np.random.default_rng(4)
    labels = np.array([0] * 5 + [2] * 4 + [3] * 6)
    X = rng.normal(size=(15, 3)) + labels[:, None]
    per, overall = rel.relation_silhouettes(X, labels, 5)
    s = brute_silhouettes(X, labels)
    for r in (0, 2, 3):
        assert per[r] == pytest.approx(s[labels == r].mean(), abs=1e-12)
    assert np.isnan(per[1]) and np.isnan(per[4])
    assert overall == pytest.approx(s.mean(), abs=1e-12)
    assert np.isnan(rel.relation_silhouettes(X[:5], labels[:5], 5)[1])  # one relation: undefined


def test_fit_split_halves_each_relation_by_seed():
    labels = np.repeat([0, 1, 2], [5, 6, 3])
    a = rel.fit_split(labels, 3, seed=0)
    assert [int(a[labels == r].sum()) for r in range(3)] == [3, 3, 2]  # ceil(n / 2)
    np.testing.assert_array_equal(a, rel.fit_split(labels, 3, seed=0))
    assert any(not np.array_equal(a, rel.fit_split(labels, 3, seed=s)) for s in range(1, 5))


def test_distractor_correlation_equals_sklearn_pca():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(5)
    length = rng.integers(-3, 4, size=40).astype(float)
    D = rng.normal(size=(40, 6))
    D[:, 2] += 3 * length
    pc1 = PCA(n_components=1).fit_transform(D)[:, 0]
    assert rel.distractor_correlation(D, length) == pytest.approx(abs(np.corrcoef(pc1, length)[0, 1]), abs=1e-10)
    assert np.isnan(rel.distractor_correlation(D, np.ones(40)))  # constant length difference


def test_pca_scores_match_sklearn_up_to_sign():
    from sklearn.decomposition import PCA

    X = np.random.default_rng(6).normal(size=(30, 5)) * [5, 3, 1, 1, 1]
    ours, ref = rel.pca_scores(X, 2), PCA(n_components=2).fit_transform(X)
    np.testing.assert_allclose(np.abs(ours), np.abs(ref), atol=1e-10)


def test_lda_projection_is_fitted_on_the_fitting_pairs_only():
    rng = np.random.default_rng(7)
    labels = np.repeat([0, 1, 2], 10)
    X = rng.normal(size=(30, 4)) + np.eye(4)[labels] * 3
    in_fit = rel.fit_split(labels, 3, 0)
    a = rel.lda_projection(X, labels, in_fit, 2)
    moved = X.copy()
    moved[~in_fit] += 100.0  # the scored pairs change: the fitted directions must not
    b = rel.lda_projection(moved, labels, in_fit, 2)
    np.testing.assert_allclose(a[in_fit], b[in_fit], atol=1e-9)
    assert a.shape == (30, 2)


# ------------------------------------------------------------------- a synthetic embedding with planted relations

def planted_space(seed=0, n_relations=4, n_pairs=24, dim=256):
    """Subjects of each relation cluster around a centre (spread 1 per dim); object = subject + a shift shared by
    all relations (norm 30) + the relation's offset (norm 8) + noise (1 per dim) + 6 · length difference along
    one distractor direction, length differences in -1..1. Plus 200 unrelated words. Returns (candidates,
    subject ids, object ids, labels, length differences, distractor direction).

    Why these scales: with noise equal to the subjects' spread, a single other pair's delta lands about as near
    that pair's object as the right one (3CosAdd fails often), while the leave-one-out mean delta leaves only the
    object's own noise and always finds it; the shared shift puts objects farther from their subject than the
    other subjects are (the subject alone never finds its object); the distractor's variance (36 · 2/3 = 24)
    exceeds the offsets' (about 8² / 4 per direction) and the noise's (1), so it is the first principal
    component, and it varies within relations, so LDA leaves it out.
    """
    rng = np.random.default_rng(seed)
    distractor = rng.normal(size=dim)
    distractor /= np.linalg.norm(distractor)
    shared = rng.normal(size=dim)
    shared *= 30.0 / np.linalg.norm(shared)
    rows, subjects, objects, labels, lengths = [], [], [], [], []
    for r in range(n_relations):
        centre = rng.normal(scale=3.0, size=dim)
        offset = rng.normal(size=dim)
        offset *= 8.0 / np.linalg.norm(offset)
        for _ in range(n_pairs):
            subject = centre + rng.normal(size=dim)
            length = int(rng.integers(-1, 2))
            obj = subject + shared + offset + rng.normal(size=dim) + 6.0 * length * distractor
            subjects.append(len(rows))
            objects.append(len(rows) + 1)
            rows += [subject, obj]
            labels.append(r)
            lengths.append(length)
    rows += list(rng.normal(scale=3.0, size=(200, dim)))
    return (np.array(rows), np.array(subjects), np.array(objects), np.array(labels), np.array(lengths, float),
            distractor)


def test_planted_relations_averaged_delta_beats_single_delta():
    C, S, O, labels, _, _ = planted_space()
    unit = unit_rows(torch.from_numpy(C).float())
    accuracy = {}
    for r in range(4):
        mine = labels == r
        queries, predictor, pair, _ = rel.analogy_queries(C[S[mine]], C[O[mine]])
        top = rel.cosine_top_k(queries, unit, S[mine][pair], 1)
        # the same search by brute force
        np.testing.assert_array_equal(top, brute_cosine_top_k(queries, C, S[mine][pair], 1))
        hits = rel.hits_at(top, O[mine][pair], (1,))[:, 0]
        for p, name in enumerate(rel.PREDICTORS):
            accuracy.setdefault(name, []).append(hits[predictor == p].mean())
    assert np.mean(accuracy["averaged_delta"]) == 1.0
    assert np.mean(accuracy["single_delta"]) < 0.5
    assert np.mean(accuracy["subject_only"]) == 0.0  # the subject's nearest is another subject of its cluster


def test_planted_relations_lda_raises_the_silhouette_and_the_distractor_is_found():
    C, S, O, labels, lengths, distractor = planted_space()
    D = C[O] - C[S]
    in_fit = rel.fit_split(labels, 4, seed=0)
    crystal = rel.crystal_statistics(D, labels, 4, in_fit, n_components=3)
    assert crystal["silhouette_lda_all"] > crystal["silhouette_all"] + 0.2
    assert (crystal["silhouette_lda"] > crystal["silhouette"]).all()
    assert np.isfinite(crystal["lda"]).all() and crystal["lda"].shape == (96, 3)
    # The first principal component is the distractor direction, and it tracks the length difference ...
    pc1 = np.linalg.svd(D - D.mean(axis=0), full_matrices=False)[2][0]
    assert abs(pc1 @ distractor) > 0.75
    assert rel.distractor_correlation(D, lengths) > 0.85
    # ... which the LDA directions leave out.
    for component in crystal["lda"].T:
        assert abs(np.corrcoef(component, lengths)[0, 1]) < 0.3


def test_crystal_statistics_leaves_small_relations_out():
    C, S, O, labels, _, _ = planted_space()
    keep = np.concatenate([np.flatnonzero(labels != 3), np.flatnonzero(labels == 3)[:3]])  # relation 3: 3 pairs
    D, lab = (C[O] - C[S])[keep], labels[keep]
    in_fit = rel.fit_split(lab, 4, seed=0)
    crystal = rel.crystal_statistics(D, lab, 4, in_fit, n_components=2)
    assert np.isnan(crystal["silhouette"][3]) and np.isnan(crystal["lda"][lab == 3]).all()
    assert np.isfinite(crystal["silhouette"][:3]).all() and np.isfinite(crystal["pca"]).all()
    too_many = rel.crystal_statistics(D, lab, 4, in_fit, n_components=3)  # 3 relations take part: 2 directions
    assert np.isnan(too_many["silhouette_lda_all"]) and np.isfinite(too_many["silhouette_all"])


# ------------------------------------------------------------------------------------------------------- Markov

def test_bigram_counts_equal_counter():
    rng = np.random.default_rng(8)
    special = {0, 1}
    sequences = [rng.integers(0, 12, size=n) for n in (30, 1, 0, 17)]
    unigram, bigram = rel.bigram_counts(sequences, 12, special)
    uni = collections.Counter(int(t) for s in sequences for t in s if t not in special)
    bi = collections.Counter((int(a), int(b)) for s in sequences for a, b in zip(s[:-1], s[1:])
                             if a not in special and b not in special)
    assert {i: int(c) for i, c in enumerate(unigram) if c} == dict(uni)
    dense = bigram.toarray()
    assert {(int(x), int(y)): int(dense[x, y]) for x, y in zip(*np.nonzero(dense))} == dict(bi)


def test_most_frequent_and_top_successors_break_ties_to_the_lower_id():
    assert rel.most_frequent(np.array([0, 5, 2, 5, 7, 2]), 4).tolist() == [4, 1, 3, 2]
    assert rel.most_frequent(np.array([0, 1, 0]), 5).tolist() == [1]  # zero counts never
    sequences = [np.array([1, 4, 1, 3, 1, 4, 1, 3, 1, 2, 5, 6])]
    _, bigram = rel.bigram_counts(sequences, 7)
    top = rel.top_successors(bigram, np.array([1, 5, 6]), 3)
    counts = collections.Counter(zip(sequences[0][:-1].tolist(), sequences[0][1:].tolist()))
    expected = sorted((y for (x, y) in counts if x == 1), key=lambda y: (-counts[(1, y)], y))
    assert top[0].tolist() == expected == [3, 4, 2]
    assert top[1].tolist() == [6, -1, -1] and top[2].tolist() == [-1, -1, -1]  # 6 ends the sequence


def test_bigram_kl_equals_scipy_entropy():
    rng = np.random.default_rng(9)
    sequences = [rng.integers(0, 6, size=200)]
    _, bigram = rel.bigram_counts(sequences, 6)
    logits = rng.normal(size=(3, 6))
    log_q = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    kl = rel.bigram_kl(bigram, np.array([0, 2, 5]), log_q)
    dense = bigram.toarray().astype(float)
    for row, x in enumerate([0, 2, 5]):
        assert kl[row] == pytest.approx(scipy.stats.entropy(dense[x], np.exp(log_q[row])), rel=1e-10)


def test_agreement_leaves_rows_without_a_target_out():
    predicted = np.array([[1, 2], [3, 4], [5, 6]])
    np.testing.assert_allclose(rel.agreement(predicted, np.array([2, 3, -1]), (1, 2)), [0.5, 1.0])
    assert np.isnan(rel.agreement(predicted, np.array([-1, -1, -1]), (1,))).all()


def test_exact_ties_go_to_the_lower_index():
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    queries = np.array([[1.0, 0.1], [1.0, 0.0]])
    # rows 0, 2, 3 are identical: inside the top 2 and at its boundary the lower index comes first
    np.testing.assert_array_equal(rel.dot_top_k(queries, candidates, 2), [[0, 2], [0, 2]])
    np.testing.assert_array_equal(rel.dot_top_k(queries, candidates, 2, exclude=np.array([0, 2])), [[2, 3], [0, 3]])
    np.testing.assert_array_equal(rel.cosine_top_k(queries, unit_rows(candidates), np.array([0, 0]), 3),
                                  [[2, 3, 4], [2, 3, 4]])


def test_identical_candidates_tie_whatever_the_kernel():
    """Identical rows scattered in a large matrix: a matrix product's last bits depend on a row's position, so
    without shared scores the order of a tie would be the kernel's."""
    rng = np.random.default_rng(10)
    candidates = rng.normal(size=(3000, 48))
    copies = [5, 1234, 2999, 17]
    candidates[copies] = candidates[700]
    queries = candidates[700] + 0.01 * rng.normal(size=(25, 48))
    unit = unit_rows(torch.from_numpy(candidates).float())
    got = rel.cosine_top_k(queries, unit, np.full(25, 5), 4)
    np.testing.assert_array_equal(got, np.tile([17, 700, 1234, 2999], (25, 1)))
