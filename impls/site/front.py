"""The site's front page: etbench's report for one commit (``index.html``), asv's index moved to
``asv.html`` alongside, and ``compare.html`` against the commit before.  The sections come from
:data:`impls.site.sections.SECTIONS`; this module picks the commit, lays out the page (header,
navigation, sections, the chart specs and the script drawing them) and writes it."""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from .. import families
from .asv_links import AsvIndex
from .errors import NoRunsError, SiteError
from .page import (ASV_PAGE, EMBED_JS, FRONT_PAGE_MARKER, PAGE_CSS, REPORT_SUBDIR, Page, bool_value, copy_files, esc,
                   json_safe)
from .sections import FILTER_JS, SECTIONS, Rendered, SectionContext, table_families
from .sections.isoflop import sweep_dirs
from .vendor import REPORT_CDN_ASSETS

COMMIT_DIR = re.compile(r"^[0-9a-f]{7,40}$")


def commit_runs_dirs(runs_root: Path) -> list[Path]:
    """Commit folders of ``runs_root`` (``results/runs/<short hash>/``) holding records, oldest
    first (by their newest record's modification time)."""
    found = []
    for path in Path(runs_root).iterdir() if Path(runs_root).is_dir() else ():
        if path.is_dir() and COMMIT_DIR.match(path.name):
            times = [p.stat().st_mtime for p in path.rglob("*.json")]
            if times:
                found.append((max(times), path.name, path))
    return [path for _, _, path in sorted(found)]


def pick_runs(html_dir: Path, runs_root: Path, runs: Path | None, previous: Path | None) -> tuple[Path, Path | None]:
    """The runs directory shown and the one compared against; moves asv's ``index.html`` to
    ``asv.html`` (not before runs are known to exist, so without any the site stays asv's)."""
    index, asv_page = html_dir / "index.html", html_dir / ASV_PAGE
    if not asv_page.is_file() and not index.is_file():
        raise SiteError(f"{index} not found: run `asv publish` first")
    commits = commit_runs_dirs(runs_root)
    if runs is None:
        if not commits:
            raise NoRunsError(f"no commit folder with run records under {runs_root}")
        runs = commits[-1]
    if index.is_file() and FRONT_PAGE_MARKER not in index.read_text(encoding="utf-8"):
        os.replace(index, asv_page)
    runs = Path(runs)
    if not runs.is_dir():
        raise SiteError(f"runs directory {runs} does not exist")
    if previous is None:
        earlier = [c for c in commits if c.resolve() != runs.resolve()]
        previous = earlier[-1] if earlier else None
    return runs, previous


def peak_paragraph(plots_dir: Path) -> str:
    """The peak FLOP/s probed around the run (the MFU denominator), from the report's ``peak.json``."""
    try:
        log = json.loads((plots_dir / "peak.json").read_text())
    except (OSError, ValueError):
        return ""
    items = []
    for phase in ("start", "end"):
        if phase in log:
            peaks = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in log[phase].get("peaks", {}).items())
            items.append(f"{phase}: {peaks} GFLOP/s (1-min load {log[phase].get('load1', 0):.2f})")
    badge = ('<span class="badge noisy">noisy</span>' if log.get("noisy") else '<span class="badge quiet">quiet</span>')
    return (f'<div class="meta">Peak FLOP/s probed around the run (MFU denominator): {esc("; ".join(items))} '
            f'{badge} <span title="{esc(log.get("rule"))}">ⓘ</span></div>')


def write_compare(html_dir: Path, previous: Path | None, runs: Path) -> tuple[str, str | None]:
    """``compare.html``/``.csv`` of ``runs`` against ``previous``: the header's link and the
    summary line (``""``, None without a previous commit)."""
    from .. import report

    if previous is None or not Path(previous).is_dir():
        return "", None
    commit = runs.name
    table = report.compare_table(Path(previous), runs)
    nav = f'<p><a href="index.html">← etbench results</a> · <a href="{ASV_PAGE}#/regressions">asv regressions</a></p>'
    (html_dir / "compare.html").write_text(report.compare_html(table, Path(previous).name, commit, nav=nav),
                                           encoding="utf-8")
    (html_dir / "compare.csv").write_text(table.to_csv(index=False), encoding="utf-8")
    counts = ", ".join(f"{n} {k}" for k, n in sorted(report.verdict_counts(table).items()))
    link = (f' · <a href="compare.html">compare with {esc(Path(previous).name)}</a> '
            f'<span class="meta">({esc(counts)})</span>')
    return link, f"compare.html: {commit} vs {Path(previous).name} ({counts})"


