"""CPU-bound neighbour processes, for benches that measure steerlab on a busy machine."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _spin() -> None:
    while True:
        pass


@contextmanager
def spinning(n: int, settle_s: float = 2.0) -> Iterator[None]:
    """``n`` processes that spin a core each for the duration of the block (after ``settle_s``)."""
    procs = [mp.Process(target=_spin, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        time.sleep(settle_s if n else 0)
        yield
    finally:
        for p in procs:
            p.terminate()
