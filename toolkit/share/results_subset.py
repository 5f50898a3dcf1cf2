"""A results store of ``repgeo summarize`` restricted to some of its prompts and layers.

Every array the subset keeps is copied with its own metadata (data type, fill value, codecs, attributes) and
sliced: along ``prompt`` to the kept prompts (the ``prompt`` coordinate renumbered 0 … n-1), along ``layer`` to the
kept layers, along ``token`` and ``token_b`` to the longest kept prompt. A chunk that spanned a whole dim spans
the new one; other chunks keep their size (at most the new dim's), which is what summarize chooses for that
number of prompts. Arrays are copied a chunk of prompts at a time.
"""

from __future__ import annotations

import numpy as np
import zarr

from ..runtime.partial import Partial
from ..store.zarr_io import consolidate, quiet_zarr

TOKEN_DIMS = ("token", "token_b")


def _chunk(chunk: int, size: int, new: int) -> int:
    return new if chunk == size else min(chunk, new)


def write_results(out: str, group: zarr.Group, prompts: np.ndarray, positions: np.ndarray, *, attrs: dict,
                  dropped: list) -> None:
    """Create the results store ``out`` from ``group`` (a results store) through this job's partial directory.

    prompts: (kept,) source indices along ``prompt``, increasing; positions: (kept,) positions along ``layer``;
    attrs: the root attributes; dropped: names of the arrays left out.
    """
    quiet_zarr()
    width = int(group["n_tokens"][...][prompts].max())
    index = {"prompt": prompts, "layer": positions, **{dim: slice(0, width) for dim in TOKEN_DIMS}}
    with Partial(out, "repgeo subset") as partial:
        new = zarr.create_group(partial.path, zarr_format=3)
        new.attrs.update(attrs)
        for name, array in group.arrays():
            if name in dropped:
                continue
            dims = tuple(array.metadata.dimension_names)
            selection = tuple(index.get(dim, slice(None)) for dim in dims)
            shape = tuple(len(range(size)[s]) if isinstance(s, slice) else len(s)
                          for s, size in zip(selection, array.shape))
            copy = new.create_array(name, shape=shape, chunks=tuple(map(_chunk, array.chunks, array.shape, shape)),
                                    dtype=array.metadata.data_type, fill_value=array.fill_value,
                                    filters=array.filters, serializer=array.serializer,
                                    compressors=array.compressors, dimension_names=dims,
                                    attributes=dict(array.attrs))
            if dims[0] != "prompt":
                copy[...] = array.get_orthogonal_selection(selection)
                continue
            step = copy.chunks[0]
            for start in range(0, shape[0], step):
                rows = prompts[start:start + step]
                values = np.arange(start, start + len(rows), dtype=np.int64) if name == "prompt" else \
                    array.get_orthogonal_selection((rows, *selection[1:]))
                copy[start:start + len(rows)] = values
        consolidate(partial.path)
        partial.finish()
