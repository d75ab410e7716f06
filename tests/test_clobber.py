"""Nothing clobbered (issue 21, classes 1, 2, 3 and 7): special files at output paths, names too
long, inputs that are also outputs, two commands writing one path, a record lost between the
final checkpoint and the record, flags that would be silently ignored.

One table row per bad input, run in-process through :func:`impls.cli.main` (exit status, a
fragment of the one line, paths that must stay absent, and paths that must stay exactly as they
were: same kind of file, same bytes).  Then the cases a row cannot say: the atomic write's last
check before its rename, a symbolic link written through, the exclusive lock, and ``--resume`` of a
final state giving its record back.

Special files are FIFOs and sockets made in the test's own folder: no test writes to a device.
A FIFO that is opened for reading blocks forever, so every row runs under an alarm.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from impls import cli, files, train
from impls.errors import ConfigError, WriteError

RUN = ["run", "--model", "nano", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--steps", "4",
       "--timing-warmup", "1"]
ISO = ["isoflop", "--budgets", "1e9", "--sizes", "L1-D16"]
TINY = dict(model="nano", batch_size=2, seq_len=16, eval_batches=1, timing_warmup=1)
LONG_NAME = "n" * 300 + ".json"  # over every filesystem's 255-byte name limit
LONG_PATH = "d/" * 2600 + "r.json"  # over Linux's 4096-byte PATH_MAX
WARNINGS = ("warning:", "etbench: warning:")
PLAN = ["plan", "--model", "nano", "--devices", "2", "--device-mem", "1GiB", "--device-flops", "1e12",
        "--link-gbps", "10", "--global-batch", "8", "--seq-len", "16"]
ALARM_S = 60  # a row that opens a FIFO for reading would otherwise hang the suite


@dataclass
class Row:
    id: str
    argv: list  # "{name}" items are replaced by paths under the fixtures' folder or the row's
    status: int
    fragment: str
    absent: list = field(default_factory=list)  # must not exist afterwards
    unchanged: list = field(default_factory=list)  # must keep their kind and bytes


ROWS = [
    # -- class 1: only a regular file (or nothing) is ever replaced; a folder path is no file name
    Row("run-out-fifo", [*RUN, "--out", "{fifo}"], 2, "is a FIFO (named pipe), not a regular file",
        unchanged=["{fifo}"]),
    Row("run-out-socket", [*RUN, "--out", "{sock}"], 2, "is a socket, not a regular file", unchanged=["{sock}"]),
    Row("run-out-link-to-fifo", [*RUN, "--out", "{fifo_link}"], 2, "is a FIFO", unchanged=["{fifo}"]),
    Row("run-checkpoint-fifo", [*RUN, "--save-every", "2", "--checkpoint", "{fifo}", "--out", "{new}/r.json"], 2,
        "is a FIFO", absent=["{new}"], unchanged=["{fifo}"]),
    Row("run-default-checkpoint-is-a-fifo", [*RUN, "--save-every", "2", "--out", "{fifo_dir}/r.json"], 2,
        "r.state.pt' is a FIFO", absent=["{fifo_dir}/r.json"], unchanged=["{fifo_dir}/r.state.pt"]),
    Row("run-nproc-2-out-fifo", [*RUN, "--nproc", "2", "--out", "{fifo}"], 2, "is a FIFO", unchanged=["{fifo}"]),
    Row("compare-out-fifo", ["compare", "{spec}", "--out", "{fifo}"], 2, "is a FIFO", unchanged=["{fifo}"]),
    Row("comm-out-fifo", ["comm", "--nproc", "2", "--sizes", "1K", "--out", "{fifo}"], 2, "is a FIFO",
        unchanged=["{fifo}"]),
    Row("plan-json-fifo", [*PLAN, "--json", "{fifo}"], 2, "is a FIFO",
        unchanged=["{fifo}"]),
    Row("peak-bench-log-fifo", ["peak", "--bench-log", "{fifo}"], 2, "is a FIFO", unchanged=["{fifo}"]),
    Row("report-out-fifo", ["report", "{records}", "-o", "{fifo}"], 2, "is a FIFO (named pipe), not a folder",
        unchanged=["{fifo}"]),
    Row("isoflop-out-fifo", [*ISO, "--out", "{fifo}"], 2, "is a FIFO (named pipe), not a folder",
        unchanged=["{fifo}"]),
    Row("run-out-trailing-slash", [*RUN, "--out", "{new}/"], 2, "ends with '/', a folder; give a file name",
        absent=["{new}"]),
    Row("compare-out-trailing-slash", ["compare", "{spec}", "--out", "{new}/"], 2, "ends with '/'", absent=["{new}"]),
    Row("run-resume-fifo", [*RUN, "--resume", "{fifo}"], 2, "checkpoint '{fifo}' is a FIFO", unchanged=["{fifo}"]),
    Row("run-resume-directory", [*RUN, "--resume", "{dir}"], 2, "is a directory, not a regular file"),
    Row("run-init-from-fifo", [*RUN, "--init-from", "{fifo}", "--out", "{new}/r.json"], 2,
        "init_from '{fifo}' is a FIFO", absent=["{new}"], unchanged=["{fifo}"]),
    Row("run-distill-teacher-fifo", [*RUN, "--technique", "distill:teacher={fifo}", "--out", "{new}/r.json"], 2,
        "distill:teacher '{fifo}' is a FIFO", absent=["{new}"], unchanged=["{fifo}"]),
    Row("run-init-from-name-too-long", [*RUN, "--init-from", "{new}/" + LONG_NAME], 2, "init_from '", absent=["{new}"]),
    Row("run-nproc-2-resume-fifo", [*RUN, "--nproc", "2", "--resume", "{fifo}"], 2, "is a FIFO",
        unchanged=["{fifo}"]),
    # -- class 2: names and paths too long are one line, not an ENAMETOOLONG traceback
    Row("run-out-name-too-long", [*RUN, "--out", "{new}/" + LONG_NAME], 2, "bytes long; this filesystem takes at most",
        absent=["{new}"]),
    Row("run-out-path-too-long", [*RUN, "--out", "{new}/" + LONG_PATH], 2, "the longest path this system takes",
        absent=["{new}"]),
    Row("run-out-name-too-long-for-the-temporary", [*RUN, "--out", "{new}/" + "n" * 245 + ".json"], 2,
        "kept for the temporary file", absent=["{new}"]),
    Row("run-checkpoint-name-too-long", [*RUN, "--save-every", "2", "--checkpoint", "{new}/" + LONG_NAME], 2,
        "bytes long", absent=["{new}"]),
    Row("run-resume-name-too-long", [*RUN, "--resume", "{new}/" + LONG_NAME], 2, "bytes long", absent=["{new}"]),
    Row("compare-out-name-too-long", ["compare", "{spec}", "--out", "{new}/" + LONG_NAME], 2, "bytes long",
        absent=["{new}"]),
    Row("report-out-name-too-long", ["report", "{records}", "-o", "{new}/" + "n" * 300], 2, "bytes long",
        absent=["{new}"]),
    Row("isoflop-out-path-too-long", [*ISO, "--out", "{new}/" + LONG_PATH], 2, "the longest path", absent=["{new}"]),
    Row("plan-json-name-too-long", [*PLAN, "--json", "{new}/" + LONG_NAME], 2,
        "bytes long", absent=["{new}"]),
    # -- class 3: an input is never an output; an empty output name is refused, not ignored
    Row("run-out-is-the-resume-checkpoint", [*RUN, "--resume", "{state}", "--out", "{state}"], 2,
        "--out '{state}' is also the --resume input", unchanged=["{state}"]),
    Row("run-out-is-a-hard-link-to-the-resume-checkpoint", [*RUN, "--resume", "{state}", "--out", "{state_link}"],
        2, "is also the --resume input", unchanged=["{state}"]),
    Row("run-out-is-the-init-from-record", [*RUN, "--init-from", "{record}", "--out", "{record}"], 2,
        "is also the --init-from input", unchanged=["{record}", "{state}"]),
    Row("run-checkpoint-is-the-init-from-weights", [*RUN, "--init-from", "{record}", "--save-every", "2",
                                                    "--checkpoint", "{state}", "--out", "{new}/r.json"], 2,
        "--checkpoint '{state}' is also the --init-from weights input", absent=["{new}"],
        unchanged=["{record}", "{state}"]),
    Row("run-out-is-the-distill-teacher", [*RUN, "--model-arg", "d_model=32", "--technique",
                                           "distill:teacher={record}", "--out", "{record}"], 2,
        "is also the distill:teacher input", unchanged=["{record}", "{state}"]),
    Row("run-out-is-the-token-file", [*RUN, "--data", "tokens:{tokens}", "--out", "{tokens}"], 2,
        "is also the --data input", unchanged=["{tokens}"]),
    Row("compare-out-is-the-spec", ["compare", "{spec}", "--out", "{spec}"], 2, "is also the spec input",
        unchanged=["{spec}"]),
    Row("run-out-empty", [*RUN, "--out", ""], 2, "output path '' is not a file name"),
    Row("compare-out-empty", ["compare", "{spec}", "--out", ""], 2, "output path '' is not a file name"),
    Row("comm-out-empty", ["comm", "--nproc", "2", "--sizes", "1K", "--out", ""], 2, "is not a file name"),
    # -- class 7: a flag that would change nothing is refused, not ignored
    Row("run-checkpoint-without-save-every", [*RUN, "--checkpoint", "{new}/s.pt", "--out", "{new}/r.json"], 2,
        "--checkpoint '{new}/s.pt' is written only with --save-every N", absent=["{new}"]),
    Row("peak-phase-without-bench-log", ["peak", "--phase", "end"], 2, "--phase end applies to --bench-log only"),
]


def _fingerprint(path: Path):
    st = os.lstat(path)
    kind = stat.S_IFMT(st.st_mode)
    return kind, (path.read_bytes() if stat.S_ISREG(st.st_mode) else None)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clobber")
    f = dict(dir=root / "a_dir", fifo=root / "f.json", fifo_link=root / "link.json", fifo_dir=root / "fifo_dir",
             sock=root / "s.json", records=root / "records", spec=root / "spec.json", tokens=root / "tokens.bin")
    f["dir"].mkdir()
    os.mkfifo(f["fifo"])
    f["fifo_link"].symlink_to(f["fifo"])
    f["fifo_dir"].mkdir()
    os.mkfifo(f["fifo_dir"] / "r.state.pt")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(f["sock"]))  # the file stays after the socket is closed
    server.close()
    f["records"].mkdir()
    f["spec"].write_text(json.dumps(dict(baseline="a", rounds=2, steps=1, warmup=1, common={**TINY},
                                         variants={"a": {}, "b": {"lr": 3e-3}})))
    import numpy as np

    np.arange(4096, dtype=np.uint16).__mod__(16).astype(np.uint16).tofile(f["tokens"])
    # A finished run: its record and its training state beside it (what --init-from and a teacher read).
    f["record"], f["state"] = root / "t.json", root / "t.state.pt"
    record = train.run(train.Recipe(**TINY, steps=2), save_every=2, checkpoint=f["state"])
    train.write_record(record, f["record"])
    f["state_link"] = root / "hard.pt"
    os.link(f["state"], f["state_link"])
    return f


def _expand(text: str, paths: dict[str, Path]) -> str:
    for key, value in paths.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def _alarm(signum, frame):
    raise TimeoutError(f"the command blocked for {ALARM_S} s (opened a FIFO?)")


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_table(row, fixtures, tmp_path, capsys, monkeypatch):
    paths = {**fixtures, "new": tmp_path / "new"}
    argv = [_expand(a, paths) for a in row.argv]

    def no_work(*args, **kwargs):
        raise AssertionError(f"work started despite bad input: {row.id}")

    monkeypatch.setattr(train.techniques, "assemble", no_work)  # building the model is work
    monkeypatch.setattr(train, "measure_step", no_work)
    before = {p: _fingerprint(Path(_expand(p, paths))) for p in row.unchanged}
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(ALARM_S)
    try:
        status = cli.main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    assert status == row.status, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.strip() and not line.startswith(WARNINGS)]
    assert len(errors) == 1, errors
    assert _expand(row.fragment, paths) in errors[0], errors[0]
    for path in row.absent:
        assert not Path(_expand(path, paths)).exists(), path
    for path, fingerprint in before.items():
        assert _fingerprint(Path(_expand(path, paths))) == fingerprint, f"{path} was changed"


def test_the_table_covers_each_class():
    ids = {r.id for r in ROWS}
    assert len(ids) == len(ROWS) >= 35
    for needle in ("fifo", "socket", "too-long", "is-the-resume", "init-from", "empty", "without"):
        assert any(needle in i for i in ids), needle


# --------------------------------------------------------------------------- class 1: the write itself


def test_the_atomic_write_never_renames_over_a_special_file(tmp_path):
    """A path checked as absent that became a FIFO before the rename (another program made it)
    is left alone: the write fails with one line and its temporary is removed."""
    target = tmp_path / "r.json"
    with pytest.raises(WriteError, match="is a FIFO .*not replaced"):
        with files.atomic_path(target) as temporary:
            temporary.write_text("{}")
            os.mkfifo(target)
    assert stat.S_ISFIFO(os.lstat(target).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_symbolic_link_is_written_through(tmp_path):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old")
    link.symlink_to(real)
    files.check_writable(link)
    files.write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


@pytest.mark.parametrize("name,ok", [("n" * 200 + ".json", True), ("n" * 240 + ".json", False)])
def test_the_name_limit_leaves_room_for_the_temporary(tmp_path, name, ok):
    if ok:
        files.check_writable(tmp_path / name)
        files.write_text(tmp_path / name, "x")  # the temporary fits too
    else:
        with pytest.raises(ConfigError, match="kept for the temporary file"):
            files.check_writable(tmp_path / name)


# --------------------------------------------------------------------------- class 3: one writer per output


def test_a_second_command_writing_the_same_output_is_refused(tmp_path, capsys):
    out = tmp_path / "sub" / "r.json"
    with files.exclusive(out):  # another command holds it (flock: per open file, so in-process too)
        lock = tmp_path / "sub" / ".r.json.lock"
        assert lock.read_text().strip() == str(os.getpid())
        assert cli.main([*RUN, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"is being written by another etbench command (pid {os.getpid()})" in err
        assert len(err.strip().splitlines()) == 1
        assert not out.exists()
    assert not lock.exists()  # released and removed
    assert cli.main([*RUN, "--out", str(out)]) == 0  # free again
    assert json.loads(out.read_text())["status"] == "ok"


def test_a_lock_file_left_by_a_killed_command_does_not_block(tmp_path):
    out = tmp_path / "r.json"
    (tmp_path / ".r.json.lock").write_text("99999999\n")  # its holder died: the kernel dropped its lock
    with files.exclusive(out):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_refusal_after_the_lock_leaves_no_folder(tmp_path):
    out = tmp_path / "a" / "b" / "r.json"
    with pytest.raises(ConfigError):
        with files.exclusive(out):
            raise ConfigError("found by the recipe's checks")
    assert list(tmp_path.iterdir()) == []


def test_two_outputs_locked_at_once_and_the_first_released_when_the_second_is_taken(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    with files.exclusive(b):
        with pytest.raises(ConfigError, match="b.json"):
            with files.exclusive(a, b):
                pass
        with files.exclusive(a):  # a was released when b could not be taken
            pass


# --------------------------------------------------------------------------- class 3: the record of a final state


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_of_a_final_state_writes_the_record_the_run_lost(tmp_path, capsys, nproc):
    """A run killed after saving its last state and before writing its record: ``--resume``
    gives the record back (it said 'nothing left to train' and wrote nothing); with two ranks,
    each rank's memory comes back from the state."""
    out, ranks = tmp_path / "r.json", ["--nproc", str(nproc)]
    assert cli.main([*RUN, *ranks, "--save-every", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    original = json.loads(out.read_text())
    out.unlink()  # as if killed between the final save and the record
    state = tmp_path / "r.state.pt"
    saved = state.read_bytes()
    assert cli.main([*RUN, *ranks, "--resume", str(state), "--out", str(out)]) == 0, capsys.readouterr().err
    recovered = json.loads(out.read_text())
    differing = sorted(k for k in original if original[k] != recovered[k])
    assert differing == [], differing  # the very record, its timings and memory included
    assert state.read_bytes() == saved


def test_resume_of_a_final_state_without_measurements_is_one_line(tmp_path, capsys):
    """A final state saved by an older etbench (no measurements in it) cannot make a record:
    one line saying so, nothing written."""
    import hashlib
    import io

    import torch

    from impls import training_state

    state = tmp_path / "s.pt"
    assert cli.main([*RUN, "--save-every", "4", "--checkpoint", str(state)]) == 0
    outer = torch.load(state, weights_only=False)
    payload = torch.load(io.BytesIO(outer["payload"]), weights_only=False)
    payload.pop("finished")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    torch.save(dict(format=training_state.FORMAT, sha256=hashlib.sha256(buffer.getvalue()).hexdigest(),
                    payload=buffer.getvalue()), state)
    capsys.readouterr()
    assert cli.main([*RUN, "--resume", str(state), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "holds no measurements to make the record from" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("command", ["report", "isoflop", "compare"])
def test_a_second_command_writing_the_same_folder_or_file_is_refused(command, fixtures, tmp_path, capsys):
    out = tmp_path / "out"
    argv = {"report": ["report", str(fixtures["record"]), "-o", str(out)],
            "isoflop": [*ISO, "--out", str(out)],
            "compare": ["compare", str(fixtures["spec"]), "--out", str(out)]}[command]
    with files.exclusive(out):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "is being written by another etbench command" in err and len(err.strip().splitlines()) == 1
        assert not out.exists()
