"""Say what a slow command is doing, so nobody waits in silence.

``say(message)`` prints one line to stderr at once (stdout stays clean for generated text).
``slow(message, after=s)`` is a context manager that prints ``message`` only if the phase
inside it is still running after ``s`` seconds, so quick runs stay quiet and slow ones say
what they are waiting for. Knows nothing about models or steering.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Say = Callable[[str], None]


def say(message: str) -> None:
    """One line on stderr, flushed (a progress line, not a result)."""
    print(message, file=sys.stderr, flush=True)


@contextmanager
def slow(message: str, *, after: float = 2.0, echo: Say = say) -> Iterator[None]:
    """Print ``message`` if the body still runs after ``after`` seconds (at once when ``after`` <= 0)."""
    if after <= 0:
        echo(message)
        yield
        return
    timer = threading.Timer(after, echo, args=(message,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
