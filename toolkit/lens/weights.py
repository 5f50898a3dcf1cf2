"""The three parts of a model that the lens needs: final norm, unembedding and input embedding.

The client loads the model once, checks it against the store's record, and writes these parts (float32) to one
safetensors file next to the results; every worker reads that file, never the whole model. A final norm whose
output one of `NORM_FORMULAS` reproduces bit for bit (Llama's and Gemma's RMS norms, checked on the client) is
computed by that formula on the workers, which then never import transformers (2 s of CPU per worker).
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass

from ..errors import UserError

#: Only norm classes of transformers' own model implementations are rebuilt from the file's record.
NORM_MODULES = "transformers.models."

#: Final norms the workers compute without the model's class: name → how the weight scales the RMS-normalized x.
NORM_FORMULAS = ("rms", "rms_offset")


class RMSNorm:
    """x · rsqrt(mean(x²) + eps), times the weight ("rms": Llama, Qwen, Mistral, …) or times 1 + the weight
    ("rms_offset": Gemma), in float32: the operations of transformers' RMS norm classes, in their order."""

    def __init__(self, weight, eps: float, formula: str):
        self.scale, self.eps = (weight if formula == "rms" else 1.0 + weight), eps

    def __call__(self, x):
        import torch

        return self.scale * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def to(self, device: str) -> "RMSNorm":
        self.scale = self.scale.to(device)
        return self


def native_norm_formula(norm, eps: float):
    """The name of the `NORM_FORMULAS` entry whose output equals ``norm``'s bit for bit in float32 (on random
    inputs of a few scales), or None."""
    import copy

    import torch

    module = copy.deepcopy(norm).float().eval()
    weight = module.weight.detach()
    x = torch.randn(64, weight.shape[0], generator=torch.Generator().manual_seed(0))
    x *= torch.logspace(-2, 2, 64)[:, None]
    with torch.no_grad():
        expected = module(x)
        for formula in NORM_FORMULAS:
            if torch.equal(RMSNorm(weight, eps, formula)(x), expected):
                return formula
    return None


def write_lens_weights(model, path: str) -> dict:
    """Save ``model``'s final norm, unembedding and input embedding to ``path`` (safetensors, float32).

    Returns the record stored with them: norm class, epsilon and formula (`native_norm_formula`), logit soft cap,
    whether the embeddings are tied, vocabulary size and d_model.
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
              "norm_formula": native_norm_formula(norm, float(eps)),
              "softcap": getattr(model.config, "final_logit_softcapping", None), "tied": bool(tied),
              "vocab": int(unembedding.weight.shape[0]), "d_model": int(unembedding.weight.shape[1])}
    save_file(tensors, path, metadata={"repgeo": json.dumps(record)})
    return record


@dataclass
class LensParts:
    """On a worker: ``norm`` (an `RMSNorm` or the model's own norm module), ``unembedding`` (vocab, dim),
    ``softcap`` (float or None), and ``unit_embedding`` (vocab, dim), the input embedding's rows of unit norm, read
    from ``path`` (file of `write_lens_weights`) and computed the first time a task asks for them: a run of the
    output decoder alone never holds them."""

    norm: object
    unembedding: object
    softcap: float | None
    path: str
    device: str

    @functools.cached_property
    def unit_embedding(self):
        from safetensors import safe_open

        from ..observables.lens import unit_rows

        with safe_open(self.path, framework="pt") as f:
            embedding = f.get_tensor("embedding").to(self.device) if "embedding" in f.keys() else self.unembedding
        return unit_rows(embedding)


@functools.lru_cache(maxsize=1)
def load_lens_weights(path: str, token: str, device: str = "cpu") -> LensParts:
    """Read the file `write_lens_weights` wrote onto ``device`` (once per worker process and ``token``, which
    names the run)."""
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        record = json.loads(f.metadata()["repgeo"])
        norm_weight, unembedding = f.get_tensor("norm"), f.get_tensor("unembedding")
    if record.get("norm_formula") in NORM_FORMULAS:
        norm = RMSNorm(norm_weight, record["norm_eps"], record["norm_formula"])
    else:
        module_name, _, class_name = record["norm_class"].rpartition(".")
        if not module_name.startswith(NORM_MODULES):
            raise UserError(f"{path} names norm class {record['norm_class']}, which is not one of transformers' "
                            f"models")
        norm = getattr(importlib.import_module(module_name), class_name)(record["d_model"], eps=record["norm_eps"])
        with torch.no_grad():
            norm.weight.copy_(norm_weight)  # before the tensors move: the module is built on the CPU
        norm = norm.eval()
    return LensParts(norm.to(device), unembedding.to(device), record["softcap"], path, device)
