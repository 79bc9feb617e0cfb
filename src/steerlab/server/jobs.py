"""What a request becomes on its way to an engine: a job, the events it emits, and the engine surface.

A :class:`GenJob` is one request's rows with per-row steering and shared options; it reports
through ``emit(event)`` (:class:`Delta`, :class:`Done` or :class:`Failed`). :class:`Engine` is what
the routes submit jobs to: :class:`~steerlab.server.runner.Runner` (transformers) or
:class:`~steerlab.server.vllm_runner.VLLMRunner`. Knows nothing about HTTP or models.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..generate import GenerationOptions
from ..spec import Resolved

PREFILL_PER_STEP = 16  # prompt tokens whose prefill costs about one decode step (a rough CPU figure)


class Busy(Exception):
    """The queue is full (or the runner is closed); try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 2) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JobTimeout(Exception):
    """A job ran past its time limit."""


def ran_past(job: GenJob) -> JobTimeout:
    """The one message for a job that ran past its time limit (both engines, both checks)."""
    return JobTimeout(f"generation ran past the {job.timeout_s:g} s limit; "
                      "ask for fewer tokens or try again when the server is less busy")


class JobCancelled(Exception):
    """A job was cancelled by its client."""


# ---- events a job emits -----------------------------------------------------------------------
@dataclass(frozen=True)
class Delta:
    row: int
    text: str
    gain: float | None = None  # the governor's gain on this row's steering for these tokens (None: no governor)
    read: tuple | None = None  # (start, end, {vector: reading}) of an earlier token, text "" (server.live_read)


@dataclass(frozen=True)
class RowResult:
    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: str  # "stop" (end of text) or "length" (token limit)
    governor: dict | None = None  # what the coherence governor did to this row (None: it did not run)
    conditions: list[dict] | None = None  # what its text conditions did (steerlab.conditional.TextGate)


@dataclass(frozen=True)
class Done:
    rows: list[RowResult]
    batch_jobs: int  # jobs that shared this job's batch (itself included)
    batch_rows: int
    queued_s: float
    first_token_s: float | None
    total_s: float


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Delta | Done | Failed


@dataclass(eq=False)
class GenJob:
    """One request: prompts (rows) with per-row steering and shared options."""

    prompts: list[str]
    steering: list[list[Resolved]]
    options: GenerationOptions
    emit: Callable[[Event], None]
    timeout_s: float = 120.0
    prompt_tokens: int = 0  # the longest row's prompt in tokens, counted by the app (0: unknown)
    cancel: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    finished: bool = False  # set once Done/Failed was emitted (worker thread only)
    outcome: str | None = None  # "done", "cancelled", "timed_out" or "failed", once finished
    live_read: Any = None  # a server.live_read.LiveRead: stream each token's reading

    @property
    def deadline(self) -> float:
        return self.created + self.timeout_s

    @property
    def cost(self) -> float:
        """This job's work in decode steps: its new tokens, and its prompt (prefill is parallel, so cheaper)."""
        return self.prompt_tokens / PREFILL_PER_STEP + self.options.max_new_tokens

    def end(self, event: Event) -> None:
        if not self.finished:
            self.finished = True
            self.outcome = _outcome(event)
            self.emit(event)


class Engine(Protocol):
    """What generates for the routes: :class:`Runner` (transformers) or
    :class:`~steerlab.server.vllm_runner.VLLMRunner` (vLLM). The routes know only this surface."""

    def start(self) -> None: ...
    def shutdown(self) -> None: ...
    def close(self) -> None: ...
    def submit(self, job: GenJob) -> None: ...
    def call(self, fn: Callable[[], Any]) -> Future: ...
    def engine_info(self) -> dict[str, str]: ...
    def stats(self) -> dict[str, Any]: ...


def _outcome(event: Event) -> str:
    if isinstance(event, Done):
        return "done"
    if isinstance(event, Failed) and isinstance(event.error, JobCancelled):
        return "cancelled"
    if isinstance(event, Failed) and isinstance(event.error, JobTimeout):
        return "timed_out"
    return "failed"


def is_oom(error: BaseException) -> bool:
    """Out of memory, on an accelerator or the CPU (torch's CPU allocator raises a RuntimeError)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if (oom is not None and isinstance(error, oom)) or isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory", "bad_alloc"))


def short_error(error: BaseException, limit: int = 300) -> str:
    text = str(error).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
