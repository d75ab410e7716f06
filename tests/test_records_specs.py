"""Records and specs checked one way wherever they are read (issue 21, class 6): one table row per
bad or damaged input -- the command, its exit status, a fragment of its message, the files it must
leave absent or present (and what they must hold) -- run in-process through ``impls.cli.main`` (or
``impls.report.main`` for ``python -m impls.report --compare``); then what a row cannot say (no
partial report after a late failure, a broken record of one compare side, markdown tables).

Nothing trains: records are written as JSON, and the isoFLOP sweep's one point is "trained" by a
stand-in runner that returns a record (the sweep's bookkeeping, not training, is under test).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from impls import cli, compare, data, isoflop, report, train
from impls import recipe as recipe_lib
from impls.recipe import RecipeError
from test_report import HASH_A, make_record

WARNINGS = ("warning:", "etbench: warning:")
RUN = ["run", "--model", "nano", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--steps", "2",
       "--timing-warmup", "1"]
ISO = ["isoflop", "--budgets", "3e7", "--sizes", "L1-D16", "--batch-size", "2", "--seq-len", "16",
       "--eval-batches", "1"]
SPEC = dict(baseline="a", rounds=2, steps=1, warmup=1,
            common=dict(model="nano", batch_size=2, seq_len=16, eval_batches=1))


@dataclass
class Row:
    id: str
    argv: list  # "{name}" items are replaced by paths of the fixtures (and "{new}": the row's own folder)
    status: int
    fragment: str  # in the one error line, or (status 0) in the warnings
    absent: list = field(default_factory=list)
    present: list = field(default_factory=list)
    contains: list = field(default_factory=list)  # (path, text that file must hold)
    lacks: list = field(default_factory=list)  # (path, text that file must not hold)
    unsaid: list = field(default_factory=list)  # text stderr must not hold
    main: str = "cli"  # or "report": python -m impls.report
    trains: bool = False  # False: any work (building a run) fails the row; True: train.run is a stand-in


ROWS = [
    # -- report: every record validated up front, skipped or refused alike; nothing partial
    Row("report-record-without-recipe-is-skipped", ["report", "{no_recipe_mixed}", "-o", "{new}/plots"], 0,
        "skipping {no_recipe_mixed}/fam/bare.json: 'recipe' is None",
        present=["{new}/plots/summary.md"], lacks=[("{new}/plots/summary.csv", "bare")]),
    Row("report-only-a-record-without-recipe", ["report", "{no_recipe_only}", "-o", "{new}/plots"], 2,
        "no valid run records", absent=["{new}"]),
    Row("report-recipe-without-techniques", ["report", "{no_techniques_only}", "-o", "{new}/plots"], 2,
        "no valid run records", absent=["{new}"]),
    Row("report-only-a-diverged-record-is-summarised", ["report", "{diverged_only}", "-o", "{new}/plots"], 0,
        "not plotted: {diverged_only}/fam/div.json: run diverged at step 3",
        contains=[("{new}/plots/summary.md", "### Refused records"),
                  ("{new}/plots/summary.md", "- fam / nano/diverged (`div.json`): run diverged at step 3")]),
    Row("report-label-with-newline-and-pipe", ["report", "{odd_label}", "-o", "{new}/plots"], 0, "",
        contains=[("{new}/plots/summary.md", r"| fam | two\nlines \| pipe | nano |")]),
    # -- python -m impls.report --compare: both sides validated as report validates its paths
    Row("compare-truncated-record-is-all-of-b", ["--compare", "{cmp_a}", "{cmp_truncated}", "-o", "{new}/c"], 2,
        "--compare RUNS_B '{cmp_truncated}' holds no valid run records", absent=["{new}"], main="report"),
    Row("compare-empty-b", ["--compare", "{cmp_a}", "{empty}", "-o", "{new}/c"], 2,
        "--compare RUNS_B '{empty}' holds no valid run records", absent=["{new}"], main="report"),
    Row("compare-empty-a", ["--compare", "{empty}", "{cmp_a}", "-o", "{new}/c"], 2,
        "--compare RUNS_A '{empty}' holds no valid run records", absent=["{new}"], main="report"),
    Row("compare-b-only-records-without-recipe", ["--compare", "{cmp_a}", "{no_recipe_only}", "-o", "{new}/c"], 2,
        "--compare RUNS_B", absent=["{new}"], main="report"),
    # -- etbench compare SPEC: duplicated keys, fields the comparison sets itself
    Row("spec-variant-given-twice", ["compare", "{spec_dup_variant}", "--out", "{new}/c.json"], 2,
        "key 'b' appears twice", absent=["{new}"]),
    Row("spec-key-twice-in-common", ["compare", "{spec_dup_common}", "--out", "{new}/c.json"], 2,
        "key 'lr' appears twice", absent=["{new}"]),
    Row("spec-key-twice-in-a-variant", ["compare", "{spec_dup_in_variant}", "--out", "{new}/c.json"], 2,
        "key 'techniques' appears twice", absent=["{new}"]),
    Row("spec-common-steps", ["compare", "{spec_common_steps}", "--out", "{new}/c.json"], 2,
        "spec 'common': recipe field 'steps' (99) is not used by a comparison", absent=["{new}"]),
    Row("spec-variant-steps", ["compare", "{spec_variant_steps}", "--out", "{new}/c.json"], 2,
        "variant 'b': recipe field 'steps' (5)", absent=["{new}"]),
    # -- isoflop: repeated names, a deleted record, a torn points.csv
    Row("isoflop-variant-twice", ["isoflop", "--budgets", "3e7", "--sizes", "L1-D16", "--variants", "baseline,baseline",
                                  "--out", "{new}/s"], 2, "variant 'baseline' is given twice", absent=["{new}"]),
    Row("isoflop-budget-twice-auto-sizes", ["isoflop", "--budgets", "3e7,3e7", "--out", "{new}/s"], 2,
        "FLOP budget '3e07' is given twice", absent=["{new}"]),
    Row("isoflop-deleted-record-is-retrained", [*ISO, "--out", "{iso_deleted}"], 0,
        "listed in points.csv) is missing; training that point again", present=["{iso_deleted}/{iso_record}"],
        unsaid=["corrupt", "delete it"], trains=True),
    Row("isoflop-torn-last-row-is-dropped", [*ISO, "--out", "{iso_torn}"], 0, "dropping its torn last line",
        contains=[("{iso_torn}/points.csv", "{iso_hash}\n")], lacks=[("{iso_torn}/points.csv", "{iso_torn_hash}\n")]),
    # -- tokens:PATH: raw files whose dtype nothing states
    Row("tokens-byte-file-without-meta", [*RUN, "--data", "tokens:{bytes_bin}", "--out", "{new}/r.json"], 2,
        "token file {bytes_bin} does not state its dtype", absent=["{new}"]),
    Row("tokens-folder-without-meta", [*RUN, "--data", "tokens:{tok_dir}", "--out", "{new}/r.json"], 2,
        "token folder {tok_dir} has no meta.json stating its dtype", absent=["{new}"]),
    Row("tokens-meta-without-dtype", [*RUN, "--data", "tokens:{tok_meta_no_dtype}", "--out", "{new}/r.json"], 2,
        "meta.json states no dtype; give it: tokens:", absent=["{new}"]),
    # -- distill:teacher speaks of distill:teacher, not of --init-from
    Row("distill-teacher-missing", [*RUN, "--technique", "distill:teacher={new}/nope.json"], 2,
        "distill:teacher '{new}/nope.json' does not exist", unsaid=["init_from"]),
    Row("distill-teacher-garbage-state", [*RUN, "--technique", "distill:teacher={garbage_pt}"], 2,
        "distill:teacher '{garbage_pt}': checkpoint", unsaid=["init_from"]),
    Row("distill-teacher-record-without-state", [*RUN, "--technique", "distill:teacher={stateless_record}"], 2,
        "distill:teacher '{stateless_record}' is a run record, and its weights are not beside it",
        unsaid=["init_from"]),
]


def _write(path: Path, document) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def _stand_in_run(recipe) -> dict:
    """What the sweep keeps of a run's record, without training (a smooth 4-point curve)."""
    dataset = data.load(recipe.data)
    curve = [dict(step=s, flops=s * 1e7, tokens=s * 32, train_loss=4.0 - s / 10, val_loss=4.1 - s / 10)
             for s in range(4)]
    return dict(schema=1, status="ok", label="stand-in", params=20_000, matmul_params=16_000, steps=3,
                steps_done=3, tokens_per_step=32, seconds_per_step=0.01, flops_per_step=1e7,
                final_val_loss=curve[-1]["val_loss"], dataset=dict(hash=dataset.content_hash), curve=curve)


