"""Reading hidden states through a model's embeddings (logit lens and input-embedding lens): pure math.

Arrays in, arrays out (numpy; computed with torch's float32 kernels, as the model itself computes its logits).
Memory: callers pass blocks of tokens, so a (token, vocab) matrix is never larger than the block they chose.
"""

from __future__ import annotations

import math

import numpy as np
import torch

LOG2 = math.log(2.0)


def output_log_probs(normed, unembedding: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """log-softmax over the vocabulary of the logits ``normed @ unembeddingᵀ``.

    normed: (token, dim) hidden states after the model's final norm; unembedding: (vocab, dim) tensor;
    softcap: the model's final-logit soft cap c, if it has one (logits → c · tanh(logits / c), as Gemma 2 does).
    Returns (token, vocab) float32 log-probabilities (nats) as a torch tensor.
    """
    logits = torch.as_tensor(normed, dtype=torch.float32) @ unembedding.T
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1)


def top_k(scores: torch.Tensor, k: int) -> tuple:
    """The k largest entries of each row of (token, vocab) ``scores``: (ids (token, k) int32, values float32),
    largest first."""
    values, ids = torch.topk(scores, k, dim=-1)
    return ids.cpu().numpy().astype(np.int32), values.cpu().numpy().astype(np.float32)


def entropy_bits(log_probs: torch.Tensor) -> np.ndarray:
    """Entropy of each row's distribution, (token,) float32 bits, from (token, vocab) log-probabilities (nats)."""
    return (-(log_probs.exp() * log_probs).sum(dim=-1) / LOG2).cpu().numpy().astype(np.float32)


def reference_distribution(log_p: torch.Tensor) -> tuple:
    """(p, Σ p log p per row) of (token, vocab) log-probabilities: what `kl_divergence` needs of p, computed once
    for every q it is compared with."""
    p = log_p.exp()
    return p, (p * log_p).sum(dim=-1)


def kl_divergence(reference: tuple, log_q: torch.Tensor) -> np.ndarray:
    """KL(p ‖ q) = Σ p log p − Σ p log q per row in nats, (token,) float32; ``reference``: `reference_distribution`
    of p, log_q: (token, vocab) log-probabilities of q.

    Clamped at 0 (float32 rounding makes KL(p ‖ p) a few 1e-7 either side of it).
    """
    p, p_log_p = reference
    return torch.clamp(p_log_p - (p * log_q).sum(dim=-1), min=0).cpu().numpy().astype(np.float32)


def next_token_scores(log_probs: torch.Tensor, next_ids) -> tuple:
    """The log-probability and rank of each row's actual next token.

    log_probs: (token, vocab); next_ids: (token,) int ids, -1 where there is no next token (the last position).
    rank = number of vocabulary entries with a strictly greater log-probability (0 = the most probable), equal
    to counting strictly greater logits (log-softmax shifts a row by one constant). Returns (logprob (token,)
    float32 nats, NaN at -1; rank (token,) int32, -1 at -1).
    """
    next_ids = torch.as_tensor(np.asarray(next_ids, dtype=np.int64), device=log_probs.device)
    have = next_ids >= 0
    picked = log_probs.gather(1, next_ids.clamp(min=0)[:, None])[:, 0]
    rank = (log_probs > picked[:, None]).sum(dim=-1)
    logprob = torch.where(have, picked, float("nan"))
    return logprob.cpu().numpy().astype(np.float32), torch.where(have, rank, -1).cpu().numpy().astype(np.int32)


def unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Rows of a (n, dim) float tensor scaled to unit Euclidean norm (zero rows stay zero)."""
    norms = matrix.norm(dim=-1, keepdim=True)
    return matrix / torch.where(norms > 0, norms, torch.ones_like(norms))


def input_cosines(hidden, unit_embedding: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each raw hidden state with every input-embedding row.

    hidden: (token, dim); unit_embedding: (vocab, dim) rows of unit norm (`unit_rows` of the input embedding).
    Returns (token, vocab) float32 cosines as a torch tensor.
    """
    return unit_rows(torch.as_tensor(hidden, dtype=torch.float32)) @ unit_embedding.T


def top_k_accuracy(ranks, ks) -> np.ndarray:
    """Share of positions whose next token is among the top k, for each k: ranks (token,) int (-1 = no next
    token, left out); returns (len(ks),) float64, NaN when no position has a next token."""
    ranks = np.asarray(ranks)
    ranks = ranks[ranks >= 0]
    if ranks.size == 0:
        return np.full(len(ks), np.nan)
    return np.array([(ranks < k).mean() for k in ks], dtype=np.float64)
