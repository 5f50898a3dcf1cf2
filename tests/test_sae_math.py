"""Tests of the SAE files (toolkit.sae) and the SAE feature geometry (brain and galaxy scale) in toolkit.observables.

References: Python loops over blocks, tokens and features (occurrence, counts, contingency tables), the textbook
formulas of the five affinities, direct numpy formulas of the three SAE activations, numpy's eigvalsh of np.cov,
closed-form spectra, and a synthetic SAE with planted co-firing groups written and read back through the files.
"""

import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_mutual_info_score

from toolkit.errors import UserError
from toolkit.observables import (
    AFFINITIES,
    affinities,
    affinity_spectrum,
    block_occurrence,
    cooccurrence_counts,
    covariance_spectrum,
    default_fit_range,
    isotropic_reference,
    lobe_ami,
    lobe_logreg_accuracy,
    power_law_slope,
    spectral_lobes,
)
from toolkit.sae import encode, load_sae, save_sae

# ------------------------------------------------------------------------------------------------------------
# Brute-force references


def brute_occurrence(acts, n_tokens, special, threshold, block):
    """Occurrence by loops: feature f occurs in block b if some non-special token of it has activation > threshold."""
    n_blocks = n_tokens // block
    out = np.zeros((n_blocks, acts.shape[1]), dtype=bool)
    for b in range(n_blocks):
        for t in range(b * block, (b + 1) * block):
            for f in range(acts.shape[1]):
                if not special[t] and acts[t, f] > threshold:
                    out[b, f] = True
    return out


def brute_tables(occ):
    """(n11, n10, n01, n00) of every pair, each (feature, feature), counted block by block."""
    n_features = occ.shape[1]
    tables = np.zeros((4, n_features, n_features), dtype=np.int64)
    for row in occ:
        for i in range(n_features):
            for j in range(n_features):
                tables[{(1, 1): 0, (1, 0): 1, (0, 1): 2, (0, 0): 3}[(int(row[i]), int(row[j]))], i, j] += 1
    return tables


def textbook_affinity(name, n11, n10, n01, n00):
    """One affinity from one 2x2 table, NaN where the formula divides by zero."""
    n = n11 + n10 + n01 + n00
    nums = {
        "simple_matching": (n11 + n00, n),
        "jaccard": (n11, n11 + n10 + n01),
        "dice": (2 * n11, 2 * n11 + n10 + n01),
        "overlap": (n11, min(n11 + n10, n11 + n01)),
        "phi": (n11 * n00 - n10 * n01, math.sqrt((n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00))),
    }
    num, den = nums[name]
    return num / den if den else math.nan


def random_prompt(rng, n_features=7, width=23, rate=0.15):
    """Activations (token, feature) of one prompt padded to `width` with NaN, n_tokens, special mask."""
    n_tokens = int(rng.integers(5, width + 1))
    acts = np.where(rng.random((width, n_features)) < rate, rng.uniform(1.0, 3.0, (width, n_features)),
                    rng.uniform(-1.0, 1.0, (width, n_features)))
    acts[n_tokens:] = np.nan
    special = rng.random(width) < 0.2
    return acts, n_tokens, special


# ------------------------------------------------------------------------------------------------------------
# Occurrence and counts


def test_block_occurrence_matches_loops():
    rng = np.random.default_rng(0)
    for _ in range(20):
        acts, n_tokens, special = random_prompt(rng)
        for block in (1, 3, 4):
            occ = block_occurrence(acts, n_tokens, special, 1.0, block)
            assert sp.issparse(occ) and occ.format == "csr"
            assert occ.dtype == bool
            np.testing.assert_array_equal(occ.toarray(), brute_occurrence(acts, n_tokens, special, 1.0, block))


def test_special_tokens_never_fire_and_partial_blocks_are_dropped():
    acts = np.zeros((12, 3))
    acts[0, 0] = 100.0  # special token: never fires
    acts[5, 1] = 1.5  # block 1 (positions 4..7)
    acts[9, 2] = 50.0  # position 9: in the partial block 2 (8..10 of n_tokens=10), dropped
    acts[7, 0] = 1.0  # exactly at the threshold: does not fire
    acts[10:] = np.nan
    special = np.zeros(12, dtype=bool)
    special[0] = True
    occ = block_occurrence(acts, 10, special, 1.0, 4).toarray()
    np.testing.assert_array_equal(occ, [[False, False, False], [False, True, False]])
    special[0] = False
    assert block_occurrence(acts, 10, special, 1.0, 4).toarray()[0, 0]
    assert block_occurrence(acts, 3, special, 1.0, 4).shape == (0, 3)


