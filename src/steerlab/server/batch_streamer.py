"""The transformers runner's streamer: splits a batch's new tokens back into its jobs.

Called by ``model.generate`` after every decode step (on the runner's worker thread): it emits
each job's text deltas, ends a job as soon as its own rows are done (end of text or its token
limit), checks cancellation and deadlines, and tells the batch to stop or to yield. Knows
nothing about HTTP.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from ..generate import TextDeltas
from .jobs import Delta, Done, Failed, GenJob, JobCancelled, RowResult, ran_past

class BatchStreamer(BaseStreamer):
    """Splits a batch's new tokens back into jobs; ends each job when its rows are done."""

    def __init__(self, tokenizer: Any, slots: list[tuple[GenJob, int]], eos: set[int], stop: threading.Event,
                 prompt_tokens: list[int], started: float, n_jobs: int) -> None:
        self.slots = slots
        self.eos = eos
        self.stop = stop
        self.prompt_tokens = prompt_tokens
        self.started = started
        self.n_jobs = n_jobs
        self.jobs = list(dict.fromkeys(job for job, _ in slots))
        self.ids: list[list[int]] = [[] for _ in slots]
        self.texts = [TextDeltas(tokenizer) for _ in slots]
        self.reason: list[str | None] = [None] * len(slots)
        self.first_token: dict[GenJob, float] = {}
        self.prompt_seen = False
        self.report: dict = {}  # filled by generate(): "live" is the governor while it runs
        self.should_yield: Callable[[], bool] | None = None  # set by the runner for each slice
        self.yielded = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompts (every slice starts with them)
            self.prompt_seen = True
            return
        now = time.monotonic()
        self._check_alive(now)
        for r, t in enumerate(value.reshape(len(self.slots), -1)[:, -1].tolist()):
            job, _ = self.slots[r]
            if job.finished or self.reason[r]:
                continue
            if t in self.eos:
                self.reason[r] = "stop"
            else:
                self.ids[r].append(t)
                self.first_token.setdefault(job, now)
                self._emit_delta(r)
                if len(self.ids[r]) >= job.options.max_new_tokens:
                    self.reason[r] = "length"
        for job in self.jobs:
            if not job.finished and all(self.reason[r] for r, (j, _) in enumerate(self.slots) if j is job):
                self._finish(job)
        if all(job.finished for job in self.jobs):
            self.stop.set()
        elif self.should_yield is not None and self.should_yield():
            self.yielded = True
            self.stop.set()

    def end(self) -> None:
        pass

    def _gain(self, r: int) -> float | None:
        gov = self.report.get("live")
        if gov is None or not bool(gov.on[r]) or not gov.gains[r]:
            return None
        return gov.gains[r][-1]

    def _emit_delta(self, r: int) -> None:
        if delta := self.texts[r].delta(self.ids[r]):
            job, row = self.slots[r]
            job.emit(Delta(row, delta, self._gain(r)))

    def _check_alive(self, now: float) -> None:
        for job in self.jobs:
            if job.finished:
                continue
            if job.cancel.is_set():
                job.end(Failed(JobCancelled("cancelled by the client")))
            elif now > job.deadline:
                job.end(Failed(ran_past(job)))

    def _finish(self, job: GenJob) -> None:
        rows = []
        for r, (j, _) in enumerate(self.slots):
            if j is job:
                tail, text = self.texts[r].final(self.ids[r])
                if tail:  # a held-back tail
                    job.emit(Delta(self.slots[r][1], tail))
                gov, gate = self.report.get("live"), self.report.get("gate")
                summary = gov.summary()[r] if gov is not None and bool(gov.on[r]) else None
                rows.append(RowResult(text=text.strip(), tokens=len(self.ids[r]), prompt_tokens=self.prompt_tokens[r],
                                      finish_reason=self.reason[r] or "length", governor=summary,
                                      conditions=gate.summary()[r] if gate is not None else None))
        now = time.monotonic()
        first = self.first_token.get(job)
        job.end(Done(rows=rows, batch_jobs=self.n_jobs, batch_rows=len(self.slots),
                     queued_s=self.started - job.created, first_token_s=None if first is None else first - job.created,
                     total_s=now - job.created))

    def close(self, error: BaseException | None) -> None:
        """After ``generate`` returned (or raised): answer every job still open."""
        self._check_alive(time.monotonic())
        for job in self.jobs:
            if error is not None:
                job.end(Failed(error))
            else:
                for r, (j, _) in enumerate(self.slots):
                    if j is job and not self.reason[r]:
                        self.reason[r] = "length" if len(self.ids[r]) >= job.options.max_new_tokens else "stop"
                self._finish(job)
