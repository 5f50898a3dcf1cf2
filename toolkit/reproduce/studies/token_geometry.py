"""The token-geometry study ("The Geometry of Tokens in Internal Representations of LLMs"): intrinsic dimension,
neighbourhood overlap and cosine similarity of each prompt's token cloud across layers, for the prompts and for
their block-shuffled versions (4^s blocks at shuffle level s), and the ID–loss correlation.

The study's own choices followed here (its public code, ``RitAreaSciencePark/token_geometry``): the embedding layer
is left out (layers 1 … L); GRIDE is read at a small neighbourhood rank (its figures use the second range-scaling
step, n2 = 4); the ID–loss correlation is Pearson's on log ID against the prompt's mean loss, on the unshuffled
prompts. Every finding is also measured at every other n2 and without the first token (``--skip-tokens 1``).
"""

from __future__ import annotations

import numpy as np

from ..corpora import speeches, user_corpus, write_prompts
from ..findings import (NO_DATA, across_variants, correlation, decided_greater, decided_positive, no_data,
                        paired_greater, verdict_of)
from ..stages import EXTRACT, Stage
from . import gride_variants, mean_over, model_specs, path, relative_depth

TITLE = "the geometry of tokens"
DESCRIPTION = ("Intrinsic dimension (GRIDE), neighbourhood overlap and cosine similarity of each prompt's token cloud "
               "against depth, for prompts of equal length and their block-shuffled versions (shuffle level s: the "
               "tokens cut into 4^s blocks put in a seeded random order), and the correlation of the ID with the "
               "prompt's loss. Layer 0 (the embeddings) is left out; the verdict is taken at n2 = 4 with every "
               "token, as the study did, and every finding is measured at every GRIDE scale and without the first "
               "token as well.")
LABELS = ()
LEVELS = (0, 1, 2, 3, 4)
PRIMARY_N2 = 4
OVERLAP_K = 8
#: "Early-to-middle": the peak lies at a relative depth of at most this (fixed before measuring).
PEAK_DEPTH = 0.6
#: Per scale: prompts taken from the corpus (None: all) and tokens per prompt (longer cut, shorter dropped).
SCALES = {"tiny": (2, 256), "small": (8, 1024), "full": (None, 1024)}
SKIPS = (0, 1)
SKIP_NAMES = {0: "kept", 1: "left out"}


def settings(args) -> dict:
    n_prompts, tokens = SCALES[args.scale]
    return {"model": model_specs(args.model, "smollm2-135m")[0], "corpus": args.corpus or "bundled speeches",
            "scale": args.scale, "prompts": n_prompts, "tokens": args.min_tokens or tokens,
            "shuffle_levels": list(LEVELS), "n2": PRIMARY_N2, "overlap_k": OVERLAP_K, "seed": 0}


def prompts_of(s: dict) -> list:
    prompts = speeches() if s["corpus"] == "bundled speeches" else user_corpus(s["corpus"], LABELS, "token-geometry")
    return prompts[:s["prompts"]]


def prepare(out: str, s: dict):
    write_prompts(path(out, "prompts.jsonl"), prompts_of(s))


def measurement_stages(out: str, model: str, prompt_file: str, tokens: int, levels, tag: str = "",
                       dtype: str = "float16") -> list:
    """Extract (equal-length prompts at each shuffle level, stored at ``dtype``), then summarize with and without the
    first token."""
    store = path(out, f"activations{tag}.zarr")
    extract = Stage(f"extract{tag}", store, ("extract", "--model", model, "--prompts", prompt_file, "--out", store,
                                              "--max-tokens", str(tokens), "--min-tokens", str(tokens),
                                              "--shuffle-levels", ",".join(map(str, levels)), "--seed", "0",
                                              "--dtype", dtype),
                    phase=EXTRACT)
    return [extract] + [Stage(f"summarize{tag} (first token {SKIP_NAMES[skip]})", results_path(out, skip, tag),
                              ("summarize", "--store", store, "--out", results_path(out, skip, tag),
                               "--observables", "gride,overlap,cosine,bpc", "--skip-tokens", str(skip)), cluster=True)
                        for skip in SKIPS]


def results_path(out: str, skip: int, tag: str = "") -> str:
    return path(out, f"results{tag}-skip{skip}.zarr")


