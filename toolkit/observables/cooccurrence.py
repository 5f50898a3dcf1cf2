"""Co-occurrence of SAE features within blocks of tokens, its affinities, their spectra and spectral "lobes".

Li et al. 2024, "The Geometry of Concepts", brain scale: features that fire together in the same stretch of text
form lobes. A feature fires on a token when its activation exceeds a threshold; it occurs in a block when it
fires on any token of the block. Counting blocks over a corpus gives, for each pair of features (i, j), the
2×2 contingency table

    n11: blocks where both occur      n10: i occurs, j does not
    n01: j occurs, i does not         n00: neither occurs          n11 + n10 + n01 + n00 = N blocks

which `cooccurrence_counts` stores as one integer matrix C (C_ij = n11, C_ii = blocks where i occurs), so counts
from any split of the corpus add up exactly. Typical order::

    occ = block_occurrence(acts, n_tokens, special_mask, 1.0, block)    # per prompt
    cooccurrence_counts(occ, out=C)   # for each prompt, into C = zeros((feature, feature), int64); N = total blocks
    A = affinity(C, N, "phi")
    spectrum = affinity_spectrum(A); lobes = spectral_lobes(A, n_clusters, seed)
"""

import warnings

import numpy as np
import scipy.sparse as sp

AFFINITIES = ("simple_matching", "jaccard", "dice", "overlap", "phi")


def block_occurrence(activations, n_tokens, special_mask, threshold, block):
    """Which features occur in which block of one prompt.

    activations: (token, feature) float SAE feature activations of the prompt; rows at or past n_tokens are
        ignored (they may hold NaN). special_mask: (token,) bool, True where the token id is one of the
        tokenizer's special ids: such tokens never fire. threshold: a feature fires where activation > threshold
        (NaN never fires). block: tokens per block; block b covers positions [b·block, (b+1)·block), and the
        last, partial block (positions past n_tokens // block · block) is dropped.
    Returns a scipy.sparse CSR (n_tokens // block, feature) bool matrix, True where the feature fires on at
    least one token of the block.
    """
    acts = np.asarray(activations)
    special = np.asarray(special_mask, dtype=bool)
    if block < 1 or n_tokens > min(acts.shape[0], special.shape[0]):
        raise ValueError(f"need block >= 1 and n_tokens <= token length, got block={block}, n_tokens={n_tokens}, "
                         f"activations {acts.shape}, special_mask {special.shape}")
    n_blocks = int(n_tokens) // int(block)
    used = n_blocks * block
    fires = (acts[:used] > threshold) & ~special[:used, None]
    return sp.csr_matrix(fires.reshape(n_blocks, block, acts.shape[1]).any(axis=1))


#: Most blocks `cooccurrence_counts` takes at once: float32 sums of 0/1 products stay exact integers below 2^24.
MAX_BLOCKS = 2**24


def cooccurrence_counts(occurrence, out=None, band=2048):
    """Exact co-occurrence counts C = Oᵀ O of an occurrence matrix O: (block, feature) bool (dense or sparse).

    C_ij is the number of blocks where features i and j both occur; the diagonal C_ii the number of blocks where
    i occurs. out: a (feature, feature) integer array to add the counts into (in place), e.g. a running total
    over prompts or workers; None makes a new int64 one. Counts of disjoint sets of blocks add up to the counts
    of their union, so totals do not depend on how the blocks were split.
    Only features occurring in some block are touched. The product is a float32 matrix product (exact: at most
    MAX_BLOCKS blocks, so every sum is an integer below 2^24) formed `band` columns at a time, so the scratch
    memory is 4 · n_occurring · band bytes besides the dense (block, n_occurring) copy of O. Returns out.
    """
    O = sp.csr_matrix(occurrence, dtype=bool)
    if O.shape[0] > MAX_BLOCKS:
        raise ValueError(f"at most {MAX_BLOCKS} blocks at once, got {O.shape[0]}; split them")
    if out is None:
        out = np.zeros((O.shape[1], O.shape[1]), dtype=np.int64)
    elif out.shape != (O.shape[1], O.shape[1]) or out.dtype.kind not in "iu":
        raise ValueError(f"out must be a ({O.shape[1]}, {O.shape[1]}) integer array, got {out.shape} {out.dtype}")
    occurring = np.flatnonzero(O.getnnz(axis=0))
    dense = O[:, occurring].toarray().astype(np.float32)
    for start in range(0, occurring.size, band):
        columns = occurring[start:start + band]
        out[np.ix_(occurring, columns)] += (dense.T @ dense[:, start:start + band]).astype(out.dtype)
    return out


