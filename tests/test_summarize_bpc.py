"""``bpc`` of ``repgeo summarize``: the prompt's token losses in bits per character of the text they predict.

The references here do not use the toolkit: the losses are read from the activation store with zarr, the
characters come from hand-counted strings and from the tokenizer's own offset mapping, assigned by a rule written
differently from the toolkit's (each character belongs to the first text token whose span holds it; the toolkit
cuts the text at the tokens' running end offsets), and the token at a shuffled prompt's first position is found
by its id, not by redoing the shuffle.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import zarr
from transformers import AutoTokenizer

#: Prompts for the tiny tokenizer (byte-level BPE trained on English words): every non-ASCII character is split
#: into one token per UTF-8 byte.
SHORT = "The river carries sand."  # <s> + 9 tokens: 'The' 'Ġriv' 'er' 'Ġc' 'ar' 'r' 'ies' 'Ġsand' '.'
MIXED = "Sand 日本語 and клей."  # <s> + 23 tokens: 3 per CJK character, 2 per Cyrillic one
LONG = "A library keeps books, maps and letters; readers sit at long tables."  # <s> + 29 tokens
TEXTS = [SHORT, MIXED, LONG]
MAX_TOKENS = 20  # keeps SHORT whole; cuts MIXED inside 'е' (its first byte kept) and LONG after 'Ġr' of "readers"


def store_arrays(path) -> dict:
    group = zarr.open_group(str(path), mode="r")
    return {name: array[...] for name, array in group.arrays()}


def first_owner(offsets, is_text) -> dict:
    """Character position → the index of the first text token whose span [start, end) holds it."""
    owner = {}
    for k, ((start, end), text) in enumerate(zip(offsets, is_text)):
        for c in range(start, end) if text else ():
            owner.setdefault(c, k)
    return owner


def reference_bpc(losses, characters: int) -> float:
    """Σ losses in bits ÷ characters, in float64."""
    return float(np.sum(np.asarray(losses, dtype=np.float64))) / math.log(2) / characters


def encoding(tokenizer, text: str, add_special_tokens: bool, first: int | None = None) -> tuple:
    """(ids, offsets, is_text) of ``text`` as extract encodes it (``first``: the --bos always token)."""
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                    return_special_tokens_mask=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    is_text = [m == 0 for m in enc["special_tokens_mask"]]
    if first is not None:
        ids, offsets, is_text = [first, *ids], [(0, 0), *offsets], [False, *is_text]
    return ids, offsets, is_text


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory, write_jsonl):
    return write_jsonl(tmp_path_factory.mktemp("bpc") / "prompts.jsonl", [{"text": t, "i": i}
                                                                           for i, t in enumerate(TEXTS)])


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def extract_and_summarize(run_repgeo, model, prompts, directory, *extract_args,
                          summarize_args=("--observables", "bpc")) -> tuple:
    """(store, results, summarize's stderr) of extract with ``extract_args`` and summarize with ``summarize_args``."""
    store, results = directory / "store.zarr", directory / "results.zarr"
    code, _, err = run_repgeo("extract", "--model", model, "--prompts", prompts, "--out", store, "--dtype", "float32",
                              *extract_args)
    assert code == 0, err
    code, _, err = run_repgeo("summarize", "--store", store, "--out", results, "--workers", 1, *summarize_args)
    assert code == 0, err
    return store, results, err


@pytest.fixture(scope="module")
def auto_bos(tmp_path_factory, tiny_model, prompts_file, run_repgeo):
    """The tiny model's own <s> first (--bos auto), --max-tokens 20, every default observable."""
    return extract_and_summarize(run_repgeo, tiny_model, prompts_file, tmp_path_factory.mktemp("auto"),
                                 "--max-tokens", MAX_TOKENS, summarize_args=())


def test_bpc_with_a_bos_counts_every_stored_text_character(auto_bos, tiny_tokenizer):
    store, results, err = auto_bos
    s, r = store_arrays(store), store_arrays(results)
    assert s["n_tokens"].tolist() == [10, MAX_TOKENS, MAX_TOKENS]
    assert not only_bpc_lines(err)  # nothing to note
    # Hand-counted characters of the text the stored tokens cover, behind <s> (predicted from position 1 on):
    # SHORT whole; MIXED up to 'е', whose first UTF-8 byte is the last stored token (a character belongs to the
    # first token that holds part of it); LONG up to the "r" of "readers".
    covered = [SHORT, "Sand 日本語 and кле", "A library keeps books, maps and letters; r"]
    assert [len(c) for c in covered] == [23, 16, 42]
    for p, text in enumerate(covered):
        assert TEXTS[p].startswith(text)
        n = s["n_tokens"][p]
        assert np.isnan(s["token_loss"][p, 0]) and np.isfinite(s["token_loss"][p, 1:n]).all()
        assert r["bpc"][p] == pytest.approx(reference_bpc(s["token_loss"][p, 1:n], len(text)), rel=1e-12), p
        # the same from the tokenizer's offset mapping: the characters owned by the stored tokens
        ids, offsets, is_text = encoding(tiny_tokenizer, TEXTS[p], add_special_tokens=True)
        assert ids[:n] == s["input_ids"][p, :n].tolist() and not is_text[0]
        owner = first_owner(offsets[:n], is_text[:n])
        assert len(owner) == len(text)
    assert r["bpc"].dtype == np.float64 and r["loss"].tolist() == s["loss"].tolist()
    # the store's mean loss and bpc agree on SHORT: loss × 9 tokens / ln 2 / 23 characters
    assert r["bpc"][0] == pytest.approx(float(s["loss"][0]) * 9 / math.log(2) / 23, rel=1e-6)


def test_results_with_bpc_are_valid_and_readable(auto_bos, run_repgeo):
    import toolkit

    _, results, _ = auto_bos
    code, out, err = run_repgeo("validate", results)
    assert (code, out.strip()) == (0, f"{results}: valid"), out + err
    code, out, err = run_repgeo("info", results)
    assert code == 0 and "bpc" in out, err
    ds = toolkit.open_results(str(results))
    assert ds.bpc.dims == ("prompt",) and "bpc" in ds.attrs["parameters"]["observables"]
    assert ds.bpc.groupby("i").mean().sizes == {"i": 3}


@pytest.fixture(scope="module")
def no_bos(tmp_path_factory, tiny_model, prompts_file, run_repgeo):
    """No special token (--bos never): position 0 holds the text's first token, predicted by nothing; level 1
    variants too (4 blocks of tokens in a seeded order)."""
    return extract_and_summarize(run_repgeo, tiny_model, prompts_file, tmp_path_factory.mktemp("never"),
                                 "--bos", "never", "--shuffle-levels", "0,1")


def test_bpc_without_bos_leaves_out_the_first_token_and_its_characters(no_bos):
    store, results, _ = no_bos
    s, r = store_arrays(store), store_arrays(results)
    unshuffled = np.flatnonzero(s["shuffle_level"] == 0)
    assert s["source_prompt"][unshuffled].tolist() == [0, 1, 2]
    # hand-counted: the text after its first token ('The', 'Sa', 'A')
    after_first = [" river carries sand.", "nd 日本語 and клей.", " library keeps books, maps and letters; readers "
                   "sit at long tables."]
    for p, text in zip(unshuffled, after_first):
        n = s["n_tokens"][p]
        assert TEXTS[s["source_prompt"][p]].endswith(text)
        assert r["bpc"][p] == pytest.approx(reference_bpc(s["token_loss"][p, 1:n], len(text)), rel=1e-12), p


def test_bpc_of_shuffled_variants_without_bos(no_bos, tiny_tokenizer):
    """Every text token but the one the shuffle put first is predicted: the characters are the text's but those
    of that token, found here by its id (any token with that id owns the same characters in these texts)."""
    store, results, _ = no_bos
    s, r = store_arrays(store), store_arrays(results)
    shuffled = np.flatnonzero(s["shuffle_level"] == 1)
    assert len(shuffled) == 3
    for p in shuffled:
        text = TEXTS[s["source_prompt"][p]]
        ids, offsets, is_text = encoding(tiny_tokenizer, text, add_special_tokens=False)
        n = s["n_tokens"][p]
        stored = s["input_ids"][p, :n].tolist()
        assert sorted(stored) == sorted(ids) and stored != ids
        owner = first_owner(offsets, is_text)
        first = [k for k, i in enumerate(ids) if i == stored[0]]
        owned = {sum(1 for c, k in owner.items() if k != first_k) for first_k in first}
        assert len(owned) == 1, (p, first)
        assert r["bpc"][p] == pytest.approx(reference_bpc(s["token_loss"][p, 1:n], owned.pop()), rel=1e-12), p


def test_bpc_behind_a_chosen_bos_token_counts_the_whole_text_at_every_shuffle_level(
        tmp_path, tiny_model, prompts_file, run_repgeo):
    store, results, _ = extract_and_summarize(run_repgeo, tiny_model, prompts_file, tmp_path, "--bos", "always",
                                              "--bos-token", "</s>", "--shuffle-levels", "0,1")
    s, r = store_arrays(store), store_arrays(results)
    assert (s["input_ids"][:, 0] == AutoTokenizer.from_pretrained(tiny_model).convert_tokens_to_ids("</s>")).all()
    for p in range(len(s["n_tokens"])):
        n, text = s["n_tokens"][p], TEXTS[s["source_prompt"][p]]
        assert r["bpc"][p] == pytest.approx(reference_bpc(s["token_loss"][p, 1:n], len(text)), rel=1e-12), p
    level0, level1 = (np.flatnonzero(s["shuffle_level"] == level) for level in (0, 1))
    assert (r["bpc"][level1] != r["bpc"][level0]).all()


def test_bpc_alone_equals_bpc_among_all_observables_and_resumes(auto_bos, tmp_path, run_repgeo, same_store):
    store, full, _ = auto_bos
    alone = tmp_path / "alone.zarr"
    code, _, err = run_repgeo("summarize", "--store", store, "--out", alone, "--workers", 1, "--observables", "bpc")
    assert code == 0, err
    r = store_arrays(alone)
    assert set(r) == {"bpc", "loss", "done", "prompt", "layer", "n2", "k", "n_tokens", "i"}
    np.testing.assert_array_equal(r["bpc"], store_arrays(full)["bpc"])
    # a run that stopped after prompt 0: resume fills in the others' bpc
    resumed = tmp_path / "resumed.zarr"
    shutil.copytree(alone, resumed)
    group = zarr.open_group(str(resumed), mode="r+")
    group["done"][1:] = False
    group["bpc"][1:] = np.nan
    code, _, err = run_repgeo("summarize", "--store", store, "--out", resumed, "--workers", 1, "--observables", "bpc",
                              "--resume")
    assert code == 0 and "2 prompts to do, 1 done before" in err, err
    same_store(resumed, alone)


def only_bpc_lines(err: str) -> list:
    """The notes about bpc (each begins so; a test's directory may hold "bpc" in its name)."""
    return [line for line in err.splitlines() if line.startswith("summarize: bpc")]


def test_withheld_texts_give_nan_and_one_note(tmp_path, tiny_model, prompts_file, run_repgeo):
    store, results, err = extract_and_summarize(run_repgeo, tiny_model, prompts_file, tmp_path, "--withhold-texts",
                                                summarize_args=("--observables", "bpc,norm"))
    r = store_arrays(results)
    assert r["done"].all() and np.isnan(r["bpc"]).all() and np.isfinite(r["norm_mean"]).all()
    notes = only_bpc_lines(err)
    assert len(notes) == 1 and "withholds its texts" in notes[0] and "Traceback" not in err, err


@pytest.mark.slow  # two summarize runs (16 s): in the full suite, to keep the quick subset under 10 minutes
def test_missing_or_other_tokenizer_gives_nan_and_one_note(tmp_path, tiny_model, prompts_file, run_repgeo):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    store, results, err = extract_and_summarize(run_repgeo, str(model), prompts_file, tmp_path)
    assert np.isfinite(store_arrays(results)["bpc"]).all() and not only_bpc_lines(err)

    moved = tmp_path / "moved"
    model.rename(moved)
    out = tmp_path / "missing.zarr"
    code, _, err = run_repgeo("summarize", "--store", store, "--out", out, "--workers", 1, "--observables", "bpc,norm")
    assert code == 0, err
    r = store_arrays(out)
    assert r["done"].all() and np.isnan(r["bpc"]).all() and np.isfinite(r["norm_mean"]).all()
    notes = only_bpc_lines(err)
    assert len(notes) == 1 and str(model) in notes[0] and "not at" in notes[0] and "Traceback" not in err, err

    moved.rename(model)  # the same files, but another tokenizer: refused by its fingerprint
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens(["riverbank"])
    tokenizer.save_pretrained(model)
    out = tmp_path / "other.zarr"
    code, _, err = run_repgeo("summarize", "--store", store, "--out", out, "--workers", 1, "--observables", "bpc")
    assert code == 0, err
    assert np.isnan(store_arrays(out)["bpc"]).all()
    notes = only_bpc_lines(err)
    assert len(notes) == 1 and "fingerprint" in notes[0], err


def test_a_text_that_no_longer_encodes_to_the_stored_ids_gives_nan(auto_bos, tmp_path):
    """Were the tokenizer to encode a text differently from extract (same fingerprint, another tokenizers
    release), that prompt's bpc is NaN, with one note; the others are computed. Here a stored id is changed
    behind the store's digests, so the function is called directly."""
    from toolkit.summarize.bpc import store_bpc

    store, results, _ = auto_bos
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    group = zarr.open_group(str(copy), mode="r+")
    ids = group["input_ids"][...]
    ids[1, 3] = ids[1, 2]
    group["input_ids"][...] = ids
    notes = []
    values = store_bpc(str(copy), zarr.open_group(str(copy), mode="r"), [0, 1, 2], notes.append)
    expected = store_arrays(results)["bpc"]
    assert values[0] == expected[0] and values[2] == expected[2] and math.isnan(values[1])
    assert len(notes) == 1 and "bpc is NaN for 1 prompts (first: 1)" in notes[0], notes


def test_a_store_without_model_files_gives_nan(tmp_path, run_repgeo):
    """A store whose model records no location (written by hand, as the synthetic test stores)."""
    from test_summarize import write_gaussian_store

    store = tmp_path / "store.zarr"
    write_gaussian_store(store, prompts=range(2))
    out = tmp_path / "results.zarr"
    code, _, err = run_repgeo("summarize", "--store", store, "--out", out, "--workers", 1, "--observables", "bpc")
    assert code == 0, err
    assert np.isnan(store_arrays(out)["bpc"]).all()
    notes = only_bpc_lines(err)
    assert len(notes) == 1 and "records no location" in notes[0], err


# ------------------------------------------------------------------------------------------------------------
# The real SmolLM2

PARAGRAPH = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
             "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. Within a "
             "few decades, print shops had spread to more than two hundred cities across Europe, and the price of "
             "books fell sharply. Scholars could now compare identical copies of a text, which made it easier to "
             "correct errors and to build on the work of others.")


