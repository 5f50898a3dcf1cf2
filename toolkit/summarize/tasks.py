"""Work units that Dask workers run: read slabs from the activation store, hand them to the pure math.

Each task opens the store itself and reads one (prompt, layer) slab at a time, so a worker holds a few slabs
whatever the store's size.
"""

from __future__ import annotations

import numpy as np

from ..store.activations import open_activation_group
from .cloud import group_observables, prompt_observables
from .cluster import task_settings


def prompt_task(store: str, prompt: int, params) -> tuple:
    """Observables of one prompt: (prompt, name → array without the prompt dim)."""
    with task_settings():
        group = open_activation_group(store)
        hidden = group["hidden"]
        n = int(group["n_tokens"][prompt])
        n_layers, width = hidden.shape[1], hidden.shape[2]
        slabs = (hidden[prompt, layer, :n] for layer in range(n_layers))
        return prompt, prompt_observables(slabs, params, n_layers, width)


def group_values(labels: np.ndarray) -> list:
    """The distinct values of a label, sorted; a missing value (NaN, or "" for strings) forms no group."""
    values = {v for v in labels.tolist() if v == v and v != ""}  # v == v drops NaN
    return sorted(values, key=str)


def group_members(labels: np.ndarray, n_tokens: np.ndarray, done: np.ndarray, params) -> dict:
    """Group value → (prompt, token) pairs pooled for that group, subsampled to ``group_size`` with the seed.

    The same pairs are used at every layer, so a group's curve follows the same tokens through the model.
    """
    members = {}
    for i, value in enumerate(group_values(labels[done])):
        prompts = np.flatnonzero((labels == value) & done)
        pairs = np.concatenate([np.stack([np.full(n_tokens[p], p), np.arange(n_tokens[p])], 1) for p in prompts])
        if len(pairs) > params.group_size:
            rng = np.random.default_rng([params.seed, i])
            pairs = pairs[np.sort(rng.choice(len(pairs), params.group_size, replace=False))]
        members[value] = pairs
    return members


def group_task(store: str, layer: int, members: dict, params) -> tuple:
    """Group observables at one layer: (layer, name → (group, …) array)."""
    with task_settings():
        hidden = open_activation_group(store)["hidden"]
        pools = {}
        for value, pairs in members.items():
            rows = []
            for p in np.unique(pairs[:, 0]):
                tokens = pairs[pairs[:, 0] == p, 1]
                rows.append(hidden[int(p), layer, : int(tokens.max()) + 1][tokens])
            pools[value] = np.concatenate(rows)
        return layer, group_observables(pools, params)
