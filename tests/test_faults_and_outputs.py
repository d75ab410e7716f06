"""Bad input and faults around outputs, divergence, sweeps, ranks and leftovers (issue 9, classes
1, 3, 7, 8 and 10): one table row per bad input (the command, its exit status, a fragment of its
one-line message, the files it must not create), run in-process through ``impls.cli.main``; then
the cases a row cannot say (a full disk mid-run, a divergence's record, the report's refusal, a
sweep folder after a failed sweep, stale temporaries, gradient clipping).

The fault tests that kill processes are in ``tests/test_faults.py``.
"""
from __future__ import annotations

import errno
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from impls import cli, files, isoflop, train, training_state
from impls.engines import TorchEngine
from impls.errors import ConfigError, WriteError

RUN = ["run", "--model", "nano", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--steps", "4",
       "--timing-warmup", "1"]
ISO = ["isoflop", "--budgets", "1e9", "--sizes", "L1-D16"]
TINY = dict(model="nano", batch_size=2, seq_len=16, eval_batches=1, timing_warmup=1)
# An unwritable folder even for root: sysfs refuses new files (EACCES) whatever the permission bits say.
UNWRITABLE = Path("/sys/etbench-nowhere")
WARNINGS = ("warning:", "etbench: warning:")


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    id: str
    argv: list  # "{name}" items are replaced by paths under the row's folder (see _fixtures)
    status: int
    fragment: str
    absent: list = field(default_factory=list)  # paths that must not exist afterwards
    present: list = field(default_factory=list)  # paths that must exist afterwards
    trains: bool = False  # False: any work (building a run) fails the row
    diverge_at: int | None = None  # make the training loss NaN from this step on


