"""Tests of the site's front page (impls.site.build_front_page): etbench's report from synthetic
records, with asv's page moved alongside.  No browser, no network: rendering is checked by the
end-to-end test in test_site.py."""
from __future__ import annotations

import html
import json
import re

import pytest

from impls import site
from test_report import HASH_A, make_interleaved, make_record, make_refused

ASV_INDEX = "<!doctype html><html><head><title>airspeed velocity</title></head><body>asv</body></html>"


def _record(label, stem_speed, *, techniques=(), noisy=False, samples=(0.50, 0.52, 0.48, 0.51, 0.49)):
    record = make_record(label, HASH_A, speed=stem_speed, techniques=techniques)
    record["step_time"] = {"median": 0.5, "ci95": [0.4, 0.6], "samples": list(samples)}
    record["load"] = {"noisy": noisy}
    return record


@pytest.fixture
def results(tmp_path):
    """results/{html (as asv publishes it), runs/<two commits>, plots, isoflop} in a temp dir."""
    html = tmp_path / "html"
    html.mkdir()
    (html / "index.html").write_text(ASV_INDEX)
    (html / "index.json").write_text(json.dumps({"benchmarks": {
        "bench_techniques.Techniques.track_seconds_per_mtok": {
            "params": [["'baseline'", "'bf16'", "'fp16'"]], "param_names": ["variant"]},
        "bench_techniques.Techniques.track_val_loss_at_budget": {
            "params": [["'baseline'", "'bf16'", "'fp16'"]], "param_names": ["variant"]},
    }}))
    runs = tmp_path / "runs"
    for commit, speed in (("aaaaaaaaaaaa", 1000.0), ("bbbbbbbbbbbb", 1100.0)):
        family = runs / commit / "technique"
        family.mkdir(parents=True)
        (family / "technique-baseline.json").write_text(json.dumps(_record("nano/adamw", speed)))
        (family / "technique-bf16.json").write_text(json.dumps(
            _record("nano/adamw/bf16", 2 * speed, techniques=["bf16"], noisy=True)))
    newest = runs / "bbbbbbbbbbbb" / "technique"
    (newest / "technique-fp16.json").write_text(json.dumps(make_refused()))
    (newest / "compare-technique.json").write_text(json.dumps(make_interleaved()))
    # The older commit's records must count as older whatever the file system's clock does.
    import os
    for path in (runs / "aaaaaaaaaaaa").rglob("*.json"):
        os.utime(path, (1_000_000, 1_000_000))
    plots = tmp_path / "plots" / "bbbbbbbbbbbb"
    plots.mkdir(parents=True)
    (plots / "throughput_memory.png").write_bytes(b"\x89PNG fake")
    (plots / "summary.csv").write_text("family,label\n")
    iso = tmp_path / "isoflop" / "bbbbbbbbbbbb-quick"
    iso.mkdir(parents=True)
    (iso / "points.csv").write_text(
        "variant,budget,size,params,steps,tokens,final_val_loss,seconds_per_step,status\n"
        + "".join(f"{v},1e10,S{i},{p},10,100,{l},0.01,ok\n" for v in ("baseline", "mod")
                  for i, (p, l) in enumerate(((1000, 2.0), (2000, 1.8), (4000, 1.9)))))
    (iso / "fits.csv").write_text(
        "variant,budget,n_sizes,status,a,b,c,n_opt,n_opt_lo,n_opt_hi,log_n_opt,log_n_opt_se,loss_opt,loss_opt_se,"
        "nearest_size,nearest_params,nearest_seconds_per_step\n"
        "baseline,1e10,3,ok,0.5,-7.6,30.6,2000,1500,2600,7.6,0.1,1.8,0.01,S1,2000,0.01\n"
        "mod,1e10,3,ok,0.5,-7.6,30.6,2000,1500,2600,7.6,0.1,1.8,0.01,S1,2000,0.01\n")
    (iso / "routing.png").write_bytes(b"\x89PNG fake")
    return tmp_path


def _build(results, **kwargs):
    return site.build_front_page(results / "html", results / "runs", results / "plots", results / "isoflop",
                                 **kwargs)


