"""Every user file is parsed strictly, before any model loads: what Python's json and a lax loader would let
through (repeated keys, NaN, lone surrogates, wrongly typed SAE cfg fields, unusable weights) is refused with
one line that names the file, the place and the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from toolkit.errors import UserError
from toolkit.prompts import read_prompts
from toolkit.sae import load_sae, save_sae


def refusal(call, *args) -> str:
    """The message of the UserError that call(*args) raises, checked to be one line with a fix after ';'."""
    with pytest.raises(UserError) as error:
        call(*args)
    message = str(error.value)
    assert "\n" not in message and ";" in message, message
    return message


def bad_jsonl_line(tmp_path, line: str) -> str:
    """The refusal of a prompt file whose second line is ``line`` (the first is fine)."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    message = refusal(read_prompts, str(path))
    assert f"{path} line 2" in message
    return message


# ------------------------------------------------------------------------------------------------------------
# Prompt files


@pytest.mark.parametrize("line, field", [
    ('{"text": "a", "topic": "x", "topic": "y"}', "topic"),
    ('{"text": "a", "text": "b"}', "text"),
    ('{"text": "a", "topic": "x", "year": 1, "topic": "x"}', "topic"),  # even with the same value
])
def test_repeated_keys_in_a_prompt_line_are_refused(tmp_path, line, field):
    message = bad_jsonl_line(tmp_path, line)
    assert f"field {field!r} appears twice" in message


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e400"])
def test_nan_and_infinite_label_values_are_refused(tmp_path, number):
    message = bad_jsonl_line(tmp_path, f'{{"text": "a", "weight": {number}}}')
    assert "field 'weight'" in message and "finite" in message


def test_numbers_too_long_to_read_are_refused(tmp_path):
    message = bad_jsonl_line(tmp_path, '{"text": "a", "n": ' + "7" * 5000 + "}")
    assert "5000 digits" in message and "string" in message


@pytest.mark.parametrize("line, field", [
    ('{"text": "a \\ud800 b"}', "field 'text'"),
    ('{"text": "a", "topic": "\\udfff"}', "field 'topic'"),
    ('{"text": "a", "topic": "\\ude00\\ud83d"}', "field 'topic'"),  # a pair in the wrong order
    ('{"text": "a", "\\ud800": 1}', "field name '\\ud800'"),
])
def test_lone_surrogates_in_prompt_lines_are_refused(tmp_path, line, field):
    message = bad_jsonl_line(tmp_path, line)
    assert field in message and "lone surrogate" in message


def test_full_surrogate_pairs_and_unicode_line_separators_are_read(tmp_path):
    # Only "\n" ends a JSON Lines record: U+2028 and U+0085 are ordinary characters inside a string.
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a\u2028b\u0085c", "emoji": "\\ud83d\\ude00"}\n{"text": "d"}\n', encoding="utf-8")
    prompts = read_prompts(str(path)).prompts
    assert [(p.text, p.labels) for p in prompts] == [("a\u2028b\u0085c", {"emoji": "\U0001F600"}), ("d", {})]


@pytest.mark.parametrize("name, phrase", [
    ("chunk", "xarray.Dataset attribute"),
    ("sel", "xarray.Dataset attribute"),
    ("mean", "xarray.Dataset attribute"),
    ("attrs", "xarray.Dataset attribute"),
    ("dims", "xarray.Dataset attribute"),
    ("values", "xarray.Dataset attribute"),
    ("zarr.json", "cannot name an array"),
    ("zarr.meta", "cannot name an array"),
    ("__init__", "cannot name an array"),
    ("__notes", "cannot name an array"),
    ("a\u0000b", "cannot name an array"),
    ("a\tb", "cannot name an array"),
    ("line\nbreak", "cannot name an array"),
    ("del\u007f", "cannot name an array"),
])
def test_label_names_that_break_the_store_or_xarray_are_refused(tmp_path, name, phrase):
    message = bad_jsonl_line(tmp_path, json.dumps({"text": "a", name: 1}))
    assert phrase in message and repr(name) in message
    if phrase.startswith("xarray"):
        assert f"{name}_label" in message  # a rename is suggested


def test_txt_file_names_that_are_not_utf8_are_refused(tmp_path):
    directory = tmp_path / "texts"
    directory.mkdir()
    (directory / "fine.txt").write_text("one prompt")
    try:
        with open(os.fsencode(directory) + b"/caf\xe9.txt", "w") as f:  # Latin-1 bytes: Python reads '\udce9'
            f.write("another prompt")
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 file names")
    message = refusal(read_prompts, str(directory))
    assert "not UTF-8" in message and "rename" in message


# ------------------------------------------------------------------------------------------------------------
# SAE directories

D_IN, D_SAE = 8, 16


