"""The models study: the token-geometry measurement (ID, overlap, cosine of each unshuffled prompt's token cloud)
on several models over the same texts, against relative depth, and each model's mean ID against how well it
predicts the text (the language study's "lower ID, better model").

Models have different tokenizers (SmolLM2: 49,152 tokens; Gemma 3: 262,144), so a mean loss per token does not
compare them: the comparison uses bits per character (``bpc``), which does; the mean loss is reported as well.
"""

from __future__ import annotations

import os
import re

import numpy as np

from ..findings import NO_DATA, Finding, across_variants, no_data, verdict_of
from . import mean_over, model_specs, path, relative_depth
from .token_geometry import (AXES, PEAK_CLAIM, PEAK_RULE, PRIMARY_N2, SCALES, SKIP_NAMES, SKIPS, measurement_stages,
                             open_results, peak_outcome)
from .token_geometry import prepare  # noqa: F401  (the same prompt file as token-geometry)

TITLE = "intrinsic dimension across models"
DESCRIPTION = ("The token-geometry measurement on each model over the same unshuffled texts (equal token counts "
               "per model, first prompts of the corpus), compared by relative depth, and each model's mean ID "
               "against its bits per character on the texts. Layer 0 is left out; verdicts at n2 = 4 with every "
               "token, every finding measured at every n2 and without the first token too.")
LABELS = ()
DEFAULT_MODELS = "smollm2-135m,gemma3-270m"


def settings(args) -> dict:
    n_prompts, tokens = SCALES[args.scale]
    return {"models": model_specs(args.model, DEFAULT_MODELS), "corpus": args.corpus or "bundled speeches",
            "scale": args.scale, "prompts": n_prompts, "tokens": args.min_tokens or tokens, "n2": PRIMARY_N2,
            "seed": 0}


def tag(model: str) -> str:
    """A file-name tag for a model spec: its alias, or its file or directory name."""
    name = os.path.basename(os.path.normpath(model))
    return "-" + re.sub(r"[^A-Za-z0-9_.]+", "-", os.path.splitext(name)[0] if name.endswith(".gguf") else name)


def stages(out: str, s: dict) -> list:
    # float32: Gemma 3's hidden states exceed float16's range (|h| ≈ 7e4 in middle layers), and every model is
    # stored alike so that precision does not differ between them
    return [stage for model in s["models"]
            for stage in measurement_stages(out, model, path(out, "prompts.jsonl"), s["tokens"], (0,), tag(model),
                                            dtype="float32")]


def _mean_id(ds, n2: int) -> float:
    """Mean GRIDE ID over prompts and layers 1 … L at scale n2."""
    values = ds.gride_id.sel(n2=n2).isel(layer=slice(1, None)).values
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _scales(ds) -> list:
    return [int(n2) for n2 in ds.n2.values if np.isfinite(ds.gride_id.sel(n2=n2).values).any()]


ORDER_CLAIM = ("Lower ID, better model: the model with the lower mean ID predicts the text better (fewer bits per "
               "character)")
ORDER_RULE = ("holds when ordering the models by mean ID (prompts × layers 1 … L) gives the same order as by mean "
              "bits per character (every pair of models concordant: Kendall τ = 1); needs at least two models")


def findings(out: str, s: dict) -> list:
    by_model = {m: {skip: open_results(out, skip, tag(m)) for skip in SKIPS} for m in s["models"]}
    results = []
    for model, ds_by_skip in by_model.items():
        ds = ds_by_skip[0]
        layers, last = ds.layer.values[1:], int(ds.layer.values[-1])
        outcomes = {(n2, skip): peak_outcome(ds_by_skip[skip].gride_id.sel(n2=n2).isel(layer=slice(1, None)).values,
                                             layers, last)
                    for skip in SKIPS for n2 in _scales(ds_by_skip[skip])}
        primary = (PRIMARY_N2, 0)
        if primary not in outcomes:
            results.append(no_data(f"{model}: {PEAK_CLAIM}", PEAK_RULE, f"no GRIDE value at n2 = {PRIMARY_N2}"))
            continue
        results.append(across_variants(f"{model}: {PEAK_CLAIM}", PEAK_RULE, outcomes, primary, AXES))
    results.append(_order_finding(by_model))
    return results


def _bpc(ds) -> float:
    return float(np.nanmean(ds.bpc.values)) if "bpc" in ds and np.isfinite(ds.bpc.values).any() else float("nan")


def _order_finding(by_model: dict) -> Finding:
    from scipy import stats

    variants = sorted({(n2, skip) for m in by_model.values() for skip in SKIPS for n2 in _scales(m[skip])},
                      key=lambda v: (v[1], v[0]))
    outcomes = {}
    for n2, skip in variants:
        ids = {m: _mean_id(d[skip], n2) if n2 in _scales(d[skip]) else float("nan") for m, d in by_model.items()}
        bpc = {m: _bpc(d[0]) for m, d in by_model.items()}
        loss = {m: float(np.nanmean(d[0].loss.values)) for m, d in by_model.items()}
        numbers = {"mean_id": ids, "bits_per_character": bpc, "mean_loss_nats_per_token": loss}
        usable = [m for m in by_model if np.isfinite(ids[m]) and np.isfinite(bpc[m])]
        if len(usable) < 2:
            outcomes[(n2, skip)] = (NO_DATA, numbers)
            continue
        tau = stats.kendalltau([ids[m] for m in usable], [bpc[m] for m in usable]).statistic
        outcomes[(n2, skip)] = (verdict_of(tau == 1), dict(numbers, kendall_tau=tau))
    if (PRIMARY_N2, 0) not in outcomes:
        return no_data(ORDER_CLAIM, ORDER_RULE, f"no GRIDE value at n2 = {PRIMARY_N2}")
    return across_variants(ORDER_CLAIM, ORDER_RULE, outcomes, (PRIMARY_N2, 0), AXES)


def figures(out: str, s: dict, directory: str) -> list:
    from matplotlib.figure import Figure

    from ...plot import save_figures

    drawn = []
    for name, title in (("gride_id", f"GRIDE ID at n2 = {PRIMARY_N2}"), ("overlap", "neighbourhood overlap, k = 8"),
                        ("cosine_mean", "mean cosine similarity")):
        fig = Figure(figsize=(11, 4.2), layout="constrained")
        axes = fig.subplots(1, 2, sharey=True)
        for ax, skip in zip(axes, SKIPS):
            for model in s["models"]:
                ds = open_results(out, skip, tag(model))
                da = ds[name]
                da = da.sel(n2=PRIMARY_N2) if "n2" in da.dims else da.sel(k=8) if "k" in da.dims else da
                values = da.isel(layer=slice(1, None)).values
                depth = relative_depth(ds.layer.values[1:], int(ds.layer.values[-1]))
                ax.plot(depth, mean_over(values), marker=".", label=model)
            ax.set_title(f"first token {SKIP_NAMES[skip]}", fontsize=10)
            ax.set_xlabel("relative depth (layer / last layer)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(title)
        axes[1].legend(fontsize=8)
        fig.suptitle(f"{title}: mean over prompts, per model", fontsize=10)
        drawn.append((f"models_{name}", fig))
    return save_figures(drawn, directory)
