"""The languages study: the Universal Declaration of Human Rights in languages written in two scripts (Serbian,
Uzbek, Azerbaijani, Bosnian, Turkmen, each in Cyrillic and Latin) with English as the reference, and grammatical
against ungrammatical text (each English chunk's word-shuffled twin, and any ungrammatical text of ``--corpus``).

Prompts are grouped by ``variety`` (language_script; ``eng_Latn_shuffled`` for the twins, language_script
``_ungrammatical`` for ungrammatical text of the user's), and each variety's pooled tokens are compared with
English's by ``group_kl``. Choices fixed here before measuring: the embedding layer is left out (layers 1 … L); the
ID is GRIDE read at n2 = 32 (the scale ``repgeo plot`` draws by default), and every finding that uses it is also
measured at every other n2; every finding is measured with and without the first token (``--skip-tokens 1``), so
that the report shows which verdicts depend on either.
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np

from ...errors import UserError
from ...prompts import Prompt
from ..corpora import UDHR, udhr, user_corpus, word_shuffled, write_prompts
from ..findings import (ALPHA, NO_DATA, across_variants, correlation, decided_greater, no_data, paired_greater,
                        verdict_of)
from ..stages import EXTRACT, Stage
from . import gride_variants, model_specs, path
from .token_geometry import AXES, PRIMARY_N2, SKIP_NAMES, SKIPS, open_results, results_path

TITLE = "languages and scripts"
DESCRIPTION = ("The Universal Declaration of Human Rights in languages written in both Cyrillic and Latin script, "
               "with English as the reference, and each English chunk with its words shuffled within sentences "
               "(ungrammatical text). Per variety (language_script): the KL divergence of its pooled tokens from "
               "English's (equal pools per variety), each prompt's anisotropy and GRIDE intrinsic dimension, and "
               "its bits per character. Layer 0 (the embeddings) is left out; verdicts are taken at n2 = 4 (the "
               "token-geometry study's small neighbourhood rank: the language study publishes none) with "
               "every token, and every finding is measured at every GRIDE scale (where it uses GRIDE) and without "
               "the first token as well.")
LABELS = ("language", "script", "grammatical")
BUNDLED = "bundled UDHR"
REFERENCE = "eng_Latn"
SHUFFLED = f"{REFERENCE}_shuffled"
#: Per scale: bundled UDHR texts, characters per chunk, prompts per variety (None: all), tokens per prompt (longer
#: ones cut) and tokens pooled per variety for KL (below the smallest pool, so that every pool has the same size:
#: the KL estimator's bias depends on it).
SCALES = {"tiny": (("eng", "srp_cyrl", "srp_latn"), 600, 6, 128, 500),
          "small": (tuple(UDHR), 1500, 6, 384, 1500),
          "full": (tuple(UDHR), 1000, None, 512, 2000)}
#: "One shape": every variety's mean anisotropy profile has Pearson r ≥ this with English's (fixed before measuring).
SHAPE_R = 0.9
#: Layers with a nonzero difference the sign test needs before p can fall below 5 % (with 5 the least p is 0.0625).
SIGN_MINIMUM = 6
#: Prompts per side a Mann–Whitney test needs before p can fall below 5 % (with 3 and 3 the least p is 0.1).
MANN_WHITNEY_MINIMUM = 4
#: Per-prompt observables and the KL of each variety from English.
OBSERVABLES = "gride,anisotropy,bpc,group_kl"
#: The one analysis axis of the findings that use no GRIDE (their variants are the --skip-tokens values).
FIRST_TOKEN = {"first token": lambda v: SKIP_NAMES[v]}


def settings(args) -> dict:
    texts, chars, per_variety, tokens, pool = SCALES[args.scale]
    s = {"model": model_specs(args.model, "smollm2-135m")[0], "corpus": args.corpus or BUNDLED, "scale": args.scale,
         "prompts_per_variety": per_variety, "tokens": tokens, "group_size": pool, "reference": REFERENCE,
         "n2": PRIMARY_N2}
    if args.corpus is None:
        s.update(texts=list(texts), chunk_chars=chars)
    return s


def variety_of(labels: dict) -> str:
    """language_script, with ``_ungrammatical`` for ungrammatical text of the user's."""
    return f"{labels['language']}_{labels['script']}" + ("" if labels["grammatical"] else "_ungrammatical")


