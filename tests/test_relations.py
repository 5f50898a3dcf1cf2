"""``repgeo relations analogies`` and ``repgeo relations markov`` against independent references.

References: analogies by explicit loops in float64 over the model's own weights and over hidden states from one
unpadded forward pass per word (the word's last token found as the templated text's last token, not by offsets);
bigram successors by collections.Counter; the model's next token by a forward pass per token; KL by scipy. Plus
a tiny model with identical input and output embeddings, whose direct path must return each token itself, and the
real SmolLM2. Bad input exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
import xarray as xr

from conftest import CACHE, TINY_CORPUS, build_atomically, save_tiny_llama, train_tiny_tokenizer
from toolkit import cli
from toolkit.errors import UserError
from toolkit.plot_relations import relations_figures

TEMPLATE = "The word is {word}"
PREDICTORS = ("averaged_delta", "single_delta", "subject_only")

#: Three relations in the tiny tokenizer's words (the model is random: only the computation is tested). Most of
#: these words are one token after a space; "river" is not, so its pair is left out of the embedding spaces.
TINY_PAIRS = {
    "first": [("sand", "water"), ("clay", "yeast"), ("books", "tables"), ("room", "air"), ("small", "warm")],
    "second": [("the", "a"), ("and", "so"), ("at", "in"), ("to", "turn"), ("many", "rises")],
    "third": [("water", "books"), ("yeast", "room"), ("tables", "small"), ("air", "sand"), ("river", "clay")],
}
#: A slice of the bundled file for SmolLM2; "12" is two tokens (SmolLM2 writes digits one by one).
SMOL_PAIRS = {
    "country_capital": [("France", "Paris"), ("Egypt", "Cairo"), ("Japan", "Tokyo"), ("Italy", "Rome"),
                        ("Spain", "Madrid"), ("Greece", "Athens")],
    "male_female": [("king", "queen"), ("man", "woman"), ("boy", "girl"), ("father", "mother"), ("son", "daughter"),
                    ("uncle", "aunt")],
    "number_digit": [("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"), ("five", "5"), ("twelve", "12")],
}


def write_pairs(path, relations: dict) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for relation, pairs in relations.items():
            for subject, obj in pairs:
                f.write(json.dumps({"relation": relation, "subject": subject, "object": obj}) + "\n")
    return str(path)


def flat(relations: dict) -> list:
    return [(r, s, o) for r, pairs in relations.items() for s, o in pairs]


# ---------------------------------------------------------------------------------------------------- references

def reference_analogies(vectors, subject, obj, labels, used, ks):
    """Analogy accuracy (relation, predictor, k) and predictions (pair, predictor) by loops in float64.

    vectors: (candidate, dim); subject, obj: (pair,) candidate rows; labels: (pair,) relation; used: (pair,) bool.
    single_delta: the accuracy over every other pair's delta, the prediction with the next pair's (cyclically).
    """
    V = vectors.astype(np.float64)
    unit = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-300)
    n_relations = labels.max() + 1
    accuracy = np.full((n_relations, 3, len(ks)), np.nan)
    prediction = np.full((len(subject), 3), -1)

    # Identical vectors (the embedding-layer states of "12" and "2") must tie exactly, which a matrix-vector
    # product does not promise row by row: score each distinct vector once.
    distinct, shared = np.unique(unit, axis=0, return_inverse=True)

    def ranked(query, exclude):
        scores = (distinct @ (query / np.linalg.norm(query)))[shared.ravel()]
        scores[exclude] = -np.inf
        return np.argsort(-scores, kind="stable")

    for r in range(n_relations):
        members = [p for p in range(len(subject)) if labels[p] == r and used[p]]
        if len(members) < 3:
            continue
        hits = {0: [], 1: [], 2: []}
        for a, i in enumerate(members):
            others = [j for j in members if j != i]
            delta = np.mean([V[obj[j]] - V[subject[j]] for j in others], axis=0)
            for predictor, query in ((0, V[subject[i]] + delta), (2, V[subject[i]])):
                order = ranked(query, subject[i])
                hits[predictor].append([obj[i] in order[:k] for k in ks])
                prediction[i, predictor] = order[0]
            for j in others:
                order = ranked(V[subject[i]] + V[obj[j]] - V[subject[j]], subject[i])
                hits[1].append([obj[i] in order[:k] for k in ks])
                if j == members[(a + 1) % len(members)]:
                    prediction[i, 1] = order[0]
        for predictor in range(3):
            accuracy[r, predictor] = np.mean(hits[predictor], axis=0)
    return accuracy, prediction


def reference_hidden(model, model_dir, words, layers):
    """(layer, word, dim): the state of the templated text's last token, one unpadded pass per word.

    model: the loaded model, in float32 as the toolkit runs it (a float64 pass moves the states of a 30-layer
    model by ~1e-4, enough to swap near-tied neighbours).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    threads = torch.get_num_threads()
    # One thread: many tiny passes on a shared machine are ten times slower with threads that spin between them.
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for word in words:
                ids = tokenizer(TEMPLATE.replace("{word}", word), return_tensors="pt")["input_ids"]
                states = model(input_ids=ids, output_hidden_states=True).hidden_states
                out.append([states[layer][0, -1].numpy() for layer in layers])
    finally:
        torch.set_num_threads(threads)
    return np.array(out).transpose(1, 0, 2)


