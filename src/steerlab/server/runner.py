"""The runner: one worker thread owns the model; requests reach it as jobs on a bounded queue.

Owns dynamic batching, per-job token limits, cancellation, time limits and exclusive calls.

* A :class:`GenJob` is one request's rows (1 for generate, 2 for compare) with per-row
  steering. Jobs waiting together whose sampling settings match (see :func:`batch_key`) run as
  ONE batched ``generate`` with per-row steering; the batch generates up to the largest
  ``max_new_tokens`` and each job finishes (and is answered) as soon as its own rows are done.
  The worker waits at most ``batch_wait_s`` for company, so a lone request is not held back.
* Sampled jobs with a ``seed`` run alone, so the same seed gives the same text.
* Which job runs next is not plain arrival order: each waiting job is ranked by its estimated
  finish, arrival time plus its cost (new tokens, plus prompt tokens at ``PREFILL_PER_STEP`` per
  decode step) times the measured time of one decode step. Short requests overtake long ones
  that arrived before them; a long one is not starved, since later arrivals rank after it. A batch
  holds at most ``max_batch_tokens`` padded prompt tokens, so one
  long prompt cannot make every row of a batch long.
* A job's ``cancel`` event (client gone) or its deadline ends it at the next token (every
  decode step checks); a batch stops as soon as none of its jobs is still wanted.
* A running batch yields: once it has run ``slice_s`` and a waiting job ranks before it (the
  batch's rank: its oldest job plus the cost of the tokens it still has to make), it stops after
  the current decode step, waits in the queue with its KV cache (:mod:`steerlab.server.slices`)
  and later resumes exactly where it stopped (same tokens as in one go). At most one batch is
  paused at a time; seeded sampling never pauses. So a short request waits about one slice
  behind a maximal one, not the maximal one's whole run.
* One job's failure is its own: when a batch of several jobs fails before any token, each job
  is retried alone, so a bad row answers only its own request.
* :meth:`Runner.call` runs any function (a vector build) on the worker, so it never overlaps a
  generation. Steering hooks live only inside one batch's ``generate`` (context-managed).

Knows nothing about HTTP: jobs report through ``emit(event)``, called on the worker thread.
The job types live in :mod:`.jobs`, the per-step streamer in :mod:`.batch_streamer`. (About 430
lines: queueing, batching, slicing and ranking are one state machine over one lock; split
further, each part would need the others' private state.)
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..generate import GenerationOptions, eos_ids
from ..spec import Resolved
from . import slices
from .batch_streamer import BatchStreamer
from .live_read import live_reads
from .jobs import (  # re-exported: routes, tests and the vLLM runner import them from here
    PREFILL_PER_STEP,
    Busy,
    Delta,
    Done,
    Engine,
    Event,
    Failed,
    GenJob,
    JobCancelled,
    JobTimeout,
    RowResult,
    is_oom,
    short_error,
    ran_past,
)

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["PREFILL_PER_STEP", "Busy", "Delta", "Done", "Engine", "Event", "Failed", "GenJob", "JobCancelled",
           "JobTimeout", "RowResult", "Runner", "batch_key", "ran_past"]

log = logging.getLogger("steerlab.server")

@dataclass(eq=False)
class _Call:
    fn: Callable[[], Any]
    future: Future


@dataclass(eq=False)
class _Paused:
    """A batch that yielded the model: its jobs, where it stopped, and what it runs with."""

    batch: list[GenJob]
    streamer: Any
    state: Any  # slices.SliceState
    steering: list[list[Resolved]]
    options: GenerationOptions
    started: float

    @property
    def jobs(self) -> list[GenJob]:
        return [j for j in self.batch if not j.finished]


def batch_key(opts: GenerationOptions) -> tuple | None:
    """Jobs with equal keys may share a batch (max tokens: the batch takes the largest).

    None: the job runs alone (sampling with a fixed seed must not depend on its neighbours).
    """
    sample = opts.temperature > 0
    if sample and opts.seed is not None:
        return None
    return (opts.temperature, opts.top_p if sample else None, opts.chat, opts.positions, opts.norm_preserve,
            opts.repetition_penalty)


class Runner:
    """The worker thread that owns ``lm``. ``start()`` it, ``submit()`` jobs, ``close()`` it."""

    def __init__(self, lm: LoadedModel, *, max_queue: int = 32, max_batch_rows: int = 16, batch_wait_s: float = 0.01,
                 max_batch_tokens: int = 8192, slice_s: float = 1.0) -> None:
        self.lm = lm
        self.slice_s = slice_s
        self._step_s = 0.02  # seconds per decode step, measured (moving average) as batches run
        self.max_queue = max_queue
        self.max_batch_rows = max_batch_rows
        self.batch_wait_s = batch_wait_s
        self.max_batch_tokens = max_batch_tokens
        self._eos = set(eos_ids(lm.tokenizer))
        self._pending: collections.deque[GenJob | _Call | _Paused] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._busy = False
        self._stop_current: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._counts: collections.Counter[str] = collections.Counter()
        self._batch_sizes: collections.deque[tuple[int, int]] = collections.deque(maxlen=64)
        self._batch_secs: collections.deque[float] = collections.deque(maxlen=16)

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="steerlab-runner", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Refuse new work, fail what is queued and stop the running batch (its jobs get 503); never blocks.

        Safe from a signal handler: ``steerlab serve`` calls it on SIGTERM/SIGINT, before uvicorn
        waits for open requests, so they end with the documented 503 instead of being cut off.
        """
        with self._cv:
            self._closed = True
            dropped = list(self._pending)
            self._pending.clear()
            if self._stop_current is not None:
                self._stop_current.set()
            self._cv.notify_all()
        for item in dropped:
            self._fail(item, Busy("the server is shutting down"))

    def close(self, timeout: float = 10.0) -> None:
        """:meth:`shutdown`, then join the worker."""
        self.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- submitting ---------------------------------------------------------------------
    def submit(self, job: GenJob) -> None:
        """Queue a generation job; raise :class:`Busy` when the queue is full."""
        self._enqueue(job)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the worker, between batches; the future gets its result."""
        item = _Call(fn, Future())
        self._enqueue(item)
        return item.future

    def _enqueue(self, item: GenJob | _Call) -> None:
        with self._cv:
            if self._closed:
                raise Busy("the server is shutting down")
            waiting = sum(1 for x in self._pending if isinstance(x, _Call) or (isinstance(x, GenJob)
                                                                                   and not x.cancel.is_set()))
            if waiting >= self.max_queue:
                self._counts["refused"] += 1
                raise Busy(f"the server is busy ({waiting} requests waiting); try again shortly",
                           retry_after=self._retry_after(waiting))
            self._pending.append(item)
            self._cv.notify_all()

    def _retry_after(self, waiting: int) -> int:
        per_batch = sum(self._batch_secs) / len(self._batch_secs) if self._batch_secs else 2.0
        return max(1, math.ceil(per_batch * (1 + waiting / max(1, self.max_batch_rows))))

    def engine_info(self) -> dict[str, str]:
        """What /health says generates: this engine, its device and dtype."""
        return {"engine": "transformers", "device": str(self.lm.device),
                "dtype": str(self.lm.dtype).replace("torch.", "")}

    def stats(self) -> dict[str, Any]:
        """Counters for /health and tests: queue depth, batches, jobs, and how jobs ended."""
        with self._cv:
            pending = len(self._pending)
        return {"pending": pending, "max_queue": self.max_queue, "busy": self._busy,
                "max_batch_rows": self.max_batch_rows, "max_batch_tokens": self.max_batch_tokens,
                "step_s": round(self._step_s, 4), "slice_s": self.slice_s,
                "cancelled": 0, "timed_out": 0, **dict(self._counts),
                "recent_batches": [{"jobs": j, "rows": r} for j, r in self._batch_sizes]}

    # ---- the worker ---------------------------------------------------------------------
    def _rank_job(self, job: GenJob) -> float:
        return job.created + self._step_s * job.cost

    def _rank_batch(self, jobs: list[GenJob], generated: int, prompt_left: float) -> float:
        """A started batch ranks as its most urgent open job: that job's arrival plus the steps *it*
        still needs (so a short job inside a batch with a long one is not held back by the long one)."""
        return min((j.created + self._step_s * (max(0, j.options.max_new_tokens - generated)
                                                 + prompt_left / PREFILL_PER_STEP) for j in jobs), default=0.0)

    def _rank(self, item: GenJob | _Paused) -> float:
        if isinstance(item, _Paused):
            prompt_left = 0 if item.state.generated else item.state.ids.shape[1] - item.state.prefilled
            return self._rank_batch(item.jobs, item.state.generated, prompt_left)
        return self._rank_job(item)

    def _pop_next(self) -> GenJob | _Call | _Paused:
        """The waiting item to run next (call with the lock held and the queue non-empty)."""
        first = self._pending[0]
        if isinstance(first, _Call):  # calls keep their place: they run between batches, in order
            return self._pending.popleft()
        best = min((x for x in self._pending if not isinstance(x, _Call)), key=self._rank)
        self._pending.remove(best)
        return best

    def _yield_check(self, batch: list[GenJob], streamer: BatchStreamer, opts: GenerationOptions,
                     state_generated: int, slice_started: float, prompt_left: int = 0) -> Callable[[], bool]:
        """For the streamer: whether the running batch should stop now and let a waiting job run."""
        if opts.seed is not None and opts.temperature > 0:
            return lambda: False
        steps = [0]

        def check() -> bool:
            steps[0] += 1
            if time.monotonic() - slice_started < self.slice_s:
                return False
            mine = self._rank_batch([j for j in batch if not j.finished], state_generated + steps[0], prompt_left)
            with self._cv:
                if self._closed or any(isinstance(x, _Paused) for x in self._pending):
                    return False
                waiting = [self._rank_job(x) for x in self._pending if isinstance(x, GenJob) and not x.cancel.is_set()]
            return bool(waiting) and min(waiting) < mine

        return check

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                first = self._pop_next()
                self._busy = True
            try:
                if isinstance(first, _Call):
                    self._run_call(first)
                elif isinstance(first, _Paused):
                    self._resume(first)
                elif self._usable(first):
                    self._run_batch(self._gather(first))
            except Exception:  # never let the worker die: the failure was reported to the job
                log.exception("runner: unexpected error")
            finally:
                self._busy = False

    def _usable(self, job: GenJob) -> bool:
        if job.cancel.is_set():
            job.end(Failed(JobCancelled("cancelled by the client")))
            self._count(job)
            return False
        if time.monotonic() > job.deadline:
            job.end(Failed(JobTimeout(f"the request waited past its {job.timeout_s:g} s limit; try again")))
            self._count(job)
            return False
        return True

    def _count(self, job: GenJob) -> None:
        if job.outcome in ("cancelled", "timed_out"):
            self._counts[job.outcome] += 1

    def _fits(self, batch: list[GenJob], rows: int, job: GenJob) -> bool:
        """Whether ``job`` may join: rows, and padded prompt tokens (rows x the longest prompt)."""
        n = rows + len(job.prompts)
        longest = max(job.prompt_tokens, *(j.prompt_tokens for j in batch))
        return n <= self.max_batch_rows and n * longest <= self.max_batch_tokens

    def _gather(self, first: GenJob) -> list[GenJob]:
        """``first`` plus compatible jobs that are waiting or arrive within ``batch_wait_s``."""
        batch, rows = [first], len(first.prompts)
        key = batch_key(first.options)
        if key is None:
            return batch
        until = time.monotonic() + self.batch_wait_s
        with self._cv:
            while True:
                for item in sorted((x for x in self._pending if isinstance(x, GenJob)), key=self._rank_job):
                    if batch_key(item.options) == key and self._fits(batch, rows, item):
                        self._pending.remove(item)
                        if self._usable(item):
                            batch.append(item)
                            rows += len(item.prompts)
                left = until - time.monotonic()
                if left <= 0 or rows >= self.max_batch_rows or self._closed:
                    return batch
                self._cv.wait(left)

    def _run_batch(self, batch: list[GenJob]) -> None:
        prompts, steering, slots = [], [], []
        for job in batch:
            for r, (prompt, row) in enumerate(zip(job.prompts, job.steering, strict=True)):
                prompts.append(prompt)
                steering.append(list(row))
                slots.append((job, r))
        opts = replace(batch[0].options, max_new_tokens=max(j.options.max_new_tokens for j in batch))
        started = time.monotonic()
        streamer, state = None, None
        error: BaseException | None = None
        try:
            state = slices.begin(self.lm, prompts, opts)
            streamer = BatchStreamer(self.lm.tokenizer, slots, self._eos, threading.Event(),
                                      state.mask.sum(dim=1).tolist(), started, len(batch))
            self._batch_sizes.append((len(batch), len(slots)))
            self._counts["batches"] += 1
            self._counts["jobs"] += len(batch)
        except Exception as exc:  # encoding failed: nothing ran
            error = exc
        if error is None:
            self._slice(_Paused(batch, streamer, state, steering, opts, started))
            return
        self._finish_batch(batch, streamer, error, started)

    def _resume(self, paused: _Paused) -> None:
        paused.streamer._check_alive(time.monotonic())  # clients that left, deadlines passed while it waited
        if not paused.jobs:
            self._finish_batch(paused.batch, paused.streamer, None, paused.started)
            return
        self._counts["resumed"] += 1
        self._slice(paused)

    def _slice(self, run: _Paused) -> None:
        """Run the batch until it is done, fails, or yields (then it waits in the queue, paused)."""
        streamer, state, opts = run.streamer, run.state, run.options
        stop = threading.Event()
        streamer.stop, streamer.prompt_seen, streamer.yielded = stop, False, False
        prompt_left = 0 if state.generated else state.ids.shape[1] - state.prefilled
        streamer.should_yield = self._yield_check(run.batch, streamer, opts, state.generated, time.monotonic(),
                                                  prompt_left)
        with self._cv:
            self._stop_current = stop
            if self._closed:
                stop.set()
        error: BaseException | None = None
        t0, before = time.monotonic(), state.generated
        try:
            if state.generated == 0:  # a long prompt: prefill in chunks, yielding between them if asked
                state = slices.prefill(self.lm, state, run.steering, opts,
                                       keep_going=lambda: self._keep_prefilling(streamer, stop))
                t0 = time.monotonic()
            if not stop.is_set():
                with live_reads(self.lm, run.jobs, streamer) as put:
                    state = slices.run(self.lm, state, run.steering, opts, streamer=put, stop=stop,
                                       max_new_tokens=opts.max_new_tokens - state.generated, report=streamer.report)
        except Exception as exc:  # reported to the jobs of the batch (alone, see below)
            log.exception("runner: generation failed")
            error = exc
        finally:
            with self._cv:
                self._stop_current = None
                closed = self._closed
        if error is None and state.generated - before >= 4:  # the prefill step is in there: enough steps to tell
            step = (time.monotonic() - t0) / (state.generated - before)
            self._step_s = 0.7 * self._step_s + 0.3 * step
        if (error is None and not closed and streamer.yielded and run.jobs
                and state.generated < opts.max_new_tokens):
            with self._cv:
                self._pending.append(replace(run, state=state))
                self._cv.notify_all()
            self._counts["yielded"] += 1
            return
        if error is not None and len(run.batch) > 1 and not is_oom(error):
            untouched = [j for j in run.batch if not j.finished and j not in streamer.first_token]
            if len(untouched) == len(run.batch):  # failed before any token: find the job it belongs to
                log.warning("runner: a batch of %d jobs failed (%s); retrying each alone", len(run.batch),
                            type(error).__name__)
                for job in run.batch:
                    if self._usable(job):
                        self._run_batch([job])
                return
        if closed and error is None:  # stopped by shutdown(): the text is cut short, not finished
            error = Busy("the server is shutting down; retry against the restarted server", retry_after=5)
        self._finish_batch(run.batch, streamer, error, run.started)

    @staticmethod
    def _keep_prefilling(streamer: BatchStreamer, stop: threading.Event) -> bool:
        """Between prefill chunks: the same checks a decode step makes (client, deadline, yielding)."""
        streamer._check_alive(time.monotonic())
        if all(job.finished for job in streamer.jobs):
            stop.set()
        elif not stop.is_set() and streamer.should_yield is not None and streamer.should_yield():
            streamer.yielded = True
            stop.set()
        return not stop.is_set()

    def _finish_batch(self, batch: list[GenJob], streamer: BatchStreamer | None, error: BaseException | None,
                      started: float) -> None:
        if error is not None and not isinstance(error, Busy):
            log.error("runner: generation failed: %s: %s", type(error).__name__, short_error(error))
        if streamer is None:  # encoding failed: error is set
            for job in batch:
                job.end(Failed(error or RuntimeError("the batch could not start")))
        else:
            streamer.close(error)
        for job in batch:
            self._count(job)
        self._batch_secs.append(time.monotonic() - started)

    def _run_call(self, item: _Call) -> None:
        if not item.future.set_running_or_notify_cancel():
            return
        self._counts["calls"] += 1
        try:
            item.future.set_result(item.fn())
        except BaseException as exc:  # the caller reads it from the future
            item.future.set_exception(exc)

    def _fail(self, item: GenJob | _Call | _Paused, error: BaseException) -> None:
        if isinstance(item, GenJob):
            item.end(Failed(error))
        elif isinstance(item, _Paused):
            for job in item.batch:
                job.end(Failed(error))
        elif item.future.set_running_or_notify_cancel():
            item.future.set_exception(error)
