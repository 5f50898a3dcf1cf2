"""One batched forward pass: hidden states of every layer and per-token loss, cast to the storage dtype."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError

FLOAT16_MAX = 65504.0


def to_storage(hidden: torch.Tensor, dtype: str) -> torch.Tensor:
    """Cast (…, dim) float hidden states to what the store holds, on their device.

    bfloat16 comes back as float32 whose low 16 bits are zero: exactly the bfloat16 values, in a type every
    reader understands.
    """
    if dtype == "float16":
        return hidden.to(torch.float16)
    if dtype == "bfloat16":
        return hidden.to(torch.bfloat16).to(torch.float32)
    return hidden.to(torch.float32)


def _check_finite(stored: torch.Tensor, computed: torch.Tensor, lengths, prompts, dtype: str):
    """Raise a :class:`UserError` naming the first prompt and layer whose real positions are not finite."""
    for i, (n, prompt) in enumerate(zip(lengths, prompts)):
        bad = ~torch.isfinite(stored[i, :, :n]).flatten(1).all(dim=1)
        if bool(bad.any()):
            layer = int(torch.nonzero(bad)[0])
            if bool(torch.isfinite(computed[i, layer, :n]).all()):
                peak = float(computed[i, layer, :n].abs().max())
                raise UserError(f"prompt {prompt} layer {layer}: |hidden| reaches {peak:.0f}, beyond {dtype}'s range "
                                f"(max {FLOAT16_MAX:.0f}); rerun with --dtype bfloat16 or --dtype float32")
            raise UserError(f"prompt {prompt} layer {layer}: the model computed non-finite hidden states; rerun "
                            f"with --compute-dtype float32")


#: Entries of the (token, vocab) logits computed at once for the losses: 64 MiB of float32, whatever the vocabulary
#: (a 262,144-token vocabulary would otherwise take 1 MiB per token of the batch).
LOGIT_ENTRIES = 2**24


def next_token_losses(model, final_hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """−log p(token t+1 | ≤ t) in nats, (prompt, token-1) float32, from the last hidden layer (after the final norm).

    The logits come from the model's own output layer (and its final-logit soft cap, if it has one), a block of
    tokens at a time.
    """
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    h = final_hidden[:, :-1].reshape(-1, final_hidden.shape[-1])
    target = ids[:, 1:].reshape(-1).to(h.device)
    step = max(1, LOGIT_ENTRIES // head.weight.shape[0])
    losses = torch.empty(len(h), dtype=torch.float32, device=h.device)
    for start in range(0, len(h), step):
        logits = head(h[start:start + step]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        losses[start:start + step] = (torch.logsumexp(logits, dim=-1)
                                      - logits.gather(-1, target[start:start + step, None])[:, 0])
    return losses.view(ids.shape[0], -1)


@torch.inference_mode()
def forward_batch(model, batch_ids: list, prompts: list, device: str, dtype: str, recorder=None,
                  flow=None) -> list:
    """Run ``model`` on right-padded prompts and return, per prompt, (hidden, token_loss, contributions).

    batch_ids: list of (token,) int arrays. Returns hidden (layer, token, dim) in the storage dtype for the
    prompt's own positions, token_loss (token,) float32 in nats (NaN at position 0), and, with a
    :class:`~toolkit.extract.contributions.ContributionRecorder` (its hooks in place) and flow settings, its
    arrays for the prompt (else None). Right padding with an attention mask leaves every real position exactly
    as in an unpadded causal forward.
    """
    lengths = [len(ids) for ids in batch_ids]
    width = max(lengths)
    ids = torch.zeros((len(batch_ids), width), dtype=torch.long)
    mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for i, row in enumerate(batch_ids):
        ids[i, : len(row)] = torch.from_numpy(np.asarray(row, dtype=np.int64))
        mask[i, : len(row)] = 1
    ids, mask = ids.to(device), mask.to(device)
    if recorder is not None:
        recorder.start()
    # logits_to_keep=1: the model's own logits of every position would take (batch · token · vocab) floats
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    if recorder is not None:
        recorder.stop()
    # (prompt, layer, token, dim); with a device map the layers live on several GPUs
    computed = torch.stack([h.to(ids.device) for h in out.hidden_states], dim=1)
    stored = to_storage(computed, dtype)
    _check_finite(stored, computed, lengths, prompts, dtype)
    losses = next_token_losses(model, out.hidden_states[-1], ids)
    stored, losses = stored.cpu().numpy(), losses.cpu().numpy()
    results = []
    for i, n in enumerate(lengths):
        token_loss = np.full(n, np.nan, dtype=np.float32)
        token_loss[1:] = losses[i, : n - 1]
        extras = recorder.prompt_arrays(i, n, flow) if recorder is not None else None
        results.append((stored[i, :, :n], token_loss, extras))
    return results
