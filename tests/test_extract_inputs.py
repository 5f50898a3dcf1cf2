"""``repgeo extract`` inputs: bad input is refused in one line (exit 2) before anything is written; labels of
JSONL, .txt, directory and glob inputs become coordinates on ``prompt``, in input order."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from toolkit.prompts import read_prompts

TEXT = "The baker wakes before dawn, mixes flour, water, salt and yeast, and leaves the dough to rise."

# id → (prompt file content (None: no file), --model (None: the tiny model), extra arguments, word the error names)
BAD_INPUTS = {
    "missing prompt file": (None, None, [], "does not exist"),
    "empty jsonl": (b"", None, [], "no prompts"),
    "line without text": (b'{"text": "fine"}\n{"txt": "typo"}\n', None, [], 'line 2 has no "text"'),
    "broken json": (b'{"text": "fine"}\n{"text": "open\n', None, [], "line 2 is not valid JSON"),
    "not utf-8": ('{"text": "caf\u00e9 cr\u00e8me"}\n'.encode("latin-1"), None, [], "UTF-8"),
    "empty text": (b'{"text": "fine"}\n{"text": "  "}\n', None, [], 'line 2 has an empty "text"'),
    "model path": (None, "./no-such-model", [], "no-such-model does not exist"),
    "unknown hub id": (None, "nobody-has/this-model-repgeo", [], "unknown model nobody-has/this-model-repgeo"),
    "all too short": (None, None, ["--min-tokens", 500], "shorter than --min-tokens 500"),
    "max-tokens 0": (None, None, ["--max-tokens", 0], "--max-tokens"),
    "unknown dtype": (None, None, ["--dtype", "float8"], "float8"),
    "existing output": (None, None, [], "already exists"),
    "reserved label": (b'{"text": "fine", "loss": 1.5}\n', None, [], "label 'loss'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tiny_model, run_repgeo, tree_snapshot, tmp_path):
    content, model, extra, word = BAD_INPUTS[case]
    prompts = tmp_path / "prompts.jsonl"
    if case != "missing prompt file":
        prompts.write_bytes(content if content is not None else (f'{{"text": "{TEXT}"}}\n'.encode()))
    out = tmp_path / "store.zarr"
    before = None
    if case == "existing output":
        out.mkdir()
        (out / "notes.txt").write_text("not a store")
        before = tree_snapshot(out)
    code, stdout, stderr = run_repgeo("extract", "--model", model or tiny_model, "--prompts", prompts,
                                      "--out", out, *extra)
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert word in lines[0] and "Traceback" not in stderr
    assert stdout == ""
    if before is None:
        assert not out.exists() and not (tmp_path / "store.zarr.partial").exists()
    else:
        assert tree_snapshot(out) == before


def _plain(path):
    return xr.open_zarr(str(path), consolidated=False)


def test_jsonl_labels_become_typed_coordinates_in_input_order(tiny_model, run_repgeo, write_jsonl, make_tiny_texts,
                                                              tmp_path):
    long_texts = make_tiny_texts(3, seed=2, min_words=12, max_words=30)
    rows = [
        {"text": long_texts[0], "topic": "river", "year": 1789, "weight": 0.5, "long": True, "note": "a"},
        {"text": long_texts[1], "topic": "bread", "year": 2001, "weight": 1.5, "long": False},
        {"text": "Rain.", "topic": "short", "year": 1, "weight": 9.0, "long": False, "note": "dropped"},
        {"text": long_texts[2] + " " + long_texts[0], "topic": "books", "year": 1850, "weight": 2, "long": True,
         "note": "c", "pages": 3},
    ]
    prompts, out = write_jsonl(tmp_path / "labels.jsonl", rows), tmp_path / "store.zarr"
    code, _, err = run_repgeo("extract", "--model", tiny_model, "--prompts", prompts, "--out", out,
                              "--min-tokens", 8)
    assert code == 0, err
    ds = _plain(out)
    kept = [rows[0], rows[1], rows[3]]
    assert ds.text.values.tolist() == [r["text"] for r in kept]  # input order, though batches go longest first
    label = {name: ds[name] for name in ("topic", "year", "weight", "long", "note", "pages")}
    assert label["topic"].values.tolist() == ["river", "bread", "books"] and label["topic"].dtype.kind in "OU"
    assert label["year"].dtype == np.int64 and label["year"].values.tolist() == [1789, 2001, 1850]
    assert label["weight"].dtype == np.float64 and label["weight"].values.tolist() == [0.5, 1.5, 2.0]
    assert label["long"].dtype == bool and label["long"].values.tolist() == [True, False, True]
    assert label["note"].values.tolist() == ["a", "", "c"]  # a missing string label is empty
    pages = label["pages"]  # an int label missing on some lines: float with NaN
    assert pages.dtype == np.float64 and np.isnan(pages.values[:2]).all() and pages.values[2] == 3.0
    for name in (*label, "text", "n_tokens"):
        assert ds[name].dims == ("prompt",) and name in ds.hidden.coords
    attrs = zarr.open_group(str(out)).attrs["prompts"]
    assert (attrs["n_input"], attrs["n_dropped_short"], attrs["n_stored"]) == (4, 1, 3)
    _assert_rows_follow_texts(ds, tiny_model)


def _assert_rows_follow_texts(ds, model_dir):
    """Row p of input_ids is the tokenization of text p, and row p of hidden layer 0 is the embedding of those ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    embedding = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).get_input_embeddings().weight
    for p, text in enumerate(ds.text.values):
        ids = tokenizer(text)["input_ids"]
        assert ds.n_tokens.values[p] == len(ids)
        assert ds.input_ids.values[p, :len(ids)].tolist() == ids
        expected = embedding[ids].detach().numpy().astype(np.float16)
        np.testing.assert_array_equal(ds.hidden.values[p, 0, :len(ids)], expected)


