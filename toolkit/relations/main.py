"""Entries of ``repgeo relations analogies`` and ``repgeo relations markov``: check everything, then compute in
memory and write one results store (small: layers × pairs numbers), built in a partial directory this job owns."""

from __future__ import annotations

import datetime
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np

from .. import __version__
from ..errors import UserError
from ..models import (load_model, load_tokenizer, model_description, model_shape, resolve_model,
                      tokenizer_fingerprint, weights_sha256)
from ..observables.relations import (PREDICTORS, agreement, bigram_counts, crystal_relations, fit_split, most_frequent,
                                     top_successors)
from ..runtime.layers import parse_layers
from ..runtime.partial import Partial
from ..runtime.ranks import select_device
from ..store.relations_results import (COMPARISONS, EMBEDDING_SPACES, KIND, MARKOV_KIND, SPACES, write_store)
from .analogies import SpacePairs, analyse_space
from .markov import context_prefix, corpus_sequences, direct_path, model_next_tokens, open_corpus
from .pairs import read_pairs
from .words import check_template, encode_words, hidden_states

#: Markov: predictions kept per token, and the agreement sizes.
MARKOV_TOP = 5
MARKOV_KS = (1, 5)


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class AnalogyParams:
    """Every parameter that decides the numbers of a relations store (recorded in it)."""

    spaces: tuple
    layers: tuple  # hidden_states indices (0 = embedding output); empty without the hidden space
    template: str
    top_k: int
    lda_components: int
    seed: int

    @property
    def ks(self) -> tuple:
        return tuple(sorted({1, self.top_k}))

    def recorded(self) -> dict:
        return dict(asdict(self), spaces=list(self.spaces), layers=list(self.layers), ks=list(self.ks))


def parse_spaces(text: str) -> tuple:
    chosen = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in chosen if s not in SPACES]
    if unknown or not chosen:
        raise UserError(f"unknown space {unknown[0] if unknown else text!r} in --spaces; choose from "
                        f"{', '.join(SPACES)}")
    return tuple(s for s in SPACES if s in chosen)


def _model_record(ref, model, tokenizer) -> dict:
    tied = model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    return dict(model_description(ref, model), weights_sha256=weights_sha256(ref),
                tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), tied_embeddings=bool(tied))


def _vocabulary(tokenizer, size: int) -> np.ndarray:
    """Token id → its text as the tokenizer decodes it alone ("" past the tokenizer's own ids), (vocab_id,)."""
    texts = tokenizer.batch_decode([[i] for i in range(min(size, len(tokenizer)))])
    return np.array(texts + [""] * (size - len(texts)), dtype=object)


def _strings(values) -> np.ndarray:
    return np.array(list(values), dtype=object)


# --------------------------------------------------------------------------------------------------- analogies

def check_analogies(args) -> tuple:
    """Everything refused before the model loads: (params, pairs, model ref, tokenizer, word tokens)."""
    if os.path.exists(args.out):
        raise UserError(f"{args.out} already exists; choose a new --out")
    spaces = parse_spaces(args.spaces)
    check_template(args.template)
    if args.layers is not None and "hidden" not in spaces:
        raise UserError("--layers chooses layers of the hidden space; add hidden to --spaces or drop --layers")
    pairs = read_pairs(args.pairs)
    if args.lda_components > len(pairs.relations) - 1:
        raise UserError(f"--lda-components {args.lda_components} needs at least {args.lda_components + 1} relations "
                        f"(LDA finds at most relations - 1 directions); {pairs.path} has {len(pairs.relations)}: "
                        f"pass --lda-components {max(1, len(pairs.relations) - 1)}")
    ref = resolve_model(args.model)
    n_blocks, vocab = model_shape(ref)
    layers = tuple(parse_layers(args.layers, n_blocks + 1)) if "hidden" in spaces else ()
    tokenizer = load_tokenizer(ref)
    words = encode_words(tokenizer, pairs.words, args.template, args.model)
    if "hidden" in spaces and args.top_k > len(pairs.words) - 1:
        raise UserError(f"--top-k {args.top_k} exceeds the {len(pairs.words) - 1} words the hidden space can return "
                        f"(the file's {len(pairs.words)} words but the subject); pass a smaller --top-k")
    if any(s in EMBEDDING_SPACES for s in spaces) and args.top_k > vocab - 1:
        raise UserError(f"--top-k {args.top_k} exceeds the vocabulary ({vocab} tokens); pass a smaller --top-k")
    params = AnalogyParams(spaces=spaces, layers=layers, template=args.template, top_k=args.top_k,
                           lda_components=args.lda_components, seed=args.seed)
    return params, pairs, ref, tokenizer, words


