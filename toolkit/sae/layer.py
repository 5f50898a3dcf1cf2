"""One layer of an activation store as the token vectors an SAE reads: checks, then one prompt slab at a time."""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from ..store.activations import layer_position, open_activation_group


def sae_hook_name(layer: int) -> str:
    """The SAELens/TransformerLens hook of store layer ``layer``: 0 is the embeddings, L the output of block L-1."""
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


class StoreLayer:
    """Layer ``layer`` of the activation store at ``path``, read one prompt at a time (bounded memory).

    Only finished prompts (``done``) are used. ``special_ids`` are the tokenizer's special token ids recorded by
    extract (root attribute ``special_token_ids``), whose tokens an SAE analysis leaves out.
    """

    def __init__(self, path: str, layer: int):
        self.path = path
        self.group = open_activation_group(path)
        hidden = self.group["hidden"]
        self.n_layers, self.d_model = hidden.shape[1], hidden.shape[3]
        self.layer = layer
        self.position = layer_position(self.group, layer, path)  # along hidden's layer dim
        self.special_ids = np.asarray(self.group.attrs.get("special_token_ids", []), dtype=np.int64)
        self.n_tokens = self.group["n_tokens"][:].astype(np.int64)
        self.prompts = np.flatnonzero(self.group["done"][:])
        if self.prompts.size == 0:
            raise UserError(f"{path} has no finished prompt; complete it with repgeo extract --resume first")

    def slab(self, prompt: int) -> tuple:
        """(vectors, special): the prompt's (n_tokens, d_model) float32 vectors at the layer, and a (n_tokens,)
        bool mask, True at tokens whose id is a special id."""
        n = int(self.n_tokens[prompt])
        vectors = np.asarray(self.group["hidden"][prompt, self.position, :n], dtype=np.float32)
        special = np.isin(self.group["input_ids"][prompt, :n], self.special_ids)
        return vectors, special
