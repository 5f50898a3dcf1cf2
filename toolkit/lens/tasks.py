"""The lens work unit a Dask worker runs: one prompt, its chosen layers, in blocks of tokens."""

from __future__ import annotations

import functools

import numpy as np

from ..observables import lens as lens_math
from ..runtime.cluster import task_settings
from ..runtime.ranks import select_device
from ..store.activations import open_activation_group, read_done_slab
from .weights import load_lens_weights

#: Entries of one (token, vocab) float32 matrix of a block of tokens (its logits, probabilities, cosines): just
#: under 32 MiB. Memory per worker stays bounded whatever the vocabulary and the prompt length; larger blocks
#: hold more and were not faster (bench/lens.py --block-entries).
BLOCK_ENTRIES = 2**23 - 2**16

#: Entries of the (row, vocab) matrix of one product h @ Wᵀ (512 MiB): the rows of a block of tokens at several
#: layers, so that the product is large enough for the BLAS to run at full speed, each product reading all of W
#: once. On the 2-core dev machine, against one layer per product: a Gemma 3 270M task (262,144 x 640; up to 16
#: layers of 31 tokens a product, not 1) takes 1.6x less CPU, a SmolLM2 one (49,152 x 576) 1.1x less; against
#: 2^26 entries, Gemma 3 reads 5 % faster with two workers (single-thread products of 200 rows slow each other
#: down through the shared cache, of 300 rows less: bench/README.md).
PRODUCT_ENTRIES = 2**27


def block_tokens(vocab: int) -> int:
    """Tokens per block for a vocabulary of ``vocab`` entries (31 for 262,144; 169 for 49,152)."""
    return max(1, BLOCK_ENTRIES // vocab)


def product_groups(rows: list, size: int) -> list:
    """``rows`` (layer numbers) in order, split into the fewest groups of at most ``size``, of near-equal sizes."""
    count = -(-len(rows) // size)
    return [rows[j * len(rows) // count:(j + 1) * len(rows) // count] for j in range(count)]


def product_plan(layers: list, final: int, n_tokens: int, vocab: int, output: bool) -> tuple:
    """How a task of ``n_tokens`` tokens reads ``layers`` (store layer numbers; ``final``, the last, holds the model's
    own distribution): (tokens per block, layers per product, decoder → its groups of layers, one product each).
    The output decoder's first group starts with the final layer: every layer's KL is against it."""
    step = max(1, min(n_tokens, block_tokens(vocab)))
    output_rows = [final] + [layer for layer in layers if layer != final] if output else []
    per_product = max(1, min(max(len(output_rows), len(layers)), PRODUCT_ENTRIES // (step * vocab)))
    return step, per_product, {"output": product_groups(output_rows, per_product),
                               "input": product_groups(list(layers), per_product)}


def lens_task(store: str, prompt: int, weights: str, token: str, params, device: str = "auto") -> tuple:
    """Readings of one prompt: (prompt, name → array without the prompt dim, over its n_tokens positions).

    params: ``decoders``, ``top_k``, ``ks``, ``layers`` (store layer numbers) as in `LensParams`; device:
    auto, cpu or cuda (`worker_device`).

    Per block of tokens and decoder, the layers a group at a time, each group's rows in one product; for the output
    decoder the final layer comes first (every layer's KL is against its distribution, kept for the block).
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
        position = {layer: i for i, layer in enumerate(params.layers)}
        output = "output" in params.decoders
        vocab = parts.unembedding.shape[0]
        step, per_product, groups = product_plan(list(params.layers), final, n, vocab, output)
        # Allocated once per task, not per block or layer: on a Dask worker's thread glibc would map each fresh
        # matrix anew and fault its pages in (a third more CPU). A group's products share one matrix; the final
        # layer's logits and probabilities are kept for the block, a layer's probabilities take another.
        matrix = functools.partial(torch.empty, dtype=torch.float32, device=device)
        products = matrix((per_product * step, vocab))
        final_logits, final_probs, probs = (matrix((step, vocab)) for _ in range(3)) if output else (None,) * 3
        for start in range(0, n, step):
            at = slice(start, min(n, start + step))
            rows = at.stop - at.start
            X = {layer: torch.from_numpy(slab[at]).to(device) for layer, slab in slabs.items()}
            for d, decoder in enumerate(params.decoders):
                for members in groups[decoder]:
                    block = products[:len(members) * rows]
                    if decoder == "input":
                        top_ids, top_scores = lens_math.top_k(lens_math.input_cosines(
                            torch.cat([X[layer] for layer in members]), parts.unit_embedding, out=block),
                            params.top_k)
                        for j, layer in enumerate(members):
                            out["lens_top_ids"][d, position[layer], at] = top_ids[j * rows:(j + 1) * rows]
                            out["lens_top_scores"][d, position[layer], at] = top_scores[j * rows:(j + 1) * rows]
                        continue
                    # The final layer's hidden states are already after the final norm: never apply it twice.
                    lens_math.output_logits(torch.cat([X[layer] if layer == final else parts.norm(X[layer])
                                                       for layer in members]),
                                            parts.unembedding, parts.softcap, out=block)
                    for j, layer in enumerate(members):
                        logits = block[j * rows:(j + 1) * rows]
                        if layer == final:  # first of all: kept for the block, out of the products' matrix
                            final_read = lens_math.read_output(final_logits[:rows].copy_(logits), params.top_k,
                                                               next_ids[at], out=final_probs[:rows])
                            readings, distribution = final_read
                        else:
                            readings, distribution = lens_math.read_output(logits, params.top_k, next_ids[at],
                                                                           out=probs[:rows])
                        if layer not in position:
                            continue
                        i = position[layer]
                        out["lens_top_ids"][d, i, at] = readings["top_ids"]
                        out["lens_top_scores"][d, i, at] = readings["top_probs"]
                        out["lens_entropy"][i, at] = readings["entropy"]
                        out["lens_kl_final"][i, at] = lens_math.kl_divergence(final_read[1], distribution)
                        out["lens_next_logprob"][i, at] = readings["next_logprob"]
                        out["lens_next_rank"][i, at] = readings["next_rank"]
            final_read = readings = distribution = None
        del products, final_logits, final_probs, probs
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
