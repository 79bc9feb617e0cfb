"""Conditions of steering entries over HTTP (the ``when`` field of an entry; docs/glassbox.md).

Prompt conditions are decided before the job is queued, on the runner's worker (one reading pass
over the prompt, with the app's cached reader), so the ``start`` event and the answer can say
whether they fired; text conditions are armed there too and reported when the row is done.
Knows nothing about routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..conditional import condition_vectors, decide
from ..spec import Resolved
from . import bridge

if TYPE_CHECKING:
    from .state import Studio


async def decide_rows(state: Studio, prompt: str, rows: list[list[Resolved]]
                      ) -> tuple[list[list[Resolved]], list[list[dict]]]:
    """``rows`` (one per batch row, all for ``prompt``) with their conditions decided, and per row what each did."""
    conds = condition_vectors(rows)
    if not conds:
        return rows, [[] for _ in rows]

    def work() -> tuple[list[list[Resolved]], list[list[dict]]]:
        lm = state.lm.loaded()
        return decide(lm, [prompt] * len(rows), rows, reader=state.readers.get(lm, conds))

    try:
        return await asyncio.wrap_future(state.runner.call(work))
    except Exception as exc:  # Busy, or a SteeringError: as the HTTP error a client should see
        raise bridge.http_error(exc) from None


def annotate(applied: list[dict[str, Any]], outcomes: Sequence[dict], later: Sequence[dict] | None = None
             ) -> list[dict[str, Any]]:
    """``applied`` with each conditioned entry's ``fired`` (and the reading that decided it).

    ``outcomes``: the prompt conditions' records, in entry order; ``later``: the text conditions'
    (known when the row is done; until then their ``fired`` is null).
    """
    queues = {"prompt": list(outcomes), "text": list(later or [])}
    out = []
    for entry in applied:
        when = entry.get("when")
        if when is None:
            out.append(entry)
            continue
        got = queues[when["on"]].pop(0) if queues[when["on"]] else None
        extra = {"fired": None if got is None else got["fired"]}
        if got is not None and "value" in got:
            extra["when"] = {**when, "value": got["value"]}
        if got is not None and got.get("first_steered_token") is not None:
            extra |= {"first_steered_token": got["first_steered_token"], "steered_tokens": got["steered_tokens"]}
        out.append({**entry, **extra})
    return out
