"""What every part of the front page shares: its file names and marker, the stylesheet and the
script that draws the charts, HTML escaping, strict JSON for Vega-Lite, the chart collector
(:class:`Page`), copying the report's files next to the page and the static-figure gallery."""
from __future__ import annotations

import html
import shutil
from pathlib import Path
from typing import Sequence

#: asv's own front page is moved here by ``build``; index.html becomes etbench's report.
ASV_PAGE = "asv.html"
#: Marks the front page written by ``build`` (so a rebuild never mistakes it for asv's page).
FRONT_PAGE_MARKER = '<meta name="generator" content="etbench-report">'
REPORT_SUBDIR = "report"
VEGA_LITE_SCHEMA = "https://vega.github.io/schema/vega-lite/v6.json"

PAGE_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0; color: #1d2330; background: #fff; }
header { background: #1f3a5f; color: #fff; padding: 14px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header a { color: #cfe3ff; }
header .meta { font-size: 13px; opacity: .9; }
nav.families { background: #eef2f7; padding: 8px 28px; font-size: 14px; border-bottom: 1px solid #d5dce6; position: sticky; top: 0; z-index: 5; }
nav.families a { margin-right: 14px; white-space: nowrap; }
nav.families .sections { margin-left: 4px; padding-left: 14px; border-left: 1px solid #b8c2d0; }
main { padding: 8px 28px 40px; }
section.family { border-top: 2px solid #d5dce6; margin-top: 22px; padding-top: 4px; }
h2 { font-size: 20px; margin: 10px 0 4px; }
h3 { font-size: 15px; margin: 16px 0 4px; color: #34405a; }
h2 .family-name { font-size: 13px; font-weight: normal; color: #6b7588; margin-left: 6px; }
.question { font-size: 14px; font-style: italic; color: #34405a; margin: 2px 0 6px; }
ul.questions { margin: 2px 0 6px; padding-left: 20px; }
.links, .note { font-size: 13px; color: #4a5568; }
.charts { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
figure { margin: 6px 0; }
figcaption { font-size: 12px; color: #4a5568; }
.chart { min-height: 60px; }
.chart[data-error] { color: #b3261e; }
.badge { display: inline-block; padding: 1px 7px; border-radius: 9px; font-size: 12px; font-weight: 600; }
.badge.noisy { background: #ffe8a3; color: #6b4e00; }
.badge.quiet { background: #d8f3dc; color: #1b5e20; }
.badge.refused { background: #fdecea; color: #8a1c10; }
.scroll { overflow-x: auto; max-width: 100%; }
img.static { max-width: 100%; border: 1px solid #e2e8f0; }
details { margin: 6px 0; }
table.sortable td { white-space: nowrap; }
table.sortable td.text a { white-space: normal; }
.refused-reason { font-size: 13px; color: #8a1c10; margin: 2px 0; }
#vega-missing { display: none; background: #fdecea; color: #8a1c10; padding: 8px 28px; }
"""

EMBED_JS = """
(function () {
  var specs = JSON.parse(document.getElementById('etbench-specs').textContent);
  if (typeof vegaEmbed === 'undefined') {
    document.getElementById('vega-missing').style.display = 'block';
    document.body.setAttribute('data-vega-missing', 'yes');
    return;
  }
  Object.keys(specs).forEach(function (id) {
    var el = document.getElementById(id);
    vegaEmbed(el, specs[id], {renderer: 'svg', actions: {export: true, source: false, compiled: false, editor: false}})
      .then(function () { el.setAttribute('data-rendered', 'yes'); })
      .catch(function (err) { el.setAttribute('data-error', String(err)); el.textContent = 'chart failed: ' + err; });
  });
})();
"""


def json_safe(value):
    """Plain JSON values (NaN/inf and numpy scalars become null/float), recursively."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if number != number or number in (float("inf"), float("-inf")):
        return None
    return int(number) if isinstance(value, int) or (hasattr(value, "dtype") and value.dtype.kind in "iu") else number


def esc(text) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def bool_value(value):
    """True/False, or None for a missing value (None or NaN)."""
    return None if value is None or value != value else bool(value)


def recipe_text(run, key: str) -> str:
    """A recipe field of a run as text: lists joined (``none`` when empty), missing values empty."""
    value = run.get(f"recipe.{key}")
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return "" if value is None or value != value else str(value)


class Page:
    """Collects the chart specs of a page; each chart is a ``<div>`` vega-embed fills."""

    def __init__(self):
        self.specs: dict[str, dict] = {}

    def chart(self, spec: dict, *, png: str | None = None, caption: str = "") -> str:
        chart_id = f"chart-{len(self.specs) + 1}"
        self.specs[chart_id] = spec
        links = f' <a href="{esc(png)}">static PNG</a>' if png else ""
        return (f'<figure><div class="chart" id="{chart_id}"></div>'
                f"<figcaption>{esc(caption)}{links}</figcaption></figure>")


def copy_files(src_dir: Path, dest_dir: Path, patterns: Sequence[str]) -> list[str]:
    """Copy the files of ``src_dir`` matching ``patterns`` into ``dest_dir``; their names."""
    copied = []
    if not Path(src_dir).is_dir():
        return copied
    dest_dir.mkdir(parents=True, exist_ok=True)
    for pattern in patterns:
        for path in sorted(Path(src_dir).glob(pattern)):
            if path.is_file():
                shutil.copyfile(path, dest_dir / path.name)
                copied.append(path.name)
    return copied


def figures_html(rel: str, figures: Sequence[tuple[str, str]]) -> str:
    """The static PNGs ``(name, caption)`` under ``rel`` as linked images; empty without any."""
    if not figures:
        return ""
    return '<div class="charts">' + "".join(
        f'<figure><a href="{rel}/{n}"><img class="static" src="{rel}/{n}" alt="{esc(c)}" width="640"></a>'
        f"<figcaption>{esc(c)}</figcaption></figure>" for n, c in figures) + "</div>"
