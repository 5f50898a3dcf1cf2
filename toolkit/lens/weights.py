"""The three parts of a model that the lens needs: final norm, unembedding and input embedding.

The client loads the model once, checks it against the store's record, and writes these parts (float32) to one
safetensors file next to the results; every worker reads that file, never the whole model.
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass

from ..errors import UserError

#: Only norm classes of transformers' own model implementations are rebuilt from the file's record.
NORM_MODULES = "transformers.models."


def write_lens_weights(model, path: str) -> dict:
    """Save ``model``'s final norm, unembedding and input embedding to ``path`` (safetensors, float32).

    Returns the record stored with them: norm class and epsilon, logit soft cap, whether the embeddings are tied,
    vocabulary size and d_model.
    """
    import torch
    from safetensors.torch import save_file

    norm = getattr(model.base_model, "norm", None)
    unembedding = model.get_output_embeddings()
    if norm is None or unembedding is None or not type(norm).__module__.startswith(NORM_MODULES):
        raise UserError(f"{type(model).__name__} has no final norm and unembedding the lens can read; the lens "
                        f"supports decoder-only models of transformers (Llama family, Gemma 3, …)")
    embedding = model.get_input_embeddings().weight
    tied = embedding.data_ptr() == unembedding.weight.data_ptr()
    tensors = {"norm": norm.weight, "unembedding": unembedding.weight}
    if not tied:
        tensors["embedding"] = embedding
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    record = {"norm_class": f"{type(norm).__module__}.{type(norm).__qualname__}", "norm_eps": float(eps),
              "softcap": getattr(model.config, "final_logit_softcapping", None), "tied": bool(tied),
              "vocab": int(unembedding.weight.shape[0]), "d_model": int(unembedding.weight.shape[1])}
    save_file(tensors, path, metadata={"repgeo": json.dumps(record)})
    return record


@dataclass
class LensParts:
    """On a worker: ``norm`` (a torch module), ``unembedding`` (vocab, dim), ``unit_embedding`` (vocab, dim) rows of
    unit norm, ``softcap`` (float or None)."""

    norm: object
    unembedding: object
    unit_embedding: object
    softcap: float | None


@functools.lru_cache(maxsize=1)
def load_lens_weights(path: str, token: str, device: str = "cpu") -> LensParts:
    """Read the file `write_lens_weights` wrote onto ``device`` (once per worker process and ``token``, which
    names the run)."""
    import torch
    from safetensors import safe_open

    from ..observables.lens import unit_rows

    with safe_open(path, framework="pt") as f:
        record = json.loads(f.metadata()["repgeo"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    module_name, _, class_name = record["norm_class"].rpartition(".")
    if not module_name.startswith(NORM_MODULES):
        raise UserError(f"{path} names norm class {record['norm_class']}, which is not one of transformers' models")
    norm = getattr(importlib.import_module(module_name), class_name)(record["d_model"], eps=record["norm_eps"])
    with torch.no_grad():
        norm.weight.copy_(tensors["norm"])  # before the tensors move: the module is built on the CPU
    tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    embedding = tensors.get("embedding", tensors["unembedding"])
    return LensParts(norm.to(device).eval(), tensors["unembedding"], unit_rows(embedding), record["softcap"])
