"""The report's sections: one protocol, and the ordered registry :func:`impls.report.write_report`
walks.

A section turns the loaded records into one frame (its table), writes its files from that frame
(figures, and the CSV of each figure's data) and renders its part of ``summary.md``.  Splitting
the three keeps every section's numbers in one place: the figures and the markdown read the same
frame, never two computations of it.  A section's ``name`` is one of
:data:`impls.families.SECTIONS`, and the families it covers are
:func:`impls.families.of_section` of that name (the ``runs`` section draws the generic figures of
every family).  ``summary.md`` is the sections' markdown in registry order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import pandas as pd

from . import atscale, compression, data_parallel, findings, model_parallel, runs, tokens
from .records import Loaded


@runtime_checkable
class Section(Protocol):
    """One report section (see the module's docstring)."""

    #: One of :data:`impls.families.SECTIONS`.
    name: str

    def frame(self, loaded: Loaded) -> pd.DataFrame:
        """The section's table, from every record loaded (empty when none is the section's)."""
        ...

    def figures(self, frame: pd.DataFrame, loaded: Loaded, out_dir: Path) -> list[Path]:
        """Write the section's files into ``out_dir`` (only those with data); return their paths."""
        ...

    def markdown(self, frame: pd.DataFrame, loaded: Loaded) -> str:
        """The section's part of ``summary.md`` ("" when it has nothing to say)."""
        ...


#: The sections in the order of ``summary.md``.  ``isoflop`` has no report section: its fits are
#: drawn by :mod:`impls.isoflop` and shown by the site.
SECTIONS: tuple[Section, ...] = (runs.SECTION, data_parallel.SECTION, model_parallel.SECTION, atscale.SECTION,
                                 compression.SECTION, tokens.SECTION, findings.SECTION)
