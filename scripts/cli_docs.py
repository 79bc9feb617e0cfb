"""Write docs/cli.md from the command line's own `--help` texts, so the reference cannot drift.

    python scripts/cli_docs.py            # rewrite docs/cli.md
    python scripts/cli_docs.py --check    # exit 1 (and say so) if docs/cli.md is out of date

tests/test_docs.py runs the check. Help is rendered at a fixed width (100 columns) so the
output does not depend on the terminal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

OUT = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
WIDTH = 100
HEADER = """# Command-line reference

Generated from `steerlab --help` and each command's `--help` by `scripts/cli_docs.py`; do not
edit by hand (`python scripts/cli_docs.py` rewrites it, `tests/test_docs.py` checks it).
Every command also takes `-h`.
"""


def _context(cmd: click.Command, name: str, parent: click.Context | None = None) -> click.Context:
    """The context `--help` would see (the command's own settings, e.g. -h), at a fixed width."""
    settings = {**cmd.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    return click.Context(cmd, info_name=name, parent=parent, **settings)


def render() -> str:
    from steerlab.cli import main

    root = _context(main, "steerlab")
    parts = [HEADER, "## steerlab\n", "```text", main.get_help(root), "```\n"]
    for name in main.list_commands(root):
        cmd = main.get_command(root, name)
        parts += [f"## steerlab {name}\n", "```text", cmd.get_help(_context(cmd, name, root)), "```\n"]
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run `python scripts/cli_docs.py`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
