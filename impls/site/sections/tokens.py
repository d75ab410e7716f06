"""The front page's "Data and token efficiency" section (report section ``tokens``,
:mod:`impls.report.tokens`)."""
from __future__ import annotations

from ..page import figures_html
from .base import Rendered, SectionContext, questions_html, section_figures

#: Captions of the section's PNGs (which ones, and in which order: the families' ``figures``).
FIGURE_CAPTIONS = {
    "tokens_speedup_vs_mask_rate.png": "masked-token dropping: speed-up over the full-sequence encoder vs mask rate",
    "tokens_random_ltd_schedule.png": "random-LTD: kept tokens per middle layer over the steps, FLOPs saved",
    "tokens_distill_sweep.png": "distillation: student loss vs temperature per α, the student alone as a line",
}


def tokens_section(loaded, copied: set, rel_plots: str, heading: str = "") -> str:
    """The front page's "Data and token efficiency" section (:mod:`impls.report.tokens`): one
    sortable table of every sequence-length warm-up, distillation, masked-token-dropping,
    random-LTD and token-dropping run against its group's baseline -- FLOPs saved counted vs
    analytic, the loss difference at the budget and at equal counted FLOPs, the interleaved speed
    ratio -- and the section's figures; empty without such records."""
    from ... import report
    from ...report import tokens as rt

    frame = rt.tokens_frame(loaded.runs, loaded.interleaved)
    if frame.empty:
        return ""
    parts = ['<section class="family" id="tokens"><h2>Data and token efficiency</h2>', heading,
             '<p class="note">Each run against the baseline of its own group (same model, data, length, masked-LM '
             "rate and budget). FLOPs saved: counted over the steps as trained and the technique's analytic formula. "
             "Loss Δ at the budget, and at equal counted FLOPs (both validation curves read at the smaller run's "
             "total). Speed: baseline time per token ÷ the technique's, interleaved rounds (95% interval).</p>"]
    rows = []
    for r in frame.to_dict("records"):
        lo, hi, speed = r.get("speed_lo"), r.get("speed_hi"), r.get("speed_ratio")
        speed_text = (None if speed is None or speed != speed else
                      f"{speed:.3g} [{lo:.3g}, {hi:.3g}]" if lo == lo and hi == hi else f"{speed:.3g}")
        rows.append({"family": r["family"], "techniques": r["techniques"], "knob": r.get("knob_value"),
                     "budget": r.get("budget_flops"), "steps": r.get("steps"), "baseline steps": r.get("baseline_steps"),
                     "FLOPs saved (counted)": r.get("counted_flops_saved"),
                     "FLOPs saved (analytic)": r.get("analytic_flops_saved"),
                     "counted ÷ analytic": r.get("saved_counted_vs_analytic"),
                     "loss Δ at budget": r.get("loss_delta_at_budget"),
                     "loss Δ at equal counted FLOPs": r.get("loss_delta_at_equal_counted_flops"),
                     "speed ratio": (speed_text, speed)})
    columns = list(rows[0])
    parts.append('<div class="scroll">' + report.html_table(
        rows, columns, formats={"loss Δ at budget": "{:+.4f}", "loss Δ at equal counted FLOPs": "{:+.4f}"},
        text_columns=["family", "techniques", "knob", "budget"], table_id="tokens-table") + "</div>")
    figures = [(name, FIGURE_CAPTIONS.get(name, name)) for name in section_figures("tokens") if name in copied]
    parts.append(figures_html(rel_plots, figures))
    parts.append("</section>")
    return "".join(parts)


class TokensSection:
    """Report section ``tokens``."""

    name = "tokens"

    def html(self, ctx: SectionContext) -> Rendered:
        text = tokens_section(ctx.loaded, ctx.copied, ctx.rel_plots, questions_html(ctx, self.name))
        return Rendered(text, [("tokens", "data & tokens")] if text else [])