def _relation_coords(params: AnalogyParams, pairs, words, vocab=None) -> dict:
    coords = {
        "relation": ("relation", _strings(pairs.relations), {}),
        "pair": ("pair", np.arange(pairs.n_pairs, dtype=np.int64), {"description": "line of the relations file"}),
        "pair_relation": ("pair", _strings(pairs.relations[r] for r in pairs.relation), {}),
        "subject": ("pair", _strings(pairs.subjects), {}),
        "object": ("pair", _strings(pairs.objects), {}),
        "word": ("word", _strings(pairs.words), {}),
        "predictor": ("predictor", _strings(PREDICTORS), {}),
        "k": ("k", np.asarray(params.ks, dtype=np.int64), {}),
        "pca_component": ("pca_component", np.arange(1, 3, dtype=np.int64), {}),
        "lda_component": ("lda_component", np.arange(1, params.lda_components + 1, dtype=np.int64), {}),
    }
    embedding = [s for s in params.spaces if s in EMBEDDING_SPACES]
    if embedding:
        coords["space"] = ("space", _strings(embedding), {})
        coords["vocab"] = ("vocab_id", vocab, {"description": "token text as the tokenizer decodes the id alone"})
        coords["vocab_id"] = ("vocab_id", np.arange(len(vocab), dtype=np.int64), {})
    if "hidden" in params.spaces:
        coords["layer"] = ("layer", np.asarray(params.layers, dtype=np.int64),
                           {"description": "0 = embedding output, i = output of block i (the last after the final "
                                           "norm), at the word's last token in the template"})
    return coords


def analogies(params: AnalogyParams, pairs, ref, tokenizer, words, device: str) -> tuple:
    """Compute every variable of the relations store: (values, coords, model record)."""
    import torch

    t0 = time.monotonic()
    model = load_model(ref, torch.float32).to(device)
    record = _model_record(ref, model, tokenizer)
    in_fit = fit_split(pairs.relation, len(pairs.relations), params.seed)
    length_difference = np.array([len(o) - len(s) for s, o in zip(pairs.subjects, pairs.objects)], dtype=np.float64)
    values = {"n_pairs": np.bincount(pairs.relation, minlength=len(pairs.relations)), "in_fit": in_fit,
              "word_tokens": words.n_tokens, "word_token_id": words.single}
    embedding = [s for s in params.spaces if s in EMBEDDING_SPACES]
    vocab = None
    if embedding:
        subject, obj = words.single[pairs.subject_word], words.single[pairs.object_word]
        used = (subject >= 0) & (obj >= 0)
        space_pairs = SpacePairs(subject=np.where(used, subject, 0), object=np.where(used, obj, 0),
                                 relation=pairs.relation, used=used, in_fit=in_fit,
                                 length_difference=length_difference, token_difference=None,
                                 n_relations=len(pairs.relations))
        matrices = {"input": model.get_input_embeddings().weight, "output": model.get_output_embeddings().weight}
        per_space, done = [], {}
        for space in embedding:
            weight = matrices[space]
            # Tied embeddings are one matrix: the output space's numbers are the input space's (a vocabulary-wide
            # search costs minutes for a 262,144-row vocabulary on a CPU).
            if weight.data_ptr() not in done:
                done[weight.data_ptr()] = analyse_space(weight.detach().float(), space_pairs, params.ks,
                                                        params.lda_components)
            per_space.append(done[weight.data_ptr()])
            _log(f"relations analogies: {space} space done ({time.monotonic() - t0:.1f} s)")
        for name in per_space[0]:
            values[name] = np.stack([r[name] for r in per_space])
        values["pair_used"] = np.stack([used] * len(embedding))
        values["n_pairs_used"] = np.stack([np.bincount(pairs.relation[used], minlength=len(pairs.relations))]
                                          * len(embedding))
        vocab = _vocabulary(tokenizer, matrices["input"].shape[0])
        _note_crystals("the embedding spaces", pairs.relation[used], in_fit[used], pairs.relations,
                       params.lda_components)
    if "hidden" in params.spaces:
        _note_crystals("the hidden space", pairs.relation, in_fit, pairs.relations, params.lda_components)
        states = hidden_states(model, words, params.layers, device)
        _log(f"relations analogies: hidden states of {len(pairs.words)} words at {len(params.layers)} layers "
             f"({time.monotonic() - t0:.1f} s)")
        token_difference = (words.n_tokens[pairs.object_word] - words.n_tokens[pairs.subject_word]).astype(np.float64)
        space_pairs = SpacePairs(subject=pairs.subject_word, object=pairs.object_word, relation=pairs.relation,
                                 used=np.ones(pairs.n_pairs, dtype=bool), in_fit=in_fit,
                                 length_difference=length_difference, token_difference=token_difference,
                                 n_relations=len(pairs.relations))
        per_layer = [analyse_space(torch.from_numpy(H).to(device), space_pairs, params.ks, params.lda_components)
                     for H in states]
        for name in per_layer[0]:
            values[f"hidden_{name}"] = np.stack([r[name] for r in per_layer])
        _log(f"relations analogies: hidden space done ({time.monotonic() - t0:.1f} s)")
    return values, _relation_coords(params, pairs, words, vocab), record