def _write_txt_dir(directory, texts: dict):
    directory.mkdir()
    for name, text in texts.items():
        (directory / name).write_text(text, encoding="utf-8")
    (directory / "README.md").write_text("not a prompt")  # ignored: not .txt
    return directory


TXT_FILES = {"b.txt": "Bread rises slowly.", "a.txt": "A river carries sand.", "c.txt": "Cold air sinks."}


def test_directory_of_txt_files_gives_source_labels_in_sorted_order(tiny_model, run_repgeo, tmp_path):
    directory = _write_txt_dir(tmp_path / "texts", TXT_FILES)
    out = tmp_path / "store.zarr"
    code, _, err = run_repgeo("extract", "--model", tiny_model, "--prompts", directory, "--out", out)
    assert code == 0, err
    ds = _plain(out)
    assert ds.source.values.tolist() == ["a", "b", "c"]
    assert ds.text.values.tolist() == [TXT_FILES["a.txt"], TXT_FILES["b.txt"], TXT_FILES["c.txt"]]
    assert bool(ds.done.all())


def test_glob_and_single_txt_file_give_source_labels(tmp_path):
    directory = _write_txt_dir(tmp_path / "texts", TXT_FILES)
    source = read_prompts(str(directory / "*.txt"))
    assert [(p.text, p.labels) for p in source.prompts] == [
        (TXT_FILES[f"{s}.txt"], {"source": s}) for s in "abc"]
    single = read_prompts(str(directory / "b.txt"))
    assert [(p.text, p.labels) for p in single.prompts] == [(TXT_FILES["b.txt"], {"source": "b"})]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"text": "one", "k": 1}\n\n{"text": "two", "k": 2}\n', encoding="utf-8")
    assert [(p.text, p.labels) for p in read_prompts(str(jsonl)).prompts] == [("one", {"k": 1}), ("two", {"k": 2})]


def test_prompt_file_hash_changes_with_content(tmp_path):
    """The sha256 that --resume compares: the same bytes give the same hash, one changed byte another."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"text": "one"}\n', encoding="utf-8")
    b.write_text('{"text": "one"}\n', encoding="utf-8")
    assert read_prompts(str(a)).sha256 == read_prompts(str(b)).sha256
    b.write_text('{"text": "onE"}\n', encoding="utf-8")
    assert read_prompts(str(a)).sha256 != read_prompts(str(b)).sha256