def _specs(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="etbench-specs">(.*?)</script>', page, re.S)
    return json.loads(match.group(1).replace("<\\/", "</"))


def test_front_page_replaces_asv_index_and_shows_the_report(results):
    summary = _build(results)
    html = results / "html"
    assert (html / "asv.html").read_text() == ASV_INDEX  # asv's page kept, alongside
    page = (html / "index.html").read_text()
    assert site.FRONT_PAGE_MARKER in page
    assert "commit bbbbbbbbbbbb" in page and "2 runs, 1 refused, 1 interleaved comparisons, 1 isoFLOP" in summary[0]
    assert 'id="family-technique"' in page and 'id="isoflop-bbbbbbbbbbbb-quick"' in page
    # Sortable tables (markup and the script), CIs, the load flag.
    assert '<table class="sortable" id=\'table-technique\'>' in page and "table.sortable" in page
    assert "addEventListener('click'" in page
    assert '<td class="text" data-sort="0.5">0.5 [0.4, 0.6]</td>' in page
    assert '<tr class="noisy">' in page
    # The refused record: a row without numbers, and the reason; never a chart point.
    refused_row = re.search(r'<tr class="refused">(.*?)</tr>', page).group(1)
    assert "nano/adamw/fp16" in refused_row and "REFUSED" in refused_row
    assert "2,000" not in refused_row and "%" not in refused_row
    assert "not plotted: MFU 280.0% exceeds 100%: peak too low" in page
    specs = json.dumps(_specs(page))
    assert "nano/adamw/fp16" not in specs
    # The interleaved comparison: table with verdicts and a chart.
    assert "<h3>Interleaved comparison technique vs baseline" in page
    assert "1.500 [1.400, 1.600]" in page and '<td class="text faster">faster</td>' in page
    # Links into asv: the family's graphs, and each run's benchmark with its parameter.
    assert 'href="asv.html#bench_techniques.Techniques.track_val_loss_at_budget"' in page
    assert 'href="asv.html#bench_techniques.Techniques.track_seconds_per_mtok?p-variant=%27bf16%27"' in page
    assert 'href="asv.html#/regressions"' in page
    # Static PNGs copied next to the page and linked.
    assert (html / "report" / "bbbbbbbbbbbb" / "throughput_memory.png").is_file()
    assert 'href="report/bbbbbbbbbbbb/throughput_memory.png"' in page
    assert (html / "report" / "isoflop-bbbbbbbbbbbb-quick" / "routing.png").is_file()
    # The plotting library is named by its CDN URL only, for `vendor` to replace.
    assert [u for u in re.findall(r'<script src="([^"]+)"', page)] == list(site.REPORT_CDN_ASSETS)


def test_front_page_charts_are_vega_lite_specs_with_tooltips(results):
    _build(results)
    specs = _specs((results / "html" / "index.html").read_text())
    # interleaved, technique comparison, loss vs FLOPs, throughput/memory, isoFLOP
    assert len(specs) == 5
    text = json.dumps(specs)
    assert all(s["$schema"] == site.VEGA_LITE_SCHEMA for s in specs.values())
    assert '"tooltip"' in text and '"s/step [95% CI]"' in text and '"techniques"' in text
    iso = next(s for s in specs.values() if "facet" in s)
    kinds = {v["kind"] for v in iso["data"]["values"]}
    assert kinds == {"point", "fit", "optimum"}
    assert "NaN" not in text  # strict JSON for the browser


def test_compare_page_latest_vs_previous(results):
    summary = _build(results)
    assert any("compare.html: bbbbbbbbbbbb vs aaaaaaaaaaaa" in line for line in summary)
    page = (results / "html" / "index.html").read_text()
    assert 'href="compare.html">compare with aaaaaaaaaaaa</a>' in page
    compare = (results / "html" / "compare.html").read_text()
    assert "B = bbbbbbbbbbbb vs A = aaaaaaaaaaaa" in compare and "technique/technique-bf16" in compare
    assert "noisy" in compare and "only in B" in compare  # fp16 and the interleaved record are new


def test_rebuild_keeps_asv_page_and_no_runs_leaves_the_site_alone(results, tmp_path):
    _build(results)
    _build(results)  # the front page is never mistaken for asv's index
    assert (results / "html" / "asv.html").read_text() == ASV_INDEX

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "index.html").write_text(ASV_INDEX)
    with pytest.raises(site.NoRunsError):
        site.build_front_page(bare, tmp_path / "no-runs")
    assert (bare / "index.html").read_text() == ASV_INDEX and not (bare / "asv.html").exists()
    assert site.main(["build", str(bare), "--runs-root", str(tmp_path / "no-runs")]) == 0


