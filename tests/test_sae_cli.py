"""``repgeo sae train`` and ``repgeo sae cooccurrence`` through the CLI, on real stores of the tiny model.

References: co-occurrence counted by Python loops over blocks and tokens, affinities from explicit contingency
tables, numpy eigenvalues, reconstruction error recomputed in float64; planted feature groups that lobes must
recover; the same results under ``mpiexec -n 4 --scheduler mpi`` as with one local worker.
"""

import hashlib
import json
import os

import numpy as np
import pytest
import xarray as xr
import zarr

from toolkit.observables import AFFINITIES
from toolkit.sae import load_sae, save_sae

LAYER = 2
BLOCK = 4


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model, run_repgeo, write_jsonl, make_tiny_texts):
    """A float32 store of 10 tiny-model prompts (3 to ~50 tokens; <s> first in each)."""
    d = tmp_path_factory.mktemp("sae")
    prompts = write_jsonl(d / "p.jsonl", [{"text": t} for t in make_tiny_texts(10, seed=3, min_words=2)])
    out = d / "store.zarr"
    code, _, err = run_repgeo("extract", "--model", tiny_model, "--prompts", prompts, "--out", out, "--dtype",
                              "float32")
    assert code == 0, err
    return out


def layer_tokens(store, layer):
    """Per done prompt: (vectors (n, d) float32, input ids (n,)) at ``layer``, read with zarr directly."""
    g = zarr.open_group(str(store), mode="r")
    n_tokens, done = g["n_tokens"][:], g["done"][:]
    return [(g["hidden"][p, layer, : n_tokens[p]], g["input_ids"][p, : n_tokens[p]])
            for p in np.flatnonzero(done)], g.attrs["special_token_ids"]


@pytest.fixture(scope="module")
def relu_sae(tmp_path_factory, store):
    """A random ReLU SAE (64 → 24) whose threshold 0.5 splits the activations, and that fires on <s> too."""
    rng = np.random.default_rng(0)
    W_enc = rng.standard_normal((64, 24)).astype(np.float32)
    W_dec = rng.standard_normal((24, 64)).astype(np.float32)
    tokens, _ = layer_tokens(store, LAYER)
    X = np.concatenate([v for v, _ in tokens])
    pre = (X - X.mean(axis=0)) @ W_enc
    W_enc /= np.quantile(pre, 0.9, axis=0)  # each feature above 1.0 on ~10% of tokens before the bias
    return save_sae(tmp_path_factory.mktemp("sae") / "relu", W_enc, -0.5 * np.ones(24), W_dec, X.mean(axis=0),
                    "relu", extra_cfg={"hook_name": "blocks.1.hook_resid_post"})


