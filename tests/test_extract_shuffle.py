"""Block shuffles (``--shuffle-levels``): level s cuts a prompt's tokens into 4**s near-equal blocks in a seeded
order; unit tests of the plan functions and an end-to-end check of the stored token ids."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.shuffle import block_permutation, shuffle_blocks

LEVELS = (0, 1, 2)
MAX_TOKENS = 60


def test_shuffle_blocks_by_hand():
    # 10 tokens in 4 blocks: sizes 3, 3, 2, 2 → [0 1 2] [3 4 5] [6 7] [8 9]
    np.testing.assert_array_equal(shuffle_blocks(np.arange(10), 4, np.array([3, 1, 0, 2])),
                                  [8, 9, 3, 4, 5, 0, 1, 2, 6, 7])
    np.testing.assert_array_equal(shuffle_blocks(np.arange(5), 1, np.array([0])), np.arange(5))
    np.testing.assert_array_equal(shuffle_blocks(np.array([7, 8, 9]), 3, np.array([2, 0, 1])), [9, 7, 8])


@pytest.mark.parametrize("n_blocks", [2, 3, 4, 16])
def test_block_permutation_is_a_seeded_non_identity_permutation(n_blocks):
    orders = {}
    for seed in range(30):
        for source in range(3):
            for level in (1, 2):
                order = block_permutation(n_blocks, seed, source, level)
                assert sorted(order.tolist()) == list(range(n_blocks))
                assert order.tolist() != list(range(n_blocks))
                np.testing.assert_array_equal(order, block_permutation(n_blocks, seed, source, level))
                orders[seed, source, level] = tuple(order.tolist())
    if n_blocks > 2:  # each of seed, source and level changes the order for some choice of the others
        assert any(orders[s, 0, 1] != orders[s + 1, 0, 1] for s in range(29))
        assert any(orders[s, 0, 1] != orders[s, 1, 1] for s in range(30))
        assert any(orders[s, 0, 1] != orders[s, 0, 2] for s in range(30))
    assert block_permutation(1, 0, 0, 0).tolist() == [0]


def block_order(shuffled: np.ndarray, blocks: list):
    """The order in which ``blocks`` are concatenated to give ``shuffled``, or None (depth-first search)."""

    def search(pos: int, used: frozenset):
        if pos == len(shuffled):
            return [] if len(used) == len(blocks) else None
        for i, block in enumerate(blocks):
            if i not in used and np.array_equal(shuffled[pos:pos + len(block)], block):
                rest = search(pos + len(block), used | {i})
                if rest is not None:
                    return [i] + rest
        return None

    return search(0, frozenset())


@pytest.fixture(scope="module")
def shuffled_store(tmp_path_factory, tiny_model, run_repgeo, write_jsonl, make_tiny_texts):
    """``shuffled_store(seed)`` → (store path, the texts): three prompts at levels 0, 1, 2 (extracted once per seed)."""
    directory = tmp_path_factory.mktemp("shuffle")
    texts = make_tiny_texts(3, seed=5, min_words=25, max_words=40)
    prompts = write_jsonl(directory / "prompts.jsonl", [{"text": t, "topic": f"t{i}"} for i, t in enumerate(texts)])
    stores = {}

    def get(seed: int, copy: int = 0):
        if (seed, copy) not in stores:
            out = directory / f"seed{seed}-{copy}.zarr"
            code, _, err = run_repgeo("extract", "--model", tiny_model, "--prompts", prompts, "--out", out,
                                      "--max-tokens", MAX_TOKENS, "--shuffle-levels", "0,1,2", "--seed", seed)
            assert code == 0, err
            stores[seed, copy] = out
        return stores[seed, copy], texts

    return get


def _stored_rows(path):
    import xarray as xr

    ds = xr.open_zarr(str(path), consolidated=False)
    return ds, [ds.input_ids.values[p, :n] for p, n in enumerate(ds.n_tokens.values)]


def test_each_source_prompt_gives_consecutive_levels(shuffled_store, tiny_model):
    from transformers import AutoTokenizer

    path, texts = shuffled_store(3)
    ds, rows = _stored_rows(path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert ds["source_prompt"].values.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert ds["shuffle_level"].values.tolist() == list(LEVELS) * 3
    assert ds["topic"].values.tolist() == ["t0"] * 3 + ["t1"] * 3 + ["t2"] * 3
    assert ds.text.values.tolist() == [t for t in texts for _ in LEVELS]
    assert bool(ds.done.all())
    for source, text in enumerate(texts):
        original = np.array(tokenizer(text)["input_ids"][:MAX_TOKENS])
        assert original[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in original[1:]
        head, body = original[:1], original[1:]  # <s> stays first: only the text's tokens are shuffled
        assert len(body) >= 4 ** max(LEVELS)
        for level in LEVELS:
            row = rows[3 * source + level]
            assert sorted(row.tolist()) == sorted(original.tolist())
            if level == 0:
                np.testing.assert_array_equal(row, original)
                continue
            np.testing.assert_array_equal(row[:1], head)
            blocks = np.array_split(body, 4**level)
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
            order = block_order(row[1:], blocks)
            assert order is not None, f"prompt {source} level {level} is not a reordering of its {4**level} blocks"
            assert order != list(range(4**level))


def test_same_seed_same_store_other_seed_other_order(shuffled_store, same_store):
    a, _ = shuffled_store(3)
    again, _ = shuffled_store(3, copy=1)
    same_store(a, again)
    other, _ = shuffled_store(4)
    _, rows_a = _stored_rows(a)
    ds_b, rows_b = _stored_rows(other)
    levels = ds_b["shuffle_level"].values
    assert all(np.array_equal(rows_a[p], rows_b[p]) for p in np.flatnonzero(levels == 0))
    assert not any(np.array_equal(rows_a[p], rows_b[p]) for p in np.flatnonzero(levels == 2))
    assert not all(np.array_equal(rows_a[p], rows_b[p]) for p in np.flatnonzero(levels == 1))
