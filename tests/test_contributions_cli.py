"""``repgeo extract --contributions`` through the CLI: the same prompt, rank-count, resume and bad-input guarantees
as the rest of the store, and ``repgeo summarize --observables contributions`` against scipy.stats."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import xarray as xr
import zarr
from scipy import stats

from test_extract_resume import _kill_mid_run

FLOW = ["--contributions", "--flow-targets", "0,5,9", "--flow-gradients"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, make_tiny_texts, write_jsonl):
    work = tmp_path_factory.mktemp("contributions")
    return work, write_jsonl(work / "p.jsonl", [{"text": t, "i": i} for i, t in
                                                enumerate(make_tiny_texts(40, seed=4, min_words=6, max_words=30))])


def extract_args(model, prompts, out, *extra) -> list:
    return ["extract", "--model", model, "--prompts", prompts, "--out", out, "--dtype", "float32", "--batch-size", 4,
            *FLOW, *extra]


@pytest.fixture(scope="module")
def reference(prompts, tiny_model, run_repgeo):
    work, path = prompts
    out = work / "one-rank.zarr"
    code, _, err = run_repgeo(*extract_args(tiny_model, path, out))
    assert code == 0, err
    return out


def test_store_holds_the_contribution_arrays(reference):
    ds = xr.open_zarr(reference)
    n_blocks, n_heads = ds.sizes["block"], ds.sizes["head"]
    assert (n_blocks, n_heads, ds.sizes["target"]) == (4, 4, 3)
    assert ds.head_norm.dims == ("prompt", "block", "head", "token")
    assert ds.flow.dims == ds.grad_norm.dims == ("prompt", "target", "layer", "token")
    n = ds.n_tokens.values
    targets = ds.flow_target.values
    for p in range(ds.sizes["prompt"]):
        expected = [t for t in (0, 5, 9) if t < n[p]]
        assert list(targets[p, : len(expected)]) == expected and (targets[p, len(expected):] == -1).all()
        flow = ds.flow.values[p, : len(expected), :, : n[p]]
        np.testing.assert_allclose(flow.sum(-1), 1, atol=1e-5)
        assert np.isnan(ds.flow.values[p, len(expected):]).all() and np.isnan(ds.flow.values[p, :, :, n[p]:]).all()
        assert np.isfinite(ds.head_norm.values[p, :, :, : n[p]]).all()
    attrs = zarr.open_group(str(reference), mode="r").attrs
    assert attrs["settings"]["contributions"] is True
    assert attrs["settings"]["flow"] == {"targets": [0, 5, 9], "weighting": "mean", "gradients": True}


def test_one_rank_and_two_ranks_write_the_same_store(prompts, reference, tiny_model, run_repgeo, same_store):
    work, path = prompts
    out = work / "two-ranks.zarr"
    code, _, err = run_repgeo(*extract_args(tiny_model, path, out), mpi=2)
    assert code == 0, err
    same_store(reference, out)


def test_kill_and_resume_equal_a_clean_run(prompts, reference, tiny_model, start_repgeo, run_repgeo, same_store):
    work, path = prompts
    out = work / "killed.zarr"
    proc = start_repgeo(*extract_args(tiny_model, path, out))
    _kill_mid_run(proc, out, victim=lambda p: p.pid)
    assert proc.returncode == -signal.SIGKILL
    code, _, err = run_repgeo(*extract_args(tiny_model, path, out, "--resume"))
    assert code == 0, err
    same_store(reference, out)


@pytest.mark.parametrize("change, words", [
    ([], "different settings"),  # --resume without --contributions
    (["--contributions", "--flow-weighting", "norm"], "different settings"),
])
def test_resume_refuses_another_contributions_setting(change, words, reference, prompts, tiny_model, run_repgeo,
                                                      tree_snapshot, the_error_line):
    _, path = prompts
    args = ["extract", "--model", tiny_model, "--prompts", path, "--out", reference, "--dtype", "float32",
            "--batch-size", 4, *change, "--resume"]
    before = tree_snapshot(reference)
    code, _, err = run_repgeo(*args)
    assert code == 2 and words in the_error_line(err)
    assert tree_snapshot(reference) == before


def test_correlations_equal_scipy_on_the_stored_arrays(reference, tmp_path, run_repgeo):
    out = tmp_path / "results.zarr"
    code, _, err = run_repgeo("summarize", "--store", reference, "--out", out, "--observables", "contributions",
                              "--contrib-span", 6, "--workers", 1)
    assert code == 0, err
    ds, acts = xr.open_zarr(out), xr.open_zarr(reference)
    assert list(ds.stat.values) == ["pearson", "spearman", "kendall"] and list(ds.span.values) == ["first", "last"]
    tests = {"pearson": stats.pearsonr, "spearman": stats.spearmanr, "kendall": stats.kendalltau}
    for p in (0, 7):
        n = int(acts.n_tokens[p])
        for b in (0, 3):
            cos = acts.head_cosine.values[p, b, :, :n].astype(np.float64)
            norm = acts.head_norm.values[p, b, :, :n].astype(np.float64)
            for j, window in enumerate((slice(0, min(6, n)), slice(max(n - 6, 0), n))):
                for i, name in enumerate(ds.stat.values):
                    r = tests[name](cos[:, window].ravel(), norm[:, window].ravel())
                    assert ds.contrib_corr.values[p, b, i, j] == pytest.approx(r.statistic, abs=1e-12)
                    assert ds.contrib_corr_p.values[p, b, i, j] == pytest.approx(r.pvalue, rel=1e-9, abs=1e-300)
            np.testing.assert_allclose(ds.head_norm_mean.values[p, b], norm.mean(-1))


def test_summarize_refuses_contributions_of_a_store_without_them(many_prompts, tmp_path, run_repgeo,
                                                                 the_error_line):
    code, _, err = run_repgeo("summarize", "--store", many_prompts.store_1rank, "--out", tmp_path / "r.zarr",
                              "--observables", "contributions")
    assert code == 2 and "--contributions" in the_error_line(err)


def test_an_unsupported_architecture_is_refused_before_the_model_runs(tmp_path, write_jsonl, run_repgeo,
                                                                      the_error_line):
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import train_tiny_tokenizer

    model = tmp_path / "gpt2"
    tokenizer = train_tiny_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"text": "The baker wakes before dawn."}])
    code, _, err = run_repgeo("extract", "--model", model, "--prompts", prompts, "--out", tmp_path / "s.zarr",
                              "--contributions")
    line = the_error_line(err)
    assert code == 2 and "supports Gemma 3 and Llama models" in line and "gpt2" in line
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("args, words", [
    (["--flow-targets", "last"], "go with --contributions"),
    (["--contributions", "--flow-targets", "all", "--flow-gradients", "--max-tokens", "300"], "--yes"),
    (["--contributions", "--flow-targets", "1,-2"], "--flow-targets"),
])
def test_flow_options_are_checked_before_the_model_loads(args, words, tmp_path, tiny_model_long, make_tiny_texts,
                                                         write_jsonl, run_repgeo, the_error_line):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in make_tiny_texts(1, 1, 400, 450)])
    code, _, err = run_repgeo("extract", "--model", tiny_model_long, "--prompts", prompts, "--out",
                              tmp_path / "s.zarr", *args)
    assert code == 2 and words in the_error_line(err)
    assert not (tmp_path / "s.zarr").exists()
