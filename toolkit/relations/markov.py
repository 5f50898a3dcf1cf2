"""The first-order Markov check: a token corpus, its bigram statistics, and the model's two readings of a token x.

(a) the direct path, argmax_y unembedding[y] · input_embedding[x]: what the model would predict if its blocks
added nothing; (b) the model's own next-token distribution after the context x alone; (c) the corpus bigram
successor argmax_y count("x y"), i.e. argmax_y P(y | x) = P("x y") / P("x").
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..models import tokenizer_fingerprint
from ..observables.relations import bigram_kl, dot_top_k
from ..store.activations import open_activation_group, source_identity


@dataclass(frozen=True)
class Corpus:
    """A checked corpus: ``text`` (a UTF-8 file's contents) or ``group`` (an activation store's zarr group), and
    ``identity``, what the results store records about it."""

    path: str
    kind: str  # "text" or "activations"
    identity: dict
    text: str | None = None
    group: object = None


def open_corpus(path: str) -> Corpus:
    """Check --corpus before any model loads: a UTF-8 text file, or an activation store (its input_ids)."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "zarr.json")):
            raise UserError(f"--corpus {path} is a directory but not an activation store; give a UTF-8 text file or "
                            f"an activation store (from repgeo extract)")
        group = open_activation_group(path)  # refuses other stores, naming their kind
        return Corpus(path, "activations", dict(source_identity(path, group), kind="activations"), group=group)
    if not os.path.isfile(path):
        raise UserError(f"--corpus {path} does not exist; give a UTF-8 text file or an activation store")
    raw = open(path, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--corpus {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); give a "
                        f"UTF-8 text file (re-encode it, e.g. iconv -f latin1 -t utf-8) or an activation store"
                        ) from None
    if "\0" in text:  # valid UTF-8, but a binary file: its "tokens" would be noise
        raise UserError(f"--corpus {path} holds NUL bytes, so it is not a text file; give a UTF-8 text file or an "
                        f"activation store")
    if not text.strip():
        raise UserError(f"--corpus {path} is empty; give a text file with some text in it")
    return Corpus(path, "text", {"kind": "text", "path": os.path.abspath(path),
                                 "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}, text=text)


def corpus_sequences(corpus: Corpus, tokenizer, model: str) -> tuple:
    """The corpus as token sequences and the ids never counted: (list of (token,) int64 arrays, special ids).

    A text file is tokenized whole, without special tokens; an activation store gives each prompt's input_ids (it
    must have been tokenized by this model's tokenizer), and the special ids include those it records (e.g. the
    first token of extract --bos always).
    """
    special = {int(i) for i in tokenizer.all_special_ids}
    if corpus.kind == "text":
        # verbose=False: a long text exceeds the model's context, which does not matter for counting.
        ids = tokenizer(corpus.text, add_special_tokens=False, verbose=False)["input_ids"]
        return [np.asarray(ids, dtype=np.int64)], special
    group = corpus.group
    if group.attrs.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise UserError(f"--corpus {corpus.path} was tokenized by another tokenizer than {model}'s (tokenizer "
                        f"fingerprints differ); give the model it was extracted with, or a text file")
    n_tokens, input_ids = group["n_tokens"][:], group["input_ids"][:]
    special |= {int(i) for i in group.attrs.get("special_token_ids", [])}
    return [input_ids[p, : n_tokens[p]].astype(np.int64) for p in range(len(n_tokens))], special


def context_prefix(tokenizer) -> list:
    """The special tokens the tokenizer puts before a text by default (Gemma's <bos>; nothing for SmolLM2)."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return [int(i) for i in full[:start]]
    raise UserError("the tokenizer encodes a text differently with and without its special tokens; the Markov "
                    "check cannot tell which tokens it puts first")


def direct_path(model, xs: np.ndarray, k: int) -> np.ndarray:
    """The k best tokens y of unembedding[y] · input_embedding[x] for each x, best first: (x, k) int64.

    Raw weight rows: no final norm, no soft cap and no embedding scale, none of which changes the order of a row.
    """
    import torch

    embedding = model.get_input_embeddings().weight.detach().float()
    unembedding = model.get_output_embeddings().weight.detach().float()
    return dot_top_k(embedding[torch.as_tensor(xs, device=embedding.device)], unembedding, k)


def model_next_tokens(model, prefix: list, xs: np.ndarray, k: int, bigram, kl_rows: np.ndarray, device,
                      batch_size: int = 64) -> tuple:
    """The model's next-token prediction after the context ``prefix + [x]`` for each x.

    bigram: (vocab, vocab) CSR counts; kl_rows: (x,) bool, the x whose KL(bigram ‖ model) is computed. Batches
    are small, so the (batch, vocab) log-probabilities stay small whatever the vocabulary. Returns (top (x, k)
    int64 best first, kl (x,) float64 nats, NaN outside kl_rows).
    """
    import torch

    top = np.empty((len(xs), k), dtype=np.int64)
    kl = np.full(len(xs), np.nan)
    for start in range(0, len(xs), batch_size):
        chunk = xs[start:start + batch_size]
        ids = torch.tensor([prefix + [int(x)] for x in chunk], dtype=torch.long, device=device)
        with torch.inference_mode():
            log_q = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, -1].float(), dim=-1)
        top[start:start + len(chunk)] = torch.topk(log_q, k, dim=1).indices.cpu().numpy()
        rows = np.flatnonzero(kl_rows[start:start + len(chunk)])
        if len(rows):
            kl[start + rows] = bigram_kl(bigram, chunk[rows], log_q[torch.as_tensor(rows, device=device)].cpu().numpy())
    return top, kl
