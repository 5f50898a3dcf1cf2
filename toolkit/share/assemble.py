"""An activation store made of prompts of other activation stores: what ``repgeo subset`` and ``repgeo merge``
write.

The new store is created exactly as extract creates one for those prompts (:func:`build_activation_store`: the
token dim is the longest prompt's, input ids padded with -1, the contribution targets the most any prompt has),
then filled prompt by prompt with :class:`~toolkit.store.activations.PromptWriter`, which pads with NaN and sets
``done`` last. One prompt's slab of hidden states is in memory at a time.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import zarr

from ..errors import UserError
from ..runtime.partial import Partial
from ..store.activations import CONTRIBUTIONS, PromptWriter, build_activation_store, prompt_texts
from ..store.zarr_io import describe_error, quiet_zarr
from .labels import combine_labels, store_labels

#: The largest finite value of each narrow dtype, and what to do instead when a store's values exceed it.
RANGE = {"float16": 65504.0, "bfloat16": 3.3895314e38}
ADVICE = {"float16": "use --dtype bfloat16, or keep the store's float32", "bfloat16": "keep the store's float32"}
#: Bytes on disk per hidden-state value, before compression (a bfloat16 value in its float32 container compresses
#: to about two bytes).
BYTES_PER_VALUE = {"float16": 2, "bfloat16": 2, "float32": 4}
#: Seconds between progress lines.
PROGRESS_EVERY = 10.0


@dataclass
class Part:
    """The prompts of one source store that go into the new store, in this order."""

    path: str
    group: zarr.Group
    prompts: np.ndarray  # (kept,) int64 indices along the source's prompt dim


def narrow(hidden: np.ndarray, dtype: str) -> np.ndarray:
    """float32 (layer, token, dim) hidden states as a ``dtype`` store holds them: float16, or for bfloat16 float32
    whose low 16 bits are zero, rounded to nearest even as torch rounds them (what extract stores)."""
    if dtype == "float16":
        with np.errstate(over="ignore"):  # values beyond the range become inf, which the caller refuses
            return hidden.astype(np.float16)
    bits = hidden.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def _read(part: Part, p: int, start: int, stop: int, n: int, contributions: list, n_targets: int) -> tuple:
    """(hidden (layer start … stop-1, token, dim), token_loss (token,), contributions) of prompt ``p`` of a source,
    its first ``n`` tokens; a chunk that fails its checksum is refused naming the prompt."""
    group = part.group
    try:
        hidden = group["hidden"][p, start:stop, :n]  # one slice of one shard: no array indexing of a sharded array
        token_loss = group["token_loss"][p, :n]
        extras = {name: group[name][p][..., :n] for name in contributions}
    except Exception as e:  # a checksum mismatch or a missing chunk
        raise UserError(f"{part.path}: prompt {p} is unreadable ({describe_error(e)}); run repgeo validate --deep "
                        f"{part.path}, then restore it from a copy") from None
    for name in ("flow", "grad_norm"):  # (target, layer, token): only the prompt's own targets
        if name in extras:
            extras[name] = extras[name][:n_targets]
    return hidden, token_loss, extras


def write_activations(out: str, job: str, parts: list, *, positions: np.ndarray, dtype: str,
                      withhold_texts: bool, attrs: dict, contributions: bool) -> None:
    """Create the activation store ``out`` of the prompts of ``parts``, in order, through this job's partial
    directory (nothing is left at ``out`` on an error).

    positions: (kept,) positions along the sources' ``layer`` dim (the same layers in every part), increasing;
    dtype: the new store's dtype (the sources' or, from float32, float16 / bfloat16: a value beyond float16's range
    is refused naming its prompt and layer); withhold_texts: keep each text's sha256 only; attrs: the root
    attributes; contributions: copy the sources' contribution arrays (only when every layer is kept).
    """
    quiet_zarr()
    first = parts[0].group
    source_dtype = first.attrs["dtype"]
    layers = first["layer"][...][positions]
    n_tokens = [part.group["n_tokens"][...][part.prompts] for part in parts]
    input_ids = [row[:n] for part, lengths in zip(parts, n_tokens)
                 for row, n in zip(part.group["input_ids"].get_orthogonal_selection((part.prompts, slice(None))),
                                   lengths)]
    text_name = "text" if "text" in first else "text_sha256"
    texts = np.concatenate([part.group[text_name][...][part.prompts] for part in parts])
    labels = combine_labels([{name: values[part.prompts] for name, values in store_labels(part.group).items()}
                             for part in parts], [len(part.prompts) for part in parts])
    names = [name for name in CONTRIBUTIONS if name in first] if contributions else []
    targets = [row[row >= 0] for part in parts
               for row in part.group["flow_target"].get_orthogonal_selection((part.prompts, slice(None)))] \
        if contributions else []
    spec = {"heads": first["head"].shape[0], "gradients": "grad_norm" in first, "targets": targets} \
        if contributions else None
    d_model = first["hidden"].shape[3]
    lengths = np.concatenate(n_tokens)
    with Partial(out, job) as partial:
        _check_disk(out, int(lengths.sum()) * len(layers) * d_model * BYTES_PER_VALUE[dtype]
                    + 4 * sum(int(np.prod(part.group[name].shape[1:])) * len(part.prompts)
                              for part in parts for name in names))
        build_activation_store(partial.path, input_ids=input_ids,
                               texts=prompt_texts(texts.tolist(), True) if withhold_texts and text_name == "text"
                               else {text_name: texts},
                               labels=labels, layers=layers, d_model=d_model, dtype=dtype, attrs=attrs,
                               contributions=spec)
        writer = PromptWriter(zarr.open_group(partial.path, mode="r+", zarr_format=3))
        start, stop = int(positions[0]), int(positions[-1]) + 1
        i, last = 0, time.monotonic()
        for part in parts:
            for p in part.prompts.tolist():
                n = int(lengths[i])
                hidden, token_loss, extras = _read(part, p, start, stop, n, names,
                                                   len(targets[i]) if contributions else 0)
                hidden = hidden[positions - start]
                if dtype != source_dtype:
                    hidden = _narrowed(hidden, dtype, part.path, p, layers)
                writer.write(i, hidden, token_loss, extras)
                i += 1
                if time.monotonic() - last > PROGRESS_EVERY:
                    print(f"{job.split()[-1]}: {i}/{len(lengths)} prompts", file=sys.stderr, flush=True)
                    last = time.monotonic()
        partial.finish()


def _narrowed(hidden: np.ndarray, dtype: str, path: str, prompt: int, layers: np.ndarray) -> np.ndarray:
    """:func:`narrow` of one prompt's (layer, token, dim) slab, refused where a value leaves ``dtype``'s range."""
    stored = narrow(hidden, dtype)
    finite = np.isfinite(stored).reshape(len(stored), -1).all(axis=1)
    if not finite.all():
        at = int(np.flatnonzero(~finite)[0])
        raise UserError(f"prompt {prompt} layer {int(layers[at])} of {path}: |hidden| reaches "
                        f"{float(np.abs(hidden[at]).max()):.0f}, beyond {dtype}'s range (max {RANGE[dtype]:g}); "
                        f"{ADVICE[dtype]}")
    return stored


def _check_disk(out: str, need: int):
    """Refuse a store of up to ``need`` bytes where the disk of ``out`` has less room."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    free = shutil.disk_usage(parent).free
    if need > free:
        raise UserError(f"{parent} has {free / 2**30:.2f} GiB free but the new store needs up to {need / 2**30:.2f} "
                        f"GiB; free space or choose another --out")