def load_float32(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def single_token_ids(model_dir, words):
    """Each word's id when it is one token after a space (-1 otherwise), by encoding " word" and, for a leading
    lone-space token, the word alone."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for word in words:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(ids) == 2 and tokenizer.decode(ids[:1]) == " ":
            ids = ids[1:]
        out.append(ids[0] if len(ids) == 1 else -1)
    return np.array(out)


def check_against_reference(ds, model_dir, relations: dict, embedding: dict, hidden):
    """Compare the store's analogy variables with `reference_analogies` on the model's embeddings (name →
    (vocab, dim)) and on ``hidden`` (layer, word, dim) states."""
    rows = flat(relations)
    words = list(ds.word.values)
    labels = np.array([list(relations).index(r) for r, _, _ in rows])
    ks = [int(k) for k in ds.k.values]
    ids = single_token_ids(model_dir, words)
    np.testing.assert_array_equal(ds.word_token_id.values, ids)
    subject = np.array([ids[words.index(s)] for _, s, _ in rows])
    obj = np.array([ids[words.index(o)] for _, _, o in rows])
    used = (subject >= 0) & (obj >= 0)
    for name, matrix in embedding.items():
        np.testing.assert_array_equal(ds.pair_used.sel(space=name).values, used)
        accuracy, prediction = reference_analogies(matrix, np.maximum(subject, 0), np.maximum(obj, 0), labels, used, ks)
        np.testing.assert_allclose(ds.analogy_accuracy.sel(space=name).values, accuracy, atol=1e-12)
        np.testing.assert_array_equal(ds.analogy_prediction.sel(space=name).values, prediction)
    word_subject = np.array([words.index(s) for _, s, _ in rows])
    word_object = np.array([words.index(o) for _, _, o in rows])
    for i, layer in enumerate(ds.layer.values):
        accuracy, prediction = reference_analogies(hidden[i], word_subject, word_object, labels,
                                                   np.ones(len(rows), bool), ks)
        np.testing.assert_allclose(ds.hidden_analogy_accuracy.sel(layer=layer).values, accuracy, atol=1e-12)
        np.testing.assert_array_equal(ds.hidden_analogy_prediction.sel(layer=layer).values, prediction)


# ------------------------------------------------------------------------------------------------- tiny model

@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory, tiny_model, run_repgeo):
    work = tmp_path_factory.mktemp("relations")
    pairs = write_pairs(work / "pairs.jsonl", TINY_PAIRS)
    out = work / "relations.zarr"
    code, _, err = run_repgeo("relations", "analogies", "--model", tiny_model, "--pairs", pairs, "--out", out,
                              "--top-k", 3, "--layers", "0,2,4")
    assert code == 0, err
    return work, out


def test_tiny_analogies_equal_loops_over_the_models_weights(tiny_case, tiny_model):
    _, out = tiny_case
    ds = xr.open_zarr(out)
    model = load_float32(tiny_model)
    embedding = {"input": model.get_input_embeddings().weight.detach().numpy(),
                 "output": model.get_output_embeddings().weight.detach().numpy()}
    assert not np.allclose(embedding["input"], embedding["output"])  # untied: two different spaces
    hidden = reference_hidden(model, tiny_model, list(ds.word.values), [0, 2, 4])
    check_against_reference(ds, tiny_model, TINY_PAIRS, embedding, hidden)


def test_tiny_store_layout_and_provenance(tiny_case, tiny_model):
    _, out = tiny_case
    ds = xr.open_zarr(out)
    assert ds.attrs["repgeo"]["kind"] == "relations"
    assert list(ds.space.values) == ["input", "output"] and list(ds.layer.values) == [0, 2, 4]
    assert list(ds.predictor.values) == list(PREDICTORS) and list(ds.k.values) == [1, 3]
    assert list(ds.relation.values) == list(TINY_PAIRS)
    assert [(r, s, o) for r, s, o in zip(ds.pair_relation.values, ds.subject.values, ds.object.values)] == \
        flat(TINY_PAIRS)
    assert ds.analogy_accuracy.dims == ("space", "relation", "predictor", "k")
    assert ds.hidden_analogy_accuracy.dims == ("layer", "relation", "predictor", "k")
    assert ds.hidden_analogy_prediction.dims == ("layer", "pair", "predictor")
    np.testing.assert_array_equal(ds.n_pairs.values, [5, 5, 5])
    np.testing.assert_array_equal(ds.n_pairs_used.values, [[5, 5, 4]] * 2)  # " river" is two tokens
    river = int(np.flatnonzero(ds.subject.values == "river")[0])
    assert (ds.analogy_prediction.values[:, river] == -1).all() and (ds.hidden_analogy_prediction.values[:, river]
                                                                      >= 0).all()
    assert np.isnan(ds.crystal_pca.values[:, river]).all() and np.isfinite(ds.hidden_crystal_pca.values[:, river]).all()
    assert ds.in_fit.values.sum() == 9  # ceil(5 / 2) per relation
    attrs = ds.attrs
    assert attrs["model"]["tied_embeddings"] is False and attrs["model"]["weights_sha256"]
    assert attrs["parameters"] == {"spaces": ["input", "output", "hidden"], "layers": [0, 2, 4], "template": TEMPLATE,
                                   "top_k": 3, "lda_components": 2, "seed": 0, "ks": [1, 3]}
    assert attrs["pairs"]["n_pairs"] == 15 and attrs["pairs"]["n_words"] == len(ds.word)


def test_tiny_crystal_variables_equal_a_direct_computation(tiny_case, tiny_model):
    from sklearn.decomposition import PCA

    _, out = tiny_case
    ds = xr.open_zarr(out)
    hidden = reference_hidden(load_float32(tiny_model), tiny_model, list(ds.word.values), [2])[0]
    words = list(ds.word.values)
    D = np.array([hidden[words.index(o)] - hidden[words.index(s)] for _, s, o in flat(TINY_PAIRS)])
    labels = np.repeat([0, 1, 2], 5)

    def cos(a, b):
        return a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    for r in range(3):
        mine, rest = np.flatnonzero(labels == r), np.flatnonzero(labels != r)
        within = np.mean([cos(D[i], D[j]) for i in mine for j in mine if i < j])
        across = np.mean([cos(D[i], D[j]) for i in mine for j in rest])
        assert float(ds.hidden_parallelogram_cosine.sel(layer=2).values[r]) == pytest.approx(within, abs=1e-5)
        assert float(ds.hidden_parallelogram_cosine_other.sel(layer=2).values[r]) == pytest.approx(across, abs=1e-5)
    pca = PCA(n_components=2).fit_transform(D)
    np.testing.assert_allclose(np.abs(ds.hidden_crystal_pca.sel(layer=2).values), np.abs(pca), rtol=1e-4, atol=1e-5)
    length = np.array([len(o) - len(s) for _, s, o in flat(TINY_PAIRS)])
    r = abs(np.corrcoef(pca[:, 0], length)[0, 1])
    assert float(ds.hidden_distractor_length_corr.sel(layer=2)) == pytest.approx(r, abs=1e-4)


def test_tiny_figures(tiny_case):
    work, out = tiny_case
    written = relations_figures(str(out), str(work / "figures"))
    assert sorted(os.path.basename(p) for p in written) == ["analogy_accuracy.png", "analogy_accuracy_embeddings.png",
                                                           "crystal_metrics.png", "crystals.png"]
    assert all(os.path.getsize(p) > 10_000 for p in written)
    assert len(relations_figures(str(out), str(work / "two"), layers="2")) == 4
    with pytest.raises(UserError, match="layer 1 is not in"):
        relations_figures(str(out), str(work / "none"), layers="1")


def test_one_space_only(tmp_path, tiny_model, run_repgeo):
    pairs = write_pairs(tmp_path / "pairs.jsonl", TINY_PAIRS)
    code, _, err = run_repgeo("relations", "analogies", "--model", tiny_model, "--pairs", pairs, "--out",
                              tmp_path / "in.zarr", "--spaces", "input", "--top-k", 2, "--lda-components", 1)
    assert code == 0, err
    ds = xr.open_zarr(tmp_path / "in.zarr")
    assert list(ds.space.values) == ["input"] and "layer" not in ds.dims and "hidden_analogy_accuracy" not in ds
    assert ds.sizes["lda_component"] == 1
    written = relations_figures(str(tmp_path / "in.zarr"), str(tmp_path / "figures"))
    assert sorted(os.path.basename(p) for p in written) == ["analogy_accuracy_embeddings.png", "crystals.png"]


# ------------------------------------------------------------------------------------------------------- Markov

def save_tied_llama(directory):
    """The tiny Llama with one embedding matrix for input and output, its rows of unit norm: then
    unembedding[y] · embedding[x] = cos(x, y) ≤ 1 = its value at y = x, so the direct path must return x."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight.normal_()  # the padding row was initialised to zero, which has no unit-norm direction
        weight.div_(weight.norm(dim=1, keepdim=True))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_tied_model():
    return str(build_atomically(CACHE / "tiny-llama-tied-unit-v1", save_tied_llama))


@pytest.fixture(scope="module")
def markov_case(tmp_path_factory, tiny_tied_model, run_repgeo):
    work = tmp_path_factory.mktemp("markov")
    corpus = work / "corpus.txt"
    corpus.write_text(TINY_CORPUS * 3, encoding="utf-8")
    out = work / "markov.zarr"
    code, _, err = run_repgeo("relations", "markov", "--model", tiny_tied_model, "--corpus", corpus, "--out", out,
                              "--top", 40, "--min-count", 10)
    assert code == 0, err
    return work, corpus, out


def counter_reference(sequences, special=()):
    unigram = collections.Counter(t for s in sequences for t in s if t not in special)
    bigram = collections.Counter((a, b) for s in sequences for a, b in zip(s[:-1], s[1:])
                                 if a not in special and b not in special)
    return unigram, bigram


def successors(bigram: collections.Counter, x: int) -> list:
    return sorted((y for (a, y) in bigram if a == x), key=lambda y: (-bigram[(x, y)], y))


def test_markov_equals_counter_and_the_model(markov_case, tiny_tied_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, corpus, out = markov_case
    ds = xr.open_zarr(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tied_model)
    ids = tokenizer(corpus.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    unigram, bigram = counter_reference([ids])
    xs = [x for x, _ in sorted(unigram.items(), key=lambda item: (-item[1], item[0]))[:40]]
    np.testing.assert_array_equal(ds.token_id.values, xs)
    np.testing.assert_array_equal(ds.markov_count.values, [unigram[x] for x in xs])
    tops = [successors(bigram, x)[:5] for x in xs]
    np.testing.assert_array_equal(ds.markov_bigram_top.values, [t + [-1] * (5 - len(t)) for t in tops])
    np.testing.assert_array_equal(ds.markov_bigram.values, [t[0] if t else -1 for t in tops])
    np.testing.assert_array_equal(ds.markov_bigram_count.values, [sum(c for (a, _), c in bigram.items() if a == x)
                                                                  for x in xs])
    # The model's next token after <s> x (the tiny tokenizer puts <s> first), one forward pass per token.
    model = AutoModelForCausalLM.from_pretrained(tiny_tied_model, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[tokenizer.bos_token_id, x] for x in xs])).logits[:, -1].numpy()
    # float32 against float64: the ids must carry the float64 top-5 logits, in order (near-ties may swap).
    best5 = -np.sort(-logits, axis=1)[:, :5]
    np.testing.assert_allclose(np.take_along_axis(logits, ds.markov_model_top.values, 1), best5, atol=1e-5)
    log_q = scipy.special.log_softmax(logits, axis=1)
    for row, x in enumerate(xs):
        counts = np.array([bigram[(x, y)] for y in range(logits.shape[1])], dtype=float)
        if counts.sum() >= 10:
            assert ds.markov_kl.values[row] == pytest.approx(scipy.stats.entropy(counts, np.exp(log_q[row])),
                                                             rel=1e-4)
        else:
            assert np.isnan(ds.markov_kl.values[row])
    assert np.isfinite(ds.markov_kl.values).any()
    best = np.array([t[0] if t else -1 for t in tops])
    have = best >= 0
    agreement = ds.markov_agreement.sel(k=1)
    assert float(agreement.sel(comparison="model_bigram")) == pytest.approx(
        (ds.markov_model.values[have] == best[have]).mean())
    frequent = xs[:5]
    assert float(ds.markov_agreement.sel(comparison="unigram_bigram", k=5)) == pytest.approx(
        np.isin(best[have], frequent).mean())
    assert ds.attrs["corpus"]["n_tokens"] == len(ids) and ds.attrs["corpus"]["context_prefix"] == [
        tokenizer.bos_token_id]


def test_the_direct_path_of_tied_unit_embeddings_is_the_identity(markov_case):
    _, _, out = markov_case
    ds = xr.open_zarr(out)
    np.testing.assert_array_equal(ds.markov_direct.values, ds.token_id.values)
    assert float(ds.markov_agreement.sel(comparison="direct_identity", k=1)) == 1.0
    assert ds.attrs["model"]["tied_embeddings"] is True


def test_markov_figure(markov_case):
    work, _, out = markov_case
    assert [os.path.basename(p) for p in relations_figures(str(out), str(work / "figures"))] == ["markov_agreement.png"]
    with pytest.raises(UserError, match="no layers"):
        relations_figures(str(out), str(work / "figures"), layers="1")


def test_markov_from_an_activation_store_counts_each_prompt(tmp_path, tiny_tied_model, make_tiny_texts,
                                                            write_jsonl, run_repgeo):
    import zarr

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in make_tiny_texts(6, seed=3)])
    store = tmp_path / "acts.zarr"
    code, _, err = run_repgeo("extract", "--model", tiny_tied_model, "--prompts", prompts, "--out", store)
    assert code == 0, err
    code, _, err = run_repgeo("relations", "markov", "--model", tiny_tied_model, "--corpus", store, "--out",
                              tmp_path / "m.zarr", "--top", 15)
    assert code == 0, err
    group = zarr.open_group(str(store), mode="r")
    sequences = [group["input_ids"][p, : group["n_tokens"][p]].tolist() for p in range(6)]
    assert all(s[0] == 1 for s in sequences)  # <s> first: a special token, never counted
    unigram, bigram = counter_reference(sequences, special={0, 1, 2, 3})
    ds = xr.open_zarr(tmp_path / "m.zarr")
    xs = [x for x, _ in sorted(unigram.items(), key=lambda item: (-item[1], item[0]))[:15]]
    np.testing.assert_array_equal(ds.token_id.values, xs)
    np.testing.assert_array_equal(ds.markov_bigram.values, [(successors(bigram, x) or [-1])[0] for x in xs])
    assert ds.attrs["corpus"]["kind"] == "activations" and ds.attrs["corpus"]["n_sequences"] == 6


