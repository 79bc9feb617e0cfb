"""The docs say what the code does: every `steerlab ...` line in README.md and docs/*.md parses
with the real command line, and the README's command-line tour runs as written once
`.venv/bin` is on PATH (what `source .venv/bin/activate` does)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from steerlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_lines(path: Path) -> list[str]:
    """Shell lines in code (fenced, or indented 4 spaces) that run `steerlab`; continuations joined, comments cut."""
    out, fence = [], None  # None outside a fence, else its language ("text": help output, not commands)
    for raw in path.read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
        if raw.lstrip().startswith("```"):
            fence = None if fence is not None else raw.strip()[3:]
            continue
        line = raw.strip()
        if fence == "text":
            continue
        in_code = fence is not None or raw.startswith("    ")
        if in_code and "`" not in line and re.match(r"^([A-Z_]+=\S+\s+)*steerlab\s", line):
            out.append(line.split(" #")[0].strip())
    return out


def parse(line: str) -> None:
    """Parse ``line`` with the CLI without running it (unknown commands and options raise)."""
    argv = shlex.split(line)
    while "=" in argv[0]:
        argv.pop(0)
    assert argv[0] == "steerlab", line
    argv = [a for a in argv[1:] if a != "--debug"]
    ctx = click.Context(main, info_name="steerlab", **main.context_settings)  # -h (click caches help options)
    cmd = main.get_command(ctx, argv[0])
    if cmd is None:
        raise click.UsageError(f"no command {argv[0]!r}")
    cmd.make_context(argv[0], argv[1:], parent=ctx)


ALL = [(p.name, line) for p in DOCS for line in command_lines(p)]


def test_the_docs_have_commands():
    assert sum(1 for doc, _ in ALL if doc == "README.md") >= 15


@pytest.mark.parametrize(("doc", "line"), ALL, ids=[f"{d}:{line[:50]}" for d, line in ALL])
def test_every_documented_command_parses(doc, line):
    try:
        parse(line)
    except click.exceptions.Exit:
        pass  # --help / --version
    except click.ClickException as exc:
        pytest.fail(f"{doc}: `{line}` does not parse: {exc.format_message()}")


def readme_tour() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Quick tour: command line", 1)[1].split("`build` prints", 1)[0]
    skip = ("steerlab serve", "steerlab calibrate")  # a server that stays up; a measurement (docs/dose.md)
    return [line for line in command_lines_of(block) if not line.startswith(skip)]


def command_lines_of(block: str) -> list[str]:
    return [raw.strip().split(" #")[0].strip() for raw in block.splitlines() if raw.strip().startswith("steerlab ")]


def test_readme_tells_how_to_get_steerlab_on_path():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = text.split("## Quick tour", 1)[0]
    assert "source .venv/bin/activate" in setup and ".venv/bin/steerlab" in setup


@pytest.mark.model
def test_readme_tour_runs_as_written(tmp_path):
    """Each line of the tour, in a shell whose PATH starts with the venv's bin (as after activate)."""
    tour = readme_tour()
    assert tour[0] == "steerlab build" and len(tour) >= 5
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    for line in tour:
        r = subprocess.run(["bash", "-c", line + " --max-new-tokens 12"
                            if line.split()[1] in ("generate", "compare") else line],
                           env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert r.returncode == 0, f"`{line}` failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        assert "Traceback" not in r.stderr
        if line == "steerlab build":
            assert "saved:" in r.stdout
        if line == "steerlab list":
            assert "tabby_cats" in r.stdout


def test_cli_reference_matches_the_help():
    """docs/cli.md is `python scripts/cli_docs.py` output: regenerate it when an option changes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    cli_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli_docs)
    assert cli_docs.OUT.read_text(encoding="utf-8") == cli_docs.render(), "run `python scripts/cli_docs.py`"


def test_help_keeps_the_quick_start_lines_and_takes_h():
    from click.testing import CliRunner

    out = CliRunner().invoke(main, ["-h"], terminal_width=80).output
    lines = [line.strip() for line in out.splitlines()]
    assert any(line.startswith("steerlab build") and "vectors folder" in line for line in lines), out
    assert any(line.startswith("steerlab serve") for line in lines), out  # one command per line, not re-wrapped
    for cmd in ("build", "generate", "serve", "list"):
        r = CliRunner().invoke(main, [cmd, "-h"])
        assert r.exit_code == 0 and "-h, --help" in r.output


def test_one_python_version_is_declared_and_checked():
    """requires-python, ruff's target and mypy's python_version name the same minimum (3.11: tomllib)."""
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["ruff"]["target-version"] == "py311"
    assert project["tool"]["mypy"]["python_version"] == "3.11"
    assert sys.version_info >= (3, 11)


def test_aliases_are_accepted_but_help_shows_one_spelling():
    """Every command says --layer; --layers still parses. The sweep's --contrast is now --render."""
    from click.testing import CliRunner

    for cmd in ("generate", "compare", "build", "calibrate", "export", "inspect", "doctor", "similar", "sweep"):
        text = CliRunner().invoke(main, [cmd, "-h"]).output
        assert "--layer " in text and "--layers" not in text, cmd
    sweep_help = CliRunner().invoke(main, ["sweep", "-h"]).output
    assert "--render" in sweep_help and "--contrast" not in sweep_help
    sweep = main.commands["sweep"]
    ctx = sweep.make_context("sweep", ["x", "--layers", "2", "--contrast", "chat"])
    assert ctx.params["layer_spec"] == "2" and ctx.params["render_spec"] == "chat"