def _note_crystals(where: str, labels: np.ndarray, in_fit: np.ndarray, relations: tuple, lda_components: int):
    """Say on stderr when relations are left out of the crystals, or too few remain for the LDA."""
    taking_part = crystal_relations(labels, in_fit, len(relations))
    if not taking_part.all():
        left_out = ", ".join(r for r, kept in zip(relations, taking_part) if not kept)
        _log(f"relations analogies: note: in {where}, the silhouettes of {left_out} are NaN: fewer than 2 pairs to "
             f"fit the LDA or 2 held-out pairs to score")
    if taking_part.sum() < lda_components + 1:
        _log(f"relations analogies: note: in {where}, {int(taking_part.sum())} relations take part in the crystals, "
             f"too few for {lda_components} LDA directions: silhouette_lda is NaN there; pass --lda-components "
             f"{max(1, int(taking_part.sum()) - 1)} for it")


def _summary(values: dict, params: AnalogyParams) -> list:
    """Lines for the log: mean accuracies at k = 1 and silhouettes, per embedding space and a few layers."""
    def line(name, acc, sil, sil_lda):
        means = np.nanmean(acc[:, :, 0], axis=0)  # over relations, k = 1
        return (f"  {name:>10}: top-1 " + ", ".join(f"{p} {m:.2f}" for p, m in zip(PREDICTORS, means))
                + f"; silhouette {sil:.2f} → LDA {sil_lda:.2f}")

    lines = []
    embedding = [s for s in params.spaces if s in EMBEDDING_SPACES]
    for i, space in enumerate(embedding):
        lines.append(line(space, values["analogy_accuracy"][i], values["silhouette_all"][i],
                          values["silhouette_lda_all"][i]))
    if params.layers:
        picks = sorted({params.layers[int(round(j))] for j in np.linspace(0, len(params.layers) - 1, 4)})
        for layer in picks:
            i = params.layers.index(layer)
            lines.append(line(f"layer {layer}", values["hidden_analogy_accuracy"][i],
                              values["hidden_silhouette_all"][i], values["hidden_silhouette_lda_all"][i]))
    return lines


def run_analogies(args) -> int:
    params, pairs, ref, tokenizer, words = check_analogies(args)
    device = select_device(0, args.device)
    t0 = time.monotonic()
    _log(f"relations analogies: {pairs.n_pairs} pairs of {len(pairs.relations)} relations, {len(pairs.words)} words; "
         f"spaces {', '.join(params.spaces)}; {len(params.layers)} layers; device {device}")
    with Partial(args.out, "repgeo relations analogies") as partial:
        with warnings.catch_warnings():
            # Relations with too few one-token pairs stay NaN in an embedding space, as documented; their means are
            # NaN too, without numpy's warning about it.
            warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
            values, coords, record = analogies(params, pairs, ref, tokenizer, words, device)
            summary = _summary(values, params)
        attrs = {"toolkit_version": __version__, "model": record, "parameters": params.recorded(),
                 "pairs": {"path": pairs.path, "sha256": pairs.sha256, "n_pairs": pairs.n_pairs,
                           "n_relations": len(pairs.relations), "n_words": len(pairs.words)},
                 "device": device, "created": _now()}
        write_store(partial.path, KIND, coords, values, attrs)
        partial.finish()
    for line in summary:
        _log(line)
    _log(f"relations analogies: complete: {args.out} ({time.monotonic() - t0:.1f} s)")
    return 0


# ------------------------------------------------------------------------------------------------------ Markov

@dataclass(frozen=True)
class MarkovCounts:
    """The corpus counted: ``unigram`` (vocab,) and ``bigram`` (vocab, vocab) CSR counts, ``xs`` the --top most
    frequent tokens, ``n_sequences`` texts or prompts."""

    unigram: np.ndarray
    bigram: object
    xs: np.ndarray
    n_sequences: int


