"""Other machines' results (issue 22, item 6): ``python -m impls.publish`` copies a run's JSON
records with their provenance under ``results/published/<machine>-<date>/``, and the site shows
each published machine beside the local run, the speed-ups of every comparison side by side with
their intervals.  Records are small synthetic ones (test_report's helpers); no browser."""
from __future__ import annotations

import hashlib
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from impls import publish, site
from impls.site import published as site_published
from impls.files import exclusive
from test_frontpage import results  # noqa: F401 - fixture
from test_report import HASH_A, make_interleaved, make_record

GPU = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "threads": 16}
COMMIT = "d" * 40
PEAK = {"start": {"time": "2026-03-01T10:00:00+0000", "peaks": {"float32": 5.1e13, "bfloat16": 7.2e14}},
        "end": {"time": "2026-03-01T10:30:00+0000", "peaks": {"float32": 5.0e13, "bfloat16": 7.1e14}},
        "noisy": False, "rule": "test"}
BENCH_TIME = {"total_seconds": 1800.0, "budget_seconds": 600, "within_budget": False, "phases": {}, "families": {}}


def _gpu(record: dict, *, noisy: bool = False) -> dict:
    """A record as a 2-GPU machine writes it."""
    record.update(device=dict(GPU), world_size=2, git_commit=COMMIT, git_dirty=False,
                  versions={"python": "3.11.7", "torch": "2.13.0+cu128"},
                  load={"load1_start": 0.5, "load1_end": 0.7, "cores_in_use": 16, "noisy": noisy},
                  consistency_errors=[])
    return record


def gpu_comparison() -> dict:
    """test_report's comparison, as measured on the GPU: bf16 faster still, fuse now slower."""
    record = _gpu(make_interleaved())
    record["variants"]["bf16"]["speedup"] = {"value": 2.5, "ci95": [2.3, 2.7], "n": 5}
    record["variants"]["fuse"]["speedup"] = {"value": 0.9, "ci95": [0.85, 0.95], "n": 5}
    return record


@pytest.fixture
def gpu_run(tmp_path):
    """runs/<commit>/technique/ of a GPU machine (two runs, one noisy, a comparison, and files that
    are no record), plots/<commit>/ with its peak log and time breakdown."""
    runs = tmp_path / "gpu" / "runs" / COMMIT[:12]
    family = runs / "technique"
    family.mkdir(parents=True)
    (family / "technique-baseline.json").write_text(json.dumps(_gpu(make_record("nano/adamw", HASH_A, speed=9e5))))
    (family / "technique-bf16.json").write_text(json.dumps(
        _gpu(make_record("nano/adamw/bf16", HASH_A, speed=2e6, techniques=["bf16"]), noisy=True)))
    (family / "compare-technique.json").write_text(json.dumps(gpu_comparison()))
    (family / "notes.json").write_text("[1, 2, 3]")  # JSON, but no record: not published
    (family / "teacher.state.pt").write_bytes(b"\0" * 64)  # a checkpoint: never published
    (family / ".technique-bf16.json.999999.abcdef12.json").write_text("{")  # a killed write's temporary
    plots = tmp_path / "gpu" / "plots" / COMMIT[:12]
    plots.mkdir(parents=True)
    (plots / "peak.json").write_text(json.dumps(PEAK))
    (plots / "bench_time.json").write_text(json.dumps(BENCH_TIME))
    (plots / "throughput_memory.png").write_bytes(b"\x89PNG fake")
    return runs


def _publish(runs, root, *extra, machine="gpu-box", date="2026-03-01"):
    return publish.main([str(runs), "--machine", machine, "--date", date, "--root", str(root), *extra])


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------

