"""The concepts study ("The Geometry of Concepts: Sparse Autoencoder Feature Structure", Li et al. 2024): TopK SAEs
trained on an early, a middle and a late layer; their features' co-occurrence lobes under the five affinities, how
much geometric information those lobes carry, and the galaxy spectra (covariance eigenvalues against rank) of the
decoder directions and of the feature activations.

The study's own choices followed here: co-occurrence of SAE features within blocks of 256 tokens (at ``--scale
full``; smaller blocks at the smaller scales, whose corpora would give too few blocks), the five affinities
(simple matching, Jaccard, Dice, overlap, phi), spectral clustering into lobes, adjusted mutual information (AMI)
between lobes and k-means clusters of the decoder directions and a logistic regression predicting the lobe from the
decoder direction, compared over a range of lobe counts; lobes measured at a middle layer (as the study did, on
Gemma-2-2b); the galaxy claims about the point cloud of SAE features, i.e. the decoder directions, across
layers. Its SAEs were pretrained (Gemma Scope, 16k features); here they are trained on the study's corpus.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from ...errors import UserError
from ...observables.cooccurrence import AFFINITIES
from ...store.sae_results import CLOUDS
from ..corpora import speeches, user_corpus, write_prompts
from ..findings import FAILS, HOLDS, NO_DATA, across_variants, verdict_of
from ..stages import EXTRACT, Stage, is_complete
from . import model_specs, path, relative_depth

TITLE = "the geometry of concepts"
DESCRIPTION = ("TopK sparse autoencoders trained on an early, a middle and a late layer (nearest 1/6, 1/2 and 5/6 of "
               "the hidden layers). For each: feature co-occurrence in blocks of tokens, lobes (spectral clusters) "
               "under five affinities and how much they say about where the features' decoder directions lie (AMI "
               "against a label-permutation null, logistic regression against random directions), and the galaxy "
               "spectra: covariance eigenvalues against rank of the decoder directions and of the feature "
               "activations, their power-law slopes, and isotropic Gaussian clouds of the same shapes. Verdicts on "
               "the study's own choices (lobes at the middle layer over every lobe count; the decoder cloud); every "
               "layer, lobe count and the activation cloud are reported as variants.")
LABELS = ()
#: Relative depths of the early, middle and late layer (of the L hidden layers; layer 0 is the embeddings).
DEPTHS = (1 / 6, 1 / 2, 5 / 6)
POSITIONS = ("early", "middle", "late")
#: Per scale: prompts taken from the corpus (None: all), tokens per prompt (longer cut, shorter dropped), SAE
#: features, active features per token (k), training epochs, tokens per co-occurrence block, lobe counts, label
#: permutations of the AMI null. Epochs: enough passes for the SAE to explain ~90 % of the variance of the small
#: corpus (4 epochs: 78 %). Small: 12 × 1024 tokens give 48 blocks of the study's 256 tokens, with most of 2048
#: features in nearly every block (phi undefined for those that occur in all), so 96 blocks of 128 there.
SCALES = {"tiny": {"prompts": 2, "tokens": 256, "features": 256, "k": 8, "epochs": 25, "block": 64,
                   "clusters": (2, 4), "permutations": 20},
          "small": {"prompts": 12, "tokens": 1024, "features": 2048, "k": 32, "epochs": 10, "block": 128,
                    "clusters": (2, 4, 8), "permutations": 100},
          "full": {"prompts": None, "tokens": 1536, "features": 4096, "k": 32, "epochs": 10, "block": 256,
                   "clusters": (2, 4, 8), "permutations": 100}}
PHI = "phi"
#: AMI above the permutation null: z beyond the two-sided 5 % point of a normal.
Z_CRITICAL = 1.96
#: "Far from isotropic": the spectra differ by more than this factor on average over the fit ranks (fixed before
#: measuring).
ISOTROPY_FACTOR = 2.0
STORE = "activations.zarr"


def settings(args) -> dict:
    s = {"model": model_specs(args.model, "smollm2-135m")[0], "corpus": args.corpus or "bundled speeches",
         "scale": args.scale, **SCALES[args.scale], "relative_depths": list(DEPTHS), "seed": 0}
    s["tokens"] = args.min_tokens or s["tokens"]
    s["clusters"] = list(s["clusters"])
    if s["tokens"] < s["block"]:  # no prompt would hold a whole block: nothing to count co-occurrence over
        raise UserError(f"--min-tokens {s['tokens']} is shorter than the concepts study's co-occurrence block "
                        f"({s['block']} tokens at --scale {args.scale}); give at least {s['block']}")
    return s


def prepare(out: str, s: dict):
    prompts = speeches() if s["corpus"] == "bundled speeches" else user_corpus(s["corpus"], LABELS, "concepts")
    write_prompts(path(out, "prompts.jsonl"), prompts[:s["prompts"]])


def hidden_layers(out: str, s: dict) -> int:
    """L, the model's number of hidden layers: as the activation store records it once extraction is complete,
    before that from the model's config (no weights loaded; a few seconds for a GGUF file)."""
    store = path(out, STORE)
    if is_complete(store):
        from ...store.validate import open_store

        return int(open_store(store)[0].attrs["model"]["n_layers"])
    from ...models import model_shape, resolve_model

    return model_shape(resolve_model(s["model"]))[0]


