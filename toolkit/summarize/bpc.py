"""``bpc``: a prompt's token losses in bits per character of the text the predicted tokens cover.

The activation store keeps ``token_loss[t]`` = −log p(token t | tokens < t) in nats for t = 1 … n_tokens − 1
(position 0 is predicted by nothing). Which characters of the text a token covers is not in the store: the
client re-encodes each stored text with the store's own tokenizer (the one of its recorded model, checked by its
fingerprint) the way extract did (the recorded ``add_special_tokens`` and ``bos_token_id``), keeps the first
n_tokens tokens (``--max-tokens`` truncation), puts them in the stored order (the block shuffle of a
``--shuffle-levels`` variant, from its labels and the recorded seed), and uses the prompt only where these ids are
exactly the stored ones.

Token k of the encoding *covers* the characters from where the text tokens before it end to where it ends:
``E_k − E_{k−1}`` with ``E_k`` the largest end offset (Unicode code points) among text tokens 0 … k and
``E_{−1} = 0``. So the whitespace before a word belongs to the word's token, the text is cut into consecutive
pieces with nothing counted twice, and a character split over several byte-level tokens belongs to the first
token that reaches its end (the others cover 0 characters). Special tokens that the tokenizer or ``--bos``
adds are not text tokens: they cover nothing and their losses are not counted. Then

    bpc = Σ_t token_loss[t] / ln 2  ÷  Σ_t characters covered by the token at t,

both sums over the stored positions t = 1 … n_tokens − 1 that hold a text token. Without a BOS the text token at
position 0 is not predicted and its characters are not counted; characters past the last stored token (cut by
--max-tokens) are not counted either.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UserError
from ..models import tokenizer_of_store
from ..shuffle import block_permutation, leading_specials, shuffle_blocks
from ..store.zarr_io import describe_error

PROMPTS_PER_BLOCK = 256  # prompts tokenized and read at a time


def covered_characters(offsets: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Characters each token of an encoding covers: (token,) int64.

    offsets: (token, 2) character offsets of the tokens in their text; text: (token,) bool, False for special
    tokens added by the tokenizer or by --bos. Token k covers E_k − E_{k−1}, E_k the largest end among the text
    tokens 0 … k (E_{−1} = 0); special tokens cover 0.
    """
    ends = np.where(text, np.asarray(offsets, dtype=np.int64)[:, 1], 0)
    return np.diff(np.maximum.accumulate(ends), prepend=0) if len(ends) else ends


def bits_per_character(token_loss: np.ndarray, order: np.ndarray, characters: np.ndarray, text: np.ndarray) -> float:
    """bpc of one prompt: Σ token_loss[t] / ln 2 over the stored positions t ≥ 1 that hold a text token, divided
    by the characters those tokens cover. NaN where they cover none (or a counted loss is not finite).

    token_loss: (n,) the stored losses (position 0 unused); order: (n,) the encoding's index of the token at each
    stored position (arange(n) unless shuffled); characters, text: per token of the encoding
    (`covered_characters`).
    """
    predicted = np.asarray(order)[1:]
    counted = text[predicted]
    chars = int(characters[predicted][counted].sum())
    if chars == 0:
        return math.nan
    bits = float(np.asarray(token_loss[1:], dtype=np.float64)[counted].sum()) / math.log(2)
    return bits / chars if math.isfinite(bits) else math.nan


def stored_order(n: int, head: int, shuffle: tuple | None) -> np.ndarray:
    """The encoding's index of the token at each of the n stored positions: arange(n), or for a
    ``--shuffle-levels`` variant (shuffle = (seed, source prompt, level)) the block shuffle extract applied to the
    tokens after the ``head`` leading special tokens."""
    order = np.arange(n)
    if not shuffle:
        return order
    seed, source, level = shuffle
    blocks = 4 ** level
    return np.concatenate([order[:head], shuffle_blocks(order[head:], blocks, block_permutation(blocks, seed, source,
                                                                                                 level))])


