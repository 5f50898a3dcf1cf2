"""``repgeo lens`` against a direct float64 computation with the loaded transformers model.

References: ``model.model.norm``, ``model.lm_head`` and ``model.get_input_embeddings()`` in float64 on the stored
hidden states (top-k ids and scores, entropy, KL to the final layer, next-token log-probability and rank by a
full argsort), and the model's own next-token distribution at the last layer.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from conftest import build_atomically, CACHE, save_tiny_llama, train_tiny_tokenizer

TOP_K = 4
#: The lens runs here read a 262,144-row vocabulary: the whole file is in the full suite, not the quick subset.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def tiny_model_big_vocab():
    """The tiny Llama with a 262,144-row (Gemma-sized) vocabulary: the lens must block its (token × vocab) work."""
    def build(directory):
        save_tiny_llama(directory, train_tiny_tokenizer(), vocab_size=262_144)

    return str(build_atomically(CACHE / "tiny-llama-vocab262144-v1", build))


@pytest.fixture(scope="module")
def lens_case(tmp_path_factory, tiny_model_big_vocab, make_tiny_texts, write_jsonl, run_repgeo):
    """An activation store of 3 prompts (one longer than a 64-token block) and its lens store."""
    work = tmp_path_factory.mktemp("lens")
    texts = make_tiny_texts(3, seed=11, min_words=20, max_words=90)
    prompts = write_jsonl(work / "p.jsonl", [{"text": t, "topic": f"t{i}"} for i, t in enumerate(texts)])
    store, lens = work / "acts.zarr", work / "lens.zarr"
    code, _, err = run_repgeo("extract", "--model", tiny_model_big_vocab, "--prompts", prompts, "--out", store,
                              "--dtype", "float32")
    assert code == 0, err
    code, _, err = run_repgeo("lens", "--store", store, "--out", lens, "--top-k", TOP_K, "--workers", 2)
    assert code == 0, err
    return work, store, lens


def reference(model_dir, hidden, ids, final_layer):
    """Float64 readings of one prompt's (layer, token, dim) hidden states with the model's own modules."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        H = torch.from_numpy(hidden.astype(np.float64))
        normed = torch.stack([H[l] if l == final_layer else model.model.norm(H[l]) for l in range(len(H))])
        logp = torch.log_softmax(model.lm_head(normed), dim=-1)
        E = model.get_input_embeddings().weight
        E = E / E.norm(dim=-1, keepdim=True).clamp(min=1e-300)  # the padding row is zero: cosine 0 with it
        cos = (H / H.norm(dim=-1, keepdim=True)) @ E.T
        own = torch.log_softmax(model(torch.from_numpy(ids[None].astype(np.int64))).logits[0], dim=-1)
    return logp.numpy(), cos.numpy(), own.numpy()


def test_readings_equal_a_float64_computation_with_the_model(lens_case, tiny_model_big_vocab):
    _, store, lens = lens_case
    ds = xr.open_zarr(lens)
    acts = zarr.open_group(str(store), mode="r")
    assert ds.sizes["vocab_id"] == 262_144 and list(ds.decoder.values) == ["output", "input"]
    for p in (0, 2):
        n = int(acts["n_tokens"][p])
        hidden, ids = acts["hidden"][p, :, :n], acts["input_ids"][p, :n]
        final = hidden.shape[0] - 1
        logp, cos, own = reference(tiny_model_big_vocab, hidden, ids, final)
        top_ids = ds.lens_top_ids.values[:, p, :, :n]
        top_scores = ds.lens_top_scores.values[:, p, :, :n]
        # A random model's readings over 262,144 entries have near-ties that float32 may order either way: the
        # ids must carry the float64 top-k values, in order, and the scores must be theirs.
        for scores, ids_, tol in ((logp, top_ids[0], 1e-5), (cos, top_ids[1], 1e-6)):
            best = -np.sort(-np.partition(scores, -TOP_K, axis=-1)[..., -TOP_K:], axis=-1)
            np.testing.assert_allclose(np.take_along_axis(scores, ids_, -1), best, atol=tol)
        np.testing.assert_allclose(top_scores[0], np.exp(np.take_along_axis(logp, top_ids[0], -1)), rtol=2e-4,
                                   atol=1e-7)
        np.testing.assert_allclose(top_scores[1], np.take_along_axis(cos, top_ids[1], -1), atol=2e-5)
        p_ = np.exp(logp)
        np.testing.assert_allclose(ds.lens_entropy.values[p, :, :n], -(p_ * logp).sum(-1) / np.log(2), rtol=1e-4)
        kl = (np.exp(logp[final]) * (logp[final] - logp)).sum(-1)
        np.testing.assert_allclose(ds.lens_kl_final.values[p, :, :n], kl, rtol=1e-3, atol=2e-5)
        assert (ds.lens_kl_final.values[p, final, :n] == 0).all()
        # The last layer's reading is the model's own next-token distribution.
        np.testing.assert_allclose(logp[final], own, atol=1e-9)
        nxt = ids[1:]
        np.testing.assert_allclose(ds.lens_next_logprob.values[p, :, : n - 1],
                                   logp[:, np.arange(n - 1), nxt], rtol=1e-4, atol=1e-4)
        assert np.isnan(ds.lens_next_logprob.values[p, :, n - 1]).all()
        ranks = ds.lens_next_rank.values[p, :, :n]
        picked = logp[:, np.arange(n - 1), nxt][..., None]
        lowest, highest = (logp[:, : n - 1] > picked + 1e-5).sum(-1), (logp[:, : n - 1] > picked - 1e-5).sum(-1)
        assert ((lowest <= ranks[:, : n - 1]) & (ranks[:, : n - 1] <= highest)).all() and (ranks[:, n - 1] == -1).all()
        for j, k in enumerate(ds.k.values):
            np.testing.assert_allclose(ds.lens_next_accuracy.values[p, :, j], (ranks[:, : n - 1] < k).mean(-1))
        assert (top_ids[:, :, :, :] >= 0).all() and (ds.lens_top_ids.values[:, p, :, n:] == -1).all()