def check_markov(args) -> tuple:
    """Everything refused before the model loads: (corpus, model ref, tokenizer, counts, vocabulary rows)."""
    if os.path.exists(args.out):
        raise UserError(f"{args.out} already exists; choose a new --out")
    corpus = open_corpus(args.corpus)
    ref = resolve_model(args.model)
    tokenizer = load_tokenizer(ref)
    sequences, special = corpus_sequences(corpus, tokenizer, args.model)
    _, vocab = model_shape(ref)
    if max((int(s.max()) for s in sequences if len(s)), default=-1) >= vocab:
        raise UserError(f"--corpus {args.corpus} holds token ids beyond the vocabulary of {args.model} ({vocab}); "
                        f"give the model it was extracted with")
    unigram, bigram = bigram_counts(sequences, vocab, special)
    xs = most_frequent(unigram, args.top)
    if not len(xs):
        raise UserError(f"--corpus {args.corpus} holds no ordinary (non-special) token; give a corpus with text")
    return corpus, ref, tokenizer, MarkovCounts(unigram, bigram, xs, len(sequences)), vocab


def markov(args, ref, tokenizer, counted: MarkovCounts, vocab: int, device: str) -> tuple:
    """Compute every variable of the markov store: (values, coords, model record, corpus counts)."""
    import torch

    unigram, bigram, xs = counted.unigram, counted.bigram, counted.xs
    model = load_model(ref, torch.float32).to(device)
    record = _model_record(ref, model, tokenizer)
    prefix = context_prefix(tokenizer)
    successors = np.asarray(bigram.sum(axis=1)).ravel()[xs]
    bigram_top = top_successors(bigram, xs, MARKOV_TOP)
    direct_top = direct_path(model, xs, MARKOV_TOP)
    model_top, kl = model_next_tokens(model, prefix, xs, MARKOV_TOP, bigram, successors >= args.min_count, device)
    best = bigram_top[:, 0]
    probability = np.where(best >= 0, np.asarray(bigram[xs, np.maximum(best, 0)]).ravel() / np.maximum(successors, 1),
                           np.nan)
    texts = _vocabulary(tokenizer, vocab)
    frequent = most_frequent(unigram, MARKOV_TOP)  # the unigram baseline predicts these after every x
    unigram_top = np.broadcast_to(frequent, (len(xs), len(frequent)))
    values = {
        "markov_direct": direct_top[:, 0], "markov_model": model_top[:, 0], "markov_bigram": best,
        "markov_direct_top": direct_top, "markov_model_top": model_top, "markov_bigram_top": bigram_top,
        "markov_count": unigram[xs], "markov_bigram_count": successors, "markov_bigram_probability": probability,
        "markov_kl": kl,
        "markov_agreement": np.stack([agreement(direct_top, best, MARKOV_KS), agreement(model_top, best, MARKOV_KS),
                                      agreement(direct_top, xs, MARKOV_KS), agreement(unigram_top, best, MARKOV_KS)]),
    }
    coords = {
        "token_id": ("token_id", xs, {"description": "the token x: the corpus's most frequent tokens, most frequent "
                                                     "first"}),
        "token": ("token_id", texts[xs], {"description": "x as the tokenizer decodes it"}),
        "top": ("top", np.arange(1, MARKOV_TOP + 1, dtype=np.int64), {}),
        "comparison": ("comparison", _strings(COMPARISONS), {}),
        "k": ("k", np.asarray(MARKOV_KS, dtype=np.int64), {}),
        "vocab": ("vocab_id", texts, {"description": "token text as the tokenizer decodes the id alone"}),
        "vocab_id": ("vocab_id", np.arange(vocab, dtype=np.int64), {}),
    }
    counts = {"n_sequences": counted.n_sequences, "n_tokens": int(unigram.sum()), "n_bigrams": int(bigram.sum()),
              "n_distinct_tokens": int(np.count_nonzero(unigram)), "context_prefix": prefix}
    return values, coords, record, counts


def run_markov(args) -> int:
    corpus, ref, tokenizer, counted, vocab = check_markov(args)
    device = select_device(0, args.device)
    t0 = time.monotonic()
    with Partial(args.out, "repgeo relations markov") as partial:
        values, coords, record, counts = markov(args, ref, tokenizer, counted, vocab, device)
        attrs = {"toolkit_version": __version__, "model": record, "corpus": dict(corpus.identity, **counts),
                 "parameters": {"top": args.top, "min_count": args.min_count, "ks": list(MARKOV_KS),
                                "top_predictions": MARKOV_TOP},
                 "device": device, "created": _now()}
        write_store(partial.path, MARKOV_KIND, coords, values, attrs)
        partial.finish()
    shares = ", ".join(f"{c} {a[0]:.2f} / {a[1]:.2f}" for c, a in zip(COMPARISONS, values["markov_agreement"]))
    _log(f"relations markov: {len(coords['token_id'][1])} tokens x of {counts['n_tokens']} in {args.corpus}; "
         f"agreement at k = 1 / 5: {shares}")
    _log(f"relations markov: complete: {args.out} ({time.monotonic() - t0:.1f} s)")
    return 0