def affinity(counts, n_blocks, metric):
    """One co-occurrence affinity of every pair of features.

    counts: (feature, feature) int co-occurrence counts (sparse or dense, from `cooccurrence_counts`, summed);
    n_blocks: N, the total number of blocks they were counted over; metric: one of AFFINITIES. With r_i = C_ii,
    the contingency table of (i, j) is n11 = C_ij, n10 = r_i − C_ij, n01 = r_j − C_ij,
    n00 = N − r_i − r_j + C_ij, and

    - simple_matching = (n11 + n00) / N                        NaN when N = 0
    - jaccard = n11 / (n11 + n10 + n01)                        NaN when neither feature occurs
    - dice = 2 n11 / (2 n11 + n10 + n01)                       NaN when neither feature occurs
    - overlap = n11 / min(n11 + n10, n11 + n01)                NaN when either feature never occurs
    - phi = (n11 n00 − n10 n01) / sqrt((n11+n10)(n01+n00)(n11+n01)(n10+n00))
                                                               NaN when either feature never or always occurs
    All lie in [0, 1] except phi in [−1, 1]; the diagonal is 1 wherever defined. Computed in float64 (phi's
    numerator as n11·N − r_i·r_j, equal to n11 n00 − n10 n01). Returns a dense (feature, feature) float64 array;
    the computation holds ~4 such arrays at once: to bound memory, slice counts to the features of interest first
    (C[idx][:, idx] keeps their diagonal, hence their table).
    """
    if metric not in AFFINITIES:
        raise ValueError(f"metric must be one of {AFFINITIES}, got {metric!r}")
    C = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    C = C.astype(np.float64)
    N = float(n_blocks)
    r = np.diagonal(C).copy()
    ri, rj = r[:, None], r[None, :]
    if (C.shape[0] != C.shape[1] or not np.array_equal(C, C.T) or (C < 0).any() or (C > np.minimum(ri, rj)).any()
            or (r > N).any()):
        raise ValueError("counts must be a symmetric co-occurrence matrix with 0 <= C_ij <= min(C_ii, C_jj) and "
                         "C_ii <= n_blocks")

    def ratio(numerator, denominator):
        out = np.full(C.shape, np.nan)
        np.divide(numerator, denominator, out=out, where=denominator > 0)
        return out

    if metric == "simple_matching":
        return ratio(N - (ri + rj - C) + C, np.full(C.shape, N))
    if metric == "jaccard":
        return ratio(C, ri + rj - C)
    if metric == "dice":
        return ratio(2 * C, ri + rj)
    if metric == "overlap":
        return ratio(C, np.minimum(ri, rj))
    return ratio(C * N - ri * rj, np.sqrt(ri * (N - ri)) * np.sqrt(rj * (N - rj)))


def affinities(counts, n_blocks):
    """All five affinities of `affinity`: {name: (feature, feature) float64} for the names in AFFINITIES."""
    return {metric: affinity(counts, n_blocks, metric) for metric in AFFINITIES}


def _defined_features(A):
    """Boolean (feature,) mask of the features whose self-affinity is defined (finite)."""
    return np.isfinite(np.diagonal(A))


def affinity_spectrum(A):
    """Eigenvalues of a symmetric affinity matrix A: (feature, feature) float, largest first.

    NaN handling: a feature whose self-affinity A_ii is NaN (for `affinities`: one that never occurs, or for phi
    never or always occurs) is removed with its row and column; for the five affinities the rest is then finite
    (otherwise ValueError). The eigenvalues of that defined block come first, in descending order, followed by
    one NaN per removed feature, so the result always has shape (feature,) float64.
    """
    A = np.asarray(A, dtype=np.float64)
    keep = _defined_features(A)
    sub = A[np.ix_(keep, keep)]
    if not np.isfinite(sub).all():
        raise ValueError("affinity is NaN between features whose self-affinity is defined")
    spectrum = np.full(A.shape[0], np.nan)
    spectrum[: keep.sum()] = np.linalg.eigvalsh(sub)[::-1]
    return spectrum


def spectral_lobes(A, n_clusters, seed):
    """Lobes: spectral clustering of features on an affinity matrix A: (feature, feature) float.

    The graph's edge weights are max(A_ij, 0) for i != j: NaN (undefined) and negative affinities (phi's
    anti-correlation) count as no connection, and self-affinity is ignored. Features with a NaN self-affinity
    (never occurring) or no positive edge are not clustered and get label −1; the others are clustered with
    sklearn's SpectralClustering (affinity="precomputed", k-means label assignment, random_state=seed).
    Returns (feature,) int64 labels in {−1, 0, ..., n_clusters − 1}.
    """
    from sklearn.cluster import SpectralClustering

    A = np.asarray(A, dtype=np.float64)
    W = np.nan_to_num(A, nan=0.0).clip(min=0.0)
    np.fill_diagonal(W, 0.0)
    keep = _defined_features(A) & (W.sum(axis=1) > 0)
    if keep.sum() <= n_clusters:
        raise ValueError(f"only {keep.sum()} features have a positive affinity to another; cannot form "
                         f"{n_clusters} lobes")
    labels = np.full(A.shape[0], -1, dtype=np.int64)
    model = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", assign_labels="kmeans",
                               random_state=seed)
    with warnings.catch_warnings():  # disconnected groups of features are expected: they become separate lobes
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels[keep] = model.fit_predict(W[np.ix_(keep, keep)])
    return labels
