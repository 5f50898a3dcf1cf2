"""``repgeo subset STORE --out NEW``: a new, valid, smaller store of some of a store's prompts and layers, and
(activation stores) a narrower storage dtype.

- Kinds: activation stores and results stores of ``repgeo summarize``; other kinds are refused.
- Prompts: those that ``--prompts`` (indices and ``A:B`` ranges) and ``--where`` (a label expression, see
  :mod:`toolkit.share.where`) both select, all without them, in the source's order, renumbered 0 … n-1. Prompts not
  done yet are left out and counted (``subset.not_done_left_out``); a selection with no done prompt is refused.
- Layers: ``--layers`` in the grammar of every command, over the model's layer numbers; the ``layer`` coordinate
  keeps the source's numbers, and an activation store that holds fewer than all the model's layers names them in
  its root attribute ``layers``.
- Activation stores are written as extract writes a store of those prompts (token dim: the longest kept prompt).
  ``--dtype`` narrows a float32 store to float16 or bfloat16 (stored as extract stores them); it never widens,
  and float16 and bfloat16 do not turn into each other (each keeps bits the other loses). A value beyond
  float16's range is refused naming its prompt and layer. ``--withhold-texts`` keeps each text's sha256 only
  (``settings.withhold_texts`` becomes true).
- Contribution arrays (and summarize's contribution observables) are kept when every layer is kept and dropped
  otherwise (their blocks read and write neighbouring layers, the flow runs through all of them); summarize's
  group observables describe pools of all the source's prompts and are dropped when a prompt is dropped. Dropped
  arrays are listed in ``subset.dropped``.
- Provenance: the root attribute ``subset`` records the source's identity, ``--where``, ``--prompts``, the kept
  layer numbers, the dtype, the kept source prompts (``source_prompts``, in the ``--prompts`` grammar) and what
  was left out. ``prompts.n_stored`` (activations) and ``source.n_prompts`` (results) count the new store's
  prompts, so ``extract --resume`` and ``summarize --resume`` refuse to continue a subset as if it were its source.
"""

from __future__ import annotations

import datetime
import os
import sys

from .. import __version__
from ..errors import UserError
from ..store.activations import source_identity
from ..store.validate import open_store, require_consistent
from ..store.zarr_io import is_url
from .assemble import Part, write_activations
from .labels import store_labels
from .results_subset import write_results
from .selection import as_ranges, dropped_arrays, select_layers, select_prompts


def run_subset(args) -> int:
    _, kind = open_store(args.store)
    if kind not in ("activations", "results"):
        raise UserError(f"{args.store} is a repgeo {kind} store; subset takes activation stores and results stores "
                        f"of repgeo summarize")
    if kind == "results" and args.dtype:
        raise UserError(f"--dtype narrows the hidden states of an activation store; {args.store} is a results store: "
                        f"drop --dtype")
    if kind == "results" and args.withhold_texts:
        raise UserError(f"{args.store} is a results store, which holds no texts: drop --withhold-texts")
    source = require_consistent(args.store, kind)
    if os.path.exists(args.out):
        raise UserError(f"{args.out} already exists; choose a new --out")
    attrs = dict(source.attrs)
    model = attrs["model"] if kind == "activations" else attrs["source_attributes"]["model"]
    prompts, not_done = select_prompts(args.store, store_labels(source), source["done"][...], args.where,
                                       args.prompts)
    held = source["layer"][...]
    positions = select_layers(args.layers, held, model["n_layers"] + 1)
    dtype = args.dtype or attrs.get("dtype")
    if kind == "activations" and dtype != attrs["dtype"] and attrs["dtype"] != "float32":
        raise UserError(f"{args.store} is {attrs['dtype']}; --dtype {dtype} would not narrow it (float16 and bfloat16 "
                        f"each keep bits the other loses): only a float32 store can be narrowed; drop --dtype")
    dropped = dropped_arrays(source, len(prompts) < source["done"].shape[0], len(positions) < len(held))
    record = {"source": _identity(args.store, source, kind), "where": args.where, "prompts": args.prompts,
              "layers": held[positions].tolist(), "dtype": dtype, "source_prompts": as_ranges(prompts),
              "not_done_left_out": not_done, "dropped": dropped}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    new = {key: value for key, value in attrs.items() if key not in ("digests", "repgeo")}
    new.update(toolkit_version=__version__, created=now, subset=record)
    if kind == "activations":
        new.update(dtype=dtype, prompts=dict(attrs["prompts"], n_stored=len(prompts)))
        if len(positions) < len(held):  # a layer subset names its layers (validate checks hidden against them)
            new["layers"] = held[positions].tolist()
        if args.withhold_texts:
            new["settings"] = dict(attrs["settings"], withhold_texts=True)
        write_activations(args.out, "repgeo subset", [Part(args.store, source, prompts)], positions=positions,
                          dtype=dtype, withhold_texts=args.withhold_texts, attrs=new,
                          contributions="block" in source and len(positions) == len(held))
    else:
        new["source"] = dict(attrs["source"], n_prompts=len(prompts))
        if "group" in dropped:
            new.pop("groups_done", None)
        write_results(args.out, source, prompts, positions, attrs=dict(new, repgeo=attrs["repgeo"]), dropped=dropped)
    left_out = f"; {not_done} selected prompts not done yet were left out" if not_done else ""
    print(f"subset: {args.out}: {len(prompts)} prompts, layers {as_ranges(held[positions])}"
          + (f", {dtype}" if dtype else "") + (f", without {', '.join(dropped)}" if dropped else "") + left_out,
          file=sys.stderr)
    return 0


def _identity(path: str, group, kind: str) -> dict:
    """The source's identity: :func:`source_identity` of an activation store (with its own ``subset`` or ``merge``
    record, if any), or a results store's path, creation time, prompt count and source."""
    attrs = dict(group.attrs)
    if kind == "activations":
        return dict(source_identity(path, group), **{key: attrs[key] for key in ("subset", "merge") if key in attrs})
    return {"kind": kind, "path": path if is_url(path) else os.path.abspath(path), "created": attrs["created"],
            "n_prompts": int(group["done"].shape[0]), "source": attrs["source"],
            **({"subset": attrs["subset"]} if "subset" in attrs else {})}