def test_counts_and_affinities_match_contingency_tables():
    rng = np.random.default_rng(1)
    occ = rng.random((40, 9)) < 0.3
    occ[:, 7] = False  # never occurs
    occ[:, 8] = True  # always occurs
    counts = cooccurrence_counts(sp.csr_matrix(occ))
    assert counts.dtype == np.int64
    n11, n10, n01, n00 = brute_tables(occ)
    np.testing.assert_array_equal(counts, n11)
    # banded (3 columns at a time) and dense input: the same counts
    np.testing.assert_array_equal(cooccurrence_counts(occ, band=3), n11)
    result = affinities(counts, occ.shape[0])
    assert sorted(result) == sorted(AFFINITIES)
    for name, A in result.items():
        assert A.dtype == np.float64 and A.shape == (9, 9)
        expected = np.array([[textbook_affinity(name, n11[i, j], n10[i, j], n01[i, j], n00[i, j])
                              for j in range(9)] for i in range(9)])
        np.testing.assert_allclose(A, expected, rtol=1e-12, atol=1e-15, equal_nan=True, err_msg=name)
    # The NaN pattern the docstring promises.
    assert np.isnan(result["jaccard"][7, 7]) and result["jaccard"][7, 0] == 0
    assert np.isnan(result["overlap"][7]).all()
    assert np.isnan(result["phi"][8]).all() and np.isnan(result["phi"][7]).all()
    assert not np.isnan(result["simple_matching"]).any()


def test_counts_summed_over_workers_equal_counts_of_all():
    rng = np.random.default_rng(2)
    prompts = [random_prompt(rng, n_features=11, width=30) for _ in range(12)]
    occs = [block_occurrence(a, n, s, 1.0, 4) for a, n, s in prompts]
    total = np.zeros(2 * (occs[0].shape[1],), dtype=np.int32)  # a worker's running total, added into in place
    for o in occs:
        cooccurrence_counts(o, out=total)
    whole = cooccurrence_counts(sp.vstack(occs))
    np.testing.assert_array_equal(total, whole)
    np.testing.assert_array_equal(whole, brute_tables(sp.vstack(occs).toarray())[0])
    n_blocks = sum(o.shape[0] for o in occs)
    for name in AFFINITIES:
        np.testing.assert_array_equal(affinities(total, n_blocks)[name], affinities(whole, n_blocks)[name])


def test_affinities_reject_inconsistent_counts():
    with pytest.raises(ValueError):
        affinities(np.array([[2, 3], [3, 4]]), 10)  # C_01 > C_00
    with pytest.raises(ValueError):
        affinities(np.array([[2, 0], [0, 11]]), 10)  # C_11 > n_blocks


def test_affinity_spectrum_closed_form_and_nan_features():
    # Block-diagonal all-ones blocks of sizes 3 and 5: eigenvalues 5, 3 and zeros; feature 4 undefined.
    A = np.zeros((9, 9))
    A[:3, :3] = 1
    A[3:8, 3:8] = 1
    A = np.insert(np.insert(A[:8, :8], 4, np.nan, axis=0), 4, np.nan, axis=1)
    spectrum = affinity_spectrum(A)
    np.testing.assert_allclose(spectrum[:8], [5, 3, 0, 0, 0, 0, 0, 0], atol=1e-12)
    assert np.isnan(spectrum[8])
    # On real affinities: the defined block's eigenvalues sum to its trace (1 per defined feature).
    rng = np.random.default_rng(3)
    occ = rng.random((60, 10)) < 0.25
    occ[:, 2] = False
    for name, A in affinities(cooccurrence_counts(occ), 60).items():
        s = affinity_spectrum(A)
        n_defined = 10 if name == "simple_matching" else 9
        assert np.isnan(s[n_defined:]).all() and np.isfinite(s[:n_defined]).all()
        assert np.all(np.diff(s[:n_defined]) <= 1e-12)
        np.testing.assert_allclose(s[:n_defined].sum(), n_defined, rtol=1e-12)


