"""``repgeo info``: a short human-readable account of a store."""

from __future__ import annotations

import os

import numpy as np

from ..errors import UserError
from .activations import LAYOUT
from .results import VARIABLES
from .validate import open_store, require_consistent
from .zarr_io import describe_error, is_url


def disk_usage(path: str) -> int | None:
    """Bytes of all files below ``path``; None for a remote store (not measured: it would list every object)."""
    if is_url(path):
        return None
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _label_summary(values: np.ndarray, most: int = 6) -> str:
    if values.dtype.kind in "fiu" and len(np.unique(values)) > most:
        return f"{values.dtype} in [{np.nanmin(values):g}, {np.nanmax(values):g}]"
    uniq, counts = np.unique(values.astype(str), return_counts=True)
    shown = ", ".join(f"{u}×{c}" for u, c in list(zip(uniq, counts))[:most])
    return f"{len(uniq)} values: {shown}{', …' if len(uniq) > most else ''}"


def store_info(path: str) -> str:
    """The account of the store at ``path``; refused (:class:`UserError`) when the store is not consistent."""
    kind = open_store(path)[1]
    group = require_consistent(path, kind)  # what follows reads attributes of the types the schema pins
    return {"activations": _activations_info, "results": _results_info, "sae_cooccurrence": _sae_cooccurrence_info,
            "lens": _lens_info, "relations": _relations_info, "markov": _relations_info}[kind](path, group)


def _size(path: str) -> str:
    size = disk_usage(path)
    return "remote (not measured)" if size is None else f"{size / 2**20:.1f} MiB on disk"


def _elsewhere(model: dict, prompts: dict) -> list:
    """Lines naming the recorded paths (the model's files, the prompt file) that do not exist on this machine."""
    from ..models import ALIASES

    lines = []
    if model["id"] not in ALIASES and model.get("location") and not os.path.exists(model["location"]):
        lines.append(f"  elsewhere  the model's files {model['location']} are not on this machine: give them with "
                     f"--model PATH where a command needs the model (checked by the recorded sha256)")
    if prompts.get("path") and not os.path.exists(prompts["path"]):
        lines.append(f"  elsewhere  the prompt file {prompts['path']} is not on this machine (its sha256 is "
                     f"recorded: {prompts['sha256'][:12]}…)")
    return lines


def _held_layers(held: list, n_blocks: int) -> str:
    """The layers line of a store holding layer numbers ``held`` of a model of ``n_blocks`` blocks."""
    if held == list(range(n_blocks + 1)):
        return f"{len(held)} (0 = embeddings … {n_blocks})"
    return f"{len(held)} of the model's {n_blocks + 1} (0 = embeddings … {n_blocks}): {', '.join(map(str, held))}"


def _activations_info(path: str, group) -> str:
    a = dict(group.attrs)
    model, prompts, settings = a["model"], a["prompts"], a["settings"]
    n_prompts, n_layers, width, d_model = group["hidden"].shape
    n_tokens, done = group["n_tokens"][:], group["done"][:]
    size = disk_usage(path)
    values = int(n_tokens.sum()) * n_layers * d_model
    lines = [
        f"activation store {path}",
        f"  model      {model['id']} ({model['architecture']}, {model['n_layers']} blocks, d_model {d_model}, "
        f"weights sha256 {str(model.get('weights_sha256'))[:12]})",
        f"  prompts    {n_prompts} stored of {prompts['n_input']} inputs ({prompts['n_dropped_short']} dropped "
        f"as shorter than --min-tokens, {prompts['n_truncated']} truncated) from {prompts['path']}",
        f"  tokens     {int(n_tokens.sum())} in all, {int(n_tokens.min())}–{int(n_tokens.max())} per prompt",
        f"  layers     {_held_layers(group['layer'][:].tolist(), model['n_layers'])}, dim {d_model}, "
        f"dtype {a['dtype']}",
        "  settings   " + ", ".join(f"{k}={v}" for k, v in settings.items()),
    ]
    labels = [name for name, _ in group.arrays() if name not in LAYOUT]
    for name in labels:
        lines.append(f"  label      {name}: {_label_summary(group[name][:])}")
    lines += _elsewhere(model, prompts)
    lines += [
        f"  size       {_size(path)}" + (f", {size / max(values, 1):.2f} bytes per stored value" if size else ""),
        f"  complete   {int(done.sum())}/{n_prompts} prompts done" + ("" if done.all() else
                                                                      " (rerun extract with --resume to finish)"),
        f"  created    {a['created']} by repgeo {a['toolkit_version']}, {len(a.get('runs', []))} run(s), "
        f"latest on {a['ranks']} rank(s)",
    ]
    return "\n".join(lines)


