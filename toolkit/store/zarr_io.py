"""Small helpers shared by the store layouts: opening groups, string arrays, label coordinates."""

from __future__ import annotations

import os
import warnings

import numpy as np
import zarr

from ..errors import UserError


def quiet_zarr():
    """Silence zarr's notice that variable-length strings are not yet in the v3 spec (xarray reads them fine)."""
    warnings.filterwarnings("ignore", message=".*not part of the Zarr format 3.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="zarr")
    warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
    try:
        from zarr.errors import UnstableSpecificationWarning

        warnings.filterwarnings("ignore", category=UnstableSpecificationWarning)
    except ImportError:  # older zarr: nothing to silence
        pass


def consolidate(path: str):
    """Write consolidated metadata, so that plain ``xr.open_zarr(path)`` opens the store quickly and quietly.

    Call it after every change of metadata (creation, attributes); it only summarises what is on disk.
    """
    quiet_zarr()
    zarr.consolidate_metadata(path, zarr_format=3)


def eager_labels(ds):
    """The Dataset with its non-index coordinates (prompt labels: small) in memory, so groupby works on them."""
    return ds.assign_coords({name: ds[name].compute() for name in ds.coords if name not in ds.indexes})


def open_repgeo_group(path: str, kind: str, mode: str = "r") -> zarr.Group:
    """Open a repgeo store of ``kind`` ("activations" or "results"), or raise :class:`UserError` saying what it is."""
    quiet_zarr()
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; give the path of a repgeo {kind} store")
    if not os.path.isfile(os.path.join(path, "zarr.json")):
        raise UserError(f"{path} is not a Zarr v3 store (no zarr.json); give the path of a repgeo {kind} store")
    try:
        group = zarr.open_group(path, mode=mode, zarr_format=3)
    except Exception as e:  # zarr raises several types for broken metadata
        raise UserError(f"{path} is not a readable Zarr v3 group ({type(e).__name__}: {e}); is it a repgeo store?") from None
    found = group.attrs.get("repgeo", {}).get("kind")
    if found != kind:
        what = f"a repgeo {found} store" if found else "not a repgeo store"
        raise UserError(f"{path} is {what}, but an {kind} store is needed here" if kind[0] in "aeiou"
                        else f"{path} is {what}, but a {kind} store is needed here")
    return group


def label_array(values: list) -> np.ndarray:
    """One label's values over prompts as a typed 1-D array: bool, int64, float64 (missing → NaN) or str.

    ``None`` marks a prompt without that label. Mixed strings and numbers become strings.
    """
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present) and len(present) == len(values):
        return np.array(values, dtype=bool)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
    if present and numeric:
        if all(isinstance(v, int) for v in present) and len(present) == len(values):
            return np.array(values, dtype=np.int64)
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return np.array(["" if v is None else str(v) for v in values], dtype=object)


def write_1d(group: zarr.Group, name: str, values: np.ndarray, dim: str, attrs: dict | None = None):
    """Write a small 1-D array along ``dim`` in one chunk (strings as variable-length UTF-8)."""
    dtype = str if values.dtype == object else values.dtype
    arr = group.create_array(name, shape=values.shape, chunks=values.shape or (1,), dtype=dtype,
                             dimension_names=[dim], attributes=attrs or {})
    arr[...] = values
    return arr
