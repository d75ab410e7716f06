"""The front page's isoFLOP sweeps (report section ``isoflop``): per sweep of the commit
(``results/isoflop/<commit>-<profile>/``) the curves with their fitted optima, the fit and
power-law tables, causal sampling and the sweep's figures."""
from __future__ import annotations

import json
from pathlib import Path

from ..asv_links import AsvIndex, links_html
from ..page import REPORT_SUBDIR, VEGA_LITE_SCHEMA, Page, copy_files, esc, figures_html, json_safe
from .base import Rendered, SectionContext


def spec_isoflop(points, fits) -> dict:
    """isoFLOP curves: final loss vs parameters per budget (one panel each), the fitted parabola
    in log-params and its optimum (filled where the optimum lies inside the sampled sizes)."""
    import math

    values = []
    for _, p in points.iterrows():
        values.append({"kind": "point", "variant": p["variant"], "budget": f"{p['budget']:.0e} FLOPs",
                       "size": p["size"], "params": p["params"], "loss": p["final_val_loss"], "steps": p["steps"],
                       "tokens": p["tokens"], "seconds_per_step": p["seconds_per_step"], "status": p["status"]})
    for _, f in fits.iterrows():
        budget = f"{f['budget']:.0e} FLOPs"
        sizes = points[(points["variant"] == f["variant"]) & (points["budget"] == f["budget"])]["params"]
        if sizes.empty or not all(map(math.isfinite, (f["a"], f["b"], f["c"]))):
            continue
        lo, hi = math.log(sizes.min()), math.log(sizes.max())
        for i in range(41):
            x = lo + (hi - lo) * i / 40
            values.append({"kind": "fit", "variant": f["variant"], "budget": budget, "params": math.exp(x),
                           "loss": f["a"] * x * x + f["b"] * x + f["c"]})
        if math.isfinite(f["n_opt"]) and lo - 1 <= math.log(max(f["n_opt"], 1e-300)) <= hi + 1:
            values.append({"kind": "optimum", "variant": f["variant"], "budget": budget, "params": f["n_opt"],
                           "loss": f["loss_opt"], "status": f["status"], "n_opt_lo": f["n_opt_lo"],
                           "n_opt_hi": f["n_opt_hi"], "inside": "inside sampled sizes" if f["status"] == "ok"
                           else "outside / uncertain"})
    colour = {"field": "variant", "type": "nominal"}
    x = {"field": "params", "type": "quantitative", "scale": {"type": "log"}, "title": "parameters (log)"}
    y = {"field": "loss", "type": "quantitative", "scale": {"zero": False}, "title": "final validation loss"}
    return {
        "$schema": VEGA_LITE_SCHEMA, "data": {"values": json_safe(values)},
        "title": {"text": "isoFLOP curves", "subtitle": "points: runs; lines: parabola fit in log(params); "
                                                         "diamonds: fitted optimum (hollow: outside the sampled sizes)"},
        "facet": {"column": {"field": "budget", "type": "nominal", "title": "budget"}},
        "spec": {"width": 300, "height": 260, "layer": [
            {"transform": [{"filter": "datum.kind == 'fit'"}], "mark": {"type": "line", "opacity": 0.7},
             "encoding": {"x": x, "y": y, "color": colour}},
            {"transform": [{"filter": "datum.kind == 'point'"}], "mark": {"type": "point", "filled": True, "size": 50},
             "encoding": {"x": x, "y": y, "color": colour, "tooltip": [
                 {"field": f, "type": t, **({"format": fm} if fm else {})} for f, t, fm in
                 (("variant", "nominal", None), ("size", "nominal", None), ("params", "quantitative", ","),
                  ("loss", "quantitative", ".4f"), ("steps", "quantitative", None), ("tokens", "quantitative", ","),
                  ("seconds_per_step", "quantitative", ".4g"), ("status", "nominal", None))]}},
            {"transform": [{"filter": "datum.kind == 'optimum'"}],
             "mark": {"type": "point", "shape": "diamond", "size": 160, "strokeWidth": 2},
             "encoding": {"x": x, "y": y, "color": colour,
                          "fill": {"condition": {"test": "datum.status == 'ok'", "field": "variant", "type": "nominal"},
                                   "value": "transparent"},
                          "tooltip": [{"field": f, "type": t, **({"format": fm} if fm else {})} for f, t, fm in
                                      (("variant", "nominal", None), ("params", "quantitative", ",.0f"),
                                       ("n_opt_lo", "quantitative", ",.0f"), ("n_opt_hi", "quantitative", ",.0f"),
                                       ("loss", "quantitative", ".4f"), ("status", "nominal", None))]}},
        ]},
        "resolve": {"scale": {"x": "shared", "y": "shared"}},
    }



