"""How many CPU threads torch gets: chosen from the machine's load unless the user says.

torch's default is one thread per core. On a machine that is busy with other work that is the slow
choice: with the load at ~3 on 2 cores, a warm server answered a 16-token /generate in 4.2-4.7 s
with 2 threads and in 1.7 s with 1 (intra-op threads wait for each other at every matmul when a
neighbour holds a core). So unless ``--threads`` or ``STEERLAB_THREADS`` is given, steerlab gives
torch the cores that are free at start: ``cores - load`` (1-minute load average), rounded, at
least 1, at most the cores it may run on.

Measured (bench/threads.py, this 2-core machine, greedy batch 1, 16 / 64 new tokens): nearly idle,
2 threads were 1.37x / 1.29x faster than 1; with two spinning neighbours, 1 thread was 4.5x / 4.3x
faster than 2 (1.57 s vs 7.05 s; 6.59 s vs 28.27 s). The load average lags by about a minute, so
right after heavy work ends this picks 1 thread where 2 would be 1.3x faster: the cheap side of
the mistake, against a 4.4x loss the other way.
"""

from __future__ import annotations

import os

ENV = "STEERLAB_THREADS"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def free_cores(cores: int | None = None, load: float | None = None) -> int:
    """Cores not busy with other work right now (at least 1)."""
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this OS: trust torch's default
            return cores
    return max(1, min(cores, int(cores - load + 0.5)))


def choose(requested: int | None = None) -> tuple[int, str]:
    """(threads, why): ``requested``, else ``STEERLAB_THREADS``, else the free cores."""
    if requested:
        return requested, "--threads"
    env = os.environ.get(ENV, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"{ENV}={env!r}: give a whole number of threads >= 1")
        return int(env), ENV
    cores = usable_cores()
    free = free_cores(cores)
    return free, f"{free} of {cores} cores free"


def apply(requested: int | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads by :func:`choose` (call once, before the model runs)."""
    import torch

    n, why = choose(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n, why
