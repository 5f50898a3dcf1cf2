"""The block shuffle of ``--shuffle-levels``: extract applies it to a prompt's token ids, and summarize's ``bpc``
re-derives it to know which characters each stored position covers."""

from __future__ import annotations

import numpy as np


def block_permutation(n_blocks: int, seed: int, source: int, level: int) -> np.ndarray:
    """A seeded permutation of ``n_blocks`` blocks that is never the identity (when n_blocks > 1)."""
    rng = np.random.default_rng([seed, source, level])
    while True:
        order = rng.permutation(n_blocks)
        if n_blocks == 1 or not np.array_equal(order, np.arange(n_blocks)):
            return order


def shuffle_blocks(ids: np.ndarray, n_blocks: int, order: np.ndarray) -> np.ndarray:
    """Cut ``ids`` (token,) into ``n_blocks`` near-equal consecutive blocks and reassemble them in ``order``.

    Block sizes differ by at most one token (``np.array_split``), so every level keeps all tokens.
    """
    blocks = np.array_split(ids, n_blocks)
    return np.concatenate([blocks[i] for i in order])


def leading_specials(ids: np.ndarray, special_ids: set) -> int:
    """How many of the first ids are special (a BOS or chat marker the tokenizer put first): they stay in front."""
    n = 0
    while n < len(ids) and int(ids[n]) in special_ids:
        n += 1
    return n
