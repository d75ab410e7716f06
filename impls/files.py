"""Atomic file writes: a reader never sees a half-written result, and a failed write leaves the
previous file intact (results already written are never lost or corrupted).

A write goes to a hidden temporary file beside its destination, ``.<name>.<pid>.<random><suffix>``,
which is renamed over the destination when complete.  A process killed mid-write (kill -9) leaves
that temporary behind; :func:`clean_stale` removes those whose writer is gone, and every command
calls it for the paths it is about to write.  A write that fails raises
:class:`~impls.errors.WriteError`: one line naming the destination and the OS error.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError, WriteError

#: Seconds the writer of :func:`write_bytes` pauses between writing its temporary file and the
#: rename, read from this environment variable (fault tests kill a process inside that window).
PAUSE_ENV = "ETBENCH_WRITE_PAUSE"


def _temporary_prefix(destination: Path) -> str:
    return f".{destination.name}.{os.getpid()}."


def _pause() -> None:
    seconds = os.environ.get(PAUSE_ENV)
    if seconds:
        import time

        time.sleep(float(seconds))


@contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``destination`` (same filesystem, so the final rename is
    atomic) and move it into place when the block succeeds; remove it when the block fails.
    An OS error (creating the folder, writing, renaming) becomes a one-line WriteError."""
    destination = Path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=destination.parent, prefix=_temporary_prefix(destination),
                                         suffix=destination.suffix)
        os.close(fd)
    except OSError as e:
        raise WriteError(destination, e) from None
    try:
        yield Path(temporary)
        _pause()
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(temporary, destination)
    except WriteError:
        Path(temporary).unlink(missing_ok=True)
        raise
    except OSError as e:
        Path(temporary).unlink(missing_ok=True)
        raise WriteError(destination, e) from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write(path: Path, data: bytes) -> None:
    """The one place file contents are written (tests replace it to simulate a full disk)."""
    with open(path, "wb") as f:
        f.write(data)


def write_bytes(destination: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``destination`` atomically."""
    with atomic_path(destination) as temporary:
        _write(temporary, data)
    return Path(destination)


def write_text(destination: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``destination`` atomically (UTF-8)."""
    return write_bytes(destination, text.encode("utf-8"))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_temporaries(destination: str | os.PathLike) -> list[Path]:
    """Temporary files of :func:`atomic_path` beside ``destination`` whose writer is no longer
    running (killed mid-write).  Temporaries of a live writer are left alone."""
    destination = Path(destination)
    try:
        entries = list(destination.parent.iterdir()) if destination.parent.is_dir() else []
    except OSError:
        return []
    pattern = re.compile(r"^\." + re.escape(destination.name) + r"\.(?:(\d+)\.)?[A-Za-z0-9_]{6,}"
                         + re.escape(destination.suffix) + "$")
    stale = []
    for entry in entries:
        m = pattern.match(entry.name)
        if m and entry.is_file() and not (m[1] and _pid_alive(int(m[1]))):
            stale.append(entry)
    return stale


def clean_stale(*destinations: str | os.PathLike | None) -> list[Path]:
    """Remove :func:`stale_temporaries` of each destination; returns the removed paths."""
    removed = []
    for destination in destinations:
        if destination is None:
            continue
        for path in stale_temporaries(destination):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def clean_stale_in(folder: str | os.PathLike) -> list[Path]:
    """Remove stale temporaries of every destination in ``folder`` (an isoFLOP sweep's folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = {m[1] for p in folder.iterdir() if (m := re.match(r"^\.(.+?)\.\d+\.[A-Za-z0-9_]{6,}", p.name))}
    removed = []
    for name in names:
        removed += clean_stale(folder / name)
    return removed


def check_writable(destination: str | os.PathLike) -> Path:
    """Refuse, before any work, a file destination that cannot be written: an existing directory,
    a parent that is a file, or a directory without write permission (raises ConfigError)."""
    path = Path(destination)
    if str(destination) == "" or path.name in ("", ".", ".."):
        raise ConfigError(f"output path {str(destination)!r} is not a file name")
    if path.is_dir():
        raise ConfigError(f"output path {str(path)!r} is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"output path {str(path)!r} is not writable")
    _check_ancestor(path, "output path")
    return path


def check_writable_dir(destination: str | os.PathLike) -> Path:
    """Refuse, before any work, an output folder that cannot be created or written: an existing
    file, a parent that is a file, or a folder without write permission (raises ConfigError)."""
    path = Path(destination)
    if str(destination) == "":
        raise ConfigError("output folder '' is not a folder name")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output folder {str(path)!r} is a file, not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"output folder {str(path)!r} is not writable")
        _probe(path, path, "output folder")
        return path
    _check_ancestor(path, "output folder")
    return path


def _check_ancestor(path: Path, what: str) -> None:
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():  # a dangling link cannot be created through
            break
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{what} {str(path)!r}: {str(ancestor)!r} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(path)!r}: directory {str(ancestor)!r} is not writable")
    _probe(ancestor, path, what)


def _probe(folder: Path, path: Path, what: str) -> None:
    """Create and remove an empty file in ``folder``: permission bits do not tell a read-only
    filesystem, or a pseudo-filesystem, from a writable folder (nor anything at all to root)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".etbench-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{what} {str(path)!r}: cannot create files in {str(folder)!r}: "
                          f"{e.strerror or e}") from None