def _iso_sweep(root: Path) -> Path:
    """One finished point of ISO, as ``etbench isoflop`` leaves it (same base recipe)."""
    out = root / "iso_done"
    args = isoflop.parser().parse_args([*ISO[1:], "--out", str(out)])
    base = recipe_lib.changed(recipe_lib.from_args(args), isoflop.BASE_FIELDS)
    isoflop.sweep(out, [3e7], ["baseline"], ["L1-D16"], runner=_stand_in_run, progress=False, **base)
    return out


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("records-specs")
    good = make_record("nano/adamw", HASH_A)
    no_recipe = {k: v for k, v in good.items() if k != "recipe"}
    no_techniques = {**good, "recipe": {"model": "nano"}}
    diverged = {**make_record("nano/diverged", HASH_A), "status": "diverged at step 3", "final_val_loss": None}
    f = {"empty": root / "empty"}
    f["empty"].mkdir()
    _write(root / "no_recipe_mixed" / "fam" / "good.json", good)
    _write(root / "no_recipe_mixed" / "fam" / "bare.json", no_recipe)
    f["no_recipe_mixed"] = root / "no_recipe_mixed"
    f["no_recipe_only"] = _write(root / "no_recipe_only" / "fam" / "bare.json", no_recipe).parents[1]
    f["no_techniques_only"] = _write(root / "no_techniques_only" / "fam" / "x.json", no_techniques).parents[1]
    f["diverged_only"] = _write(root / "diverged_only" / "fam" / "div.json", diverged).parents[1]
    f["odd_label"] = _write(root / "odd_label" / "fam" / "x.json",
                            make_record("two\nlines | pipe", HASH_A)).parents[1]
    f["cmp_a"] = _write(root / "cmp_a" / "fam" / "x.json", good).parents[1]
    f["cmp_truncated"] = _write(root / "cmp_truncated" / "fam" / "x.json", json.dumps(good)[:200]).parents[1]
    variants = '{"a": {}, "b": {"lr": 0.002}, "b": {"lr": 0.003}}'
    common = json.dumps(SPEC["common"])
    f["spec_dup_variant"] = _write(root / "dup_variant.json",
                                   f'{{"baseline": "a", "rounds": 2, "steps": 1, "common": {common}, "variants": {variants}}}')
    f["spec_dup_common"] = _write(root / "dup_common.json",
                                  '{"baseline": "a", "common": {"model": "nano", "lr": 0.001, "lr": 0.002}, '
                                  '"variants": {"a": {}, "b": {"batch_size": 1}}}')
    f["spec_dup_in_variant"] = _write(root / "dup_in_variant.json",
                                      '{"baseline": "a", "variants": {"a": {}, '
                                      '"b": {"techniques": ["bf16"], "techniques": []}}}')
    f["spec_common_steps"] = _write(root / "common_steps.json",
                                    {**SPEC, "common": {**SPEC["common"], "steps": 99}, "variants": {"a": {}, "b": {}}})
    f["spec_variant_steps"] = _write(root / "variant_steps.json", {**SPEC, "variants": {"a": {}, "b": {"steps": 5}}})
    # a tiny sweep, then two damaged copies
    done = _iso_sweep(root)
    record = next((done / "runs").glob("*.json"))
    f["iso_record"] = record.relative_to(done)
    f["iso_hash"] = record.stem.rsplit("__", 1)[1]
    f["iso_deleted"] = root / "iso_deleted"
    shutil.copytree(done, f["iso_deleted"])
    (f["iso_deleted"] / f["iso_record"]).unlink()
    f["iso_torn"] = root / "iso_torn"
    shutil.copytree(done, f["iso_torn"])
    header, row = (f["iso_torn"] / "points.csv").read_text().splitlines()
    torn = row[:-3]  # killed mid-row: the recipe hash (last column) cut short, no newline
    f["iso_torn_hash"] = torn.rsplit(",", 1)[1]
    (f["iso_torn"] / "points.csv").write_text(f"{header}\n{torn}")
    # token files that do not state their dtype
    f["bytes_bin"] = root / "bytes.bin"
    np.frombuffer(b"a byte corpus of an even length " * 64, dtype=np.uint8).tofile(f["bytes_bin"])
    f["tok_dir"] = root / "tok_dir"
    f["tok_meta_no_dtype"] = root / "tok_meta_no_dtype"
    for folder in (f["tok_dir"], f["tok_meta_no_dtype"]):
        folder.mkdir()
        for split in ("train", "val"):
            np.arange(600, dtype=np.uint16).tofile(folder / f"{split}.bin")
    (f["tok_meta_no_dtype"] / "meta.json").write_text(json.dumps({"vocab_size": 600}))
    # teachers that cannot be read
    f["garbage_pt"] = _write(root / "garbage.pt", "not a checkpoint")
    f["stateless_record"] = _write(root / "teacher.json", {**good, "status": "ok", "steps_done": 2})
    return {k: str(v) for k, v in f.items()}