ROWS = [
    # -- class 1: every output path is checked before any work
    Row("run-out-is-a-directory", [*RUN, "--out", "{dir}"], 2, "is a directory"),
    Row("run-out-parent-is-a-file", [*RUN, "--out", "{file}/run.json"], 2, "is not a directory",
        absent=["{file}/run.json"]),
    Row("run-out-deep-under-a-file", [*RUN, "--out", "{file}/a/b/run.json"], 2, "is not a directory"),
    Row("run-out-unwritable-folder", [*RUN, "--out", f"{UNWRITABLE}/run.json"], 2, "/sys"),
    Row("run-checkpoint-is-a-directory", [*RUN, "--save-every", "2", "--checkpoint", "{dir}", "--out", "{new}/r.json"],
        2, "is a directory", absent=["{new}"]),
    Row("run-checkpoint-parent-is-a-file", [*RUN, "--save-every", "2", "--checkpoint", "{file}/s.pt", "--out",
                                            "{new}/r.json"], 2, "is not a directory", absent=["{new}"]),
    Row("run-checkpoint-unwritable", [*RUN, "--save-every", "2", "--checkpoint", f"{UNWRITABLE}/s.pt", "--out",
                                      "{new}/r.json"], 2, "/sys", absent=["{new}"]),
    Row("run-default-checkpoint-beside-unwritable-out", [*RUN, "--save-every", "2", "--out",
                                                         f"{UNWRITABLE}/r.json"], 2, "/sys"),
    Row("run-checkpoint-is-the-record", [*RUN, "--save-every", "2", "--checkpoint", "{new}/r.json", "--out",
                                         "{new}/r.json"], 2, "is the --out record's path", absent=["{new}"]),
    Row("run-save-every-zero", [*RUN, "--save-every", "0", "--out", "{new}/r.json"], 2, "--save-every must be >= 1",
        absent=["{new}"]),
    Row("run-save-every-without-a-path", [*RUN, "--save-every", "2"], 2, "needs --checkpoint"),
    Row("run-nproc-2-out-is-a-directory", [*RUN, "--nproc", "2", "--out", "{dir}"], 2, "is a directory"),
    Row("compare-out-is-a-directory", ["compare", "{spec}", "--out", "{dir}"], 2, "is a directory"),
    Row("compare-out-parent-is-a-file", ["compare", "{spec}", "--out", "{file}/c.json"], 2, "is not a directory"),
    Row("compare-out-unwritable", ["compare", "{spec}", "--out", f"{UNWRITABLE}/c.json"], 2, "/sys"),
    Row("report-out-is-a-file", ["report", "{records}", "-o", "{file}"], 2, "is a file, not a folder"),
    Row("report-out-under-a-file", ["report", "{records}", "-o", "{file}/plots"], 2, "is not a directory"),
    Row("report-out-unwritable", ["report", "{records}", "-o", f"{UNWRITABLE}/plots"], 2, "/sys"),
    Row("isoflop-out-is-a-file", [*ISO, "--out", "{file}"], 2, "is a file, not a folder"),
    Row("isoflop-out-under-a-file", [*ISO, "--out", "{file}/sweep"], 2, "is not a directory"),
    Row("isoflop-out-unwritable", [*ISO, "--out", f"{UNWRITABLE}/sweep"], 2, "/sys"),
    Row("peak-bench-log-is-a-directory", ["peak", "--bench-log", "{dir}"], 2, "is a directory"),
    Row("peak-bench-log-under-a-file", ["peak", "--bench-log", "{file}/peak.json"], 2, "is not a directory"),
    # -- class 3: gradient clipping's range; divergence is a status with its own exit
    Row("grad-clip-zero", [*RUN, "--grad-clip", "0", "--out", "{new}/r.json"], 2, "grad_clip=", absent=["{new}"]),
    Row("grad-clip-negative", [*RUN, "--grad-clip=-1", "--out", "{new}/r.json"], 2, "grad_clip=",
        absent=["{new}"]),
    Row("grad-clip-nan", [*RUN, "--grad-clip", "nan"], 2, "grad_clip="),
    Row("grad-clip-inf", [*RUN, "--grad-clip", "inf"], 2, "grad_clip="),
    Row("isoflop-grad-clip-negative", [*ISO, "--grad-clip=-1", "--out", "{new}"], 2, "grad_clip=",
        absent=["{new}"]),
    Row("diverged-run-exits-3-with-its-record", [*RUN, "--out", "{new}/r.json"], 3, "diverged at step 2",
        present=["{new}/r.json"], trains=True, diverge_at=1),
    Row("diverged-run-allowed", [*RUN, "--out", "{new}/r.json", "--allow-divergence"], 0, "diverged at step 3",
        present=["{new}/r.json"], trains=True, diverge_at=2),
    # -- class 7: a sweep validates every point before it writes anything (sweep.json included)
    Row("isoflop-rows-shorter-than-seq-len", [*ISO, "--data", "synthetic:row_len=16", "--out", "{new}"], 2,
        "fewer than seq_len + 1", absent=["{new}"]),
    Row("isoflop-bad-optimizer", [*ISO, "--optimizer", "adamx", "--out", "{new}"], 2, "unknown optimizer",
        absent=["{new}"]),
    Row("isoflop-bad-data", [*ISO, "--data", "tokens:{new}/none.bin", "--out", "{new}/sweep"], 2, "none.bin",
        absent=["{new}"]),
    Row("isoflop-bad-schedule", [*ISO, "--schedule", "linear", "--out", "{new}"], 2, "unknown schedule",
        absent=["{new}"]),
    # -- class 8: with --nproc 2 the parent checks before starting ranks
    Row("nproc-2-unknown-model", [*RUN, "--nproc", "2", "--model", "nope"], 2, "unknown model 'nope'"),
    Row("nproc-2-missing-resume", [*RUN, "--nproc", "2", "--resume", "{new}/s.pt"], 2, "does not exist"),
    Row("nproc-2-resume-of-another-world-size", [*RUN, "--nproc", "2", "--resume", "{state}"], 2,
        "world_size 1, this run has 2"),
    Row("nproc-2-mesh-does-not-divide", [*RUN, "--nproc", "2", "--mesh", "tp=3"], 2, "mesh"),
    Row("nproc-0", [*RUN, "--nproc", "0"], 2, "--nproc must be >= 1"),
    # -- class 10: every load error is one line
    Row("resume-checkpoint-without-payload", [*RUN, "--resume", "{no_payload}"], 2, "incomplete: no payload"),
    Row("resume-checkpoint-without-hash", [*RUN, "--resume", "{no_hash}"], 2, "incomplete: no sha256"),
    Row("resume-checkpoint-payload-lacks-state", [*RUN, "--resume", "{no_state}"], 2, "payload lacks"),
    Row("resume-checkpoint-payload-garbage", [*RUN, "--resume", "{bad_payload}"], 2, "payload does not load"),
    Row("resume-checkpoint-is-a-directory", [*RUN, "--resume", "{dir}"], 2, "is a directory, not a regular file"),
    Row("resume-checkpoint-is-a-list", [*RUN, "--resume", "{a_list}"], 2, "not an etbench training state"),
    Row("report-empty-folder", ["report", "{empty}", "-o", "{new}"], 2, "no valid run records", absent=["{new}"]),
    Row("report-only-garbage", ["report", "{garbage}", "-o", "{new}"], 2, "no valid run records", absent=["{new}"]),
    Row("report-missing-path", ["report", "{new}/nothing", "-o", "{dir}/plots"], 2, "does not exist",
        absent=["{dir}/plots"]),
    Row("isoflop-corrupt-record-in-runs", [*ISO, "--out", "{iso_corrupt}"], 2, "is corrupt (JSONDecodeError",
        absent=["{iso_corrupt}/points.csv"]),
    Row("isoflop-record-that-is-not-a-record", [*ISO, "--out", "{iso_not_record}"], 2, "is corrupt",
        absent=["{iso_not_record}/points.csv"]),
    Row("isoflop-corrupt-points-csv", [*ISO, "--out", "{iso_points}"], 2, "points.csv is corrupt"),
    Row("isoflop-corrupt-sweep-json-with-results", [*ISO, "--out", "{iso_meta}"], 2, "sweep.json is corrupt"),
]