def test_build_cli_rejects_missing_runs_dir(results, capsys):
    missing = results / "runs" / "nope"
    assert site.main(["build", str(results / "html"), "--runs", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]


def test_front_page_data_parallel_section(results):
    """Records with model_states/comm blocks and an ``etbench comm`` record give the data-parallel
    section: Vega-Lite specs holding the measured and formula values, and the memory table."""
    from test_report import DP_PSI, make_comm_record, make_dp_record

    family = results / "runs" / "bbbbbbbbbbbb" / "dataparallel"
    family.mkdir()
    for name, record in {"ddp-1": make_dp_record("ddp", 1, 0, 1000.0, comm_bytes=0),
                         "ddp-2": make_dp_record("ddp", 2, 0, 1800.0, comm_bytes=4 * DP_PSI),
                         "zero3-2": make_dp_record("zero:stage=3", 2, 3, 1500.0, comm_bytes=12 * DP_PSI)}.items():
        (family / f"{name}.json").write_text(json.dumps(record))
    (family / "comm-ws2.json").write_text(json.dumps(make_comm_record()))
    (results / "plots" / "bbbbbbbbbbbb" / "data_parallel_model_states.png").write_bytes(b"\x89PNG fake")
    _build(results)
    page = (results / "html" / "index.html").read_text()
    assert '<section class="family" id="data-parallel">' in page and 'href="#data-parallel"' in page
    assert 'href="report/bbbbbbbbbbbb/data_parallel_model_states.png"' in page
    specs = [s for s in _specs(page).values() if isinstance(s.get("title"), dict)]
    states = next(s for s in specs if s["title"]["text"] == "Per-rank model states vs world size")
    values = states["data"]["values"]
    measured = next(v for v in values if v["kind"] == "measured" and v["technique"] == "zero:stage=3"
                    and v["component"] == "total model states")
    assert measured["MiB"] == pytest.approx(16 * DP_PSI / 2 / 2**20) and measured["measured / formula"] == 1.0
    formula = [v["MiB"] for v in values if v["kind"] == "formula" and v["technique"] == "zero:stage=3"
               and v["component"] == "optimizer state"]
    assert formula == pytest.approx([8 * DP_PSI / 2**20, 8 * DP_PSI / 2 / 2**20])
    scaling = next(s for s in specs if s["title"]["text"] == "Scaling efficiency")
    assert {(v["technique"], v["n_d"]): v["efficiency"] for v in scaling["data"]["values"]}[("ddp", 2)] == pytest.approx(0.9)
    comm = next(s for s in specs if s["title"]["text"].startswith("Communication volume"))
    ddp2 = next(v for v in comm["data"]["values"] if v["row"] == "ddp · N=2" and v["what"] == "measured")
    assert ddp2["ratio (paper)"] == 0.5 and ddp2["ratio (payload)"] == 1.0
    busbw = next(s for s in specs if s["title"]["text"] == "Collective bandwidth vs message size")
    ring = [v["GB/s"] for v in busbw["data"]["values"] if v["scheme"] == "ring"]
    assert ring == pytest.approx([1024 * 8 ** i / (1e-3 * 2 ** i) / 1e9 for i in range(3)])  # 2 ranks: busbw = algbw
    # The memory table: Llama-7B under DDP does not fit 80 GB, under ZeRO-3 with 8 ranks it does.
    table = re.search(r"<table class=\"sortable\" id='data-parallel-memory'>(.*?)</table>", page, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    llama_ddp = next(r for r in rows if ">llama-7b<" in r and ">DDP<" in r and 'data-sort="8"' in r)
    assert ">NO<" in llama_ddp and ">100.41<" in llama_ddp
    llama_z3 = next(r for r in rows if ">llama-7b<" in r and ">ZeRO-3 P_os+g+p<" in r and 'data-sort="8"' in r)
    assert ">yes<" in llama_z3 and ">12.55<" in llama_z3


# --------------------------------------------------------------------------------------------
# Families from impls.families: navigation, headings, asv links; the model-parallel section
# --------------------------------------------------------------------------------------------

def make_mp_interleaved() -> dict:
    """An interleaved comparison of the ``model_parallel`` family on 2 ranks: DDP, TP, TP+SP
    (activations per layer against the count and the paper) and a 1F1B pipeline (bubble)."""
    import copy

    from test_report import make_interleaved

    record = make_interleaved("model_parallel")
    record["world_size"], record["baseline"] = 2, "ddp"
    base = record["variants"]["baseline"]

    def layout(label, mesh, speed, *, layer=None, pp=None):
        v = copy.deepcopy(base)
        v.update(label=label, mesh=mesh, layer_activations=layer, technique_notes={"pp": pp} if pp else {},
                 speedup={"value": speed, "median": speed, "ci95": [0.9 * speed, 1.1 * speed]},
                 memory={"params_bytes": 800_000 / mesh["tp"] / mesh["pp"], "grads_bytes": 1, "optimizer_bytes": 2,
                         "activations_bytes": 8_000_000 / mesh["tp"] / mesh["pp"]},
                 comm={"calls": {"all_reduce": 2 * mesh["tp"]}, "bytes_per_step": 1_000_000.0, "ratio": 1.0})
        v["recipe"]["techniques"] = [label] if label != "ddp" else []
        return v

    def layer(measured, paper, implementation, sp):
        return {"measured_bytes_per_layer": measured, "implementation_formula_bytes": measured,
                "measured_over_implementation": 1.0, "paper_reduction_vs_no_parallelism": paper,
                "implementation_reduction_vs_no_parallelism": implementation, "sp": sp}

    pp = {"schedule": "1f1b", "pp": 2, "chunks": 1, "microbatches": 4, "bubble_formula": 0.2,
          "schedule_bubble_max": 0.2, "measured_idle": [0.31, 0.35], "stash": [2, 1]}
    record["variants"] = {
        "ddp": layout("ddp", {"tp": 1, "pp": 1, "dp": 2}, 1.0, layer=layer(2_000_000, 1.0, 1.0, False)),
        "tp": layout("tp", {"tp": 2, "pp": 1, "dp": 1}, 0.5, layer=layer(1_250_000, 0.6, 0.625, False)),
        "tp-sp": layout("tp-sp", {"tp": 2, "pp": 1, "dp": 1}, 0.4, layer=layer(1_100_000, 0.5, 0.55, True)),
        "pp-1f1b": layout("pp-1f1b", {"tp": 1, "pp": 2, "dp": 1}, 0.45, pp=pp),
    }
    return record


PARALLEL_BENCHMARKS = {
    "bench_parallel.DataParallelSharding.track_seconds_per_mtok": {
        "params": [["'ddp'", "'zero3-bf16'"], ["2"]], "param_names": ["technique", "world_size"]},
    "bench_model_parallel.ModelParallel.track_bubble_measured": {
        "params": [["'ddp'", "'pp-1f1b'"], ["2"]], "param_names": ["layout", "world_size"]},
    "bench_comm.CommBandwidth.track_busbw": {
        "params": [["'allreduce'", "'ps'"], ["2"]], "param_names": ["scheme", "world_size"]},
}


@pytest.fixture
def parallel_results(results):
    """``results`` plus a baseline run, a data-parallel and a model-parallel comparison, a comm
    record, the model-parallel report files, and their classes in asv's index.json."""
    from test_report import make_comm_record, make_interleaved

    newest = results / "runs" / "bbbbbbbbbbbb"
    for family, name, record in (("baseline", "baseline-nano-ws1", _record("nano/adamw/base", 900.0)),
                                 ("parallel", "compare-ws2", make_interleaved("parallel")),
                                 ("model_parallel", "compare-ws2", make_mp_interleaved()),
                                 ("comm", "comm-ws2", make_comm_record())):
        (newest / family).mkdir()
        (newest / family / f"{name}.json").write_text(json.dumps(record))
    plots = results / "plots" / "bbbbbbbbbbbb"
    (plots / "model_parallel_bubble.png").write_bytes(b"\x89PNG fake")
    (plots / "model_parallel_layouts.csv").write_text("layout\nddp\n")
    index = results / "html" / "index.json"
    benchmarks = json.loads(index.read_text())["benchmarks"]
    index.write_text(json.dumps({"benchmarks": {**benchmarks, **PARALLEL_BENCHMARKS}}))
    return results


def _section(page: str, section_id: str) -> str:
    return re.search(rf'<section class="family" id="{section_id}">(.*?)</section>', page, re.S).group(1)


def test_nav_follows_the_families_table(parallel_results):
    """Every family with records is in the navigation once, in the table's order, by its title,
    linked to its own section or (comm: no section of its own) its report section's; each
    family's heading shows its title and question."""
    from impls import families

    _build(parallel_results)
    page = (parallel_results / "html" / "index.html").read_text()
    nav = re.search(r'<nav class="families">(.*?)</nav>', page, re.S).group(1)
    family_links, _, section_links = nav.partition('<span class="sections">')
    links = re.findall(r'<a href="#([^"]+)" title="[^"]*">([^<]+)</a>', family_links)
    expected = ["baseline", "technique", "parallel", "comm", "model_parallel"]
    assert [title for _, title in links] == [families.title(name) for name in expected]
    assert [anchor for anchor, _ in links] == ["family-baseline", "family-technique", "family-parallel",
                                               "data-parallel", "family-model_parallel"]
    assert re.findall(r'href="#([^"]+)"', section_links) == ["data-parallel", "model-parallel", "isoflop-bbbbbbbbbbbb-quick"]
    # The family sections come in the same order, each headed by its title and its question.
    assert re.findall(r'<section class="family" id="family-([^"]+)">', page) == ["baseline", "technique", "parallel",
                                                                                  "model_parallel"]
    for name in ("baseline", "technique", "parallel", "model_parallel"):
        family = families.get(name)
        head = _section(page, f"family-{name}")
        assert head.startswith(f'<h2>{html.escape(family.title)} <span class="family-name">{name}</span></h2>'
                               f'<p class="question">{html.escape(family.question, quote=True)}</p>')
    # comm has no section of its own: its title and question head the data-parallel section.
    assert f"<b>Collective bandwidth</b>: {html.escape(families.get('comm').question)}" in _section(page, "data-parallel")


def test_asv_links_of_parallel_model_parallel_and_comm(parallel_results):
    """The families ASV_FAMILIES used to miss get their asv history links (from the table's classes)."""
    _build(parallel_results)
    page = (parallel_results / "html" / "index.html").read_text()
    for section, name in (("family-parallel", "bench_parallel.DataParallelSharding.track_seconds_per_mtok"),
                          ("family-model_parallel", "bench_model_parallel.ModelParallel.track_bubble_measured"),
                          ("data-parallel", "bench_comm.CommBandwidth.track_busbw")):
        assert f'<p class="links">asv history: <a href="asv.html#{name}">' in _section(page, section)


def test_model_parallel_section_charts_table_and_files(parallel_results):
    from impls.report import model_parallel

    summary = _build(parallel_results)
    html_dir = parallel_results / "html"
    page = (html_dir / "index.html").read_text()
    section = _section(page, "model-parallel")
    specs = _specs(page)
    charts = re.findall(r'<div class="chart" id="(chart-\d+)"></div>', section)
    assert len(charts) == 3 and f"{len(specs)} interactive charts" in summary[1]
    by_title = {specs[c]["title"]["text"]: specs[c] for c in charts}
    activations = by_title["Activation bytes per layer per rank: TP vs TP+SP"]["data"]["values"]
    measured = {v["layout"]: v["KiB"] for v in activations if v["what"].startswith("measured")}
    assert measured == pytest.approx({"ddp (ws2)": 2_000_000 / 1024, "tp (ws2)": 1_250_000 / 1024,
                                      "tp-sp (ws2)": 1_100_000 / 1024})
    paper = {v["layout"]: v["KiB"] for v in activations if v["what"].startswith("paper")}
    assert paper["tp-sp (ws2)"] == pytest.approx(0.5 * 2_000_000 / 1024)  # unsharded × Korthikanti's ratio
    bubble = by_title["Pipeline bubble vs micro-batches"]["data"]["values"]
    formula = [v for v in bubble if v["kind"] == "formula"]
    assert all(v["bubble"] == pytest.approx(1 / (v["m"] + 1)) for v in formula)  # (p−1)/(m+p−1), p = 2
    assert [(v["m"], v["bubble"]) for v in bubble if v["kind"] == "measured"] == [(4, 0.35)]
    assert {v["m"] for v in bubble if v["kind"] == "replayed"} >= {2, 4, 8}
    planner = by_title[f"Planner: per-device memory on {model_parallel.PLANNER_DEVICES} devices"]["data"]["values"]
    assert {v["model"] for v in planner} == set(model_parallel.PLANNER_MODELS)
    # The static PNG that exists is linked, the others are not; the layouts' CSV is copied and linked.
    assert 'href="report/bbbbbbbbbbbb/model_parallel_bubble.png">static PNG' in section
    assert "model_parallel_activations.png" not in section
    assert (html_dir / "report" / "bbbbbbbbbbbb" / "model_parallel_layouts.csv").is_file()
    assert 'href="report/bbbbbbbbbbbb/model_parallel_layouts.csv"' in section
    table = re.search(r"<table class=\"sortable\" id='model-parallel-layouts'>(.*?)</table>", section, re.S).group(1)
    assert len(re.findall(r"<tr>", table)) == 1 + 4  # header + 4 layouts
    assert "2.22 [2.02, 2.47]" in table  # 1F1B: time per token ÷ DDP = 1/0.45 with its interval
    assert "<table class=\"sortable\" id='model-parallel-planner'>" in section
    assert "NaN" not in json.dumps(specs)


def test_sections_follow_the_families_table():
    from impls import families

    assert [s.name for s in site.SECTIONS] == list(families.SECTIONS)
