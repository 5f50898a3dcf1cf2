"""The ``repgeo lens`` job: check the store and model, write the lens weights once, read every prompt with Dask."""

from __future__ import annotations

import datetime
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np

from .. import __version__
from ..errors import UserError
from ..models import load_model, load_tokenizer, model_of_store
from ..runtime.cluster import completed, run_with_client, start_mpi
from ..runtime.layers import parse_layers
from ..store.activations import layer_position, open_activation_group, source_identity
from ..store.lens_results import DECODERS, create_lens_store, open_lens_group, write_prompt_lens
from ..store.validate import require_consistent
from ..store.zarr_io import consolidate
from .tasks import lens_task
from .weights import write_lens_weights

#: The lens weights file, inside the results store while a run works on it.
WEIGHTS_FILE = ".repgeo-lens-weights.safetensors"


@dataclass(frozen=True)
class LensParams:
    """Every parameter that decides the numbers of a lens store (recorded in it; a resume must match)."""

    decoders: tuple
    top_k: int
    layers: tuple  # layer numbers of the activation store

    @property
    def ks(self) -> tuple:
        """Top-k accuracy sizes: 1 and --top-k."""
        return tuple(sorted({1, self.top_k}))

    def recorded(self) -> dict:
        return dict(asdict(self), decoders=list(self.decoders), layers=list(self.layers), ks=list(self.ks))


def _log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def parse_decoders(text: str) -> tuple:
    chosen = tuple(dict.fromkeys(d.strip() for d in text.split(",") if d.strip()))
    unknown = [d for d in chosen if d not in DECODERS]
    if unknown or not chosen:
        raise UserError(f"unknown decoder {unknown[0] if unknown else text!r}; choose from {', '.join(DECODERS)}")
    return chosen


def check_inputs(args):
    """Everything refused before work starts: (params, model reference)."""
    source = require_consistent(args.store, "activations")
    final, vocab = source.attrs["model"]["n_layers"], source.attrs["model"]["vocab_size"]
    layers = tuple(parse_layers(args.layers, final + 1))
    for layer in (*layers, final):  # the final layer's distribution is what lens_kl_final compares with
        layer_position(source, layer, args.store, "--layers" if layer in layers else "the final layer")
    params = LensParams(decoders=parse_decoders(args.decoders), top_k=args.top_k, layers=layers)
    if params.top_k > vocab:
        raise UserError(f"--top-k {params.top_k} exceeds the vocabulary ({vocab} tokens)")
    if not source["done"][:].any():
        raise UserError(f"{args.store} has no finished prompt; complete it with repgeo extract --resume first")
    if os.path.exists(args.out):
        if not args.resume:
            raise UserError(f"{args.out} already exists; pass --resume to complete it, or choose a new --out")
        old = dict(require_consistent(args.out, "lens").attrs)
        if old["source"] != source_identity(args.store, source) or old["parameters"] != params.recorded():
            raise UserError(f"{args.out} was computed from another store or with other parameters; --resume needs "
                            f"the same ones, or choose a new --out")
    return params, model_of_store(dict(source.attrs), args.model, args.store)


def run_lens(args) -> int:
    ranks = start_mpi(args.scheduler)
    params, ref = check_inputs(args)  # under MPI every rank refuses alike
    run_with_client(args.scheduler, args.workers,
                    lambda client: lens(args.store, args.out, params, ref, client, args.device), ranks)
    return 0


def _vocabulary(ref, size: int) -> np.ndarray:
    """Token id → its text as the tokenizer decodes it alone ("" past the tokenizer's own ids)."""
    tokenizer = load_tokenizer(ref)
    texts = tokenizer.batch_decode([[i] for i in range(min(size, len(tokenizer)))])
    return np.array(texts + [""] * (size - len(texts)), dtype=object)


def lens(store: str, out: str, params: LensParams, ref, client, device: str = "auto") -> None:
    """Fill the lens store at ``out`` (creating it if needed) using the Dask ``client``."""
    import torch

    source = open_activation_group(store)
    t0 = time.monotonic()
    model = load_model(ref, torch.float32)
    if not os.path.exists(out):
        attrs = {"toolkit_version": __version__, "source": source_identity(store, source),
                 "source_attributes": dict(source.attrs), "parameters": params.recorded(),
                 "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        create_lens_store(out, source=source, decoders=params.decoders, layers=params.layers, top_k=params.top_k,
                          ks=params.ks, vocab=_vocabulary(ref, model.get_output_embeddings().weight.shape[0]),
                          attrs=attrs)
    weights = os.path.join(out, WEIGHTS_FILE)
    write_lens_weights(model, weights)
    del model
    results = open_lens_group(out, "r+")
    source_done = source["done"][:]
    todo = np.flatnonzero(source_done & ~results["done"][:]).tolist()
    if not source_done.all():
        _log(f"lens: {int((~source_done).sum())} prompts of {store} are not extracted yet and are skipped")
    _log(f"lens: {len(todo)} prompts to do, {int(results['done'][:].sum())} done before, {len(params.layers)} "
         f"layers, decoders {', '.join(params.decoders)}, {len(client.nthreads())} workers")
    n_tokens = source["n_tokens"][:]
    tasks = client.map(lens_task, [store] * len(todo), todo, weights=weights, token=uuid.uuid4().hex,
                       params=params, device=device, pure=False)
    readings = int(len(params.layers))
    for _, (prompt, values) in completed(tasks, [int(n_tokens[p]) * readings for p in todo], _log, "lens",
                                         "readings"):
        write_prompt_lens(results, prompt, values)
    os.remove(weights)
    consolidate(out)
    _log(f"lens: complete: {out} ({time.monotonic() - t0:.1f} s)")