def test_spectral_lobes_cut_negative_and_undefined_affinities():
    # Two groups {0,1,2} and {3,4,5}; feature 6 is anti-correlated with everyone (phi < 0): no edge, label -1;
    # feature 7 never occurs (NaN row): label -1; a NaN between two defined features is no edge either.
    A = np.full((8, 8), -0.1)
    A[:3, :3] = A[3:6, 3:6] = 0.8
    A[6, :] = A[:, 6] = -0.5
    A[7, :] = A[:, 7] = np.nan
    A[0, 1] = A[1, 0] = np.nan
    np.fill_diagonal(A[:7, :7], 1.0)
    lobes = spectral_lobes(A, 2, seed=0)
    assert lobes[6] == -1 and lobes[7] == -1
    assert len(set(lobes[:3])) == 1 and len(set(lobes[3:6])) == 1 and lobes[0] != lobes[3]
    with pytest.raises(ValueError):
        spectral_lobes(A, 6, seed=0)  # only 6 features can be clustered


# ------------------------------------------------------------------------------------------------------------
# SAE files and activations


def random_weights(rng, d_in=8, d_sae=20):
    return dict(W_enc=rng.standard_normal((d_in, d_sae)), b_enc=rng.standard_normal(d_sae),
                W_dec=rng.standard_normal((d_sae, d_in)), b_dec=rng.standard_normal(d_in))


def direct_activations(w, X, architecture, apply_b_dec, k=None, threshold=None):
    """float64 reference, one token at a time."""
    out = np.zeros((X.shape[0], w["W_enc"].shape[1]))
    for t, x in enumerate(X.astype(np.float64)):
        pre = (x - w["b_dec"] * apply_b_dec) @ w["W_enc"] + w["b_enc"]
        if architecture == "relu":
            out[t] = np.maximum(pre, 0)
        elif architecture == "jumprelu":
            out[t] = [p if p > th and p > 0 else 0.0 for p, th in zip(pre, threshold)]
        else:
            for f in sorted(range(pre.size), key=lambda f: -pre[f])[:k]:
                out[t, f] = max(pre[f], 0.0)
    return out