def family_anchors(ctx: SectionContext, rendered: list[Rendered]) -> dict[str, str]:
    """Where each family with records is shown: its own section, else the first section of its
    report section (:attr:`impls.families.Family.section`); families shown nowhere are left out."""
    by_section = {section.name: r.anchors for section, r in zip(SECTIONS, rendered)}
    own = {anchor for anchor, _ in by_section.get("runs", [])}
    anchors = {}
    for name in ctx.with_records:
        family = families.get(name)
        if f"family-{name}" in own:
            anchors[name] = f"family-{name}"
        elif family and by_section.get(family.section):
            anchors[name] = by_section[family.section][0][0]
    return anchors


def nav_html(ctx: SectionContext, rendered: list[Rendered], published) -> str:
    """The navigation bar: the findings first, every family with records in site order (its title,
    its question on hover; :mod:`impls.families`), then the report sections, the isoFLOP sweeps and the other
    machines."""
    links = []
    for name, anchor in family_anchors(ctx, rendered).items():
        family = families.get(name)
        question = f' title="{esc(family.question)}"' if family and family.question else ""
        links.append(f'<a href="#{esc(anchor)}"{question}>{esc(families.title(name))}</a>')
    lead = [f'<a href="#{esc(anchor)}"><b>{esc(text)}</b></a>'
            for section, r in zip(SECTIONS, rendered) if section.name == "findings" for anchor, text in r.anchors]
    sections = [f'<a href="#{esc(anchor)}">{esc(text)}</a>' for section, r in zip(SECTIONS, rendered)
                if section.name not in ("runs", "findings") for anchor, text in r.anchors]
    sections += [published.nav] if published else []
    # Spaces between the links: lines break between them, never inside a title.
    return " ".join(lead + links) + (f' <span class="sections">{" ".join(sections)}</span>' if sections else "")


def header_html(ctx: SectionContext, plots_dir: Path, n_families: int, compare_link: str) -> str:
    """The page's header: commit, devices, run counts, the peak probe, links to asv and downloads."""
    from .. import report

    loaded, commit = ctx.loaded, ctx.commit
    devices = sorted({report.describe_device(k, n) or "?" for k, n in
                      zip(loaded.runs.get("device.type", []), loaded.runs.get("device.name", []))})
    noisy_total = int(sum(1 for v in loaded.runs.get("load.noisy", []) if bool_value(v)))
    downloads = " · ".join(f'<a href="{ctx.rel_plots}/{n}">{n}</a>' for n in ("summary.csv", "summary.md")
                           if n in ctx.copied)
    return f"""<header><h1>etbench results · commit {esc(commit)}</h1>
<div class="meta">{esc(", ".join(devices))} · {len(loaded.runs)} runs in {n_families} families ·
{'<span class="badge noisy">' + str(noisy_total) + ' noisy</span>' if noisy_total else '<span class="badge quiet">no run flagged noisy</span>'}
{f' · <span class="badge refused">{len(loaded.refused)} refused</span>' if loaded.refused else ''}</div>
{peak_paragraph(plots_dir)}
<div class="meta"><a href="{ASV_PAGE}">asv: per-benchmark history</a> · <a href="{ASV_PAGE}#/regressions">asv: regressions</a>{compare_link}{' · downloads: ' + downloads if downloads else ''}</div>
</header>"""


def document_html(commit: str, header: str, nav: str, body: str, page: Page) -> str:
    """The whole page: head (styles, the plotting library's CDN URLs), header, navigation, the
    sections, the chart specs and the script drawing them."""
    from .. import report

    scripts = "".join(f'<script src="{url}"></script>' for url in REPORT_CDN_ASSETS)
    specs_json = json.dumps(json_safe(page.specs), separators=(",", ":")).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{FRONT_PAGE_MARKER}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>etbench results: {esc(commit)}</title>