def study_layers(n_layers: int) -> tuple:
    """The early, middle and late layer: L · depth rounded half up, for each of DEPTHS."""
    layers = tuple(math.floor(n_layers * depth + 0.5) for depth in DEPTHS)
    if len(set(layers)) < len(layers):
        raise UserError(f"the model has {n_layers} hidden layers: too few for distinct early, middle and late layers "
                        f"(the concepts study needs at least 3)")
    return layers


def sae_path(out: str, layer: int) -> str:
    return path(out, f"sae-layer{layer}")


def cooccurrence_path(out: str, layer: int) -> str:
    return path(out, f"cooccurrence-layer{layer}.zarr")


def stages(out: str, s: dict) -> list:
    """Extract, then per layer: train the SAE, count co-occurrence and analyse it (neither command resumes: each
    builds its output aside and moves it into place when whole, so a stage is either complete or rerun)."""
    store, tokens = path(out, STORE), str(s["tokens"])
    result = [Stage("extract", store, ("extract", "--model", s["model"], "--prompts", path(out, "prompts.jsonl"),
                                       "--out", store, "--max-tokens", tokens, "--min-tokens", tokens), phase=EXTRACT)]
    for layer in study_layers(hidden_layers(out, s)):
        sae, results = sae_path(out, layer), cooccurrence_path(out, layer)
        result.append(Stage(f"sae train (layer {layer})", sae, (
            "sae", "train", "--store", store, "--layer", str(layer), "--out", sae, "--features", str(s["features"]),
            "--k", str(s["k"]), "--epochs", str(s["epochs"]), "--seed", str(s["seed"])), resume=False))
        result.append(Stage(f"sae cooccurrence (layer {layer})", results, (
            "sae", "cooccurrence", "--store", store, "--sae", sae, "--layer", str(layer), "--out", results,
            "--block", str(s["block"]), "--clusters", ",".join(map(str, s["clusters"])),
            "--permutations", str(s["permutations"]), "--seed", str(s["seed"])), cluster=True, resume=False))
    return result


def open_cooccurrence(out: str, layer: int):
    import xarray as xr

    return xr.open_zarr(cooccurrence_path(out, layer))


def explained_variance(out: str, layer: int) -> float:
    """The SAE's explained variance over the layer's tokens, as ``repgeo sae train`` recorded it."""
    with open(os.path.join(sae_path(out, layer), "cfg.json"), encoding="utf-8") as f:
        return float(json.load(f)["repgeo"]["evaluation"]["explained_variance"])


