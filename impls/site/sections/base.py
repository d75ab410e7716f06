"""What a front-page section is: the context it renders from, what it gives back, the
:class:`SiteSection` protocol every section of :data:`impls.site.sections.SECTIONS` follows, and
what sections read from the families table (:mod:`impls.families`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ... import families
from ..asv_links import AsvIndex, links_html
from ..page import Page, esc


def families_with_records(loaded) -> list[str]:
    """Every family the commit has records of (any kind), in site order."""
    names = set(loaded.runs["family"]) if "family" in loaded.runs else set()
    for records in (loaded.refused, loaded.interleaved, loaded.extra, loaded.comm, loaded.storage):
        names |= {r["family"] for r in records}
    return sorted(names, key=families.order_key)


def table_families(loaded) -> list[str]:
    """The families with a section of their own (section ``runs``): those with runs, refused
    records, interleaved comparisons or harness-overhead records, in site order."""
    return sorted(set(loaded.runs["family"]) | {r["family"] for r in loaded.refused}
                  | {r["family"] for r in loaded.interleaved} | {r["family"] for r in loaded.extra},
                  key=families.order_key)


def section_figures(section: str) -> list[str]:
    """The PNGs the report writes for a section's families, in site order, each once."""
    return list(dict.fromkeys(png for name in families.of_section(section) for png in families.get(name).figures))


@dataclass
class SectionContext:
    """Everything a section reads: the commit's records (``report.Loaded``), the page collecting
    the chart specs, the report's files copied next to the page (``copied``, names under
    ``rel_plots``; the report's folder is ``plots_dir``), asv's benchmarks, the site folder, the
    commit, its isoFLOP sweeps' root."""

    loaded: Any
    page: Page
    copied: set[str]
    rel_plots: str
    asv: AsvIndex
    html_dir: Path
    commit: str
    isoflop_root: Path
    plots_dir: Path | None = None

    def png(self, name: str) -> str | None:
        """The copied report PNG ``name`` as a link from the page, or None where it was not written."""
        return f"{self.rel_plots}/{name}" if name in self.copied else None

    @functools.cached_property
    def with_records(self) -> list[str]:
        return families_with_records(self.loaded)

    @functools.cached_property
    def own_sections(self) -> list[str]:
        return table_families(self.loaded)


def questions_html(ctx: SectionContext, section: str) -> str:
    """A report section's heading area: each of its families with records, its title (linked to
    the family's own section where it has one) and its question; the asv history of those that
    have no section of their own."""
    names = [n for n in families.of_section(section) if n in ctx.with_records]
    if not names:
        return ""
    items = []
    for name in names:
        title = f"<b>{esc(families.title(name))}</b>"
        if name in ctx.own_sections:
            title = f'<a href="#family-{esc(name)}">{title}</a>'
        items.append(f"<li>{title}: {esc(families.get(name).question)}</li>")
    links = [link for n in names if n not in ctx.own_sections for link in ctx.asv.family_links(n)]
    return '<ul class="questions">' + "".join(items) + "</ul>" + links_html(links)


@dataclass
class Rendered:
    """A section's HTML and the ``(id, text)`` of each ``<section>`` it wrote, for the navigation."""

    html: str = ""
    anchors: list[tuple[str, str]] = field(default_factory=list)


class SiteSection(Protocol):
    """The HTML side of a report section (``name``: one of :data:`impls.families.SECTIONS`)."""

    name: str

    def html(self, ctx: SectionContext) -> Rendered:
        """The section's HTML (empty where the commit has nothing for it)."""
        ...


def section_figure(section: str, kind: str) -> str | None:
    """The PNG of a section's families for ``kind`` (the name ending ``_<kind>.png``), or None."""
    return next((name for name in section_figures(section) if name.endswith(f"_{kind}.png")), None)