def brute_force_counts(store, sae_dir, threshold, block):
    """(n_blocks, C) by loops: a feature occurs in a block when it exceeds threshold on a non-special token."""
    cfg = json.load(open(os.path.join(sae_dir, "cfg.json")))
    from safetensors.numpy import load_file

    w = load_file(os.path.join(sae_dir, "sae_weights.safetensors"))
    assert cfg["apply_b_dec_to_input"]
    tokens, special = layer_tokens(store, LAYER)
    d_sae = w["W_enc"].shape[1]
    C = np.zeros((d_sae, d_sae), dtype=np.int64)
    n_blocks = 0
    special_fired = 0
    for vectors, ids in tokens:
        acts = np.maximum((vectors - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0)
        for b in range(len(ids) // block):
            occurring = set()
            for t in range(b * block, (b + 1) * block):
                fired = set(np.flatnonzero(acts[t] > threshold).tolist())
                if ids[t] in special:
                    special_fired += len(fired)
                else:
                    occurring |= fired
            for i in occurring:
                for j in occurring:
                    C[i, j] += 1
            n_blocks += 1
    return n_blocks, C, special_fired


def table_affinity(C, N, i, j, metric):
    """One affinity from the explicit 2x2 contingency table of features i and j (NaN where undefined)."""
    n11 = C[i, j]
    n10, n01 = C[i, i] - n11, C[j, j] - n11
    n00 = N - n11 - n10 - n01
    nan = float("nan")
    if metric == "simple_matching":
        return (n11 + n00) / N
    if metric == "jaccard":
        return n11 / (n11 + n10 + n01) if n11 + n10 + n01 else nan
    if metric == "dice":
        return 2 * n11 / (2 * n11 + n10 + n01) if n11 + n10 + n01 else nan
    if metric == "overlap":
        m = min(n11 + n10, n11 + n01)
        return n11 / m if m else nan
    denominator = (n11 + n10) * (n01 + n00) * (n11 + n01) * (n10 + n00)
    return (n11 * n00 - n10 * n01) / np.sqrt(float(denominator)) if denominator else nan


@pytest.fixture(scope="module")
def counted(tmp_path_factory, store, relu_sae, run_repgeo):
    out = tmp_path_factory.mktemp("co") / "co.zarr"
    code, _, err = run_repgeo("sae", "cooccurrence", "--store", store, "--sae", relu_sae, "--layer", LAYER,
                              "--out", out, "--threshold", 0.5, "--block", BLOCK, "--clusters", "2,3",
                              "--workers", 1, "--permutations", 20)
    assert code == 0, err
    return out


def test_counts_and_affinities_match_brute_force(counted, store, relu_sae):
    ds = xr.open_zarr(counted)
    n_blocks, C, special_fired = brute_force_counts(store, relu_sae, 0.5, BLOCK)
    assert special_fired > 0  # the <s> tokens would fire: the rule that they never do is exercised
    assert int(ds.n_blocks) == n_blocks > 10
    np.testing.assert_array_equal(ds.cooccurrence.values, C)
    assert 0 < (np.diagonal(C) > 0).sum() and (C > 0).sum() > 50
    affinity = ds.affinity.values
    for m, metric in enumerate(AFFINITIES):
        expected = np.array([[table_affinity(C, n_blocks, i, j, metric) for j in range(24)] for i in range(24)])
        np.testing.assert_allclose(affinity[m], expected, rtol=1e-12, atol=1e-15, equal_nan=True, err_msg=metric)
        keep = np.isfinite(np.diagonal(expected))
        eig = np.sort(np.linalg.eigvalsh(expected[np.ix_(keep, keep)]))[::-1]
        spectrum = ds.affinity_spectrum.values[m]
        np.testing.assert_allclose(spectrum[: keep.sum()], eig, atol=1e-10)
        assert np.isnan(spectrum[keep.sum():]).all()


def test_results_store_provenance_and_tools(counted, store, relu_sae, run_repgeo):
    ds = xr.open_zarr(counted)
    sae = ds.attrs["sae"]
    weights = open(os.path.join(relu_sae, "sae_weights.safetensors"), "rb").read()
    assert sae["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert sae["d_sae"] == 24 and sae["architecture"] == "relu" and sae["hook_name"] == "blocks.1.hook_resid_post"
    assert ds.attrs["source"]["path"] == os.path.abspath(store) and ds.attrs["layer"] == LAYER
    assert ds.attrs["parameters"]["threshold"] == 0.5 and ds.attrs["parameters"]["block"] == BLOCK
    assert ds.attrs["special_token_ids"] == list(zarr.open_group(str(store)).attrs["special_token_ids"])
    assert list(ds.metric.values) == list(AFFINITIES) and list(ds.n_clusters.values) == [2, 3]
    assert ds.lobe.dims == ("metric", "n_clusters", "feature") and ds.lobe.dtype == np.int64
    # galaxy: the decoder cloud's spectrum is the covariance spectrum of W_dec (24 points in 64 dims: rank 23)
    W_dec = load_sae(relu_sae, 64).W_dec.astype(np.float64)
    expected = np.sort(np.linalg.eigvalsh(np.cov(W_dec.T)))[::-1].clip(min=0)
    np.testing.assert_allclose(ds.galaxy_eigenvalues.sel(cloud="decoder").values[:64], expected, atol=1e-9)
    code, out, err = run_repgeo("validate", counted)
    assert code == 0 and "valid" in out, out + err
    code, out, err = run_repgeo("info", counted)
    assert code == 0 and "SAE co-occurrence store" in out and "24 features" in out, err


def test_same_results_under_mpiexec(counted, store, relu_sae, run_repgeo, tmp_path):
    out = tmp_path / "mpi.zarr"
    code, _, err = run_repgeo("sae", "cooccurrence", "--store", store, "--sae", relu_sae, "--layer", LAYER,
                              "--out", out, "--threshold", 0.5, "--block", BLOCK, "--clusters", "2,3",
                              "--scheduler", "mpi", "--permutations", 20, mpi=4, timeout=600)
    assert code == 0, err
    a, b = xr.open_zarr(counted), xr.open_zarr(out)
    assert sorted(a.data_vars) == sorted(b.data_vars)
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


#: Three groups of words; a prompt uses the words of one group only.
PLANTED_WORDS = [
    "river sand silt clay hills sea rain soil streams pebbles".split(),
    "baker dough flour yeast bread salt sugars water warm rise".split(),
    "library books maps letters readers tables clock quiet room history".split(),
]


def test_planted_lobes_recovered(tmp_path, tiny_model, run_repgeo, write_jsonl, the_error_line):
    """Features that fire on the tokens of one word group only: their phi lobes are the groups (AMI ≈ 1)."""
    rng = np.random.default_rng(1)
    rows = [{"text": " ".join(rng.choice(PLANTED_WORDS[g], 24)), "topic": g} for g in range(3) for _ in range(6)]
    prompts = write_jsonl(tmp_path / "planted.jsonl", rows)
    store = tmp_path / "planted.zarr"
    code, _, err = run_repgeo("extract", "--model", tiny_model, "--prompts", prompts, "--out", store,
                              "--dtype", "float32")
    assert code == 0, err
    tokens, special = layer_tokens(store, 0)  # layer 0: each token's vector is its embedding
    groups = np.array([r["topic"] for r in rows])
    ids_of = [set(np.concatenate([ids for (v, ids), g in zip(tokens, groups) if g == k]).tolist()) - set(special)
              for k in range(3)]
    features, planted = [], []
    for k in range(3):
        own = sorted(ids_of[k] - ids_of[(k + 1) % 3] - ids_of[(k + 2) % 3])
        assert len(own) >= 6
        features += own[:8]
        planted += [k] * len(own[:8])
    embedding = {}
    for vectors, ids in tokens:
        embedding.update(zip(ids.tolist(), vectors))
    E = np.array([embedding[t] for t in features], dtype=np.float64)
    # feature f: 2·x·e_f/|e_f|² − 0.5 is 1.5 on its own token and far below 1 on other (nearly orthogonal) ones
    W_enc = (2 * E / (E ** 2).sum(axis=1, keepdims=True)).T
    centres = np.random.default_rng(2).standard_normal((3, 64))
    W_dec = centres[planted] + 0.05 * np.random.default_rng(3).standard_normal((len(features), 64))
    sae = save_sae(tmp_path / "planted-sae", W_enc, -0.5 * np.ones(len(features)), W_dec, np.zeros(64), "relu",
                   apply_b_dec_to_input=False)
    out = tmp_path / "planted-co.zarr"
    code, _, err = run_repgeo("sae", "cooccurrence", "--store", store, "--sae", sae, "--layer", 0, "--out", out,
                              "--block", 8, "--clusters", "3", "--workers", 2, "--permutations", 20)
    assert code == 0, err
    ds = xr.open_zarr(out)
    from sklearn.metrics import adjusted_mutual_info_score

    lobes = ds.lobe.sel(metric="phi", n_clusters=3).values
    assert (lobes >= 0).all()
    assert adjusted_mutual_info_score(planted, lobes) > 0.99
    phi = ds.lobe_ami.sel(metric="phi", n_clusters=3)
    assert float(phi) > 0.99 and float(ds.lobe_ami_z.sel(metric="phi", n_clusters=3)) > 5
    assert float(ds.lobe_logreg_accuracy.sel(metric="phi", n_clusters=3)) > 0.95
    assert float(ds.lobe_logreg_random_accuracy.sel(metric="phi", n_clusters=3)) < 0.8


def test_train_saves_a_topk_sae_with_true_report(tmp_path, store, run_repgeo):
    out = tmp_path / "trained"
    code, _, err = run_repgeo("sae", "train", "--store", store, "--layer", LAYER, "--out", out, "--features", 64,
                              "--k", 4, "--epochs", 30, "--batch-tokens", 64)
    assert code == 0, err
    assert "explained variance" in err and "dead features" in err
    sae = load_sae(out, 64)
    assert sae.architecture == "topk" and sae.k == 4 and sae.d_sae == 64
    cfg = json.load(open(out / "cfg.json"))
    assert cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["repgeo"]["layer"] == LAYER
    report = cfg["repgeo"]["evaluation"]
    # independent recomputation in float64: top-4 of the pre-activations by a full sort, then ReLU
    tokens, special = layer_tokens(store, LAYER)
    X = np.concatenate([v[~np.isin(ids, special)] for v, ids in tokens]).astype(np.float64)
    pre = (X - sae.b_dec) @ sae.W_enc.astype(np.float64) + sae.b_enc
    kth = np.sort(pre, axis=1)[:, -4][:, None]
    acts = np.where(pre >= kth, np.maximum(pre, 0), 0)
    residual = X - (acts @ sae.W_dec + sae.b_dec)
    ev = 1 - (residual ** 2).sum() / ((X - X.mean(axis=0)) ** 2).sum()
    assert report["tokens"] == len(X)
    assert report["explained_variance"] == pytest.approx(ev, abs=1e-4)
    assert report["dead_features"] == int(((acts > 0).sum(axis=0) == 0).sum())
    assert ev > 0.6  # it learned: a random TopK SAE of this size explains far less


@pytest.mark.parametrize("case", ["d_in", "no_dir", "no_weights", "layer", "not_store", "results_store", "exists"])
def test_cooccurrence_bad_input(case, tmp_path, store, relu_sae, counted, run_repgeo, the_error_line,
                                tree_snapshot):
    sae, layer, source, out = relu_sae, LAYER, store, tmp_path / "out.zarr"
    if case == "d_in":
        sae = save_sae(tmp_path / "small", np.ones((32, 4)), np.zeros(4), np.ones((4, 32)), np.zeros(32), "relu")
    elif case == "no_dir":
        sae = tmp_path / "missing"
    elif case == "no_weights":
        sae = tmp_path / "partial-sae"
        sae.mkdir()
        (sae / "cfg.json").write_text("{}")
    elif case == "layer":
        layer = 5
    elif case == "not_store":
        source = tmp_path
    elif case == "results_store":
        source = counted
    elif case == "exists":
        out = counted
    before = tree_snapshot(store), tree_snapshot(counted)
    code, _, err = run_repgeo("sae", "cooccurrence", "--store", source, "--sae", sae, "--layer", layer, "--out", out)
    assert code == 2
    line = the_error_line(err)
    expected = {"d_in": "d_in=32", "no_dir": "does not exist", "no_weights": "sae_weights.safetensors",
                "layer": "layers 0..4", "not_store": "not a Zarr v3 store", "results_store": "sae_cooccurrence",
                "exists": "already exists"}[case]
    assert expected in line, line
    assert (tree_snapshot(store), tree_snapshot(counted)) == before
    assert case == "exists" or not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--layer", "-1"], "out of range"),
    (["--layer", "2", "--features", "8", "--k", "9"], "--k 9"),
])
def test_train_bad_input(args, expected, tmp_path, store, run_repgeo, the_error_line):
    out = tmp_path / "sae"
    code, _, err = run_repgeo("sae", "train", "--store", store, "--out", out, *args)
    assert code == 2
    assert expected in the_error_line(err)
    assert not out.exists()