<link rel="icon" href="swallow.ico">
<style>{PAGE_CSS}{report.TABLE_CSS}</style>
{scripts}
</head><body>
{header}
<div id="vega-missing">The plotting library did not load: the interactive charts are missing (static PNGs are linked under each).</div>
<nav class="families">{nav}</nav>
<main>
<p class="note">Every table sorts by a click on its header. s/step is the median of the timed steps with a
bootstrap 95% interval where the record has one; <b>noisy</b> rows were measured while the 1-min load exceeded the
cores in use; <b>refused</b> records failed the consistency check (e.g. MFU above 100%) and are not plotted.
Run names link to asv's history graph of their benchmark.</p>
{body}
</main>
<script type="application/json" id="etbench-specs">{specs_json}</script>
<script>{report.SORTABLE_JS}</script>
<script>{FILTER_JS}</script>
<script>{EMBED_JS}</script>
</body></html>
"""


def section_context(html_dir: Path, runs: Path, plots_dir: Path, isoflop_root: Path) -> SectionContext:
    """Load the commit's records and copy the report's files next to the page."""
    from .. import report

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", report.RecordWarning)
        loaded = report.load_all([runs])
    rel_plots = f"{REPORT_SUBDIR}/{runs.name}"
    copied = set(copy_files(plots_dir, html_dir / rel_plots, ("*.png", "summary.csv", "summary.md")))
    return SectionContext(loaded=loaded, page=Page(), copied=copied, rel_plots=rel_plots, asv=AsvIndex(html_dir),
                          html_dir=html_dir, commit=runs.name, isoflop_root=Path(isoflop_root), plots_dir=plots_dir)


def build_front_page(html_dir: Path, runs_root: Path = Path("results/runs"),
                     plots_root: Path = Path("results/plots"), isoflop_root: Path = Path("results/isoflop"),
                     runs: Path | None = None, previous: Path | None = None,
                     published_root: Path | None = None) -> list[str]:
    """Make etbench's report the site's front page, asv's pages alongside.

    asv's ``index.html`` (written by ``asv publish``) is moved to ``asv.html``; the new
    ``index.html`` shows, per benchmark family of the latest runs directory (``runs`` or the
    newest commit folder under ``runs_root``): the summary table (sortable, step-time CIs, load
    flag, MFU/HFU, refused records with the reason), interactive Vega-Lite charts (loss vs FLOPs,
    throughput/memory, technique comparison, interleaved comparison) with the report's PNGs as
    static copies, the isoFLOP sweep of that commit, and links into asv's graphs.  With an
    earlier commit folder (``previous``, default the one before), ``compare.html`` compares the
    two.  The page names the plotting library's CDN URLs; ``vendor`` replaces them with local
    copies.  Machines published under ``published_root`` (:mod:`impls.site.published`) get a
    section and ``published.html``.  Returns a summary.
    """
    from . import published as site_published

    html_dir = Path(html_dir)
    runs, previous = pick_runs(html_dir, runs_root, runs, previous)
    plots_dir = Path(plots_root) / runs.name
    ctx = section_context(html_dir, runs, plots_dir, isoflop_root)
    rendered = [section.html(ctx) for section in SECTIONS]
    published = site_published.build(html_dir, published_root, commit=ctx.commit, runs_dir=runs, loaded=ctx.loaded,
                                     plots_dir=plots_dir)
    n_families, loaded = len(table_families(ctx.loaded)), ctx.loaded
    summary = [f"front page: {n_families} families, {len(loaded.runs)} runs, {len(loaded.refused)} refused, "
               f"{len(loaded.interleaved)} interleaved comparisons, {len(sweep_dirs(ctx))} isoFLOP sweeps from {runs}"]
    compare_link, compare_line = write_compare(html_dir, previous, runs)
    summary += [compare_line] if compare_line else []
    summary += [published.summary] if published else []
    body = "".join(r.html for r in rendered) + (published.section if published else "")
    document = document_html(ctx.commit, header_html(ctx, plots_dir, n_families, compare_link),
                             nav_html(ctx, rendered, published), body, ctx.page)
    (html_dir / "index.html").write_text(document, encoding="utf-8")
    summary.insert(1, f"{len(ctx.page.specs)} interactive charts; asv's page moved to {ASV_PAGE}")
    return summary
