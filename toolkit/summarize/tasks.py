"""Work units that Dask workers run: read slabs from the activation store, hand them to the pure math.

Each task opens the store itself and reads one (prompt, layer) slab at a time, so a worker holds a few slabs
whatever the store's size. Tasks take only small arguments (a path, indices, the parameters): what they need of
the store, such as the members of the groups, they read from it (distributed refuses to carry large arguments).
"""

from __future__ import annotations

import numpy as np

from ..runtime.cluster import task_settings
from ..store.activations import open_activation_group, read_done_slab
from ..store.results import open_results_group
from .cloud import contribution_observables, group_observables, prompt_observables
from .params import PROMPT_OBSERVABLES

#: The observables computed from the hidden states' point clouds.
GEOMETRY = [name for name in PROMPT_OBSERVABLES if name not in ("contributions", "bpc")]


def prompt_task(store: str, prompt: int, params, out: str | None = None) -> tuple:
    """Observables of one prompt: (prompt, name → array without the prompt dim).

    With ``params.distance_dtype`` the prompt's distance matrices (layer, token, token_b) are written here, into
    the results store at ``out`` (their own chunks: no other task writes them), rather than sent to the client.
    """
    with task_settings():
        group = open_activation_group(store)
        hidden = group["hidden"]
        n = int(group["n_tokens"][prompt])
        n_layers, width = hidden.shape[1], hidden.shape[2]
        values = {}
        if params.distance_dtype or any(params.wants(name) for name in GEOMETRY):
            slabs = (read_done_slab(group, store, prompt, layer, params.skip_tokens, n) for layer in range(n_layers))
            values.update(prompt_observables(slabs, params, n_layers, width))
            if "distances" in values:
                open_results_group(out, "r+")["distances"][prompt] = values.pop("distances")
        if params.wants("contributions"):
            values.update(contribution_observables(group["head_cosine"][prompt, :, :, :n],
                                                   group["head_norm"][prompt, :, :, :n], params))
        return prompt, values


def group_values(labels: np.ndarray) -> list:
    """The distinct values of a label, sorted; a missing value (NaN, or "" for strings) forms no group."""
    values = {v for v in labels.tolist() if v == v and v != ""}  # v == v drops NaN
    return sorted(values, key=str)


def group_members(labels: np.ndarray, n_tokens: np.ndarray, done: np.ndarray, params) -> dict:
    """Group value → (prompt, token) pairs pooled for that group, subsampled to ``group_size`` with the seed.

    Positions before ``skip_tokens`` are left out. The same pairs are used at every layer, so a group's curve
    follows the same tokens through the model.
    """
    members = {}
    for i, value in enumerate(group_values(labels[done])):
        prompts = np.flatnonzero((labels == value) & done)
        pairs = np.concatenate([np.stack([np.full(max(n_tokens[p] - params.skip_tokens, 0), p),
                                          np.arange(params.skip_tokens, n_tokens[p])], 1) for p in prompts])
        if len(pairs) > params.group_size:
            rng = np.random.default_rng([params.seed, i])
            pairs = pairs[np.sort(rng.choice(len(pairs), params.group_size, replace=False))]
        members[value] = pairs
    return members


def store_group_members(group, params) -> dict:
    """`group_members` of an open activation store (its labels, lengths and done flags), keys as strings."""
    members = group_members(group[params.groupby][:], group["n_tokens"][:], group["done"][:], params)
    return {str(k): v for k, v in members.items()}


def group_task(store: str, layer: int, params) -> tuple:
    """Group observables at one layer: (layer, name → (group, …) array), groups in `store_group_members` order.

    The members are derived here from the store, not sent: pooled index arrays of dozens of groups of long
    prompts exceed what distributed carries as a task argument.
    """
    with task_settings():
        source = open_activation_group(store)
        hidden = source["hidden"]
        pools = {}
        for value, pairs in store_group_members(source, params).items():
            rows = []
            for p in np.unique(pairs[:, 0]):
                tokens = pairs[pairs[:, 0] == p, 1]
                rows.append(read_done_slab(source, store, int(p), layer, 0, int(tokens.max()) + 1)[tokens])
            pools[value] = np.concatenate(rows) if rows else np.empty((0, hidden.shape[3]), hidden.dtype)
        return layer, group_observables(pools, params)
