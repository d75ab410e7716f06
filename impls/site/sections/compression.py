"""The front page's "Compression techniques" section (report section ``compression``,
:mod:`impls.report.compression`)."""
from __future__ import annotations

from ..page import figures_html
from .base import Rendered, SectionContext, questions_html, section_figures

#: Captions of the section's PNGs (which ones, and in which order: the families' ``figures``).
FIGURE_CAPTIONS = {
    "compression_memory.png": "memory by component per technique, normalised to its family baseline",
    "compression_loss_vs_sparsity.png": "loss at the budget vs sparsity, per pruning method",
    "compression_loss_vs_rank.png": "loss at the budget vs rank: factorised layers, LoRA, GaLore",
    "compression_sparse_crossover.png": "sparse storage: bytes and matmul time vs density per format",
    "compression_data.png": "training data: bytes per token per storage format, loader vs the step's need",
}


def compression_section(loaded, copied: set, rel_plots: str, heading: str = "") -> str:
    """The front page's "Compression techniques" section (:mod:`impls.report.compression`): one
    sortable table of every pruning, quantized-training, low-rank, activation-compression and
    sparse-storage run against its family's baseline, and the report's curves (loss vs sparsity,
    loss vs rank, memory by component, the sparse-format crossover, the token-storage formats: the
    PNGs of the section's families in :mod:`impls.families`); ``heading`` goes under the title.
    Empty without such records."""
    from ... import report
    from ...report import compression as rc

    import pandas as pd

    frame = rc.compression_frame(loaded.runs, loaded.interleaved)
    if frame.empty and not loaded.storage:
        return ""
    parts = ['<section class="family" id="compression"><h2>Compression techniques</h2>', heading,
             '<p class="note">Each run against the baseline of its own family, trained to the same model-FLOP '
             "budget. Speed: baseline time per token ÷ the technique's, from interleaved rounds (95% interval); "
             "n/a where the technique was not timed. Memory: each exact component ÷ the baseline's.</p>"]
    if not frame.empty:
        rows = []
        for r in frame.to_dict("records"):
            lo, hi = r.get("speed_lo"), r.get("speed_hi")
            speed = r.get("speed_ratio")
            speed_text = (None if speed is None or speed != speed else
                          f"{speed:.3g} [{lo:.3g}, {hi:.3g}]" if lo == lo and hi == hi else f"{speed:.3g}")
            rows.append({"family": r["family"], "techniques": r["techniques"],
                         r["knob"] or "knob": None if pd.isna(r["knob_value"]) else str(r["knob_value"]),
                         "loss Δ": r["loss_delta"], "speed ratio": (speed_text, speed),
                         **{f"{c} ÷ base": r.get(f"{c} / baseline") for c in rc.COMPONENTS.values()},
                         "counted FLOPs ÷ base": r.get("counted flops / baseline")})
        columns = list(dict.fromkeys(k for row in rows for k in row))
        for row in rows:
            for c in columns:
                row.setdefault(c, None)
        parts.append('<div class="scroll">' + report.html_table(
            rows, columns, formats={"loss Δ": "{:+.4f}"},
            text_columns=[c for c in columns if c in ("family", "techniques") or c in {k for k, _ in rc.KNOBS.values()}],
            table_id="compression-table") + "</div>")
    figures = [(name, FIGURE_CAPTIONS.get(name, name)) for name in section_figures("compression") if name in copied]
    parts.append(figures_html(rel_plots, figures))
    parts.append("</section>")
    return "".join(parts)


class CompressionSection:
    """Report section ``compression``."""

    name = "compression"

    def html(self, ctx: SectionContext) -> Rendered:
        text = compression_section(ctx.loaded, ctx.copied, ctx.rel_plots, questions_html(ctx, self.name))
        return Rendered(text, [("compression", "compression")] if text else [])