# ---------------------------------------------------------------------------------------------------- SmolLM2

@pytest.mark.slow  # ~15 s alone, over 30 s on a busy machine
def test_smollm2_analogies_equal_loops_and_the_states_are_not_the_sink(tmp_path, smollm2_hf, run_repgeo):
    pairs = write_pairs(tmp_path / "pairs.jsonl", SMOL_PAIRS)
    out = tmp_path / "smol.zarr"
    code, _, err = run_repgeo("relations", "analogies", "--model", smollm2_hf, "--pairs", pairs, "--out", out,
                              "--layers", "0,12,20")
    assert code == 0, err
    ds = xr.open_zarr(out)
    assert ds.attrs["model"]["tied_embeddings"] is True
    for name in ("analogy_accuracy", "analogy_prediction", "crystal_pca", "silhouette_all"):
        np.testing.assert_array_equal(ds[name].sel(space="input").values, ds[name].sel(space="output").values)
    np.testing.assert_array_equal(ds.n_pairs_used.sel(space="input").values, [6, 6, 5])  # " 12": two digits
    twelve = int(np.flatnonzero(ds.subject.values == "twelve")[0])
    assert not ds.pair_used.values[0, twelve] and (ds.hidden_analogy_prediction.values[:, twelve] >= 0).all()
    model = load_float32(smollm2_hf)
    hidden = reference_hidden(model, smollm2_hf, list(ds.word.values), [0, 12, 20])
    check_against_reference(ds, smollm2_hf, SMOL_PAIRS,
                            {"input": model.get_input_embeddings().weight.detach().numpy()}, hidden)
    # With context before the word, the states of different words are not the attention sink's (cosine ~1).
    for states in hidden[1:]:
        unit = states / np.linalg.norm(states, axis=1, keepdims=True)
        cosines = (unit @ unit.T)[np.triu_indices(len(unit), 1)]
        assert cosines.max() < 0.99
    # The averaged delta finds capitals and female forms from the embeddings already.
    accuracy = ds.analogy_accuracy.sel(space="input", predictor="averaged_delta", k=1)
    assert float(accuracy.sel(relation="male_female")) >= 0.5


