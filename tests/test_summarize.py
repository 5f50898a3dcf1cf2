"""``repgeo summarize`` on a synthetic activation store of Gaussian clouds (fast, no model).

Every number is checked against a reference that does not use the toolkit: hidden states read straight from
the store with zarr, float64 brute force (neighbours by difference vectors and a stable sort, set intersections,
SVD), dadapy 0.3.4 (GRIDE, TwoNN), and closed-form Gaussian KL. The reference functions here are shared with
``test_summarize_model.py``, which runs the same checks on the real SmolLM2 model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import zarr
from dadapy import Data
from scipy.spatial.distance import cdist

import toolkit
from toolkit.extract.plan import Plan, PlannedPrompt
from toolkit.store.activations import PromptWriter, create_activation_store

# ------------------------------------------------------------------------------------------------------------
# References, independent of the toolkit (shared with test_summarize_model.py)

#: Arrays of an activation store on ``prompt`` that are not labels.
NOT_LABELS = {"n_tokens", "loss", "done", "prompt", "text", "text_sha256"}


def store_labels(store) -> dict:
    """Label name → values over prompts: every 1-D ``prompt`` array of the activation store but the layout's."""
    group = zarr.open_group(str(store), mode="r")
    return {name: array[:] for name, array in group.arrays()
            if list(array.metadata.dimension_names or []) == ["prompt"] and name not in NOT_LABELS}


def prompt_clouds(store, prompt: int) -> np.ndarray:
    """(layer, token, dim) float64 hidden states of the prompt's n_tokens positions, read with zarr."""
    group = zarr.open_group(str(store), mode="r")
    n = int(group["n_tokens"][prompt])
    return group["hidden"][prompt, :, :n].astype(np.float64)


def distinct_rows(X) -> np.ndarray:
    """X without exact duplicate rows, first occurrences kept in their order."""
    _, first = np.unique(X, axis=0, return_index=True)
    return X[np.sort(first)]


def brute_distances(X, Y=None) -> np.ndarray:
    """(len(X), len(Y)) float64 Euclidean distances, each from its difference vector (scipy's cdist), so that
    copies of a point are exactly equally far from any other point."""
    return cdist(X, X if Y is None else Y)


def brute_neighbors(X, k: int):
    """(indices, distances), each (token, k): nearest first, self excluded, ties to the lower index."""
    D = brute_distances(X)
    np.fill_diagonal(D, np.inf)
    indices = np.argsort(D, axis=1, kind="stable")[:, :k]
    return indices, np.take_along_axis(D, indices, axis=1)


def brute_overlaps(a, b, ks) -> list:
    """For each k: mean over points of |first k of a ∩ first k of b| / k, by Python sets."""
    a, b = a.tolist(), b.tolist()
    return [sum(len(set(x[:k]) & set(y[:k])) for x, y in zip(a, b)) / (k * len(a)) for k in ks]


def svd_anisotropy(X) -> float:
    """σ1² / Σσi² from the singular values of the centred cloud."""
    s = np.linalg.svd(X - X.mean(axis=0), compute_uv=False)
    return float(s[0] ** 2 / np.square(s).sum())


def brute_cosine_stats(X):
    """(mean, std) of the cosine similarity over all ordered pairs i != j."""
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    cosines = (U @ U.T)[~np.eye(len(X), dtype=bool)]
    return cosines.mean(), cosines.std()


def brute_nn_statistics(Xu):
    """(reciprocity, mean cosine between the vectors to the 1st and 2nd nearest neighbour) of distinct points."""
    nn, _ = brute_neighbors(Xu, 2)
    reciprocity = np.mean(nn[nn[:, 0], 0] == np.arange(len(Xu)))
    first, second = Xu[nn[:, 0]] - Xu, Xu[nn[:, 1]] - Xu
    cosines = (first * second).sum(axis=1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))
    return reciprocity, cosines.mean()


