"""What each attention head, each attention layer and each MLP writes into the residual stream, recorded by hooks
during the extraction's own forward pass, and where a token's information came from (flow, gradients).

Supported: the Llama family (SmolLM2, Llama, …) and Gemma 3. For Gemma 3 the attention output passes a
post-attention RMSNorm before it is added: each head's write is scaled by the same elementwise factor that the
norm applies to the heads' sum (norm(sum) / sum), so the heads still sum to what the model adds; the MLP's
write is the post-feed-forward norm's output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..observables.flow import attention_flow, mix_heads, write_share
from .attention import want_weights

#: config.model_type → the family named in messages.
SUPPORTED = {"llama": "Llama", "gemma3_text": "Gemma 3", "gemma3": "Gemma 3"}
#: Arrays added to the store per (block, token), per (block, head, token) and per (target, layer, token).
BLOCK_ARRAYS = ("resid_norm", "attn_norm", "mlp_norm", "attn_share", "mlp_share")
HEAD_ARRAYS = ("head_norm", "head_cosine")


def check_supported(config, model_name: str):
    """Refuse (before the model runs) an architecture whose blocks the hooks do not know."""
    if config.model_type not in SUPPORTED:
        families = sorted(set(SUPPORTED.values()))
        raise UserError(f"--contributions supports {' and '.join(families)} models; {model_name} is "
                        f"{config.model_type!r}: extract it without --contributions")


@dataclass(frozen=True)
class FlowSettings:
    """targets: "last", "all" or a tuple of positions; weighting: "mean" or "norm"; gradients: grad_norm too."""

    targets: object = "last"
    weighting: str = "mean"
    gradients: bool = False

    def positions(self, n: int) -> np.ndarray:
        """Target positions in a prompt of n tokens (listed positions past its end are left out)."""
        if self.targets == "last":
            return np.array([n - 1])
        if self.targets == "all":
            return np.arange(n)
        return np.array([t for t in self.targets if t < n], dtype=np.int64)

    def width(self, longest: int) -> int:
        """Size of the store's ``target`` dimension."""
        return 1 if self.targets == "last" else longest if self.targets == "all" else len(self.targets)


def contribution_values(config, flow: FlowSettings, n_tokens) -> int:
    """Values the contribution arrays add for prompts of ``n_tokens`` tokens (the size estimate before a run)."""
    n_tokens = np.asarray(n_tokens, dtype=np.int64)
    blocks, heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    per_token = blocks * (len(HEAD_ARRAYS) * heads + len(BLOCK_ARRAYS))
    targets = n_tokens if flow.targets == "all" else np.full_like(n_tokens, flow.width(int(n_tokens.max(initial=1))))
    per_target = (blocks + 1) * (2 if flow.gradients else 1)
    return int((n_tokens * per_token).sum() + (targets * per_target * n_tokens).sum())


def _cosine(dot: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor) -> torch.Tensor:
    """Cosine from a dot product and the two norms (computed once, not per pair), 0 where either vector is 0."""
    denominator = norm_a * norm_b
    return torch.where(denominator > 0, dot / torch.where(denominator > 0, denominator, 1), 0)