def stages(out: str, s: dict) -> list:
    return measurement_stages(out, s["model"], path(out, "prompts.jsonl"), s["tokens"], LEVELS)


def open_results(out: str, skip: int, tag: str = ""):
    from ...store.results import open_results as open_store

    return open_store(results_path(out, skip, tag))


def _ids(ds, n2: int, prompts) -> np.ndarray:
    """GRIDE ID (prompt, layer ≥ 1) at scale n2 of the chosen prompts (boolean mask)."""
    return ds.gride_id.sel(n2=n2).isel(layer=slice(1, None)).values[prompts]


def profile_peak(ids: np.ndarray, layers: np.ndarray, last_layer: int) -> dict | None:
    """The mean ID profile over prompts (rows) and its peak; None without a prompt or 3 finite layers."""
    if ids.shape[0] == 0:
        return None
    profile = mean_over(ids)
    finite = np.isfinite(profile)
    if finite.sum() < 3:
        return None
    i = int(np.nanargmax(profile))
    kept = np.flatnonzero(finite)
    return {"peak_layer": int(layers[i]), "peak_depth": float(relative_depth(layers[i], last_layer)),
            "id_first": profile[kept[0]], "id_peak": profile[i], "id_last": profile[kept[-1]],
            "interior": bool(kept[0] < i < kept[-1]), "profile": profile}


def peak_outcome(ids, layers, last_layer) -> tuple:
    peak = profile_peak(ids, layers, last_layer)
    if peak is None:
        return NO_DATA, {}
    numbers = {k: v for k, v in peak.items() if k not in ("profile", "interior")}
    return verdict_of(peak["interior"] and peak["peak_depth"] <= PEAK_DEPTH), numbers


PEAK_CLAIM = "The ID profile rises to an early-to-middle-layer peak"
PEAK_RULE = (f"holds when the peak of the mean ID profile over the unshuffled prompts (layers 1 … L) lies after the "
             f"first and before the last layer, at a relative depth ≤ {PEAK_DEPTH}")


AXES = {"n2": lambda v: v[0], "first token": lambda v: SKIP_NAMES[v[1]]}


