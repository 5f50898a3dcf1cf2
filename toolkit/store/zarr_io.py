"""Small helpers shared by the store layouts: opening groups, string arrays, label coordinates, digests."""

from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from ..errors import UserError

#: The per-chunk checksum of every array repgeo writes, so that corruption is caught on read.
CHECKSUM = Crc32cCodec()


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


def describe_error(e: Exception, limit: int = 200) -> str:
    """An exception as one short line (zarr's and pydantic's messages span lines), for one-line errors."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"


class UnreadableGroup(UserError):
    """A Zarr store whose root zarr.json cannot be read: ``repgeo validate`` reports it as damaged, jobs refuse it."""


def is_url(path) -> bool:
    """Whether ``path`` names a remote store (http://, https://, s3://, … read through fsspec) rather than a file."""
    return "://" in str(path)


def _open_url(url: str, wanted: str, mode: str) -> zarr.Group:
    """A remote store, read-only, through zarr's fsspec store (byte ranges: nothing is downloaded whole)."""
    if mode != "r":
        raise UserError(f"{url} is a URL: stores are read through URLs, never written; copy it to a local path to "
                        f"change it")
    try:
        return zarr.open_group(url, mode="r", zarr_format=3)
    except ImportError as e:  # the fsspec backend of this protocol is not installed
        raise UserError(f"cannot read {url}: {describe_error(e)}; install the fsspec backend of its protocol (e.g. "
                        f"pip install s3fs for s3://)") from None
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        raise UserError(f"{url} holds no Zarr v3 group (no zarr.json there); give the URL of a {wanted}") from None
    except Exception as e:  # a server that answers badly, or broken metadata
        raise UnreadableGroup(f"{url} is not a readable Zarr v3 group ({describe_error(e)}); check the URL and that "
                              f"the server answers range requests") from None


def open_zarr_group(path: str, wanted: str, mode: str = "r") -> zarr.Group:
    """Open the Zarr v3 group at ``path`` (a directory or a URL), or raise :class:`UserError` naming ``wanted``
    (e.g. "repgeo store")."""
    quiet_zarr()
    if is_url(path):
        return _open_url(path, wanted, mode)
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; give the path of a {wanted}")
    if not os.path.isfile(os.path.join(path, "zarr.json")):
        raise UserError(f"{path} is not a Zarr v3 store (no zarr.json); give the path of a {wanted}")
    try:
        return zarr.open_group(path, mode=mode, zarr_format=3)
    except Exception as e:  # zarr raises several types for broken metadata
        raise UnreadableGroup(f"{path} is not a readable Zarr v3 group ({describe_error(e)}); restore its zarr.json "
                              f"from a copy, or give the path of an intact {wanted}") from None


def repgeo_kind(group: zarr.Group):
    """The store kind in the root attribute ``repgeo.kind`` ("activations", "results", …), or None."""
    repgeo = group.attrs.get("repgeo")
    return repgeo.get("kind") if isinstance(repgeo, dict) else None


def open_repgeo_group(path: str, kind: str, mode: str = "r") -> zarr.Group:
    """Open a repgeo store of ``kind`` ("activations" or "results"), or raise :class:`UserError` saying what it is."""
    group = open_zarr_group(path, f"repgeo {kind} store", mode)
    found = repgeo_kind(group)
    if found != kind:
        what = f"a repgeo {found} store" if found else "not a repgeo store"
        raise UserError(f"{path} is {what}, but an {kind} store is needed here" if kind[0] in "aeiou"
                        else f"{path} is {what}, but a {kind} store is needed here")
    return group


def stored_keys(array: zarr.Array) -> set:
    """Keys of the chunks (shards) of ``array`` present in its store, found by listing: nothing is read.

    zarr writes no chunk that is entirely the fill value, so a key that is absent is a chunk of fill values.
    """
    from zarr.core.sync import collect_aiterator

    return set(collect_aiterator(array.store.list_prefix(array.path + "/")))


def chunk_key(array: zarr.Array, coords: tuple) -> str:
    """The store key of the chunk (shard) at grid position ``coords`` of ``array``."""
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"


def array_digest(values: np.ndarray) -> str:
    """sha256 of an array's values in a canonical byte form: the same values give the same digest anywhere.

    Numbers and booleans: dtype and shape, then the little-endian bytes; strings: shape, then each string's UTF-8
    bytes preceded by their length.
    """
    digest = hashlib.sha256()
    if values.dtype.kind in "OU":
        digest.update(f"str{values.shape}".encode())
        for text in values.ravel().tolist():
            data = str(text).encode("utf-8")
            digest.update(len(data).to_bytes(8, "little") + data)
    else:
        little = values.dtype.newbyteorder("<")
        digest.update(f"{little.str}{values.shape}".encode())
        digest.update(np.ascontiguousarray(values, dtype=little).tobytes())
    return digest.hexdigest()


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
    """Write a small 1-D array along ``dim`` in one chunk (strings as variable-length UTF-8), checksummed."""
    dtype = str if values.dtype == object else values.dtype
    # zarr's default compression (zstd level 0) plus the checksum; xarray reads it, strings included.
    arr = group.create_array(name, shape=values.shape, chunks=values.shape or (1,), dtype=dtype,
                             compressors=[ZstdCodec(level=0), CHECKSUM], dimension_names=[dim],
                             attributes=attrs or {})
    arr[...] = values
    return arr


def source_prompt_problems(arrays: dict, attrs: dict) -> list:
    """A store derived from an activation store has as many prompts as its recorded source (``arrays``,
    ``attrs``: a store description's, as `toolkit.store.validate.describe_store` gives)."""
    if attrs["source"]["n_prompts"] != arrays["prompt"]["shape"][0]:
        return [f"the store has {arrays['prompt']['shape'][0]} prompts, its source {attrs['source']['n_prompts']}"]
    return []
