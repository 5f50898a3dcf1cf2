"""The extraction plan: token ids of every stored prompt, its labels, and the batches that compute them.

Everything here is deterministic and independent of the number of ranks, so that any number of ranks, and a
resumed run, computes every prompt in exactly the same batch and writes the same store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from ..shuffle import block_permutation, leading_specials, shuffle_blocks


@dataclass
class PlannedPrompt:
    """One row of the store: ``input_ids`` (token,) int32, the text it came from, and its labels."""

    input_ids: np.ndarray
    text: str
    labels: dict = field(default_factory=dict)


@dataclass
class Plan:
    prompts: list
    n_input: int
    n_dropped_short: int
    n_truncated: int

    @property
    def n_tokens(self) -> np.ndarray:
        return np.array([len(p.input_ids) for p in self.prompts], dtype=np.int32)


def first_token_id(tokenizer, token: str | None) -> int:
    """The id of the token that ``--bos always`` puts first: ``token``, or the tokenizer's ``bos_token``."""
    token = token if token is not None else tokenizer.bos_token
    if token is None:
        raise UserError("the tokenizer has no bos_token; name the first token with --bos-token, e.g. --bos-token "
                        "'<|endoftext|>'")
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise UserError(f"--bos-token {token!r} is not a token of this tokenizer; give one of its special tokens, "
                        f"e.g. {', '.join(tokenizer.all_special_tokens[:4])}")
    return int(token_id)


def make_plan(source, tokenizer, *, min_tokens=None, max_tokens=None, shuffle_levels=(), seed=0,
              add_special_tokens=True, first_token=None) -> Plan:
    """Tokenize, filter and (optionally) block-shuffle the prompts of a :class:`~toolkit.prompts.PromptSource`.

    ``add_special_tokens``: what the tokenizer adds by default (e.g. Gemma's <bos>); ``first_token``: an id put
    before every prompt's tokens instead (``--bos always``; counted in --max-tokens and --min-tokens, and kept
    first by the shuffles as a leading special token). Prompts shorter than ``min_tokens`` are dropped
    (counted); longer than ``max_tokens`` are truncated. With
    ``shuffle_levels``, each kept prompt becomes one store prompt per level s: its tokens (after leading special
    tokens, which stay in place) cut into 4**s blocks whose order is permuted with a seed of (seed, prompt, s).
    """
    encoded = tokenizer([p.text for p in source.prompts], add_special_tokens=add_special_tokens)["input_ids"]
    if first_token is not None:
        encoded = [[first_token, *ids] for ids in encoded]
    special_ids = set(tokenizer.all_special_ids) | ({first_token} if first_token is not None else set())
    prompts, n_short, n_truncated = [], 0, 0
    for index, (prompt, ids) in enumerate(zip(source.prompts, encoded)):
        ids = np.asarray(ids, dtype=np.int32)
        if min_tokens and len(ids) < min_tokens:
            n_short += 1
            continue
        if max_tokens and len(ids) > max_tokens:
            ids = ids[:max_tokens]
            n_truncated += 1
        if not shuffle_levels:
            prompts.append(PlannedPrompt(ids, prompt.text, dict(prompt.labels)))
            continue
        head = leading_specials(ids, special_ids)
        for level in shuffle_levels:
            n_blocks = 4 ** level
            body = ids[head:]
            if n_blocks > len(body):
                raise UserError(
                    f"--shuffle-levels {level} cuts prompts into {n_blocks} blocks but prompt {index} has only "
                    f"{len(body)} tokens; use lower levels or --min-tokens {n_blocks}"
                )
            order = block_permutation(n_blocks, seed, index, level)
            shuffled = np.concatenate([ids[:head], shuffle_blocks(body, n_blocks, order)])
            labels = dict(prompt.labels, shuffle_level=level, source_prompt=index)
            prompts.append(PlannedPrompt(shuffled, prompt.text, labels))
    if not prompts:
        longest = max(len(ids) for ids in encoded)
        raise UserError(f"all {len(encoded)} prompts are shorter than --min-tokens {min_tokens} (the longest has "
                        f"{longest} tokens); lower --min-tokens or give longer prompts")
    return Plan(prompts, len(source.prompts), n_short, n_truncated)


def make_batches(n_tokens: np.ndarray, batch_size: int) -> list:
    """Group prompt indices into batches of ``batch_size``, longest first, so that padding stays small.

    Ties keep input order (stable sort). The result depends only on the lengths, never on the number of ranks.
    """
    order = np.argsort(-np.asarray(n_tokens), kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def batches_of_rank(batches: list, rank: int, size: int) -> list:
    """The batches that rank ``rank`` of ``size`` computes: every size-th one, so long batches are spread out."""
    return batches[rank::size]
