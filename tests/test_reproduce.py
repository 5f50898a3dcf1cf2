"""``repgeo reproduce``: the verdict rules, bad input, and every study end to end at --scale tiny on the real models
(slow): every stage ran, findings.json and report.md hold every finding with numbers, and a rerun rewrites nothing
and loads no model. The findings themselves are not asserted: they are what the model does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from toolkit.reproduce.findings import (FAILS, HOLDS, NO_DATA, WILCOXON_MINIMUM, across_variants, correlation,
                                        decided_greater, decided_positive, paired_greater)
from toolkit.reproduce.report import findings_document, report_markdown

VERDICTS = {HOLDS, FAILS, NO_DATA}


# ------------------------------------------------------------------------------------------------ verdict rules


def test_paired_greater_needs_enough_pairs_and_a_significant_positive_difference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=20)
    assert decided_greater(paired_greater(a + 1.0, a)) == HOLDS
    assert decided_greater(paired_greater(a - 1.0, a)) == FAILS
    assert decided_greater(paired_greater(a + rng.normal(scale=5, size=20), a)) in (FAILS, HOLDS)
    few = np.arange(WILCOXON_MINIMUM - 1, dtype=float)
    assert paired_greater(few + 1, few) is None and decided_greater(None) == NO_DATA
    with_nan = np.r_[a, np.nan]
    assert paired_greater(with_nan + 1, with_nan)["n"] == 20


def test_correlation_matches_scipy_and_refuses_constant_or_short_input():
    from scipy import stats

    rng = np.random.default_rng(1)
    x = rng.normal(size=30)
    y = x + 0.3 * rng.normal(size=30)
    c = correlation(x, y)
    assert c["pearson_r"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert c["spearman_p"] == pytest.approx(stats.spearmanr(x, y).pvalue)
    assert decided_positive(c) == HOLDS and decided_positive(correlation(x, -y)) == FAILS
    assert correlation(x[:4], y[:4]) is None and correlation(x, np.ones(30)) is None


def test_depends_on_names_the_axes_whose_change_alone_flips_the_verdict():
    axes = {"n2": lambda v: v[0], "first token": lambda v: v[1]}
    outcomes = {(4, "kept"): (HOLDS, {"x": 1.0}), (32, "kept"): (FAILS, {"x": 2.0}),
                (4, "left out"): (HOLDS, {"x": 1.5}), (32, "left out"): (FAILS, {"x": 2.5}),
                (64, "kept"): (NO_DATA, {})}
    finding = across_variants("claim", "rule", outcomes, (4, "kept"), axes)
    assert finding.verdict == HOLDS and finding.depends_on == ["n2"]
    assert finding.numbers["variant"] == "n2 4, first token kept" and finding.numbers["x"] == 1.0
    assert finding.numbers["by_variant"]["n2 32, first token left out"] == {"verdict": FAILS, "x": 2.5}
    steady = across_variants("claim", "rule", {k: (HOLDS, v) for k, (_, v) in outcomes.items()}, (4, "kept"), axes)
    assert steady.depends_on == []


def test_report_lists_every_finding_with_its_verdict_and_the_variants_that_differ():
    axes = {"n2": lambda v: v}
    findings = [across_variants("ID peaks early", "rule one", {4: (HOLDS, {"peak": 3}), 32: (FAILS, {"peak": 9})},
                                4, axes),
                across_variants("overlap rises", "rule two", {4: (NO_DATA, {"prompts": 2})}, 4, axes)]
    document = findings_document("token-geometry", {"scale": "tiny"}, findings, ["/x/figures/a.png"], "/x")
    text = report_markdown(document, "title", "description", {"extract": 12.0})
    assert "| 1 | ID peaks early | **holds** (n2 4) | peak 3 | n2 | does not hold at n2 32 |" in text
    assert "**not enough data**" in text and "rule two" in text and "![a](figures/a.png)" in text
    assert "extract 12 s" in text


# ------------------------------------------------------------------------------------------------- bad input


def test_unknown_study_is_refused(run_repgeo, tmp_path):
    code, _, err = run_repgeo("reproduce", "geometry-of-everything", "--out", tmp_path / "r")
    assert code == 2 and "invalid choice" in err and "token-geometry" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_a_corpus_without_the_labels_a_study_needs_is_refused_naming_them(run_repgeo, write_jsonl, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "Hello world.", "language": "eng"}])
    code, _, err = run_repgeo("reproduce", "languages", "--corpus", corpus, "--out", tmp_path / "r")
    assert code == 2 and "script" in err and "grammatical" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_directory_of_something_else_or_of_other_settings_is_refused(run_repgeo, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run_repgeo("reproduce", "token-geometry", "--out", other, "--scale", "tiny")
    assert code == 2 and "not a repgeo reproduce directory" in err and os.listdir(other) == ["notes.txt"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "reproduce.json").write_text(json.dumps({"study": "token-geometry", "settings": {"scale": "small"}}))
    code, _, err = run_repgeo("reproduce", "token-geometry", "--out", run, "--scale", "tiny")
    assert code == 2 and "other settings" in err and os.listdir(run) == ["reproduce.json"], err


# ------------------------------------------------------------------------------------- every study, end to end


def _files(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def _check_run(out: Path, study: str, claims: int):
    document = json.loads((out / "findings.json").read_text())
    assert document["study"] == study and document["settings"]["scale"] == "tiny"
    assert len(document["findings"]) == claims, [f["claim"] for f in document["findings"]]
    report = (out / "report.md").read_text()
    for finding in document["findings"]:
        assert finding["verdict"] in VERDICTS and finding["numbers"], finding
        assert set(finding) >= {"claim", "verdict", "numbers", "depends_on"}
        assert finding["claim"] in report
    assert document["figures"] and all((out / f).is_file() for f in document["figures"])
    assert all(f in report for f in document["figures"])
    timings = json.loads((out / "timings.json").read_text())
    assert all(seconds >= 0 for seconds in timings.values())
    return document, timings


def _rerun_rewrites_nothing(run_repgeo, out: Path, *args):
    before = _files(out)
    code, _, err = run_repgeo("reproduce", *args, "--out", out, timeout=300)
    assert code == 0, err
    assert _files(out) == before
    assert "nothing to do" in err, err
    assert all(line.startswith("[reproduce]") for line in err.splitlines()), err  # no job ran, no model loaded


STUDIES = {  # study → (claims in findings.json, stages in timings.json, extra arguments)
    "token-geometry": (4, 3, ()),
    "models": (3, 6, ()),
    "languages": (5, 3, ()),
    "concepts": (3, 7, ()),
}


@pytest.mark.slow
@pytest.mark.parametrize("study", list(STUDIES))
def test_study_runs_end_to_end_at_tiny_scale_and_a_rerun_rewrites_nothing(study, run_repgeo, tmp_path):
    claims, n_stages, extra = STUDIES[study]
    out = tmp_path / study
    code, _, err = run_repgeo("reproduce", study, "--scale", "tiny", "--workers", "2", "--out", out, *extra,
                              timeout=1200)
    assert code == 0, err[-3000:]
    document, timings = _check_run(out, study, claims)
    assert len(timings) == n_stages, timings
    if study == "token-geometry":  # 2 unshuffled prompts: too few for a Wilcoxon test or a correlation, by rule
        assert [f["verdict"] for f in document["findings"][2:]] == [NO_DATA, NO_DATA]
    _rerun_rewrites_nothing(run_repgeo, out, study, "--scale", "tiny", "--workers", "2", *extra)
