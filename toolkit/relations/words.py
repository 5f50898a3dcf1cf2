"""How a word becomes tokens: alone after a space (embedding spaces), and inside the template (hidden space).

A word is taken as the tokenizer encodes it mid-sentence, after a space (" France"). Its tokens are those whose
character offsets (the fast tokenizer's offset mapping) overlap the word's characters, so a token that holds only
the space (SmolLM2 writes " 7" as "Ġ" + "7") is not one of the word's: "7" is a one-token word. In the templated
text ("The word is France") the same rule finds the word's tokens, and the hidden state of its last one is the
word's representation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError

#: What the template marks the word with.
PLACEHOLDER = "{word}"


def check_template(template: str) -> tuple:
    """The template's text before and after ``{word}``; UserError unless it holds ``{word}`` exactly once, after
    some context (the first position of a causal model holds its attention sink: there, the states of different
    words are nearly identical)."""
    count = template.count(PLACEHOLDER)
    if count != 1:
        raise UserError(f"--template {template!r} holds {PLACEHOLDER} {count} times; mark the word exactly once, "
                        f"e.g. --template 'The word is {PLACEHOLDER}'")
    before, after = template.split(PLACEHOLDER)
    if not before.strip():
        raise UserError(f"--template {template!r} puts the word first, where the model's attention sink is; put "
                        f"context before it, e.g. --template 'The word is {PLACEHOLDER}'")
    return before, after


@dataclass(frozen=True)
class WordTokens:
    """Tokens of each word (the ``word`` dim).

    ids: the word's token ids after a space; single: (word,) its id when that is one token, else -1;
    n_tokens: (word,) how many; texts: (word,) the templated text's token ids; last: (word,) index of the word's
    last token in them.
    """

    ids: tuple
    single: np.ndarray
    n_tokens: np.ndarray
    texts: tuple
    last: np.ndarray


def _require_fast(tokenizer, model: str):
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"the tokenizer of {model} has no offset mapping (not a fast tokenizer), which finds a word's "
                        f"tokens; give the model as a Hugging Face directory with a tokenizer.json")


def _overlapping(batch, n: int, start: int, end: int) -> list:
    """Indices of the non-special tokens of text ``n`` of an encoded ``batch`` whose characters overlap
    [start, end)."""
    return [i for i, ((s, e), special) in enumerate(zip(batch["offset_mapping"][n], batch["special_tokens_mask"][n]))
            if not special and s < end and e > start]


def _unencodable(word: str, model: str, why: str) -> UserError:
    return UserError(f"the tokenizer of {model} cannot encode {word!r} ({why}); remove its pairs from the relations "
                     f"file or spell the word as the tokenizer knows it")


def encode_words(tokenizer, words, template: str, model: str) -> WordTokens:
    """Token ids of each word after a space and inside the template; UserError for a word the tokenizer cannot
    encode (no token, or its unknown token) and for a template that merges the word with the text around it."""
    _require_fast(tokenizer, model)
    before, after = check_template(template)
    unk = tokenizer.unk_token_id
    spaced = tokenizer([" " + w for w in words], add_special_tokens=False, return_offsets_mapping=True,
                       return_special_tokens_mask=True)
    templated = tokenizer([before + w + after for w in words], add_special_tokens=True, return_offsets_mapping=True,
                          return_special_tokens_mask=True)
    ids, texts, last = [], [], []
    for n, word in enumerate(words):
        own = [spaced["input_ids"][n][i] for i in _overlapping(spaced, n, 1, 1 + len(word))]
        if not own:
            raise _unencodable(word, model, "no token covers it")
        if unk is not None and unk in own:
            raise _unencodable(word, model, f"it becomes {tokenizer.unk_token}")
        inside = _overlapping(templated, n, len(before), len(before) + len(word))
        offsets = templated["offset_mapping"][n]
        text = before + word + after
        if not inside:
            raise _unencodable(word, model, "no token covers it in the template")
        if text[offsets[inside[0]][0]:len(before)].strip():
            raise UserError(f"--template {template!r} merges {word!r} with the text before it into one token; put a "
                            f"space before {PLACEHOLDER}")
        if offsets[inside[-1]][1] > len(before) + len(word):
            raise UserError(f"--template {template!r} merges {word!r} with the text after it into one token; put a "
                            f"space or punctuation after {PLACEHOLDER}, or end the template with it")
        if inside[0] == 0:
            raise UserError(f"--template {template!r} puts {word!r} at the first position, where the model's "
                            f"attention sink is; put context before {PLACEHOLDER}")
        ids.append(tuple(own))
        texts.append(list(templated["input_ids"][n]))
        last.append(inside[-1])
    return WordTokens(ids=tuple(ids), single=np.array([t[0] if len(t) == 1 else -1 for t in ids], dtype=np.int64),
                      n_tokens=np.array([len(t) for t in ids], dtype=np.int64), texts=tuple(texts),
                      last=np.array(last, dtype=np.int64))


def hidden_states(model, word_tokens: WordTokens, layers, device, batch_size: int = 64) -> np.ndarray:
    """The hidden state of each word's last token in its templated text, at each of ``layers``.

    model: a transformers causal LM on ``device``; layers: indices of its ``hidden_states`` (0 = embedding output,
    the last one after the final norm). Texts are right-padded in batches with an attention mask (padding after
    the real tokens changes none of them in a causal model). Returns (layer, word, dim) float32.
    """
    import torch

    out = None
    for start in range(0, len(word_tokens.texts), batch_size):
        batch = word_tokens.texts[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, text in enumerate(batch):
            ids[row, : len(text)] = torch.tensor(text)
            mask[row, : len(text)] = 1
        with torch.inference_mode():
            states = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                           use_cache=False).hidden_states
        rows = torch.arange(len(batch), device=device)
        at = torch.as_tensor(word_tokens.last[start:start + len(batch)], device=device)
        picked = torch.stack([states[layer][rows, at] for layer in layers]).float().cpu().numpy()
        if out is None:
            out = np.empty((len(layers), len(word_tokens.texts), picked.shape[-1]), dtype=np.float32)
        out[:, start:start + len(batch)] = picked
    return out
