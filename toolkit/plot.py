"""``repgeo plot``: figures of a store, by its kind: :func:`plot_store` draws a results store here, a lens store in
:mod:`toolkit.plot_lens`, relations and markov stores in :mod:`toolkit.plot_relations`, an activation store's
contributions in :mod:`toolkit.plot_flow` (:data:`KINDS`).

Results store: one line (or colour) per group of prompts. Each observable against layer and relative depth; GRIDE
ID against its scale n2; neighbourhood overlap against k; each prompt's GRIDE ID against its loss. :func:`figures`
draws them (matplotlib Figures, for tests and notebooks); :func:`plot_results` writes them as PNG files.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from .errors import UserError
from .runtime.layers import parse_layers

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
#: Variable → (file stem, dim on the x axis, title, x label, y label, log2 x axis): figures of a few layers each.
AGAINST = {
    "gride_id": ("gride_id_vs_n2", "n2", "GRIDE intrinsic dimension against scale", "n2 (n1 = n2/2)", "ID", True),
    "overlap": ("overlap_vs_k", "k", "Neighbourhood overlap of layers l and l+1 against k", "k (neighbours)",
                "overlap", False),
}
#: Layers drawn as panels of the figures against n2, k and loss.
MAX_PANELS = 4
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")
#: Store kind → (the command that makes it, the options of ``repgeo plot`` it takes (others are refused), those it
#: requires, the module and function that draw it: ``function(path, out_dir, **options) -> paths``).
KINDS = {
    "results": ("repgeo summarize", ("groupby", "n2", "k", "layers"), (), "plot", "plot_results"),
    "lens": ("repgeo lens", ("prompt", "tokens", "layers"), (), "plot_lens", "plot_lens"),  # it asks for --prompt
    "relations": ("repgeo relations analogies", ("layers",), (), "plot_relations", "relations_figures"),
    "markov": ("repgeo relations markov", (), (), "plot_relations", "relations_figures"),
    "activations": ("repgeo extract --contributions", ("prompt", "target", "min_weight", "model"), ("prompt",),
                    "plot_flow", "flow_figures"),
}


def group_styles(n: int) -> list[dict]:
    """Matplotlib styles (color, linestyle, marker) for ``n`` groups, distinct for up to 80.

    The 20 colours of tab20 come dark shades first, then the light ones, so that neighbouring groups contrast
    (the first 10 are matplotlib's default cycle); past 20 groups the colours repeat with another line style and
    marker.
    """
    tab20 = colormaps["tab20"].colors
    colours = tab20[0::2] + tab20[1::2]
    return [{"color": colours[i % 20], "linestyle": LINE_STYLES[i // 20 % 4], "marker": MARKERS[i // 20 % 4]}
            for i in range(n)]


@dataclass
class _Setup:
    """The results Dataset and the checked options: what every figure is drawn from."""

    ds: object  # xarray Dataset of the results store
    groups: dict  # legend label → boolean mask over prompt (prompts lacking the label are in no group)
    group_label: str | None  # the store's --groupby: the label of its group dim
    styles: dict  # legend label → style, the same in every figure
    n2: int
    k: int
    layers: list  # the chosen layers, sorted
    n_layers: int  # layers of the model (relative depth = layer / (n_layers - 1))

    @property
    def caption(self) -> str:
        model = os.path.basename(self.ds.attrs["source"]["model"].rstrip("/"))
        return f"{model}, {self.ds.sizes['prompt']} prompts"

    def group_key(self, value) -> str:
        return f"{self.group_label}={value}"


def model_layers(ds) -> int:
    """Layers of the model a results or lens store ``ds`` was computed from: embeddings and one per block."""
    return ds.attrs["source_attributes"]["model"]["n_layers"] + 1


def store_layers(ds, text: str | None) -> list:
    """The layers of ``ds`` that ``--layers`` ``text`` selects, sorted; all of them when ``text`` is None.

    The store's ``layer`` coordinate holds model layer numbers, all of them or a subset's; ``text`` is parsed
    against the model's layers (:func:`~toolkit.runtime.layers.parse_layers`). Raises :class:`UserError` when it
    selects none that the store holds.
    """
    held = [int(layer) for layer in ds.layer.values]
    if text is None:
        return held
    chosen = set(parse_layers(text, model_layers(ds)))
    rows = [layer for layer in held if layer in chosen]
    if not rows:
        raise UserError(f"--layers {text} selects none of the layers this store holds ({', '.join(map(str, held))}); "
                        f"choose among them")
    return rows


def _setup(ds, groupby, n2, k, layers) -> _Setup:
    """Check the options against ``ds`` (raising :class:`UserError`) and fix each group's style."""
    groupby = groupby or ds.attrs["parameters"].get("groupby")
    if groupby is not None and groupby not in ds.coords:
        labels = [c for c in ds.coords if c not in ds.indexes]
        raise UserError(f"unknown label {groupby!r} for --groupby; labels: {', '.join(labels)}")
    if "n2" in ds.dims and n2 not in ds.n2.values:
        raise UserError(f"--n2 {n2} is not a GRIDE scale of this store; scales: {', '.join(map(str, ds.n2.values))}")
    if "k" in ds.dims and k not in ds.k.values:
        raise UserError(f"--k {k} is outside the overlap sizes 1..{int(ds.k.max())}")
    n_layers = model_layers(ds)
    chosen = store_layers(ds, layers)
    if groupby is None:
        groups = {"all prompts": np.ones(ds.sizes["prompt"], dtype=bool)}
    else:
        labels = ds[groupby].values
        # Sorted by text, missing values (NaN, "") left out: the groups of repgeo summarize --groupby.
        values = sorted({str(v): v for v in labels.tolist() if v == v and v != ""}.items())
        groups = {f"{groupby}={text}": labels == value for text, value in values}
    group_label = ds.attrs["parameters"].get("groupby")
    # Group-dim figures (the store's --groupby) share the styles of the same values in per-prompt figures.
    keys = list(groups) + ([f"{group_label}={g}" for g in ds.group.values] if "group" in ds.dims else [])
    keys = list(dict.fromkeys(keys))
    return _Setup(ds=ds, groups=groups, group_label=group_label, styles=dict(zip(keys, group_styles(len(keys)))),
                  n2=n2, k=k, layers=chosen, n_layers=n_layers)


def _note(name: str, reason: str):
    print(f"repgeo plot: note: {name}.png not drawn: {reason}", file=sys.stderr)


def _why_empty(s: _Setup, name: str) -> str:
    if name.startswith("group_") and not s.ds.attrs.get("groups_done"):
        return ("the group observables are not computed yet; rerun repgeo summarize --resume once the activation "
                "store is complete")
    if not s.ds.done.values.any():
        return "no prompt is summarized yet; rerun repgeo summarize --resume"
    return f"{name} is NaN at every chosen layer"


def _curves(s: _Setup, da) -> dict:
    """Legend label → (mean, spread or None) along the dims of ``da`` after prompt (or group).

    Per-prompt variables: mean ± std over each group's prompts; group variables: one value per group.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN entries (e.g. overlap at the last layer)
        if "group" in da.dims:
            return {s.group_key(g): (da.sel(group=g).values, None) for g in da.group.values}
        values = da.values
        return {key: (np.nanmean(values[mask], axis=0), np.nanstd(values[mask], axis=0) if mask.sum() > 1 else None)
                for key, mask in s.groups.items()}


def _new_figure(n_panels: int, n_legend: int, panel_width: float, sharey: bool):
    """A figure of ``n_panels`` side by side, with room on the right for a legend of ``n_legend`` entries."""
    columns = 1 + (n_legend - 1) // 24 if n_legend > 1 else 0
    fig = Figure(figsize=(panel_width * n_panels + 1.9 * columns, 4.2), layout="constrained")
    return fig, fig.subplots(1, n_panels, sharey=sharey, squeeze=False)[0]


def _legend(fig, axes):
    """One legend for all panels, outside on the right, so that it never covers data."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if len(entries) > 1:
        fig.legend(entries.values(), entries.keys(), loc="outside right upper", fontsize=7,
                   ncol=1 + (len(entries) - 1) // 24, framealpha=0.8)


def _by_layer(s: _Setup, da, title: str, ylabel: str, reference: str | None = None):
    """``da`` (prompt or group, layer) against layer and relative depth; ``reference``: the legend key to mark."""
    depth = np.asarray(s.layers) / max(s.n_layers - 1, 1)
    curves = _curves(s, da)
    fig, axes = _new_figure(2, len(curves), 5.5, sharey=True)
    for key, (mean, spread) in curves.items():
        label = f"{key} (reference)" if key == reference else key
        for ax, x in zip(axes, (s.layers, depth)):
            ax.plot(x, mean, markersize=2.5, linewidth=1.4, label=label, **s.styles[key])
            if spread is not None:
                ax.fill_between(x, mean - spread, mean + spread, color=s.styles[key]["color"], alpha=0.15,
                                linewidth=0)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_xlabel("layer (0 = embeddings)")
    axes[1].set_xlabel("relative depth (layer / last layer)")
    axes[0].set_ylabel(ylabel)
    for ax in axes:
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    fig.suptitle(f"{title}\n{s.caption}" + (" (mean ± std over prompts)" if "prompt" in da.dims else ""),
                 fontsize=10)
    return fig


def _panel_layers(s: _Setup, da) -> list:
    """Up to MAX_PANELS of the chosen layers, spread evenly over those where ``da`` has a finite value."""
    finite = [layer for layer in s.layers if np.isfinite(da.sel(layer=layer).values).any()]
    picks = np.unique(np.round(np.linspace(0, len(finite) - 1, min(MAX_PANELS, len(finite)))).astype(int))
    return [finite[i] for i in picks]


def _against(s: _Setup, da, dim: str, title: str, xlabel: str, ylabel: str, log2: bool):
    """``da`` (prompt, layer, dim): mean over each group's prompts against ``dim``, one panel per picked layer."""
    layers = _panel_layers(s, da)
    fig, axes = _new_figure(len(layers), len(s.groups), 3.4, sharey=True)
    for ax, layer in zip(axes, layers):
        for key, (mean, _) in _curves(s, da.sel(layer=layer)).items():
            ax.plot(da[dim].values, mean, markersize=2.5, linewidth=1.4, label=key, **s.styles[key])
        if log2:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())  # 2, 4, 8 rather than 2^1, 2^2, 2^3
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"layer {layer} (depth {layer / max(s.n_layers - 1, 1):.2f})", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    _legend(fig, axes)
    fig.suptitle(f"{title}\n{s.caption} (mean over prompts)", fontsize=10)
    return fig


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the pairs where both are finite; NaN with fewer than 3 or a constant side."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _id_vs_loss(s: _Setup, ids, loss: np.ndarray):
    """Scatter of each prompt's GRIDE ID ``ids`` (prompt, layer) against its mean loss (prompt, nats)."""
    layers = _panel_layers(s, ids)
    fig, axes = _new_figure(len(layers), len(s.groups), 3.4, sharey=False)
    for ax, layer in zip(axes, layers):
        values = ids.sel(layer=layer).values
        for key, mask in s.groups.items():
            style = s.styles[key]
            ax.scatter(values[mask], loss[mask], s=14, alpha=0.75, color=style["color"], marker=style["marker"],
                       linewidths=0, label=key)
        ax.set_title(f"layer {layer}: r = {pearson(values, loss):.2f}", fontsize=9)
        ax.set_xlabel(f"GRIDE ID at n2 = {s.n2}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean token loss (nats)")
    _legend(fig, axes)
    fig.suptitle(f"Each prompt's intrinsic dimension against its loss (Pearson r over all prompts)\n{s.caption}",
                 fontsize=10)
    return fig


def figures(ds, groupby: str | None = None, n2: int = 32, k: int = 8, layers: str | None = None):
    """Check the options against the results Dataset ``ds``, then return an iterator of (file stem, Figure).

    Options as ``repgeo plot``: ``layers`` as :func:`store_layers` takes them (model layer numbers). Raises
    :class:`UserError` on a bad option before anything is drawn. Figures are drawn one at a time as the iterator is
    consumed; a figure whose variables are absent is left out, one whose values are all NaN at the chosen layers
    too, with a note on stderr.
    """
    return _draw(_setup(ds, groupby, n2, k, layers))


def _draw(s: _Setup):
    ds = s.ds
    for name, (title, ylabel) in TITLES.items():
        if name not in ds:
            continue
        da = ds[name].sel(layer=s.layers)
        if "n2" in da.dims:
            da, title = da.sel(n2=s.n2), f"{title} at n2 = {s.n2}"
        if "k" in da.dims:
            da, title = da.sel(k=s.k), f"{title}, k = {s.k}"
        da = da.load()
        if np.isnan(da.values).all():
            _note(name, _why_empty(s, name))
            continue
        reference = None
        if name == "group_kl":
            reference = s.group_key(ds.attrs["parameters"]["reference"])
            title = f"{title} {reference}: KL(group ‖ reference)"
        yield name, _by_layer(s, da, title, ylabel, reference)
    for name, (stem, dim, title, xlabel, ylabel, log2) in AGAINST.items():
        if name not in ds:
            continue
        da = ds[name].sel(layer=s.layers).load()
        if np.isnan(da.values).all():
            _note(stem, _why_empty(s, name))
            continue
        yield stem, _against(s, da, dim, title, xlabel, ylabel, log2)
    if "gride_id" in ds and "loss" in ds:
        ids = ds.gride_id.sel(layer=s.layers, n2=s.n2).load()
        loss = ds.loss.values.astype(np.float64)
        if np.isnan(ids.values).all():
            _note("gride_id_vs_loss", _why_empty(s, "gride_id"))
        elif np.isnan(loss).all():
            _note("gride_id_vs_loss", "no prompt has a loss")
        else:
            yield "gride_id_vs_loss", _id_vs_loss(s, ids, loss)


def plot_results(path: str, out_dir: str, groupby: str | None = None, n2: int = 32, k: int = 8,
                 layers: str | None = None) -> list:
    """Write the :func:`figures` of the results store at ``path`` as PNG files into ``out_dir``; return their paths."""
    from .store.results import open_results

    return save_figures(figures(open_results(path), groupby=groupby, n2=n2, k=k, layers=layers), out_dir)


def save_figures(drawn, out_dir: str, dpi: int = 110) -> list:
    """Save (file stem, Figure) pairs as ``out_dir/stem.png`` (creating the folder); return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, fig in drawn:
        target = os.path.join(out_dir, f"{name}.png")
        fig.savefig(target, dpi=dpi)
        written.append(target)
    return written


def plot_store(path: str, out_dir: str, **options) -> list:
    """Write the figures of the store at ``path`` into ``out_dir`` by its kind (:data:`KINDS`); return the paths of
    the files written.

    options: those ``repgeo plot`` was given (groupby, n2, k, layers, prompt, tokens, target, min_weight, model),
    None for one not given. Raises :class:`UserError`, before anything is written, for a store of a kind plot does
    not draw, and for an option the kind does not take or lacks.
    """
    import importlib

    from .store.zarr_io import open_zarr_group, repgeo_kind

    kind = repgeo_kind(open_zarr_group(path, "repgeo store"))
    if kind not in KINDS:
        what = f"a repgeo {kind} store" if kind else "not a repgeo store"
        drawn = ", ".join(f"{name} stores (from {made_by})" for name, (made_by, *_) in KINDS.items())
        raise UserError(f"{path} is {what}; repgeo plot draws {drawn}: give one of those")
    _, takes, requires, module, function = KINDS[kind]
    store = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} store"
    given = {name: value for name, value in options.items() if value is not None}
    for name in given:
        if name not in takes:
            allowed = ", ".join(_flag(option) for option in takes) or "no option but --out"
            raise UserError(f"{_flag(name)} does not apply to {path}, {store}; {store} takes {allowed}")
    for name in requires:
        if name not in given:
            raise UserError(f"{path} is {store}: give {_flag(name)}, which it requires")
    draw = getattr(importlib.import_module(f".{module}", __package__), function)
    return draw(path, out_dir, **given)


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")
