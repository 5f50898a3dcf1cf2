"""The lens math (toolkit/observables/lens.py) against float64 numpy, on vocabularies of every shape: a multiple of
the top-k run length, one with a tail after the last whole run (GPT-2's 50,257), and one too small for runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.observables import lens as lens_math

K = 5


def logits_of(n_tokens: int, vocab: int, seed: int) -> np.ndarray:
    """Float32 logits with a few near-certain rows, a tie at the top of one row and the maximum in the tail."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_tokens, vocab)) * 3).astype(np.float32)
    x[0, rng.integers(vocab)] = 40.0  # near-certain
    x[1, [3, vocab - 2]] = 25.0  # tied at the top, the second in the tail when vocab % 64
    x[2, vocab - 1] = 30.0  # the best entry is the very last one
    return x


def reference(x: np.ndarray, next_ids: np.ndarray) -> dict:
    logp = x.astype(np.float64)
    logp = logp - logp.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    have = next_ids >= 0
    at = np.maximum(next_ids, 0)
    picked = x[np.arange(len(x)), at]
    return {"logp": logp, "entropy": -(np.exp(logp) * logp).sum(-1) / np.log(2),
            "next_logprob": np.where(have, logp[np.arange(len(x)), at], np.nan),
            "next_rank": np.where(have, (x > picked[:, None]).sum(-1), -1)}


@pytest.mark.parametrize("vocab", [49_152, 50_257, 1_000, 100])
def test_top_k_is_torch_topk(vocab):
    x = torch.from_numpy(logits_of(9, vocab, seed=vocab))
    values, ids = lens_math.top_k_tensors(x, K)
    expected = torch.topk(x, K, dim=-1).values
    assert torch.equal(values, expected)
    assert torch.equal(x.gather(1, ids), values)  # the ids carry those values (ties may come in either order)
    assert (ids.unique(dim=-1).shape[-1] == K) and (ids >= 0).all() and (ids < vocab).all()


@pytest.mark.parametrize("vocab", [49_152, 50_257, 1_000])
def test_readings_and_kl_equal_float64(vocab):
    x = logits_of(9, vocab, seed=vocab + 1)
    rng = np.random.default_rng(vocab)
    next_ids = rng.integers(0, vocab, len(x))
    next_ids[-1] = -1  # the last position has no next token
    next_ids[0] = int(np.argmax(x[0]))  # rank 0
    final = logits_of(9, vocab, seed=vocab + 2)
    ref, ref_final = reference(x, next_ids), reference(final, next_ids)
    p_final = lens_math.read_output(torch.from_numpy(final.copy()), K, next_ids)[1]
    readings, q = lens_math.read_output(torch.from_numpy(x.copy()), K, next_ids)
    top = np.take_along_axis(ref["logp"], readings["top_ids"].astype(np.int64), -1)
    np.testing.assert_allclose(top, -np.sort(-ref["logp"], axis=-1)[:, :K], atol=1e-6)
    np.testing.assert_allclose(readings["top_probs"], np.exp(top), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(readings["entropy"], ref["entropy"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(readings["next_logprob"], ref["next_logprob"], rtol=1e-6, atol=1e-5)
    assert np.isnan(readings["next_logprob"][-1])
    np.testing.assert_array_equal(readings["next_rank"], ref["next_rank"])
    assert readings["next_rank"][0] == 0
    kl = (np.exp(ref_final["logp"]) * (ref_final["logp"] - ref["logp"])).sum(-1)
    np.testing.assert_allclose(lens_math.kl_divergence(p_final, q), kl, rtol=1e-4, atol=1e-6)
    assert (lens_math.kl_divergence(q, q) == 0).all()


@pytest.fixture
def one_thread():
    """As a lens worker computes: one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_written_into_given_matrices_and_a_product_of_few_rows(one_thread):
    vocab, dim = 50_257, 32
    rng = np.random.default_rng(0)
    h = torch.from_numpy(rng.standard_normal((6, dim)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((vocab, dim)).astype(np.float32))
    out = torch.empty(6, vocab)
    logits = lens_math.output_logits(h, w, out=out)
    assert logits.data_ptr() == out.data_ptr()
    np.testing.assert_allclose(logits.numpy(), h.double().numpy() @ w.double().numpy().T, rtol=1e-5, atol=1e-4)
    # One row alone (padded to MIN_PRODUCT_ROWS) gives the bits it has among others.
    for i in range(6):
        assert torch.equal(lens_math.output_logits(h[i:i + 1], w), logits[i:i + 1])
    capped = lens_math.output_logits(h, w, softcap=5.0)
    np.testing.assert_allclose(capped.numpy(), 5.0 * np.tanh(logits.numpy() / 5.0), rtol=1e-5, atol=1e-5)
    cosines = lens_math.input_cosines(h, lens_math.unit_rows(w))
    hn, wn = h.double().numpy(), w.double().numpy()
    expected = (hn / np.linalg.norm(hn, axis=1, keepdims=True)) @ (wn / np.linalg.norm(wn, axis=1, keepdims=True)).T
    np.testing.assert_allclose(cosines.numpy(), expected, atol=1e-6)
