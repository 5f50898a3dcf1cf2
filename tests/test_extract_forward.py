"""``repgeo extract`` on the real SmolLM2-135M against a direct transformers forward of the stored token ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

import toolkit
from toolkit.store.activations import open_activation_group

pytestmark = pytest.mark.slow

DEMO = toolkit.__path__[0] + "/data/demo.jsonl"
MAX_TOKENS = 48
#: (demo line, characters kept): three prompts of different token counts, one of them truncated by MAX_TOKENS.
CUTS = ((3, 150), (17, 15), (0, 400))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    demo = [json.loads(line) for line in open(DEMO, encoding="utf-8")]
    path = tmp_path_factory.mktemp("smol") / "prompts.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for line, n_chars in CUTS:
            f.write(json.dumps(dict(demo[line], text=demo[line]["text"][:n_chars])) + "\n")
    return path


@pytest.fixture(scope="module")
def smol_store(tmp_path_factory, prompt_file, smollm2_hf, run_repgeo):
    """``smol_store(dtype, batch_size)`` → path of a store of the three prompts (extracted once per module)."""
    stores = {}

    def get(dtype: str, batch_size: int) -> str:
        if (dtype, batch_size) not in stores:
            out = tmp_path_factory.mktemp("smol") / f"{dtype}-b{batch_size}.zarr"
            code, _, err = run_repgeo("extract", "--model", smollm2_hf, "--prompts", prompt_file, "--out", out,
                                      "--max-tokens", MAX_TOKENS, "--dtype", dtype, "--batch-size", batch_size)
            assert code == 0, err
            stores[dtype, batch_size] = str(out)
        return stores[dtype, batch_size]

    return get


@pytest.fixture(scope="module")
def direct_forward(smollm2_hf):
    """``direct_forward(ids)`` → (hidden (layer, token, dim) float32 torch tensor, token_loss (token,) float64).

    A plain float32 transformers forward of one unpadded prompt; token_loss[t] = -log_softmax(logits[t-1])[ids[t]].
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    cache = {}

    def forward(ids: np.ndarray):
        key = ids.tobytes()
        if key not in cache:
            with torch.no_grad():
                out = model(torch.from_numpy(ids.astype(np.int64))[None], output_hidden_states=True)
            hidden = torch.stack(out.hidden_states, dim=1)[0]
            logp = torch.log_softmax(out.logits[0].double(), dim=-1)
            token_loss = np.full(len(ids), np.nan)
            token_loss[1:] = -logp[np.arange(len(ids) - 1), ids[1:]].numpy()
            cache[key] = hidden, token_loss
        return cache[key]

    return forward


#: Float32 noise of a padded batch, relative to |value| + the layer's median |value| (measured: 1.4e-5).
NOISE = 1e-4
#: Relative rounding error of each storage dtype (half a unit in the last place).
ROUNDING = {"float32": 0.0, "float16": 2.0**-11}


def assert_close(actual: np.ndarray, ref: np.ndarray, rounding: float):
    """actual, ref: (layer, token, dim). |actual - ref| <= rounding |ref| + NOISE (|ref| + median over the layer)."""
    ref = ref.astype(np.float64)
    typical = np.median(np.abs(ref), axis=(1, 2), keepdims=True)
    excess = np.abs(actual.astype(np.float64) - ref) - (rounding * np.abs(ref) + NOISE * (np.abs(ref) + typical))
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, f"(layer, token, dim) {worst}: {actual[worst]} vs {ref[worst]}"


def test_stored_ids_are_the_tokenized_prompts(smol_store, prompt_file, smollm2_hf):
    """input_ids are the tokenizer's ids of each text, truncated; the three lengths differ (premise of padding)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf)
    group = open_activation_group(smol_store("float32", 3))
    n_tokens, ids = group["n_tokens"][:], group["input_ids"][:]
    for p, line in enumerate(open(prompt_file, encoding="utf-8")):
        expected = tokenizer(json.loads(line)["text"])["input_ids"][:MAX_TOKENS]
        assert n_tokens[p] == len(expected) and ids[p, :n_tokens[p]].tolist() == expected
    assert len(set(n_tokens.tolist())) == 3
    assert n_tokens.max() == MAX_TOKENS


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_hidden_and_loss_equal_direct_forward(smol_store, direct_forward, dtype):
    group = open_activation_group(smol_store(dtype, 3))
    assert group["hidden"].dtype == np.dtype(dtype)
    hidden, ids, n_tokens = group["hidden"][:], group["input_ids"][:], group["n_tokens"][:]
    token_loss, loss = group["token_loss"][:], group["loss"][:]
    assert group["done"][:].all()
    assert hidden.shape == (3, 31, MAX_TOKENS, 576)  # 30 blocks + embeddings, SmolLM2's 576 dims
    for p, n in enumerate(n_tokens):
        ref_hidden, ref_loss = direct_forward(ids[p, :n])
        assert_close(hidden[p, :, :n], ref_hidden.numpy(), ROUNDING[dtype])
        assert np.isnan(hidden[p, :, n:]).all() and (ids[p, n:] == -1).all()
        assert np.isnan(token_loss[p, 0]) and np.isnan(token_loss[p, n:]).all()
        np.testing.assert_allclose(token_loss[p, 1:n], ref_loss[1:], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(loss[p], ref_loss[1:].mean(), rtol=1e-5)


def test_batched_with_padding_equals_unbatched(smol_store):
    batched, single = open_activation_group(smol_store("float32", 3)), open_activation_group(smol_store("float32", 1))
    for name in ("input_ids", "n_tokens", "done"):
        np.testing.assert_array_equal(batched[name][:], single[name][:])
    a, b = batched["hidden"][:], single["hidden"][:]
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    for p, n in enumerate(single["n_tokens"][:]):
        assert_close(a[p, :, :n], b[p, :, :n], ROUNDING["float32"])
    np.testing.assert_allclose(batched["token_loss"][:], single["token_loss"][:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched["loss"][:], single["loss"][:], rtol=1e-5)


def test_bfloat16_round_trip_is_exact(smol_store, direct_forward):
    """--dtype bfloat16 stores exactly float32 → bfloat16 → float32 of the forward (batch size 1: same arithmetic)."""
    import torch

    path = smol_store("bfloat16", 1)
    ds, plain = toolkit.open_activations(path), xr.open_zarr(path, consolidated=False)
    assert ds.hidden.dtype == np.float32 and plain.hidden.dtype == np.float32
    for p, n in enumerate(ds.n_tokens.values):
        ref = direct_forward(ds.input_ids.values[p, :n])[0].to(torch.bfloat16).to(torch.float32).numpy()
        np.testing.assert_array_equal(ds.hidden[p, :, :n].values, ref)
        np.testing.assert_array_equal(plain.hidden[p, :, :n].values, ref)
        assert np.isnan(ds.hidden[p, :, n:].values).all()