def store_bpc(store: str, source, prompts: list, log) -> dict:
    """bpc of the given done prompts of an activation store (``source``: its zarr group): prompt → float.

    Every value is NaN, with one note through ``log``, when the store withholds its texts or the tokenizer of its
    model cannot be loaded; a prompt whose text no longer encodes to the stored ids is NaN (counted in a note).
    """
    values = {p: math.nan for p in prompts}
    if not prompts:
        return values
    if "text" not in source:
        log(f"summarize: bpc is NaN: {store} withholds its texts (extract --withhold-texts), and bpc needs them")
        return values
    attrs = dict(source.attrs)
    try:
        tokenizer = tokenizer_of_store(attrs, store, "bpc needs that model's tokenizer")
    except UserError as e:
        log(f"summarize: bpc is NaN: {e}")
        return values
    except Exception as e:  # a tokenizer file transformers cannot read: bpc is lost, the geometry is not
        log(f"summarize: bpc is NaN: the tokenizer of {attrs['model'].get('id')} cannot be loaded "
            f"({describe_error(e)})")
        return values
    if not getattr(tokenizer, "is_fast", False):
        log(f"summarize: bpc is NaN: the tokenizer of {attrs['model']['id']} gives no character offsets (not a fast "
            f"tokenizer)")
        return values
    settings = attrs.get("settings", {})
    first = settings.get("bos_token_id")
    specials = set(tokenizer.all_special_ids) | ({first} if first is not None else set())
    shuffled = bool(settings.get("shuffle_levels")) and "shuffle_level" in source and "source_prompt" in source
    levels = source["shuffle_level"][:] if shuffled else None
    origins = source["source_prompt"][:] if shuffled else None
    texts, n_tokens = source["text"][:], source["n_tokens"][:]
    mismatched, failed = [], []
    for start in range(0, len(prompts), PROMPTS_PER_BLOCK):
        rows = prompts[start:start + PROMPTS_PER_BLOCK]
        width = int(n_tokens[rows].max())
        ids = source["input_ids"].get_orthogonal_selection((rows, slice(0, width)))
        losses = source["token_loss"].get_orthogonal_selection((rows, slice(0, width)))
        try:
            encoded = tokenizer([str(texts[p]) for p in rows],
                                add_special_tokens=settings.get("add_special_tokens", True),
                                return_offsets_mapping=True, return_special_tokens_mask=True)
        except Exception as e:  # noqa: BLE001 - bpc is lost for these prompts, the rest of the job is not
            failed += [(p, e) for p in rows]
            continue
        for i, p in enumerate(rows):
            n = int(n_tokens[p])
            try:
                own = np.asarray(encoded["input_ids"][i], dtype=np.int64)
                offsets = np.asarray(encoded["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
                text = np.asarray(encoded["special_tokens_mask"][i]) == 0
                if first is not None:
                    own, offsets, text = np.r_[first, own], np.r_[[[0, 0]], offsets], np.r_[False, text]
                own, offsets, text = own[:n], offsets[:n], text[:n]
                shuffle = (int(settings.get("seed", 0)), int(origins[p]), int(levels[p])) if shuffled else None
                order = stored_order(n, leading_specials(own, specials), shuffle) if len(own) == n else None
                if order is None or not np.array_equal(own[order], ids[i, :n]):
                    mismatched.append(p)
                    continue
                values[p] = bits_per_character(losses[i, :n], order, covered_characters(offsets, text), text)
            except Exception as e:  # noqa: BLE001 - e.g. a shuffle label missing in a merged store
                failed.append((p, e))
    model = attrs["model"].get("id")
    if mismatched:
        log(f"summarize: bpc is NaN for {len(mismatched)} prompts (first: {mismatched[0]}) whose text the tokenizer of "
            f"{model} does not encode to the stored token ids")
    if failed:
        log(f"summarize: bpc is NaN for {len(failed)} prompts (first: {failed[0][0]}) that could not be re-encoded "
            f"({describe_error(failed[0][1])})")
    return values