def test_publish_copies_the_records_and_writes_provenance(gpu_run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ETBENCH_PROFILE", raising=False)
    root = tmp_path / "published"
    assert _publish(gpu_run, root, "--profile", "full") == 0  # --plots found beside results/runs/<commit>
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("published 3 records and 2 plot files") and "cuda: NVIDIA H100 80GB HBM3" in out[0]
    assert any("notes.json" in line for line in out)  # the JSON that is no record is named
    folder = root / "gpu-box-2026-03-01"
    assert sorted(_tree(folder)) == ["PROVENANCE.json", "plots/bench_time.json", "plots/peak.json",
                                     "runs/technique/compare-technique.json", "runs/technique/technique-baseline.json",
                                     "runs/technique/technique-bf16.json"]
    assert (folder / "runs/technique/technique-bf16.json").read_bytes() == \
        (gpu_run / "technique/technique-bf16.json").read_bytes()
    assert [p.name for p in root.iterdir()] == ["gpu-box-2026-03-01"]  # no lock, no staging folder left
    prov = json.loads((folder / "PROVENANCE.json").read_text())
    assert prov["machine"] == "gpu-box" and prov["date"] == "2026-03-01" and prov["profile"] == "full"
    assert prov["devices"] == [{"type": "cuda", "name": GPU["name"], "records": 3}] and prov["device_count"] == 2
    assert prov["torch"] == ["2.13.0+cu128"] and prov["commits"] == [COMMIT] and prov["git_dirty"] is False
    assert prov["peak"] == PEAK and prov["bench_seconds"] == 1800.0
    assert prov["load"]["noisy"] == 1 and prov["load"]["noisy_records"] == ["technique/technique-bf16.json"]
    assert prov["command"].startswith("python -m impls.publish ") and "--machine gpu-box" in prov["command"]
    assert prov["records"] == 3 and prov["not_copied_other_files"] == 1
    assert [s["source"] for s in prov["skipped"]] == ["technique/notes.json"]
    for entry in prov["files"]:
        assert hashlib.sha256((folder / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]


def test_publish_refuses_to_overwrite_unless_forced(gpu_run, tmp_path, capsys):
    root = tmp_path / "published"
    assert _publish(gpu_run, root, "--profile", "quick") == 0
    before = _tree(root)
    capsys.readouterr()
    assert _publish(gpu_run, root, "--profile", "full") == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "is published already" in err[0] and "--force" in err[0] and not captured.out
    assert _tree(root) == before
    assert _publish(gpu_run, root, "--profile", "full", "--force") == 0
    assert json.loads((root / "gpu-box-2026-03-01/PROVENANCE.json").read_text())["profile"] == "full"
    assert [p.name for p in root.iterdir()] == ["gpu-box-2026-03-01"]  # the old copy is gone, nothing hidden left


def test_publish_refuses_while_another_publish_of_that_folder_runs(gpu_run, tmp_path, capsys):
    root = tmp_path / "published"
    root.mkdir()
    with exclusive(root / "gpu-box-2026-03-01"):
        assert _publish(gpu_run, root) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "being written by another etbench command" in err[0]
    assert not (root / "gpu-box-2026-03-01").exists()


def test_records_over_the_size_cap_are_refused_naming_the_largest(gpu_run, tmp_path, capsys):
    big = _gpu(make_record("nano/adamw/big", HASH_A))
    big["padding"] = "x" * 700_000
    (gpu_run / "technique" / "technique-big.json").write_text(json.dumps(big))
    root = tmp_path / "published"
    assert _publish(gpu_run, root, "--max-mb", "0.5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "over the 0.5 MB cap (--max-mb)" in err[0]
    assert "largest " + str(gpu_run / "technique" / "technique-big.json") + " (0.70 MB)" in err[0]
    assert not root.exists()
    assert _publish(gpu_run, root) == 0  # the default cap (5 MB) takes it


def _bad_rows():
    """(id, argv builder taking (runs dir, root, tmp_path), fragment of the one-line error)."""
    def std(runs, root, *extra, machine="gpu-box", date="2026-03-01"):
        return [str(runs), "--machine", machine, "--date", date, "--root", str(root), *extra]

    def empty_dir(tmp):
        (tmp / "empty").mkdir(exist_ok=True)
        return tmp / "empty"

    def no_records(tmp):
        (tmp / "junk" / "x").mkdir(parents=True, exist_ok=True)
        (tmp / "junk" / "x" / "a.json").write_text('{"hello": 1}')
        return tmp / "junk"

    def a_file(tmp):
        (tmp / "file.json").write_text("{}")
        return tmp / "file.json"

    def plots_without_logs(tmp):
        (tmp / "plots-empty").mkdir(exist_ok=True)
        return tmp / "plots-empty"

    return [
        ("missing-runs-dir", lambda r, o, t: std(t / "nope", o), "does not exist"),
        ("runs-dir-is-a-file", lambda r, o, t: std(a_file(t), o), "is not a folder"),
        ("no-json", lambda r, o, t: std(empty_dir(t), o), "holds no JSON records"),
        ("no-records", lambda r, o, t: std(no_records(t), o), "holds no run records"),
        ("machine-with-slash", lambda r, o, t: std(r, o, machine="lab/h100"), "--machine 'lab/h100'"),
        ("machine-with-space", lambda r, o, t: std(r, o, machine="my box"), "no '/' or spaces"),
        ("machine-empty", lambda r, o, t: std(r, o, machine=""), "--machine ''"),
        ("machine-dotdot", lambda r, o, t: std(r, o, machine=".."), "--machine '..'"),
        ("machine-hidden", lambda r, o, t: std(r, o, machine=".box"), "starting with a letter or digit"),
        ("date-month-13", lambda r, o, t: std(r, o, date="2026-13-01"), "--date '2026-13-01' is not a date: give YYYY-MM-DD"),
        ("date-feb-30", lambda r, o, t: std(r, o, date="2026-02-30"), "--date '2026-02-30'"),
        ("date-short", lambda r, o, t: std(r, o, date="2026-3-1"), "give YYYY-MM-DD"),
        ("date-word", lambda r, o, t: std(r, o, date="yesterday"), "--date 'yesterday'"),
        ("unknown-profile", lambda r, o, t: std(r, o, "--profile", "medium"), "is not a make bench profile; valid: quick, full"),
        ("plots-missing", lambda r, o, t: std(r, o, "--plots", str(t / "nope")), "--plots"),
        ("plots-without-logs", lambda r, o, t: std(r, o, "--plots", str(plots_without_logs(t))),
         "holds neither peak.json nor bench_time.json"),
        ("max-mb-zero", lambda r, o, t: std(r, o, "--max-mb", "0"), "--max-mb 0.0 must be a positive number"),
        ("max-mb-word", lambda r, o, t: std(r, o, "--max-mb", "lots"), "'lots' is not a number of megabytes"),
        ("machine-missing", lambda r, o, t: [str(r), "--root", str(o)], "--machine"),
        ("root-inside-runs", lambda r, o, t: std(r, r / "published"), "inside the runs dir"),
    ]


@pytest.mark.parametrize("argv, fragment", [row[1:] for row in _bad_rows()], ids=[row[0] for row in _bad_rows()])
def test_bad_input_is_one_line_exit_2_and_nothing_written(gpu_run, tmp_path, capsys, argv, fragment):
    root = tmp_path / "published"
    args = argv(gpu_run, root, tmp_path)
    before = _tree(gpu_run)
    try:
        status = publish.main(args)
    except SystemExit as e:  # argparse's errors (a flag's type, a missing flag): one line too
        status = e.code
    assert status == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], captured.err
    assert not captured.out
    assert not root.exists() and not (gpu_run / "published").exists()
    assert _tree(gpu_run) == before


def test_a_root_that_is_a_file_is_refused_and_kept(gpu_run, tmp_path, capsys):
    root = tmp_path / "published"
    root.write_text("not a folder")
    assert _publish(gpu_run, root) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a folder" in err[0]
    assert root.read_text() == "not a folder"


# --------------------------------------------------------------------------------------------
# The site: published machines beside the local run
# --------------------------------------------------------------------------------------------

class _Tables(HTMLParser):
    """Every ``<table id=...>``: its header texts and rows of (cell text, cell class)."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, dict] = {}
        self._table = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = self.tables.setdefault(attrs["id"], {"header": [], "rows": []})
        elif self._table is not None and tag == "tr":
            self._table["rows"].append([])
        elif self._table is not None and tag in ("th", "td"):
            self._cell = [tag, "", attrs.get("class") or ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("th", "td") and self._cell is not None:
            kind, text, css = self._cell
            if kind == "th":
                self._table["header"].append(text.strip())
            else:
                self._table["rows"][-1].append((text.strip(), css))
            self._cell = None


def tables(page: str) -> dict[str, dict]:
    parser = _Tables()
    parser.feed(page)
    for table in parser.tables.values():
        table["rows"] = [row for row in table["rows"] if row]
    return parser.tables


def _published_site(results, gpu_run):
    root = results / "published"
    assert _publish(gpu_run, root, "--profile", "full") == 0
    (root / "broken-2026-01-01").mkdir()  # no PROVENANCE.json: listed as unreadable
    (root / ".gpu-box-2026-04-01.staging.1").mkdir()  # a publish under way: ignored
    summary = site.build_front_page(results / "html", results / "runs", results / "plots", results / "isoflop",
                                    published_root=root)
    return root, summary


def test_site_lists_each_published_machine_beside_the_local_one(results, gpu_run):
    root, summary = _published_site(results, gpu_run)
    assert any("published.html: 1 published machines beside bbbbbbbbbbbb, 1 comparisons (1 on several "
               "machines); 1 unreadable" in line for line in summary)
    index = (results / "html" / "index.html").read_text()
    assert '<section class="family" id="published">' in index and '<a href="#published">other machines</a>' in index
    assert 'href="published.html"' in index
    machines = tables(index)["published-machines"]
    assert machines["header"][:4] == ["machine", "date", "devices", "ranks"]
    rows = {row[0][0].split(" ")[0]: dict(zip(machines["header"], (text for text, _ in row))) for row in machines["rows"]}
    assert set(rows) == {"local", "gpu-box-2026-03-01", "broken-2026-01-01"}
    gpu = rows["gpu-box-2026-03-01"]
    assert gpu["devices"] == "cuda: NVIDIA H100 80GB HBM3" and gpu["ranks"] == "2" and gpu["torch"] == "2.13.0+cu128"
    assert gpu["commits"] == COMMIT[:12] and gpu["profile"] == "full" and gpu["date"] == "2026-03-01"
    assert gpu["peak probes"] == "float32 50.0 TFLOP/s, bfloat16 710.0 TFLOP/s (quiet)"
    assert gpu["load"].startswith("1 of 3 records noisy") and gpu["command"].startswith("python -m impls.publish")
    assert rows["local"]["devices"] == "cpu: Test CPU" and rows["local"]["status"] == "ok"
    assert rows["broken-2026-01-01"]["status"] == "not shown: no readable PROVENANCE.json"
    # The provenance travels with the site, linked from the table.
    copied = results / "html" / "published" / "gpu-box-2026-03-01" / "PROVENANCE.json"
    assert copied.read_bytes() == (root / "gpu-box-2026-03-01" / "PROVENANCE.json").read_bytes()
    assert 'href="published/gpu-box-2026-03-01/PROVENANCE.json"' in index


def test_site_puts_every_machines_speedups_side_by_side_with_intervals(results, gpu_run):
    _published_site(results, gpu_run)
    page = (results / "html" / "published.html").read_text()
    found = tables(page)
    assert "published-machines" in found
    table = found["published-interleaved-technique"]
    local, gpu = "local (bbbbbbbbbbbb) speed-up [95% CI]", "gpu-box-2026-03-01 speed-up [95% CI]"
    assert table["header"] == ["variant", "label", local, gpu]
    cells = {row[0][0]: dict(zip(table["header"], row)) for row in table["rows"]}
    assert list(cells) == ["baseline", "bf16", "fuse"]  # baseline first
    assert cells["bf16"][local] == ("1.500 [1.400, 1.600]", "text faster")
    assert cells["bf16"][gpu] == ("2.500 [2.300, 2.700]", "text faster")
    assert cells["fuse"][local] == ("1.010 [0.970, 1.050]", "text")  # interval holds 1: no verdict
    assert cells["fuse"][gpu] == ("0.900 [0.850, 0.950]", "text slower")
    assert cells["baseline"][gpu][0] == "1.000 [1.000, 1.000]"
    assert "NVIDIA H100 80GB HBM3" in page and "Test CPU" in page
    assert "broken-2026-01-01 speed-up" not in page  # an unreadable publication gets no column


def test_a_comparison_only_one_machine_has_shows_not_measured(results, gpu_run):
    extra = gpu_comparison()
    extra["family"] = "quant"
    (gpu_run / "quant").mkdir()
    (gpu_run / "quant" / "compare-quant.json").write_text(json.dumps(extra))
    _published_site(results, gpu_run)
    table = tables((results / "html" / "published.html").read_text())["published-interleaved-quant"]
    local = table["header"].index("local (bbbbbbbbbbbb) speed-up [95% CI]")
    assert {row[local][0] for row in table["rows"]} == {"not measured"}


def test_site_cli_takes_published_root_and_an_absent_root_adds_nothing(results, gpu_run, tmp_path):
    html = results / "html"
    common = ["build", str(html), "--runs-root", str(results / "runs"), "--plots-root", str(results / "plots"),
              "--isoflop-root", str(results / "isoflop")]
    assert site.main([*common, "--published-root", str(tmp_path / "none")]) == 0
    assert not (html / "published.html").exists() and 'id="published"' not in (html / "index.html").read_text()
    assert _publish(gpu_run, tmp_path / "pub") == 0
    assert site.main([*common, "--published-root", str(tmp_path / "pub")]) == 0
    assert (html / "published.html").is_file() and 'id="published"' in (html / "index.html").read_text()
    assert site_published.build(html, None, commit="x", runs_dir=results / "runs", loaded=None) is None
