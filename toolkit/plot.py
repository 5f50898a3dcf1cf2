"""``repgeo plot``: PNG figures of each observable against layer and relative depth, one line per group."""

from __future__ import annotations

import os

import numpy as np

from .errors import UserError

#: Variable → (title, y label). Variables with extra dims are cut at --n2 / --k first.
TITLES = {
    "gride_id": ("GRIDE intrinsic dimension", "ID"),
    "twonn_id": ("TwoNN intrinsic dimension", "ID"),
    "overlap": ("Neighbourhood overlap of layers l and l+1", "overlap"),
    "cosine_mean": ("Mean cosine similarity", "cosine"),
    "cosine_std": ("Std of cosine similarity", "cosine std"),
    "anisotropy": ("Anisotropy σ1² / Σσi²", "anisotropy"),
    "nn_reciprocity": ("Nearest-neighbour reciprocity", "share"),
    "nn_cosine": ("Cosine between the two nearest-neighbour directions", "cosine"),
    "norm_mean": ("Mean norm", "norm"),
    "group_gride_id": ("GRIDE intrinsic dimension of pooled groups", "ID"),
    "group_anisotropy": ("Anisotropy of pooled groups", "anisotropy"),
    "group_kl": ("KL divergence from the reference group", "KL (nats)"),
}


def _curves(da, groupby):
    """Group value → (mean over prompts, spread = std over prompts) along layer."""
    if "group" in da.dims:
        return {str(g): (da.sel(group=g).values, None) for g in da.group.values}
    if groupby is None:
        return {"all prompts": (np.nanmean(da.values, axis=0), np.nanstd(da.values, axis=0))}
    labels = da[groupby].values
    out = {}
    for value in sorted(set(labels.tolist()), key=str):
        rows = da.values[labels == value]
        out[f"{groupby}={value}"] = (np.nanmean(rows, axis=0), np.nanstd(rows, axis=0) if len(rows) > 1 else None)
    return out


def plot_results(path: str, out_dir: str, groupby: str | None = None, n2: int = 32, k: int = 8) -> list:
    """Write one PNG per observable of the results store at ``path`` into ``out_dir``; return the file paths."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .store.results import open_results

    ds = open_results(path)
    groupby = groupby or ds.attrs["parameters"].get("groupby")
    if groupby is not None and groupby not in ds.coords:
        labels = [c for c in ds.coords if c not in ds.indexes]
        raise UserError(f"unknown label {groupby!r} for --groupby; labels: {', '.join(labels)}")
    if "n2" in ds.dims and n2 not in ds.n2.values:
        raise UserError(f"--n2 {n2} is not a GRIDE scale of this store; scales: {', '.join(map(str, ds.n2.values))}")
    if "k" in ds.dims and k not in ds.k.values:
        raise UserError(f"--k {k} is outside the overlap sizes 1..{int(ds.k.max())}")
    os.makedirs(out_dir, exist_ok=True)
    n_layers = ds.sizes["layer"]
    depth = ds.layer.values / max(n_layers - 1, 1)
    written = []
    for name, (title, ylabel) in TITLES.items():
        if name not in ds:
            continue
        da = ds[name]
        if "n2" in da.dims:
            da, title = da.sel(n2=n2), f"{title} at n2 = {n2}"
        if "k" in da.dims:
            da, title = da.sel(k=k), f"{title}, k = {k}"
        da = da.load()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN layers (e.g. overlap at the last layer)
            curves = _curves(da, groupby if "prompt" in da.dims else None)
        for label, (mean, spread) in curves.items():
            for ax, x in zip(axes, (ds.layer.values, depth)):
                (line,) = ax.plot(x, mean, marker="o", markersize=2.5, linewidth=1.4, label=label)
                if spread is not None:
                    ax.fill_between(x, mean - spread, mean + spread, color=line.get_color(), alpha=0.15, linewidth=0)
        axes[0].set_xlabel("layer (0 = embeddings)")
        axes[1].set_xlabel("relative depth")
        axes[0].set_ylabel(ylabel)
        for ax in axes:
            ax.grid(alpha=0.3)
        if len(curves) > 1:
            axes[1].legend(fontsize=7, ncol=2 if len(curves) > 8 else 1, loc="best", framealpha=0.8)
        model = ds.attrs["source"]["model"]
        fig.suptitle(f"{title}\n{os.path.basename(model.rstrip('/'))}, {ds.sizes['prompt']} prompts"
                     + ("" if "prompt" not in da.dims else " (mean ± std over prompts)"), fontsize=10)
        fig.tight_layout()
        target = os.path.join(out_dir, f"{name}.png")
        fig.savefig(target, dpi=110)
        plt.close(fig)
        written.append(target)
    return written