def _expand(text: str, paths: dict) -> str:
    for key, value in paths.items():
        text = text.replace("{" + key + "}", str(value))
    return text


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_records_and_specs_table(row, fixtures, tmp_path, capsys, monkeypatch):
    paths = {**fixtures, "new": str(tmp_path / "new")}
    argv = [_expand(a, paths) for a in row.argv]
    if not row.trains:  # building a run's parts is work: bad input must stop before it
        def no_work(*args, **kwargs):
            raise AssertionError(f"work started despite bad input: {row.id}")

        monkeypatch.setattr(train.techniques, "assemble", no_work)
    else:
        monkeypatch.setattr(train, "run", lambda recipe, *args, **kwargs: _stand_in_run(recipe))
    status = (cli.main if row.main == "cli" else report.main)(argv)
    err = capsys.readouterr().err
    assert status == row.status, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.strip() and not line.startswith(WARNINGS)]
    if row.status == 0:
        assert errors == [] and _expand(row.fragment, paths) in err, err
    else:
        assert len(errors) == 1, errors
        assert _expand(row.fragment, paths) in errors[0], errors[0]
    for text in row.unsaid:
        assert text not in err, err
    for path in row.absent:
        assert not Path(_expand(path, paths)).exists(), path
    for path in row.present:
        assert Path(_expand(path, paths)).exists(), path
    for path, text in row.contains:
        assert _expand(text, paths) in Path(_expand(path, paths)).read_text(), (path, text)
    for path, text in row.lacks:
        assert _expand(text, paths) not in Path(_expand(path, paths)).read_text(), (path, text)