def fits_html(page: Page, iso_dir: Path, rel: str, copied: set[str]) -> str:
    """The isoFLOP chart and the fitted optima's table; a note where the tables do not read."""
    import pandas as pd

    from ... import report

    try:
        points = pd.read_csv(iso_dir / "points.csv")
        fits = pd.read_csv(iso_dir / "fits.csv")
    except (OSError, ValueError) as exc:
        return f'<p class="note">no isoFLOP tables readable in {esc(iso_dir)}: {esc(exc)}</p>'
    chart = page.chart(spec_isoflop(points, fits), png=f"{rel}/isoflop.png" if "isoflop.png" in copied else None,
                       caption="Hover a point for the run, a diamond for the fitted optimum and its interval.")
    fit_rows = []
    for _, f in fits.iterrows():
        fit_rows.append({"variant": f["variant"], "budget": f["budget"], "sizes": f["n_sizes"],
                         "optimal params": f["n_opt"],
                         "95% interval": f"[{f['n_opt_lo']:.3g}, {f['n_opt_hi']:.3g}]",
                         "loss at optimum": f["loss_opt"], "± se": f["loss_opt_se"], "status": f["status"],
                         "nearest size": f["nearest_size"]})
    return chart + "<h3>Fitted optima</h3>" + report.html_table(
        fit_rows, list(fit_rows[0]) if fit_rows else ["variant"],
        formats={"budget": "{:.0e}", "sizes": "{:.0f}", "optimal params": "{:,.0f}", "loss at optimum": "{:.4f}",
                 "± se": "{:.3g}"},
        text_columns=("variant", "95% interval", "status", "nearest size"), table_id=f"fits-{iso_dir.name}")


def extras_html(iso_dir: Path) -> str:
    """The power-law table and the causal-sampling numbers, where the sweep wrote them."""
    import pandas as pd

    from ... import report

    parts = []
    try:
        power = pd.read_csv(iso_dir / "power_law.csv")
        power_rows = [{k: (None if v != v else v) for k, v in r.items()} for r in power.to_dict("records")]
        parts.append("<h3>Power law N<sub>opt</sub> ∝ C<sup>a</sup></h3>" + report.html_table(
            power_rows, list(power.columns), text_columns=("variant", "status"), table_id=f"power-{iso_dir.name}"))
    except (OSError, ValueError):
        pass
    try:
        causal = json.loads((iso_dir / "causal_sampling.json").read_text())
        parts.append("<h3>Causal sampling (MoD router at inference)</h3><p class=\"note\">" + ", ".join(
            f"{esc(k)} = {esc(f'{v:.4g}' if isinstance(v, float) else v)}" for k, v in causal.items()) + "</p>")
    except (OSError, ValueError):
        pass
    return "".join(parts)


#: The sweep's own figures (``python -m impls.isoflop``), with their captions.
SWEEP_FIGURES = (
    ("routing.png", "MoD routing: which tokens the router sends through each block"),
    ("loss_vs_flops.png", "loss vs FLOPs of the sweep's runs"),
    ("step_time.png", "step time of the optimal sizes vs the baseline"))


def isoflop_section(iso_dir: Path, html_dir: Path, page: Page, asv: AsvIndex) -> str:
    """One sweep's section; its files are copied under ``report/isoflop-<name>/``."""
    rel = f"{REPORT_SUBDIR}/isoflop-{iso_dir.name}"
    copied = set(copy_files(iso_dir, html_dir / rel, ("*.png", "*.csv", "*.json")))
    return (f'<section class="family" id="isoflop-{esc(iso_dir.name)}"><h2>isoFLOP sweep (MoD): {esc(iso_dir.name)}</h2>'
            + links_html(asv.family_links("isoflop")) + fits_html(page, iso_dir, rel, copied) + extras_html(iso_dir)
            + figures_html(rel, [(n, c) for n, c in SWEEP_FIGURES if n in copied]) + "</section>")


def sweep_dirs(ctx: SectionContext) -> list[Path]:
    """The commit's isoFLOP sweeps, ``<isoflop_root>/<commit>-<profile>/``."""
    root = Path(ctx.isoflop_root)
    return sorted(p for p in root.glob(f"{ctx.commit}-*") if p.is_dir()) if root.is_dir() else []


class IsoflopSection:
    """Report section ``isoflop``: one section per sweep of the commit."""

    name = "isoflop"

    def html(self, ctx: SectionContext) -> Rendered:
        dirs = sweep_dirs(ctx)
        return Rendered("".join(isoflop_section(d, ctx.html_dir, ctx.page, ctx.asv) for d in dirs),
                        [(f"isoflop-{d.name}", f"isoFLOP {d.name}") for d in dirs])
