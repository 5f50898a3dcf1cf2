"""One module per study of ``repgeo reproduce``. Each defines TITLE, DESCRIPTION, LABELS (what ``--corpus`` prompts
must carry), ``settings(args)``, ``prepare(out, settings)`` (prompt files), ``stages(out, settings)``,
``findings(out, settings)`` and ``figures(out, settings, directory)``."""

from __future__ import annotations

import os


def path(out: str, name: str) -> str:
    return os.path.join(out, name)


def pick(values: dict, scale: str):
    """The value of a (tiny, small, full) table at ``scale``."""
    return values[scale]


def model_specs(text: str | None, default: str) -> list:
    """``--model A,B`` as a list (a study of one model takes the first)."""
    specs = [m.strip() for m in (text or default).split(",") if m.strip()]
    return specs or [default]


def relative_depth(layers, last_layer: int):
    """Layer / last layer: 0 at the embeddings, 1 at the last hidden layer (as ``repgeo plot`` draws it)."""
    import numpy as np

    return np.asarray(layers, dtype=np.float64) / max(last_layer, 1)


def mean_over(values, axis: int = 0):
    """NaN-ignoring mean along ``axis``; NaN (without a warning) where a slice holds no finite value."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def gride_variants(ds_by_skip: dict) -> list:
    """The (n2, skip) analysis variants of results stores by --skip-tokens value: every GRIDE scale with a finite
    value."""
    import numpy as np

    return [(int(n2), skip) for skip, ds in ds_by_skip.items() for n2 in ds.n2.values
            if np.isfinite(ds.gride_id.sel(n2=n2).values).any()]