def _results_info(path: str, group) -> str:
    a = dict(group.attrs)
    done = group["done"][:]
    source, params = a["source"], a["parameters"]
    variables = [name for name in VARIABLES if name in group]
    lines = [
        f"results store {path}",
        f"  source     {source['path']} ({source['model']}, {source['n_prompts']} prompts)",
        f"  variables  {', '.join(variables)}",
        "  parameters " + ", ".join(f"{k}={v}" for k, v in params.items()),
        f"  size       {_size(path)}",
        f"  complete   {int(done.sum())}/{len(done)} prompts done"
        + ("" if done.all() else " (rerun summarize with --resume to finish)")
        + (f", groups {'done' if a.get('groups_done') else 'not done'}" if params.get("groupby") else ""),
        f"  created    {a['created']} by repgeo {a['toolkit_version']}",
    ]
    return "\n".join(lines)


def _lens_info(path: str, group) -> str:
    a = dict(group.attrs)
    done, source, params = group["done"][:], a["source"], a["parameters"]
    layers = params["layers"]
    lines = [
        f"lens store {path}",
        f"  source     {source['path']} ({source['model']}, {source['n_prompts']} prompts)",
        f"  readings   decoders {', '.join(params['decoders'])}; top {params['top_k']}; {len(layers)} layers "
        f"({layers[0]}…{layers[-1]}); vocabulary {group['vocab'].shape[0]} tokens",
        f"  size       {_size(path)}",
        f"  complete   {int(done.sum())}/{len(done)} prompts done"
        + ("" if done.all() else " (rerun lens with --resume to finish)"),
        f"  created    {a['created']} by repgeo {a['toolkit_version']}",
    ]
    return "\n".join(lines)


def _relations_info(path: str, group) -> str:
    a = dict(group.attrs)
    kind = a["repgeo"]["kind"]
    source = a.get("pairs") or a.get("corpus", {})
    sizes = ", ".join(f"{name} {array.shape[0]}" for name, array in group.arrays()
                      if array.metadata.dimension_names == (name,))
    lines = [
        f"{kind} store {path}",
        f"  model      {a['model'].get('id')} (weights sha256 {str(a['model'].get('weights_sha256'))[:12]})",
        f"  from       {source.get('path')}",
        f"  dims       {sizes}",
        "  parameters " + ", ".join(f"{k}={v}" for k, v in a["parameters"].items()),
        f"  size       {_size(path)}",
        f"  created    {a['created']} by repgeo {a['toolkit_version']}",
    ]
    return "\n".join(lines)


def _sae_cooccurrence_info(path: str, group) -> str:
    a = dict(group.attrs)
    source, sae, params = a["source"], a["sae"], a["parameters"]
    diagonal = np.arange(sae["d_sae"])
    try:  # the only chunks info reads beyond the small arrays that require_consistent read
        occurring = int((group["cooccurrence"].get_coordinate_selection((diagonal, diagonal)) > 0).sum())
    except Exception as e:
        raise UserError(f"{path} has an unreadable cooccurrence chunk ({describe_error(e)}); run repgeo validate "
                        f"--deep {path} for the full list, then restore the store or compute it again") from None
    lines = [
        f"SAE co-occurrence store {path}",
        f"  source     {source['path']} ({source['model']}, {source['n_prompts']} prompts), layer {a['layer']}",
        f"  SAE        {sae['path']} ({sae['architecture']}, d_in {sae['d_in']}, {sae['d_sae']} features, "
        f"weights sha256 {sae['weights_sha256'][:12]})",
        f"  blocks     {int(group['n_blocks'][...])} of {params['block']} tokens; {occurring} features occur at "
        f"least once (threshold {params['threshold']})",
        "  parameters " + ", ".join(f"{k}={v}" for k, v in params.items()),
        f"  size       {_size(path)}",
        f"  created    {a['created']} by repgeo {a['toolkit_version']}",
    ]
    return "\n".join(lines)
