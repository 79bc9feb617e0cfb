"""Defaults shared by the library, the command line and the server (no imports: cheap for the CLI).

Each value lives here once; :class:`steerlab.generate.GenerationOptions`, the click options and
the request schemas read it from here.
"""

from __future__ import annotations

REPETITION_PENALTY = 1.2  # small models loop under greedy decoding without it; 1.0 = off