def sae_dir(tmp_path, architecture="topk") -> Path:
    """A valid SAE (TopK with k=4, or JumpReLU) as `save_sae` writes it."""
    rng = np.random.default_rng(0)
    return save_sae(tmp_path / "sae", rng.standard_normal((D_IN, D_SAE)), np.zeros(D_SAE),
                    rng.standard_normal((D_SAE, D_IN)), np.zeros(D_IN), architecture, k=4,
                    threshold=np.full(D_SAE, 0.1), extra_cfg={"hook_name": "blocks.1.hook_resid_post"})


def edit_cfg(directory, **changes):
    """Set fields of the SAE's cfg.json."""
    cfg = json.loads((directory / "cfg.json").read_text())
    cfg.update(changes)
    (directory / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, field", [
    ({"apply_b_dec_to_input": "false"}, "apply_b_dec_to_input"),  # a non-empty string was read as true
    ({"apply_b_dec_to_input": 0}, "apply_b_dec_to_input"),
    ({"apply_b_dec_to_input": None}, "apply_b_dec_to_input"),
    ({"d_sae": 0}, "d_sae"),
    ({"d_in": "8"}, "d_in"),
    ({"d_in": 8.0}, "d_in"),
    ({"k": -1}, "k"),
    ({"k": "8"}, "k"),
    ({"k": True}, "k"),
    ({"k": 4.0}, "k"),
    ({"activation_fn_kwargs": {"k": "4"}}, "activation_fn_kwargs.k"),
    ({"activation_fn_kwargs": [4]}, "activation_fn_kwargs"),
    ({"architecture": None}, "architecture"),
    ({"architecture": ["topk"]}, "architecture"),
    ({"activation_fn_str": 1}, "activation_fn_str"),
    ({"normalize_activations": False}, "normalize_activations"),
    ({"rescale_acts_by_decoder_norm": "false"}, "rescale_acts_by_decoder_norm"),
])
def test_sae_cfg_fields_of_the_wrong_type_are_refused(tmp_path, changes, field):
    directory = sae_dir(tmp_path)
    edit_cfg(directory, **changes)
    message = refusal(load_sae, directory, D_IN)
    assert str(directory / "cfg.json") in message and f" {field} is " in message and "must be" in message


@pytest.mark.parametrize("text, phrase", [
    ('{"architecture": "topk", "k": 4, "k": 8}', "field 'k' appears twice"),
    ('{"architecture": "topk", "k": 4, "activation_fn_kwargs": {"k": 4, "k": 2}}', "field 'k' appears twice"),
    ('{"architecture": "topk", "k": 4, "scale": NaN}', "field 'scale'"),
    ('{"architecture": "topk", "k": 4, "scale": -Infinity}', "field 'scale'"),
    ('{"architecture": "topk", "k": 4, "hook_name": "blocks.1\\udc00"}', "lone surrogate"),
])
def test_sae_cfg_that_is_not_standard_json_is_refused(tmp_path, text, phrase):
    directory = sae_dir(tmp_path)
    (directory / "cfg.json").write_text(text)
    message = refusal(load_sae, directory, D_IN)
    assert str(directory / "cfg.json") in message and phrase in message


def rewrite_weights(directory, **changes):
    """Re-save the weights with tensors replaced or added, each kept at its numpy dtype."""
    path = str(directory / "sae_weights.safetensors")
    tensors = dict(load_file(path), **changes)
    save_file({name: np.ascontiguousarray(t) for name, t in tensors.items()}, path)


@pytest.mark.parametrize("architecture, tensors, cfg, phrase", [
    ("topk", {"W_enc": np.ones((D_IN, D_SAE), dtype=np.int32)}, None, "tensor W_enc is I32, not floating point"),
    ("topk", {"b_dec": np.zeros(D_IN, dtype=bool)}, None, "tensor b_dec is BOOL"),
    # Tensors the SAE does not use must be finite too.
    ("topk", {"scaling_factor": np.full(D_SAE, np.nan, dtype=np.float32)}, None, "scaling_factor hold NaN"),
    ("jumprelu", {"log_threshold": np.full(D_SAE, np.inf, dtype=np.float32)}, None, "log_threshold hold NaN"),
    ("topk", {}, {"architecture": "topk", "k": D_SAE + 1}, f"k={D_SAE + 1} exceeds d_sae={D_SAE}"),
    ("relu", {"W_enc": np.zeros((D_IN, 0), np.float32), "b_enc": np.zeros(0, np.float32),
              "W_dec": np.zeros((0, D_IN), np.float32)}, {"architecture": "standard"}, "both at least 1"),
])
def test_unusable_sae_weights_are_refused(tmp_path, architecture, tensors, cfg, phrase):
    """cfg, when given, replaces cfg.json (so that d_in and d_sae are absent and only the weights give them)."""
    directory = sae_dir(tmp_path, architecture)
    rewrite_weights(directory, **tensors)
    if cfg is not None:
        (directory / "cfg.json").write_text(json.dumps(cfg))
    message = refusal(load_sae, directory, D_IN)
    assert phrase in message