def labelled(prompts: list, corpus: str) -> list:
    """The ``--corpus`` prompts with their ``variety`` label; refused when ``grammatical`` is not a boolean, a
    variety label of the user's is not language_script, or no grammatical English prompt is there to compare with."""
    result = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt.labels["grammatical"], bool):
            raise UserError(f"--corpus {corpus}: prompt {index} has grammatical = {prompt.labels['grammatical']!r}; "
                            f"the languages study needs true or false (a JSON boolean)")
        variety = variety_of(prompt.labels)
        if prompt.labels.get("variety", variety) != variety:
            raise UserError(f"--corpus {corpus}: prompt {index} has variety {prompt.labels['variety']!r}, but the "
                            f"languages study groups by language_script ({variety!r}); leave the label out or fix it")
        result.append(Prompt(prompt.text, dict(prompt.labels, variety=variety)))
    if not any(p.labels["variety"] == REFERENCE for p in result):
        raise UserError(f"--corpus {corpus} has no grammatical English prompt (language eng, script Latn, grammatical "
                        f"true); the languages study measures every variety against English")
    return result


def first_of_each(prompts: list, n: int | None) -> list:
    """The first ``n`` prompts of each variety (all with None), in corpus order."""
    seen = Counter()
    kept = []
    for prompt in prompts:
        seen[prompt.labels["variety"]] += 1
        if n is None or seen[prompt.labels["variety"]] <= n:
            kept.append(prompt)
    return kept


def prompts_of(s: dict) -> list:
    """The corpus, then the word-shuffled twin of each English prompt (shuffled with its index as seed). Label
    ``shuffled_from``: the index of the twin's original, −1 on every other prompt (the pairs of finding 4)."""
    if s["corpus"] == BUNDLED:
        prompts = udhr(s["texts"], s["chunk_chars"], s["prompts_per_variety"])
    else:
        prompts = first_of_each(labelled(user_corpus(s["corpus"], LABELS, "languages"), s["corpus"]),
                                s["prompts_per_variety"])
    twins = [Prompt(word_shuffled(p.text, i), dict(p.labels, grammatical=False, variety=SHUFFLED, shuffled_from=i))
             for i, p in enumerate(prompts) if p.labels["variety"] == REFERENCE]
    return [Prompt(p.text, dict(p.labels, shuffled_from=-1)) for p in prompts] + twins


def prepare(out: str, s: dict):
    write_prompts(path(out, "prompts.jsonl"), prompts_of(s))


def stages(out: str, s: dict) -> list:
    """Extract, then summarize grouped by variety (KL from English) with and without the first token."""
    store = path(out, "activations.zarr")
    extract = Stage("extract", store, ("extract", "--model", s["model"], "--prompts", path(out, "prompts.jsonl"),
                                       "--out", store, "--max-tokens", str(s["tokens"])), phase=EXTRACT)
    return [extract] + [Stage(f"summarize (first token {SKIP_NAMES[skip]})", results_path(out, skip),
                              ("summarize", "--store", store, "--out", results_path(out, skip), "--observables",
                               OBSERVABLES, "--groupby", "variety", "--reference", s["reference"], "--group-size",
                               str(s["group_size"]), "--skip-tokens", str(skip)), cluster=True)
                        for skip in SKIPS]


def two_script_languages(ds) -> list:
    """Languages with grammatical prompts in both Latin and Cyrillic script, sorted."""
    grammatical = ds.grammatical.values.astype(bool)
    held = set(zip(ds.language.values[grammatical].tolist(), ds.script.values[grammatical].tolist()))
    return sorted(language for language, script in held if script == "Latn" and (language, "Cyrl") in held)