def assert_real_bpc(store, results, tokenizer) -> float:
    s, r = store_arrays(store), store_arrays(results)
    n = int(s["n_tokens"][0])
    ids, offsets, is_text = encoding(tokenizer, PARAGRAPH, add_special_tokens=True)
    assert ids == s["input_ids"][0, :n].tolist() and all(is_text)  # SmolLM2 adds no special token
    # no BOS: the first token ("The") is context; the other tokens predict the rest of the paragraph
    owner = first_owner(offsets, is_text)
    characters = sum(1 for k in owner.values() if k != 0)
    assert characters == len(PARAGRAPH) - len("The")
    bpc = float(r["bpc"][0])
    assert bpc == pytest.approx(reference_bpc(s["token_loss"][0, 1:n], characters), rel=1e-12)
    assert 0.6 < bpc < 1.1, bpc  # measured 0.82: 2.9 nats per token of 4.9 characters
    return bpc


@pytest.mark.slow
def test_real_smollm2_bpc_is_plausible(tmp_path, smollm2_hf, write_jsonl, run_repgeo):
    prompts = write_jsonl(tmp_path / "paragraph.jsonl", [{"text": PARAGRAPH}])
    store, results, err = extract_and_summarize(run_repgeo, smollm2_hf, prompts, tmp_path)
    assert not only_bpc_lines(err)
    assert_real_bpc(store, results, AutoTokenizer.from_pretrained(smollm2_hf))


@pytest.mark.slow
def test_real_smollm2_alias_bpc_uses_the_gguf_tokenizer(tmp_path, smollm2_hf, write_jsonl, run_repgeo):
    """The packaged GGUF (an alias): the tokenizer is read from the GGUF file, as extract read it."""
    prompts = write_jsonl(tmp_path / "paragraph.jsonl", [{"text": PARAGRAPH}])
    store, results, err = extract_and_summarize(run_repgeo, "smollm2-135m", prompts, tmp_path)
    assert not only_bpc_lines(err)
    assert_real_bpc(store, results, AutoTokenizer.from_pretrained(smollm2_hf))
