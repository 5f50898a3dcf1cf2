"""Do co-occurrence lobes live in separate regions of decoder-direction space? (Li et al. 2024, brain scale.)

Both tests use only the features that have a lobe (label >= 0; −1 marks features `spectral_lobes` left out) and
the unit-normalised decoder directions of those features.
"""

import numpy as np


def _unit_directions(lobes, decoder_dirs):
    """(labels, unit directions) of the features with a lobe; decoder_dirs: (feature, d_in) with nonzero rows."""
    lobes = np.asarray(lobes)
    D = np.asarray(decoder_dirs, dtype=np.float64)
    if lobes.shape != (D.shape[0],):
        raise ValueError(f"lobes must be (feature,) = ({D.shape[0]},), got {lobes.shape}")
    keep = lobes >= 0
    D = D[keep]
    norms = np.linalg.norm(D, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("a feature with a lobe has a zero decoder direction")
    return lobes[keep], D / norms


def direction_clusters(unit_dirs, n_clusters, seed):
    """k-means clusters (sklearn KMeans, n_init=10, random_state=seed) of unit vectors unit_dirs: (feature, d_in).

    Returns (feature,) int labels in 0..n_clusters − 1.
    """
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(unit_dirs)


def lobe_ami(lobes, decoder_dirs, n_clusters, n_permutations, seed):
    """Adjusted mutual information between lobes and k-means clusters of decoder directions, with a null baseline.

    lobes: (feature,) int labels, −1 for features without a lobe; decoder_dirs: (feature, d_in) float (the rows
    of W_dec). The features with a lobe are clustered by `direction_clusters` of their unit decoder directions;
    ami = AMI(lobes, clusters) (sklearn, arithmetic normalisation). Baseline: AMI of the clusters with
    n_permutations random permutations of the lobe labels (numpy Generator seeded with seed); mean and std
    (ddof=1) of those, and z = (ami − mean) / std (NaN when std = 0).
    Returns (ami, baseline_mean, baseline_std, z) floats.
    """
    from sklearn.metrics import adjusted_mutual_info_score

    labels, U = _unit_directions(lobes, decoder_dirs)
    clusters = direction_clusters(U, n_clusters, seed)
    ami = adjusted_mutual_info_score(labels, clusters)
    rng = np.random.default_rng(seed)
    null = np.array([adjusted_mutual_info_score(rng.permutation(labels), clusters) for _ in range(n_permutations)])
    mean, std = null.mean(), null.std(ddof=1)
    z = (ami - mean) / std if std > 0 else np.nan
    return float(ami), float(mean), float(std), float(z)


def lobe_logreg_accuracy(lobes, decoder_dirs, seed, folds=5):
    """How well a feature's decoder direction predicts its lobe, against random directions.

    lobes: (feature,) int labels, −1 for features without a lobe; decoder_dirs: (feature, d_in) float. Lobes with
    fewer than `folds` features are left out (stratified folds need one member per fold). Classifier: standardise
    the coordinates of the unit directions, then multinomial logistic regression (sklearn defaults, C = 1);
    score: balanced accuracy, averaged over `folds` stratified shuffled folds (random_state=seed). The same
    is done with the directions replaced by random Gaussian directions (numpy Generator seeded with seed); both
    are near 1 / (number of lobes) by chance.
    Returns (accuracy, random_direction_accuracy) floats.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels, U = _unit_directions(lobes, decoder_dirs)
    names, sizes = np.unique(labels, return_counts=True)
    keep = np.isin(labels, names[sizes >= folds])
    labels, U = labels[keep], U[keep]
    if np.unique(labels).size < 2:
        raise ValueError(f"need at least 2 lobes with >= {folds} features each")
    random_dirs = np.random.default_rng(seed).standard_normal(U.shape)
    random_dirs /= np.linalg.norm(random_dirs, axis=1, keepdims=True)
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)

    def score(X):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        return float(cross_val_score(model, X, labels, cv=splits, scoring="balanced_accuracy").mean())

    return score(U), score(random_dirs)
