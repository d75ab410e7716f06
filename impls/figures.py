"""Figures off pyplot: a matplotlib ``Figure`` on the Agg canvas, saved as a PNG atomically.

The one place the suite's figure resolution (:data:`DPI`) and its way of writing a figure are
defined, at the bottom of the layers (:mod:`impls.files` only), so that an experiment that draws
its own figures (:mod:`impls.isoflop`) does not import the report, which sits above it.
``pyplot`` is never used: no global backend switch, no figure left registered in a long process.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .files import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120


def new_figure(width: float, height: float) -> Figure:
    """A figure on the non-interactive Agg canvas, independent of pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="tight")
    FigureCanvasAgg(figure)
    return figure


def save_figure(destination: Path, figure: Figure) -> Path:
    """Write ``figure`` as a PNG at :data:`DPI` to ``destination``, atomically (a reader never sees
    half a PNG; a failed write leaves the previous file)."""
    with atomic_path(destination) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)
    return destination
