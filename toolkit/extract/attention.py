"""An attention implementation for `--contributions`: PyTorch's fused SDPA for the output, plus eager attention's
weights softmax(Q·Kᵀ·scaling + mask) from the attention modules that are asked for them.

Only eager attention returns the weights, but it also computes the weights·V product and its copies unfused,
which made the recorded forward ~1.7× an SDPA forward on CPU. Here the output is SDPA's (the same call as
transformers' "sdpa", so the hidden states are exactly those of a plain extraction) and the weights cost one
Q·Kᵀ product and a softmax, only in the modules switched on by `want_weights` (the recorder, while it records;
the gradient passes and any other module run plain SDPA).

The weights of every module are written into the same two buffers, reused from block to block: a fresh
(batch, head, query, key) tensor per block costs more than computing the weights on CPU (allocations that size
get fresh pages from the system, zeroed page by page). So a module's weights are valid until the next module
with weights on runs: read them in between, as the recorder does.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

#: The name given to ``set_attn_implementation``.
NAME = "repgeo_sdpa_weights"
#: Attribute of an attention module: the buffers its weights go to (a dict shared by the modules), or None.
WANTS = "repgeo_weights_buffers"


def _buffer(buffers: dict, name: str, shape, dtype, device, make=torch.empty) -> torch.Tensor:
    """``buffers[name]``, (re)made with ``make`` only when its shape, dtype or device changes (a new batch width)."""
    kept = buffers.get(name)
    if kept is None or kept.shape != shape or kept.dtype != dtype or kept.device != device:
        kept = buffers[name] = make(shape, dtype=dtype, device=device)
    return kept


def _future(shape, dtype, device) -> torch.Tensor:
    """(query, key) True where the key comes after the query: what a causal mask hides."""
    return torch.ones(shape, dtype=dtype, device=device).triu_(1)


def attention_weights(module, query, key, attention_mask, scaling=None, softcap=None, buffers=None) -> torch.Tensor:
    """(batch, head, query, key) float32 weights, as transformers' eager attention computes them.

    query (batch, head, q, dim), key (batch, kv_head, k, dim) with grouped-query heads repeated as eager does;
    attention_mask as SDPA gets it: boolean (True = attend; causal, sliding window and padding already in it), an
    additive float mask, or None for plain causal attention (the mask is skipped when nothing else is masked).
    buffers: a dict whose buffers the result is computed in (and returned from), or None for new tensors.
    """
    key = repeat_kv(key, getattr(module, "num_key_value_groups", 1))
    shape, device = (*query.shape[:-1], key.shape[-2]), query.device
    if query.requires_grad:  # out= does not take part in autograd
        buffers = None
    # scaling the queries, not the (head, query, key) scores, saves a pass over the scores; eager's scaling is
    # usually a power of 2 (head_dim or query_pre_attn_scalar 64, 256, …), then both give the same bits
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = None if buffers is None else _buffer(buffers, "scores", shape, query.dtype, device)
    scores = torch.matmul(query * scaling, key.transpose(2, 3), out=scores)
    if softcap is not None:  # Gemma 2's logit cap (Gemma 3's modules pass none)
        scores.div_(softcap).tanh_().mul_(softcap)
    # masked scores get the dtype's minimum, as eager adds it, not -inf: a row with every key masked (a padding
    # query beyond a sliding window) comes out uniform as in eager, not NaN
    lowest = torch.finfo(scores.dtype).min
    if attention_mask is None and getattr(module, "is_causal", True) and shape[-2] > 1:
        # SDPA's is_causal: upper-left aligned, like eager's mask when queries and keys are the same tokens
        future = _future(shape[-2:], torch.bool, device) if buffers is None else \
            _buffer(buffers, "future", shape[-2:], torch.bool, device, _future)
        scores.masked_fill_(future, lowest)
    elif attention_mask is not None and attention_mask.dtype == torch.bool:
        scores.masked_fill_(~attention_mask, lowest)
    elif attention_mask is not None:
        scores.add_(attention_mask)
    weights = None if buffers is None else _buffer(buffers, "weights", shape, torch.float32, device)
    return torch.softmax(scores, dim=-1, dtype=torch.float32, out=weights)  # eager's float32 softmax, kept float32


def sdpa_with_weights(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
    """The attention function registered as `NAME`: (output, weights or None)."""
    buffers = getattr(module, WANTS, None)
    if softcap is None:
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if buffers is None:
            return output, None
        return output, attention_weights(module, query, key, attention_mask, scaling, buffers=buffers)
    # No SDPA kernel caps the logits: the output comes from the capped weights, as in eager
    weights = attention_weights(module, query, key, attention_mask, scaling, softcap, buffers)
    value = repeat_kv(value, getattr(module, "num_key_value_groups", 1))
    output = torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous()
    return output, None if buffers is None else weights


AttentionInterface.register(NAME, sdpa_with_weights)
# the masks SDPA gets (boolean, or None where is_causal does it); without a registered mask function transformers
# would build no mask at all for an unknown implementation
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_weights_attention(model):
    """Switch ``model`` (all its sub-models) to this attention; no module returns weights until `want_weights`."""
    model.set_attn_implementation(NAME)


def want_weights(modules, on: bool):
    """Have the attention ``modules`` return their weights (on: into buffers they share) or only their output."""
    buffers = {} if on else None
    for module in modules:
        setattr(module, WANTS, buffers)