def layer_kl(ds, variety: str) -> np.ndarray:
    """KL(variety ‖ English) at layers 1 … L (nats)."""
    return ds.group_kl.sel(group=variety).isel(layer=slice(1, None)).values.astype(np.float64)


def script_gap(ds, language: str) -> dict:
    """KL of the language's Latin form minus that of its Cyrillic form at layers 1 … L: the mean of each and of the
    difference, the layers where they differ and where Latin is farther, and the two-sided sign-test p over those
    layers (None below SIGN_MINIMUM of them)."""
    from scipy import stats

    latin, cyrillic = layer_kl(ds, f"{language}_Latn"), layer_kl(ds, f"{language}_Cyrl")
    gap = latin - cyrillic
    differing = gap[np.isfinite(gap) & (gap != 0)]
    farther = int((differing > 0).sum())
    return {"kl_latn": np.nanmean(latin), "kl_cyrl": np.nanmean(cyrillic), "mean_difference": np.nanmean(gap),
            "layers": len(differing), "latin_farther_layers": farther,
            "p": stats.binomtest(farther, len(differing)).pvalue if len(differing) >= SIGN_MINIMUM else None}


def separation(gaps: dict) -> tuple:
    """Finding 1 from the :func:`script_gap` of each two-script language."""
    numbers = dict({f"p_{language}": g["p"] for language, g in gaps.items()}, languages=len(gaps), by_language=gaps)
    if not gaps or any(g["p"] is None for g in gaps.values()):
        return NO_DATA, numbers
    return verdict_of(all(g["p"] < ALPHA for g in gaps.values())), numbers


def direction(gaps: dict) -> tuple:
    """Finding 2 from the :func:`script_gap` of each two-script language, with the direction of each in words."""
    numbers = {language: f"{'Latin' if g['mean_difference'] > 0 else 'Cyrillic'} farther by "
                         f"{abs(g['mean_difference']):.4g} nats" for language, g in gaps.items()
               if np.isfinite(g["mean_difference"]) and g["mean_difference"] != 0}
    numbers.update(languages=len(gaps), by_language=gaps)
    if not gaps or any(not np.isfinite(g["mean_difference"]) for g in gaps.values()):
        return NO_DATA, numbers
    return verdict_of(all(g["mean_difference"] > 0 for g in gaps.values())), numbers


def grammatical_varieties(ds) -> dict:
    """Variety → boolean mask of its grammatical prompts, for every variety that has some."""
    grammatical, variety = ds.grammatical.values.astype(bool), ds.variety.values
    return {v: grammatical & (variety == v) for v in sorted(set(variety[grammatical].tolist()))}


def shared_shape(ds) -> tuple:
    """Pearson r of each grammatical variety's mean anisotropy profile (layers 1 … L) with English's."""
    values = ds.anisotropy.isel(layer=slice(1, None)).values
    profiles = {v: np.nanmean(values[mask], axis=0) for v, mask in grammatical_varieties(ds).items()}
    english = profiles.pop(REFERENCE)
    r = {v: (c or {}).get("pearson_r") for v, c in ((v, correlation(p, english)) for v, p in profiles.items())}
    if not r or None in r.values():
        return NO_DATA, {"varieties": len(r), "r_by_variety": r}
    least = min(r, key=r.get)
    return verdict_of(r[least] >= SHAPE_R), {"varieties": len(r), "min_r": r[least], "least_similar": least,
                                             "r_by_variety": r}


def mean_ids(ds, n2: int) -> np.ndarray:
    """Each prompt's GRIDE ID at scale n2, mean over layers 1 … L (NaN where its cloud does not reach n2)."""
    return np.nanmean(ds.gride_id.sel(n2=n2).isel(layer=slice(1, None)).values, axis=1)


