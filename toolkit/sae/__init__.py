"""Sparse autoencoders (SAELens directory layout): load, save, and encode hidden states into feature activations.

Typical use::

    sae = load_sae(directory, d_model)         # UserError on any problem with the files
    acts = encode(sae, hidden)                 # (token, d_in) -> (token, d_sae) float32
    directions = sae.W_dec                     # (d_sae, d_in) decoder directions
"""

from .files import SparseAutoencoder, encode, load_sae, save_sae

__all__ = ["SparseAutoencoder", "encode", "load_sae", "save_sae"]