def brute_knn_kl(X, Y, k: int) -> float:
    """Wang-Kulkarni-Verdú k-NN estimate of KL(P || Q) from X ~ P, Y ~ Q (nan where a distance is 0)."""
    n, dim = X.shape
    within = brute_distances(X)
    np.fill_diagonal(within, np.inf)
    rho = np.sort(within, axis=1)[:, k - 1]
    nu = np.sort(brute_distances(X, Y), axis=1)[:, k - 1]
    if (rho == 0).any() or (nu == 0).any():
        return float("nan")
    return float(dim * np.mean(np.log(nu / rho)) + np.log(len(Y) / (n - 1)))


def is_power_of_two_up_to_256(n: int) -> bool:
    return n <= 256 and n & (n - 1) == 0


def dadapy_ids(Xu):
    """dadapy's GRIDE curve (ids, errs, scales at n2 = 2, 4, …) with maxk=min(300, n-1), range_max=256, and
    its TwoNN id (compute_id_2NN(), which uses the first two neighbours only).

    dadapy 0.3.4 fails when n is a power of two <= 256 (it asks for an n-th neighbour among n - 1 others);
    there range_max = n - 1 gives the scales the toolkit documents (up to n2 = n / 2).
    """
    n = len(Xu)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = Data(coordinates=Xu, maxk=min(300, n - 1))
        gride = data.return_id_scaling_gride(range_max=n - 1 if is_power_of_two_up_to_256(n) else 256)
        return gride, data.compute_id_2NN()[0]


def dadapy_overlap(Xa, Xb, k: int) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Data(coordinates=Xa).return_data_overlap(coordinates=Xb, k=k)


def results_arrays(results) -> dict:
    group = zarr.open_group(str(results), mode="r")
    return {name: array[...] for name, array in group.arrays()}


def assert_gride(r, prefix: str, row: tuple, gride, n2):
    """GRIDE variables at ``row`` equal dadapy's (ids, errs, scales) at its scales and are NaN at the larger ones."""
    ids, errs, scales = gride
    m = len(ids)
    np.testing.assert_array_equal(n2[:m], 2 ** np.arange(1, m + 1))
    for name, ref in (("id", ids), ("err", errs), ("scale", scales)):
        got = r[f"{prefix}_{name}"][row]
        np.testing.assert_allclose(got[:m], ref, rtol=1e-6, err_msg=f"{prefix}_{name}{row}")
        assert np.isnan(got[m:]).all(), f"{prefix}_{name}{row} beyond n2={n2[m - 1]}"


def assert_prompt_observables(store, results, prompts, knn: bool = False, dadapy_overlap_every: int = 0) -> dict:
    """Every per-(prompt, layer) variable of the results equals its reference, for the given prompts.

    Overlap is also compared with dadapy's at layers 1, 1 + every, 1 + 2 every, … (0: never) where neither
    layer has duplicates (dadapy breaks ties its own way).

    Returns counts of the special cases met (clouds with duplicates, n_unique a power of two, layer pairs that
    dadapy's overlap could be compared on), so callers can make sure their data exercised them.
    """
    r = results_arrays(results)
    source = zarr.open_group(str(store), mode="r")
    np.testing.assert_array_equal(r["loss"], source["loss"][:])
    assert r["done"].all()
    n2, ks = r["n2"], r["k"]
    met = {"duplicates": 0, "power_of_two": 0, "dadapy_overlap": 0}
    for p in prompts:
        clouds = prompt_clouds(store, p)
        n_layers, n, _ = clouds.shape
        k_max = min(len(ks), n - 1)
        neighbors = [brute_neighbors(X, k_max) for X in clouds]
        distinct = [distinct_rows(X) for X in clouds]
        for layer, (X, Xu) in enumerate(zip(clouds, distinct)):
            at = (p, layer)
            met["duplicates"] += len(Xu) < n
            met["power_of_two"] += is_power_of_two_up_to_256(len(Xu))
            assert r["n_unique"][at] == len(Xu), at
            gride, twonn = dadapy_ids(Xu)
            assert_gride(r, "gride", at, gride, n2)
            np.testing.assert_allclose(r["twonn_id"][at], twonn, rtol=1e-6, err_msg=str(at))
            if layer + 1 < n_layers:
                ref = brute_overlaps(neighbors[layer][0], neighbors[layer + 1][0], ks[:k_max])
                np.testing.assert_allclose(r["overlap"][at][:k_max], ref, rtol=1e-12, err_msg=f"overlap{at}")
                without_duplicates = len(Xu) == n == len(distinct[layer + 1])
                if dadapy_overlap_every and layer % dadapy_overlap_every == 1 and without_duplicates:
                    met["dadapy_overlap"] += 1
                    for k in (5, k_max):
                        reference = dadapy_overlap(X, clouds[layer + 1], k)
                        assert r["overlap"][at][k - 1] == pytest.approx(reference, rel=1e-12), (at, k)
            assert np.isnan(r["overlap"][at][k_max if layer + 1 < n_layers else 0:]).all()
            np.testing.assert_allclose((r["cosine_mean"][at], r["cosine_std"][at]), brute_cosine_stats(X),
                                       rtol=1e-9, err_msg=f"cosine{at}")
            assert abs(r["anisotropy"][at] - svd_anisotropy(X)) < 1e-4, at
            np.testing.assert_allclose((r["nn_reciprocity"][at], r["nn_cosine"][at]), brute_nn_statistics(Xu),
                                       rtol=1e-9, err_msg=f"nn statistics{at}")
            np.testing.assert_allclose(r["norm_mean"][at], np.linalg.norm(X, axis=1).mean(), rtol=1e-12)
            if knn:
                indices, distances = neighbors[layer]
                np.testing.assert_array_equal(r["knn_index"][at][:n, :k_max], indices, err_msg=f"knn{at}")
                np.testing.assert_allclose(r["knn_distance"][at][:n, :k_max], distances, rtol=1e-12)
                assert (r["knn_index"][at][n:] == -1).all() and (r["knn_index"][at][:, k_max:] == -1).all()
                assert np.isnan(r["knn_distance"][at][n:]).all()
    return met


