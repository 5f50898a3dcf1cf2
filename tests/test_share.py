"""``repgeo subset`` and ``repgeo merge``: subsets hold exactly the source's selected slabs, complementary subsets
merge back into the source, merge refuses stores of another model, tokenizer or settings, labels are combined as
documented, ``--where`` takes nothing but comparisons of labels with literals, and a float16 down-cast never
overflows silently."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import zarr

from toolkit.errors import UserError
from toolkit.share.assemble import narrow
from toolkit.share.where import select_where
from toolkit.store.zarr_io import consolidate

#: Flow targets of the contribution store: prompts shorter than 10 tokens have fewer targets.
FLOW = ["--contributions", "--flow-targets", "0,5,9", "--flow-gradients"]
N_PROMPTS = 12


def _rows(texts: list) -> list:
    """Prompts with a string label, an integer label missing on some (a float64 label), a boolean and an index."""
    rows = []
    for i, text in enumerate(texts):
        row = {"text": text, "language": ("srp", "eng", "hrv")[i % 3], "flag": i % 2 == 0, "i": i}
        if i % 4:
            row["year"] = 1980 + 3 * i
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("share")


@pytest.fixture(scope="module")
def prompts(work, write_jsonl, make_tiny_texts):
    return write_jsonl(work / "a.jsonl", _rows(make_tiny_texts(N_PROMPTS, seed=11, min_words=2, max_words=30)))


def _extract(run_repgeo, model, prompts, out, *extra):
    code, _, err = run_repgeo("extract", "--model", model, "--prompts", prompts, "--out", out, "--dtype", "float32",
                              *extra)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def store(work, prompts, tiny_model, run_repgeo):
    """A float32 store with contribution arrays, of prompts of 3 to ~40 tokens."""
    return _extract(run_repgeo, tiny_model, prompts, work / "a.zarr", *FLOW)


@pytest.fixture(scope="module")
def subset(work, store, run_repgeo):
    """``subset(name, *options)`` → the subset of ``store`` at work/name, made once per set of options."""
    made = {}

    def make(name, *options, source=None):
        out = work / name
        if out not in made:
            code, _, err = run_repgeo("subset", source or store, "--out", out, *options)
            assert code == 0, err
            made[out] = options
        return out

    return make


def arrays(path) -> dict:
    group = zarr.open_group(str(path), mode="r")
    return {name: array[...] for name, array in group.arrays()}


def attributes(path) -> dict:
    return dict(zarr.open_group(str(path), mode="r").attrs)


def assert_valid(path, run_repgeo):
    code, out, err = run_repgeo("validate", "--deep", path)
    assert code == 0 and out.strip().endswith("valid"), out + err


def assert_refused(run_repgeo, the_error_line, out, *args) -> str:
    """The one error line of a refused command, after checking that nothing was written at ``out``."""
    code, _, err = run_repgeo(*args)
    assert code == 2, err
    assert not os.path.exists(out) and not os.path.exists(f"{out}.partial")
    return the_error_line(err)


def test_subset_holds_the_sources_selected_slabs(store, subset, run_repgeo):
    out = subset("srp-late.zarr", "--where", 'language in ["srp", "hrv"] and year >= 1985', "--layers", "1,3")
    assert_valid(out, run_repgeo)
    src, new = arrays(store), arrays(out)
    kept = np.flatnonzero(np.isin(src["language"], ["srp", "hrv"]) & (src["year"] >= 1985))
    assert len(kept) and (new["prompt"] == np.arange(len(kept))).all()
    n = src["n_tokens"][kept]
    width = int(n.max())
    assert new["hidden"].shape == (len(kept), 2, width, src["hidden"].shape[3])
    assert new["layer"].tolist() == [1, 3]  # the source's layer numbers
    for i, p in enumerate(kept):
        np.testing.assert_array_equal(new["hidden"][i, :, : n[i]], src["hidden"][p, [1, 3], : n[i]])
        assert np.isnan(new["hidden"][i, :, n[i]:]).all()
        assert new["input_ids"][i].tolist() == src["input_ids"][p, :width].tolist()
        np.testing.assert_array_equal(new["token_loss"][i], src["token_loss"][p, :width])
    for name in ("n_tokens", "loss", "done", "text", "language", "year", "flag", "i"):
        np.testing.assert_array_equal(new[name], src[name][kept], err_msg=name)
        assert new[name].dtype == src[name].dtype, name
    assert not {"block", "head", "head_norm", "flow", "flow_target"} & set(new)  # a layer dropped: no contributions
    attrs = attributes(out)
    record = attrs["subset"]
    assert record["source"]["path"] == os.path.abspath(store) and record["source"]["n_prompts"] == N_PROMPTS
    assert record["layers"] == [1, 3] and record["dtype"] == "float32" and record["where"].startswith("language")
    assert record["source_prompts"].split(",")[0].split(":")[0] == str(kept[0])
    assert "flow" in record["dropped"] and attrs["prompts"]["n_stored"] == len(kept)
    assert attrs["model"] == attributes(store)["model"] and attrs["layers"] == [1, 3]
    code, described, err = run_repgeo("info", out)
    assert code == 0 and "layers     2 of the model's 5 (0 = embeddings … 4): 1, 3, dim" in described, described + err


def test_a_layer_subset_without_its_layers_attribute_is_reported(subset, work, run_repgeo):
    damaged = work / "layers-unnamed.zarr"
    shutil.copytree(subset("layers-1-3.zarr", "--layers", "1,3"), damaged)
    group = zarr.open_group(str(damaged), mode="r+")
    del group.attrs["layers"]
    consolidate(str(damaged))
    code, out, _ = run_repgeo("validate", damaged)
    assert code == 1 and "hidden has 2 layers, but the model has 4 blocks + embeddings" in out


def test_subset_with_every_layer_keeps_the_contribution_arrays(store, subset, run_repgeo):
    out = subset("first-five.zarr", "--prompts", ":5")
    assert_valid(out, run_repgeo)
    src, new = arrays(store), arrays(out)
    n_targets = int((src["flow_target"][:5] >= 0).sum(axis=1).max())
    width = int(src["n_tokens"][:5].max())
    assert new["flow"].shape[1] == new["flow_target"].shape[1] == n_targets  # as extract sizes it for 5 prompts
    np.testing.assert_array_equal(new["flow_target"], src["flow_target"][:5, :n_targets])
    for name in ("head_norm", "head_cosine", "attn_share", "mlp_norm"):
        np.testing.assert_array_equal(new[name], src[name][:5, ..., :width], err_msg=name)
    for name in ("flow", "grad_norm"):
        np.testing.assert_array_equal(new[name], src[name][:5, :n_targets, :, :width], err_msg=name)
    assert attributes(out)["subset"]["dropped"] == []


@pytest.mark.parametrize("layers", [None, "1:4"])
def test_complementary_subsets_merge_back_into_the_source(layers, store, subset, work, run_repgeo, same_store):
    option = ["--layers", layers] if layers else []
    whole = subset(f"all-{layers}.zarr", *option) if layers else store
    first = subset(f"head-{layers}.zarr", "--prompts", ":5", *option)
    rest = subset(f"tail-{layers}.zarr", "--prompts", "5:", *option)
    merged = work / f"merged-{layers}.zarr"
    code, _, err = run_repgeo("merge", first, rest, "--out", merged)
    assert code == 0, err
    assert_valid(merged, run_repgeo)
    same_store(whole, merged)  # every array: hidden, texts, labels, done, ids, losses, contributions, coordinates
    a, b = attributes(whole), attributes(merged)
    assert {key for key in {*a, *b} if a.get(key) != b.get(key)} == {"created", "merge"} | (
        {"subset"} if layers else set())
    sources = b["merge"]["sources"]
    assert [s["path"] for s in sources] == [os.path.abspath(first), os.path.abspath(rest)]
    assert [s["merged_prompts"] for s in sources] == ["0:5", f"5:{N_PROMPTS}"]
    assert all(s["subset"]["source"]["path"] == os.path.abspath(store) for s in sources)


def test_float16_down_cast_refuses_values_beyond_its_range(work, tiny_model_overflowing, run_repgeo, write_jsonl,
                                                           the_error_line):
    rows = [{"text": "A river carries sand."}, {"text": "Cold air sinks."}]
    source = _extract(run_repgeo, tiny_model_overflowing, write_jsonl(work / "big.jsonl", rows), work / "big.zarr")
    out = work / "big16.zarr"
    line = assert_refused(run_repgeo, the_error_line, out, "subset", source, "--out", out, "--dtype", "float16")
    assert "prompt 0 layer 2" in line and "float16" in line and "bfloat16" in line
    # the layers below the overflow fit
    code, _, err = run_repgeo("subset", source, "--out", out, "--dtype", "float16", "--layers", ":2")
    assert code == 0, err
    assert_valid(out, run_repgeo)
    src, new = arrays(source), arrays(out)
    assert new["hidden"].dtype == np.float16 and attributes(out)["dtype"] == "float16"
    np.testing.assert_array_equal(new["hidden"], src["hidden"][:, :2].astype(np.float16))


def test_narrowing_follows_the_storage_rule_of_extract():
    """bfloat16 rounding against torch's own cast (what extract stores), ties and large values included."""
    import torch

    from toolkit.extract.forward import to_storage

    rng = np.random.default_rng(0)
    values = (rng.standard_normal(4096) * 10.0 ** rng.integers(-8, 30, 4096)).astype(np.float32)
    ties = (values.view(np.uint32) & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # exactly halfway
    values = np.concatenate([values, ties.view(np.float32), np.float32([3.4e38, -3.4e38, 65519.0, 65520.0])])
    for dtype in ("bfloat16", "float16"):
        expected = to_storage(torch.from_numpy(values), dtype).numpy()
        np.testing.assert_array_equal(narrow(values, dtype), expected)


def test_bfloat16_subset_is_what_extract_would_store(store, subset, run_repgeo):
    import torch

    from toolkit.extract.forward import to_storage

    out = subset("bf16.zarr", "--dtype", "bfloat16", "--prompts", "0:3")
    assert_valid(out, run_repgeo)  # --deep checks that the low 16 bits are zero
    src, new = arrays(store), arrays(out)
    width = int(src["n_tokens"][:3].max())
    expected = to_storage(torch.from_numpy(src["hidden"][:3, :, :width]), "bfloat16").numpy()
    np.testing.assert_array_equal(new["hidden"], expected)
    assert attributes(out)["dtype"] == "bfloat16" and new["hidden"].dtype == np.float32


def test_a_dtype_is_never_widened_or_crossed(store, subset, run_repgeo, the_error_line, work):
    half = subset("f16.zarr", "--dtype", "float16", "--prompts", "0:3")
    out = work / "crossed.zarr"
    line = assert_refused(run_repgeo, the_error_line, out, "subset", half, "--out", out, "--dtype", "bfloat16")
    assert "is float16" in line and "only a float32 store" in line
    same = subset("f16-again.zarr", "--dtype", "float16", source=half)  # its own dtype: kept
    np.testing.assert_array_equal(arrays(same)["hidden"], arrays(half)["hidden"])


def test_withheld_texts_are_their_sha256_and_merge_only_with_withheld(store, subset, work, run_repgeo,
                                                                      the_error_line):
    hidden_texts = subset("withheld.zarr", "--withhold-texts", "--prompts", ":4")
    assert_valid(hidden_texts, run_repgeo)
    src, new = arrays(store), arrays(hidden_texts)
    assert "text" not in new
    assert new["text_sha256"].tolist() == [hashlib.sha256(t.encode()).hexdigest() for t in src["text"][:4]]
    assert attributes(hidden_texts)["settings"]["withhold_texts"] is True
    with_texts = subset("texts.zarr", "--prompts", "4:")
    out = work / "mixed.zarr"
    line = assert_refused(run_repgeo, the_error_line, out, "merge", hidden_texts, with_texts, "--out", out)
    assert "settings.withhold_texts" in line
    rest = subset("withheld-rest.zarr", "--withhold-texts", source=with_texts)
    code, _, err = run_repgeo("merge", hidden_texts, rest, "--out", out)
    assert code == 0, err
    assert arrays(out)["text_sha256"].tolist() == [hashlib.sha256(t.encode()).hexdigest() for t in src["text"]]


def test_not_done_prompts_are_left_out_and_refused_by_merge(store, work, run_repgeo, the_error_line):
    partial = work / "partial.zarr"
    shutil.copytree(store, partial)
    zarr.open_group(str(partial), mode="r+")["done"][3] = False  # as a run killed before prompt 3 was marked done
    out = work / "done-only.zarr"
    code, _, err = run_repgeo("subset", partial, "--out", out)
    assert code == 0, err
    assert "1 selected prompts not done yet were left out" in err
    assert arrays(out)["i"].tolist() == [i for i in range(N_PROMPTS) if i != 3]
    assert attributes(out)["subset"]["not_done_left_out"] == 1
    refused = work / "refused.zarr"
    line = assert_refused(run_repgeo, the_error_line, refused, "subset", partial, "--out", refused, "--prompts", "3")
    assert "not done" in line
    line = assert_refused(run_repgeo, the_error_line, refused, "merge", partial, out, "--out", refused)
    assert "1 prompts not done" in line and "repgeo subset" in line


@pytest.mark.parametrize("options, expected", [
    (["--where", 'language == "xx"'], "keeps no prompt"),
    (["--where", "len(text) > 3"], "`len(text)`: a call"),
    (["--where", "year == '1990'"], "label year holds numbers"),
    (["--prompts", "12"], "'12' is outside the store"),
    (["--prompts", "a:b"], "neither a prompt index nor an A:B range"),
    (["--layers", "7"], "outside the model"),
])
def test_subset_refuses_bad_selections_in_one_line(options, expected, store, work, run_repgeo, the_error_line):
    out = work / "bad.zarr"
    line = assert_refused(run_repgeo, the_error_line, out, "subset", store, "--out", out, *options)
    assert expected in line


def test_layers_of_a_layer_subset_are_named_by_their_numbers(subset, work, run_repgeo, the_error_line):
    some = subset("layers-1-3.zarr", "--layers", "1,3")
    out = work / "bad.zarr"
    line = assert_refused(run_repgeo, the_error_line, out, "subset", some, "--out", out, "--layers", "2")
    assert "layer 2" in line and "1,3" in line
    fewer = subset("layer-3.zarr", "--layers", "2:", source=some)  # a range keeps the held layers within it
    assert arrays(fewer)["layer"].tolist() == [3]


def test_an_existing_out_is_refused_and_left_untouched(store, subset, run_repgeo, the_error_line, tree_snapshot):
    out = subset("existing.zarr", "--prompts", "0")
    before = tree_snapshot(out)
    code, _, err = run_repgeo("subset", store, "--out", out, "--prompts", "1")
    assert code == 2 and "already exists" in the_error_line(err)
    code, _, err = run_repgeo("merge", store, out, "--out", out)
    assert code == 2 and "already exists" in the_error_line(err)
    assert tree_snapshot(out) == before


def test_extract_resume_refuses_a_subset(store, subset, prompts, tiny_model, run_repgeo, the_error_line):
    out = subset("to-resume.zarr", "--prompts", ":6")
    before = arrays(out)
    code, _, err = run_repgeo("extract", "--model", tiny_model, "--prompts", prompts, "--out", out, "--dtype",
                              "float32", *FLOW, "--resume")
    assert code == 2 and "repgeo subset" in the_error_line(err)
    assert arrays(out).keys() == before.keys() and (arrays(out)["done"] == before["done"]).all()


@pytest.fixture(scope="module")
def model_with_other_tokenizer(work, tiny_model):
    """``tiny_model``'s weights (same sha256) with a tokenizer that normalises its input: another fingerprint."""
    from tokenizers import Tokenizer, normalizers

    directory = work / "other-tokenizer"
    shutil.copytree(tiny_model, directory)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.save(str(directory / "tokenizer.json"))
    return str(directory)


@pytest.mark.parametrize("difference", ["model.weights_sha256", "tokenizer_fingerprint", "settings.max_tokens",
                                        "dtype", "layer"])
def test_merge_refuses_stores_that_differ(difference, store, subset, work, prompts, tiny_model, tiny_model_other,
                                          model_with_other_tokenizer, run_repgeo, the_error_line):
    others = {
        "model.weights_sha256": lambda: _extract(run_repgeo, tiny_model_other, prompts, work / "other-model.zarr",
                                                 *FLOW),
        "tokenizer_fingerprint": lambda: _extract(run_repgeo, model_with_other_tokenizer, prompts,
                                                  work / "other-tokenizer.zarr", *FLOW),
        "settings.max_tokens": lambda: _extract(run_repgeo, tiny_model, prompts, work / "other-settings.zarr",
                                                *FLOW, "--max-tokens", "8"),
        "dtype": lambda: subset("f16.zarr", "--dtype", "float16", "--prompts", "0:3"),
        "layer": lambda: subset("layers-1-3.zarr", "--layers", "1,3"),
    }
    other = others[difference]()
    out = work / "refused-merge.zarr"
    line = assert_refused(run_repgeo, the_error_line, out, "merge", store, other, "--out", out)
    assert f"differ in {difference} (" in line and str(store) in line and str(other) in line


@pytest.fixture(scope="module")
def other_prompt_file_store(work, write_jsonl, make_tiny_texts, tiny_model, run_repgeo):
    """A store of another prompt file: language (string, as in ``store``), year (every prompt: int64), topic (a
    label ``store`` lacks), no flag and no i; longer prompts than ``store``'s."""
    rows = [{"text": t, "language": "deu", "year": 2000 + i, "topic": ("rivers", "bread")[i % 2]}
            for i, t in enumerate(make_tiny_texts(3, seed=12, min_words=45, max_words=60))]
    return _extract(run_repgeo, tiny_model, write_jsonl(work / "b.jsonl", rows), work / "b.zarr", *FLOW)


def test_merge_combines_the_labels_of_other_prompt_files(store, other_prompt_file_store, work, run_repgeo):
    out = work / "a-and-b.zarr"
    code, _, err = run_repgeo("merge", store, other_prompt_file_store, "--out", out)
    assert code == 0, err
    assert_valid(out, run_repgeo)
    a, b, m = arrays(store), arrays(other_prompt_file_store), arrays(out)
    k = N_PROMPTS
    assert m["language"].tolist() == a["language"].tolist() + ["deu"] * 3  # in both, strings: concatenated
    assert m["topic"].tolist() == [""] * k + b["topic"].tolist()  # only in b: "" for a's prompts
    assert m["year"].dtype == np.float64  # float64 (NaN = missing) in a, int64 in b: float64
    np.testing.assert_array_equal(m["year"], np.concatenate([a["year"], b["year"].astype(float)]))
    assert m["i"].dtype == np.float64 and np.isnan(m["i"][k:]).all()  # integers with missing values: float64
    assert m["i"][:k].tolist() == a["i"].tolist()
    assert m["flag"].tolist() == [str(bool(f)) for f in a["flag"]] + [""] * 3  # booleans with missing: strings
    # the longer prompts of b set the width; a's prompts are padded as extract pads them
    width = int(b["n_tokens"].max())
    assert m["hidden"].shape[2] == width > a["hidden"].shape[2]
    narrow = a["hidden"].shape[2]
    assert np.isnan(m["hidden"][:k, :, narrow:]).all() and (m["input_ids"][:k, narrow:] == -1).all()
    np.testing.assert_array_equal(m["hidden"][k:], b["hidden"])
    attrs, fa, fb = attributes(out), attributes(store)["prompts"], attributes(other_prompt_file_store)["prompts"]
    assert attrs["prompts"]["sha256"] == hashlib.sha256(f"{fa['sha256']}\n{fb['sha256']}".encode()).hexdigest()
    assert attrs["prompts"]["path"] == f"{fa['path']}; {fb['path']}" and attrs["prompts"]["n_stored"] == k + 3
    assert attrs["prompts"]["n_input"] == fa["n_input"] + fb["n_input"]
    assert attrs["runs"] == attributes(store)["runs"] + attributes(other_prompt_file_store)["runs"]
    assert [s["prompts"] for s in attrs["merge"]["sources"]] == [fa, fb]


def test_merge_refuses_what_is_not_a_set_of_activation_stores(store, results, work, run_repgeo, the_error_line):
    out = work / "refused.zarr"
    assert "results store" in assert_refused(run_repgeo, the_error_line, out, "merge", store, results, "--out", out)
    assert "given twice" in assert_refused(run_repgeo, the_error_line, out, "merge", store, store, "--out", out)
    assert "at least two" in assert_refused(run_repgeo, the_error_line, out, "merge", store, "--out", out)


@pytest.fixture(scope="module")
def results(store, work, run_repgeo):
    out = work / "results.zarr"
    code, _, err = run_repgeo("summarize", "--store", store, "--out", out, "--observables", "norm,contributions",
                              "--groupby", "language", "--workers", "1")
    assert code == 0, err
    return out


def test_subset_of_a_results_store_keeps_labels_and_values(results, work, run_repgeo, the_error_line):
    out = work / "results-eng.zarr"
    code, _, err = run_repgeo("subset", results, "--out", out, "--where", 'language == "eng"', "--layers", "1:")
    assert code == 0, err
    assert_valid(out, run_repgeo)
    src, new = arrays(results), arrays(out)
    kept = np.flatnonzero(src["language"] == "eng")
    np.testing.assert_array_equal(new["norm_mean"], src["norm_mean"][kept, 1:])
    assert new["layer"].tolist() == src["layer"][1:].tolist() and new["prompt"].tolist() == list(range(len(kept)))
    for name in ("language", "year", "flag", "i", "n_tokens", "loss", "done"):
        np.testing.assert_array_equal(new[name], src[name][kept], err_msg=name)
    # pools of every prompt and contribution observables (a layer dropped) do not travel
    assert "group" not in new and "contrib_corr" not in new and "head_norm_mean" not in new
    attrs = attributes(out)
    assert attrs["source"]["n_prompts"] == len(kept) and attrs["subset"]["source"]["n_prompts"] == N_PROMPTS
    assert "groups_done" not in attrs and "group" in attrs["subset"]["dropped"]
    # every prompt and layer: everything kept, values equal
    whole = work / "results-all.zarr"
    code, _, err = run_repgeo("subset", results, "--out", whole)
    assert code == 0, err
    copy = arrays(whole)
    assert copy.keys() == src.keys()
    for name in src:
        np.testing.assert_array_equal(copy[name], src[name], err_msg=name)
    out16 = work / "results16.zarr"
    line = assert_refused(run_repgeo, the_error_line, out16, "subset", results, "--out", out16, "--dtype", "float16")
    assert "results store" in line


#: Labels of four prompts as a store holds them: a missing string is "", a missing number NaN.
LABELS = {"language": np.array(["srp", "eng", "hrv", ""], dtype=object),
          "year": np.array([1990.0, 1980.0, np.nan, 2000.0]),
          "n": np.array([1, 2, 3, 4]),
          "flag": np.array([True, False, True, False])}


@pytest.mark.parametrize("expression, expected", [
    ('language == "srp" and year >= 1990', [1, 0, 0, 0]),
    ("1985 <= year < 2001", [1, 0, 0, 1]),
    ('language in ["srp", "hrv"]', [1, 0, 1, 0]),
    ('language not in ("srp",) or flag == True', [1, 1, 1, 1]),
    ("not (year != 1980)", [0, 1, 0, 0]),
    ("year != 1980", [1, 0, 1, 1]),  # a missing number (NaN) differs from every number
    ('language == ""', [0, 0, 0, 1]),  # a missing string is ""
    ("n > -2 and (n < 2 or n == 4.0)", [1, 0, 0, 1]),
    ("flag != True", [0, 1, 0, 1]),
    ('language >= "hrv"', [1, 0, 1, 0]),
])
def test_where_selects_by_comparisons_of_labels_with_literals(expression, expected):
    assert select_where(expression, LABELS).tolist() == [bool(e) for e in expected]


@pytest.mark.parametrize("expression, offending", [
    ("__import__('os')", "`__import__('os')`: a call"),
    ("len(text) > 3", "`len(text)`: a call"),
    ('language.upper() == "X"', "`language.upper()`: a call"),
    ("a + 1 > 2", "`a + 1`: arithmetic"),
    ("n + 1 > 2", "`n + 1`: arithmetic"),
    ("language[0] == 's'", "`language[0]`: a subscript"),
    ("year == n", "another label (n)"),
    ("1 == 1", "two literals"),
    ("flag", "`flag`: a label alone is not a comparison"),
    ('language in "srp"', '`"srp"`: `in` takes a literal list'),
    ("n == None", "`None`: a literal other than"),
    ("(lambda: 1)() == n", "a call"),
    ("x == 1", "unknown label `x`"),
    ('year == "1990"', '`"1990"` is a string, but label year holds numbers'),
    ("language == 3", "`3` is a number, but label language holds strings"),
    ("flag == 1", "label flag holds booleans"),
    ("flag < True", "booleans, which are not ordered"),
    ("n is 1", "`n is 1`: `is` compares identity"),
    ("n ==", "not a valid expression"),
    ("n == 1; import os", "not a valid expression"),
    ("not " * 5000 + "n == 1", "nests too deeply"),
])
def test_where_refuses_anything_else_naming_it(expression, offending):
    with pytest.raises(UserError) as refused:
        select_where(expression, LABELS)
    message = str(refused.value)
    assert offending in message and "\n" not in message


def test_where_never_evaluates_python(tmp_path):
    witness = tmp_path / "witness"
    with pytest.raises(UserError):
        select_where(f"__import__('pathlib').Path({json.dumps(str(witness))}).touch() == 1", LABELS)
    assert not witness.exists()
