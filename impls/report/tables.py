"""Tables: markdown for ``summary.md`` (every free-text cell escaped, so a label never breaks a
table) and sortable HTML for the site's pages and ``compare.html``, with the number formats they
share (:func:`format_value`, :func:`median_ci`)."""
from __future__ import annotations

import html
import math
from collections.abc import Sequence

import pandas as pd

from .records import MEMORY_COMPONENTS
from .values import is_number

# Display format of each numeric column of the markdown summary; the CSV keeps full precision.
_MARKDOWN_FORMATS = {
    "params": "{:,.0f}",
    "world_size": "{:.0f}",
    "tokens/s": "{:,.0f}",
    "s/step": "{:.4g}",
    "MFU": "{:.2%}",
    "HFU": "{:.2%}",
    "peak FLOP/s": "{:.3g}",
    **{f"{name} MiB": "{:,.2f}" for name in MEMORY_COMPONENTS.values()},
    "peak MiB": "{:,.1f}",
    "final val loss": "{:.4f}",
    "entropy floor": "{:.4f}",
}


def median_ci(median, ci) -> str | None:
    """``"median [lo, hi]"`` of a step time and its 95% interval; None without an interval (a
    median shown alone would read as exact)."""
    if median is None or median != median or not isinstance(ci, (list, tuple)):
        return None
    return f"{median:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]"


def markdown_text(value) -> str:
    """``value`` as text that stays inside one markdown table cell or list item: labels, device
    names, family folders and data specs are free text, so a ``|`` (which would split the cell) is
    escaped and a line break (which would end the table) is shown as ``\\n``."""
    text = str(value)
    return (text.replace("\\", "\\\\").replace("|", r"\|").replace("\r\n", r"\n").replace("\n", r"\n")
            .replace("\r", r"\r"))


def markdown_safe(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with every text cell and column name passed through :func:`markdown_text`, for
    tables rendered by another writer (``DataFrame.to_markdown``)."""
    def cell(value):
        return markdown_text(value) if isinstance(value, str) else value

    return table.rename(columns=lambda c: markdown_text(c) if isinstance(c, str) else c).map(cell)


def _markdown_cell(value, fmt: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return markdown_text(fmt.format(value) if fmt else value)


def markdown_table(table: pd.DataFrame, formats: dict | None = None) -> str:
    """GitHub-flavoured markdown for :func:`summary_table`, numeric columns right-aligned;
    ``formats`` adds display formats for other tables' columns.  Every cell and header goes
    through :func:`markdown_text`, so free text never breaks the table."""
    formats = {**_MARKDOWN_FORMATS, **(formats or {})}
    header = "| " + " | ".join(map(markdown_text, table.columns)) + " |"
    rule = "|" + "|".join("---:" if c in formats else "---" for c in table.columns) + "|"
    rows = ["| " + " | ".join(_markdown_cell(v, formats.get(c))
                              for c, v in zip(table.columns, row)) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def format_value(value) -> str | None:
    """A number to four significant digits; None for a missing or non-numeric value."""
    return None if value is None or not is_number(value) or value != value else f"{value:.4g}"


# --------------------------------------------------------------------------------------------
# HTML tables (the site's front page and the compare page)
# --------------------------------------------------------------------------------------------

#: Vanilla JS sorting every ``table.sortable`` by a click on its header: numeric by the cells'
#: ``data-sort`` values where present, text otherwise; a second click reverses.
SORTABLE_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('thead th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      table.querySelectorAll('thead th').forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[col];
        var v = cell ? cell.getAttribute('data-sort') : null;
        if (v !== null && v !== '' && !isNaN(Number(v))) return [0, Number(v)];
        return [1, cell ? cell.textContent.trim().toLowerCase() : ''];
      }
      rows.sort(function (a, b) {
        var ka = key(a), kb = key(b);
        if (ka[0] !== kb[0]) return ka[0] - kb[0];
        var c = ka[1] < kb[1] ? -1 : ka[1] > kb[1] ? 1 : 0;
        return asc ? c : -c;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

TABLE_CSS = """
table.sortable { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
table.sortable th, table.sortable td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
table.sortable td.text, table.sortable th.text { text-align: left; }
table.sortable th { background: #f3f5f8; cursor: pointer; user-select: none; position: sticky; top: 0; }
table.sortable th::after { content: ' \\2195'; color: #aaa; font-size: 11px; }
table.sortable th[aria-sort=ascending]::after { content: ' \\25B2'; color: #333; }
table.sortable th[aria-sort=descending]::after { content: ' \\25BC'; color: #333; }
table.sortable tr.refused td { background: #fdecea; color: #8a1c10; }
table.sortable tr.noisy td { background: #fff8e1; }
table.sortable td.faster { color: #1b7a3a; font-weight: bold; }
table.sortable td.slower { color: #b3261e; font-weight: bold; }
"""


def html_table(rows: Sequence[dict], columns: Sequence[str], *, formats: dict | None = None,
               text_columns: Sequence[str] = (), raw_html: Sequence[str] = (),
               row_class: Sequence[str] | None = None, cell_class: dict | None = None,
               table_id: str | None = None) -> str:
    """A ``<table class="sortable">`` (see :data:`SORTABLE_JS`): numbers formatted with
    ``formats`` and their full value kept in ``data-sort``; a ``(text, number)`` tuple shows the
    text and sorts by the number; ``raw_html`` columns hold markup built by the caller (already
    escaped), every other value is escaped here."""
    formats = formats or {}
    out = [f'<table class="sortable"{f" id={html.escape(table_id)!r}" if table_id else ""}><thead><tr>']
    out += [f'<th class="{"text" if c in text_columns else "num"}" scope="col">{html.escape(c)}</th>'
            for c in columns]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        css = row_class[i] if row_class else ""
        out.append(f'<tr class="{html.escape(css)}">' if css else "<tr>")
        for c in columns:
            value = row.get(c)
            classes = ["text"] if c in text_columns else []
            if cell_class and c in cell_class:
                classes.append(cell_class[c](row))
            cls = f' class="{" ".join(x for x in classes if x)}"' if any(classes) else ""
            if c in raw_html:
                out.append(f"<td{cls}>{value or ''}</td>")
                continue
            if isinstance(value, tuple):  # (text shown, number sorted by), e.g. "0.5 [0.4, 0.6]"
                text, key = value
                key = "" if key is None or not is_number(key) or key != key else repr(float(key))
                out.append(f'<td{cls} data-sort="{key}">{html.escape(text or "n/a")}</td>')
                continue
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            if missing:
                out.append(f'<td{cls} data-sort="">n/a</td>')
            elif is_number(value):
                fmt = formats.get(c, "{:.4g}")
                out.append(f'<td{cls} data-sort="{value!r}">{html.escape(fmt.format(value))}</td>')
            else:
                text = "yes" if value is True else "no" if value is False else str(value)
                out.append(f"<td{cls}>{html.escape(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)

