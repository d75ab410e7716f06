"""Atomic file writes: a reader never sees a half-written result, and a failed write leaves the
previous file intact (results already written are never lost or corrupted)."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``destination`` (same filesystem, so the final rename is
    atomic) and move it into place when the block succeeds; remove it when the block fails."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.",
                                     suffix=destination.suffix)
    os.close(fd)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text(destination: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``destination`` atomically."""
    with atomic_path(destination) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(destination)


def check_writable(destination: str | os.PathLike) -> Path:
    """Refuse, before any work, a destination that cannot be written: an existing directory, a
    parent that is a file, or a directory without write permission (raises ConfigError)."""
    from .errors import ConfigError

    path = Path(destination)
    if path.is_dir():
        raise ConfigError(f"output path {str(path)!r} is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"output path {str(path)!r} is not writable")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"output path {str(path)!r}: {str(ancestor)!r} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"output path {str(path)!r}: directory {str(ancestor)!r} is not writable")
    return path
