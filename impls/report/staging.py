"""All of a command's outputs or none: the report and ``--compare`` write into a hidden staging
folder inside the output folder and move every file into place only once all are written
(:func:`staged_outputs`), so a failure never leaves a partial report beside an earlier one."""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import WriteError

#: Name prefix of the hidden folder inside an output folder where a command's outputs are written
#: before they are moved into place together (:func:`staged_outputs`).
STAGING_PREFIX = ".staging."


class StagedOutputs:
    """The outputs of one command, written into ``folder`` (hidden, inside the output folder)
    and moved into the output folder by :func:`staged_outputs` once every one of them is written.
    ``add`` the path of each file written under ``folder``; ``written`` holds their final paths."""

    def __init__(self, out_dir: Path, folder: Path):
        self.out_dir, self.folder = out_dir, folder
        self.staged: list[Path] = []
        self.written: list[Path] = []

    def add(self, *paths: Path) -> None:
        self.staged += [Path(p) for p in paths]


def _pid_running(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 probes without sending anything; a process of
    another user still exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_stages(out_dir: Path) -> None:
    """Staging folders of a command killed before it finished (its pid is gone)."""
    for entry in out_dir.iterdir():
        m = re.match(re.escape(STAGING_PREFIX) + r"(\d+)\.", entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not _pid_running(int(m[1])):
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def staged_outputs(out_dir: Path) -> Iterator[StagedOutputs]:
    """All of a command's outputs or none: files are written into a hidden staging folder inside
    ``out_dir`` and moved into place (one atomic rename each) only after the block has written
    every one of them.  A block that fails -- a record found unusable late, a full disk, a bug --
    leaves ``out_dir`` as it was (no partial report beside the previous one's files, which stay
    intact) and removes the folders this call created.  A staging folder left by a killed command
    is removed by the next one."""
    out_dir = Path(out_dir)
    created, probe = [], out_dir
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent

    def remove_created() -> None:
        for folder in created:  # innermost first; one that is not empty stays
            try:
                folder.rmdir()
            except OSError:
                break

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_stages(out_dir)
        stage = StagedOutputs(out_dir, Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}.", dir=out_dir)))
    except OSError as e:
        remove_created()
        raise WriteError(out_dir, e) from None
    try:
        yield stage
        names = [staged.relative_to(stage.folder) for staged in stage.staged]
        twice = sorted({str(n) for n in names if names.count(n) > 1})
        if twice:  # two outputs of one name: one would replace the other (a bug), found before any move
            raise WriteError(out_dir / twice[0], FileExistsError(errno.EEXIST, f"{len(twice)} output name(s) written "
                                                                           f"twice; none moved into place"))
        moves = []
        for staged in stage.staged:
            final = out_dir / staged.relative_to(stage.folder)
            target = Path(os.path.realpath(final)) if final.is_symlink() else final  # links written through
            if target.exists() and not target.is_file():
                raise WriteError(final, IsADirectoryError(errno.EISDIR, "is a directory, not a file"))
            moves.append((staged, target, final))
        for staged, target, final in moves:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, target)
            except OSError as e:
                raise WriteError(final, e) from None
            stage.written.append(final)
    except BaseException:
        shutil.rmtree(stage.folder, ignore_errors=True)
        remove_created()
        raise
    shutil.rmtree(stage.folder, ignore_errors=True)