def _value(ds, name: str, **where) -> float:
    return float(ds[name].sel(**where).values)


def _best_other(ds, name: str, n_clusters: int) -> tuple:
    """(affinity, value) with the largest finite ``name`` among the affinities other than phi; (None, NaN) if none."""
    values = {m: _value(ds, name, metric=m, n_clusters=n_clusters) for m in AFFINITIES if m != PHI}
    finite = {m: v for m, v in values.items() if np.isfinite(v)}
    if not finite:
        return None, math.nan
    best = max(finite, key=finite.get)
    return best, finite[best]


#: The parts of the lobe rule, each true or false in a lobe count's numbers.
CHECKS = ("ami_above_null", "ami_largest", "logreg_above_random", "logreg_largest")


def lobe_outcome(ds, n_clusters: int) -> tuple:
    """(verdict, numbers) of the lobe rule at one layer and lobe count."""
    phi = {name: _value(ds, name, metric=PHI, n_clusters=n_clusters) for name in
           ("lobe_ami", "lobe_ami_z", "lobe_logreg_accuracy", "lobe_logreg_random_accuracy")}
    other_ami, best_ami = _best_other(ds, "lobe_ami", n_clusters)
    other_logreg, best_logreg = _best_other(ds, "lobe_logreg_accuracy", n_clusters)
    numbers = {"phi_ami": phi["lobe_ami"], "best_other_ami": best_ami, "phi_ami_z": phi["lobe_ami_z"],
               "phi_logreg": phi["lobe_logreg_accuracy"], "best_other_logreg": best_logreg,
               "random_direction_logreg": phi["lobe_logreg_random_accuracy"], "best_other_ami_affinity": other_ami,
               "best_other_logreg_affinity": other_logreg}
    if not np.isfinite(list(phi.values()) + [best_ami, best_logreg]).all():
        return NO_DATA, numbers
    checks = dict(zip(CHECKS, (phi["lobe_ami_z"] > Z_CRITICAL, phi["lobe_ami"] > best_ami,
                               phi["lobe_logreg_accuracy"] > phi["lobe_logreg_random_accuracy"],
                               phi["lobe_logreg_accuracy"] > best_logreg)))
    return verdict_of(all(checks.values())), dict(numbers, **checks)


def all_counts_outcome(ds, layer: int, by_count: dict, explained: float) -> tuple:
    """(verdict, numbers) over every lobe count of a layer: fails where one count fails, else not enough data where
    one count has none, else holds. ``failed`` names, per lobe count, the parts of the rule that failed."""
    verdicts = {n: outcome[0] for n, outcome in by_count.items()}
    verdict = FAILS if FAILS in verdicts.values() else NO_DATA if NO_DATA in verdicts.values() else HOLDS
    failed = {n: [c for c in CHECKS if numbers.get(c) is False] for n, (_, numbers) in by_count.items()}
    numbers = {"layer": layer, "holds_at_lobes": ", ".join(str(n) for n, v in verdicts.items() if v == HOLDS) or "none",
               "failed": "; ".join(f"{n} lobes: {', '.join(c)}" for n, c in failed.items() if c) or "nothing",
               "blocks": int(ds.n_blocks.values), "sae_explained_variance": explained}
    return verdict, numbers


LOBE_CLAIM = ("Phi-coefficient lobes carry more geometric information (AMI, logistic regression) than random and "
              "than the other affinities")
LOBE_RULE = (f"holds when, at the middle layer and at every lobe count of the run (the study compares the affinities "
             f"over a range of lobe counts), phi's lobes have an AMI with k-means clusters of the unit decoder "
             f"directions above the label-permutation null (z > {Z_CRITICAL}) and larger than that of each other "
             f"affinity's lobes, and a 5-fold balanced logistic-regression accuracy (lobe from decoder direction) "
             f"above that from random directions and above each other affinity's; not enough data where phi or all "
             f"other affinities have no lobes or no score. Variants: each layer, each lobe count alone")
