"""``findings.json`` and ``report.md`` of a study run."""

from __future__ import annotations

import json
import os

from .findings import clean


def write_if_changed(path: str, text: str) -> bool:
    """Write ``text`` to ``path`` (atomically) unless the file already holds it; whether it was written."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return False
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(partial, path)
    return True


def findings_document(study: str, settings: dict, findings: list, figures: list, out: str) -> dict:
    return {"study": study, "settings": clean(settings), "findings": [f.as_json() for f in findings],
            "figures": [os.path.relpath(p, out) for p in figures]}


def _short(numbers: dict, limit: int = 6) -> str:
    """The primary variant's headline numbers for the table (no nested values)."""
    shown = [f"{k} {v}" for k, v in numbers.items() if k not in ("variant", "by_variant")
             and not isinstance(v, (dict, list))]
    return "; ".join(shown[:limit]) or "see findings.json"


def _elsewhere(numbers: dict, verdict: str) -> str:
    """Which other variants give another verdict, e.g. "does not hold at n2 16, 32 (first token kept)"."""
    by_variant = numbers.get("by_variant", {})
    if len(by_variant) <= 1:
        return "—"
    other = {}
    for variant, outcome in by_variant.items():
        if outcome["verdict"] != verdict:
            first, _, rest = variant.partition(", ")  # grouped by the other axes: "n2 16, 32 (first token kept)"
            axis, _, value = first.rpartition(" ")
            other.setdefault(outcome["verdict"], {}).setdefault((axis, rest), []).append(value)
    if not other:
        return f"the same in all {len(by_variant)} variants"
    return " · ".join(f"{v} at " + "; ".join(f"{axis} {', '.join(values)}" + (f" ({rest})" if rest else "")
                                             for (axis, rest), values in groups.items())
                      for v, groups in other.items())


def report_markdown(document: dict, title: str, description: str, elapsed: dict) -> str:
    s = document["settings"]
    lines = [f"# repgeo reproduce {document['study']}: {title}", "", description, "", "## Settings", ""]
    lines += [f"- **{k}**: {v}" for k, v in s.items()]
    if elapsed:
        lines += ["", "Time each stage took when it ran: " + ", ".join(f"{k} {v:.0f} s" for k, v in elapsed.items())]
    lines += ["", "## Findings", "",
              "| # | claim | verdict | numbers (study's own choices) | depends on | other variants |",
              "|---|---|---|---|---|---|"]
    for i, f in enumerate(document["findings"], 1):
        numbers = f["numbers"]
        variant = f" ({numbers['variant']})" if "variant" in numbers else ""
        lines.append(f"| {i} | {f['claim']} | **{f['verdict']}**{variant} | {_short(numbers)} | "
                     f"{', '.join(f['depends_on']) or '—'} | {_elsewhere(numbers, f['verdict'])} |")
    lines += ["", "### Rules", ""]
    lines += [f"{i}. {f['rule']}" for i, f in enumerate(document["findings"], 1)]
    lines += ["", "Every number, per variant, is in `findings.json`.", "", "## Figures", ""]
    lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in document["figures"]]
    return "\n".join(lines) + "\n"


def write_report(out: str, document: dict, title: str, description: str, elapsed: dict) -> list:
    """Write findings.json and report.md into ``out``; return the files (re)written."""
    written = []
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    for name, content in (("findings.json", text),
                          ("report.md", report_markdown(document, title, description, elapsed))):
        if write_if_changed(os.path.join(out, name), content):
            written.append(name)
    return written