def shuffled_higher(ds, ids: np.ndarray) -> tuple:
    """Each English prompt's word-shuffled twin against it (prompt index = position in the store: extract drops no
    prompt without --min-tokens)."""
    twin = np.flatnonzero(ds.shuffled_from.values >= 0)
    original = ds.shuffled_from.values[twin]
    test = paired_greater(ids[twin], ids[original])
    return decided_greater(test), dict({"id_original": np.nanmean(ids[original]), "id_shuffled": np.nanmean(ids[twin])},
                                       **(test or {}))


def given_higher(ds, ids: np.ndarray) -> tuple:
    """The user's ungrammatical prompts against the grammatical prompts of the same languages (unpaired: the
    means of the two sets, Mann–Whitney U two-sided)."""
    from scipy import stats

    grammatical, language = ds.grammatical.values.astype(bool), ds.language.values
    given = ~grammatical & (ds.shuffled_from.values < 0)
    ungrammatical = ids[given]
    reference = ids[grammatical & np.isin(language, language[given])]
    ungrammatical, reference = ungrammatical[np.isfinite(ungrammatical)], reference[np.isfinite(reference)]
    numbers = {"ungrammatical_prompts": len(ungrammatical), "grammatical_prompts": len(reference)}
    if min(len(ungrammatical), len(reference)) < MANN_WHITNEY_MINIMUM:
        return NO_DATA, numbers
    p = stats.mannwhitneyu(ungrammatical, reference).pvalue
    numbers.update(id_grammatical=reference.mean(), id_ungrammatical=ungrammatical.mean(), p=p)
    return verdict_of(ungrammatical.mean() > reference.mean() and p < ALPHA), numbers


def compression(ds, ids: np.ndarray) -> tuple:
    """Spearman correlation of the grammatical varieties' mean bits per character and mean ID."""
    if "bpc" not in ds:
        return NO_DATA, {"bpc": "not in the results store (this repgeo summarize has no bpc observable)"}
    bpc = ds.bpc.values.astype(np.float64)
    masks = grammatical_varieties(ds)
    by_variety = {v: np.nanmean(bpc[mask]) for v, mask in masks.items()}
    id_by_variety = {v: np.nanmean(ids[mask]) for v, mask in masks.items()}
    numbers = {"varieties": len(masks),
               "bpc": "; ".join(f"{v} {b:.3g}" for v, b in sorted(by_variety.items(), key=lambda item: item[1])),
               "bpc_by_variety": by_variety, "id_by_variety": id_by_variety}
    corr = correlation(list(by_variety.values()), list(id_by_variety.values()))
    if corr is None:
        return NO_DATA, numbers
    numbers.update(spearman_rho=corr["spearman_rho"], spearman_p=corr["spearman_p"])
    return verdict_of(corr["spearman_rho"] > 0 and corr["spearman_p"] < ALPHA), numbers


def findings(out: str, s: dict) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # means of all-NaN slices (n2 a cloud does not reach) are NaN
        return _findings({skip: open_results(out, skip) for skip in SKIPS}, s["corpus"] != BUNDLED)


def _findings(ds_by_skip: dict, given_corpus: bool) -> list:
    gaps = {skip: {language: script_gap(ds, language) for language in two_script_languages(ds)}
            for skip, ds in ds_by_skip.items()}
    results = [across_variants(SEPARATE_CLAIM, SEPARATE_RULE, {k: separation(g) for k, g in gaps.items()}, 0,
                               FIRST_TOKEN),
               across_variants(LATIN_CLAIM, LATIN_RULE, {k: direction(g) for k, g in gaps.items()}, 0, FIRST_TOKEN),
               across_variants(SHAPE_CLAIM, SHAPE_RULE, {k: shared_shape(ds) for k, ds in ds_by_skip.items()}, 0,
                               FIRST_TOKEN)]
    by_id = [(SHUFFLED_CLAIM, SHUFFLED_RULE, shuffled_higher)]
    if given_corpus:
        by_id.append((GIVEN_CLAIM, GIVEN_RULE, given_higher))
    by_id.append((BPC_CLAIM, BPC_RULE, compression))
    variants = gride_variants(ds_by_skip)
    primary = (PRIMARY_N2, 0) if (PRIMARY_N2, 0) in variants else (variants[0] if variants else None)
    for claim, rule, outcome in by_id:
        if primary is None:
            results.append(no_data(claim, rule, "no GRIDE value at any scale"))
            continue
        outcomes = {v: outcome(ds_by_skip[v[1]], mean_ids(ds_by_skip[v[1]], v[0])) for v in variants}
        results.append(across_variants(claim, rule, outcomes, primary, AXES))
    return results


