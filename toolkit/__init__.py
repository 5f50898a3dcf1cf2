"""repgeo: measure the geometry of LLM hidden states, in batch, on clusters.

Open stores with :func:`open_activations` (lazy xarray Dataset of ``hidden[prompt, layer, token, dim]``),
:func:`open_results` (observables per prompt, layer and group) and :func:`open_lens` (lens readings).
"""

__version__ = "0.1.0"


def open_activations(path):
    """Open an activation store as a lazy xarray Dataset (hidden as float32); see :mod:`toolkit.store.activations`."""
    from .store.activations import open_activations as _open

    return _open(path)


def open_results(path):
    """Open a results store as a lazy xarray Dataset; see :mod:`toolkit.store.results`."""
    from .store.results import open_results as _open

    return _open(path)


def open_lens(path):
    """Open a lens results store as a lazy xarray Dataset; see :mod:`toolkit.store.lens_results`."""
    from .store.lens_results import open_lens as _open

    return _open(path)
