"""Contributions and information flow: what heads, attention and MLPs write, checked against the model itself.

References: the model's own modules (hooks that capture what each block adds), ``output_attentions=True`` of an
eager forward, a hand computation of the flow rule on a 3-token toy, finite differences for gradient norms,
scipy.stats for the correlations.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.extract.attention import NAME, WANTS, sdpa_with_weights, use_weights_attention, want_weights
from toolkit.extract.contributions import ContributionRecorder, FlowSettings, gradient_norms
from toolkit.observables.flow import attention_flow, mix_heads, write_share

TEXT = "The baker wakes before dawn, mixes flour, water, salt and yeast, and leaves the dough to rise."


def tiny_gemma3(directory, tokenizer):
    """A random 3-block Gemma 3 text model (64 dims, 4 heads) with ``tokenizer``."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                              sliding_window=8, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # random norm weights (zeros at init would hide a wrong scaling)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_gemma():
    from conftest import CACHE, build_atomically, train_tiny_tokenizer

    return str(build_atomically(CACHE / "tiny-gemma3-v1", lambda d: tiny_gemma3(d, train_tiny_tokenizer())))


def load(directory, dtype=torch.float32, attention="eager"):
    """The model in eval mode without weight gradients and its tokenizer; attention "eager", "sdpa" or `NAME`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="eager").eval()
    if attention == NAME:
        use_weights_attention(model)
    elif attention != "eager":
        model.set_attn_implementation(attention)
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(directory)


class Added:
    """Hooks capturing, per block, the stream entering it, the heads' value mix (o_proj input) and what the
    attention and the MLP add (after Gemma's post-norms)."""

    def __init__(self, model):
        self.seen, self.handles = {}, []
        gemma = hasattr(model.model.layers[0], "post_feedforward_layernorm")
        for b, block in enumerate(model.model.layers):
            self._on(block, b, "stream", pre=True)
            self._on(block.self_attn.o_proj, b, "z", pre=True)
            self._on(block.post_attention_layernorm if gemma else block.self_attn, b, "attn")
            self._on(block.post_feedforward_layernorm if gemma else block.mlp, b, "mlp")

    def _on(self, module, b, name, pre=False):
        def hook(module, args, output=None):
            value = args[0] if pre else output
            self.seen[b, name] = (value[0] if isinstance(value, tuple) else value).detach().clone()
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self.handles.append(register(hook))

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_recorded_writes_are_what_each_block_adds(which, tiny_model, tiny_gemma):
    model, tokenizer = load(tiny_model if which == "llama" else tiny_gemma)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    added = Added(model)
    recorder = ContributionRecorder(model, "mean")
    with recorder, torch.no_grad():
        recorder.start()
        out = model(ids, output_hidden_states=True, output_attentions=True)
    added.remove()
    n = ids.shape[1]
    arrays = recorder.prompt_arrays(0, n, FlowSettings())
    hidden = out.hidden_states
    for b, block in enumerate(model.model.layers):
        stream, attn, mlp = (added.seen[b, k][0].double() for k in ("stream", "attn", "mlp"))
        if b < len(model.model.layers) - 1:  # the last hidden state has the final norm applied
            torch.testing.assert_close(stream + attn + mlp, hidden[b + 1][0].double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stream, hidden[b][0].double())
        # Each head's write: its slice of o_proj on its value mix (scaled like the sum by Gemma's post-norm).
        heads = block.self_attn.config.num_attention_heads
        z = added.seen[b, "z"][0].double().unflatten(-1, (heads, -1))
        W = block.self_attn.o_proj.weight.double().unflatten(1, (heads, -1))
        writes = torch.einsum("thk,dhk->htd", z, W)
        if which == "gemma":
            writes = writes * (attn / writes.sum(0))
        torch.testing.assert_close(writes.sum(0), attn, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(arrays["head_norm"][b], writes.norm(dim=-1).numpy(), rtol=1e-4, atol=1e-6)
        cosine = (writes * stream).sum(-1) / (writes.norm(dim=-1) * stream.norm(dim=-1))
        np.testing.assert_allclose(arrays["head_cosine"][b], cosine.numpy(), atol=1e-4)
        np.testing.assert_allclose(arrays["resid_norm"][b], stream.norm(dim=-1).numpy(), rtol=1e-5)
        np.testing.assert_allclose(arrays["attn_norm"][b], attn.norm(dim=-1).numpy(), rtol=1e-5)
        np.testing.assert_allclose(arrays["mlp_norm"][b], mlp.norm(dim=-1).numpy(), rtol=1e-5)
        a, r, m, s = (x.norm(dim=-1).numpy() for x in (attn, stream, mlp, stream + attn))
        np.testing.assert_allclose(arrays["attn_share"][b], a / (a + r), rtol=1e-5)
        np.testing.assert_allclose(arrays["mlp_share"][b], m / (m + s), rtol=1e-5)
        # The attention weights are the eager forward's own.
        np.testing.assert_allclose(recorder.records[b]["attention"][0], out.attentions[b][0].mean(0).numpy(),
                                   atol=1e-6)
    assert np.allclose(arrays["flow"].sum(-1), 1, atol=1e-5)


def padded_batch(tokenizer, lengths):
    """Right-padded ids and attention mask of TEXT's first ``lengths`` tokens, as `forward_batch` builds them."""
    ids = tokenizer(TEXT)["input_ids"]
    batch = torch.zeros((len(lengths), max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, n in enumerate(lengths):
        batch[i, :n], mask[i, :n] = torch.tensor(ids[:n]), 1
    return batch, mask


@pytest.mark.parametrize("which", ["llama", "gemma"])
@pytest.mark.parametrize("lengths", [(None,), (5,), (None, 5, 12)])
def test_weights_attention_gives_eager_weights_and_sdpa_hidden_states(which, lengths, tiny_model, tiny_gemma):
    """The weights equal eager's ``output_attentions`` (causal mask built here or passed in, Gemma 3's sliding window
    of 8 tokens, padding, grouped-query heads) and the hidden states equal SDPA's."""
    directory = tiny_model if which == "llama" else tiny_gemma
    eager, tokenizer = load(directory)
    sdpa, _ = load(directory, attention="sdpa")
    fast, _ = load(directory, attention=NAME)
    lengths = [len(tokenizer(TEXT)["input_ids"]) if n is None else n for n in lengths]  # None: all of TEXT
    ids, mask = padded_batch(tokenizer, lengths)
    weights = {}  # copies: each block's weights are overwritten by the next block's (one buffer)
    handles = [block.self_attn.register_forward_hook(
        lambda m, a, out, b=b: weights.__setitem__(b, None if out[1] is None else out[1].clone()))
        for b, block in enumerate(fast.model.layers)]
    attentions = [block.self_attn for block in fast.model.layers]
    with torch.no_grad():
        want_weights(attentions, False)  # off: plain SDPA, no weights
        fast(input_ids=ids, attention_mask=mask)
        assert len(weights) == len(attentions) and all(w is None for w in weights.values())
        want_weights(attentions, True)
        got = fast(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        reference = eager(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        plain = sdpa(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for h in handles:
        h.remove()
    for b, expected in enumerate(reference.attentions):
        assert weights[b].dtype == torch.float32 and weights[b].shape == expected.shape
        np.testing.assert_allclose(weights[b].double().numpy(), expected.double().numpy(), rtol=0, atol=1e-6)
    if which == "gemma" and lengths[0] > fast.config.sliding_window:  # the window is in the weights
        beyond = torch.ones(lengths[0], lengths[0], dtype=torch.bool).tril(-fast.config.sliding_window)
        assert (reference.attentions[0][0][:, beyond] == 0).all() and (weights[0][0][:, beyond] == 0).all()
    for computed, same, close in zip(got.hidden_states, plain.hidden_states, reference.hidden_states):
        for i, n in enumerate(lengths):
            torch.testing.assert_close(computed[i, :n], same[i, :n], rtol=0, atol=0)  # SDPA's own call
            torch.testing.assert_close(computed[i, :n], close[i, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masking", ["causal by SDPA", "boolean", "additive"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_weights_attention_function_equals_eager_attention_function(masking, softcap):
    """The function itself against transformers' eager one (Gemma 3's, which takes a soft cap), on grouped-query
    heads with a padded row, a scaling that is not a power of 2, and each kind of mask; its buffers are reused."""
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.head_dim = 2, True, 8
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril().expand(2, 1, 10, 10).clone()
    if masking != "causal by SDPA":
        allowed[1, :, :, 7:] = False  # the second row is 7 tokens long
    additive = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    mask = {"causal by SDPA": None, "boolean": allowed, "additive": additive}[masking]
    expected_output, expected = eager_attention_forward(module, q, k, v, additive, scaling=0.3, softcap=softcap)
    want_weights([module], True)
    output, weights = sdpa_with_weights(module, q, k, v, mask, scaling=0.3, softcap=softcap)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=1e-5)
    again = sdpa_with_weights(module, q, k, v, mask, scaling=0.3, softcap=softcap)[1]
    assert again.data_ptr() == weights.data_ptr()  # the same buffer, overwritten
    want_weights([module], False)
    output, weights = sdpa_with_weights(module, q, k, v, mask, scaling=0.3, softcap=softcap)
    assert weights is None
    torch.testing.assert_close(output, expected_output, rtol=0, atol=1e-5)


def test_recorder_with_weights_attention_records_what_it_records_with_eager(tiny_gemma):
    eager, tokenizer = load(tiny_gemma)
    fast, _ = load(tiny_gemma, attention=NAME)
    ids, mask = padded_batch(tokenizer, [len(tokenizer(TEXT)["input_ids"]), 12])
    arrays = []
    for model in (eager, fast):
        recorder = ContributionRecorder(model, "norm")
        with recorder, torch.no_grad():
            recorder.start()
            model(input_ids=ids, attention_mask=mask)
            recorder.stop()
            arrays.append([recorder.prompt_arrays(i, n, FlowSettings("all")) for i, n in enumerate([ids.shape[1], 12])])
    for expected, got in zip(*arrays):
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert all(getattr(block.self_attn, WANTS) is None for block in fast.model.layers)  # off after recording


def test_norm_weighting_weights_heads_by_their_write_norm(tiny_model):
    model, tokenizer = load(tiny_model)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    recorder = ContributionRecorder(model, "norm")
    with recorder, torch.no_grad():
        recorder.start()
        out = model(ids, output_attentions=True)
    for b in range(len(recorder.records)):
        A = out.attentions[b][0].double().numpy()  # (head, query, key)
        w = recorder.records[b]["head_norm"][0].astype(np.float64)  # (head, query)
        expected = (w[:, :, None] * A).sum(0) / w.sum(0)[:, None]
        np.testing.assert_allclose(recorder.records[b]["attention"][0], expected, rtol=1e-5, atol=1e-7)


def test_flow_by_hand_on_three_tokens():
    A = np.array([[[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]],
                  [[1, 0, 0], [0.9, 0.1, 0], [0.1, 0.1, 0.8]]])  # blocks 0, 1: (query, key)
    r = np.array([[0.5, 0.5, 0.5], [0.25, 0.5, 0.75]])
    flow = attention_flow(A, r, [2])[0]
    # layer 2: the target alone; block 1: token 2 keeps 0.75 and sends 0.25 by A_1 row 2
    top = np.array([0, 0, 1.0])
    l1 = top * r[1] + (top * (1 - r[1])) @ A[1]
    np.testing.assert_allclose(flow[2], top)
    np.testing.assert_allclose(flow[1], [0.025, 0.025, 0.95])
    np.testing.assert_allclose(flow[1], l1)
    l0 = l1 * r[0] + (l1 * (1 - r[0])) @ A[0]
    np.testing.assert_allclose(flow[0], l0)
    np.testing.assert_allclose(flow.sum(-1), 1)
    np.testing.assert_allclose(mix_heads(np.stack([A, A[::-1]], 1)), (A + A[::-1]) / 2)
    np.testing.assert_allclose(write_share([3, 0], [1, 0]), [0.75, 0])


@pytest.mark.slow  # ~30 s of finite differences: in the full suite, not the quick subset
def test_gradient_norms_equal_finite_differences(tiny_model):
    model, tokenizer = load(tiny_model, torch.float64)
    ids = np.asarray(tokenizer(TEXT)["input_ids"][:12])
    target = len(ids) - 1
    norms = gradient_norms(model, ids, [target])[0]
    with torch.no_grad():
        base = model(torch.tensor(ids[None])).logits[0, target]
    predicted = int(base.argmax())

    def objective(layer, token, direction, eps):
        """log p(predicted | ...) with ``eps · direction`` added to hidden layer ``layer`` at ``token``."""
        def shift(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            h[0, token] += eps * direction
            return (h, *output[1:]) if isinstance(output, tuple) else h
        module = model.model.embed_tokens if layer == 0 else model.model.layers[layer - 1]
        handle = module.register_forward_hook(shift)
        with torch.no_grad():
            logits = model(torch.tensor(ids[None])).logits[0, target]
        handle.remove()
        return float(torch.log_softmax(logits, -1)[predicted])

    for layer, token in ((0, 3), (2, target - 1), (4 - 1, target)):
        # Central differences along each unit axis give the gradient's coordinates. The step is not tiny: Llama's
        # RMSNorm rounds through float32 even in a float64 model, which 1e-5 steps would see as noise.
        d, eps = model.config.hidden_size, 1e-3
        axes = torch.eye(d, dtype=torch.float64)
        grad = np.array([(objective(layer, token, axes[i], eps) - objective(layer, token, axes[i], -eps)) / (2 * eps)
                         for i in range(d)])
        assert norms[layer, token] == pytest.approx(np.linalg.norm(grad), rel=1e-4)