def test_smollm2_markov_direct_path_equals_a_float64_product(tmp_path, smollm2_hf, run_repgeo):
    from transformers import AutoModelForCausalLM

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TINY_CORPUS * 2, encoding="utf-8")
    out = tmp_path / "m.zarr"
    code, _, err = run_repgeo("relations", "markov", "--model", smollm2_hf, "--corpus", corpus, "--out", out,
                              "--top", 30)
    assert code == 0, err
    ds = xr.open_zarr(out)
    E = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float64).get_input_embeddings().weight
    scores = (E[torch.tensor(ds.token_id.values)] @ E.T).detach().numpy()  # tied: unembedding = embedding
    best5 = -np.sort(-scores, axis=1)[:, :5]  # near-ties may swap between float32 and float64: compare values
    np.testing.assert_allclose(np.take_along_axis(scores, ds.markov_direct_top.values, 1), best5, atol=1e-5)
    assert ds.attrs["corpus"]["context_prefix"] == []  # SmolLM2's tokenizer puts nothing first


# ------------------------------------------------------------------------------------------------- bad input

def word_level_model(directory):
    """The tiny Llama with a word-level tokenizer of TINY_CORPUS's words: any other word is <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(TINY_CORPUS.replace(",", " ").replace(".", " ").split()))
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    save_tiny_llama(directory, PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                       pad_token="<pad>", unk_token="<unk>"))


@pytest.fixture(scope="session")
def tiny_word_level_model():
    return str(build_atomically(CACHE / "tiny-llama-wordlevel-v1", word_level_model))


def run_in_process(argv, capsys) -> tuple:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(errors) == 1, err
    return code, errors[0]


def lines(rows) -> str:
    return "\n".join(json.dumps(r) for r in rows) + "\n"


GOOD = lines({"relation": r, "subject": s, "object": o} for r, s, o in flat(TINY_PAIRS))
BAD_PAIRS = [
    ("unknown field", GOOD + lines([{"relation": "first", "subject": "sand", "object": "clay", "note": "x"}]),
     "unknown field 'note'"),
    ("missing field", lines([{"relation": "first", "subject": "sand"}]), "no 'object' field"),
    ("two pairs", GOOD + lines([{"relation": "fourth", "subject": "sand", "object": "clay"},
                                {"relation": "fourth", "subject": "room", "object": "air"}]),
     "relation 'fourth' has 2 pair(s)"),
    ("repeated pair", GOOD + lines([{"relation": "first", "subject": "sand", "object": "water"}]), "repeats the pair"),
    ("same word", GOOD + lines([{"relation": "first", "subject": "sand", "object": "sand"}]),
     "subject and object are both"),
    ("spaces", GOOD + lines([{"relation": "first", "subject": " sand", "object": "clay"}]), "surrounding spaces"),
    ("not a string", GOOD + lines([{"relation": "first", "subject": 3, "object": "clay"}]), "must be a string"),
    ("broken json", GOOD + "{\"relation\": \n", "is not valid JSON"),
    ("duplicate key", '{"relation": "a", "relation": "b", "subject": "x", "object": "y"}\n', "appears twice"),
]


@pytest.mark.parametrize("name, text, words", BAD_PAIRS, ids=[b[0] for b in BAD_PAIRS])
def test_bad_relation_files_are_one_line(name, text, words, tmp_path, tiny_model, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(text, encoding="utf-8")
    out = tmp_path / "out.zarr"
    code, line = run_in_process(["relations", "analogies", "--model", tiny_model, "--pairs", pairs, "--out", out],
                                capsys)
    assert code == 2 and words in line and str(pairs) in line
    assert os.listdir(tmp_path) == ["pairs.jsonl"]


BAD_OPTIONS = [
    (["--layers", "99"], "--layers item '99' is outside the model; layers are 0..4"),
    (["--template", "The word"], "holds {word} 0 times"),
    (["--template", "{word} is here"], "puts the word first"),
    (["--template", "  {word}"], "puts the word first"),
    (["--template", "The word is s{word}"], "merges 'and' with the text before it"),
    (["--template", "The word is {word}nd"], "with the text after it"),
    (["--spaces", "input,middle"], "unknown space 'middle'"),
    (["--spaces", "input", "--layers", "1"], "add hidden to --spaces"),
    (["--lda-components", "3"], "--lda-components 3 needs at least 4 relations"),
    (["--top-k", "40"], "--top-k 40 exceeds the 20 words the hidden space can return"),
]


@pytest.mark.parametrize("options, words", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_analogy_options_are_one_line(options, words, tmp_path, tiny_model, capsys):
    relations = dict(TINY_PAIRS)
    if "merges" in words or "text after" in words:  # its first word: "sand" is one token, " sa" + "nd" is not
        relations = {"x": [("and" if "merges" in words else "sa", "so"), ("at", "in"), ("to", "turn")], **TINY_PAIRS}
    pairs = write_pairs(tmp_path / "pairs.jsonl", relations)
    out = tmp_path / "out.zarr"
    code, line = run_in_process(["relations", "analogies", "--model", tiny_model, "--pairs", pairs, "--out", out,
                                 *options], capsys)
    assert code == 2 and words in line, line
    assert os.listdir(tmp_path) == ["pairs.jsonl"]


def test_a_word_the_tokenizer_cannot_encode_is_one_line(tmp_path, tiny_word_level_model, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl", {**TINY_PAIRS, "fourth": [("sand", "zebra"), ("clay", "water"),
                                                                            ("room", "air")]})
    code, line = run_in_process(["relations", "analogies", "--model", tiny_word_level_model, "--pairs", pairs,
                                 "--out", tmp_path / "out.zarr"], capsys)
    assert code == 2 and "cannot encode 'zebra' (it becomes <unk>)" in line
    assert os.listdir(tmp_path) == ["pairs.jsonl"]


def test_an_existing_output_is_refused(tmp_path, tiny_model, capsys):
    (tmp_path / "out.zarr").mkdir()
    code, line = run_in_process(["relations", "analogies", "--model", tiny_model, "--out", tmp_path / "out.zarr"],
                                capsys)
    assert code == 2 and "already exists" in line
    code, line = run_in_process(["relations", "markov", "--model", tiny_model, "--corpus", tmp_path, "--out",
                                 tmp_path / "out.zarr"], capsys)
    assert code == 2 and "already exists" in line


@pytest.mark.parametrize("content, words", [
    (b"caf\xe9 au lait", "is not UTF-8 text (byte 0xe9 at offset 3)"),
    (b"text\x00with a NUL", "holds NUL bytes"),
    (b"  \n ", "is empty"),
], ids=["latin1", "binary", "empty"])
def test_a_corpus_that_is_not_utf8_text_is_one_line(content, words, tmp_path, tiny_model, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    code, line = run_in_process(["relations", "markov", "--model", tiny_model, "--corpus", corpus, "--out",
                                 tmp_path / "m.zarr"], capsys)
    assert code == 2 and words in line
    assert os.listdir(tmp_path) == ["corpus.txt"]


def test_a_corpus_that_is_no_activation_store_is_one_line(tmp_path, tiny_case, tiny_model, capsys):
    _, relations_store = tiny_case
    for corpus, words in ((tmp_path, "is a directory but not an activation store"),
                          (relations_store, "is a repgeo relations store, but an activations store is needed"),
                          (tmp_path / "missing.txt", "does not exist")):
        code, line = run_in_process(["relations", "markov", "--model", tiny_model, "--corpus", corpus, "--out",
                                     tmp_path / "m.zarr"], capsys)
        assert code == 2 and words in line
    assert os.listdir(tmp_path) == []


def test_a_store_of_another_tokenizer_is_refused(tmp_path, tiny_word_level_model, many_prompts, capsys):
    code, line = run_in_process(["relations", "markov", "--model", tiny_word_level_model, "--corpus",
                                 many_prompts.store_1rank, "--out", tmp_path / "m.zarr"], capsys)
    assert code == 2 and "tokenized by another tokenizer" in line
    assert os.listdir(tmp_path) == []


def test_validate_and_info_know_relations_and_markov_stores(tiny_case, markov_case, run_repgeo):
    import shutil

    import zarr

    for out, kind in ((tiny_case[1], "relations"), (markov_case[2], "markov")):
        code, stdout, err = run_repgeo("validate", "--deep", out)
        assert (code, stdout.strip()) == (0, f"{out}: valid"), stdout + err
        code, stdout, err = run_repgeo("info", out)
        assert code == 0 and stdout.startswith(f"{kind} store {out}"), err
    damaged = markov_case[0] / "damaged.zarr"
    shutil.copytree(markov_case[2], damaged)
    zarr.open_group(str(damaged), mode="r+").attrs["parameters"] = "top 40"  # a hand edit of the wrong type
    code, stdout, _ = run_repgeo("validate", damaged)
    assert code == 1 and "parameters" in stdout
