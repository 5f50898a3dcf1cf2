"""The labels of a store, and the labels of a store made of the prompts of several (``repgeo merge``)."""

from __future__ import annotations

import math

import numpy as np

from ..store.activations import reserved_names
from ..store.zarr_io import label_array


def store_labels(group) -> dict:
    """Label name → (prompt,) array of an activation or results store, in the order of its ``coordinates``
    attribute (the order of the fields in the prompt file)."""
    reserved = reserved_names()
    names = [name for name, _ in group.arrays() if name not in reserved]
    coords = next((array.attrs["coordinates"].split() for _, array in group.arrays() if "coordinates" in array.attrs),
                  [])
    order = {name: i for i, name in enumerate(coords)}
    return {name: group[name][...] for name in sorted(names, key=lambda n: (order.get(n, len(order)), n))}


def _value(v):
    """A stored label value as the prompt file gave it: None where it marks a missing value (NaN, "")."""
    return None if v == "" or (isinstance(v, float) and math.isnan(v)) else v


def combine_labels(tables: list, counts: list) -> dict:
    """The labels of prompts taken in order from several stores: name → (prompt,) array, names in first-seen order.

    tables: per store, name → (its prompts,) array; counts: prompts per store. A label that every store holds with
    one dtype is concatenated as it is. Otherwise its values are typed as extract types a prompt file's fields
    (:func:`~toolkit.store.zarr_io.label_array`), with a prompt of a store without the label (or with a missing
    value) missing: NaN for numbers (integers become float64), "" for strings; booleans with a missing value, and
    numbers mixed with strings, become strings.
    """
    names = []
    for table in tables:
        names.extend(name for name in table if name not in names)
    combined = {}
    for name in names:
        columns = [table.get(name) for table in tables]
        if all(c is not None for c in columns) and len({c.dtype for c in columns}) == 1:
            combined[name] = np.concatenate(columns)
            continue
        values = []
        for column, count in zip(columns, counts):
            values += [None] * count if column is None else [_value(v) for v in column.tolist()]
        combined[name] = label_array(values)
    return combined
