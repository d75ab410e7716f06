"""The at-scale section (issue 24, item 5): the report's tables and files and the site's charts,
read from a dry-run sweep that ``etbench dryrun-sweep`` writes here (nano, world sizes 2 and 4,
once per module) and a small calibration record in the format of ``etbench plan-calibrate``; found
beside the ``runs`` folder as ``make bench`` lays it out, or given as paths; absent, one line."""
from __future__ import annotations

import json
import math
import shutil
import warnings
from html import escape
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from impls import cli, families, report
from impls.report import atscale
from impls.site import check, vendor
from impls.site.errors import FetchError, SiteError
from impls.site.front import document_html
from impls.site.page import Page
from impls.site.sections.atscale import AtscaleSection as SiteAtscale
from test_report import HASH_A, make_record

SWEEP_ARGS = ["--model", "nano", "--world-sizes", "2,4", "--layouts", "ddp,fsdp,dp+tp+pp", "--batch-size", "2",
              "--seq-len", "16"]
EXPLANATION = "a test's explanation of a ratio outside the tolerance"
VENDOR_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "site-vendor"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    """The sweep as the command writes it: two measured layouts at each world size, and 3-D
    parallelism skipped at both (no mesh of 4 ranks leaves it a dp of 2)."""
    out = tmp_path_factory.mktemp("sweep") / "sweep.json"
    assert cli.main(["dryrun-sweep", *SWEEP_ARGS, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def calibration() -> dict:
    """A calibration record: a fit point, two measured layouts, one unmeasured, the summary."""
    def row(name, n, predicted, measured, ci, *, fit=False, error=None):
        out = {"layout": f"{name} ws{n}", "name": name, "world_size": n, "model": "small",
               "predicted_seconds": predicted, "predicted_components": {"compute": predicted * 0.9, "bubble": 0.0},
               "measured_seconds": measured, "measured_ci": ci, "n": 6, "fit": fit, "load": {"noisy": False}}
        if measured is not None:
            out.update(ratio=measured / predicted, log_ratio=math.log(measured / predicted))
        return {**out, **({"error": error} if error else {})}

    return {"kind": families.PLAN_CALIBRATION, "schema": 1, "git_commit": "c" * 40, "git_dirty": False,
            "versions": {"torch": "2.13.0+cpu"}, "machine": {"cpu": "Test CPU", "cores": 2},
            "hardware": {"mfu": 0.5, "mfu_source": "fitted on single"},
            "rows": [row("single", 1, 0.3, 0.3, [0.29, 0.31], fit=True), row("ddp", 2, 0.4, 0.8, [0.7, 0.9]),
                     row("fsdp", 2, 0.5, 0.9, [0.85, 1.2]), row("tp", 2, 0.45, None, None, error="link not measured")],
            "skipped": [{"layout": "ckpt", "world_size": 2, "reason": "runs at world size 1 only", "kind": "grid"},
                        {"layout": "pp", "world_size": 2, "reason": "planner: layers do not divide", "kind": "refused"}],
            "spearman": 0.5, "spearman_n": 3, "spearman_by_world_size": {"2": 1.0},
            "median_abs_error": 0.65, "max_abs_error": 0.69, "worst_layout": "ddp ws2", "error_n": 2}


def explained(sweep: dict) -> dict:
    """The sweep with an explanation on its last measured row (the small sweep stays inside the
    tolerance; the section shows whatever the file says)."""
    rows = [dict(r) for r in sweep["rows"]]
    last = max(i for i, r in enumerate(rows) if not r.get("skipped"))
    rows[last]["explanation"] = EXPLANATION
    return {**sweep, "rows": rows}


@pytest.fixture
def results(tmp_path, sweep) -> Path:
    """``results/`` as ``make bench`` leaves it, with the artefacts in ``results/atscale/``."""
    root = tmp_path / "results"
    (root / "runs" / "abc1234" / "baseline").mkdir(parents=True)
    (root / "runs" / "abc1234" / "baseline" / "run.json").write_text(json.dumps(make_record("nano/adamw", HASH_A)))
    (root / "atscale").mkdir()
    (root / "atscale" / "sweep.json").write_text(json.dumps(explained(sweep)))
    (root / "atscale" / "calibration.json").write_text(json.dumps(calibration()))
    return root


def _measured(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["skipped"].isna()]


def test_the_sweep_frame_carries_every_row_and_ratio(sweep):
    frame = atscale.sweep_frame([{**sweep, "source": "sweep.json"}])
    assert len(frame) == len(sweep["rows"]) == 6
    assert list(zip(frame["world_size"], frame["layout"])) == [
        (n, layout) for n in (2, 4) for layout in ("ddp", "fsdp", "dp+tp+pp")]
    by_key = {(r["world_size"], r["layout"]): r for r in sweep["rows"]}
    for row in _measured(frame).to_dict("records"):
        raw = by_key[(row["world_size"], row["layout"])]
        assert row["model_states_ratio"] == raw["model_states_ratio"]
        assert row["traffic_ratio"] == raw["traffic_ratio"] and row["activation_ratio"] == raw["activation_ratio"]
        assert [row[f"{p}_ratio"] for p in atscale.STATE_PARTS] == [raw["model_states_ratios"][p] for p in atscale.STATE_PARTS]
        assert row["params_bytes"] == raw["params_bytes"] and row["mesh"] == f"dp{row['world_size']}"
        assert row["outside_tolerance"] == ""  # a nano sweep stays inside the tolerance
    skipped = frame[frame["skipped"].notna()]
    assert list(skipped["layout"]) == ["dp+tp+pp"] * 2
    assert list(skipped["skipped"]) == [by_key[(n, "dp+tp+pp")]["skipped"] for n in (2, 4)]
    assert skipped["params_bytes"].isna().all() and skipped["mesh"].isna().all()
    fsdp = frame[frame["layout"] == "fsdp"].set_index("world_size")
    assert fsdp.loc[4, "params_bytes"] < fsdp.loc[2, "params_bytes"]  # the shard halves


def test_the_report_finds_the_artefacts_beside_the_runs_folder(results, sweep):
    out = results / "plots"
    written = {p.name for p in report.write_report([results / "runs" / "abc1234"], out)}
    assert set(atscale.FILES) <= written
    summary = (out / "summary.md").read_text()
    section = summary[summary.index("## At scale"):]
    assert EXPLANATION in section
    for n in (2, 4):  # skipped points with the sweep's own reason
        reason = next(r["skipped"] for r in sweep["rows"] if r["world_size"] == n and r.get("skipped"))
        assert f"skipped nano dp+tp+pp N={n}: {reason}" in section
    assert "Test CPU, 2 cores: Spearman ρ 0.500 over 3 measured rows (ws2 1.000)" in section
    assert "median 0.650, largest 0.690 (ddp ws2)" in section
    assert "skipped pp ws2: planner: layers do not divide" in section and "link not measured" in section
    assert "commit cccccccccccc" in section
    csv = pd.read_csv(out / "atscale_sweep.csv")
    assert len(csv) == 6 and csv["explanation"].dropna().tolist() == [EXPLANATION]
    calib = pd.read_csv(out / "atscale_calibration.csv")
    assert list(calib["ratio"].round(6))[:3] == [1.0, 2.0, 1.8] and calib["measured_seconds"].isna().sum() == 1


def test_artefacts_given_as_paths_are_routed_and_win(results, tmp_path):
    folder = results / "atscale"
    loaded = report.load_all([folder])
    assert [Path(r["source"]).name for r in loaded.atscale] == ["calibration.json", "sweep.json"]
    assert loaded.holds_records() and loaded.runs.empty
    written = {p.name for p in report.write_report([folder], tmp_path / "out")}  # the artefacts alone: a report
    assert {"atscale_sweep.csv", "atscale_calibration.csv"} <= written
    # given with the runs, the paths are used and the folder beside the runs is not read again
    found = atscale.artefacts(report.load_all([results / "runs", folder / "calibration.json"]))
    assert (len(found.sweeps), len(found.calibrations), found.folder) == (0, 1, None)


def test_no_artefacts_is_one_line_not_an_error(results, tmp_path):
    shutil.rmtree(results / "atscale")
    out = tmp_path / "out"
    written = {p.name for p in report.write_report([results / "runs"], out)}
    assert not written & set(atscale.FILES)
    section = (out / "summary.md").read_text().split("## At scale")[1].split("\n## ")[0].strip().splitlines()
    (line,) = [text for text in section[1:] if text]  # under the heading, one line naming where it looked
    assert line.startswith("No at-scale artefacts") and f" in {results / 'atscale'}: " in line
    # records under no runs/ folder: nothing is guessed
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(results / "runs" / "abc1234" / "baseline" / "run.json", loose)
    found = atscale.artefacts(report.load_all([loose]))
    assert found.empty() and found.folder is None and "under no runs/ folder" in atscale.absent_note(found)
    rendered = SiteAtscale().html(_ctx(report.load_all([results / "runs"]), Page(), tmp_path))
    assert rendered.anchors == [] and rendered.html.count("<p") == 1 and "No at-scale artefacts" in rendered.html


def test_an_artefact_that_does_not_read_is_named_with_its_reason(results):
    (results / "atscale" / "broken.json").write_text(json.dumps({"kind": families.DRYRUN_SWEEP, "rows": [{"model": "x"}]}))
    (results / "atscale" / "other.json").write_text(json.dumps({"kind": families.RECIPE_PLAN}))  # another command's
    with pytest.warns(report.RecordWarning, match="broken.json: rows\\[0\\] lacks world_size, layout"):
        found = atscale.artefacts(report.load_all([results / "runs"]))
    assert [Path(s["source"]).name for s in found.skipped] == ["broken.json"] and len(found.sweeps) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", report.RecordWarning)
        text = atscale.SECTION.markdown(atscale.sweep_frame(found.sweeps), report.load_all([results / "runs"]))
    assert "not read: " in text and "rows[0] lacks world_size, layout" in text and "other.json" not in text


def _ctx(loaded, page: Page, html_dir: Path, plots_dir: Path | None = None):
    return SimpleNamespace(loaded=loaded, page=page, html_dir=html_dir, plots_dir=plots_dir, rel_plots="report/abc1234")


def _site(results: Path, tmp_path: Path) -> tuple[Page, object]:
    """The section rendered for the commit's records, with the report's files next to it."""
    loaded = report.load_all([results / "runs" / "abc1234"])
    plots = tmp_path / "plots"
    atscale.SECTION.figures(atscale.SECTION.frame(loaded), loaded, plots)
    page = Page()
    return page, SiteAtscale().html(_ctx(loaded, page, tmp_path / "html", plots))


def test_the_site_section_draws_its_charts_from_the_files(results, sweep, tmp_path):
    page, rendered = _site(results, tmp_path)
    assert rendered.anchors == [("atscale", "at scale")]
    specs = {spec["title"]["text"]: json.loads(json.dumps(spec, allow_nan=False)) for spec in page.specs.values()}
    assert set(specs) == {"Per-rank memory by layout (dry runs)", "Dry run vs formula, per rank",
                          "Planner calibration: Test CPU, 2 cores"}
    measured = [r for r in sweep["rows"] if not r.get("skipped")]
    memory = specs["Per-rank memory by layout (dry runs)"]["data"]["values"]
    assert sum(v["kind"] == "measured" for v in memory) == 4 * len(measured)
    assert sum(v["kind"] == "predicted" for v in memory) == len(measured)
    points = specs["Dry run vs formula, per rank"]["layer"][1]["data"]["values"]
    assert {p["component"] for p in points} == {"params", "grads", "optimizer", "activations", "traffic"}
    ddp2 = next(r for r in measured if (r["world_size"], r["layout"]) == (2, "ddp"))
    traffic = next(p for p in points if (p["N"], p["layout"], p["component"]) == (2, "ddp", "traffic"))
    assert (traffic["measured bytes"], traffic["measured ÷ predicted"]) == (ddp2["traffic_bytes"], ddp2["traffic_ratio"])
    calib = specs["Planner calibration: Test CPU, 2 cores"]
    assert calib["title"]["subtitle"] == "Spearman ρ 0.50 (3 rows), median |ln(measured/predicted)| 0.65"
    rows = calib["layer"][1]["data"]["values"]
    assert [(r["layout"], r["ci low"], r["ci high"]) for r in rows] == [
        ("single ws1", 0.29, 0.31), ("ddp ws2", 0.7, 0.9), ("fsdp ws2", 0.85, 1.2)]  # the unmeasured row left out
    html = rendered.html
    assert "id='atscale-sweep'" in html and "id='atscale-calibration'" in html and escape(EXPLANATION) in html
    assert html.count("skipped: ") == 2 and "commit cccccccccccc" in html and "cached artefacts" in html
    assert 'href="report/abc1234/atscale_sweep.csv"' in html and 'href="report/abc1234/atscale_memory.png"' in html


def test_the_charts_render_offline_in_chromium(results, tmp_path):
    """Every chart of the section compiles and is drawn as SVG by the vendored vega-embed."""
    try:
        chromium = check.find_chromium()
    except SiteError as err:
        pytest.skip(str(err))
    page, rendered = _site(results, tmp_path)
    html_dir = tmp_path / "html"
    (html_dir / "index.html").write_text(document_html("abc1234", "<header></header>", "", rendered.html, page))
    try:
        vendor.vendor_offline(html_dir, VENDOR_CACHE)
    except FetchError as err:
        pytest.skip(f"npm registry not reachable: {err}")
    with check.serve_directory(html_dir) as server:
        dom = check.run_chromium(chromium, server.url + "index.html")
    n = len(page.specs)
    assert check.check_front_page(dom, (html_dir / "index.html").read_text()).startswith(
        f"front page: {n} of {n} charts drawn as SVG")