def test_the_store_is_self_contained_and_labeled(lens_case):
    _, store, lens = lens_case
    from toolkit.store.lens_results import open_lens

    ds = open_lens(lens)
    assert list(ds.topic.values) == ["t0", "t1", "t2"] and bool(ds.done.all())
    acts = zarr.open_group(str(store), mode="r")
    np.testing.assert_array_equal(ds.input_ids.values, acts["input_ids"][:])
    assert ds.attrs["parameters"]["layers"] == list(range(5)) and ds.attrs["source"]["n_prompts"] == 3
    assert not list(lens.glob(".repgeo-*"))  # the lens weights file is gone once the run is complete


def test_layers_and_decoders_select_what_is_read(lens_case, tmp_path, run_repgeo):
    _, store, lens = lens_case
    out = tmp_path / "sub.zarr"
    code, _, err = run_repgeo("lens", "--store", store, "--out", out, "--top-k", TOP_K, "--layers", "1,3:",
                              "--decoders", "output", "--workers", 1)
    assert code == 0, err
    sub, full = xr.open_zarr(out), xr.open_zarr(lens)
    assert list(sub.layer.values) == [1, 3, 4] and list(sub.decoder.values) == ["output"]
    np.testing.assert_array_equal(sub.lens_top_ids.values[0], full.lens_top_ids.sel(layer=[1, 3, 4]).values[0])
    np.testing.assert_array_equal(sub.lens_kl_final.values, full.lens_kl_final.sel(layer=[1, 3, 4]).values)


def test_mpi_ranks_give_the_same_store_as_one_local_worker(lens_case, tmp_path, run_repgeo, mpiexec):
    _, store, lens = lens_case
    out = tmp_path / "mpi.zarr"
    code, _, err = run_repgeo("lens", "--store", store, "--out", out, "--top-k", TOP_K, "--scheduler", "mpi",
                              mpi=4, timeout=600)
    assert code == 0, err
    a, b = xr.open_zarr(out), xr.open_zarr(lens)
    for name in ("lens_top_ids", "lens_top_scores", "lens_entropy", "lens_kl_final", "lens_next_rank",
                 "lens_next_logprob", "lens_next_accuracy", "vocab"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_resume_completes_and_refuses_other_parameters(lens_case, tmp_path, run_repgeo, the_error_line):
    _, store, lens = lens_case
    out = tmp_path / "resumed.zarr"
    shutil.copytree(lens, out)
    done = zarr.open_group(str(out), mode="r+")["done"]
    done[1] = False
    zarr.open_group(str(out), mode="r+")["lens_entropy"][1] = np.nan
    code, _, err = run_repgeo("lens", "--store", store, "--out", out, "--top-k", TOP_K, "--resume", "--workers", 1)
    assert code == 0 and "1 prompts to do" in err, err
    np.testing.assert_array_equal(xr.open_zarr(out).lens_entropy.values, xr.open_zarr(lens).lens_entropy.values)
    code, _, err = run_repgeo("lens", "--store", store, "--out", out, "--top-k", 3, "--resume")
    assert code == 2 and "other parameters" in the_error_line(err)


def test_a_moved_or_altered_model_is_refused(tmp_path, tiny_model, make_tiny_texts, write_jsonl, run_repgeo,
                                             the_error_line):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in make_tiny_texts(2, seed=2)])
    store = tmp_path / "acts.zarr"
    code, _, err = run_repgeo("extract", "--model", model, "--prompts", prompts, "--out", store)
    assert code == 0, err
    moved = tmp_path / "moved"
    model.rename(moved)
    code, _, err = run_repgeo("lens", "--store", store, "--out", tmp_path / "l1.zarr")
    assert code == 2 and "--model" in the_error_line(err) and str(model) in the_error_line(err)
    code, _, err = run_repgeo("lens", "--store", store, "--out", tmp_path / "l2.zarr", "--model", moved,
                              "--workers", 1)
    assert code == 0, err
    weights = next(moved.glob("*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    code, _, err = run_repgeo("lens", "--store", store, "--out", tmp_path / "l3.zarr", "--model", moved)
    line = the_error_line(err)
    assert code == 2 and "sha256" in line and "are not those" in line
    assert not (tmp_path / "l1.zarr").exists() and not (tmp_path / "l3.zarr").exists()


@pytest.mark.parametrize("args, words", [
    (["--decoders", "output,middle"], "unknown decoder 'middle'"),
    (["--layers", "9"], "layers are 0..4"),
    (["--top-k", "0"], "--top-k"),
])
def test_bad_input_is_one_line(args, words, lens_case, tmp_path, run_repgeo, the_error_line):
    _, store, _ = lens_case
    code, _, err = run_repgeo("lens", "--store", store, "--out", tmp_path / "x.zarr", *args)
    assert code == 2 and words in the_error_line(err)
    assert not (tmp_path / "x.zarr").exists()


def test_a_results_store_is_not_an_activation_store(lens_case, tmp_path, run_repgeo, the_error_line):
    _, _, lens = lens_case
    code, _, err = run_repgeo("lens", "--store", lens, "--out", tmp_path / "x.zarr")
    assert code == 2 and "activations store is needed" in the_error_line(err)
