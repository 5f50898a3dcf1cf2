"""Groups at researchers' sizes: dozens of groups of 1024-token prompts, pools that share vectors, --skip-tokens.

Before the fix, pooled (prompt, token) index arrays travelled as task arguments and crashed distributed's
scheduler past its 100 kB limit (any 7 groups of 1024 tokens); group_kl was NaN or negative wherever two pools
shared a vector (identical document openings at every layer).
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr
from scipy.spatial.distance import cdist

OPENING = "The baker wakes before dawn, mixes flour, water, salt and yeast, and leaves the dough to rise"
N_GROUPS, N_TOKENS, KL_K = 24, 1024, 5


def brute_kl(X, Y, k=KL_K) -> float:
    """KL(P‖Q) by the k-NN estimator of Wang, Kulkarni and Verdú, with scipy's float64 distances."""
    n, dim = X.shape
    within = cdist(X, X)
    np.fill_diagonal(within, np.inf)
    rho = np.sort(within, axis=1)[:, k - 1]
    nu = np.sort(cdist(X, Y), axis=1)[:, k - 1]
    return float(dim * np.mean(np.log(nu / rho)) + np.log(len(Y) / (n - 1)))


def read_text(path) -> str:
    """A corpus file as text: UTF-8, or Latin-1 (one of the addresses is stored so)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def distinct(rows: np.ndarray) -> list:
    """The distinct rows of a (token, dim) array, as tuples in first-seen order (0.0 == -0.0)."""
    seen = {}
    for row in rows + 0.0:
        seen.setdefault(tuple(row.tolist()), None)
    return list(seen)


@pytest.fixture(scope="module")
def long_store(tmp_path_factory, tiny_model_long, make_tiny_texts, write_jsonl, run_repgeo):
    """24 prompts of exactly 1024 tokens, each its own group, all opening with the same words (after <s>)."""
    work = tmp_path_factory.mktemp("groups")
    texts = [OPENING + " " + t for t in make_tiny_texts(N_GROUPS, seed=3, min_words=900, max_words=1000)]
    prompts = write_jsonl(work / "long.jsonl", [{"text": t, "doc": f"d{i:02d}"} for i, t in enumerate(texts)])
    store = work / "long.zarr"
    code, _, err = run_repgeo("extract", "--model", tiny_model_long, "--prompts", prompts, "--out", store,
                              "--max-tokens", N_TOKENS, "--min-tokens", N_TOKENS, "--dtype", "float32")
    assert code == 0, err
    return store


def test_dozens_of_groups_of_long_prompts_with_shared_openings(long_store, tmp_path, run_repgeo):
    results = tmp_path / "groups.zarr"
    code, _, err = run_repgeo("summarize", "--store", long_store, "--out", results, "--workers", 2,
                              "--observables", "norm,group_anisotropy,group_kl", "--groupby", "doc",
                              "--reference", "d00", "--group-size", 2000, timeout=900)
    assert code == 0, err
    ds = xr.open_zarr(results)
    assert ds.sizes["group"] == N_GROUPS and bool(ds.done.all())
    hidden = zarr.open_group(str(long_store), mode="r")["hidden"]
    kl, shared = ds.group_kl.values, ds.group_n_shared.values
    others = np.arange(1, N_GROUPS)
    # Every pool shares its <s> and opening vectors with the reference at every layer, yet KL is finite past the
    # embeddings (where the tiny vocabulary leaves too few unshared vectors: NaN, checked below).
    assert np.isfinite(kl[others, 1:]).all() and (shared[others] > 0).all()
    assert (kl[0] == 0).all() and (shared[0] == -1).all()
    for layer in (0, 2, hidden.shape[1] - 1):
        ref_rows = distinct(hidden[0, layer].astype(np.float64))
        for g in (1, 7, N_GROUPS - 1):
            rows = distinct(hidden[g, layer].astype(np.float64))
            common = set(rows) & set(ref_rows)
            assert shared[g, layer] == len(common)
            own = np.array([r for r in rows if r not in common])
            ref = np.array([r for r in ref_rows if r not in common])
            if len(own) > KL_K and len(ref) >= KL_K:
                assert kl[g, layer] == pytest.approx(brute_kl(own, ref), rel=1e-8, abs=1e-8)
            else:
                assert np.isnan(kl[g, layer])


def test_skip_tokens_leaves_the_first_positions_out_of_every_cloud(long_store, tmp_path, run_repgeo):
    results = tmp_path / "skip.zarr"
    code, _, err = run_repgeo("summarize", "--store", long_store, "--out", results, "--workers", 1,
                              "--observables", "norm,overlap", "--skip-tokens", 3, "--save-knn", "--overlap-k", 4)
    assert code == 0, err
    ds = xr.open_zarr(results)
    assert ds.attrs["parameters"]["skip_tokens"] == 3
    hidden = zarr.open_group(str(long_store), mode="r")["hidden"]
    for p, layer in ((0, 0), (5, 3)):
        X = hidden[p, layer].astype(np.float64)
        assert float(ds.norm_mean[p, layer]) == pytest.approx(np.linalg.norm(X[3:], axis=1).mean(), rel=1e-12)
        knn = ds.knn_index[p, layer].values
        assert (knn[:3] == -1).all()  # skipped positions have no neighbours and are nobody's neighbour
        D = cdist(X[3:], X[3:])
        np.fill_diagonal(D, np.inf)
        expected = np.argsort(D, axis=1, kind="stable")[:, :4] + 3
        assert np.array_equal(knn[3:], expected)


def test_skip_tokens_that_leave_no_cloud_are_refused(long_store, tmp_path, run_repgeo, the_error_line):
    code, _, err = run_repgeo("summarize", "--store", long_store, "--out", tmp_path / "r.zarr",
                              "--skip-tokens", N_TOKENS - 1)
    assert code == 2 and "--skip-tokens" in the_error_line(err)
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.slow
def test_twenty_groups_of_real_1024_token_prompts(tmp_path, smollm2_hf, write_jsonl, run_repgeo):
    """The real model on 20 inaugural addresses, each its own group (the case that crashed the scheduler)."""
    from pathlib import Path

    corpus = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora" / "inaugural"
    files = sorted(sorted(corpus.glob("*.txt"), key=lambda f: f.stat().st_size)[-20:])  # all > 1024 tokens
    assert len(files) == 20, f"the inaugural corpus is missing at {corpus}"
    prompts = write_jsonl(tmp_path / "inaugural.jsonl", [{"text": read_text(f), "speech": f.stem} for f in files])
    store, results = tmp_path / "inaugural.zarr", tmp_path / "results.zarr"
    code, _, err = run_repgeo("extract", "--model", smollm2_hf, "--prompts", prompts, "--out", store,
                              "--max-tokens", N_TOKENS, "--min-tokens", N_TOKENS, timeout=1200)
    assert code == 0, err
    code, _, err = run_repgeo("summarize", "--store", store, "--out", results, "--workers", 2,
                              "--observables", "norm,group_anisotropy,group_kl", "--groupby", "speech",
                              "--reference", files[0].stem, timeout=1200)
    assert code == 0, err
    ds = xr.open_zarr(results)
    assert ds.sizes["group"] == 20 and ds.sizes["prompt"] == 20
    assert np.isfinite(ds.group_anisotropy.values).all()
    assert np.isfinite(ds.group_kl.values[1:, 1:]).all()  # beyond layer 0, whose pools share token embeddings


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-6), ("float16", 1e-3)])
def test_saved_distances_equal_a_float64_brute_force(dtype, rtol, many_prompts, tmp_path, run_repgeo):
    results = tmp_path / "distances.zarr"
    code, _, err = run_repgeo("summarize", "--store", many_prompts.store_1rank, "--out", results, "--workers", 2,
                              "--observables", "norm", "--save-distances", "--distance-dtype", dtype)
    assert code == 0 and "distance matrices take up to" in err, err
    ds = xr.open_zarr(results)
    assert ds.distances.dtype == dtype and ds.distances.dims == ("prompt", "layer", "token", "token_b")
    hidden = zarr.open_group(str(many_prompts.store_1rank), mode="r")["hidden"]
    for p, layer in ((0, 0), (17, 2), (119, 4)):
        n = int(ds.n_tokens[p])
        X = hidden[p, layer, :n].astype(np.float64)
        saved = ds.distances.values[p, layer]
        np.testing.assert_allclose(saved[:n, :n].astype(np.float64), cdist(X, X), rtol=rtol, atol=rtol * 1e-2)
        assert np.isnan(saved[n:]).all() and np.isnan(saved[:, n:]).all()
