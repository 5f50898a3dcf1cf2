"""Information flow through a transformer: where a token's representation came from (pure math, numpy).

Notation for one prompt of T tokens and a model of B blocks: block b reads hidden layer b and writes layer b + 1.
At block b a token i keeps the share r_b(i) of its representation on itself (the residual stream, and the MLP,
which acts per position) and takes the share 1 − r_b(i) from the tokens it attends to, in proportion to the
attention weights A_b(i, j) (rows sum to 1).
"""

from __future__ import annotations

import numpy as np


def write_share(write_norm, stream_norm):
    """‖write‖ / (‖write‖ + ‖stream it is added to‖), elementwise; 0 where both are 0."""
    write_norm, stream_norm = np.asarray(write_norm, np.float64), np.asarray(stream_norm, np.float64)
    total = write_norm + stream_norm
    return np.divide(write_norm, total, out=np.zeros_like(total), where=total > 0)


def mix_heads(attention, head_weights=None):
    """One attention matrix per block from its heads' matrices.

    attention: (block, head, token, token) weights, rows (queries i) summing to 1 over keys j; head_weights:
    None for the plain mean over heads, or (block, head, token) non-negative weights per query (e.g. each head's
    write norm at token i): A(i, j) = Σ_h w_h(i) A_h(i, j) / Σ_h w_h(i), the mean where all weights are 0.
    numpy arrays or torch tensors (the extraction mixes on the model's device, in its dtype). Returns (block,
    token, token) in the input's type and dtype, rows summing to 1.
    """
    if head_weights is None:
        return attention.mean(1)
    total = head_weights.sum(1)[:, None]
    empty = total == 0
    w = head_weights / (total + empty) + empty / head_weights.shape[1]  # the mean where every weight is 0
    return (w[..., None] * attention).sum(1)


def attention_flow(attention, residual_share, targets) -> np.ndarray:
    """Importance of every (layer, token) node for each target token.

    attention: (block, token, token) head-mixed weights (`mix_heads`), or a sequence of (token, token) arrays, one
    per block (read as they are: importance is propagated in float64); residual_share: (block, token) r_b(i),
    e.g. 1 − attention write share; targets: positions of the target tokens. Importance is 1 at the target in
    the last layer; going down one block, w_b(j) = Σ_i w_{b+1}(i) [r_b(i) 1{i = j} + (1 − r_b(i)) A_b(i, j)].
    Returns (target, layer, token) float64, layer = 0 … block count; each (target, layer) row sums to 1.
    """
    r = np.asarray(residual_share, np.float64)
    n_blocks, n = r.shape
    targets = np.asarray(targets, dtype=np.int64)
    w = np.zeros((len(targets), n_blocks + 1, n))
    w[np.arange(len(targets)), n_blocks, targets] = 1.0
    for b in range(n_blocks - 1, -1, -1):
        above = w[:, b + 1]
        w[:, b] = above * r[b] + (above * (1 - r[b])) @ attention[b]
    return w
