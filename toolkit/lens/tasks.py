"""The lens work unit a Dask worker runs: one prompt, its chosen layers, in blocks of tokens."""

from __future__ import annotations

import numpy as np

from ..observables import lens as lens_math
from ..runtime.cluster import task_settings
from ..runtime.ranks import select_device
from ..store.activations import open_activation_group, read_done_slab
from .weights import load_lens_weights

#: Entries of one (token, vocab) float32 matrix: just under 32 MiB, glibc's largest mmap threshold, which the
#: workers' allocator settings use (runtime.cluster.task_settings): the ~10 temporaries of this size a reading
#: makes (logits, log-probabilities, their exponentials, products) are then reused from the heap instead of
#: mapped and page-faulted afresh each time (2.4x less CPU at a 262,144-token vocabulary, bench/README.md).
#: Memory per worker stays bounded whatever the vocabulary.
BLOCK_ENTRIES = 2**23 - 2**16


def block_tokens(vocab: int) -> int:
    """Tokens per block for a vocabulary of ``vocab`` entries (31 for 262,144; 169 for 49,152)."""
    return max(1, BLOCK_ENTRIES // vocab)


def lens_task(store: str, prompt: int, weights: str, token: str, params, device: str = "auto") -> tuple:
    """Readings of one prompt: (prompt, name → array without the prompt dim, over its n_tokens positions).

    params: ``decoders``, ``top_k``, ``ks``, ``layers`` (store layer numbers) as in `LensParams`; device:
    auto, cpu or cuda (`worker_device`).
    """
    import torch

    with task_settings(), torch.inference_mode():
        torch.set_num_threads(1)
        group = open_activation_group(store)
        final = group.attrs["model"]["n_layers"]  # layer numbers; a subset store holds some, at other positions
        held = group["layer"][:].tolist()
        n = int(group["n_tokens"][prompt])
        ids = group["input_ids"][prompt, :n].astype(np.int64)
        next_ids = np.append(ids[1:], -1)
        device = select_device(0, device)  # cuda:0, the first visible GPU: one per worker
        parts = load_lens_weights(weights, token, device)
        slabs = {layer: read_done_slab(group, store, prompt, held.index(layer), 0, n)
                 for layer in {*params.layers, final}}
        out = _empty(params, n)
        step = block_tokens(parts.unembedding.shape[0])
        output = "output" in params.decoders
        for start in range(0, n, step):
            at = slice(start, min(n, start + step))
            if output:
                final_logp = lens_math.output_log_probs(torch.from_numpy(slabs[final][at]).to(device),
                                                        parts.unembedding, parts.softcap)
                final_p = lens_math.reference_distribution(final_logp)
            for i, layer in enumerate(params.layers):
                X = torch.from_numpy(slabs[layer][at]).to(device)
                for d, decoder in enumerate(params.decoders):
                    if decoder == "input":
                        scores = lens_math.input_cosines(X, parts.unit_embedding)
                    elif layer == final:  # already after the final norm: never apply it twice
                        scores = final_logp
                    else:
                        scores = lens_math.output_log_probs(parts.norm(X), parts.unembedding, parts.softcap)
                    top_ids, top_scores = lens_math.top_k(scores, params.top_k)
                    out["lens_top_ids"][d, i, at] = top_ids
                    out["lens_top_scores"][d, i, at] = np.exp(top_scores) if decoder == "output" else top_scores
                    if decoder == "output":
                        out["lens_entropy"][i, at] = lens_math.entropy_bits(scores)
                        out["lens_kl_final"][i, at] = lens_math.kl_divergence(final_p, scores)
                        out["lens_next_logprob"][i, at], out["lens_next_rank"][i, at] = (
                            lens_math.next_token_scores(scores, next_ids[at]))
        if output:
            out["lens_next_accuracy"] = np.stack([lens_math.top_k_accuracy(ranks, params.ks)
                                                  for ranks in out["lens_next_rank"]])
        return prompt, out


def _empty(params, n: int) -> dict:
    D, L, K = len(params.decoders), len(params.layers), params.top_k
    out = {"lens_top_ids": np.full((D, L, n, K), -1, np.int32), "lens_top_scores": np.full((D, L, n, K), np.nan,
                                                                                            np.float32)}
    if "output" in params.decoders:
        out.update(lens_entropy=np.full((L, n), np.nan, np.float32), lens_kl_final=np.full((L, n), np.nan, np.float32),
                   lens_next_logprob=np.full((L, n), np.nan, np.float32),
                   lens_next_rank=np.full((L, n), -1, np.int32))
    return out
