"""What ``repgeo subset`` keeps of a store: its prompts (``--prompts``, ``--where``, done ones only) and layers
(``--layers``)."""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..runtime.layers import NUMBER, parse_indices, parse_layers
from .where import select_where


def parse_prompts(text: str, n_prompts: int) -> np.ndarray:
    """(selected,) int64 prompt indices that ``text`` names among 0 … n_prompts-1, sorted, without duplicates.

    ``text``: comma-separated indices and ``A:B`` ranges (A included, B excluded, either end optional as in a
    Python slice), e.g. ``0:100,250``. Raises :class:`UserError` naming an item that is not an index or range or
    lies outside the store.
    """
    return np.array(parse_indices(text, n_prompts, "--prompts", "prompt", "the store", "--prompts 0:10,25", "index"),
                    dtype=np.int64)


def as_ranges(indices) -> str:
    """Sorted indices in the ``--prompts`` grammar, runs as ``A:B``: [0, 1, 2, 5, 7, 8] → "0:3,5,7:9"."""
    items, indices = [], [int(i) for i in indices]
    start = 0
    for i in range(1, len(indices) + 1):
        if i == len(indices) or indices[i] != indices[i - 1] + 1:
            first, last = indices[start], indices[i - 1]
            items.append(str(first) if first == last else f"{first}:{last + 1}")
            start = i
    return ",".join(items)


def select_prompts(store: str, labels: dict, done: np.ndarray, where: str | None, prompts: str | None) -> tuple:
    """(kept, n_not_done): the source indices (kept,) int64 of the prompts that ``--prompts`` and ``--where`` both
    select (all without them), in store order, less those not done, which are left out and counted.

    Refuses a selection that keeps no prompt.
    """
    selected = np.ones(len(done), dtype=bool)
    if prompts is not None:
        chosen = np.zeros(len(done), dtype=bool)
        chosen[parse_prompts(prompts, len(done))] = True
        selected &= chosen
    if where is not None:
        selected &= select_where(where, labels)
    if not selected.any():
        raise UserError(f"the selection keeps no prompt of {store}; check --where and --prompts against its labels "
                        f"(repgeo info {store})")
    kept = selected & done
    if not kept.any():
        raise UserError(f"the {int(selected.sum())} prompts selected from {store} are not done yet; complete it first "
                        f"(repgeo extract --resume or summarize --resume), or select done prompts")
    return np.flatnonzero(kept), int((selected & ~done).sum())


def select_layers(text: str | None, held: np.ndarray, n_layers: int) -> np.ndarray:
    """(kept,) int64 positions along ``layer`` of the layers that ``--layers`` keeps (all without it).

    held: the store's ``layer`` coordinate (the model's layer numbers it holds); n_layers: the model's layers
    (blocks + embeddings). ``text`` names layer numbers as every command does (:func:`parse_layers`): a range keeps
    the held layers within it, a number the store does not hold is refused.
    """
    if text is None:
        return np.arange(len(held), dtype=np.int64)
    wanted = parse_layers(text, n_layers)
    missing = sorted({int(item) for item in (piece.strip() for piece in text.split(","))
                      if NUMBER.fullmatch(item)} - set(held.tolist()))
    if missing:
        raise UserError(f"--layers names layer {missing[0]}, which the store does not hold; it holds layers "
                        f"{as_ranges(held)}")
    positions = np.flatnonzero(np.isin(held, wanted))
    if not len(positions):
        raise UserError(f"--layers {text!r} keeps none of the store's layers ({as_ranges(held)})")
    return positions


#: Dims of the contribution data (activations: head and block arrays, flow; results: their observables); such
#: arrays are kept only with every layer (block b reads layer b, the flow runs through every layer).
CONTRIBUTION_DIMS = {"block", "head", "target", "stat", "span"}


def dropped_arrays(group, prompts_dropped: bool, layers_dropped: bool) -> list:
    """Names of the arrays of ``group`` that a subset cannot keep: those along ``group`` (pools of all the
    source's prompts) when a prompt is dropped, the contribution data when a layer is dropped."""
    dropped = []
    for name, array in group.arrays():
        dims = set(array.metadata.dimension_names or ())
        if (prompts_dropped and "group" in dims) or (layers_dropped and dims & CONTRIBUTION_DIMS):
            dropped.append(name)
    return dropped