def _state(tmp: Path) -> Path:
    """A real training state (2 steps of the RUN recipe, one process)."""
    path = tmp / "real.state.pt"
    recipe = train.Recipe(**TINY, steps=4)
    train.run(recipe, save_every=2, checkpoint=path) if not path.exists() else None
    return path


def _outer(payload: dict | None = None, **fields) -> dict:
    import hashlib
    import io

    buffer = io.BytesIO()
    torch.save(payload if payload is not None else {}, buffer)
    data = buffer.getvalue()
    return {"format": training_state.FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "payload": data, **fields}


def _iso_folder(root: Path, name: str, record_text: str | None = None) -> Path:
    """A sweep folder for ISO whose one point's record (under runs/) holds ``record_text``."""
    out = root / name
    argv = [*ISO[1:], "--out", str(out)]
    args = isoflop.parser().parse_args(argv)
    base = isoflop._base(args)
    point = isoflop.plan_points(isoflop._floats(args.budgets), ["baseline"], ["L1-D16"], base)[0]
    if record_text is not None:
        (out / point.record_name).parent.mkdir(parents=True)
        (out / point.record_name).write_text(record_text)
    return out


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    f = dict(dir=root / "a_dir", file=root / "a_file", empty=root / "empty", garbage=root / "garbage",
             records=root / "records")
    f["dir"].mkdir()
    f["file"].write_text("not a folder")
    f["empty"].mkdir()
    f["garbage"].mkdir()
    (f["garbage"] / "x.json").write_text("{not json")
    (f["garbage"] / "y.json").write_text("[1, 2]")
    f["records"].mkdir()
    f["spec"] = root / "spec.json"
    f["spec"].write_text(json.dumps(dict(baseline="a", rounds=2, steps=1, warmup=1, common={**TINY},
                                         variants={"a": {}, "b": {"lr": 3e-3}})))
    f["state"] = _state(root)
    for name, content in (("no_payload", {"format": training_state.FORMAT, "sha256": "0" * 64}),
                          ("no_hash", {"format": training_state.FORMAT, "payload": b"x"}),
                          ("no_state", _outer({"recipe": {}})),
                          ("a_list", [1, 2, 3])):
        f[name] = root / f"{name}.pt"
        torch.save(content, f[name])
    f["bad_payload"] = root / "bad_payload.pt"
    import hashlib

    torch.save({"format": training_state.FORMAT, "sha256": hashlib.sha256(b"garbage").hexdigest(),
                "payload": b"garbage"}, f["bad_payload"])
    f["iso_corrupt"] = _iso_folder(root, "iso_corrupt", "{truncated")
    f["iso_not_record"] = _iso_folder(root, "iso_not_record", json.dumps({"curve": []}))
    f["iso_points"] = _iso_folder(root, "iso_points")
    f["iso_points"].mkdir()
    (f["iso_points"] / "points.csv").write_text("nothing,useful\n1,2\n")
    f["iso_meta"] = _iso_folder(root, "iso_meta", json.dumps({"curve": []}))
    (f["iso_meta"] / "sweep.json").write_text("{truncated")
    return f


