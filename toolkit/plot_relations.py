"""Figures of the relations stores: concept crystals, analogy accuracy and the Markov check (PNG files).

A relations store (``repgeo relations analogies``) gives ``crystals.png`` (the difference vectors object −
subject in 2-D, coloured by relation: principal components, then LDA directions; per embedding space and a few
layers), ``crystal_metrics.png`` (silhouettes, parallelogram cosines and the length distractor against layer),
``analogy_accuracy.png`` (hidden space, against layer, one line per relation) and
``analogy_accuracy_embeddings.png`` (input and output embeddings). A markov store gives ``markov_agreement.png``.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .errors import UserError
from .plot import group_styles, save_figures
from .runtime.layers import parse_layers

#: Hidden layers drawn as crystal panels.
MAX_CRYSTAL_LAYERS = 4
PREDICTOR_TITLES = {"averaged_delta": "averaged delta (leave one out)", "single_delta": "single delta (3CosAdd)",
                    "subject_only": "subject alone (baseline)"}
COMPARISON_TITLES = {"direct_bigram": "direct path\n= bigram successor", "model_bigram": "model\n= bigram successor",
                     "direct_identity": "direct path\n= x itself", "unigram_bigram": "most frequent tokens\n= bigram "
                                                                                      "successor"}


def relations_figures(path: str, out_dir: str, layers: str | None = None) -> list:
    """Write the figures of the relations or markov store at ``path`` into ``out_dir``; return the written paths.

    layers: hidden layers to draw (the grammar of `parse_layers`; default: every layer of the store); each must
    be a layer the store holds. Raises UserError before drawing on a bad option.
    """
    from .store.relations_results import MARKOV_KIND, open_relations_results

    ds = open_relations_results(path)
    if ds.attrs["repgeo"]["kind"] == MARKOV_KIND:
        if layers is not None:
            raise UserError(f"{path} is a markov store, which has no layers; drop --layers")
        drawn = [("markov_agreement", _markov(ds))]
    else:
        drawn = list(_relations(ds, _chosen_layers(ds, layers, path)))
    return save_figures(drawn, out_dir)


def _chosen_layers(ds, layers: str | None, path: str) -> list:
    if "layer" not in ds.dims:
        if layers is not None:
            raise UserError(f"{path} has no hidden space (computed with --spaces "
                            f"{','.join(ds.attrs['parameters']['spaces'])}); drop --layers")
        return []
    stored = [int(v) for v in ds.layer.values]
    if layers is None:
        return stored
    chosen = parse_layers(layers, ds.attrs["model"]["n_layers"] + 1)
    missing = [layer for layer in chosen if layer not in stored]
    if missing:
        raise UserError(f"--layers: layer {missing[0]} is not in {path}; its layers are "
                        f"{', '.join(map(str, stored))}")
    return chosen


def _caption(ds) -> str:
    model = os.path.basename(ds.attrs["model"]["id"].rstrip("/"))
    if "pairs" in ds.attrs:
        p = ds.attrs["pairs"]
        return f"{model}, {p['n_pairs']} pairs of {p['n_relations']} relations ({os.path.basename(p['path'])})"
    c = ds.attrs["corpus"]
    where = os.path.basename(c["path"].rstrip("/"))
    return f"{model}, the {ds.sizes['token_id']} most frequent tokens of {where} ({c['n_tokens']} tokens)"


def _embedding_panels(ds) -> list:
    """(space, title) of the embedding spaces to draw: one panel for both when the embeddings are tied."""
    if "space" not in ds.dims:
        return []
    spaces = [str(s) for s in ds.space.values]
    if ds.attrs["model"]["tied_embeddings"] and len(spaces) == 2:
        return [("input", "input = output embeddings (tied)")]
    return [(s, f"{s} embeddings") for s in spaces]


def _relations(ds, layers: list):
    relations = [str(r) for r in ds.relation.values]
    styles = dict(zip(relations, group_styles(len(relations))))
    yield "crystals", _crystals(ds, layers, relations, styles)
    if layers:
        yield "crystal_metrics", _crystal_metrics(ds, layers)
        yield "analogy_accuracy", _hidden_accuracy(ds, layers, relations, styles)
    if "space" in ds.dims:
        yield "analogy_accuracy_embeddings", _embedding_accuracy(ds, relations)


def _legend(fig, handles: dict):
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=7, framealpha=0.8)


def _crystal_layers(layers: list) -> list:
    picks = np.unique(np.round(np.linspace(0, len(layers) - 1, min(MAX_CRYSTAL_LAYERS, len(layers)))).astype(int))
    return [layers[i] for i in picks]


def _crystals(ds, layers: list, relations: list, styles: dict):
    """Rows: PCA of the differences, LDA of the differences; columns: embedding spaces, then a few layers."""
    panels = [(title, {"pca": ds.crystal_pca.sel(space=s), "lda": ds.crystal_lda.sel(space=s),
                       "sil": ds.silhouette_all.sel(space=s), "sil_lda": ds.silhouette_lda_all.sel(space=s),
                       "used": ds.pair_used.sel(space=s).values})
              for s, title in _embedding_panels(ds)]
    panels += [(f"layer {layer}", {"pca": ds.hidden_crystal_pca.sel(layer=layer),
                                   "lda": ds.hidden_crystal_lda.sel(layer=layer),
                                   "sil": ds.hidden_silhouette_all.sel(layer=layer),
                                   "sil_lda": ds.hidden_silhouette_lda_all.sel(layer=layer),
                                   "used": np.ones(ds.sizes["pair"], dtype=bool)})
               for layer in _crystal_layers(layers)]
    fig = Figure(figsize=(3.3 * len(panels) + 1.9, 6.8), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False)
    labels = ds.pair_relation.values
    in_fit = ds.in_fit.values
    handles = {}
    n_lda = ds.sizes["lda_component"]
    for column, (title, p) in enumerate(panels):
        for row, (key, sil) in enumerate((("pca", "sil"), ("lda", "sil_lda"))):
            ax = axes[row, column]
            xy = p[key].values
            if xy.shape[1] == 1:  # one LDA direction: spread the points on a line
                xy = np.column_stack([xy[:, 0], np.zeros(len(xy))])
            for relation in relations:
                mine = (labels == relation) & p["used"] & np.isfinite(xy[:, 0])
                if not mine.any():
                    continue
                colour = styles[relation]["color"]
                # Held-out pairs (the ones scored) filled; the pairs the LDA was fitted on hollow.
                ax.scatter(xy[mine & ~in_fit, 0], xy[mine & ~in_fit, 1], s=13, color=colour, linewidths=0,
                           label=relation)
                ax.scatter(xy[mine & in_fit, 0], xy[mine & in_fit, 1], s=13, facecolors="none", edgecolors=colour,
                           linewidths=0.8)
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
            what = "PCA of object − subject" if key == "pca" else f"LDA ({n_lda} directions; first 2 shown)"
            ax.set_title(f"{title}\n{what}\nsilhouette {float(p[sil]):.2f}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        axes[0, column].set_xlabel("PC 1", fontsize=7)
        axes[1, column].set_xlabel("LD 1", fontsize=7)
    axes[0, 0].set_ylabel("PC 2", fontsize=8)
    axes[1, 0].set_ylabel("LD 2", fontsize=8)
    _legend(fig, handles)
    fig.suptitle(f"Concept crystals: difference vectors coloured by relation (filled: held-out pairs, hollow: "
                 f"pairs the LDA was fitted on; silhouette of the held-out pairs)\n{_caption(ds)}", fontsize=10)
    return fig


def _nanmean(values, axis):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # relations with too few pairs are NaN
        return np.nanmean(values, axis=axis)


def _crystal_metrics(ds, layers: list):
    h = ds.sel(layer=layers)
    fig = Figure(figsize=(14.5, 4.0), layout="constrained")
    axes = fig.subplots(1, 3)
    series = [
        (axes[0], "silhouette of held-out pairs", [("before LDA", h.hidden_silhouette_all.values, "silhouette_all"),
                                                   ("after LDA", h.hidden_silhouette_lda_all.values,
                                                    "silhouette_lda_all")]),
        (axes[1], "mean cosine of difference vectors",
         [("same relation", _nanmean(h.hidden_parallelogram_cosine.values, 1), "parallelogram_cosine"),
          ("other relations", _nanmean(h.hidden_parallelogram_cosine_other.values, 1),
           "parallelogram_cosine_other")]),
        (axes[2], "|r| of PC 1 with the length difference",
         [("characters", h.hidden_distractor_length_corr.values, "distractor_length_corr"),
          ("tokens", h.hidden_distractor_token_corr.values, None)]),
    ]
    spaces = _embedding_panels(ds)
    for ax, ylabel, lines in series:
        for i, (label, values, embedding_name) in enumerate(lines):
            colour = f"C{i}"
            ax.plot(layers, values, marker="o", markersize=3, linewidth=1.4, color=colour, label=f"{label}: hidden")
            for space, title in spaces[:1]:  # the embedding value as a level to compare the layers with
                if embedding_name is not None:
                    value = ds[embedding_name].sel(space=space).values
                    ax.axhline(float(_nanmean(value, None)), color=colour, linestyle="--", linewidth=1,
                               label=f"{label}: {title}")
        ax.set_xlabel("layer (0 = embedding output)")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Concept crystals against layer (cosines: mean over relations)\n{_caption(ds)}",
                 fontsize=10)
    return fig


def _hidden_accuracy(ds, layers: list, relations: list, styles: dict):
    """Rows: k = 1 and k = --top-k; columns: predictors; one line per relation and their mean."""
    h = ds.hidden_analogy_accuracy.sel(layer=layers)
    ks = [int(k) for k in ds.k.values]
    predictors = [str(p) for p in ds.predictor.values]
    fig = Figure(figsize=(4.2 * len(predictors) + 2.0, 3.3 * len(ks) + 0.6), layout="constrained")
    axes = fig.subplots(len(ks), len(predictors), sharex=True, sharey=True, squeeze=False)
    handles = {}
    for row, k in enumerate(ks):
        for column, predictor in enumerate(predictors):
            ax = axes[row, column]
            values = h.sel(k=k, predictor=predictor).values  # (layer, relation)
            for r, relation in enumerate(relations):
                ax.plot(layers, values[:, r], linewidth=1.0, markersize=2.5, alpha=0.85, label=relation,
                        **styles[relation])
            ax.plot(layers, _nanmean(values, 1), color="black", linewidth=2.4, label="mean over relations")
            ax.set_title(f"{PREDICTOR_TITLES.get(predictor, predictor)}, top-{k}", fontsize=9)
            ax.set_ylim(-0.03, 1.03)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        axes[row, 0].set_ylabel(f"accuracy (top-{k})")
    for ax in axes[-1]:
        ax.set_xlabel("layer (0 = embedding output)")
    _legend(fig, handles)
    n_words = ds.sizes["word"]
    fig.suptitle(f"Analogies in the hidden space: nearest of the file's {n_words} words (cosine) to subject + "
                 f"delta, the subject excluded\n{_caption(ds)}", fontsize=10)
    return fig


def _embedding_accuracy(ds, relations: list):
    """Per embedding space: grouped bars per relation (predictors), top-1 solid and top-k pale behind."""
    panels = _embedding_panels(ds)
    ks = [int(k) for k in ds.k.values]
    predictors = [str(p) for p in ds.predictor.values]
    fig = Figure(figsize=(max(9.0, 0.75 * len(relations) + 3), 3.6 * len(panels) + 0.8), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    x = np.arange(len(relations))
    width = 0.8 / len(predictors)
    for ax, (space, title) in zip(axes, panels):
        acc = ds.analogy_accuracy.sel(space=space)
        used = ds.n_pairs_used.sel(space=space).values
        for i, predictor in enumerate(predictors):
            at = x - 0.4 + width * (i + 0.5)
            if len(ks) > 1:
                ax.bar(at, acc.sel(predictor=predictor, k=ks[-1]).values, width, color=f"C{i}", alpha=0.3,
                       label=f"{PREDICTOR_TITLES.get(predictor, predictor)}, top-{ks[-1]}")
            ax.bar(at, acc.sel(predictor=predictor, k=1).values, width, color=f"C{i}",
                   label=f"{PREDICTOR_TITLES.get(predictor, predictor)}, top-1")
        ax.set_xticks(x, [f"{r}\n({u} of {n} pairs)" for r, u, n in zip(relations, used, ds.n_pairs.values)],
                      fontsize=7, rotation=30, ha="right")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("accuracy")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    handles = dict(zip(*reversed(axes[0].get_legend_handles_labels())))
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", fontsize=7, ncol=len(predictors))
    fig.suptitle(f"Analogies in the embedding spaces: nearest token of the whole vocabulary (cosine) to subject + "
                 f"delta, the subject excluded\npairs of one-token words only (no bar: fewer than 3 such pairs)\n"
                 f"{_caption(ds)}", fontsize=10)
    return fig


def _markov(ds):
    """Agreement bars (k = 1 and 5) and the distribution of KL(bigram ‖ model)."""
    fig = Figure(figsize=(13.0, 4.4), layout="constrained")
    ax, hist = fig.subplots(1, 2, width_ratios=[1.6, 1])
    comparisons = [str(c) for c in ds.comparison.values]
    ks = [int(k) for k in ds.k.values]
    x = np.arange(len(comparisons))
    width = 0.8 / len(ks)
    for i, k in enumerate(ks):
        values = ds.markov_agreement.sel(k=k).values
        bars = ax.bar(x - 0.4 + width * (i + 0.5), values, width, color=f"C{i}", label=f"target among the first {k}")
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(x, [COMPARISON_TITLES.get(c, c) for c in comparisons], fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of tokens x")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    tied = " (tied embeddings)" if ds.attrs["model"]["tied_embeddings"] else ""
    ax.set_title(f"Direct path = argmax unembedding · input embedding[x]{tied}; model = its next token after "
                 f"x alone", fontsize=9)
    kl = ds.markov_kl.values
    kl = kl[np.isfinite(kl)]
    minimum = ds.attrs["parameters"]["min_count"]
    if len(kl):
        hist.hist(kl, bins=min(40, max(5, len(kl) // 5)), color="C2")
        hist.axvline(float(np.median(kl)), color="black", linestyle="--", linewidth=1,
                     label=f"median {np.median(kl):.2f} nats")
        hist.legend(fontsize=8)
    else:
        hist.text(0.5, 0.5, f"no token x has {minimum} successors", ha="center", va="center",
                  transform=hist.transAxes)
    hist.set_xlabel("KL(bigram ‖ model) after x (nats)")
    hist.set_ylabel("tokens x")
    hist.set_title(f"{len(kl)} tokens x with at least {minimum} successors", fontsize=9)
    hist.grid(alpha=0.3)
    fig.suptitle(f"First-order Markov check\n{_caption(ds)}", fontsize=10)
    return fig