SEPARATE_CLAIM = "Scripts separate: a language's Latin and Cyrillic forms differ from English by different amounts (KL)"
SEPARATE_RULE = ("for each language with grammatical prompts in both scripts, KL(form ‖ English) of the Latin form "
                 "minus that of the Cyrillic form at each layer 1 … L; holds when, for every such language, a "
                 "two-sided sign test over the layers where the two differ gives p < 0.05 (at least 6 layers)")
LATIN_CLAIM = "For two-script languages the Latin form is farther from English than the Cyrillic form"
LATIN_RULE = ("per two-script language, the mean over layers 1 … L of KL(Latin form ‖ English) − KL(Cyrillic form ‖ "
              "English) (the direction of each is in the numbers); holds when it is positive for every such language")
SHAPE_CLAIM = "Anisotropy has one shape shared by all languages"
SHAPE_RULE = (f"the mean anisotropy profile over each variety's grammatical prompts (layers 1 … L); holds when every "
              f"variety's profile has Pearson r ≥ {SHAPE_R} with English's (threshold fixed before measuring)")
SHUFFLED_CLAIM = "Ungrammatical text has higher ID: word-shuffled sentences against their originals"
SHUFFLED_RULE = ("each English prompt against its twin with the words of each sentence shuffled, ID = mean GRIDE ID "
                 "over layers 1 … L; holds when the twins' ID is higher, Wilcoxon signed-rank p < 0.05 (at least 6 "
                 "pairs)")
GIVEN_CLAIM = "Ungrammatical text has higher ID: the corpus's ungrammatical prompts against its grammatical ones"
GIVEN_RULE = ("the corpus's own ungrammatical prompts against the grammatical prompts of the same languages, ID = "
              "mean GRIDE ID over layers 1 … L; holds when the ungrammatical mean is higher and a two-sided "
              "Mann–Whitney U test gives p < 0.05 (at least 4 prompts on each side)")
BPC_CLAIM = "Varieties the model compresses better (fewer bits per character) have lower ID"
BPC_RULE = ("per grammatical variety, the mean bits per character of its prompts and their mean GRIDE ID over "
            "layers 1 … L; holds when Spearman ρ > 0 with p < 0.05 across the varieties (at least 5 varieties)")


def figures(out: str, s: dict, directory: str) -> list:
    """Per variety: KL from English, anisotropy and ID against layer and relative depth (and ID against n2); the same
    per script over the grammatical prompts; with and without the first token."""
    from ...plot import figures as result_figures
    from ...plot import save_figures

    written = []
    for skip in SKIPS:
        ds = open_results(out, skip)
        tag = "all-tokens" if skip == 0 else "first-token-left-out"
        views = (("variety", ds[["done", "group_kl", "anisotropy", "gride_id"]]),
                 ("script", ds[["done", "anisotropy", "gride_id"]].isel(prompt=ds.grammatical.values.astype(bool))))
        for groupby, view in views:
            drawn = ((f"{tag}_by_{groupby}_{stem}", fig)
                     for stem, fig in result_figures(view, groupby=groupby, n2=s["n2"], layers="1:"))
            written += save_figures(drawn, directory)
    return written