def _expand(text: str, paths: dict[str, Path]) -> str:
    for key, value in paths.items():
        text = text.replace("{" + key + "}", str(value))
    return text


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_table(row, fixtures, tmp_path, capsys, monkeypatch):
    paths = {**fixtures, "new": tmp_path / "new"}
    argv = [_expand(a, paths) for a in row.argv]
    if not row.trains:  # building the model's parts is work: bad input must stop before it
        def no_work(*args, **kwargs):
            raise AssertionError(f"work started despite bad input: {row.id}")

        monkeypatch.setattr(train.techniques, "assemble", no_work)
    if row.diverge_at is not None:
        original = TorchEngine.train_step

        def train_step(self, x, y, step):
            loss = original(self, x, y, step)
            return math.nan if step >= row.diverge_at else loss

        monkeypatch.setattr(TorchEngine, "train_step", train_step)
    if "/sys" in row.fragment and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    assert cli.main(argv) == row.status, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Warnings (a skipped file, a noisy machine) may come with the error; the error is one line, once.
    errors = [line for line in err.splitlines() if line.strip() and not line.startswith(WARNINGS)]
    if row.status == 0:
        assert errors == [] and _expand(row.fragment, paths) in err, err
    else:
        assert len(errors) == 1, errors
        assert _expand(row.fragment, paths) in errors[0], errors[0]
    for path in row.absent:
        assert not Path(_expand(path, paths)).exists(), path
    for path in row.present:
        assert Path(_expand(path, paths)).exists(), path


def test_the_table_covers_each_class():
    assert len(ROWS) >= 50
    assert len({r.id for r in ROWS}) == len(ROWS)


# --------------------------------------------------------------------------- class 1: write errors mid-run