def test_the_table_has_distinct_ids():
    assert len(ROWS) >= 20 and len({r.id for r in ROWS}) == len(ROWS)


# --------------------------------------------------------------------------- what a row cannot say


def test_a_report_that_fails_late_leaves_no_partial_files(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs" / "fam"
    _write(runs / "a.json", make_record("nano/adamw", HASH_A))
    monkeypatch.setenv("ETBENCH_REPORT_WORKERS", "1")

    def broken(*args, **kwargs):
        raise RuntimeError("a plot failed")

    monkeypatch.setattr(report.runs, "plot_loss_vs_flops", broken)  # where write_report looks it up
    fresh = tmp_path / "new" / "plots"
    with pytest.raises(RuntimeError):
        report.write_report([tmp_path / "runs"], fresh)
    assert not (tmp_path / "new").exists()  # nothing written, the folders it made removed
    # Into a folder holding an earlier report: that report stays as it was, nothing is added.
    old = tmp_path / "old"
    _write(old / "summary.md", "the earlier report")
    with pytest.raises(RuntimeError):
        report.write_report([tmp_path / "runs"], old)
    assert [p.name for p in old.iterdir()] == ["summary.md"] and (old / "summary.md").read_text() == "the earlier report"
    # A staging folder of a killed report is removed by the next one, which writes everything.
    monkeypatch.undo()
    (old / f"{report.STAGING_PREFIX}999999999.abcdefgh").mkdir()
    written = report.write_report([tmp_path / "runs"], old)
    assert {p.name for p in written} >= {"summary.md", "summary.csv", "loss_vs_flops.png"}
    assert sorted(p.name for p in old.iterdir()) == sorted(p.name for p in written)
    assert "nano/adamw" in (old / "summary.md").read_text()


def test_compare_lists_a_broken_record_of_b_as_refused_not_only_in_a(tmp_path, capsys):
    good = make_record("nano/adamw", HASH_A)
    for side in ("a", "b"):
        _write(tmp_path / side / "fam" / "x.json", good)
    _write(tmp_path / "a" / "fam" / "y.json", good)
    _write(tmp_path / "b" / "fam" / "y.json", json.dumps(good)[:300])  # truncated
    out = tmp_path / "out"
    assert report.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)]) == 0
    assert f"warning: skipping {tmp_path / 'b' / 'fam' / 'y.json'}: cannot read JSON" in capsys.readouterr().err
    table = {r["record"]: r["verdict"] for r in __import__("csv").DictReader((out / "compare.csv").open())}
    assert table["fam/y"].startswith("refused: not a valid record in B: cannot read JSON")
    assert table["fam/x"] == "no samples"