@pytest.mark.parametrize("architecture", ["relu", "standard", "jumprelu", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_encode_matches_direct_formulas(tmp_path, architecture, apply_b_dec):
    rng = np.random.default_rng(4)
    w = random_weights(rng)
    w["b_enc"] -= 4  # many negative pre-activations: TopK must zero the negative ones among its k largest
    threshold = np.abs(rng.standard_normal(20)) * 0.5
    threshold[0] = -0.3  # a negative threshold still needs pre > 0 (SAELens: ReLU(pre) * [pre > threshold])
    save_sae(tmp_path / "sae", **w, architecture=architecture, k=5, threshold=threshold,
             extra_cfg={"hook_name": "blocks.3.hook_resid_post"}, apply_b_dec_to_input=apply_b_dec)
    sae = load_sae(tmp_path / "sae", d_model=8)
    assert sae.cfg["hook_name"] == "blocks.3.hook_resid_post"
    arch = "relu" if architecture == "standard" else architecture
    assert sae.architecture == arch and sae.apply_b_dec_to_input == apply_b_dec
    np.testing.assert_array_equal(sae.W_dec, w["W_dec"].astype(np.float32))
    X = 2 * rng.standard_normal((30, 8))
    acts = encode(sae, X)
    assert acts.dtype == np.float32 and acts.shape == (30, 20)
    expected = direct_activations({k: v.astype(np.float32) for k, v in w.items()}, X.astype(np.float32), arch,
                                  apply_b_dec, k=5, threshold=threshold.astype(np.float32))
    np.testing.assert_allclose(acts, expected, rtol=1e-5, atol=1e-5)
    if arch == "topk":
        positives = (acts > 0).sum(axis=1)
        assert (positives <= 5).all() and (positives == 5).any() and (positives < 5).any()


def test_jumprelu_with_negative_threshold_keeps_relu(tmp_path):
    # SAELens: ReLU(pre) * [pre > threshold]; a pre-activation between a negative threshold and 0 gives 0.
    save_sae(tmp_path / "j", np.eye(2), np.zeros(2), np.eye(2), np.zeros(2), "jumprelu", threshold=[-0.5, 0.2])
    acts = encode(load_sae(tmp_path / "j", 2), [[-0.2, 0.1], [0.3, 0.3]])
    np.testing.assert_array_equal(acts, np.array([[0, 0], [0.3, 0.3]], dtype=np.float32))


def write_raw(directory, cfg, tensors):
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
              str(directory / "sae_weights.safetensors"))
    return directory


def test_loader_reads_old_saelens_spellings(tmp_path):
    rng = np.random.default_rng(5)
    w = random_weights(rng)
    X = rng.standard_normal((6, 8))
    # SAELens <= 5: TopK as a "standard" SAE with activation_fn_str / activation_fn and activation_fn_kwargs.k.
    for key in ("activation_fn_str", "activation_fn"):
        cfg = {"architecture": "standard", "d_in": 8, "d_sae": 20, key: "topk", "activation_fn_kwargs": {"k": 3},
               "apply_b_dec_to_input": False, "normalize_activations": "none"}
        sae = load_sae(write_raw(tmp_path / key, cfg, w), 8)
        assert sae.architecture == "topk" and sae.k == 3
        np.testing.assert_allclose(encode(sae, X), direct_activations(w, X, "topk", False, k=3), atol=1e-5)
    # A cfg without architecture or apply_b_dec_to_input: ReLU, b_dec subtracted (SAELens 6 default).
    sae = load_sae(write_raw(tmp_path / "bare", {"d_in": 8}, w), 8)
    assert sae.architecture == "relu" and sae.apply_b_dec_to_input
    # JumpReLU training checkpoints store log_threshold.
    threshold = np.abs(rng.standard_normal(20))
    sae = load_sae(write_raw(tmp_path / "log", {"architecture": "jumprelu"},
                             dict(w, log_threshold=np.log(threshold))), 8)
    np.testing.assert_allclose(sae.threshold, threshold, rtol=1e-6)


def test_loader_reads_bfloat16(tmp_path):
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(6)
    w = random_weights(rng)
    directory = tmp_path / "bf16"
    directory.mkdir()
    (directory / "cfg.json").write_text(json.dumps({"architecture": "standard"}))
    save_file({k: torch.tensor(v).bfloat16() for k, v in w.items()}, str(directory / "sae_weights.safetensors"))
    sae = load_sae(directory, 8)
    assert sae.W_enc.dtype == np.float32
    expected = torch.tensor(w["W_enc"]).bfloat16().float().numpy()
    np.testing.assert_array_equal(sae.W_enc, expected)
    assert not np.array_equal(expected, w["W_enc"].astype(np.float32))  # the rounding really happened


STANDARD = {"architecture": "standard"}
#: case -> (cfg.json contents (dict, or raw text), tensor changes (name -> array, or None to drop; or raw bytes for
#: the whole file), d_model, words the message must contain). A cfg of None means no cfg.json, and so on.
BAD_INPUTS = {
    "missing cfg": (None, {}, 8, "cfg.json"),
    "missing weights": (STANDARD, None, 8, "sae_weights.safetensors"),
    "cfg not JSON": ("{architecture: standard", {}, 8, "JSON"),
    "cfg not an object": ("[1, 2]", {}, 8, "JSON object"),
    "weights not safetensors": (STANDARD, b"\x80\x04\x95pickle", 8, "safetensors"),
    "missing W_dec": (STANDARD, {"W_dec": None}, 8, "W_dec"),
    "wrong b_enc shape": (STANDARD, {"b_enc": np.zeros(19)}, 8, "b_enc"),
    "W_enc not a matrix": (STANDARD, {"W_enc": np.zeros(8)}, 8, "W_enc"),
    "unknown architecture": ({"architecture": "gated"}, {}, 8, "gated"),
    "unknown activation": ({"architecture": "standard", "activation_fn_str": "tanh-relu"}, {}, 8, "tanh-relu"),
    "topk without k": ({"architecture": "topk"}, {}, 8, "'k'"),
    "jumprelu without threshold": ({"architecture": "jumprelu"}, {}, 8, "threshold"),
    "cfg d_sae disagrees": ({"architecture": "standard", "d_sae": 21}, {}, 8, "d_sae"),
    "d_in is not d_model": (STANDARD, {}, 9, "d_model=9"),
    "normalisation not stored": ({"architecture": "standard", "normalize_activations": "expected_average_only_in"},
                                 {}, 8, "normalize_activations"),
    "NaN weights": (STANDARD, {"b_dec": np.full(8, np.nan)}, 8, "NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_loader_bad_inputs_raise_user_error(tmp_path, case):
    cfg, tensor_changes, d_model, words = BAD_INPUTS[case]
    directory = tmp_path / "sae"
    tensors = random_weights(np.random.default_rng(7))
    for name, value in (tensor_changes if isinstance(tensor_changes, dict) else {}).items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    write_raw(directory, {}, tensors)
    if cfg is None:
        (directory / "cfg.json").unlink()
    else:
        (directory / "cfg.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    if tensor_changes is None:
        (directory / "sae_weights.safetensors").unlink()
    elif isinstance(tensor_changes, bytes):
        (directory / "sae_weights.safetensors").write_bytes(tensor_changes)
    with pytest.raises(UserError) as error:
        load_sae(directory, d_model)
    message = str(error.value)
    assert "\n" not in message and words in message and ";" in message  # one line: problem; fix


def test_loader_missing_directory_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_sae(tmp_path / "nowhere", 8)


# ------------------------------------------------------------------------------------------------------------
# Planted structure: an SAE whose features co-fire in known groups with clustered decoder directions

N_GROUPS, GROUP_SIZE, D_IN, BLOCK = 3, 20, 96, 4
N_DEAD = 2  # features that never fire


def planted_sae(tmp_path, rng):
    """Decoder rows cluster around one random direction per group; encoder = pseudo-inverse of the decoder, so
    encoding the hidden states a @ W_dec returns the planted activations a exactly (up to float32 rounding)."""
    n_features = N_GROUPS * GROUP_SIZE + N_DEAD
    centres = rng.standard_normal((N_GROUPS + 1, D_IN))
    groups = np.r_[np.repeat(np.arange(N_GROUPS), GROUP_SIZE), np.full(N_DEAD, N_GROUPS)]
    W_dec = centres[groups] + 0.5 * rng.standard_normal((n_features, D_IN))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    W_enc = np.linalg.pinv(W_dec)
    save_sae(tmp_path / "planted", W_enc, np.zeros(n_features), W_dec, np.zeros(D_IN), "relu",
             apply_b_dec_to_input=True)
    return load_sae(tmp_path / "planted", D_IN), groups


def planted_prompt(rng, n_features, width=64):
    """Each block has one active group: its features fire (2..3) on random tokens; everyone else stays below
    the threshold except rare stray firings; special tokens carry large activations that must not count."""
    n_tokens = int(rng.integers(40, width + 1))
    a = rng.uniform(-0.5, 0.5, (width, n_features))
    for b in range(width // BLOCK):
        group = rng.integers(N_GROUPS)
        rows = slice(b * BLOCK, (b + 1) * BLOCK)
        members = np.arange(group * GROUP_SIZE, (group + 1) * GROUP_SIZE)
        a[rows, members] = np.where(rng.random((BLOCK, GROUP_SIZE)) < 0.25, rng.uniform(2, 3, (BLOCK, GROUP_SIZE)),
                                    a[rows, members])
    stray = rng.random(a.shape) < 0.002
    a[:, -N_DEAD:] = np.minimum(a[:, -N_DEAD:], 0.5)
    a[stray & (np.arange(n_features) < n_features - N_DEAD)] = 2.0
    special = rng.random(width) < 0.1
    a[special, -N_DEAD:] = 5.0  # dead features fire only on special tokens, which never count
    return a, n_tokens, special


def test_planted_groups_are_recovered(tmp_path):
    rng = np.random.default_rng(8)
    sae, groups = planted_sae(tmp_path, rng)
    counts, n_blocks = np.zeros((sae.d_sae, sae.d_sae), dtype=np.int64), 0
    for _ in range(60):
        a, n_tokens, special = planted_prompt(rng, sae.d_sae)
        hidden = a @ sae.W_dec.astype(np.float64)
        hidden[n_tokens:] = np.nan
        acts = encode(sae, hidden)
        np.testing.assert_allclose(acts[:n_tokens], np.maximum(a[:n_tokens], 0), atol=1e-3)
        occ = block_occurrence(acts, n_tokens, special, 1.0, BLOCK)
        cooccurrence_counts(occ, out=counts)
        n_blocks += occ.shape[0]
    live = groups < N_GROUPS
    assert (counts.diagonal()[~live] == 0).all() and (counts.diagonal()[live] > 0).all()
    A = affinities(counts, n_blocks)
    for name in ("jaccard", "phi", "dice", "overlap"):
        lobes = spectral_lobes(A[name], N_GROUPS, seed=0)
        assert (lobes[~live] == -1).all(), name
        assert adjusted_mutual_info_score(groups[live], lobes[live]) > 0.99, name
    lobes = spectral_lobes(A["phi"], N_GROUPS, seed=0)
    # Three lobes: the top three eigenvalues of the Jaccard affinity stand out from the rest. (Not so for phi:
    # with one group per block the groups are anti-correlated, and the all-groups mode w + 2b nearly cancels.)
    spectrum = affinity_spectrum(A["jaccard"])
    assert spectrum[2] > 3 * spectrum[3]
    ami, mean, std, z = lobe_ami(lobes, sae.W_dec, N_GROUPS, n_permutations=200, seed=0)
    assert ami > 0.95 and abs(mean) < 0.05 and z > 20
    # Only the directions count, not the decoder norms.
    scales = np.exp(rng.uniform(-3, 3, (sae.d_sae, 1)))
    assert lobe_ami(lobes, sae.W_dec * scales, N_GROUPS, n_permutations=200, seed=0) == pytest.approx(
        (ami, mean, std, z), rel=1e-9)
    accuracy, random_accuracy = lobe_logreg_accuracy(lobes, sae.W_dec, seed=0)
    assert accuracy > 0.95 and random_accuracy < 0.6


def test_lobe_tests_are_null_without_structure():
    rng = np.random.default_rng(9)
    lobes = rng.integers(0, 3, 90)
    lobes[:4] = -1
    directions = rng.standard_normal((90, 32))
    ami, mean, std, z = lobe_ami(lobes, directions, 3, n_permutations=200, seed=1)
    assert abs(ami) < 0.1 and abs(z) < 4
    accuracy, random_accuracy = lobe_logreg_accuracy(lobes, directions, seed=1)
    assert accuracy < 0.6 and random_accuracy < 0.6


# ------------------------------------------------------------------------------------------------------------
# Galaxy scale


@pytest.mark.parametrize("shape", [(200, 12), (9, 30)])
def test_covariance_spectrum_matches_numpy_cov(shape):
    X = np.random.default_rng(10).standard_normal(shape) * np.linspace(0.1, 3, shape[1]) + 5
    expected = np.sort(np.clip(np.linalg.eigvalsh(np.cov(X.T)), 0, None))[::-1]
    spectrum = covariance_spectrum(X)
    assert spectrum.shape == (shape[1],)
    np.testing.assert_allclose(spectrum, expected, rtol=1e-10, atol=1e-10 * expected[0])
    if shape[0] < shape[1]:
        assert (spectrum[shape[0] - 1:] < 1e-12 * spectrum[0]).all()  # rank <= rows - 1 after centring


def test_power_law_slope_recovers_exponent():
    ranks = np.arange(1, 501)
    assert power_law_slope(3.0 * ranks**-1.3, (10, 250)) == pytest.approx(-1.3, abs=1e-12)
    assert default_fit_range(3.0 * ranks**-1.3) == (10, 250)
    assert power_law_slope(3.0 * ranks**-1.3) == pytest.approx(-1.3, abs=1e-12)
    # Through a sampled cloud whose covariance eigenvalues are r^-1: the fit over the middle ranks recovers it.
    d = 200
    X = np.random.default_rng(11).standard_normal((20000, d)) * np.arange(1, d + 1) ** -0.5
    assert power_law_slope(covariance_spectrum(X)) == pytest.approx(-1.0, abs=0.05)
    # The isotropic reference of the same shape: unit variance on average, Marchenko-Pastur spread within
    # (1 ± sqrt(d / n))^2 = 0.81..1.21, so nearly flat.
    reference = isotropic_reference(20000, d, seed=0)
    assert reference.shape == (d,) and reference.mean() == pytest.approx(1.0, abs=0.01)
    assert 0.78 < reference[-1] and reference[0] < 1.25 and abs(power_law_slope(reference)) < 0.1
    with pytest.raises(ValueError):
        power_law_slope(np.r_[ranks[::-1] * 1.0, np.zeros(5)], (400, 505))
    with pytest.raises(ValueError):
        power_law_slope(ranks[::-1] * 1.0, (10, 10))
