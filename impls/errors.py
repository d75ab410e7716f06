"""The exception types the command line turns into one line (and an exit status) instead of a
traceback.

* :class:`ConfigError` — bad input: unknown names, invalid values, impossible combinations, an
  output path that cannot be written.  Its message is one line naming the bad value and the
  valid choices; the CLI prints it and exits with status 2, before any work starts.
* :class:`WriteError` — writing a result failed although its path was checked (a full disk, a
  permission changed mid-run): one line naming the path and the OS error, exit status 1.  Writes
  are atomic, so the previous file at that path is intact.

Anything else that escapes is a bug and keeps its traceback.
"""

import argparse

#: Exit statuses of ``etbench`` (README: "Exit statuses").
EXIT_OK = 0
EXIT_FAILED = 1  # a write failed (WriteError), a rank died, or an unexpected error (traceback)
EXIT_BAD_INPUT = 2  # ConfigError: nothing was done, nothing written
EXIT_DIVERGED = 3  # the run diverged (non-finite loss); its record is written with that status
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): one line, 128 + SIGINT as shells report it; no record written


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors (a flag's type, a missing or exclusive flag) as every other bad input:
    one line on stderr and :data:`EXIT_BAD_INPUT`, without the usage block (``--help`` shows it).
    Every command line of the suite (``etbench`` and its subcommands, ``python -m impls.X``)
    parses with it."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


class ConfigError(ValueError):
    pass


class WriteError(OSError):
    """A result could not be written: ``str()`` is one line naming the path and the OS error."""

    def __init__(self, path, error: OSError):
        self.path, self.error = str(path), error
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(error.errno, f"cannot write {self.path}: {reason}"
                         + (f" [errno {error.errno}]" if error.errno else ""))

    def __str__(self) -> str:
        return self.strerror
