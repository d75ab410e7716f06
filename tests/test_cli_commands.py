"""Every ``python -m impls.X`` entry point is also an ``etbench`` command, read from the source: a
module with an ``if __name__ == "__main__":`` block, or a package with a ``__main__.py``, must be
in :data:`impls.cli.MODULE_COMMANDS` (or listed below as internal, with the reason), and
``etbench NAME --help`` must exit 0, in-process, without running the command."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from impls import cli

IMPLS = Path(__file__).resolve().parents[1] / "impls"

#: Entry points that are no command, and why.
INTERNAL = {
    "impls.cli": "it is etbench itself",
    "impls.ranks": "internal plumbing: how ranks.launch starts each rank (python -m impls.ranks MODULE ARGS, "
                   "run under torch's elastic agent), not a command for users",
}


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__" and len(node.test.comparators) == 1
            and isinstance(node.test.comparators[0], ast.Constant) and node.test.comparators[0].value == "__main__")


def entry_points() -> list[str]:
    """``python -m`` names of every module of ``impls/`` that runs as a program."""
    found = set()
    for path in sorted(IMPLS.rglob("*.py")):
        parts = list(path.relative_to(IMPLS.parent).with_suffix("").parts)
        if parts[-1] == "__main__":
            found.add(".".join(parts[:-1]))
        elif any(_is_main_guard(node) for node in ast.parse(path.read_text()).body):
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(found)


def test_entry_points_are_found():
    found = entry_points()
    assert {"impls.cli", "impls.ranks", "impls.report", "impls.site", "impls.isoflop", "impls.publish"} <= set(found)


def test_every_entry_point_is_an_etbench_command():
    missing = [m for m in entry_points() if m not in cli.MODULE_COMMANDS and m not in INTERNAL]
    assert missing == [], f"python -m entry points with no etbench command (add them to impls.cli): {missing}"
    stale = [m for m in [*cli.MODULE_COMMANDS, *INTERNAL] if m not in entry_points()]
    assert stale == [], f"listed as entry points but have none: {stale}"


def test_every_command_is_in_the_parser():
    listed = next(a for a in cli.parser()._actions if a.dest == "command").choices
    assert set(cli.MODULE_COMMANDS.values()) <= set(listed)
    assert set(cli.DELEGATED) <= set(listed)


@pytest.mark.parametrize("name", sorted(set(cli.MODULE_COMMANDS.values())))
def test_command_help_exits_0(name, capsys):
    try:
        status = cli.main([name, "--help"])
    except SystemExit as e:
        status = e.code
    assert status in (0, None), capsys.readouterr().err
    assert "usage:" in capsys.readouterr().out