SLOPE_CLAIM = "The power-law slope of the galaxy spectrum is steepest in the middle layer"
SLOPE_RULE = ("holds when the power-law slope of the decoder-direction cloud's covariance spectrum (least squares of "
              "log eigenvalue on log rank over ranks 10 … half the numerical rank) is more negative at the middle "
              "layer than at both the early and the late layer. Variant: the feature-activation cloud")
ISOTROPY_CLAIM = "The decoder cloud is far from an isotropic Gaussian of the same shape"
ISOTROPY_RULE = (f"holds when at each of the three layers the decoder-direction cloud's covariance spectrum and that "
                 f"of an isotropic Gaussian cloud of the same shape (points × dimensions), both as fractions of their "
                 f"total variance, differ by more than a factor {ISOTROPY_FACTOR:g} on average over the power-law fit "
                 f"ranks: mean |ln(λ_r/Σλ) − ln(λiso_r/Σλiso)| > ln {ISOTROPY_FACTOR:g}. Variant: the "
                 f"feature-activation cloud")


def lobes_finding(out: str, by_layer: dict):
    layers = list(by_layer)
    middle = layers[1]
    outcomes = {}
    for layer, ds in by_layer.items():
        by_count = {int(n): lobe_outcome(ds, int(n)) for n in ds.n_clusters.values}
        outcomes.update({(layer, n): o for n, o in by_count.items()})
        outcomes[(layer, "all")] = all_counts_outcome(ds, layer, by_count, explained_variance(out, layer))
    axes = {"layer": lambda v: v[0], "lobes": lambda v: v[1]}
    return across_variants(LOBE_CLAIM, LOBE_RULE, outcomes, (middle, "all"), axes)


def variance_fractions(ds, cloud: str, name: str = "galaxy_eigenvalues") -> np.ndarray:
    """A cloud's covariance eigenvalues (``name``: its own or its isotropic Gaussian's), largest first, as fractions
    of their sum, the total variance (dimensionless), without the NaN padding past its dimension; empty where the
    cloud has no variance."""
    values = ds[name].sel(cloud=cloud).values
    values = values[np.isfinite(values)]
    return values / values.sum() if values.sum() > 0 else values[:0]


def fit_range(ds, cloud: str) -> tuple:
    """(first, last) ranks (1-based, inclusive) of the cloud's power-law fit; (-1, -1) where there was none."""
    return int(ds.galaxy_fit_first.sel(cloud=cloud).values), int(ds.galaxy_fit_last.sel(cloud=cloud).values)


def log_distance_to_isotropic(ds, cloud: str) -> float:
    """Mean |ln(λ_r/Σλ) − ln(λiso_r/Σλiso)| over the fit ranks: how far the cloud's spectrum, as fractions of
    its total variance, lies from that of the isotropic Gaussian of its shape (0: the same; ln 2: a factor 2 on
    average). NaN without a fit range or with a zero eigenvalue in it."""
    first, last = fit_range(ds, cloud)
    lam, iso = variance_fractions(ds, cloud), variance_fractions(ds, cloud, "galaxy_isotropic_eigenvalues")
    if first < 1 or last > min(lam.size, iso.size):
        return math.nan
    a, b = lam[first - 1:last], iso[first - 1:last]
    if not ((a > 0).all() and (b > 0).all()):
        return math.nan
    return float(np.abs(np.log(a) - np.log(b)).mean())


def slope_outcome(by_layer: dict, cloud: str) -> tuple:
    slopes = {layer: _value(ds, "galaxy_slope", cloud=cloud) for layer, ds in by_layer.items()}
    numbers = {f"slope_layer{layer}": v for layer, v in slopes.items()}
    numbers.update({f"isotropic_slope_layer{layer}": _value(ds, "galaxy_isotropic_slope", cloud=cloud)
                    for layer, ds in by_layer.items()})
    if not np.isfinite(list(slopes.values())).all():
        return NO_DATA, numbers
    early, middle, late = slopes.values()
    return verdict_of(middle < early and middle < late), numbers


