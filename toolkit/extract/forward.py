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


@torch.inference_mode()
def forward_batch(model, batch_ids: list, prompts: list, device: str, dtype: str) -> list:
    """Run ``model`` on right-padded prompts and return, per prompt, (hidden, token_loss) as numpy arrays.

    batch_ids: list of (token,) int arrays. Returns hidden (layer, token, dim) in the storage dtype for the
    prompt's own positions and token_loss (token,) float32 in nats (NaN at position 0). Right padding with an
    attention mask leaves every real position exactly as in an unpadded causal forward.
    """
    lengths = [len(ids) for ids in batch_ids]
    width = max(lengths)
    ids = torch.zeros((len(batch_ids), width), dtype=torch.long)
    mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for i, row in enumerate(batch_ids):
        ids[i, : len(row)] = torch.from_numpy(np.asarray(row, dtype=np.int64))
        mask[i, : len(row)] = 1
    ids, mask = ids.to(device), mask.to(device)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    # (prompt, layer, token, dim); with a device map the layers live on several GPUs
    computed = torch.stack([h.to(ids.device) for h in out.hidden_states], dim=1)
    stored = to_storage(computed, dtype)
    _check_finite(stored, computed, lengths, prompts, dtype)
    logits = out.logits[:, :-1].to(ids.device).float()
    # (prompt, token-1): −log p(token t+1 | ≤ t) = logsumexp(logits) − logit of the true token
    losses = torch.logsumexp(logits, dim=-1) - logits.gather(-1, ids[:, 1:, None])[..., 0]
    stored, losses = stored.cpu().numpy(), losses.cpu().numpy()
    results = []
    for i, n in enumerate(lengths):
        token_loss = np.full(n, np.nan, dtype=np.float32)
        token_loss[1:] = losses[i, : n - 1]
        results.append((stored[i, :, :n], token_loss))
    return results
