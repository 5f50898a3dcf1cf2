"""Reading hidden states through a model's embeddings (logit lens and input-embedding lens): pure math.

Tensors in (torch float32, as the model itself computes its logits), numpy arrays out. Memory: callers pass
blocks of tokens, so a (token, vocab) matrix is never larger than the block they chose.

Speed: a (token, vocab) block is read a few times over, never copied in float64 and never turned into log-
probabilities: one softmax of the shifted logits gives every reading of a distribution (top-k, entropy, KL, the
next token's log-probability and rank), and the top-k looks only inside the chunks of the vocabulary that hold the
largest entries (`top_k_tensors`). Callers may pass the (token, vocab) matrices to write into (``out``), so that
a task allocates them once: on a Dask worker's thread, glibc serves each fresh 32 MiB matrix from a new mapping
and faulting its pages in costs about a third more CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

LOG2 = math.log(2.0)

#: `top_k_tensors` takes the maximum of each run of this many vocabulary entries, then searches only the k runs
#: with the largest maxima (k x this many entries) instead of the whole row.
TOP_K_CHUNK = 64

#: Products h @ Wᵀ of fewer rows take other BLAS paths (matrix-vector) that round differently: padded to this many
#: rows, a row's logits are the same bits whatever rows it is computed with, in one thread as lens workers compute
#: (so a run over some layers gives the same readings as one over all of them; with more threads the split of the
#: work differs with the row count).
MIN_PRODUCT_ROWS = 4

#: `row_dots` multiplies this many entries at a time (whole rows, at least one): 1 MiB, the products stay in cache.
ROW_DOT_ENTRIES = 2**18


def row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[t, v] · b[t, v] of each row t of two (token, vocab) tensors, (token,): the products of a few rows at a
    time into a small scratch matrix, each row summed as torch sums (pairwise, accurate to float32 rounding),
    without a (token, vocab) temporary."""
    n_rows, width = a.shape
    step = max(1, ROW_DOT_ENTRIES // max(width, 1))
    scratch = a.new_empty((min(step, n_rows), width))
    return torch.cat([torch.mul(a[i:i + step], b[i:i + step], out=scratch[:min(step, n_rows - i)]).sum(dim=-1)
                      for i in range(0, n_rows, step)]) if n_rows else a.new_empty(0)


def _product(x: torch.Tensor, matrix: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """x @ matrixᵀ (written into ``out`` if given), computed with at least `MIN_PRODUCT_ROWS` rows."""
    if x.shape[0] >= MIN_PRODUCT_ROWS:
        return torch.matmul(x, matrix.T, out=out)
    padded = torch.cat([x, x.new_zeros((MIN_PRODUCT_ROWS - x.shape[0], x.shape[1]))])
    result = (padded @ matrix.T)[:x.shape[0]]
    return result if out is None else out.copy_(result)


def output_logits(normed, unembedding: torch.Tensor, softcap: float | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The logits ``normed @ unembeddingᵀ``, (token, vocab) float32 (written into ``out`` if given).

    normed: (token, dim) hidden states after the model's final norm; unembedding: (vocab, dim) tensor;
    softcap: the model's final-logit soft cap c, if it has one (logits → c · tanh(logits / c), as Gemma 2 does).
    """
    logits = _product(torch.as_tensor(normed, dtype=torch.float32), unembedding, out)
    if softcap:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def top_k_tensors(scores: torch.Tensor, k: int) -> tuple:
    """The k largest entries of each row of (token, vocab) ``scores``, largest first: (values, ids int64) tensors.

    The values are those of ``torch.topk``; only the order of equal entries may differ. A row's top k lie in the k
    runs of `TOP_K_CHUNK` entries with the largest maxima, so the search reads the row once (the run maxima) and
    then k runs, instead of keeping a k-heap over the whole row (4-6x faster at 49,152-262,144 entries).
    """
    n_tokens, vocab = scores.shape
    chunk = TOP_K_CHUNK
    runs = vocab // chunk
    if runs < 4 * k:
        return torch.topk(scores, k, dim=-1)
    maxima = scores[:, : runs * chunk].unflatten(1, (runs, chunk)).amax(dim=-1)
    best_runs = torch.topk(maxima, k, dim=-1).indices
    candidates = (best_runs[:, :, None] * chunk + torch.arange(chunk, device=scores.device)).flatten(1)
    if runs * chunk < vocab:  # the entries after the last whole run are always candidates
        tail = torch.arange(runs * chunk, vocab, device=scores.device).expand(n_tokens, -1)
        candidates = torch.cat([candidates, tail], dim=1)
    values, picked = torch.topk(scores.gather(1, candidates), k, dim=-1)
    return values, candidates.gather(1, picked)


def top_k(scores: torch.Tensor, k: int) -> tuple:
    """The k largest entries of each row of (token, vocab) ``scores``: (ids (token, k) int32, values float32),
    largest first."""
    values, ids = top_k_tensors(scores, k)
    return ids.cpu().numpy().astype(np.int32), _rows(values)


def _rows(x: torch.Tensor) -> np.ndarray:
    return x.cpu().numpy().astype(np.float32)


@dataclass
class Distribution:
    """A block of next-token distributions as `read_output` leaves them, what `kl_divergence` needs of them.

    shifted: (token, vocab) logits minus each row's maximum, so log p = shifted − lse; probs: (token, vocab)
    softmax of the logits; mass: (token,) the sum of each row of ``probs`` (1 up to float32 rounding: p is
    probs / mass); lse: (token,) log Σ exp(shifted) (≥ 0); entropy: (token,) nats.
    """

    shifted: torch.Tensor
    probs: torch.Tensor
    mass: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor


def read_output(logits: torch.Tensor, k: int, next_ids, out: torch.Tensor | None = None) -> tuple:
    """Every reading of the output decoder from a block of (token, vocab) float32 ``logits`` (overwritten: they
    become the `Distribution`'s ``shifted``); ``out``: a (token, vocab) float32 tensor for its ``probs``.

    next_ids: (token,) int ids of each row's actual next token, -1 where there is none (the last position).
    Returns (readings, distribution): readings maps ``top_ids`` (token, k) int32 and ``top_probs`` (token, k)
    float32 (the k most probable tokens and their probabilities), ``entropy`` (token,) float32 bits,
    ``next_logprob`` (token,) float32 nats (NaN at -1) and ``next_rank`` (token,) int32 (the number of vocabulary
    entries with a strictly greater logit, 0 = the most probable; -1 at -1) to numpy arrays; the distribution is
    for `kl_divergence`.

    From the shifted logits s = logits − max (all ≤ 0, the largest exactly 0) and p = softmax: lse = log Σ e^s,
    log p = s − lse, entropy = lse − Σ p s (a sum of two non-negative terms, exact to float32 rounding even for
    near-certain distributions), without a (token, vocab) matrix of log-probabilities or a product.
    """
    top_values, top_ids = top_k_tensors(logits, k)
    next_ids = torch.as_tensor(np.asarray(next_ids, dtype=np.int64), device=logits.device)
    have = next_ids >= 0
    at = next_ids.clamp(min=0)[:, None]
    picked = logits.gather(1, at)
    # The rank before the shift, on the logits themselves: comparisons written as 0/1 float32 (exact sums up to
    # 2^24 entries), into the buffer the probabilities take next.
    buffer = torch.empty_like(logits) if out is None else out
    rank = torch.gt(logits, picked, out=buffer).sum(dim=-1)
    shifted = logits.sub_(top_values[:, :1])
    probs = torch.softmax(shifted, dim=-1, out=buffer)
    # p = probs / mass exactly (float32 sums over a long row drift ~1e-5 from 1): the largest entry's exp is 1,
    # so its probability is 1 / Σ e^s and lse = log(mass) − log(probs[argmax]).
    mass = probs.sum(dim=-1)
    lse = mass.log() - probs.gather(1, top_ids[:, :1])[:, 0].log()
    entropy = lse - row_dots(probs, shifted) / mass
    logprob = shifted.gather(1, at)[:, 0] - lse
    readings = {"top_ids": top_ids.cpu().numpy().astype(np.int32),
                "top_probs": _rows(probs.gather(1, top_ids) / mass[:, None]),
                "entropy": _rows(entropy / LOG2),
                "next_logprob": _rows(torch.where(have, logprob, float("nan"))),
                "next_rank": torch.where(have, rank.to(torch.int64), -1).cpu().numpy().astype(np.int32)}
    return readings, Distribution(shifted, probs, mass, lse, entropy)


def kl_divergence(p: Distribution, q: Distribution) -> np.ndarray:
    """KL(p ‖ q) per row in nats, (token,) float32, of two `read_output` distributions of the same tokens.

    Σ p log p − Σ p log q = −H(p) − Σ p s_q + lse_q (s_q: q's shifted logits, log q = s_q − lse_q), one pass over
    the block. Clamped at 0 (float32 rounding makes a tiny KL a few 1e-7 either side of it); exactly 0 when q is p.
    """
    if q is p:
        return np.zeros(p.lse.shape[0], dtype=np.float32)
    kl = q.lse - p.entropy - row_dots(p.probs, q.shifted) / p.mass
    return _rows(torch.clamp(kl, min=0))


def unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Rows of a (n, dim) float tensor scaled to unit Euclidean norm (zero rows stay zero)."""
    norms = matrix.norm(dim=-1, keepdim=True)
    return matrix / torch.where(norms > 0, norms, torch.ones_like(norms))


def input_cosines(hidden, unit_embedding: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity of each raw hidden state with every input-embedding row.

    hidden: (token, dim); unit_embedding: (vocab, dim) rows of unit norm (`unit_rows` of the input embedding).
    Returns (token, vocab) float32 cosines as a torch tensor (``out`` if given).
    """
    return _product(unit_rows(torch.as_tensor(hidden, dtype=torch.float32)), unit_embedding, out)


def top_k_accuracy(ranks, ks) -> np.ndarray:
    """Share of positions whose next token is among the top k, for each k: ranks (token,) int (-1 = no next
    token, left out); returns (len(ks),) float64, NaN when no position has a next token."""
    ranks = np.asarray(ranks)
    ranks = ranks[ranks >= 0]
    if ranks.size == 0:
        return np.full(len(ks), np.nan)
    return np.array([(ranks < k).mean() for k in ks], dtype=np.float64)
