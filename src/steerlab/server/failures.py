"""What a generation failure is: out of memory (on an accelerator or the CPU) or not, and its
message shortened for a log line. Used by the runner (no per-job retry after an OOM) and the
bridge (503 with advice). Knows nothing about jobs.
"""

from __future__ import annotations

import torch


def is_oom(error: BaseException) -> bool:
    """Out of memory, on an accelerator or the CPU (torch's CPU allocator raises a RuntimeError)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if (oom is not None and isinstance(error, oom)) or isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc"))


def short(error: BaseException, limit: int = 300) -> str:
    text = str(error).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
