"""The front page's opening section: what each technique buys, and which paper claims hold.

Renders :mod:`impls.report.findings` -- one sortable, filterable table with a row per technique
variant of every family (speed with its interleaved 95% interval, memory components, FLOPs and
loss Δ, all × the family's baseline) and beside it the "claims checked" table -- and writes
``findings.csv``, ``claims.csv`` and ``findings.json`` next to ``index.html`` for citation.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd

from ... import families, report
from ...report import findings as rf
from .base import Rendered, SectionContext

#: Filters the rows of every ``table[data-filter]`` by the text typed into the input whose
#: ``data-filter-for`` names the table (case-insensitive substring of the row's text).
FILTER_JS = """
document.querySelectorAll('input[data-filter-for]').forEach(function (input) {
  var table = document.getElementById(input.getAttribute('data-filter-for'));
  input.addEventListener('input', function () {
    var needle = input.value.trim().toLowerCase();
    Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
      row.style.display = !needle || row.textContent.toLowerCase().indexOf(needle) >= 0 ? '' : 'none';
    });
  });
});
"""

FINDINGS_NOTE = (
    "Each row: one technique variant against the baseline of its own family and comparison group (same "
    "model, data, sequence length, model-FLOP budget and world size). <b>speed</b>: baseline time per token "
    "÷ the variant's, measured in interleaved rounds (median [95% interval]); n/a where the variant was not "
    "timed interleaved. <b>memory</b>: each exact component ÷ the baseline's. <b>FLOPs/step</b>: counted "
    "FLOPs ÷ the baseline's; <b>counted/analytic</b>: counted ÷ the model's analytic FLOPs (6N + 12LHQT; "
    "above 1 = recomputation or other hardware FLOPs). <b>loss Δ</b>: final validation loss − the baseline's "
    "at the same model-FLOP budget (95% interval where both have several seeds). Type to filter; click a "
    "header to sort.")
CLAIMS_NOTE = (
    "Every formula the suite checks a measurement against: measured ÷ formula per record (median and range "
    "over n records) and whether each is within the claim's tolerance. <b>differs</b> lists the records "
    "outside it with what they record about why.")


def _esc(text) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def _interval(value, low, high, fmt: str) -> tuple[str | None, float | None]:
    if not _finite(value):
        return None, None
    text = fmt.format(value)
    if _finite(low) and _finite(high):
        text += f" [{fmt.format(low)}, {fmt.format(high)}]"
    return text, float(value)


def _speed_class(row: dict) -> str:
    low, high = row.get("_speed lo"), row.get("_speed hi")
    if _finite(low) and low > 1:
        return "faster"
    if _finite(high) and high < 1:
        return "slower"
    return ""


def findings_rows(frame: pd.DataFrame) -> list[dict]:
    """The findings table's cells: intervals as ``(text, sort key)``, the family as a link."""
    rows = []
    for r in frame.to_dict("records"):
        family = r["family"]
        rows.append({
            "family": f'<a href="#family-{_esc(family)}" title="{_esc(families.title(family))}">{_esc(family)}</a>',
            "variant": r["variant"],
            "speed ×": _interval(r["speed"], r["speed lo"], r["speed hi"], "{:.3g}"),
            **{f"{c} ×": r[c] for c in ("params", "grads", "optimizer", "activations", "peak")},
            "FLOPs/step ×": r["flops/step"], "counted/analytic": r["counted/analytic"],
            "loss Δ": _interval(r["loss delta"], r["loss delta lo"], r["loss delta hi"], "{:+.3f}"),
            "device": r["device"], "params": r["parameters"], "tokens": r["tokens"], "world size": r["world size"],
            "_speed lo": r["speed lo"], "_speed hi": r["speed hi"]})
    return rows


def claims_rows(frame: pd.DataFrame) -> list[dict]:
    rows = []
    for r in frame.to_dict("records"):
        links = ", ".join(f'<a href="#family-{_esc(f)}">{_esc(f)}</a>' for f in str(r["families"]).split(", ") if f)
        rows.append({"claim": r["claim"], "paper": r["paper"], "formula": r["formula"], "families": links,
                     "n": r["n"], "measured ÷ formula": (
                         f"{r['ratio median']:.4g} [{r['ratio min']:.4g} – {r['ratio max']:.4g}]", r["ratio median"]),
                     "tolerance": r["tolerance"], "status": r["status"],
                     "outside tolerance": r["outside tolerance"] or ""})
    return rows


def section(loaded, html_dir: Path) -> str:
    """The findings section's HTML; writes the three citation files into ``html_dir``."""
    written, findings, claims = rf.write_findings(loaded, Path(html_dir))
    if findings.empty and claims.empty:
        return ""
    parts = ['<section class="findings" id="findings"><h2>What each technique buys here</h2>',
             f'<p class="note">{FINDINGS_NOTE}</p>',
             '<p class="links">Cite: ' + " · ".join(f'<a href="{p.name}">{p.name}</a>' for p in written) + "</p>"]
    if not findings.empty:
        rows = findings_rows(findings)
        columns = [c for c in rows[0] if not c.startswith("_")]
        parts.append('<p><input type="search" placeholder="filter rows, e.g. zero or memory family" '
                     'data-filter-for="findings-table" aria-label="filter the findings table" size="40"></p>')
        parts.append('<div class="scroll">' + report.html_table(
            rows, columns, formats={"counted/analytic": "{:.3g}", "params": "{:.3g}", "tokens": "{:.3g}",
                                    **{c: "{:.3g}" for c in columns if c.endswith(" ×")}},
            text_columns=("family", "variant", "device"), raw_html=("family",),
            cell_class={"speed ×": _speed_class}, table_id="findings-table")
            .replace('<table class="sortable"', '<table class="sortable" data-filter', 1) + "</div>")
    if not claims.empty:
        parts.append('<h3 id="claims">Claims checked</h3>' + f'<p class="note">{CLAIMS_NOTE}</p>')
        parts.append('<div class="scroll">' + report.html_table(
            claims_rows(claims), ["claim", "paper", "formula", "families", "n", "measured ÷ formula", "tolerance",
                                  "status", "outside tolerance"],
            text_columns=("claim", "paper", "formula", "families", "status", "outside tolerance"),
            raw_html=("families",), cell_class={"status": lambda r: "faster" if r["status"] == "holds" else "slower"},
            table_id="claims-table") + "</div>")
    parts.append("</section>")
    return "".join(parts)


class FindingsSection:
    """Report section ``findings``: first on the page, the one-screen answer."""

    name = "findings"

    def html(self, ctx: SectionContext) -> Rendered:
        text = section(ctx.loaded, ctx.html_dir)
        if not text:
            return Rendered()
        return Rendered(text, [("findings", "findings"), ("claims", "claims checked")] if "id=\"claims\"" in text
                        else [("findings", "findings")])
