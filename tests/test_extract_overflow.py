"""Hidden states beyond float16's range: ``--dtype float16`` stops with one line naming the prompt and layer and
the fix; ``--dtype float32`` stores them."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

FLOAT16_MAX = 65504.0


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, write_jsonl):
    """Three prompts, the last the longest, so that it is the first one computed (batches go longest first)."""
    rows = [{"text": "A river carries sand."}, {"text": "Cold air sinks."},
            {"text": "The baker wakes before dawn, mixes flour, water, salt and yeast, and leaves the dough."}]
    return write_jsonl(tmp_path_factory.mktemp("overflow") / "prompts.jsonl", rows)


def test_premise_layer_2_is_the_first_beyond_float16(tiny_model_overflowing, prompts):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_overflowing)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_overflowing, dtype=torch.float32)
    for line in open(prompts, encoding="utf-8"):
        ids = torch.tensor([tokenizer(json.loads(line)["text"])["input_ids"]])
        with torch.no_grad():
            peaks = [float(h.abs().max()) for h in model(ids, output_hidden_states=True).hidden_states]
        assert max(peaks[:2]) < FLOAT16_MAX < peaks[2] < 1e30


def test_float16_overflow_names_prompt_layer_and_fix(tiny_model_overflowing, prompts, run_repgeo, the_error_line,
                                                     tmp_path):
    code, _, err = run_repgeo("extract", "--model", tiny_model_overflowing, "--prompts", prompts,
                              "--out", tmp_path / "store.zarr", "--dtype", "float16")
    assert code == 2, err
    line = the_error_line(err)
    assert "prompt 2 layer 2" in line and "bfloat16" in line and "float32" in line


def test_float32_stores_what_float16_cannot(tiny_model_overflowing, prompts, run_repgeo, tmp_path):
    out = tmp_path / "store.zarr"
    code, _, err = run_repgeo("extract", "--model", tiny_model_overflowing, "--prompts", prompts, "--out", out,
                              "--dtype", "float32")
    assert code == 0, err
    group = zarr.open_group(str(out), mode="r")
    hidden = group["hidden"][:]
    assert hidden.dtype == np.float32 and group["done"][:].all()
    for p, n in enumerate(group["n_tokens"][:]):
        assert np.isfinite(hidden[p, :, :n]).all()
        assert np.abs(hidden[p, 2, :n]).max() > FLOAT16_MAX