class ContributionRecorder:
    """Hooks on every decoder block of ``model`` that, during each forward pass, record per block:

    head_norm, head_cosine (batch, head, token): L2 norm of each head's write into the stream and its cosine
    with the stream entering the block; resid_norm, attn_norm, mlp_norm (batch, token) and the shares
    attn_share = ‖attn‖ / (‖attn‖ + ‖stream in‖), mlp_share = ‖mlp‖ / (‖mlp‖ + ‖stream in + attn‖); and the
    head-mixed attention (batch, token, token) (`mix_heads`: mean, or weighted by the heads' write norms).
    The weights are read from the attention modules' output: the model must run with
    `~toolkit.extract.attention.use_weights_attention` (SDPA plus the weights, only while recording; each block's
    weights are overwritten by the next block's, so they are mixed within the block) or eager.
    """

    def __init__(self, model, weighting: str = "mean"):
        self.blocks = list(model.base_model.layers)
        self._attentions = [block.self_attn for block in self.blocks]
        self.gemma = hasattr(self.blocks[0], "post_feedforward_layernorm")
        self.weighting = weighting
        self.records, self._handles, self._pending = [], [], {}
        self.recording = False

    def __enter__(self):
        for b, block in enumerate(self.blocks):
            self._hook(block, self._stream_in(b), pre=True)
            self._hook(block.self_attn.o_proj, self._head_writes(b), pre=True)
            self._hook(block.self_attn, self._attention(b))
            if self.gemma:
                self._hook(block.post_attention_layernorm, self._normed_attention(b))
                self._hook(block.post_feedforward_layernorm, self._mlp(b))
            else:
                self._hook(block.mlp, self._mlp(b))
        return self

    def __exit__(self, *exc):
        want_weights(self._attentions, False)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def start(self):
        """Record the next forward pass (forgetting the previous one's records)."""
        self.records = [dict() for _ in self.blocks]
        self.recording = True
        want_weights(self._attentions, True)

    def stop(self):
        """Record nothing more (e.g. in the gradient passes) until `start`."""
        self.recording = False
        want_weights(self._attentions, False)

    def _hook(self, module, fn, pre=False):
        def when_recording(*args):
            if self.recording:
                return fn(*args)
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handles.append(register(when_recording, with_kwargs=True))

    def _stream_in(self, b):
        def hook(module, args, kwargs):
            self._pending[b] = {"stream": args[0] if args else kwargs["hidden_states"]}
        return hook

    def _head_writes(self, b):
        def hook(module, args, kwargs):
            z = args[0]  # (batch, token, head · head_dim): each head's value mix, before the output projection
            W = module.weight  # (dim, head · head_dim)
            heads = z.shape[-1] // self.blocks[b].self_attn.head_dim
            writes = torch.einsum("btkh,dkh->btkd", z.unflatten(-1, (heads, -1)), W.unflatten(1, (heads, -1)))
            self._pending[b]["heads"] = writes  # (batch, token, head, dim)
        return hook

    def _attention(self, b):
        def hook(module, args, kwargs, output):
            attn_out, weights = output
            if weights is None:
                raise RuntimeError("attention weights are not returned: run the model with use_weights_attention "
                                   "(toolkit.extract.attention) or eager attention")
            self._pending[b]["weights"] = weights
            if not self.gemma:
                self._finish_attention(b, attn_out)
        return hook

    def _normed_attention(self, b):
        def hook(module, args, kwargs, output):
            summed = args[0]
            scale = torch.where(summed != 0, output / torch.where(summed != 0, summed, 1), 0)
            self._pending[b]["heads"] = self._pending[b]["heads"] * scale[:, :, None, :]
            self._finish_attention(b, output)
        return hook

    def _finish_attention(self, b, attn_write):
        pending, record = self._pending[b], self.records[b]
        stream, heads = pending["stream"], pending.pop("heads")
        head_norm, stream_norm = heads.norm(dim=-1), stream.norm(dim=-1)  # (batch, token, head), (batch, token)
        dot = torch.matmul(heads, stream[..., None])[..., 0]  # each head's write · the stream: (batch, token, head)
        head_norm = head_norm.transpose(1, 2)  # (batch, head, token)
        record["head_norm"] = head_norm.float().cpu().numpy()
        record["head_cosine"] = _cosine(dot.transpose(1, 2), head_norm, stream_norm[:, None]).float().cpu().numpy()
        record["resid_norm"] = stream_norm.float().cpu().numpy()
        record["attn_norm"] = attn_write.norm(dim=-1).float().cpu().numpy()
        pending["after_attention"] = stream + attn_write
        weights = pending.pop("weights").float()  # (batch, head, query, key)
        mixed = mix_heads(weights, None if self.weighting == "mean" else head_norm.float())
        record["attention"] = mixed.cpu().numpy()

    def _mlp(self, b):
        def hook(module, args, kwargs, output):
            pending, record = self._pending.pop(b), self.records[b]
            record["mlp_norm"] = output.norm(dim=-1).float().cpu().numpy()
            record["mlp_share"] = write_share(record["mlp_norm"],
                                              pending["after_attention"].norm(dim=-1).float().cpu().numpy())
            record["attn_share"] = write_share(record["attn_norm"], record["resid_norm"])
        return hook

    def prompt_arrays(self, i: int, n: int, flow: FlowSettings) -> dict:
        """Prompt ``i`` of the last batch, its first n positions: name → array (block first; flow: target first).

        head_norm, head_cosine (block, head, token); BLOCK_ARRAYS (block, token) float32; flow (target, layer,
        token) float32 for `FlowSettings.positions`.
        """
        out = {name: np.stack([r[name][i, :, :n] for r in self.records]).astype(np.float32) for name in HEAD_ARRAYS}
        out.update({name: np.stack([r[name][i, :n] for r in self.records]).astype(np.float32)
                    for name in BLOCK_ARRAYS})
        attention = [r["attention"][i, :n, :n] for r in self.records]  # views: no copy of the (token, token) blocks
        out["flow"] = attention_flow(attention, 1 - out["attn_share"], flow.positions(n)).astype(np.float32)
        return out


def gradient_norms(model, ids, targets) -> np.ndarray:
    """L2 norm of the gradient of each target's predicted-token log-probability with respect to every hidden
    state: (target, layer, token) float32, layer 0 … n_layers as in ``hidden_states``.

    ids: (token,) the prompt; targets: positions. The predicted token at t is the model's argmax at t. One
    backward pass per target. Only the hidden states get gradients: the graph starts at the input embeddings,
    and the model's weights must not require gradients (``model.requires_grad_(False)``, as extract sets).
    """
    embedding = model.get_input_embeddings()
    ids = torch.as_tensor(np.asarray(ids, np.int64), device=embedding.weight.device)[None]
    with torch.enable_grad():
        inputs = embedding(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=inputs, output_hidden_states=True, use_cache=False)
        states = out.hidden_states
        for h in states:
            h.retain_grad()
        norms = np.zeros((len(targets), len(states), ids.shape[1]), np.float32)
        for k, t in enumerate(targets):
            logp = torch.log_softmax(out.logits[0, int(t)].float(), dim=-1)
            logp[logp.argmax()].backward(retain_graph=k < len(targets) - 1)
            for layer, h in enumerate(states):
                norms[k, layer] = h.grad[0].norm(dim=-1).float().cpu().numpy()
                h.grad = None
    return norms