def isotropy_outcome(by_layer: dict, cloud: str) -> tuple:
    distances = {layer: log_distance_to_isotropic(ds, cloud) for layer, ds in by_layer.items()}
    numbers = {f"mean_abs_log_ratio_layer{layer}": v for layer, v in distances.items()}
    numbers["threshold"] = math.log(ISOTROPY_FACTOR)
    for layer, ds in by_layer.items():
        numbers[f"slope_layer{layer}"] = _value(ds, "galaxy_slope", cloud=cloud)
        numbers[f"isotropic_slope_layer{layer}"] = _value(ds, "galaxy_isotropic_slope", cloud=cloud)
    if not np.isfinite(list(distances.values())).all():
        return NO_DATA, numbers
    return verdict_of(all(d > math.log(ISOTROPY_FACTOR) for d in distances.values())), numbers


def _by_layer(out: str, s: dict) -> dict:
    return {layer: open_cooccurrence(out, layer) for layer in study_layers(hidden_layers(out, s))}


def findings(out: str, s: dict) -> list:
    by_layer = _by_layer(out, s)
    clouds = {"cloud": lambda v: v}
    return [lobes_finding(out, by_layer),
            across_variants(SLOPE_CLAIM, SLOPE_RULE, {c: slope_outcome(by_layer, c) for c in CLOUDS}, "decoder",
                            clouds),
            across_variants(ISOTROPY_CLAIM, ISOTROPY_RULE, {c: isotropy_outcome(by_layer, c) for c in CLOUDS},
                            "decoder", clouds)]


def figures(out: str, s: dict, directory: str) -> list:
    from ...plot import save_figures

    by_layer = _by_layer(out, s)
    n_layers = hidden_layers(out, s)
    drawn = [("lobes", lobes_figure(out, by_layer)), ("galaxy_spectra", spectra_figure(by_layer)),
             ("galaxy_slopes", slopes_figure(by_layer, n_layers))]
    return save_figures(drawn, directory)


def _title(layer: int, position: str) -> str:
    return f"layer {layer} ({position})"


