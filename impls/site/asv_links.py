"""Links into asv's per-benchmark graphs: the benchmarks of asv's ``index.json`` by class, a
family's benchmarks, and a record's benchmark filtered to its parameters."""
from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path

from .. import families
from .page import ASV_PAGE, esc

#: Which of a class's benchmarks a record's row links to, best first.
PREFERRED_METHODS = ("track_seconds_per_mtok", "time_train_step", "track_val_loss_at_budget",
                     "track_activations_bytes", "track_min_loss_fitted")


class AsvIndex:
    """The benchmarks of asv's ``index.json``, for links into asv's per-benchmark graphs.

    A family's classes and the regex of its records' file stems come from :mod:`impls.families`.
    The asv URL of a record is ``asv.html#<module>.<Class>.<method>?p-<param>=<value repr>``
    (asv 0.6's graphdisplay.js matches ``p-<name>`` against the parameter reprs of index.json); a
    stem that does not parse (or a family without a stem regex) links the class's graph unfiltered.
    """

    def __init__(self, html_dir: Path):
        try:
            self.benchmarks = json.loads((Path(html_dir) / "index.json").read_text())["benchmarks"]
        except (OSError, ValueError, KeyError):
            self.benchmarks = {}

    def of_class(self, cls: str) -> list[str]:
        return sorted(name for name in self.benchmarks if name.rsplit(".", 1)[0] == cls)

    def family_links(self, family: str) -> list[tuple[str, str]]:
        """(text, href) of every asv benchmark of the family's classes."""
        family_ = families.get(family)
        classes = family_.classes if family_ else ()
        return [(name.split(".", 1)[1], f"{ASV_PAGE}#{name}") for cls in classes for name in self.of_class(cls)]

    def record_href(self, family: str, stem: str) -> str | None:
        """asv's graph of the record's benchmark, filtered to its parameters where they parse."""
        family_ = families.get(family)
        if family_ is None:
            return None
        classes, pattern = family_.classes, family_.stem
        names = self.of_class(classes[0])
        if not names:
            return None
        name = next((f"{classes[0]}.{m}" for m in PREFERRED_METHODS if f"{classes[0]}.{m}" in names), names[0])
        match = re.fullmatch(pattern, stem) if pattern else None
        info = self.benchmarks[name]
        query = []
        if match:
            for param, choices in zip(info.get("param_names") or [], info.get("params") or []):
                value = match.groupdict().get(param)
                chosen = next((c for c in (repr(value), value) if value is not None and c in choices), None)
                if chosen is None:
                    query = []
                    break
                query.append(f"p-{urllib.parse.quote(param, safe='')}={urllib.parse.quote(chosen, safe='')}")
        return f"{ASV_PAGE}#{name}" + ("?" + "&".join(query) if query else "")


def links_html(links: list[tuple[str, str]]) -> str:
    """The ``asv history:`` line of a section; empty without links."""
    if not links:
        return ""
    return '<p class="links">asv history: ' + " · ".join(f'<a href="{esc(h)}">{esc(t)}</a>' for t, h in links) + "</p>"