def pool_pairs(store, label: str, value: str, group_index: int, group_size: int, seed: int) -> list:
    """The documented pooling rule: the (prompt, token) pairs of the group's done prompts, prompts and tokens in
    order; more than group_size are subsampled (kept in order) by
    ``np.random.default_rng([seed, group_index]).choice(len(pairs), group_size, replace=False)``, where
    group_index is the group's position on the results' ``group`` coordinate."""
    source = zarr.open_group(str(store), mode="r")
    labels, n_tokens, done = source[label][:], source["n_tokens"][:], source["done"][:]
    pairs = [(p, t) for p in range(len(labels)) if str(labels[p]) == value and done[p] for t in range(n_tokens[p])]
    if len(pairs) > group_size:
        chosen = np.random.default_rng([seed, group_index]).choice(len(pairs), group_size, replace=False)
        pairs = [pairs[i] for i in np.sort(chosen)]
    return pairs


def pooled_cloud(store, pairs, layer: int) -> np.ndarray:
    """(pair, dim) float64 hidden states of the pairs at one layer."""
    hidden = zarr.open_group(str(store), mode="r")["hidden"]
    prompts = sorted({p for p, _ in pairs})
    slabs = {p: hidden[p, layer].astype(np.float64) for p in prompts}
    return np.stack([slabs[p][t] for p, t in pairs])


def assert_group_observables(store, results, label: str, reference: str, group_size: int, seed: int = 0,
                             kl_k: int = 5) -> dict:
    """group_gride (dadapy), group_anisotropy (SVD) and group_kl (brute force) on the pools of the documented
    rule, at every layer. Returns group → pooled cloud at every layer, for further checks."""
    r = results_arrays(results)
    groups = [str(g) for g in r["group"]]
    assert groups == sorted({str(v) for v in store_labels(store)[label]})
    n_layers = len(r["layer"])
    pools = {g: [pooled_cloud(store, pool_pairs(store, label, g, i, group_size, seed), layer)
                 for layer in range(n_layers)] for i, g in enumerate(groups)}
    for i, g in enumerate(groups):
        for layer in range(n_layers):
            X = pools[g][layer]
            Xu = distinct_rows(X)
            assert_gride(r, "group_gride", (i, layer), dadapy_ids(Xu)[0], r["n2"])
            assert abs(r["group_anisotropy"][i, layer] - svd_anisotropy(X)) < 1e-4, (g, layer)
            if g == reference:
                assert r["group_kl"][i, layer] == 0
            else:  # vectors both pools hold are left out of both (counted in group_n_shared)
                Yu = distinct_rows(pools[reference][layer])
                shared = {tuple(row) for row in Xu + 0.0} & {tuple(row) for row in Yu + 0.0}
                own = np.array([row for row in Xu if tuple(row + 0.0) not in shared]).reshape(-1, Xu.shape[1])
                other = np.array([row for row in Yu if tuple(row + 0.0) not in shared]).reshape(-1, Yu.shape[1])
                assert r["group_n_shared"][i, layer] == len(shared), (g, layer)
                ref = brute_knn_kl(own, other, kl_k) if len(own) > kl_k and len(other) >= kl_k else np.nan
                np.testing.assert_allclose(r["group_kl"][i, layer], ref, rtol=1e-10, equal_nan=True,
                                           err_msg=f"group_kl {g} layer {layer}")
    return pools


