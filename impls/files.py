"""Atomic file writes: a reader never sees a half-written result, and a failed write leaves the
previous file intact (results already written are never lost or corrupted).

A write goes to a hidden temporary file beside its destination, ``.<name>.<pid>.<random><suffix>``,
which is renamed over the destination when complete.  A process killed mid-write (kill -9) leaves
that temporary behind; :func:`clean_stale` removes those whose writer is gone, and every command
calls it for the paths it is about to write.  A write that fails raises
:class:`~impls.errors.WriteError`: one line naming the destination and the OS error.

What a write may replace: a regular file, or nothing.  A device (``/dev/null``, ``/dev/full``), a
FIFO, a socket or a folder at an output path is refused before any work (:func:`check_writable`),
and :func:`atomic_path` checks again right before its rename, so a path that became one meanwhile
is not replaced either.  A symbolic link is written *through*: its target is replaced, the link
stays.  Names longer than the filesystem allows (the temporary's extra characters included) are
refused up front, not found by the ``rename`` at the end of a run.

Two commands writing one path at once would silently lose one result: :func:`exclusive` takes an
advisory lock (``flock``) on a hidden ``.<name>.lock`` beside each output for the whole command,
and a second command refuses to start (``ConfigError`` naming the holder's pid).  Inputs that are
also outputs (a record written over the checkpoint it resumes from) are refused by
:func:`check_distinct`.
"""
from __future__ import annotations

import errno
import os
import re
import stat
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
    destination = _through_links(Path(destination))
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
        kind = _special_kind(destination)
        if kind is not None:  # became a device, FIFO, socket or folder since it was checked: keep it
            raise WriteError(destination, OSError(errno.EEXIST, f"it is {kind}, not a regular file; not replaced"))
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


#: Characters :func:`atomic_path`'s temporary adds to a name: ``.`` + name + ``.<pid>.`` (pid up
#: to 7 digits, Linux's pid_max 4194304) + mkstemp's 8 random characters + the suffix again.
_TEMPORARY_EXTRA = 1 + 1 + 7 + 1 + 8
#: Longest path the checks will look at (Linux's PATH_MAX); longer ones are refused unread.
PATH_MAX = 4096


def _special_kind(path: Path) -> str | None:
    """What ``path`` is when it is something a write must not replace (following links): a
    directory, device, FIFO or socket; None when it is a regular file or does not exist."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def _through_links(path: Path) -> Path:
    """A symbolic link's final target (the link is kept, its target written); else ``path``."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _name_max(folder: Path) -> int:
    """The longest file name the filesystem of ``folder`` (or its nearest existing ancestor) takes."""
    while True:
        try:
            return os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            if folder == folder.parent:
                return 255
            folder = folder.parent


def check_path_length(path: str | os.PathLike, what: str, *, temporary: bool = False) -> None:
    """Refuse a path longer than the system takes, or with a component longer than its
    filesystem's name limit (``temporary``: room left for :func:`atomic_path`'s temporary name),
    in one line before any filesystem call, instead of an ``ENAMETOOLONG`` traceback."""
    text = os.fspath(path)
    if len(os.fsencode(text)) >= PATH_MAX:
        raise ConfigError(f"{what} is {len(text)} characters long (starting {text[:40]!r}...); the longest path "
                          f"this system takes is {PATH_MAX - 1} bytes")
    p = Path(text)
    limit = None
    for i, part in enumerate(p.parts):
        size = len(os.fsencode(part))
        if size <= 200:  # well under every filesystem's limit: no need to ask
            continue
        limit = limit if limit is not None else _name_max(p.parent if p.parent != Path("") else Path("."))
        last = i == len(p.parts) - 1
        extra = _TEMPORARY_EXTRA + len(p.suffix) if (temporary and last) else 0
        if size + extra > limit:
            room = f" ({extra} characters are kept for the temporary file of the atomic write)" if extra else ""
            raise ConfigError(f"{what} {text[:40]!r}...: the name {part[:24]!r}... is {size} bytes long; this "
                              f"filesystem takes at most {limit - extra}{room}")


def check_writable(destination: str | os.PathLike) -> Path:
    """Refuse, before any work, a file destination that cannot be written: an empty name or one
    ending in ``/``, a name too long, an existing directory, device, FIFO or socket (only a
    regular file is ever replaced), a parent that is a file, or a directory without write
    permission (raises ConfigError)."""
    text = os.fspath(destination)
    path = Path(text)
    if text == "" or path.name in ("", ".", ".."):
        raise ConfigError(f"output path {text!r} is not a file name; give a file path such as results/run.json")
    if text.endswith(("/", os.sep)):
        raise ConfigError(f"output path {text!r} ends with '/', a folder; give a file name "
                          f"(e.g. {text.rstrip('/' + os.sep) or '.'}/run.json)")
    check_path_length(text, "output path", temporary=True)
    try:
        target = _through_links(path)
        kind = _special_kind(target)
        if kind == "a directory":
            raise ConfigError(f"output path {text!r} is a directory; give a file name")
        if kind is not None:
            raise ConfigError(f"output path {text!r} is {kind}, not a regular file; etbench writes only regular "
                              f"files (a new path, or a file it may replace)")
        if target.exists() and not os.access(target, os.W_OK):
            raise ConfigError(f"output path {text!r} is not writable")
        _check_ancestor(target, "output path")
    except OSError as e:  # ELOOP (a link cycle), EACCES on a parent, ...
        raise ConfigError(f"output path {text!r}: {e.strerror or e}") from None
    return path


