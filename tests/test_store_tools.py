"""`repgeo validate` (schema, consistency, --deep chunk checks), `repgeo info`, and `repgeo plot`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr

from toolkit.store.validate import describe_store, load_schema


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model, run_repgeo, write_jsonl, make_tiny_texts):
    tmp = tmp_path_factory.mktemp("tools")
    rows = [{"text": t, "lang": "xx" if i % 2 else "yy"} for i, t in enumerate(make_tiny_texts(6, seed=5))]
    prompts = write_jsonl(tmp / "p.jsonl", rows)
    out = tmp / "a.zarr"
    rc, _, err = run_repgeo("extract", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(out))
    assert rc == 0, err
    return out


def copy_store(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_valid_store_passes_schema_and_deep_check(store, run_repgeo):
    rc, out, err = run_repgeo("validate", "--deep", str(store))
    assert rc == 0, out + err
    assert out.strip().endswith("valid")


def test_schema_rejects_what_the_layout_forbids(store):
    import jsonschema

    description = describe_store(zarr.open_group(str(store), mode="r"))
    schema = load_schema("activations")
    jsonschema.validate(description, schema)  # the real store conforms
    broken = json.loads(json.dumps(description))
    broken["arrays"]["hidden"]["shards"][0] = 2  # a shard spanning two prompts
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = json.loads(json.dumps(description))
    broken["arrays"]["hidden"]["codecs"].remove("crc32c")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = json.loads(json.dumps(description))
    del broken["attributes"]["tokenizer_fingerprint"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_deep_check_catches_a_corrupted_chunk(store, tmp_path, run_repgeo):
    bad = copy_store(store, tmp_path / "bad.zarr")
    shard = bad / "hidden" / "c" / "3" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # flip bits inside a compressed, checksummed chunk
    shard.write_bytes(bytes(data))
    rc, out, _ = run_repgeo("validate", str(bad))
    assert rc == 0  # metadata alone is fine
    rc, out, _ = run_repgeo("validate", "--deep", str(bad))
    assert rc == 1 and "prompt 3" in out and "unreadable" in out


def test_deep_check_catches_values_that_break_the_layout(store, tmp_path, run_repgeo):
    bad = copy_store(store, tmp_path / "bad2.zarr")
    group = zarr.open_group(str(bad), mode="r+")
    p = int(np.argmin(group["n_tokens"][:]))
    n = int(group["n_tokens"][p])
    assert n < group["hidden"].shape[2]
    slab = group["hidden"][p]
    slab[:, n:] = 0.0  # padding no longer NaN
    group["hidden"][p] = slab
    rc, out, _ = run_repgeo("validate", "--deep", str(bad))
    assert rc == 1 and f"prompt {p}" in out and "padding" in out


def test_validate_refuses_what_is_not_a_store(tmp_path, run_repgeo, the_error_line):
    rc, _, err = run_repgeo("validate", str(tmp_path))
    assert rc == 2 and "not a Zarr v3 store" in the_error_line(err)


def test_info_reports_model_labels_size_and_completeness(store, run_repgeo):
    rc, out, err = run_repgeo("info", str(store))
    assert rc == 0, err
    assert "6/6 prompts done" in out
    assert "label      lang: 2 values: xx×3, yy×3" in out
    assert "bytes per stored value" in out and "LlamaForCausalLM" in out


def test_info_shows_an_incomplete_store(store, tmp_path, run_repgeo):
    partial = copy_store(store, tmp_path / "partial.zarr")
    zarr.open_group(str(partial), mode="r+")["done"][2] = False
    rc, out, _ = run_repgeo("info", str(partial))
    assert rc == 0 and "5/6 prompts done (rerun extract with --resume to finish)" in out


def test_plot_writes_readable_figures(store, tmp_path, run_repgeo):
    results = tmp_path / "r.zarr"
    rc, _, err = run_repgeo("summarize", "--store", str(store), "--out", str(results), "--workers", "1",
                            "--groupby", "lang", "--reference", "yy")
    assert rc == 0, err
    rc, out, err = run_repgeo("plot", str(results), "--out", str(tmp_path / "plots"), "--n2", "4")
    assert rc == 0, err
    files = out.split()
    assert {os.path.basename(f) for f in files} >= {"gride_id.png", "overlap.png", "group_kl.png"}
    from matplotlib.image import imread

    image = imread(files[0])
    assert image.shape[0] > 300 and image.shape[1] > 800
    assert np.std(image[..., :3]) > 0.05  # not a blank canvas
    rc, _, err = run_repgeo("plot", str(results), "--out", str(tmp_path / "p2"), "--groupby", "nope")
    assert rc == 2 and "unknown label" in err