def _enospc_on(monkeypatch, predicate):
    """Make files._write fail with ENOSPC (a full disk) whenever ``predicate(path)`` holds."""
    original = files._write

    def write(path, data):
        if predicate(Path(path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, data)

    monkeypatch.setattr(files, "_write", write)


def test_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    out, state = tmp_path / "r.json", tmp_path / "s.pt"
    saves = []

    def second_save_fails(path):
        if path.name.startswith(".s.pt."):
            saves.append(path)
            return len(saves) == 2
        return False

    _enospc_on(monkeypatch, second_save_fails)
    assert cli.main([*RUN, "--steps", "6", "--save-every", "2", "--checkpoint", str(state), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write {state}" in err[0] and "No space left on device" in err[0]
    # The step-2 state survived, whole; no temporary is left; the record was never written.
    assert training_state.load(state, train.Recipe(**TINY, steps=6), 1)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]
    # ...and it resumes to the end.
    monkeypatch.undo()
    assert cli.main([*RUN, "--steps", "6", "--resume", str(state), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["resumed_from_step"] == 2


def test_full_disk_while_writing_the_record_keeps_the_previous_record(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    out.write_text('{"previous": true}')
    _enospc_on(monkeypatch, lambda path: path.name.startswith(".r.json."))
    assert cli.main([*RUN, "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "No space left on device" in err[-1] and str(out) in err[-1] and "Traceback" not in "".join(err)
    assert json.loads(out.read_text()) == {"previous": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_write_error_names_the_path_and_the_os_error(tmp_path, monkeypatch):
    _enospc_on(monkeypatch, lambda path: True)
    with pytest.raises(WriteError) as info:
        files.write_text(tmp_path / "x.txt", "hello")
    assert str(info.value) == f"cannot write {tmp_path / 'x.txt'}: No space left on device [errno {errno.ENOSPC}]"
    assert not list(tmp_path.iterdir())


def test_check_writable_accepts_what_it_can_create(tmp_path):
    assert files.check_writable(tmp_path / "new" / "deeper" / "r.json")
    assert files.check_writable_dir(tmp_path / "new" / "plots")
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- class 3: divergence


def _diverging(monkeypatch, at: int, value=math.nan):
    original = TorchEngine.train_step

    def train_step(self, x, y, step):
        loss = original(self, x, y, step)
        return value if step >= at else loss

    monkeypatch.setattr(TorchEngine, "train_step", train_step)


def _strict_loads(text: str):
    def refuse(token):
        raise AssertionError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_divergence_stops_the_run_and_is_the_record_status(tmp_path, monkeypatch, value):
    _diverging(monkeypatch, at=2, value=value)
    record = train.run(train.Recipe(**TINY, steps=8, eval_every=1))
    assert record["status"] == "diverged at step 3"
    assert record["steps"] == 8 and record["steps_done"] == 3
    assert [p["step"] for p in record["curve"]] == [0, 1, 2, 3]
    assert record["curve"][-1]["train_loss"] is None and record["curve"][-1]["val_loss"] is None
    assert record["final_val_loss"] is None
    assert all(math.isfinite(p["val_loss"]) for p in record["curve"][:-1])
    path = train.write_record(record, tmp_path / "r.json")
    assert _strict_loads(path.read_text())["status"] == "diverged at step 3"


def test_a_real_divergence_is_caught(tmp_path):
    """SGD with an absurd learning rate overflows the weights within a couple of steps."""
    record = train.run(train.Recipe(**TINY, steps=20, optimizer="sgd", lr=1e30, eval_every=1))
    assert record["status"].startswith("diverged at step ") and record["steps_done"] < 20
    _strict_loads(train.dumps_record(record))


def test_strict_json_nulls_every_non_finite_number():
    record = dict(status="ok", a=math.nan, b=[1.0, math.inf, {"c": -math.inf}], d=(math.nan,), e="nan", f=1)
    assert _strict_loads(train.dumps_record(record)) == dict(status="ok", a=None, b=[1.0, None, {"c": None}],
                                                            d=[None], e="nan", f=1)


def test_the_report_refuses_a_diverged_run(tmp_path, monkeypatch):
    from impls import report

    runs = tmp_path / "runs" / "family"
    train.write_record(train.run(train.Recipe(**TINY, steps=3)), runs / "ok.json")
    _diverging(monkeypatch, at=1)
    bad = train.run(train.Recipe(**TINY, steps=3, lr=2e-3))
    train.write_record(bad, runs / "diverged.json")
    loaded = report.load_all([tmp_path / "runs"])
    assert list(loaded.runs["source"]) == [str(runs / "ok.json")]
    assert [r["reasons"] for r in loaded.refused] == [["run diverged at step 2: not a result"]]
    with pytest.warns(report.RecordWarning):
        report.write_report([tmp_path / "runs"], tmp_path / "plots")
    summary = (tmp_path / "plots" / "summary.md").read_text()
    assert "Refused records (diverged" in summary and "run diverged at step 2" in summary
    assert len((tmp_path / "plots" / "summary.csv").read_text().strip().splitlines()) == 2  # header + the ok run


def test_a_sweep_records_a_diverged_point_and_leaves_it_out_of_the_fits(tmp_path, monkeypatch):
    _diverging(monkeypatch, at=1)
    base = dict(data="synthetic", batch_size=2, seq_len=16, eval_batches=1, timing_warmup=1)
    points = isoflop.sweep(tmp_path, [3e7], {"baseline": []}, ["L1-D16"], progress=False, **base)
    assert points.iloc[0]["status"] == "diverged at step 2"
    record = _strict_loads((tmp_path / points.iloc[0]["record"]).read_text())
    assert record["status"] == "diverged at step 2"
    fits = isoflop.fit_isoflop(points)
    assert fits.iloc[0]["status"] == "unfit: < 3 sizes" and fits["nearest_size"].isna().all()
    # A rerun does not train it again: the divergence is its result.
    monkeypatch.setattr(train, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = isoflop.sweep(tmp_path, [3e7], {"baseline": []}, ["L1-D16"], progress=False, **base)
    assert again.iloc[0]["status"] == "diverged at step 2"


# --------------------------------------------------------------------------- class 3: gradient clipping


def test_grad_clip_clips_the_global_norm_and_records_the_pre_clip_norm():
    from conftest import build_model, engine_over

    model, plan = build_model("nano", [], seed=0)
    engine = engine_over(model, plan, recipe=train.Recipe(grad_clip=0.05))
    x = torch.randint(0, 64, (2, 16))
    engine.forward_backward(x, x)
    before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    norm = engine.clip_gradients()
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm == pytest.approx(float(before), rel=1e-5) and norm > 0.05
    assert float(after) == pytest.approx(0.05, rel=1e-3)


@pytest.mark.parametrize("techniques", [[], ["fp16"]])
def test_grad_clip_run_has_grad_norms_in_its_curve(techniques):
    clipped = train.run(train.Recipe(**TINY, steps=4, eval_every=2, grad_clip=0.1, techniques=techniques))
    plain = train.run(train.Recipe(**TINY, steps=4, eval_every=2, techniques=techniques))
    assert clipped["status"] == "ok"
    assert [p.get("grad_norm") for p in clipped["curve"][:1]] == [None]  # step 0: no step yet
    assert all(p["grad_norm"] > 0.1 for p in clipped["curve"][1:])  # pre-clip norms, above the threshold
    assert all("grad_norm" not in p for p in plain["curve"])  # off by default: the curve is unchanged
    assert clipped["curve"][-1]["val_loss"] != plain["curve"][-1]["val_loss"]


def test_grad_clip_resume_is_bit_identical(tmp_path, monkeypatch):
    recipe = train.Recipe(**TINY, steps=6, eval_every=3, grad_clip=0.1)
    straight = train.run(recipe)
    original = TorchEngine.train_step

    class Killed(Exception):
        pass

    def train_step(self, x, y, step):
        if step == 5:
            raise Killed
        return original(self, x, y, step)

    with monkeypatch.context() as m:
        m.setattr(TorchEngine, "train_step", train_step)
        with pytest.raises(Killed):
            train.run(recipe, save_every=2, checkpoint=tmp_path / "s.pt")
    resumed = train.run(recipe, resume=tmp_path / "s.pt")
    assert resumed["resumed_from_step"] == 4 and resumed["curve"] == straight["curve"]


# --------------------------------------------------------------------------- class 7: sweep folders


def test_a_sweep_that_fails_before_its_first_point_does_not_block_its_folder(tmp_path):
    base = dict(data="synthetic", batch_size=2, seq_len=16, eval_batches=1, timing_warmup=1)

    def broken(recipe):  # a failure no validation could foresee
        raise RuntimeError("the machine caught fire")

    with pytest.raises(RuntimeError):
        isoflop.sweep(tmp_path, [3e7], {"baseline": []}, ["L1-D16"], runner=broken, progress=False, **base)
    assert (tmp_path / "sweep.json").exists()  # written, but nothing finished under it
    fixed = {**base, "lr": 3e-3}
    points = isoflop.sweep(tmp_path, [3e7], {"baseline": []}, ["L1-D16"], progress=False, **fixed)
    assert points.iloc[0]["status"] == "ok"
    assert json.loads((tmp_path / "sweep.json").read_text())["base_recipe"]["lr"] == 3e-3
    # Now that it holds a result, a different base recipe is refused as before.
    with pytest.raises(ConfigError, match="different base recipe"):
        isoflop.sweep(tmp_path, [3e7], {"baseline": []}, ["L1-D16"], progress=False, **base)


def test_an_invalid_base_recipe_writes_nothing_and_a_corrected_rerun_works(tmp_path, capsys):
    out = tmp_path / "sweep"
    common = ["isoflop", "--budgets", "3e7", "--sizes", "L1-D16", "--batch-size", "2", "--seq-len", "16",
              "--eval-batches", "1", "--out", str(out)]
    assert cli.main([*common, "--data", "synthetic:row_len=8"]) == 2
    assert "fewer than seq_len + 1" in capsys.readouterr().err and not out.exists()
    assert cli.main(common) == 0
    assert (out / "sweep.json").exists() and (out / "points.csv").exists()


# --------------------------------------------------------------------------- class 8: one line from the ranks


def test_rank_failures_are_summarised_once():
    from impls import ranks

    class Failure:
        def __init__(self, exitcode):
            self.exitcode = exitcode

        def signal_name(self):
            import signal

            return signal.Signals(-self.exitcode).name

    reported = [dict(rank=1, status=2, message="bad value"), dict(rank=0, status=2, message="bad value")]
    assert ranks.summarise_failure({0: Failure(2), 1: Failure(2)}, sorted(reported, key=lambda e: e["rank"])) == \
        (2, "bad value")
    lost = [dict(rank=0, status=1, message="lost contact with the other ranks (DistNetworkError: x)")]
    assert ranks.summarise_failure({0: Failure(1), 1: Failure(-9)}, lost) == \
        (1, "rank 1 was killed by signal SIGKILL; the other ranks were stopped")
    assert ranks.summarise_failure({0: Failure(-15), 1: Failure(-9)}, []) == \
        (1, "rank 1 was killed by signal SIGKILL; the other ranks were stopped")  # SIGTERM: the agent's own
    assert ranks.summarise_failure({1: Failure(1)}, []) == \
        (1, "rank 1 exited with status 1 (its traceback is above); the other ranks were stopped")


def test_a_rank_leaves_its_error_for_the_parent(tmp_path, monkeypatch, capsys):
    from impls import ranks

    monkeypatch.setenv(ranks.RANK_ERRORS_ENV, str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    assert cli.main([*RUN, "--model", "nope"]) == 2
    assert capsys.readouterr().err == ""  # the parent prints it, once
    assert ranks._reported(tmp_path) == [dict(rank=1, status=2, message=ranks._reported(tmp_path)[0]["message"])]
    assert "unknown model 'nope'" in ranks._reported(tmp_path)[0]["message"]


def test_the_collective_timeout_comes_from_the_environment(monkeypatch):
    from impls import dist

    monkeypatch.setenv(dist.TIMEOUT_ENV, "7.5")
    assert dist.timeout().total_seconds() == 7.5
    monkeypatch.delenv(dist.TIMEOUT_ENV)
    assert dist.timeout().total_seconds() == dist.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(dist.TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match="ETBENCH_DIST_TIMEOUT"):
        dist.timeout()


# --------------------------------------------------------------------------- class 10: leftovers


def test_stale_temporaries_are_cleaned_on_the_next_start(tmp_path, capsys):
    out = tmp_path / "r.json"
    dead = tmp_path / ".r.json.999999999.abcd1234.json"  # a writer killed mid-write (no such pid)
    old_style = tmp_path / ".r.state.pt.k3j2h4g5.pt"  # a temporary from before pids were in the name
    live = tmp_path / ".r.json.1.abcd1234.json"  # pid 1 is alive: its writer may still be writing
    other = tmp_path / ".other.json.999999999.abcd1234.json"  # another file's temporary: not ours to judge
    for path in (dead, old_style, live, other):
        path.write_text("partial")
    assert cli.main([*RUN, "--save-every", "2", "--out", str(out)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([live.name, other.name, "r.json", "r.state.pt"])


def test_stale_temporaries_of_a_sweep_are_cleaned(tmp_path):
    base = dict(data="synthetic", batch_size=2, seq_len=16, eval_batches=1, timing_warmup=1)
    (tmp_path / "runs").mkdir()
    stale = [tmp_path / ".points.csv.999999999.abcdefgh.csv", tmp_path / "runs" / ".x.json.999999999.abcdefgh.json"]
    for path in stale:
        path.write_text("partial")
    isoflop.sweep(tmp_path, [3e7], {"baseline": []}, ["L1-D16"], progress=False, **base)
    assert not any(p.exists() for p in stale)
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]


def test_temporary_names_carry_the_writer_pid(tmp_path, monkeypatch):
    seen = []
    original = files._write

    def spy(path, data):
        seen.append(Path(path).name)
        return original(path, data)

    monkeypatch.setattr(files, "_write", spy)
    files.write_text(tmp_path / "a.json", "{}")
    assert seen and seen[0].startswith(f".a.json.{os.getpid()}.") and seen[0].endswith(".json")
    assert files.stale_temporaries(tmp_path / "a.json") == []
