"""Figures: every report figure is drawn on its own Agg canvas (:func:`new_figure`), never through
pyplot's global state, so importing the report never changes the caller's backend and figures can
be drawn in forked workers; each is saved atomically (:func:`save_figure`).  Colours come from one
palette rule (:func:`palette`), so a run or a technique looks the same in every figure of a
report."""
from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import seaborn as sns

from ..figures import DPI, new_figure, save_figure  # the one definition, shared with isoflop

__all__ = ["DPI", "new_figure", "save_figure", "palette", "run_palette"]


def palette(names: Iterable[str]) -> dict[str, tuple]:
    """One colour per distinct name, in first-seen order: ``tab10`` up to ten names (the most
    distinguishable), ``husl`` beyond."""
    names = list(dict.fromkeys(names))
    return dict(zip(names, sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))))


def run_palette(runs: pd.DataFrame) -> dict[str, tuple]:
    """One colour per run, shared by all figures so a run looks the same everywhere."""
    return palette(runs["run"])