def findings(out: str, s: dict) -> list:
    ds_by_skip = {skip: open_results(out, skip) for skip in SKIPS}
    ds0 = ds_by_skip[0]
    layers = ds0.layer.values[1:]
    last = int(ds0.layer.values[-1])
    level = ds0.shuffle_level.values
    loss = ds0.loss.values.astype(np.float64)
    unshuffled = level == 0
    variants = gride_variants(ds_by_skip)
    primary = (PRIMARY_N2, 0) if (PRIMARY_N2, 0) in variants else (variants[0] if variants else None)

    def each(outcome) -> dict:
        return {v: outcome(_ids(ds_by_skip[v[1]], v[0], slice(None)), v) for v in variants}

    def peak(ids, v):
        return peak_outcome(ids[unshuffled], layers, last)

    def growth(ids, v):
        peaks = {}
        for lv in LEVELS:
            p = profile_peak(ids[level == lv], layers, last)
            if p is not None:
                peaks[lv] = p["id_peak"]
        corr = correlation(list(peaks), list(peaks.values()), minimum=3)
        numbers = {"peak_id_by_level": peaks}
        if corr is None:
            return NO_DATA, numbers
        numbers.update(spearman_rho=corr["spearman_rho"], spearman_p=corr["spearman_p"])
        return verdict_of(corr["spearman_rho"] > 0 and corr["spearman_p"] < 0.05), numbers

    def id_loss(ids, v):
        p = profile_peak(ids[unshuffled], layers, last)
        if p is None:
            return NO_DATA, {}
        column = list(layers).index(p["peak_layer"])
        with np.errstate(all="ignore"):
            corr = correlation(np.log(ids[unshuffled, column]), loss[unshuffled])
        numbers = {"peak_layer": p["peak_layer"], "prompts": int(unshuffled.sum())}
        return decided_positive(corr), dict(numbers, **(corr or {}))

    results = []
    if primary is None:
        results += [no_data(c, r, "no GRIDE value at any scale") for c, r in ((PEAK_CLAIM, PEAK_RULE),
                                                                              (GROWTH_CLAIM, GROWTH_RULE))]
    else:
        results.append(across_variants(PEAK_CLAIM, PEAK_RULE, each(peak), primary, AXES))
        results.append(across_variants(GROWTH_CLAIM, GROWTH_RULE, each(growth), primary, AXES))
    overlap = {}
    for skip, ds in ds_by_skip.items():
        values = ds.overlap.sel(k=OVERLAP_K).isel(layer=slice(1, -1)).values[unshuffled]  # the last layer is NaN
        third = max(values.shape[1] // 3, 1)
        early, late = mean_over(values[:, :third], axis=1), mean_over(values[:, -third:], axis=1)
        test = paired_greater(late, early)
        overlap[(OVERLAP_K, skip)] = (decided_greater(test), dict(
            {"early_mean": np.nanmean(early), "late_mean": np.nanmean(late), "layers_per_third": third},
            **(test or {})))
    results.append(across_variants(OVERLAP_CLAIM, OVERLAP_RULE, overlap, (OVERLAP_K, 0),
                                   {"k": lambda v: v[0], "first token": lambda v: SKIP_NAMES[v[1]]}))
    results.append(no_data(LOSS_CLAIM, LOSS_RULE, "no GRIDE value at any scale") if primary is None else
                   across_variants(LOSS_CLAIM, LOSS_RULE, each(id_loss), primary, AXES))
    return results


GROWTH_CLAIM = "The ID peak grows with the shuffle level"
GROWTH_RULE = ("holds when the peak of each shuffle level's mean ID profile rises with the level: Spearman ρ > 0 "
               "with p < 0.05 over the levels 0 … 4 (with five levels that takes ρ ≥ 0.9)")
OVERLAP_CLAIM = "Neighbourhood overlap is higher in late layers than in early ones"
OVERLAP_RULE = (f"holds when, over the unshuffled prompts, the mean overlap (k = {OVERLAP_K}) of the last third of "
                f"layers 1 … L−1 exceeds that of the first third, Wilcoxon signed-rank p < 0.05 (at least 6 prompts)")
LOSS_CLAIM = "ID and mean loss correlate positively across prompts at the peak layer"
LOSS_RULE = ("holds when log ID at the peak layer of the unshuffled prompts' mean profile and each prompt's mean loss "
             "have Pearson r > 0 and Spearman ρ > 0, both with p < 0.05 (at least 5 prompts)")


def figures(out: str, s: dict, directory: str) -> list:
    from ...plot import figures as result_figures
    from ...plot import save_figures

    written = []
    for skip in SKIPS:
        ds = open_results(out, skip)
        tag = "all-tokens" if skip == 0 else "first-token-left-out"
        drawn = ((f"{tag}_{stem}", fig) for stem, fig in result_figures(ds, groupby="shuffle_level", n2=PRIMARY_N2,
                                                                          k=OVERLAP_K, layers="1:"))
        written += save_figures(drawn, directory)
    written += save_figures([("id_loss_correlation", id_loss_figure(out))], directory)
    return written


def id_loss_figure(out: str):
    """Pearson r of log ID and loss over the unshuffled prompts, per layer, at every n2, with and without the
    first token (the study's figure is one line of it: n2 = 4, every token)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, skip in zip(axes, SKIPS):
        ds = open_results(out, skip)
        unshuffled = ds.shuffle_level.values == 0
        loss = ds.loss.values.astype(np.float64)[unshuffled]
        layers = ds.layer.values[1:]
        for n2 in ds.n2.values:
            ids = _ids(ds, int(n2), unshuffled)
            with np.errstate(all="ignore"):
                r = [np.nan if (c := correlation(np.log(ids[:, j]), loss, minimum=3)) is None else c["pearson_r"]
                     for j in range(len(layers))]
            if np.isfinite(r).any():
                ax.plot(layers, r, marker=".", linewidth=2.2 if n2 == PRIMARY_N2 else 1.0,
                        label=f"n2 = {int(n2)}" + (" (study)" if n2 == PRIMARY_N2 else ""))
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_title(f"first token {SKIP_NAMES[skip]}", fontsize=10)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Pearson r (log ID, mean loss)")
    if axes[1].get_legend_handles_labels()[0]:
        fig.legend(*axes[1].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    fig.suptitle("ID–loss correlation per layer over the unshuffled prompts", fontsize=10)
    return fig
