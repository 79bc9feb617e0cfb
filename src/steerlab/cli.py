"""steerlab command line: build vectors, generate and compare, serve the studio.

\b
Quick start (after `source .venv/bin/activate`, or as .venv/bin/steerlab):
    steerlab build                          # built-in personas -> vectors folder, dose windows measured
    steerlab generate "Write a short note to a friend about your week." --steer tabby_cats --dose 1
    steerlab compare "Plan my weekend" --steer weeknd:dose=0.5 --steer toronto:dose=0.5
    steerlab list                           # vectors and their metadata
    steerlab serve                          # web studio on http://127.0.0.1:5050

Errors are one line on stderr and a non-zero exit; --debug shows tracebacks.
`steerlab COMMAND -h` shows a command's options.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from .build_command import build, calibrate, list_
from .errors import SteeringError
from .generation_command import compare, generate
from .glass_command import doctor_cmd, inspect_cmd, similar_cmd
from .interop_command import compare_methods_cmd, export_cmd, import_cmd
from .server.command import examples, serve
from .sweep_command import sweep


class _Group(click.Group):
    """Turns SteeringError into one clean line (traceback with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SteeringError as exc:
            if ctx.meta.get("steerlab.debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.version_option(package_name="steerlab")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    ctx.meta["steerlab.debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(message)s")
    if not debug:  # weight-loading bars and warnings are noise at the command line
        _quiet_transformers()


def _quiet_transformers() -> None:
    """transformers' warnings and weight-loading bars off, without importing it (~1 s) when it is not loaded yet."""
    import os

    if "transformers" in sys.modules:  # e.g. tests calling the CLI in-process
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    else:  # both are read when transformers loads
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# Every command lives in a *_command module (they import options.py, never this module).
for command in (build, calibrate, generate, compare, list_, sweep, serve, examples, export_cmd, import_cmd,
                compare_methods_cmd, inspect_cmd, doctor_cmd, similar_cmd):
    main.add_command(command)

if __name__ == "__main__":  # python -m steerlab.cli (python -m steerlab also works)
    main()