def lobes_figure(out: str, by_layer: dict):
    """Per layer (columns): AMI of each affinity's lobes with k-means clusters of the decoder directions (top), and
    the balanced accuracy of predicting the lobe from the decoder direction, solid, and from random directions,
    dashed (bottom), against the lobe count. Phi, the study's affinity, drawn thick."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(2, len(by_layer), sharex=True, sharey="row", squeeze=False)
    colours = dict(zip(AFFINITIES, ("tab:blue", "tab:orange", "tab:green", "tab:purple", "black")))
    for column, ((layer, ds), position) in enumerate(zip(by_layer.items(), POSITIONS)):
        counts = ds.n_clusters.values
        top, bottom = axes[0, column], axes[1, column]
        for metric in AFFINITIES:
            style = {"color": colours[metric], "linewidth": 2.4 if metric == PHI else 1.1, "marker": "o",
                     "markersize": 4}
            top.plot(counts, ds.lobe_ami.sel(metric=metric).values, label=metric, **style)
            bottom.plot(counts, ds.lobe_logreg_accuracy.sel(metric=metric).values, **style)
            bottom.plot(counts, ds.lobe_logreg_random_accuracy.sel(metric=metric).values, color=colours[metric],
                        linestyle="--", linewidth=0.8)
        bottom.plot([], [], color="grey", linestyle="--", linewidth=0.8, label="random directions")
        bottom.plot(counts, 1 / counts, color="grey", linestyle=":", linewidth=1, label="chance (1 / lobes)")
        top.axhline(0, color="grey", linewidth=0.8)
        top.set_title(f"{_title(layer, position)}, SAE explained variance {explained_variance(out, layer):.2f}",
                      fontsize=9)
        bottom.set_xlabel("lobes")
        bottom.set_xscale("log", base=2)
        bottom.set_xticks(counts, [str(n) for n in counts])
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("AMI (lobes, decoder k-means)")
    axes[1, 0].set_ylabel("logistic regression balanced accuracy")
    axes[0, -1].legend(fontsize=7, loc="best")
    axes[1, -1].legend(fontsize=7, loc="best")
    fig.suptitle("Co-occurrence lobes against decoder geometry, per affinity", fontsize=10)
    return fig


def spectra_figure(by_layer: dict):
    """Covariance spectra as fractions of total variance against rank (log-log), per cloud (rows) and layer
    (columns), with the isotropic Gaussian of the same shape (grey), the fit ranks (shaded) and the fitted power
    law (dashed). Drawn up to twice the last fit rank, the numerical rank: past it lie rounding-level values."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 7), layout="constrained")
    axes = fig.subplots(len(CLOUDS), len(by_layer), squeeze=False)
    for column, ((layer, ds), position) in enumerate(zip(by_layer.items(), POSITIONS)):
        for row, cloud in enumerate(CLOUDS):
            ax = axes[row, column]
            first, last = fit_range(ds, cloud)
            shown = slice(0, 2 * last if first > 0 else None)
            lam = variance_fractions(ds, cloud)[shown]
            iso = variance_fractions(ds, cloud, "galaxy_isotropic_eigenvalues")[shown]
            ax.loglog(np.arange(1, lam.size + 1), lam, color="tab:blue", linewidth=1.5, label=cloud)
            ax.loglog(np.arange(1, iso.size + 1), iso, color="grey", linewidth=1.2, label="isotropic Gaussian")
            slope = _value(ds, "galaxy_slope", cloud=cloud)
            if first > 0 and np.isfinite(slope):
                ax.axvspan(first, last, color="tab:blue", alpha=0.07)
                ranks = np.array([first, last])
                # The fitted line through the spectrum's geometric mean over the fit ranks (the fit's own intercept).
                anchor = np.exp(np.mean(np.log(lam[first - 1:last])) - slope * np.mean(
                    np.log(np.arange(first, last + 1))))
                ax.loglog(ranks, anchor * ranks ** slope, color="tab:red", linestyle="--", linewidth=1.2,
                          label=f"slope {slope:.2f} (isotropic "
                                f"{_value(ds, 'galaxy_isotropic_slope', cloud=cloud):.2f})")
            ax.set_title(f"{cloud}, {_title(layer, position)}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="lower left")
            if row == len(CLOUDS) - 1:
                ax.set_xlabel("rank")
            if column == 0:
                ax.set_ylabel("eigenvalue / total variance")
    fig.suptitle("Galaxy spectra: covariance eigenvalues against rank", fontsize=10)
    return fig


def slopes_figure(by_layer: dict, n_layers: int):
    """Power-law slope of each cloud's spectrum (solid) and of its isotropic Gaussian (dashed) against relative
    depth (layer / L)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    layers = list(by_layer)
    depth = relative_depth(layers, n_layers)
    for cloud, colour in zip(CLOUDS, ("tab:blue", "tab:orange")):
        ax.plot(depth, [_value(ds, "galaxy_slope", cloud=cloud) for ds in by_layer.values()], marker="o",
                color=colour, linewidth=2.2 if cloud == "decoder" else 1.2, label=cloud)
        ax.plot(depth, [_value(ds, "galaxy_isotropic_slope", cloud=cloud) for ds in by_layer.values()], marker=".",
                color=colour, linestyle="--", linewidth=0.9, label=f"{cloud}: isotropic Gaussian")
    ax.set_xticks(depth, [f"{x:.2f}\nlayer {layer}" for x, layer in zip(depth, layers)])
    ax.set_xlabel("relative depth (layer / L)")
    ax.set_ylabel("power-law slope of the spectrum")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("Galaxy slope against depth (more negative: steeper)", fontsize=10)
    return fig