def test_summary_tables_stay_tables_whatever_the_labels():
    runs = report.records_frame([make_record("one\ntwo|three\\", HASH_A), make_record("plain", HASH_A)])
    table = report.markdown_table(report.summary_table(runs)).splitlines()
    assert len(table) == 4  # header, rule, two runs

    def cells(line):  # split on unescaped pipes, as GitHub does
        import re
        return re.split(r"(?<!\\)\|", line.replace("\\\\", ""))

    assert all(line.startswith("|") and len(cells(line)) == len(cells(table[0])) for line in table)
    assert r"| one\ntwo\|three\\ |" in "\n".join(table)
    assert report.markdown_text("a\r\nb\rc|d") == r"a\nb\rc\|d"
    refused = report.refused_markdown([dict(family="f|x", label="l\ny", source="/r/s.json", reasons=["why"])])
    assert "- f\\|x / l\\ny (`s.json`): why" in refused


def test_spec_json_is_read_without_duplicates_and_the_plain_spec_still_loads(tmp_path):
    path = _write(tmp_path / "spec.json", {**SPEC, "variants": {"a": {}, "b": {"lr": 0.002}}})
    spec = compare.load_spec(path)
    assert list(spec.recipes) == ["a", "b"] and spec.recipes["b"].steps == 1 + 2 * 1
    # steps: null is the field's "not set", as a benchmark's full recipe may carry it
    assert compare.parse_spec({**SPEC, "common": {**SPEC["common"], "steps": None},
                               "variants": {"a": {}, "b": {}}}).recipes["a"].steps == 3
    _write(path, '{"baseline": "a", "variants": {"a": {}, "b": {}, "a": {"lr": 1}}}')
    with pytest.raises(RecipeError, match="key 'a' appears twice"):
        compare.load_spec(path)


def test_a_raw_token_file_loads_once_its_dtype_is_given(fixtures):
    loaded = data.load(f"tokens:{fixtures['bytes_bin']},dtype=uint8")
    assert loaded.vocab_size <= 256 and loaded.name.endswith(",dtype=uint8")
    assert data.load(f"tokens:{fixtures['tok_dir']},dtype=uint16").vocab_size == 600