def assert_results_layout(results, store, run_repgeo, by: str, parameters: dict):
    """Plain xarray (no toolkit) reads the results; open_results groups by the label ``by``; provenance (the
    recorded parameters include ``parameters``); validate; info."""
    script = ("import json, sys, xarray as xr\n"
              "ds = xr.open_zarr(sys.argv[1])\n"
              "print(json.dumps({'sizes': dict(ds.sizes),"
              " 'toolkit': any(m.startswith('toolkit') for m in sys.modules),"
              " 'dims': {n: list(ds[n].dims) for n in ds.variables},"
              " 'coords': {n: ds[n].values.tolist() for n in ds.coords if ds[n].dims == ('prompt',)}}))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(results)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    plain = json.loads(proc.stdout)
    assert not plain["toolkit"]
    source = zarr.open_group(str(store), mode="r")
    n_prompts, n_layers = source["hidden"].shape[:2]
    assert {d: plain["sizes"][d] for d in ("prompt", "layer", "n2", "k")} == {
        "prompt": n_prompts, "layer": n_layers, "n2": 8, "k": 32}
    assert plain["dims"]["gride_id"] == ["prompt", "layer", "n2"]
    assert plain["dims"]["overlap"] == ["prompt", "layer", "k"] and plain["dims"]["twonn_id"] == ["prompt", "layer"]
    labels = store_labels(store)
    assert labels
    for name, values in dict(labels, n_tokens=source["n_tokens"][:]).items():
        assert plain["coords"][name] == values.tolist(), name

    ds = toolkit.open_results(str(results))
    by_label = ds.gride_id.sel(n2=32).groupby(by).mean("prompt")
    values = ds.gride_id.sel(n2=32).values
    for value in np.unique(labels[by].astype(str)):
        expected = values[labels[by].astype(str) == value].mean(axis=0)
        np.testing.assert_allclose(by_label.sel({by: value}).values, expected, rtol=1e-12)

    attrs = dict(zarr.open_group(str(results), mode="r").attrs)
    store_attrs = dict(source.attrs)
    assert attrs["toolkit_version"] == toolkit.__version__
    assert attrs["source_attributes"] == store_attrs
    assert attrs["source"] == {
        "path": os.path.abspath(store), "created": store_attrs["created"], "model": store_attrs["model"]["id"],
        "weights_sha256": store_attrs["model"]["weights_sha256"], "prompts_sha256": store_attrs["prompts"]["sha256"],
        "settings": store_attrs["settings"], "dtype": store_attrs["dtype"], "n_prompts": n_prompts}
    assert {name: attrs["parameters"][name] for name in parameters} == parameters

    code, out, err = run_repgeo("validate", results)
    assert (code, out.strip()) == (0, f"{results}: valid"), out + err
    code, out, err = run_repgeo("info", results)
    assert code == 0, err
    variables = next(line for line in out.splitlines() if line.strip().startswith("variables")).split(None, 1)[1]
    per_prompt = {"bpc"} & set(plain["dims"])  # bpc is on prompt alone
    assert set(variables.split(", ")) == {name for name, dims in plain["dims"].items() if "layer" in dims} - {
        "layer"} | per_prompt
    assert f"complete   {n_prompts}/{n_prompts} prompts done" in out and "groups done" in out


# ------------------------------------------------------------------------------------------------------------
# The synthetic store: per family, each layer holds isotropic Gaussian clouds N(mean, std^2 I) in R^2

DIM = 2
#: family → per layer (mean, std). P is the reference; KL(Q || P) and KL(R || P) are known in closed form.
FAMILIES = {
    "P": [((0.0, 0.0), 1.0), ((0.0, 0.0), 1.0), ((0.0, 0.0), 1.0)],
    "Q": [((1.0, 0.0), 1.0), ((0.0, 0.0), 0.6), ((0.0, 0.0), 1.0)],
    "R": [((0.0, 0.0), 1.0), ((0.5, 0.0), 1.0), ((1.0, 0.0), 0.7)],
}
PER_FAMILY = 4
N_PROMPTS = PER_FAMILY * len(FAMILIES)
N_LAYERS = 3
GROUP_SIZE = 1000  # of ~2100-2600 pooled tokens per family: every pool is subsampled
ALL_PROMPT_OBSERVABLES = ["gride", "twonn", "overlap", "cosine", "anisotropy", "reciprocity", "norm", "bpc"]


def family_of(prompt: int) -> str:
    return list(FAMILIES)[prompt // PER_FAMILY]


def gaussian_prompt(prompt: int):
    """(hidden (layer, token, dim) float32, token_loss (token,)) of one prompt, from its own seed."""
    rng = np.random.default_rng([7, prompt])
    n = 500 + 23 * prompt
    hidden = np.stack([np.asarray(mean) + std * rng.standard_normal((n, DIM))
                       for mean, std in FAMILIES[family_of(prompt)]])
    hidden[:, 1] = hidden[:, 0]  # an exact duplicate token, as repeated tokens are at layer 0 of a model
    return hidden.astype(np.float32), np.r_[np.nan, rng.random(n - 1)].astype(np.float32)


def write_gaussian_store(path, prompts=range(N_PROMPTS)):
    """An activation store of the Gaussian prompts, with only ``prompts`` written (and done)."""
    plan = Plan([PlannedPrompt(np.arange(len(gaussian_prompt(p)[1]), dtype=np.int32) % 97, f"prompt {p}",
                               {"family": family_of(p), "index": p}) for p in range(N_PROMPTS)],
                n_input=N_PROMPTS, n_dropped_short=0, n_truncated=0)
    # every attribute the activation store's schema requires (summarize refuses a store that lacks one)
    attrs = {"toolkit_version": toolkit.__version__, "created": "2026-01-01T00:00:00+00:00", "dtype": "float32",
             "model": {"id": "gaussian-clouds", "architecture": "none", "weights_sha256": None,
                       "n_layers": N_LAYERS - 1, "d_model": DIM},
             "tokenizer_fingerprint": "0" * 64, "ranks": 1, "runs": [],
             "prompts": {"path": "synthetic", "sha256": "0" * 64, "n_input": N_PROMPTS, "n_dropped_short": 0,
                         "n_truncated": 0, "n_stored": N_PROMPTS},
             "settings": {"max_tokens": None, "min_tokens": None, "batch_size": 1, "shuffle_levels": [], "seed": 0,
                          "compute_dtype": "float32", "add_special_tokens": True, "withhold_texts": False}}
    group = create_activation_store(str(path), plan, n_layers=N_LAYERS, d_model=DIM, dtype="float32", attrs=attrs,
                                    withhold_texts=False)
    add_gaussian_prompts(path, prompts)
    return group


def add_gaussian_prompts(path, prompts):
    writer = PromptWriter(zarr.open_group(str(path), mode="r+"))
    for p in prompts:
        writer.write(p, *gaussian_prompt(p))


def summarize_args(store, out, *extra) -> list:
    return ["summarize", "--store", store, "--out", out, "--workers", 2, "--groupby", "family", "--reference", "P",
            "--group-size", GROUP_SIZE, *extra]


@pytest.fixture(scope="module")
def gaussian_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("gaussian") / "store.zarr"
    write_gaussian_store(path)
    return path


@pytest.fixture(scope="module")
def gaussian_results(gaussian_store, run_repgeo):
    """The uninterrupted summarize run of the Gaussian store (every observable, groups by family)."""
    out = gaussian_store.parent / "results.zarr"
    code, _, err = run_repgeo(*summarize_args(gaussian_store, out))
    assert code == 0, err
    return out


# ------------------------------------------------------------------------------------------------------------
# Values


def test_prompt_observables_match_references(gaussian_store, gaussian_results):
    met = assert_prompt_observables(gaussian_store, gaussian_results, prompts=[0, 5, 11])
    assert met["duplicates"] == 3 * N_LAYERS  # the duplicated token: ties at distance 0 and in every distance


def test_group_observables_follow_the_pooling_rule(gaussian_store, gaussian_results):
    pools = assert_group_observables(gaussian_store, gaussian_results, "family", "P", GROUP_SIZE)
    assert all(len(cloud) == GROUP_SIZE for clouds in pools.values() for cloud in clouds)
    # The checks above can tell pools apart: the same family drawn with another group index differs.
    other = pooled_cloud(gaussian_store, pool_pairs(gaussian_store, "family", "Q", 2, GROUP_SIZE, 0), 0)
    ours = results_arrays(gaussian_results)["group_anisotropy"][1, 0]
    assert abs(svd_anisotropy(other) - ours) > 1e-4


def closed_form_kl(p, q) -> float:
    """KL(N(mean_p, std_p^2 I) || N(mean_q, std_q^2 I)) in R^DIM."""
    (mean_p, std_p), (mean_q, std_q) = p, q
    shift = np.subtract(mean_q, mean_p)
    return 0.5 * (DIM * std_p**2 / std_q**2 + shift @ shift / std_q**2 - DIM + 2 * DIM * np.log(std_q / std_p))


def test_group_kl_estimates_the_known_divergence(gaussian_results):
    r = results_arrays(gaussian_results)
    assert list(r["group"]) == list(FAMILIES)
    for i, family in enumerate(FAMILIES):
        for layer in range(N_LAYERS):
            truth = closed_form_kl(FAMILIES[family][layer], FAMILIES["P"][layer])
            assert abs(r["group_kl"][i, layer] - truth) < 0.1, (family, layer, r["group_kl"][i, layer], truth)


def test_observables_option_keeps_only_those_variables(gaussian_store, gaussian_results, run_repgeo, tmp_path):
    out = tmp_path / "some.zarr"
    code, _, err = run_repgeo("summarize", "--store", gaussian_store, "--out", out, "--workers", 1,
                              "--observables", "gride,overlap")
    assert code == 0, err
    some, full = results_arrays(out), results_arrays(gaussian_results)
    variables = {"gride_id", "gride_err", "gride_scale", "n_unique", "overlap"}
    assert set(some) == variables | {"loss", "done", "prompt", "layer", "n2", "k", "n_tokens", "family", "index"}
    for name in variables:
        np.testing.assert_array_equal(some[name], full[name], err_msg=name)
    assert zarr.open_group(str(out)).attrs["parameters"]["observables"] == ["gride", "overlap"]


def test_results_store_layout(gaussian_store, gaussian_results, run_repgeo):
    assert_results_layout(gaussian_results, gaussian_store, run_repgeo, "family", {
        "observables": ALL_PROMPT_OBSERVABLES + ["group_gride", "group_anisotropy", "group_kl"],
        "groupby": "family", "reference": "P", "group_size": GROUP_SIZE, "seed": 0, "overlap_k": 32,
        "save_knn": False})


# ------------------------------------------------------------------------------------------------------------
# Resume


def _done(path):
    try:
        return zarr.open_group(str(path), mode="r")["done"][:]
    except Exception:  # not created yet (it appears by a rename once complete)
        return None


def test_kill_and_resume_equals_uninterrupted_run(gaussian_store, gaussian_results, run_repgeo, same_store,
                                                  tmp_path):
    out = tmp_path / "killed.zarr"
    argv = [sys.executable, "-m", "toolkit.cli", *map(str, summarize_args(gaussian_store, out))]
    # Its own session: SIGKILL to the group ends the client and the worker processes at once, as a lost node.
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while (done := _done(out)) is None or not done.any():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before it could be killed"
        assert time.monotonic() < deadline, "no prompt done within 120 s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    done = _done(out)
    assert 0 < done.sum() < N_PROMPTS, f"the kill landed after {done.sum()} of {N_PROMPTS} prompts"
    assert not zarr.open_group(str(out)).attrs.get("groups_done")

    code, _, err = run_repgeo(*summarize_args(gaussian_store, out, "--resume"))
    assert code == 0, err
    assert f"{N_PROMPTS - done.sum()} prompts to do, {done.sum()} done before" in err
    same_store(out, gaussian_results)


def test_resume_after_the_store_is_complete(gaussian_results, run_repgeo, same_store, tmp_path):
    """A partial activation store (extraction still running) is summarized, completed, then resumed."""
    store, out = tmp_path / "partial.zarr", tmp_path / "results.zarr"
    late = [1, 4, 5, 6, 7]  # all of family Q, and one of P, the reference
    write_gaussian_store(store, prompts=[p for p in range(N_PROMPTS) if p not in late])
    code, _, err = run_repgeo(*summarize_args(store, out))
    assert code == 0, err
    r = results_arrays(out)
    np.testing.assert_array_equal(np.flatnonzero(~r["done"]), late)
    assert np.isnan(r["gride_id"][late]).all() and np.isnan(r["group_kl"]).all()
    code, info, _ = run_repgeo("info", out)
    assert "groups not done" in info

    add_gaussian_prompts(store, late)
    code, _, err = run_repgeo(*summarize_args(store, out, "--resume"))
    assert code == 0, err
    same_store(out, gaussian_results)  # loss and group pools included


@pytest.mark.parametrize("change", [[], ["--resume", "--overlap-k", "8"], ["--resume", "--seed", "1"],
                                    ["--resume", "--observables", "gride"]],
                         ids=["no-resume", "overlap-k", "seed", "observables"])
def test_existing_results_are_never_touched_without_a_matching_resume(
        change, gaussian_store, gaussian_results, run_repgeo, tree_snapshot, the_error_line, tmp_path):
    out = tmp_path / "results.zarr"
    shutil.copytree(gaussian_results, out)
    before = tree_snapshot(out)
    code, stdout, err = run_repgeo(*summarize_args(gaussian_store, out, *change))
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1
    assert str(out) in the_error_line(err) and ("--resume" in err)
    assert tree_snapshot(out) == before


# ------------------------------------------------------------------------------------------------------------
# Bad input


BAD_INPUTS = {
    "plain-directory": (lambda s, r, d: ["--store", d], "is not a Zarr v3 store"),
    "missing-store": (lambda s, r, d: ["--store", d / "nothing.zarr"], "does not exist"),
    "results-as-store": (lambda s, r, d: ["--store", r], "is a repgeo results store"),
    "unknown-observable": (lambda s, r, d: ["--store", s, "--observables", "gride,curvature"],
                           "unknown observable 'curvature'"),
    "unknown-groupby": (lambda s, r, d: ["--store", s, "--groupby", "colour"], "unknown label 'colour'"),
    "groupby-not-a-label": (lambda s, r, d: ["--store", s, "--groupby", "hidden"], "unknown label 'hidden'"),
    "reference-not-a-group": (lambda s, r, d: ["--store", s, "--groupby", "family", "--reference", "S"],
                              "--reference 'S' is not a value of label family"),
    "group-observable-without-groupby": (lambda s, r, d: ["--store", s, "--observables", "gride,group_kl"],
                                         "group observables need --groupby"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_in_one_line(case, gaussian_store, gaussian_results, run_repgeo, the_error_line,
                                          tmp_path):
    args, message = BAD_INPUTS[case]
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out.zarr"
    code, stdout, err = run_repgeo("summarize", *args(gaussian_store, gaussian_results, empty), "--out", out,
                                   "--workers", 1)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1, err
    assert message in the_error_line(err)
    assert not out.exists() and not (tmp_path / "out.zarr.partial").exists()
