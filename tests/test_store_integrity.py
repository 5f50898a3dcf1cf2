"""Damaged stores are caught: by ``repgeo validate`` (exit 1, one line per problem), by ``require_consistent``
(the check every job runs first: one-line :class:`UserError`) and so by ``repgeo summarize`` (exit 2, nothing
written). Each way of damaging a store is applied to a copy of a real tiny-model store: hand-edited metadata and
attributes, deleted chunk files, bytes flipped in chunk files, and values changed consistently through zarr.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import xarray as xr
import zarr

from toolkit.cli import main as repgeo_main
from toolkit.errors import UserError
from toolkit.store.validate import require_consistent


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model, run_repgeo, write_jsonl, make_tiny_texts):
    """6 prompts (float16) with a string label ``lang`` and an integer label ``n``; all done."""
    tmp = tmp_path_factory.mktemp("integrity")
    rows = [{"text": t, "lang": "xx" if i % 2 else "yy", "n": i} for i, t in enumerate(make_tiny_texts(6, seed=7))]
    out = tmp / "a.zarr"
    rc, _, err = run_repgeo("extract", "--model", tiny_model, "--prompts", write_jsonl(tmp / "p.jsonl", rows),
                            "--out", out)
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def results(store, tmp_path_factory, run_repgeo):
    out = tmp_path_factory.mktemp("integrity-results") / "r.zarr"
    rc, _, err = run_repgeo("summarize", "--store", store, "--out", out, "--workers", "1", "--observables",
                            "norm,cosine,overlap", "--overlap-k", "4")
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def sae_results(store, tmp_path_factory, run_repgeo):
    from toolkit.sae import save_sae

    tmp = tmp_path_factory.mktemp("integrity-sae")
    rng = np.random.default_rng(0)
    sae = save_sae(tmp / "sae", rng.standard_normal((64, 16)).astype(np.float32), np.zeros(16, np.float32),
                   rng.standard_normal((16, 64)).astype(np.float32), np.zeros(64, np.float32), "relu",
                   extra_cfg={"hook_name": "blocks.1.hook_resid_post"})
    out = tmp / "co.zarr"
    rc, _, err = run_repgeo("sae", "cooccurrence", "--store", store, "--sae", sae, "--layer", 2, "--out", out,
                            "--block", 4, "--workers", 1, "--clusters", "2", "--permutations", 3,
                            "--galaxy-tokens", 32)
    assert rc == 0, err
    return out


def cli(capsys, *args) -> tuple:
    """``repgeo ARGS`` in this process: (exit code, stdout, stderr); an uncaught exception fails the test."""
    rc = repgeo_main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ------------------------------------------------------------------------------------------------------------
# Ways to damage a store (``s``: the copy's path)


def edit_json(path, change):
    metadata = json.loads(path.read_text())
    change(metadata)
    path.write_text(json.dumps(metadata))


def edit_attrs(s, change):
    edit_json(s / "zarr.json", lambda m: change(m["attributes"]))


def edit_array_metadata(s, name, change, consolidated=True):
    """Change ``name``'s own zarr.json and, with ``consolidated``, its copy in the root's consolidated metadata."""
    edit_json(s / name / "zarr.json", change)
    if consolidated:
        edit_json(s / "zarr.json", lambda m: change(m["consolidated_metadata"]["metadata"][name]))


def set_value(s, name, index, value):
    """Change one value through zarr, as a tool that rewrites the array consistently would (checksums valid)."""
    array = zarr.open_group(str(s), mode="r+")[name]
    values = array[...]
    values[index] = value
    array[...] = values  # the whole array: zarr 3.1 cannot write one element of a string array


def flip_byte(path, at=None):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0xFF
    path.write_bytes(bytes(data))


def shrink_dim(m):
    m["shape"][3] -= 1


@dataclass
class Damage:
    name: str
    apply: Callable
    says: str  # what the report says
    deep_only: bool = False  # found by validate --deep only (data that no job reads before computing)


DAMAGES = [
    Damage("hidden shape d-1 in hidden/zarr.json", lambda s: edit_array_metadata(s, "hidden", shrink_dim, False),
           "hidden/zarr.json differs from its copy in the consolidated metadata"),
    Damage("hidden shape d-1 everywhere", lambda s: edit_array_metadata(s, "hidden", shrink_dim),
           "hidden has shape [6, 5, "),
    Damage("model.d_model attribute", lambda s: edit_attrs(s, lambda a: a["model"].update(d_model=63)),
           "the model's d_model is 63"),
    Damage("model.n_layers attribute", lambda s: edit_attrs(s, lambda a: a["model"].update(n_layers=5)),
           "hidden has 5 layers, but the model has 5 blocks"),
    Damage("hidden shard of a done prompt deleted", lambda s: (s / "hidden/c/3/0/0/0").unlink(),
           "hidden has no data for done prompts 3"),
    Damage("token_loss chunk of a done prompt deleted", lambda s: (s / "token_loss/c/4/0").unlink(),
           "token_loss has no data for done prompts 4"),
    Damage("loss chunk of a done prompt deleted", lambda s: (s / "loss/c/1").unlink(),
           "loss has no data for done prompts 1"),
    Damage("text changed through zarr", lambda s: set_value(s, "text", 1, "another text"),
           "text differs from the digest", deep_only=True),
    Damage("input_ids changed through zarr", lambda s: set_value(s, "input_ids", (1, 2), 7),
           "input_ids differs from the digest", deep_only=True),
    Damage("label changed through zarr", lambda s: set_value(s, "lang", 1, "zz"), "lang differs from the digest"),
    Damage("integer label changed through zarr", lambda s: set_value(s, "n", 0, 9), "n differs from the digest"),
    Damage("n_tokens changed through zarr", lambda s: set_value(s, "n_tokens", 2, 3),
           "n_tokens differs from the digest"),
    Damage("text chunk bytes flipped", lambda s: flip_byte(s / "text/c/0"), "text is unreadable", deep_only=True),
    Damage("label chunk bytes flipped", lambda s: flip_byte(s / "lang/c/0"), "lang is unreadable"),
    Damage("n_tokens chunk bytes flipped", lambda s: flip_byte(s / "n_tokens/c/0"), "n_tokens is unreadable"),
    Damage("done chunk bytes flipped", lambda s: flip_byte(s / "done/c/2", at=0), "done is corrupted at prompt 2"),
    Damage("root zarr.json broken", lambda s: (s / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr'),
           "is not a readable Zarr v3 group"),
    Damage("hidden/zarr.json broken", lambda s: (s / "hidden/zarr.json").write_text("{"),
           "hidden/zarr.json is missing or unreadable"),
    Damage("label array deleted", lambda s: shutil.rmtree(s / "lang"), "lang/zarr.json is missing or unreadable"),
    Damage("model a string", lambda s: edit_attrs(s, lambda a: a.update(model="tiny")),
           "attributes/model: 'tiny' is not of type 'object'"),
    Damage("settings a list", lambda s: edit_attrs(s, lambda a: a.update(settings=[1, 2])),
           "attributes/settings: [1, 2] is not of type 'object'"),
    Damage("special_token_ids a string", lambda s: edit_attrs(s, lambda a: a.update(special_token_ids="0,1")),
           "attributes/special_token_ids: '0,1' is not of type 'array'"),
    Damage("model.n_layers a string", lambda s: edit_attrs(s, lambda a: a["model"].update(n_layers="4")),
           "attributes/model/n_layers: '4' is not of type 'integer'"),
    Damage("prompts a list", lambda s: edit_attrs(s, lambda a: a.update(prompts=[])),
           "attributes/prompts: [] is not of type 'object'"),
    Damage("runs an object", lambda s: edit_attrs(s, lambda a: a.update(runs={})),
           "attributes/runs: {} is not of type 'array'"),
    Damage("dtype unknown", lambda s: edit_attrs(s, lambda a: a.update(dtype="int8")), "attributes/dtype"),
    Damage("digests not hexadecimal", lambda s: edit_attrs(s, lambda a: a["digests"].update(text="x")),
           "attributes/digests/text"),
]


@pytest.fixture(params=DAMAGES, ids=[d.name for d in DAMAGES])
def damaged(request, store, tmp_path):
    """(path of a damaged copy of the store, the damage)."""
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    request.param.apply(bad)
    return bad, request.param


def test_validate_reports_the_damage(damaged, capsys):
    bad, damage = damaged
    for deep in ([True] if damage.deep_only else [False, True]):
        rc, out, err = cli(capsys, "validate", *(["--deep"] if deep else []), bad)
        assert rc == 1 and damage.says in out, (deep, out, err)
        assert "Traceback" not in out + err and "unexpected" not in out + err
    if damage.deep_only:
        rc, out, _ = cli(capsys, "validate", bad)
        assert rc == 0, out  # the cheap check does not read texts and token ids


def test_require_consistent_refuses_the_damage(damaged):
    bad, damage = damaged
    if damage.deep_only:
        require_consistent(str(bad), "activations")
        return
    with pytest.raises(UserError) as refused:
        require_consistent(str(bad), "activations")
    message = str(refused.value)
    assert damage.says in message and str(bad) in message and "\n" not in message
    if "readable Zarr v3 group" not in message:  # the store could be opened: validate lists the rest
        assert f"run repgeo validate {bad}" in message


def test_summarize_refuses_the_damage_and_writes_nothing(damaged, tmp_path, run_repgeo, the_error_line):
    bad, damage = damaged
    if damage.deep_only:
        # the geometry reads neither; bpc re-encodes each text and leaves it NaN where the text no longer gives
        # the stored ids (test_summarize_bpc.py), which --deep validation reports
        pytest.skip("damage only validate --deep detects: summarize's bpc is NaN there, its geometry unaffected")
    out = tmp_path / "r.zarr"
    rc, _, err = run_repgeo("summarize", "--store", bad, "--out", out, "--workers", "1", "--groupby", "lang")
    assert rc == 2, err
    assert damage.says in the_error_line(err)
    assert not out.exists() and not (tmp_path / "r.zarr.partial").exists()


def test_info_refuses_the_damage_in_one_line(damaged, capsys):
    bad, damage = damaged
    if damage.deep_only:
        return
    rc, out, err = cli(capsys, "info", bad)
    assert rc == 2 and damage.says in err and len(err.strip().splitlines()) == 1, err
    assert "unexpected" not in err


# ------------------------------------------------------------------------------------------------------------
# Intact stores


def test_intact_store_records_digests_and_checksums_and_validates(store, make_tiny_texts, capsys):
    rc, out, _ = cli(capsys, "validate", "--deep", store)
    assert rc == 0 and out.strip().endswith("valid")
    group = require_consistent(str(store), "activations")
    assert set(group.attrs["digests"]) == {"input_ids", "n_tokens", "prompt", "layer", "text", "lang", "n"}
    for name in ("n_tokens", "prompt", "layer", "text", "lang", "n", "input_ids", "done", "loss", "token_loss"):
        codecs = [c["name"] for c in group[name].metadata.to_dict()["codecs"]]
        assert codecs[-1] == "crc32c", (name, codecs)
    ds = xr.open_zarr(str(store))  # checksummed strings and labels still open with plain xarray
    assert ds.text.values.tolist() == make_tiny_texts(6, seed=7)
    assert ds.lang.values.tolist() == ["yy", "xx"] * 3 and ds.n.values.tolist() == list(range(6))


def test_prompts_of_one_token_have_no_loss_chunks_and_are_valid(tmp_path, tiny_model, run_repgeo, write_jsonl,
                                                                make_tiny_texts, capsys):
    """token_loss and loss of a one-token prompt are NaN, the fill value: zarr writes no chunk for them."""
    out = tmp_path / "one.zarr"
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in make_tiny_texts(3, seed=1)])
    rc, _, err = run_repgeo("extract", "--model", tiny_model, "--prompts", prompts, "--out", out, "--max-tokens", 1)
    assert rc == 0, err
    assert not list((out / "loss").glob("c/*")) and not list((out / "token_loss").glob("c/*/*"))
    rc, out_text, _ = cli(capsys, "validate", out)
    assert rc == 0, out_text
    require_consistent(str(out), "activations")


def test_a_store_without_digests_still_validates(store, tmp_path, capsys):
    """Stores made before digests were recorded: checked by everything else (documented in validate.py)."""
    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    edit_attrs(old, lambda a: a.pop("digests"))
    for args in (["validate", old], ["validate", "--deep", old]):
        rc, out, _ = cli(capsys, *args)
        assert rc == 0, out
    require_consistent(str(old), "activations")


def test_the_cheap_check_reads_no_hidden_states(store, tmp_path):
    """A corrupted hidden shard passes require_consistent (it lists keys only); validate --deep finds it."""
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    flip_byte(bad / "hidden/c/2/0/0/0")
    assert require_consistent(str(bad), "activations", "r+").read_only is False


def test_require_consistent_refuses_another_kind_of_store(store):
    with pytest.raises(UserError, match="is a repgeo activations store, but a results store is needed"):
        require_consistent(str(store), "results")


# ------------------------------------------------------------------------------------------------------------
# Results and SAE co-occurrence stores


def shrink_first(m):
    m["shape"][0] -= 1
    m["chunk_grid"]["configuration"]["chunk_shape"][0] -= 1


RESULTS_DAMAGES = [
    Damage("k shorter", lambda s: edit_array_metadata(s, "k", shrink_first), "k has 3 along k, overlap has 4"),
    Damage("source.n_prompts", lambda s: edit_attrs(s, lambda a: a["source"].update(n_prompts=7)),
           "the store has 6 prompts, its source 7"),
    Damage("parameters a list", lambda s: edit_attrs(s, lambda a: a.update(parameters=[])),
           "attributes/parameters: [] is not of type 'object'"),
    Damage("source.model a number", lambda s: edit_attrs(s, lambda a: a["source"].update(model=1)),
           "attributes/source/model: 1 is not of type 'string'"),
    Damage("norm_mean chunk bytes flipped", lambda s: flip_byte(s / "norm_mean/c/0/0"), "norm_mean chunk (0, 0) is "
           "unreadable", deep_only=True),
]

SAE_DAMAGES = [
    Damage("sae.d_sae", lambda s: edit_attrs(s, lambda a: a["sae"].update(d_sae=15)),
           "feature has 16 values, but the SAE has 15 features"),
    Damage("clusters", lambda s: edit_attrs(s, lambda a: a["parameters"].update(clusters=[2, 3])),
           "n_clusters has 1 values, but clusters are [2, 3]"),
    Damage("layer a string", lambda s: edit_attrs(s, lambda a: a.update(layer="2")),
           "attributes/layer: '2' is not of type 'integer'"),
    Damage("cooccurrence chunk bytes flipped", lambda s: flip_byte(s / "cooccurrence/c/0/0"),
           "cooccurrence chunk (0, 0) is unreadable", deep_only=True),
]


@pytest.mark.parametrize("kind, damage", [("results", d) for d in RESULTS_DAMAGES]
                         + [("sae_cooccurrence", d) for d in SAE_DAMAGES],
                         ids=[f"results: {d.name}" for d in RESULTS_DAMAGES] + [f"sae: {d.name}" for d in SAE_DAMAGES])
def test_derived_stores_are_checked_too(kind, damage, request, tmp_path, capsys):
    source = request.getfixturevalue("results" if kind == "results" else "sae_results")
    rc, out, _ = cli(capsys, "validate", "--deep", source)
    assert rc == 0, out
    bad = tmp_path / "bad.zarr"
    shutil.copytree(source, bad)
    damage.apply(bad)
    rc, out, err = cli(capsys, "validate", "--deep", bad)
    assert rc == 1 and damage.says in out, out + err
    rc, out, _ = cli(capsys, "validate", bad)
    assert rc == (0 if damage.deep_only else 1), out
    if damage.deep_only:
        require_consistent(str(bad), kind)
    else:
        with pytest.raises(UserError, match="run repgeo validate"):
            require_consistent(str(bad), kind)
