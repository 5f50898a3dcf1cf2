"""``repgeo merge A B [C …] --out NEW``: one activation store of the prompts of several, made with the same model.

- Sources: activation stores whose every prompt is done (a store still being extracted is refused: finish it, or
  take its done prompts with ``repgeo subset``). The same store may not be given twice.
- They must agree on the model weights (``model.weights_sha256``), the tokenizer (``tokenizer_fingerprint``), the
  storage ``dtype``, every extraction setting (``settings``, among them ``withhold_texts``: all texts or all
  sha256), the ``layer`` coordinate (subsets with the same ``--layers``) and ``model.d_model``; the first
  difference is named and nothing is written.
- Prompts follow in argument order, each source's in its own order; the store is written as extract writes one of
  those prompts: the token dim is the longest prompt's and shorter prompts are padded as extract pads them (NaN,
  input ids -1), as are contribution targets. Prompts are not de-duplicated: a prompt in two sources is in the
  merged store twice.
- Labels are the union of the sources' labels (:func:`~toolkit.share.labels.combine_labels`): a label every source
  holds with one type is kept as it is; a prompt of a source without the label gets the missing value, NaN for
  numbers (integer labels become float64) and "" for strings (boolean labels become strings).
- Root attributes: those of the first source for the model, tokenizer, dtype and settings; ``runs``: every source's
  runs, each run once (subsets of one store share theirs), ``ranks`` that of the latest run; ``prompts``: the
  prompt file's record when every source comes from the same file, else the files' paths joined by "; ", a sha256
  of their sha256s in order and the sums of their counts; ``merge.sources``: per source its identity
  (:func:`~toolkit.store.activations.source_identity`), its prompt-file record, its own ``subset`` or ``merge``
  record, and the merged prompts it holds (``merged_prompts``).

Merging complementary subsets of a store gives the store back: every array, label, text and ``done`` equal, and
the attributes too but ``created``, ``toolkit_version`` and ``merge``.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import sys

import numpy as np

from .. import __version__
from ..errors import UserError
from ..store.activations import source_identity
from ..store.validate import open_store, require_consistent
from ..store.zarr_io import is_url
from .assemble import Part, write_activations
from .selection import as_ranges

#: What the sources must share, in the order differences are reported: name → its value in (attributes, group).
SHARED = {
    "model.weights_sha256": lambda a, g: a["model"].get("weights_sha256") or a["model"]["id"],
    "tokenizer_fingerprint": lambda a, g: a["tokenizer_fingerprint"],
    "dtype": lambda a, g: a["dtype"],
    "settings": lambda a, g: a["settings"],
    "layer": lambda a, g: g["layer"][...].tolist(),
    "model.d_model": lambda a, g: a["model"]["d_model"],
}


def run_merge(args) -> int:
    if len(args.stores) < 2:
        raise UserError("merge needs at least two stores; to copy or reduce one store, use repgeo subset")
    places = [path if is_url(path) else os.path.abspath(path) for path in args.stores]
    twice = next((path for i, path in enumerate(args.stores) if places[i] in places[:i]), None)
    if twice is not None:
        raise UserError(f"{twice} is given twice; give each store once")
    groups = [_source(path) for path in args.stores]
    if os.path.exists(args.out):
        raise UserError(f"{args.out} already exists; choose a new --out")
    first = dict(groups[0].attrs)
    for path, group in zip(args.stores[1:], groups[1:]):
        _check_same(args.stores[0], first, groups[0], path, dict(group.attrs), group)
    parts = [Part(path, group, np.arange(group["done"].shape[0], dtype=np.int64))
             for path, group in zip(args.stores, groups)]
    write_activations(args.out, "repgeo merge", parts, positions=np.arange(groups[0]["layer"].shape[0]),
                      dtype=first["dtype"], withhold_texts=False, attrs=_attributes(parts), contributions="block"
                      in groups[0])
    n = sum(len(part.prompts) for part in parts)
    print(f"merge: {args.out}: {n} prompts from {len(parts)} stores", file=sys.stderr)
    return 0


def _source(path: str):
    """The activation store at ``path`` once consistent and complete; else :class:`UserError`."""
    _, kind = open_store(path)
    if kind != "activations":
        raise UserError(f"{path} is a repgeo {kind} store; merge takes activation stores (merge those, then compute "
                        f"on the merged store)")
    group = require_consistent(path, "activations")
    not_done = int((~group["done"][...]).sum())
    if not_done:
        raise UserError(f"{path} has {not_done} prompts not done; complete it with repgeo extract --resume, or take "
                        f"its done prompts with repgeo subset {path} --out DONE.zarr and merge that")
    return group


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _check_same(path_a: str, a: dict, group_a, path_b: str, b: dict, group_b):
    """Refuse two sources that differ in what :data:`SHARED` names, naming the first difference."""
    for name, value in SHARED.items():
        va, vb = value(a, group_a), value(b, group_b)
        if va == vb:
            continue
        if name == "settings":
            key = next(k for k in [*va, *vb] if va.get(k) != vb.get(k))
            name, va, vb = f"settings.{key}", va.get(key), vb.get(key)
        raise UserError(f"{path_a} and {path_b} differ in {name} ({_short(va)} vs {_short(vb)}); merge takes stores "
                        f"extracted with the same model weights, tokenizer, dtype, settings and layers")


def _attributes(parts: list) -> dict:
    """The merged store's root attributes (see the module's description)."""
    everyone = [dict(part.group.attrs) for part in parts]
    attrs = {key: value for key, value in everyone[0].items() if key not in ("digests", "repgeo", "subset", "merge")}
    n_stored = sum(len(part.prompts) for part in parts)
    files = {}
    for a in everyone:
        files.setdefault(a["prompts"]["sha256"], a["prompts"])
    if len(files) == 1:
        prompts = dict(everyone[0]["prompts"], n_stored=n_stored)
    else:
        prompts = {"path": "; ".join(f["path"] for f in files.values()),
                   "sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
                   **{key: sum(f[key] for f in files.values()) for key in ("n_input", "n_dropped_short",
                                                                             "n_truncated")},
                   "n_stored": n_stored}
    runs = []
    for a in everyone:
        runs.extend(run for run in a["runs"] if run not in runs)
    sources, offset = [], 0
    for part, a in zip(parts, everyone):
        record = dict(source_identity(part.path, part.group), prompts=a["prompts"],
                      merged_prompts=as_ranges(range(offset, offset + len(part.prompts))),
                      **{key: a[key] for key in ("subset", "merge") if key in a})
        sources.append(record)
        offset += len(part.prompts)
    attrs.update(toolkit_version=__version__, prompts=prompts, runs=runs,
                 ranks=max(runs, key=lambda run: run["started"])["ranks"] if runs else attrs["ranks"],
                 created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 merge={"sources": sources})
    return attrs