def check_readable(source: str | os.PathLike, what: str) -> Path:
    """Refuse, before any work, an input file that cannot be read as one: missing, too long a
    name, a directory, device, FIFO or socket (reading a FIFO would wait for a writer forever),
    or unreadable.  ``what`` names the flag in the message (``--resume``, ``distill:teacher``)."""
    text = os.fspath(source)
    if text == "":
        raise ConfigError(f"{what} '' is not a file name")
    check_path_length(text, what)
    try:
        if not os.path.exists(text):
            raise ConfigError(f"{what} {text!r} does not exist")
        kind = _special_kind(Path(text))
        if kind is not None:
            raise ConfigError(f"{what} {text!r} is {kind}, not a regular file")
        if not os.access(text, os.R_OK):
            raise ConfigError(f"{what} {text!r} is not readable")
    except OSError as e:
        raise ConfigError(f"{what} {text!r}: {e.strerror or e}") from None
    return Path(text)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same inode where both exist (hard links, links,
    ``./x`` and ``x``), else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_distinct(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse an output that is also an input (``--out`` over the ``--resume`` checkpoint, over
    the ``--init-from`` record...): the command would destroy what it reads.  Keys are the flags
    that named the paths."""
    for out_flag, out in outputs.items():
        for in_flag, source in inputs.items():
            if out is not None and source is not None and same_file(out, source):
                raise ConfigError(f"{out_flag} {os.fspath(out)!r} is also the {in_flag} input; writing it would "
                                  f"destroy what this run reads: give {out_flag} another path")


class _Lock:
    def __init__(self, destination: Path, fd: int, path: Path, created: list[Path]):
        self.destination, self.fd, self.path, self.created = destination, fd, path, created


def _lock_path(destination: Path) -> Path:
    return destination.parent / f".{destination.name}.lock"


def _acquire(destination: Path, shown: str) -> _Lock:
    import fcntl

    lock = _lock_path(destination)
    created, folder = [], lock.parent  # folders made for the lock: removed again if left empty
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(lock, e) from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            _remove_empty(created)
            raise WriteError(lock, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            except OSError:
                holder = "?"
            os.close(fd)
            raise ConfigError(f"output {shown!r} is being written by another etbench command (pid "
                              f"{holder}); wait for it to finish, or give another path") from None
        except OSError:  # a filesystem without flock (some network mounts): no lock, as before
            os.close(fd)
            return _Lock(destination, -1, lock, created)
        # The holder before us may have removed the lock file between our open and our flock:
        # then we hold a lock on a file nobody else can see; take the one at the path instead.
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return _Lock(destination, fd, lock, created)
        except OSError:
            pass
        os.close(fd)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:  # not empty (the command wrote there), or gone
            return


def _release(lock: _Lock) -> None:
    if lock.fd >= 0:
        try:
            os.unlink(lock.path)  # while still held: a waiter that opened it sees the inode change
        except OSError:
            pass
        os.close(lock.fd)
    # A command refused after taking the lock (bad input found by the recipe's checks) leaves no
    # folder behind: nothing written.
    _remove_empty(lock.created)


@contextmanager
def exclusive(*destinations: str | os.PathLike | None) -> Iterator[None]:
    """Hold an exclusive lock on each output for the block: a second etbench command writing
    any of them meanwhile is refused (:class:`ConfigError`, exit 2) before it does any work,
    instead of both finishing and one result being silently replaced.  The lock is a hidden
    ``.<name>.lock`` beside the output (holding the pid), removed on release; the kernel drops
    the lock when the process dies, so a killed command never blocks the next one (its empty
    lock file stays, and the next command takes it over)."""
    held: list[_Lock] = []
    seen: set[str] = set()
    try:
        for destination in destinations:
            if destination is None:
                continue
            path = _through_links(Path(os.path.abspath(destination)))
            if str(path) in seen:
                continue
            seen.add(str(path))
            held.append(_acquire(path, os.fspath(destination)))
        yield
    finally:
        for lock in reversed(held):
            _release(lock)


def check_writable_dir(destination: str | os.PathLike) -> Path:
    """Refuse, before any work, an output folder that cannot be created or written: an existing
    file, a parent that is a file, or a folder without write permission (raises ConfigError)."""
    path = Path(destination)
    if str(destination) == "":
        raise ConfigError("output folder '' is not a folder name")
    check_path_length(destination, "output folder", temporary=True)
    try:
        if path.exists() and not path.is_dir():
            kind = _special_kind(path)
            raise ConfigError(f"output folder {str(path)!r} is {'a file' if kind is None else kind}, not a folder")
        if path.is_dir():
            if not os.access(path, os.W_OK | os.X_OK):
                raise ConfigError(f"output folder {str(path)!r} is not writable")
            _probe(path, path, "output folder")
            return path
        _check_ancestor(path, "output folder")
    except OSError as e:
        raise ConfigError(f"output folder {str(path)!r}: {e.strerror or e}") from None
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
